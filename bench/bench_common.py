"""What the PyTorch benchmarks share: their common options, the timer, and the error measure and
report of their cross-checks."""
import statistics
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_run_args(ap, presets, impls, all_means):
    """--preset, --device, --dtype, --iters, --warmup, --impls and --json; all_means says which
    presets --preset all runs."""
    ap.add_argument("--preset", default="tiny",
                    help="one of %s, a comma list, or 'all' (%s)" % (", ".join(presets), all_means))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                    help="default bf16 on cuda, fp32 on cpu")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 cuda, 5 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5 cuda, 1 cpu)")
    ap.add_argument("--impls", default=",".join(impls), help="comma list of %s" % ", ".join(impls))
    ap.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")


def resolve_run_args(ap, args, presets, all_presets, impls):
    """(device, dtype, iters, warmup, presets, impls, device name) from add_run_args' options,
    with the device's defaults; unknown presets or implementations end with a usage error."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    iters = args.iters or (20 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 1)
    chosen = list(all_presets) if args.preset == "all" else args.preset.split(",")
    for name in chosen:
        if name not in presets:
            ap.error(f"unknown preset {name!r}; choose from {', '.join(presets)} or all")
    chosen_impls = [i for i in args.impls.split(",") if i]
    for i in chosen_impls:
        if i not in impls:
            ap.error(f"unknown impl {i!r}; choose from {', '.join(impls)}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return device, dtype, iters, warmup, chosen, chosen_impls, dev_name


def check_text(check, reference="-"):
    """The table's check column: ok/FAIL with the largest relative error, or `reference`."""
    if check is None:
        return reference
    return (f"{'ok' if check['ok'] else 'FAIL'} (max rel {max(check['max_rel_err'].values()):.1e} "
            f"vs {check['vs']})")


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
