// MoA attention on the CPU: plain loops over query heads, fp32 accumulation. Forward recomputes
// the scores in two passes (max / log-sum-exp, then the weighted sum of values), so it needs
// only an fp32 accumulator per query head. Backward recomputes P from the saved lse:
//   delta = rowsum(dO * O),  dP = dO . V^T,  dS = P * (dP - delta),
//   dq = scale * dS . K,  dk = scale * dS^T . q,  dv = P^T . dO.
// dq is parallel over query heads; dk and dv are parallel over kv rows, each summing its query
// heads in a fixed order (ascending position, then choice), so results never depend on the
// thread count.
#include <cmath>
#include <limits>

#include "core/workspace.hpp"
#include "cpu/access.hpp"
#include "cpu/backend.hpp"
#include "cpu/parallel.hpp"

namespace scattermoe::cpu {

namespace {

struct Geometry {
  std::int64_t B, S, k, H, hd;
  std::int64_t tokens() const { return B * S; }
  std::int64_t rows() const { return B * S * k; }
  std::int64_t width() const { return H * hd; }
  explicit Geometry(const MoaAttentionArgs& a)
      : B(a.batch), S(a.seq_len), k(a.top_k), H(a.kv_heads), hd(a.head_dim) {}
};

struct ForwardScratch {
  float* acc = nullptr;  // (rows, width)
};

ForwardScratch forward_layout(detail::WorkspaceCarver& carver, const Geometry& g) {
  ForwardScratch s;
  s.acc = carver.take<float>(g.rows() * g.width());
  return s;
}

struct BackwardScratch {
  float* delta = nullptr;   // (rows, H)
  float* dq_acc = nullptr;  // (rows, width)
  float* dk_acc = nullptr;  // (tokens, width)
  float* dv_acc = nullptr;  // (tokens, width)
};

BackwardScratch backward_layout(detail::WorkspaceCarver& carver, const Geometry& g) {
  BackwardScratch s;
  s.delta = carver.take<float>(g.rows() * g.H);
  s.dq_acc = carver.take<float>(g.rows() * g.width());
  s.dk_acc = carver.take<float>(g.tokens() * g.width());
  s.dv_acc = carver.take<float>(g.tokens() * g.width());
  return s;
}

// Whether key position sp of batch b is admissible for query position s.
struct Admissible {
  const MoaAttentionArgs& a;
  bool key_kept(std::int64_t b, std::int64_t sp) const {
    const TensorView& m = a.key_padding_mask;
    if (!m.defined()) return true;
    return load_index(m.data(), m.dtype(), b * m.stride(0) + sp * m.stride(1)) != 0;
  }
  bool operator()(std::int64_t b, std::int64_t s, std::int64_t sp) const {
    return (!a.causal || sp <= s) && key_kept(b, sp);
  }
};

// <A[ra, h*hd ...], B[rb, h*hd ...]> in fp32.
float dot(const Matrix& A, std::int64_t ra, const Matrix& Bm, std::int64_t rb, std::int64_t h,
          std::int64_t hd) {
  float acc = 0.0f;
  for (std::int64_t c = 0; c < hd; ++c) acc += A.get(ra, h * hd + c) * Bm.get(rb, h * hd + c);
  return acc;
}

}  // namespace

std::size_t moa_attention_forward_workspace_size(const MoaAttentionArgs& args) {
  detail::WorkspaceCarver carver;
  forward_layout(carver, Geometry(args));
  return carver.used();
}

void moa_attention_forward(const MoaAttentionArgs& args, const TensorView& out,
                           const TensorView& lse, const Workspace& ws) {
  const Geometry g(args);
  detail::WorkspaceCarver carver(ws);
  const ForwardScratch scratch = forward_layout(carver, g);
  const Matrix q(args.q), kp(args.k_proj), vp(args.v_proj), o(out), l(lse);
  const Admissible admissible{args};
  const float scale = args.scale;
  const std::int64_t hd = g.hd;
  // One index per query head: (row r = t*k + j, kv head h).
  parallel_for(g.rows() * g.H, g.S * hd * 3, [&](std::int64_t i) {
    const std::int64_t r = i / g.H, h = i % g.H;
    const std::int64_t t = r / g.k, b = t / g.S, s = t % g.S;
    float* acc = scratch.acc + r * g.width() + h * hd;
    // Pass 1: running max and sum of exp.
    float m = -std::numeric_limits<float>::infinity();
    float sum = 0.0f;
    for (std::int64_t sp = 0; sp < g.S; ++sp) {
      if (!admissible(b, s, sp)) continue;
      const float x = scale * dot(q, r, kp, b * g.S + sp, h, hd);
      if (x > m) {
        sum = sum * std::exp(m - x) + 1.0f;
        m = x;
      } else {
        sum += std::exp(x - m);
      }
    }
    for (std::int64_t c = 0; c < hd; ++c) acc[c] = 0.0f;
    if (sum == 0.0f) {  // no admissible key
      l.set(r, h, -std::numeric_limits<float>::infinity());
      for (std::int64_t c = 0; c < hd; ++c) o.set(r, h * hd + c, 0.0f);
      return;
    }
    const float row_lse = m + std::log(sum);
    // Pass 2: P = exp(score - lse), out = P . V.
    for (std::int64_t sp = 0; sp < g.S; ++sp) {
      if (!admissible(b, s, sp)) continue;
      const std::int64_t key = b * g.S + sp;
      const float p = std::exp(scale * dot(q, r, kp, key, h, hd) - row_lse);
      for (std::int64_t c = 0; c < hd; ++c) acc[c] += p * vp.get(key, h * hd + c);
    }
    l.set(r, h, row_lse);
    for (std::int64_t c = 0; c < hd; ++c) o.set(r, h * hd + c, acc[c]);
  });
}

std::size_t moa_attention_backward_workspace_size(const MoaAttentionArgs& args) {
  detail::WorkspaceCarver carver;
  backward_layout(carver, Geometry(args));
  return carver.used();
}

void moa_attention_backward(const MoaAttentionArgs& args, const TensorView& out,
                            const TensorView& lse, const TensorView& d_out, const TensorView& dq,
                            const TensorView& dk, const TensorView& dv, const Workspace& ws) {
  const Geometry g(args);
  detail::WorkspaceCarver carver(ws);
  const BackwardScratch scratch = backward_layout(carver, g);
  const Matrix q(args.q), kp(args.k_proj), vp(args.v_proj), o(out), l(lse), dO(d_out);
  const Admissible admissible{args};
  const float scale = args.scale;
  const std::int64_t hd = g.hd, H = g.H;

  // delta[r, h] = <dO[r, h], O[r, h]>
  parallel_for(g.rows() * H, hd, [&](std::int64_t i) {
    const std::int64_t r = i / H, h = i % H;
    scratch.delta[i] = dot(dO, r, o, r, h, hd);
  });

  if (dq.defined()) {
    const Matrix dq_m(dq);
    parallel_for(g.rows() * H, g.S * hd * 4, [&](std::int64_t i) {
      const std::int64_t r = i / H, h = i % H;
      const std::int64_t t = r / g.k, b = t / g.S, s = t % g.S;
      float* acc = scratch.dq_acc + r * g.width() + h * hd;
      for (std::int64_t c = 0; c < hd; ++c) acc[c] = 0.0f;
      const float row_lse = l.get(r, h);
      if (std::isfinite(row_lse)) {
        for (std::int64_t sp = 0; sp < g.S; ++sp) {
          if (!admissible(b, s, sp)) continue;
          const std::int64_t key = b * g.S + sp;
          const float p = std::exp(scale * dot(q, r, kp, key, h, hd) - row_lse);
          const float ds = p * (dot(dO, r, vp, key, h, hd) - scratch.delta[i]);
          for (std::int64_t c = 0; c < hd; ++c) acc[c] += ds * kp.get(key, h * hd + c);
        }
      }
      for (std::int64_t c = 0; c < hd; ++c) dq_m.set(r, h * hd + c, scale * acc[c]);
    });
  }

  if (dk.defined() || dv.defined()) {
    // One index per kv row (key token, kv head); its query heads in a fixed order.
    parallel_for(g.tokens() * H, g.S * g.k * hd * 5, [&](std::int64_t i) {
      const std::int64_t key = i / H, h = i % H;
      const std::int64_t b = key / g.S, sp = key % g.S;
      float* dk_acc = scratch.dk_acc + key * g.width() + h * hd;
      float* dv_acc = scratch.dv_acc + key * g.width() + h * hd;
      for (std::int64_t c = 0; c < hd; ++c) dk_acc[c] = dv_acc[c] = 0.0f;
      for (std::int64_t s = args.causal ? sp : 0; s < g.S; ++s) {
        if (!admissible(b, s, sp)) continue;
        for (std::int64_t j = 0; j < g.k; ++j) {
          const std::int64_t r = (b * g.S + s) * g.k + j;
          const float row_lse = l.get(r, h);
          if (!std::isfinite(row_lse)) continue;
          const float p = std::exp(scale * dot(q, r, kp, key, h, hd) - row_lse);
          const float ds = p * (dot(dO, r, vp, key, h, hd) - scratch.delta[r * H + h]);
          for (std::int64_t c = 0; c < hd; ++c) {
            dv_acc[c] += p * dO.get(r, h * hd + c);
            dk_acc[c] += ds * q.get(r, h * hd + c);
          }
        }
      }
      if (dk.defined()) {
        const Matrix dk_m(dk);
        for (std::int64_t c = 0; c < hd; ++c) dk_m.set(key, h * hd + c, scale * dk_acc[c]);
      }
      if (dv.defined()) {
        const Matrix dv_m(dv);
        for (std::int64_t c = 0; c < hd; ++c) dv_m.set(key, h * hd + c, dv_acc[c]);
      }
    });
  }
}

}  // namespace scattermoe::cpu
