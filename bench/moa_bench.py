#!/usr/bin/env python
"""Mixture of Attention from PyTorch: scattermoe's MoA against dense multi-head attention of the
same active FLOPs and an MoA built the common way, forward and forward+backward, same inputs,
one process.

    python bench/moa_bench.py --preset tiny --device cpu            # smoke test, seconds
    python bench/moa_bench.py --preset all --device cuda --json moa.json

Implementations (no biases, causal, the same attention call for all three):
- scattermoe: scattermoe.moa.MoA. Router (fp32 softmax, top-k, renormalised), the routing plan,
  the expert query projection by parallel_linear (scattered in, scattered out), the shared k/v
  projection, attention, the expert output projection by parallel_linear with the gates.
- common: the same module's weights and router, with the projections done the usual way: sort
  the routed rows by expert, copy the expert sizes to the host, gather the token rows, one
  matmul per expert, scatter the query rows back into token order (index_copy); for the output,
  gather the attention rows, one matmul per expert, scale by the gates and sum into the tokens
  (index_add).
- dense: multi-head attention with k*kv_heads query heads over kv_heads shared k/v heads, and
  dense query / output projections d_model <-> k*kv_heads*head_dim: the FLOPs MoA spends on a
  token, with no routing. Its weights are its own, so its outputs are not cross-checked.

FLOPs (forward, active): 2*T*d*(k*H*hd) query + 2*T*d*(2*H*hd) keys/values + 2*T*(k*H*hd)*d
output + 4*B*S*S*(k*H)*hd attention (half of it when causal) + 2*T*d*E router (MoA only; the
rates of all three use the MoA count). forward+backward = 3 x forward. Times are medians; on
CUDA measured with torch.cuda.Event after warm-up, the L2 cache flushed (a 256 MB buffer
written) before every iteration; on a CPU with time.perf_counter. "peak MiB" is the memory
that forward+backward allocates beyond the inputs and weights (CUDA only); "f+b vs dense" is the
dense forward+backward time over this one (1.00: as fast as dense). The check compares
scattermoe's output and gradients (x, query, k/v, output and router weights) with the common
implementation's. On a CPU the scattermoe projections run in the library's reference backend
(plain loops), so only the GPU numbers say anything about speed.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

import scattermoe  # noqa: F401  (import torch first: it loads libc10)
from bench_common import (Timer, add_run_args, check_text, fmt, rel_err,
                          resolve_run_args)
from scattermoe.moa import MoA, gqa_attention

PRESETS = {  # batch, seq, d_model, head_dim, kv_heads, experts, top_k
    "tiny": (2, 128, 128, 32, 2, 4, 2),
    "d1024-hd64": (8, 1024, 1024, 64, 4, 8, 4),     # 16 active query heads, 8k tokens
    "d2048-hd128": (4, 4096, 2048, 128, 4, 16, 4),  # 16 active query heads, 16k tokens
    "d2048-hd64-k2": (4, 2048, 2048, 64, 8, 16, 2),  # 16 active query heads, 8k tokens
}
IMPLS = ("scattermoe", "common", "dense")


# ---------------------------------------------------------------------------------------------
# x (B, S, d) -> (B, S, d). Query heads: (choice j, kv head g) is SDPA head g*k + j, as in MoA.

def shared_kv(m, x2, B, S):
    H, hd = m.kv_heads, m.head_dim
    key, value = m.kv_proj(x2).view(B, S, 2, H, hd).unbind(dim=2)
    return key.transpose(1, 2), value.transpose(1, 2)                        # (B, H, S, hd)


def to_heads(q, B, S, k, H, hd):
    """(T*k, H*hd) token-major query rows -> (B, H*k, S, hd)."""
    return q.view(B, S, k, H, hd).permute(0, 3, 2, 1, 4).reshape(B, H * k, S, hd)


def from_heads(a, B, S, k, H, hd):
    """(B, H*k, S, hd) -> (T*k, H*hd) token-major rows."""
    return a.view(B, H, k, S, hd).permute(0, 3, 2, 1, 4).reshape(B * S * k, H * hd)


def run_ours(m, dense, x):
    return m(x)


def run_common(m, dense, x):
    B, S, d = x.shape
    T, k, H, hd, E = B * S, m.top_k, m.kv_heads, m.head_dim, m.num_experts
    x2 = x.reshape(T, d)
    gates, idx, _ = m.route(x2)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)          # grouped position -> flat slot t*k + j
    counts = torch.bincount(flat, minlength=E).tolist()  # host copy: the per-expert loop sizes
    tok = order // k
    wq, wo = m.q_experts.weight, m.o_experts.weight   # (E, H*hd, d), (E, d, H*hd)

    xs = x2.index_select(0, tok).split(counts)
    qs = torch.cat([xe @ wq[e].t() for e, xe in enumerate(xs)])
    q = qs.new_empty(T * k, H * hd).index_copy(0, order, qs)
    key, value = shared_kv(m, x2, B, S)
    a = gqa_attention(to_heads(q, B, S, k, H, hd), key, value, None, m.causal, k)
    a = from_heads(a, B, S, k, H, hd)

    g = gates.reshape(-1).index_select(0, order).unsqueeze(1)
    as_ = a.index_select(0, order).split(counts)
    ys = torch.cat([ae @ wo[e].t() for e, ae in enumerate(as_)]) * g.to(a.dtype)
    return torch.zeros_like(x2).index_add(0, tok, ys).view(B, S, d)


def run_dense(m, dense, x):
    B, S, d = x.shape
    k, H, hd = m.top_k, m.kv_heads, m.head_dim
    wq, wo = dense
    x2 = x.reshape(B * S, d)
    q = (x2 @ wq.t()).view(B, S, H * k, hd).transpose(1, 2)
    key, value = shared_kv(m, x2, B, S)
    a = gqa_attention(q, key, value, None, m.causal, k)
    return (a.transpose(1, 2).reshape(B * S, H * k * hd) @ wo.t()).view(B, S, d)


FNS = {"scattermoe": run_ours, "common": run_common, "dense": run_dense}


# ---------------------------------------------------------------------------------------------

def forward_flops(B, S, d, hd, H, E, k, causal):
    T, width = B * S, H * hd
    proj = 2.0 * T * d * (k * width) * 2 + 2.0 * T * d * 2 * width
    attn = 4.0 * B * S * S * k * H * hd * (0.5 if causal else 1.0)
    return proj + attn + 2.0 * T * d * E


def bench_preset(name, device, dtype, iters, warmup, impls, causal):
    B, S, d, hd, H, E, k = PRESETS[name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    m = MoA(d, hd, H, E, k, causal=causal).to(device=device, dtype=dtype)
    with torch.no_grad():  # a router that spreads the tokens
        m.router.weight.normal_(std=1.0 / d ** 0.5)
    dense = [(torch.randn(k * H * hd, d, generator=gen) * 0.02).to(device=device, dtype=dtype)
             .requires_grad_(), (torch.randn(d, k * H * hd, generator=gen) * 0.02)
             .to(device=device, dtype=dtype).requires_grad_()]
    x = torch.randn(B, S, d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(B, S, d, generator=gen).to(device=device, dtype=dtype)
    moa_inputs = [x, m.q_experts.weight, m.kv_proj.weight, m.o_experts.weight, m.router.weight]
    grad_names = ["dx", "dWq", "dWkv", "dWo", "dWrouter"]

    fwd_flops = forward_flops(B, S, d, hd, H, E, k, causal)
    timer = Timer(device)
    rows, outs = {}, {}
    for impl in impls:
        fn = FNS[impl]
        inputs = moa_inputs if impl != "dense" else [x, m.kv_proj.weight] + dense

        def fwd():
            with torch.no_grad():
                return fn(m, dense, x)

        def fwd_bwd():
            y = fn(m, dense, x)
            return torch.autograd.grad(y, inputs, dy)

        y = fn(m, dense, x)
        grads = torch.autograd.grad(y, inputs, dy)
        if impl != "dense":
            outs[impl] = (y.detach(), [g.detach() for g in grads])
        del y, grads
        rows[impl] = timer.measure(fwd, fwd_bwd, fwd_flops, iters, warmup)

    # Cross-check: scattermoe against the common implementation (same weights and routing).
    check = {}
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if "scattermoe" in outs and "common" in outs:
        (y, g), (ry, rg) = outs["scattermoe"], outs["common"]
        errs = {"y": rel_err(y, ry)}
        for gname, a, b in zip(grad_names, g, rg):
            errs[gname] = rel_err(a, b)
        check["scattermoe"] = {"vs": "common", "max_rel_err": errs,
                               "ok": max(errs.values()) <= tol}
    del m, dense, x, dy, outs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": name, "batch": B, "seq": S, "d_model": d, "head_dim": hd, "kv_heads": H,
            "experts": E, "top_k": k, "causal": causal, "fwd_gflop": fwd_flops / 1e9,
            "results": rows, "check": check, "tol": tol}


def print_table(all_res, impls):
    hdr = (f"{'preset':<14} {'impl':<11} {'fwd ms':>9} {'fwd TF/s':>9} {'f+b ms':>9} "
           f"{'f+b TF/s':>9} {'peak MiB':>9} {'f+b vs dense':>12}  check")
    print(hdr)
    print("-" * len(hdr))
    for res in all_res:
        dense = res["results"].get("dense")
        for impl in impls:
            r = res["results"][impl]
            c = res["check"].get(impl)
            chk = check_text(c)
            ratio = None if dense is None else dense["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            print(f"{res['preset']:<14} {impl:<11} {r['fwd_ms']:>9.3f} {r['fwd_tflops']:>9.4g} "
                  f"{r['fwd_bwd_ms']:>9.3f} {r['fwd_bwd_tflops']:>9.4g} "
                  f"{fmt(r['peak_extra_mib'], '9.1f'):>9} {fmt(ratio, '12.2f'):>12}  {chk}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(ap, PRESETS, IMPLS, "all but tiny: GPU")
    ap.add_argument("--no-causal", dest="causal", action="store_false",
                    help="attend to every position (default: causal)")
    args = ap.parse_args(argv)
    device, dtype, iters, warmup, presets, impls, dev_name = resolve_run_args(
        ap, args, PRESETS, [p for p in PRESETS if p != "tiny"], IMPLS)
    print(f"device {dev_name}, dtype {str(dtype).replace('torch.', '')}, "
          f"torch {torch.__version__}, scattermoe {scattermoe.__version__}, iters {iters}, warmup {warmup}, "
          f"{'causal' if args.causal else 'non-causal'}")

    all_res = [bench_preset(name, device, dtype, iters, warmup, impls, args.causal)
               for name in presets]
    print_table(all_res, impls)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev_name, "dtype": str(dtype).replace("torch.", ""),
                       "torch": torch.__version__, "scattermoe": scattermoe.__version__,
                       "iters": iters, "warmup": warmup,
                       "flop_convention": "fwd = 2*T*d*(2*k*H*hd + 2*H*hd) + 4*B*S^2*k*H*hd "
                                          "(x0.5 causal) + 2*T*d*E; fwd+bwd = 3*fwd",
                       "presets": all_res}, f, indent=2)
        print(f"wrote {args.json}")
    ok = all(c["ok"] for r in all_res for c in r["check"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
