"""On the GPU: generated kernels compiled for real (bf16 included), autotuning, CUDA graphs."""
import json

import pytest
import torch

import deepfuse
from deepfuse.models import DeepSeekForCausalLM, get_config
from deepfuse.runtime.kernels import rms_norm as kernel
from conftest import rel_err

pytestmark = pytest.mark.gpu


class Norms(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(n) + 0.5)
        self.proj = torch.nn.Linear(n, n, bias=False)

    def norm(self, x):
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    def forward(self, x, residual):
        h = residual + self.proj(x)
        return self.norm(h), h


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_bf16_block_matches_fp64(mode):
    model = Norms(2048).cuda().bfloat16()
    x = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        compiled = torch.compile(model, backend="deepfuse", mode=mode)
        for _ in range(3):  # reduce-overhead records a CUDA graph on a later call, then replays it
            y, h = compiled(x, r)
        ref_y, ref_h = model.double()(x.double(), r.double())
    assert [m.impl for m in report.matches] == ["triton"] and report.matches[0].op == "deepfuse::add_rms_norm"
    assert rel_err(y, ref_y) < 1e-2 and rel_err(h, ref_h) < 1e-2


def test_autotune_result_is_cached_per_gpu_and_bucket():
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(2048, device="cuda", dtype=torch.bfloat16)
    kernel.launch(x, w, None, 1e-6, True, torch.bfloat16)
    db = json.loads((deepfuse.codegen.cache_dir() / "autotune.json").read_text())
    (key, index), = db.items()
    assert torch.cuda.get_device_name() in key and key.endswith("|4096")
    assert 0 <= index < len(kernel.CONFIGS)


def test_bundled_tiny_model_bf16_on_gpu():
    model = DeepSeekForCausalLM.from_config(get_config("v3-tiny"), device="cuda", dtype=torch.bfloat16, seed=4)
    ids = torch.randint(0, 512, (2, 33), device="cuda")
    report = deepfuse.Report()
    with torch.no_grad(), deepfuse.collect(report):
        out = torch.compile(model, backend="deepfuse")(ids)
        ref = model(ids)
    assert report.matches and {m.impl for m in report.matches} == {"triton"}
    assert rel_err(out, ref) < 2e-2
