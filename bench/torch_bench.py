#!/usr/bin/env python
"""SMoE GLU-MLP (SwiGLU) from PyTorch: scattermoe's GLUMLP against torch._grouped_mm and an
eager per-expert loop, forward and forward+backward, same inputs, one process.

    python bench/torch_bench.py --preset tiny --device cpu          # smoke test, seconds
    python bench/torch_bench.py --preset all --device cuda --json out.json

The model presets (those of the shared performance anchors) are meant for the GPU; on a CPU only
`tiny` finishes in reasonable time. torch._grouped_mm is probed first (forward and backward with
uneven and empty groups, as routing makes them; its CUDA kernel needs sm90+ and bf16; on CUDA
the probe runs in a child process, since a failed device-side check would end this one): where
it does not run, its row reads "n/a". (torch 2.11 also runs it on a CPU, so the CPU smoke test
cross-checks it too.)

FLOPs: forward = 6*T*k*d*h, forward+backward = 3x forward. Times are medians; on CUDA they are
measured with torch.cuda.Event after warm-up, with the L2 cache flushed (a 256 MB buffer
written) before every iteration; on a CPU with time.perf_counter. Routing (top-k of a softmax
over random logits, renormalised over the k picks) is done once, outside the timings; the
routing plan (sort by expert), the gather and the aggregation are inside them. The largest
preset (deepseek-v3: 22.5 GB of bf16 expert weights) needs about 80 GB of GPU memory: the
weights, the reference gradients of the cross-check and one set being timed.
"""
import argparse
import json
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

import scattermoe  # noqa: F401  (import torch first: it loads libc10)
from bench_common import (Timer, add_run_args, check_text, fmt, rel_err,
                          resolve_run_args)
from scattermoe.mlp import GLUMLP

PRESETS = {  # T, d, h, E, k
    "tiny": (256, 256, 128, 8, 2),
    "mixtral-8x7b": (8192, 4096, 14336, 8, 2),
    "olmoe-1b-7b": (16384, 2048, 1024, 64, 8),
    "qwen3-30b-a3b": (16384, 2048, 768, 128, 8),
    "deepseek-v3": (8192, 7168, 2048, 256, 8),
}
IMPLS = ("scattermoe", "grouped_mm", "eager")


# ---------------------------------------------------------------------------------------------
# The three implementations. W1: (E, 2h, d), rows [0, h) "up", [h, 2h) "gate" (GLUMLP's layout);
# W2: (E, d, h). x: (T, d); p, idx: (T, k). Output (T, d) = sum_j p_j * W2[e_j] (silu(g) * u).

def run_ours(mlp, x, p, idx, W1, W2):
    return mlp(x, p, idx)


def run_grouped_mm(mlp, x, p, idx, W1, W2):
    T, k = idx.shape
    E, two_h, _ = W1.shape
    h = two_h // 2
    flat = idx.reshape(-1)
    sorted_e, order = torch.sort(flat, stable=True)
    # Group end offsets without a host sync (bincount on CUDA reads its input's max back).
    experts = torch.arange(E, device=flat.device, dtype=sorted_e.dtype)
    offs = torch.searchsorted(sorted_e, experts, right=True).to(torch.int32)
    tok = order // k
    xs = x.index_select(0, tok)
    hh = torch._grouped_mm(xs, W1.transpose(1, 2), offs=offs)
    a = F.silu(hh[:, h:]) * hh[:, :h]
    ys = torch._grouped_mm(a, W2.transpose(1, 2), offs=offs)
    ys = ys * p.reshape(-1).index_select(0, order).unsqueeze(1).to(ys.dtype)
    return torch.zeros_like(x).index_add(0, tok, ys)


def run_eager(mlp, x, p, idx, W1, W2):
    E = W1.shape[0]
    h = W1.shape[1] // 2
    # unbind: one stacked weight gradient in backward (W1[e] would add a zero-filled
    # full-size gradient per expert).
    W1s, W2s = W1.unbind(0), W2.unbind(0)
    y = torch.zeros_like(x)
    for e in range(E):
        tok, slot = torch.where(idx == e)
        if tok.numel() == 0:
            continue
        hh = x[tok] @ W1s[e].t()
        a = F.silu(hh[:, h:]) * hh[:, :h]
        ye = (a @ W2s[e].t()) * p[tok, slot].unsqueeze(1).to(x.dtype)
        y = y.index_add(0, tok, ye)
    return y


FNS = {"scattermoe": run_ours, "grouped_mm": run_grouped_mm, "eager": run_eager}


# run_grouped_mm's calls on a small problem with uneven groups (13 and 19 rows) and an empty one,
# weights passed as transposed views of (E, out, in) storage, forward and backward.
GROUPED_MM_PROBE = textwrap.dedent("""
    import torch
    device, dtype = torch.device({device!r}), getattr(torch, {dtype!r})
    a = torch.randn(40, 64, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 32, 64, device=device, dtype=dtype, requires_grad=True)
    offs = torch.tensor([8, 8, 21, 40], device=device, dtype=torch.int32)
    out = torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
    out.backward(torch.randn_like(out))
    ref = torch.cat([a[s:e] @ w[g].t() for g, (s, e) in enumerate(zip([0, 8, 8, 21], offs.tolist()))])
    err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert err < 3e-2, f"torch._grouped_mm differs from a per-group matmul: {{err:.2e}}"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
""")


def grouped_mm_available(device, dtype):
    if not hasattr(torch, "_grouped_mm"):
        return False, "this torch has no torch._grouped_mm"
    code = GROUPED_MM_PROBE.format(device=str(device), dtype=str(dtype).replace("torch.", ""))
    if device.type != "cuda":
        try:
            exec(code, {})  # noqa: S102  (our own probe)
            return True, ""
        except Exception as exc:  # noqa: BLE001  (unsupported dtype)
            return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=300)
    except subprocess.TimeoutExpired:
        return False, "the probe did not finish in 300 s"
    if run.returncode == 0:
        return True, ""
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    return False, lines[-1] if lines else f"the probe exited with status {run.returncode}"


# ---------------------------------------------------------------------------------------------

def bench_preset(name, device, dtype, iters, warmup, impls, gmm_ok):
    T, d, h, E, k = PRESETS[name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: deepseek-v3's fp32 init is 45 GB
        mlp = GLUMLP(d, h, E, k)
    mlp = mlp.to(dtype)
    W1, W2 = mlp.experts.weight, mlp.output_experts.weight
    x = torch.randn(T, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    logits = torch.randn(T, E, generator=gen).to(device)
    p, idx = torch.topk(logits.softmax(-1), k, dim=-1)
    p = (p / p.sum(-1, keepdim=True)).to(dtype).requires_grad_()
    dy = torch.randn(T, d, generator=gen).to(device=device, dtype=dtype)
    inputs = [x, W1, W2, p]

    fwd_flops = 6.0 * T * k * d * h
    timer = Timer(device)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    rows = {impl: None for impl in impls}  # None: n/a
    check = {}
    run = [i for i in impls if i != "grouped_mm" or gmm_ok]
    # Cross-check against the eager loop (or the first one run): its outputs are kept, and the
    # others' are compared and dropped at once, so at most two sets of gradients are alive.
    ref_name = "eager" if "eager" in run else (run[0] if run else None)
    ref = None
    for impl in sorted(run, key=lambda i: i != ref_name):
        fn = FNS[impl]

        def fwd():
            with torch.no_grad():
                return fn(mlp, x, p, idx, W1, W2)

        def fwd_bwd():
            y = fn(mlp, x, p, idx, W1, W2)
            return torch.autograd.grad(y, inputs, dy)

        y = fn(mlp, x, p, idx, W1, W2)
        out = [y.detach()] + [g.detach() for g in torch.autograd.grad(y, inputs, dy)]
        del y
        if impl == ref_name:
            ref = out
        else:
            errs = {name: rel_err(a, b)
                    for name, a, b in zip(("y", "dx", "dW1", "dW2", "dp"), out, ref)}
            check[impl] = {"vs": ref_name, "max_rel_err": errs, "ok": max(errs.values()) <= tol}
        del out
        rows[impl] = timer.measure(fwd, fwd_bwd, fwd_flops, iters, warmup)

    del mlp, x, p, dy, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": name, "T": T, "d": d, "h": h, "E": E, "k": k,
            "fwd_gflop": fwd_flops / 1e9, "results": rows, "check": check, "tol": tol}


def print_table(all_res, impls):
    hdr = f"{'preset':<15} {'impl':<11} {'fwd ms':>9} {'fwd TF/s':>9} {'f+b ms':>9} " \
          f"{'f+b TF/s':>9} {'peak MiB':>9}  check"
    print(hdr)
    print("-" * len(hdr))
    for res in all_res:
        for impl in impls:
            r = res["results"].get(impl)
            c = res["check"].get(impl)
            chk = check_text(c, "ref" if r is not None else "-")
            if r is None:
                print(f"{res['preset']:<15} {impl:<11} {'n/a':>9} {'n/a':>9} {'n/a':>9} "
                      f"{'n/a':>9} {'n/a':>9}  -")
                continue
            print(f"{res['preset']:<15} {impl:<11} {r['fwd_ms']:>9.3f} "
                  f"{r['fwd_tflops']:>9.3f} {r['fwd_bwd_ms']:>9.3f} "
                  f"{r['fwd_bwd_tflops']:>9.3f} {fmt(r['peak_extra_mib'], '9.1f'):>9}  {chk}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap, PRESETS, IMPLS, "model presets: GPU; drop eager with --impls on many-expert ones")
    args = ap.parse_args(argv)
    device, dtype, iters, warmup, presets, impls, dev_name = resolve_run_args(
        ap, args, PRESETS, list(PRESETS), IMPLS)

    gmm_ok, gmm_why = grouped_mm_available(device, dtype)
    print(f"device {dev_name}, dtype {str(dtype).replace('torch.', '')}, torch {torch.__version__}, "
          f"scattermoe {scattermoe.__version__}, iters {iters}, warmup {warmup}")
    if "grouped_mm" in impls and not gmm_ok:
        print(f"torch._grouped_mm: n/a ({gmm_why})")

    all_res = []
    for name in presets:
        all_res.append(bench_preset(name, device, dtype, iters, warmup, impls, gmm_ok))
    print_table(all_res, impls)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev_name, "dtype": str(dtype).replace("torch.", ""),
                       "torch": torch.__version__, "scattermoe": scattermoe.__version__,
                       "iters": iters, "warmup": warmup, "grouped_mm_available": gmm_ok,
                       "flop_convention": "fwd = 6*T*k*d*h; fwd+bwd = 3*fwd",
                       "presets": all_res}, f, indent=2)
        print(f"wrote {args.json}")
    ok = all(c["ok"] for r in all_res for c in r["check"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
