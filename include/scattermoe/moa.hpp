// Mixture of Attention (MoA): the attention step between the per-expert query projection
// (ParallelLinear, scattered in and out) and the per-expert output projection. Keys and values
// come from one shared dense projection. Same conventions as ops.hpp / modules.hpp: views are
// non-owning, optional tensors are undefined views, bad input throws InvalidArgument before
// anything is written, temporaries live in the caller's workspace (query its size with the
// matching *_workspace_size function, which reads only shapes, dtypes and devices).
//
// Layout. Token t = b*seq_len + s (batch b, position s), choice j in [0, top_k), kv head
// g in [0, kv_heads), c in [0, head_dim):
//   q[t*top_k + j, g*head_dim + c]   query head (j, g) of token t (k*h_kv query heads a token)
//   k_proj[t, g*head_dim + c], v_proj[t, g*head_dim + c]   shared keys / values of kv head g
// Query head (j, g) of token (b, s) attends over the positions s' of batch b that are
// admissible: s' <= s when causal, and key_padding_mask[b, s'] != 0 when a mask is given.
//   score(s') = scale * <q, k_proj[b*S + s', g]>,  P = softmax over admissible s',
//   out[t*top_k + j, g*head_dim + c] = sum_s' P(s') * v_proj[b*S + s', g*head_dim + c]
//   lse[t*top_k + j, g] = log(sum over admissible s' of exp(score(s')))  (natural log)
// A query with no admissible key outputs zeros, has lse = -inf, and gets zero gradient.
// Arithmetic accumulates in fp32; q, k_proj, v_proj, out, d_out and the gradients share one
// float storage dtype; lse is always fp32. CPU only for now (CUDA tensors: Unsupported).
#pragma once

#include <cstddef>

#include "scattermoe/context.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe {

struct MoaAttentionArgs {
  TensorView q;                 // (B*S*k, h_kv*hd), token-major ParallelLinear query output
  TensorView k_proj;            // (B*S, h_kv*hd) shared keys
  TensorView v_proj;            // (B*S, h_kv*hd) shared values
  TensorView key_padding_mask;  // (B, S) int32 / int64, nonzero = keep; or undefined
  int batch = 0;                // B
  int seq_len = 0;              // S
  int top_k = 1;                // k
  int kv_heads = 1;             // h_kv
  int head_dim = 1;             // hd
  bool causal = true;
  float scale = 0.0f;           // 0: 1/sqrt(head_dim)
};

// out: q's shape and dtype. lse: (B*S*k, h_kv) fp32, saved for backward.
std::size_t moa_attention_forward_workspace_size(const MoaAttentionArgs& args);
void moa_attention_forward(const MoaAttentionArgs& args, const TensorView& out,
                           const TensorView& lse, const Context& ctx = {});

// out and lse as forward wrote them; d_out has out's shape. dq has q's shape, dk and dv
// k_proj's; leave any of them undefined to skip it. The dk / dv reductions run in a fixed order
// (ascending query position, then choice), so results do not depend on the thread count.
std::size_t moa_attention_backward_workspace_size(const MoaAttentionArgs& args);
void moa_attention_backward(const MoaAttentionArgs& args, const TensorView& out,
                            const TensorView& lse, const TensorView& d_out, const TensorView& dq,
                            const TensorView& dk, const TensorView& dv, const Context& ctx = {});

}  // namespace scattermoe
