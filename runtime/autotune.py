"""Autotuning: time each candidate configuration of a generated kernel once, remember the winner.

Results persist in ``<cache dir>/autotune.json`` keyed by (kernel, GPU name, shape bucket, candidate list), so a
second process on the same GPU starts with the tuned choice. A choice is stored as its index in the candidates,
so the key holds a digest of the list: a candidate added or removed by a later deepfuse is a new key, not an
index that now names another candidate. Buckets are powers of two of the varying dimension
(the number of rows, tokens): shapes inside a bucket behave alike, and the table stays small.
Off the GPU (the interpreter) there is nothing meaningful to time: the first configuration is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

from deepfuse.codegen import cache_dir
from deepfuse.log import log

T = TypeVar("T")

_lock = threading.Lock()
_memory: dict[str, int] = {}
_enabled = True


def set_enabled(on: bool) -> None:
    """options["autotune"]: when off, every kernel uses its first (default) configuration."""
    global _enabled
    _enabled = on


def bucket(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _db_path():
    return cache_dir() / "autotune.json"


def _load() -> dict:
    try:
        with open(_db_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(key: str, index: int) -> None:
    path = _db_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _load()
    data[key] = index
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def choose(
    kernel_key: str,
    n: int,
    configs: Sequence[dict],
    run: Callable[[dict], None],
    device: torch.device,
    enabled: bool = True,
) -> dict:
    """The best of ``configs`` for this kernel, GPU and bucket of ``n``; ``run(config)`` launches once."""
    if device.type != "cuda" or not (enabled and _enabled) or len(configs) == 1:
        return configs[0]
    if getattr(_worker, "precompiling", False):  # inside another tune's precompile: that one holds the lock
        return configs[_memory.get(_key(kernel_key, n, device, configs), 0)]
    if torch.cuda.is_current_stream_capturing():
        # Timing inside a CUDA graph capture is impossible; use the cached choice or the default.
        key = _key(kernel_key, n, device, configs)
        return configs[_memory.get(key, _load().get(key, 0))]
    key = _key(kernel_key, n, device, configs)
    with _lock:
        if key not in _memory:
            stored = _load().get(key)
            if isinstance(stored, int) and 0 <= stored < len(configs):
                _memory[key] = stored
            else:
                _memory[key] = _tune(configs, run, device)
                _store(key, _memory[key])
                log.info("autotuned %s bucket %d: %s", kernel_key, bucket(n), configs[_memory[key]])
    return configs[_memory[key]]


def once(make: Callable[[], T]) -> Callable[[], T]:
    """A getter of ``make()``'s result, made on its first call (under a lock: a tune's precompile threads call it
    side by side). A tune's inputs made this way exist only when it times: a cached choice makes none (at a warm
    compile the MoE tune made a gigabyte of random expert weights for nothing)."""
    lock, made = threading.Lock(), []

    def get() -> T:
        with lock:
            if not made:
                made.append(make())
        return made[0]

    return get


def copies_past_l2(like: torch.Tensor, device: torch.device, cap: int) -> int:
    """How many tensors of ``like``'s size pass twice ``device``'s L2 (at least 1, at most ``cap``)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    return max(1, min(cap, -(-2 * l2 // max(like.numel() * like.element_size(), 1))))


def cold_copies(like: torch.Tensor, device: torch.device, cap: int) -> list[torch.Tensor]:
    """Random tensors of ``like``'s shape, strides and dtype on ``device``, enough to pass twice the L2 (at most
    ``cap``): a candidate timed over them back to back reads its operand from HBM, as a model's next layer
    does, where one tensor timed alone sits in L2 after the first replay."""
    return [torch.empty_strided(tuple(like.shape), tuple(like.stride()), dtype=like.dtype, device=device).normal_()
            for _ in range(copies_past_l2(like, device, cap))]


def cold_clones(t: torch.Tensor, cap: int) -> list[torch.Tensor]:
    """``t`` and clones of it, enough to pass twice the L2 (at most ``cap``): ``cold_copies`` for a tensor whose
    values matter or whose dtype takes no random fill (an FP8 or int8 weight)."""
    return [t] + [t.clone() for _ in range(copies_past_l2(t, t.device, cap) - 1)]


_gpu_names: dict[int, str] = {}


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _key(kernel_key: str, n: int, device: torch.device, configs: Sequence[dict]) -> str:
    index = _index(device)
    if index not in _gpu_names:
        _gpu_names[index] = torch.cuda.get_device_name(index)
    listed = hashlib.sha1(repr(list(configs)).encode()).hexdigest()[:10]  # the candidates the index points into
    return f"{kernel_key}|{_gpu_names[index]}|{bucket(n)}|{listed}"


_worker = threading.local()
PRECOMPILE_THREADS = 8  # at most; fewer where the machine has fewer cores; DEEPFUSE_AUTOTUNE_THREADS=N to choose


def _threads() -> int:
    limit = os.environ.get("DEEPFUSE_AUTOTUNE_THREADS")
    if not limit:  # the cores this process may run on (a container's share, not the host's count)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return min(PRECOMPILE_THREADS, cores)
    if not limit.isdigit() or int(limit) < 1:
        raise ValueError(f"DEEPFUSE_AUTOTUNE_THREADS must be a whole number of threads, 1 or more; got {limit!r}")
    return int(limit)


def _precompile(configs: Sequence[dict], run: Callable[[dict], None], device: torch.device) -> None:
    """Run every candidate once, in threads, before any is timed: the first run of a candidate compiles its
    kernels, and Triton's compiler releases the GIL (its passes and ptxas: 2 threads compiled 6 MoE tiles for
    sm_90a in half the time of one, on a 2-core machine), so the candidates compile side by side instead of one
    after another (the MoE tune builds two kernels for each of its 18 candidates). The runs' results are not
    used; a candidate that fails here fails again, and is skipped, when it is timed. Each run holds its own
    outputs, so the threads take that much more GPU memory at once. One thread (or DEEPFUSE_AUTOTUNE_THREADS=1):
    no precompile, each candidate compiles when it is first timed."""
    workers = min(len(configs), _threads())
    if workers < 2:
        return
    index = _index(device)  # the caller's: a new thread's current device is 0

    def warm(cfg):
        _worker.precompiling = True  # a choose() inside run() takes its default instead of timing (see choose)
        with torch.cuda.device(index):
            run(cfg)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deepfuse-precompile") as pool:
        for cfg, done in [(cfg, pool.submit(warm, cfg)) for cfg in configs]:
            try:
                done.result()
            except Exception as e:
                log.debug("autotune precompile of %s failed: %s", cfg, e)
    torch.cuda.synchronize(device)


def _tune(configs: Sequence[dict], run: Callable[[dict], None], device: torch.device) -> int:
    from deepfuse.progress import progress

    progress(f"autotuning: compiling {len(configs)} configurations")
    _precompile(configs, run, device)
    times = []
    for i, cfg in enumerate(configs):
        progress(f"autotuning: configuration {i + 1}/{len(configs)}")
        try:
            times.append(_time(lambda: run(cfg)))
        except Exception as e:  # a config the hardware rejects (too much shared memory, say) is skipped
            log.debug("autotune config %s failed: %s", cfg, e)
            times.append(float("inf"))
    progress("")
    return min(range(len(configs)), key=times.__getitem__)


def _time(fn: Callable[[], None], replays: int = 15) -> float:
    """Median ms of ``fn`` replayed as a CUDA graph, as deepfuse's decode steps run: a decode-sized launch
    takes less time on the GPU than to issue from Python, so timing it eagerly measures the host (the likely
    reason the MoE decode tiles differed, 29 vs 35 us, between two H100 runs of the same code). Eager
    ``do_bench`` where ``fn`` cannot be captured."""
    fn()  # compiles the kernels outside the capture
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:
        from triton.testing import do_bench

        log.debug("autotune: timing without a CUDA graph (%s)", e)
        return do_bench(fn, warmup=5, rep=20, return_mode="median")
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2]
