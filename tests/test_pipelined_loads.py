"""No generated kernel's hot loop waits on a load in every step.

A plain ``range`` K loop pipelines only the loads that feed ``tl.dot``; any other load in it (an FP8 kernel's scales,
a norm weight, a mask) was a synchronous ``tt.load`` that waited a memory round trip in each step, and so were loads
under a branch (the MLA decode's skip of masked tiles: every cache tile of the static-cache decode step). Neither
shows in the interpreter. Here each family's decode-path kernels are compiled for sm_90a (no GPU needed) at one tile
of each kind, and the TTGIR's loops must hold no synchronous load (``bench/kernel_resources.py``'s count).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# kernel_resources.py's kernel names and, for each, which of its configurations to compile: (key, value) pairs a
# configuration must match (None: the first one, the launch's default)
KERNELS = {
    "linear_group": [{"NORM": False}, {"NORM": True}],
    "moe_gate_up": [None], "moe_down": [None],
    "moe_gate_up_w8a8": [None, {"SWAP_AB": True}], "moe_down_w8a8": [None],
    "moe_gate_up_w8a16": [None], "moe_down_w8a16": [None],
    "fp8_decode": [{"SWAP": False}, {"SWAP": True}],
    "fp8_gemm": [{"TMA": False}, {"TMA": True}, {"RESCALE": True}],
    "mla_decode": [{"BLOCK_T": 32, "num_warps": 4, "HAS_MASK": False}, {"BLOCK_T": 32, "num_warps": 4, "HAS_MASK": True,
                                                                      "num_stages": 3}],
    "mla_decode_fp8": [{"BLOCK_T": 32, "num_warps": 4, "HAS_MASK": False, "num_stages": 2},
                       {"BLOCK_T": 32, "num_warps": 4, "HAS_MASK": True, "num_stages": 3}],
}

SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import kernel_resources as kr
wanted = json.loads(sys.argv[2])
rows = []
for name, picks in wanted.items():
    configs = list(kr.KERNELS[name]())
    for pick in picks:
        for config, fn, pointers, scalars, constexprs, *divisible in configs:
            if pick is None or all(config.get(k) == v for k, v in pick.items()):
                got = kr.resources(fn, pointers, scalars, constexprs, config["num_warps"], config["num_stages"],
                                   divisible=divisible[0] if divisible else ())
                rows.append([name, config, got["loop_loads"], got["async_copies"]])
                break
        else:
            rows.append([name, pick, None, None])
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", SCRIPT, os.path.join(ROOT, "bench"), json.dumps(KERNELS)],
                         capture_output=True, text=True, env=env, timeout=900)
    if out.returncode:
        raise AssertionError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_picked_configuration_compiles(compiled):
    missing = [(name, pick) for name, pick, loads, _ in compiled if loads is None]
    assert not missing, f"no such configuration: {missing}"


def test_no_load_waits_in_a_hot_loop(compiled):
    waiting = [(name, config, loads) for name, config, loads, _ in compiled if loads]
    assert not waiting, f"synchronous loads in a loop (kernel, configuration, count): {waiting}"
