"""The JSON the kernel sweeps (mla_decode_tiles, mla_prefill_tiles, moe_align, moe_fp8, moe_router) write beside
their printed tables, rewritten after every row: a sweep its call's timeout cuts short keeps what it measured."""
import json
import os

import torch


def write_rows(out_dir, name: str, rows: list) -> None:
    """``rows`` with the device, torch version and commit (DEEPFUSE_COMMIT) to ``out_dir``/``name``.json."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
                   "commit": os.environ.get("DEEPFUSE_COMMIT", "?"), "rows": rows}, f, indent=1)


class Rows(list):
    """A sweep's rows, written to ``out_dir``/``name``.json (``write_rows``) on every append; no file without
    ``out_dir``."""

    def __init__(self, out_dir, name: str):
        super().__init__()
        self.out_dir, self.name = out_dir, name

    def append(self, row) -> None:
        super().append(row)
        if self.out_dir:
            write_rows(self.out_dir, self.name, self)
