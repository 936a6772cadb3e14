// Memory-bound kernels of the CUDA backend: the routing plan, gathers, gate combine, k-sums,
// row-dots, per-expert column sums and activations. All take a stream, none synchronises.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/common.cuh"
#include "scattermoe/modules.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::cuda {

FlatFloats flat_floats(const TensorView& v);  // rank 1 (n) or rank 2 (rows, cols)

// ---- routing plan ----
std::size_t plan_workspace_size(std::int64_t rows, int num_experts);
void build_plan(const TensorView& expert_idxs, int num_experts, std::int64_t* sorted_expert,
                std::int64_t* sorted_scattered, std::int64_t* expert_offsets,
                std::int64_t offsets_stride, void* workspace, std::size_t workspace_bytes,
                cudaStream_t stream);

// out[i, :] = src[src.row(i), :] * (coeff ? coeff[coeff_index[i]] : 1), i in [0, rows); dtype T
// for src and out. coeff_index null means coeff[i]. out may be src itself when src has no index
// and ld_out == src.ld (each element is read, then written, by the same thread).
void gather_rows(DType dtype, RowSource src, void* out, std::int64_t ld_out, std::int64_t rows,
                 std::int64_t cols, const FlatFloats* coeff, const std::int64_t* coeff_index,
                 cudaStream_t stream);

// The aggregations over each token's k rows, in the order j = 0 .. k-1. A routed row p = t*k + j
// is row p of the source, or (row_of non-null) row row_of[p]: the source in the grouped order,
// row_of the inverse of the plan's sorted_scattered_idxs (invert_rows).
// out[t, :] = sum_j gates[t, j] * y[row(t*kg + j), :]
void gate_combine(DType dtype, const void* y, std::int64_t ld_y, const FlatFloats& gates,
                  std::int64_t tokens, void* out, std::int64_t ld_out, std::int64_t cols,
                  cudaStream_t stream, const std::int64_t* row_of = nullptr);

// out[t, :] = sum_j src[row(t*k + j), :]
void sum_k_rows(DType dtype, const void* src, std::int64_t ld_src, std::int64_t k,
                std::int64_t tokens, void* out, std::int64_t ld_out, std::int64_t cols,
                cudaStream_t stream, const std::int64_t* row_of = nullptr);

// inverse[index[i]] = i for i in [0, rows) (index a permutation of [0, rows)).
void invert_rows(const std::int64_t* index, std::int64_t rows, std::int64_t* inverse, cudaStream_t stream);

// out[out_index ? out_index[i] : i] = <a[a.row(i)], b[b.row(i)]>            (cols columns)
//                                     + (bias ? <c[c.row(i)], bias[expert[i]]> : 0)  (bias_cols)
// i in [0, rows). a, b, c, bias of dtype T; out any float dtype.
struct RowDot {
  RowSource a, b, c;
  const void* bias = nullptr;
  std::int64_t bias_expert_stride = 0;
  std::int64_t bias_stride = 1;
  std::int64_t bias_cols = 0;
  const std::int64_t* expert = nullptr;
  const std::int64_t* out_index = nullptr;
  FlatFloats out;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
};
void row_dot(DType dtype, const RowDot& r, cudaStream_t stream);

// db[e, n] = sum over expert e's grouped rows i of src[src.row(i), n], in row order.
void expert_column_sums(DType dtype, RowSource src, const std::int64_t* expert_offsets,
                        int num_experts, std::int64_t cols, void* db, std::int64_t db_expert_stride,
                        std::int64_t db_stride, cudaStream_t stream);

// a (rows, h) = act(hidden) or act(hidden[:, h:]) * hidden[:, :h] (glu)
void activation_forward(DType dtype, Activation act, bool glu, const void* hidden,
                        std::int64_t ld_hidden, std::int64_t rows, std::int64_t h, void* a,
                        std::int64_t ld_a, cudaStream_t stream);
// d_hidden from d_a scaled per row by scale[scale_index[i]] (scale optional)
void activation_backward(DType dtype, Activation act, bool glu, const void* hidden,
                         std::int64_t ld_hidden, const void* d_a, std::int64_t ld_d_a,
                         const FlatFloats* scale, const std::int64_t* scale_index,
                         std::int64_t rows, std::int64_t h, void* d_hidden,
                         std::int64_t ld_d_hidden, cudaStream_t stream);

// The MLP backward's steps between the dA' GEMM and the weight gradients in one pass over the
// rows (no second bias): for each grouped row i with gate g = gates[gate_index[i]],
//   A = act(H) (glu: act(H[:, h:]) * H[:, :h]), rounded to T as activation_forward rounds it,
//   d_gates[gate_index[i]] = <dA'[i], A> (optional; summed as row_dot sums),
//   dH[i] = act'(H) * (g * dA'[i]) (optional; as activation_backward),
//   dA'[i] = g * A (optional, in place: dW2's operand; as gather_rows scales).
// Each lane reads its chunks of dA' before it writes them, so the in-place write is safe.
// The dA' GEMM runs this pass in its epilogue where it can (VarlenMGemm::rows_after), with the
// fast sigmoid of the forward's SwiGLU epilogue (A then matches the A that epilogue wrote) and
// d_gates summed per column tile, then over the tiles in order.
struct MlpBackwardRows {
  Activation act = Activation::kSilu;
  bool glu = true;
  const void* hidden = nullptr;
  std::int64_t ld_hidden = 0;
  void* d_a = nullptr;
  std::int64_t ld_d_a = 0;
  FlatFloats gates;
  const std::int64_t* gate_index = nullptr;
  void* d_hidden = nullptr;  // null: dH not wanted
  std::int64_t ld_d_hidden = 0;
  bool scale_a_in_place = false;
  FlatFloats d_gates;
  bool has_d_gates = false;
  std::int64_t rows = 0;
  std::int64_t h = 0;
  // Scratch of (rows, ceil(h / kGluBackwardTileColumns)) floats for the dA' GEMM that runs this
  // pass in its epilogue (VarlenMGemm::rows_after): each column tile's share of a row's d_gates.
  float* d_gates_partial = nullptr;
};
void mlp_backward_rows(DType dtype, const MlpBackwardRows& r, cudaStream_t stream);

// d_gates[gate_index[i]] = sum over t < tiles of partial[i * tiles + t], in that order: the
// d_gates of a dA' GEMM that ran MlpBackwardRows in its epilogue, one share per column tile.
void sum_d_gates_partials(const float* partial, std::int64_t rows, int tiles, const FlatFloats& d_gates,
                          const std::int64_t* gate_index, cudaStream_t stream);

}  // namespace scattermoe::cuda
