"""``deepfuse inspect``: the folder it writes, user factories, and clear failures that leave nothing behind."""
import json
import os
import subprocess
import sys

import onnx
import pytest

from deepfuse.cli import main

FACTORY = '''
import torch

class Norm(torch.nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.proj = torch.nn.Linear(n, n)

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return torch.relu(self.proj(self.weight * h.to(x.dtype)))

def make_model():
    return Norm(), (torch.randn(4, 32),)

def no_patterns():
    return torch.nn.Linear(8, 8), (torch.randn(2, 8),)

def broken():
    raise RuntimeError("the factory fell over")
'''


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "my_model.py"
    path.write_text(FACTORY)
    return path


def test_cli_on_the_bundled_tiny_model(tmp_path):
    out = tmp_path / "inspect"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "deepfuse", "inspect", "tiny", "--out", str(out), "--interpret"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "moe" in run.stdout and "rms_norm" in run.stdout
    report = json.loads((out / "report.json").read_text())
    assert {m["family"] for m in report["matches"]} == {"moe", "mla", "rms_norm"}
    assert "| moe |" in (out / "report.md").read_text()
    kernels = sorted(p.name for p in (out / "kernels").iterdir())
    assert any(k.startswith("moe_experts_") for k in kernels) and any(k.startswith("rms_norm_") for k in kernels)
    assert any(k.startswith("mla_attention_") for k in kernels)
    code = (out / "graphs" / "graph_0.py").read_text()
    assert "torch.ops.deepfuse.moe_experts.default" in code and "torch.ops.deepfuse.add_rms_norm.default" in code
    # 8 tokens: the router's matmul is deepfuse's (moe_router rather than moe_routing)
    assert "torch.ops.deepfuse.mla_attention.default" in code and "torch.ops.deepfuse.moe_router.default" in code
    model = onnx.load(str(out / "graphs" / "graph_0.onnx"))
    onnx.checker.check_model(model)
    custom = [n for n in model.graph.node if n.domain == "deepfuse"]
    assert {n.op_type for n in custom} == {"moe_experts", "moe_router", "mla_attention", "rms_norm", "add_rms_norm"}
    moe = next(n for n in custom if n.op_type == "moe_experts")
    assert {a.name for a in moe.attribute} >= {"activation", "impl"}
    assert len(moe.input) == 8  # x, ids, weights, the experts' two weights, the shared MLP's three
    routing = next(n for n in custom if n.op_type == "moe_router")
    assert len(routing.output) == 2 and {a.name for a in routing.attribute} >= {"scoring", "top_k", "scale", "mm_dtype"}
    assert len([i for i in routing.input if i]) == 2  # the hidden states and the router weight (no bias)


def test_cli_on_a_user_factory(factory, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inspect", f"{factory}:make_model", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [m["op"] for m in report["matches"]] == ["deepfuse::rms_norm"]
    assert report["matches"][0]["source"].startswith("my_model.py:")
    assert "rms_norm" in capsys.readouterr().out


@pytest.mark.parametrize("target,message", [
    ("{factory}:broken", "the factory fell over"),
    ("{factory}:missing", "has no function 'missing'"),
    ("{factory}:no_patterns", "no pattern matched"),
    ("/nonexistent/file.py:make", "does not exist"),
])
def test_bad_targets_fail_clearly_and_write_nothing(target, message, factory, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inspect", target.format(factory=factory), "--out", str(out)]) != 0
    assert message in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_unwritable_output_is_a_clear_error(factory, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["inspect", f"{factory}:make_model", "--out", str(blocker / "out")]) != 0
    assert "cannot write" in capsys.readouterr().err


def test_console_script_is_installed():
    import importlib.metadata

    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert any(e.name == "deepfuse" and e.value == "deepfuse.cli:main" for e in scripts)


def test_info_log_has_one_line_per_match_and_decline_with_reason_and_source(caplog):
    import torch

    import deepfuse

    def model(x, w):
        h = x.float()
        fused = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        half = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))  # in fp16: declined
        return fused, half

    with caplog.at_level("INFO", logger="deepfuse"):
        deepfuse.explain(model, torch.randn(3, 16).half(), torch.rand(16).half())
    lines = [r.getMessage() for r in caplog.records if r.name == "deepfuse"]
    matched = [ln for ln in lines if ln.startswith("matched rms_norm")]
    declined = [ln for ln in lines if ln.startswith("declined rms_norm")]
    assert len(matched) == 1 and "test_inspect_cli.py:" in matched[0]
    assert len(declined) == 1 and "not fp32" in declined[0] and "test_inspect_cli.py:" in declined[0]


def test_progress_is_silent_off_a_terminal(capsys):
    from deepfuse.progress import progress

    progress("working")
    assert capsys.readouterr().err == ""
