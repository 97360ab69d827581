import json

import torch

import deepfuse
from deepfuse.models import DeepSeekForCausalLM, get_config


def test_explain_report_table_and_json(tmp_path):
    model = DeepSeekForCausalLM.from_config(get_config("v3-tiny"), seed=0)
    report = deepfuse.explain(model, torch.randint(0, 512, (1, 5)), interpret=True)
    text = str(report)
    assert "deepfuse::add_rms_norm" in text and "post_attention_layernorm" in text and "model.py:" in text
    data = json.loads(report.to_json(str(tmp_path / "r.json")))
    assert data == json.loads((tmp_path / "r.json").read_text())
    assert data["matches"] and all(m["kernel_file"] for m in data["matches"])
    assert all(f.endswith(".py") for f in data["kernel_files"])
    # explain runs no generated kernel: the kernel files exist, but the model ran its plain aten graph
    assert {m["impl"] for m in data["matches"]} == {"interpret"}


def test_explain_on_cpu_default_uses_reference_and_writes_no_kernels():
    model = DeepSeekForCausalLM.from_config(get_config("tiny"), seed=0)
    report = deepfuse.explain(model, torch.randint(0, 512, (1, 3)))
    assert report.matches and {m.impl for m in report.matches} == {"reference"}
    assert report.kernel_files == []
