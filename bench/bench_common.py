"""What the PyTorch benchmarks share: the timer and the error measure of their cross-checks."""
import statistics
import time

import torch


class Timer:
    """Median milliseconds of fn() after warm-up: CUDA events with the L2 cache flushed (a
    256 MB buffer written) before every iteration on a GPU, time.perf_counter on a CPU."""

    def __init__(self, device):
        self.device = device
        self.flush = (torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=device)
                      if device.type == "cuda" else None)

    def median_ms(self, fn, iters, warmup):
        for _ in range(warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for _ in range(iters):
                self.flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def measure(self, fwd, fwd_bwd, fwd_flops, iters, warmup):
        """The result row of one implementation: forward and forward+backward median ms and
        TFLOP/s (forward+backward = 3x the forward flops), and on CUDA the peak memory that one
        forward+backward allocates beyond what was allocated before it (MiB)."""
        t_f = self.median_ms(fwd, iters, warmup)
        t_fb = self.median_ms(fwd_bwd, iters, warmup)
        peak = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fwd_bwd()
            torch.cuda.synchronize(self.device)
            peak = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        return {"fwd_ms": t_f, "fwd_tflops": fwd_flops / t_f / 1e9,
                "fwd_bwd_ms": t_fb, "fwd_bwd_tflops": 3 * fwd_flops / t_fb / 1e9,
                "peak_extra_mib": peak}


def rel_err(a, b):
    """max|a - b| / max|b|, in float32 chunks of dim 0 (the weight gradients of the large
    presets are too big to widen whole)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    rows = max(1, (1 << 26) // max(1, a.shape[1]))
    err = scale = 0.0
    for i in range(0, a.shape[0], rows):
        ai, bi = a[i:i + rows].float(), b[i:i + rows].float()
        err = max(err, (ai - bi).abs().max().item())
        scale = max(scale, bi.abs().max().item())
    return err / max(scale, 1e-30)


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)
