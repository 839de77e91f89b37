"""Timing helpers shared by the benchmarks: median wall time with device synchronisation, peak
extra memory, and the device's achievable bandwidth and matmul rate (the roofline's two limits)."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_extra_mib(fn, device):
    """Peak memory allocated during fn beyond what was allocated before (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def measure_peaks(device, dtype, tiny, n=None):
    """(bytes/s, flop/s) of this device: best of a few large copies and large (n x n) matmuls."""
    numel = (16 if tiny else 256) * 2**20  # 64 MiB / 1 GiB of fp32
    a = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), device, 2, 5)
    bw = 2 * a.numel() * a.element_size() / t
    del a, b
    n = n or (512 if tiny else 8192)
    x = torch.randn(n, n, device=device).to(dtype)
    y = torch.randn(n, n, device=device).to(dtype)
    t = time_fn(lambda: torch.matmul(x, y), device, 2, 5)
    return bw, 2 * n**3 / t


