"""The JSON the kernel sweeps (mla_decode_tiles, moe_align, moe_router) write beside their printed tables."""
import json
import os

import torch


def write_rows(out_dir, name: str, rows: list) -> None:
    """``rows`` with the device, torch version and commit (DEEPFUSE_COMMIT) to ``out_dir``/``name``.json."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "commit": os.environ.get("DEEPFUSE_COMMIT", "?"), "rows": rows}, f, indent=1)
