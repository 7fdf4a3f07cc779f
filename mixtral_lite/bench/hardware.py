"""The machine: memory bandwidth, bytes a decode step reads, peak memory, a description."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import threading
import time
from pathlib import Path

import torch

from ..cpu import build
from ..heap import trim_heap


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the best of ``repeats`` sums over a buffer far larger
    than any cache (on a GPU, a copy, counting the bytes read and written)."""
    x = torch.ones(nbytes // 4, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        if device.type == "cuda":
            y = x.clone()
            del y
        else:
            x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    moved = 2 * nbytes if device.type == "cuda" else nbytes
    return moved / best


def active_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes one batch-1 decode step must read: every tensor of the model, except only the top-k
    slices of stacked expert tensors (and their scales) and one row of the embedding table."""
    config = model.config
    k, e = config.num_experts_per_tok, config.num_experts
    seen: set[int] = set()
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        key = id(t) if t.is_meta else t.data_ptr()  # meta tensors all have address 0
        if key in seen or not t.is_floating_point() and t.dtype not in (torch.int8, torch.uint8):  # uint8: int4 codes
            continue
        seen.add(key)
        size = t.numel() * t.element_size()
        if name.startswith("tok_embeddings"):
            size //= config.vocab_size
            if config.tie_word_embeddings:
                size *= config.vocab_size  # the same table is the output head: read in full
        elif ".feed_forward." in name and t.dim() >= 2 and t.shape[0] == e and "gate" not in name:
            size = size * k // e
        total += size
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


class PeakMemory:
    """Largest memory growth inside the block: resident set size sampled every millisecond on the
    CPU, the allocator's peak on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _rss()
        self._max = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, _rss())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, _rss()) - self._start


def weight_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "native_kernel": build.status() if device.type == "cpu" else "n/a",
    }
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
