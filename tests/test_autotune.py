"""The autotuner's bookkeeping on the CPU machine: CUDA's device calls stubbed, the candidates' runs plain Python.
Timing itself is the GPU tests' (test_gpu.py)."""
import threading
import time

import pytest
import torch

from deepfuse import codegen
from deepfuse.runtime import autotune


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """choose() on a "cuda" device with no GPU: device name, index and synchronize stubbed, the results stored
    under a fresh cache directory; each test gives the candidates' times (autotune._time)."""
    import contextlib

    monkeypatch.setenv("DEEPFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(codegen, "_cache_dir_override", None)
    monkeypatch.setattr(autotune, "_memory", {})
    monkeypatch.setattr(autotune, "_gpu_names", {})


def test_candidates_compile_side_by_side_then_the_fastest_wins(fake_gpu, monkeypatch):
    """Every candidate runs once in the precompile, several at a time on several threads, before any is timed;
    the timing then picks the fastest; a candidate that raises is skipped, not fatal."""
    monkeypatch.setattr(autotune, "_threads", lambda: 4)
    configs = [{"i": i} for i in range(6)]
    first_runs, timed = {}, []
    running, peak = [0], [0]
    lock = threading.Lock()

    def run(cfg):
        if cfg["i"] not in first_runs:  # the precompile's run: where the kernels would compile
            first_runs[cfg["i"]] = threading.current_thread().name
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1
            if cfg["i"] == 2:
                raise RuntimeError("out of shared memory")
            return
        if cfg["i"] == 2:
            raise RuntimeError("out of shared memory")
        timed.append(cfg["i"])

    speed = {0: 3.0, 1: 2.0, 3: 0.5, 4: 1.0, 5: 4.0}
    monkeypatch.setattr(autotune, "_time", lambda fn: (fn(), speed[timed[-1]])[1])
    best = autotune.choose("kernel", 100, configs, run, torch.device("cuda"))
    assert best == {"i": 3}
    assert sorted(first_runs) == list(range(6))
    assert all(name.startswith("deepfuse-precompile") for name in first_runs.values())
    assert peak[0] >= 2  # side by side, not one after another
    assert timed == [0, 1, 3, 4, 5]


def test_a_choose_inside_a_precompile_run_takes_its_default_without_waiting(fake_gpu, monkeypatch):
    """A candidate whose run tunes another kernel (with its own choose) must not wait on the tune that holds the
    lock: in a precompile thread the inner choose returns its default (or a choice already made)."""
    monkeypatch.setattr(autotune, "_threads", lambda: 2)
    inner_choices = []

    def inner_run(cfg):
        raise AssertionError("an inner choose in a precompile thread must not time anything")

    def run(cfg):
        if threading.current_thread().name.startswith("deepfuse-precompile"):
            inner_choices.append(autotune.choose("inner", 8, [{"j": 0}, {"j": 1}], inner_run, torch.device("cuda")))

    monkeypatch.setattr(autotune, "_time", lambda fn: (fn(), 1.0)[1])
    done = []
    worker = threading.Thread(target=lambda: done.append(
        autotune.choose("outer", 8, [{"i": 0}, {"i": 1}], run, torch.device("cuda"))))
    worker.start()
    worker.join(timeout=30)
    assert done == [{"i": 0}], "the outer tune did not finish: the inner choose waited on its lock"
    assert inner_choices == [{"j": 0}, {"j": 0}]


def test_one_thread_means_no_precompile(fake_gpu, monkeypatch):
    """DEEPFUSE_AUTOTUNE_THREADS=1: each candidate compiles when it is first timed, on the calling thread."""
    monkeypatch.setenv("DEEPFUSE_AUTOTUNE_THREADS", "1")
    threads = []
    monkeypatch.setattr(autotune, "_time", lambda fn: (fn(), 1.0)[1])
    autotune.choose("kernel", 4, [{"i": 0}, {"i": 1}, {"i": 2}],
                    lambda cfg: threads.append(threading.current_thread().name), torch.device("cuda"))
    assert threads == [threading.current_thread().name] * 3


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_a_clear_error(fake_gpu, monkeypatch, value):
    monkeypatch.setenv("DEEPFUSE_AUTOTUNE_THREADS", value)
    with pytest.raises(ValueError, match="DEEPFUSE_AUTOTUNE_THREADS must be a whole number"):
        autotune.choose("kernel", 4, [{"i": 0}, {"i": 1}], lambda cfg: None, torch.device("cuda"))


def test_the_default_thread_count_is_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv("DEEPFUSE_AUTOTUNE_THREADS", raising=False)
    monkeypatch.setattr(autotune.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert autotune._threads() == 3
    monkeypatch.setattr(autotune.os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert autotune._threads() == autotune.PRECOMPILE_THREADS


def test_weight_clones_pass_twice_the_l2(monkeypatch):
    """cold_clones: the tensor itself, then clones (same values, own memory) until twice the L2 is passed, at most
    ``cap`` in all; one at least, however large the tensor."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(L2_cache_size=1000))
    w = torch.arange(100, dtype=torch.int8)
    clones = autotune.cold_clones(w, cap=16)
    assert len(clones) == 16 and clones[0] is w
    assert all(torch.equal(c, w) and c.data_ptr() != w.data_ptr() for c in clones[1:])
    assert len(autotune.cold_clones(torch.zeros(300, dtype=torch.int8), cap=16)) == 7  # 2000 / 300, rounded up
    assert len(autotune.cold_clones(torch.zeros(5000, dtype=torch.int8), cap=16)) == 1


def test_quant_timing_runs_each_candidate_over_the_weight_clones(monkeypatch):
    """quant_matmul's timing run launches a candidate once per weight clone, the clones made once (on the first
    run, under a lock, as precompile threads may start it together)."""
    from deepfuse.runtime.kernels import quant

    made = []
    monkeypatch.setattr(autotune, "cold_clones", lambda w, cap: made.append(cap) or [w, w.clone(), w.clone()])
    w = torch.zeros(4, 4)
    launched = []
    run = quant._over_cold_weights(lambda cfg, weight: launched.append((cfg["i"], weight.data_ptr())), lambda: w)
    threads = [threading.Thread(target=run, args=({"i": i},)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == [quant.TUNE_WEIGHT_COPIES]
    assert sorted(i for i, _ in launched) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len({ptr for _, ptr in launched}) == 3 and w.data_ptr() in {ptr for _, ptr in launched}


def test_once_makes_its_value_once_across_threads():
    made = []

    @autotune.once
    def value():
        time.sleep(0.02)  # long enough for the other threads to arrive while it is being made
        made.append(1)
        return object()

    got = []
    threads = [threading.Thread(target=lambda: got.append(value())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == [1] and len(got) == 6 and all(g is got[0] for g in got)


@pytest.mark.parametrize("timed", [False, True])
def test_tunes_make_their_inputs_only_when_they_time(monkeypatch, timed):
    """moe.tune and quant.tune build random inputs (V2-Lite's experts: a gigabyte) only inside the timing run: a
    cached choice (``choose`` returning without running) makes none; a timing makes them once for all candidates."""
    from deepfuse.runtime.kernels import moe, quant

    made = []
    for name in ("randn", "rand"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, device=None, **k: made.append(1) or _real(*a, **k))
    runs = []

    def choose(key, n, configs, run, device, enabled=True):
        if timed:
            monkeypatch.setattr(moe, "moe_experts", lambda *a, **k: runs.append("moe"))
            monkeypatch.setattr(quant, "quant_matmul", lambda *a, **k: runs.append("quant"))
            monkeypatch.setattr(autotune, "cold_clones", lambda w, cap: [w])
            for cfg in configs[:2]:
                run(cfg)
        return configs[0]

    monkeypatch.setattr(autotune, "choose", choose)
    moe.tune(4, 32, 16, 4, 2, torch.float16, "cuda")
    moe_made, made[:] = len(made), []
    quant.tune(1, 64, 128, "fp8-block", True, quant.DEFAULT_BLOCK, torch.float16, "cuda", has_bias=False)
    if not timed:
        assert moe_made == 0 and made == [] and runs == []
    else:  # x, one routing (4 tokens x 2 of 4 experts), its weights and two expert weights; x and the weight
        assert moe_made == 1 + 1 + 1 + 2 and len(made) == 2
        assert runs.count("quant") == 2 and runs.count("moe") == 2


def test_a_stored_choice_is_an_index_into_the_list_it_was_timed_over(fake_gpu, monkeypatch):
    """A later deepfuse that adds a candidate must not read an old index as the new list's entry at that index:
    the key holds the candidate list, so the new list is timed afresh; the old list still finds its choice."""
    speed = {"a": 2.0, "b": 1.0, "c": 3.0, "new": 0.5}
    timed = []

    def run(cfg):
        timed.append(cfg["name"])

    monkeypatch.setattr(autotune, "_time", lambda fn: (fn(), speed[timed[-1]])[1])
    old = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    assert autotune.choose("kernel", 8, old, run, torch.device("cuda")) == {"name": "b"}
    monkeypatch.setattr(autotune, "_memory", {})  # a new process: the choice comes from the disk
    timed.clear()
    grown = [{"name": "c"}, {"name": "a"}, {"name": "new"}, {"name": "b"}]
    assert autotune.choose("kernel", 8, grown, run, torch.device("cuda")) == {"name": "new"}  # not index 1: "a"
    assert "new" in timed
    monkeypatch.setattr(autotune, "_memory", {})
    timed.clear()
    assert autotune.choose("kernel", 8, old, run, torch.device("cuda")) == {"name": "b"} and not timed

