// Grouped GEMMs of the CUDA backend (declarations; kernels in grouped_gemm.cuh, tile
// configurations in sm80_grouped_gemm.cuh and sm90_grouped_gemm.cuh).
//
// varlen-M: for every expert e and its grouped rows i in [off[e-1], off[e]):
//   C[c_row(i), n] = sum_k A[a.row(i), k] * B[e](k, n) + bias[e](n)
//   A is K-contiguous; B[e] has unit stride along k ("K-major") or along n ("N-major").
// varlen-K: for every expert e, over its grouped rows i:
//   C[e](m, n) = sum_i A[a.row(i), m] * B[b.row(i), n]      (C[e] row-major, zeros if no rows)
// Work runs over (expert, row tile, column tile) from a tile list built on the device, so no
// tile straddles two experts, nothing is padded and the host never waits.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/kernel_choice.hpp"
#include "cuda/kernels.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::cuda {

// The MLP backward's SwiGLU row pass (MlpBackwardRows) in the epilogue of the dA' GEMM that
// feeds it, for rows i of H = [first | gate] (grouped order, like C) and C's n = h columns:
// A = silu(gate) * first rounded to T, dH = [g dA' silu(gate) | g dA' first silu'(gate)], C = g * A
// (dW2's operand, when c_out), and each column tile's share of d_gates = <dA', A> into
// d_gates_partial (rows, n / kGluBackwardTileColumns), dA' as the accumulator rounds to T.
struct GluBackwardEpilogue {
  const void* hidden = nullptr;
  std::int64_t ld_hidden = 0;
  void* d_hidden = nullptr;         // null: dH not wanted
  std::int64_t ld_d_hidden = 0;
  FlatFloats gates;
  const std::int64_t* gate_index = nullptr;
  float* d_gates_partial = nullptr;  // null: d_gates not wanted
  bool c_out = false;               // write g * A to C
  // Rows whose H chunks a lane loads at once, of its 4 per round (SCATTERMOE_SM90_GLU_BACKWARD_LOADS,
  // 4 or 2, to measure; step 50).
  int loads = 4;
};

struct VarlenMGemm {
  RowSource a;                          // (rows, K), K-contiguous
  const void* b = nullptr;              // expert e at b + e*b_expert_stride
  std::int64_t b_expert_stride = 0;
  std::int64_t b_stride_k = 0;
  std::int64_t b_stride_n = 0;          // one of b_stride_k, b_stride_n is 1
  const void* bias = nullptr;           // optional (E, N)
  std::int64_t bias_expert_stride = 0;
  std::int64_t bias_stride_n = 1;
  void* c = nullptr;
  std::int64_t ldc = 0;
  const std::int64_t* c_index = nullptr;  // c_row(i) = c_index ? c_index[i] : i
  std::int64_t rows = 0;                // L
  std::int64_t n = 0;
  std::int64_t k = 0;
  const std::int64_t* expert_offsets = nullptr;
  int num_experts = 0;
  int raster_group_rows = 8;            // row tiles visited together (set by run_varlen_m_gemm)
  // SwiGLU of an up projection: C's n = 2h columns are [first | gate]; also write
  // A[i, c] = silu(C[i, h + c]) * C[i, c] (as C rounds them) into glu_a, (rows, h) in grouped
  // order (c_index null). run_varlen_m_gemm fuses it into the GEMM's epilogue where the kernel
  // and the shape allow (fuse_glu_epilogue), else runs the activation kernel after the GEMM.
  void* glu_a = nullptr;
  std::int64_t glu_lda = 0;
  // The persistent warp-specialised kernels store each round per warp instead of block-wide
  // (set by run_varlen_m_gemm; SCATTERMOE_SM90_VARLEN_M_WARP_STORES=0 clears it to measure).
  bool warp_stores = true;
  // With warp_stores: a warp whose 16 rows all lie in the tile's expert stores each round by TMA
  // (one 16 x 64 box from its staging buffer) instead of by its threads, so the consumers go on
  // while the box leaves (set by run_varlen_m_gemm where varlen_m_tma_stores_possible; cleared by
  // SCATTERMOE_SM90_VARLEN_M_TMA_STORES=0).
  bool tma_stores = false;
  // The persistent warp-specialised kernels' consumers take each tile's coordinates from the
  // producer once its first stage has landed (SCATTERMOE_SM90_VARLEN_M_TILE_SLOTS=0: they look
  // them up before the k loop, as before step 47).
  bool tile_slots = true;
  // The MLP backward's row pass that follows this GEMM (dA'), run by run_varlen_m_gemm: in the
  // epilogue (glu_backward, filled from it) where the kernel and the shape allow
  // (fuse_glu_backward_epilogue), else as mlp_backward_rows after the GEMM. Host pointer.
  const MlpBackwardRows* rows_after = nullptr;
  GluBackwardEpilogue glu_backward;  // filled by run_varlen_m_gemm for the fused kernel
};

// Whether the layers write the rows they aggregate over k (the second projection's, dX's) in
// the grouped order, which the varlen-M kernels store whole (by TMA on the Hopper path), and
// gather each token's k rows through the inverse of the routing permutation (invert_rows), instead
// of scattering them to token-major positions (SCATTERMOE_GROUPED_AGGREGATION=0, to measure).
bool grouped_aggregation();

struct VarlenKGemm {
  RowSource a;                          // (rows, M), M-contiguous
  RowSource b;                          // (rows, N), N-contiguous
  void* c = nullptr;                    // C[e] at c + e*c_expert_stride, row-major with ldc
  std::int64_t c_expert_stride = 0;
  std::int64_t ldc = 0;
  std::int64_t m = 0;
  std::int64_t n = 0;
  const std::int64_t* expert_offsets = nullptr;
  int num_experts = 0;
};

// Whether every 16-byte chunk (vec elements) that the kernels copy starts 16-byte aligned, so
// each is one cp.async: pointers, leading dimensions, expert strides and the contiguous extents.
inline bool chunks_aligned(const void* ptr, std::int64_t a, std::int64_t b, std::int64_t c, int vec) {
  return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && a % vec == 0 && b % vec == 0 && c % vec == 0;
}
inline bool chunks_aligned(const VarlenMGemm& g, int vec) {
  const bool b_k_major = g.b_stride_k == 1;
  return chunks_aligned(g.a.ptr, g.a.ld, g.k, 0, vec) &&
         (b_k_major ? chunks_aligned(g.b, g.b_stride_n, g.b_expert_stride, g.k, vec)
                    : chunks_aligned(g.b, g.b_stride_k, g.b_expert_stride, g.n, vec));
}
inline bool chunks_aligned(const VarlenKGemm& g, int vec) {
  return chunks_aligned(g.a.ptr, g.a.ld, g.m, 0, vec) && chunks_aligned(g.b.ptr, g.b.ld, g.n, 0, vec);
}
// Whether the driver can describe the weights of g for TMA, beyond the 16-byte alignment that
// chunks_aligned(g, 8) already guarantees for 16-bit elements: every stride real (a broadcast
// weight, stride 0, keeps the cp.async kernels) and below 2^40 bytes.
inline bool weight_tma_possible(const VarlenMGemm& g, std::int64_t element_bytes) {
  const std::int64_t limit = std::int64_t{1} << 40;
  const std::int64_t line = (g.b_stride_k == 1 ? g.b_stride_n : g.b_stride_k) * element_bytes;
  const std::int64_t expert = g.b_expert_stride * element_bytes;
  return g.k > 0 && line > 0 && line < limit && expert > 0 && expert < limit;
}

// varlen_m_tma_stores_possible (kernel_choice.hpp) for g's C and, glu, its SwiGLU's A.
inline bool varlen_m_tma_stores_possible(const VarlenMGemm& g, bool glu, std::int64_t element_bytes) {
  return varlen_m_tma_stores_possible(g.c_index == nullptr, g.rows, g.n, VarlenMOutput{g.c, g.ldc}, glu,
                                      VarlenMOutput{g.glu_a, g.glu_lda}, element_bytes);
}

// Whether A's rows can come by TMA too: read in the grouped order (row i is row i, as the down
// projection's activations and dX's dH are), a 16-byte aligned base, rows that do not overlap
// (stride >= K) with a 16-byte aligned stride below 2^40 bytes, and 0 < K, rows < 2^31 (the
// TMA's 32-bit coordinates).
inline bool rows_tma_possible(const VarlenMGemm& g, std::int64_t element_bytes) {
  const std::int64_t limit = std::int64_t{1} << 40;
  const std::int64_t line = g.a.ld * element_bytes;
  return g.a.contiguous() && reinterpret_cast<std::uintptr_t>(g.a.ptr) % 16 == 0 && g.k > 0 && g.a.ld >= g.k &&
         line % 16 == 0 && line < limit && g.rows < (std::int64_t{1} << 31) && g.k < (std::int64_t{1} << 31);
}

// Scratch of run_varlen_m_gemm: the device-built tile list.
std::size_t varlen_m_gemm_workspace_size(int num_experts);
void run_varlen_m_gemm(DType dtype, const VarlenMGemm& g, void* workspace, cudaStream_t stream);
void run_varlen_k_gemm(DType dtype, const VarlenKGemm& g, cudaStream_t stream);

// ---- per-instantiation entry points (one translation unit each) ----
template <class T, bool kBKMajor>
void launch_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream);
template <class T>
void launch_varlen_k_gemm(const VarlenKGemm& g, cudaStream_t stream);
template <class T>
int varlen_m_tile_rows();
// The wgmma path (sm90_*.cu, built when the archs include 90a): 16-bit types, chunks_aligned
// operands, a device of compute capability 9.0; 128 x 256 tiles (the same 128-row tile list
// as the mma.sync kernels).
template <class T, bool kBKMajor>
void launch_sm90_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream);
template <class T>
void launch_sm90_varlen_k_gemm(const VarlenKGemm& g, cudaStream_t stream);
// Their persistent forms (sm90_persistent_*.cu): one block per SM (sm_count of them at most)
// walks the tiles, overlapping each tile's epilogue with the next one's first copies.
template <class T, bool kBKMajor>
void launch_sm90_persistent_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count,
                                          cudaStream_t stream);
// kContiguous names an operand whose rows are contiguous in the grouped order (no index,
// divisor 1: dW1's dH, dW2's g * A), so its copies skip the index and the division.
// kTmaStore: the block's tiles run as one pipeline of k tiles, and each finished tile leaves by
// TMA store (the caller checked varlen_k_store_tma_possible) while the block goes on.
template <class T, VarlenKContiguous kContiguous, bool kTmaStore>
void launch_sm90_persistent_varlen_k_gemm(const VarlenKGemm& g, int sm_count, cudaStream_t stream);
// Its warp-specialised form (sm90_ws_varlen_k_*.cu): a producer warpgroup gathers both operands'
// rows, walking the block's tiles ahead of the two consumer warpgroups, whose finished tiles
// leave by TMA store (the caller checked varlen_k_store_tma_possible).
// warp_stores: each consumer warp stores its own rows of the tile, with no barrier across warps
// (the default, step 38; false: thread 0 stores each round after consumer barriers).
template <class T, VarlenKContiguous kContiguous>
void launch_sm90_ws_varlen_k_gemm(const VarlenKGemm& g, int sm_count, bool warp_stores, cudaStream_t stream);
// Whether the driver can describe g's output as one (M, N, E) TMA tensor: 16-byte aligned base
// and strides (unit stride along n is the caller's layout), extents and strides in range.
inline bool varlen_k_store_tma_possible(const VarlenKGemm& g, std::int64_t element_bytes) {
  const std::int64_t limit = std::int64_t{1} << 40;
  const std::int64_t row = g.ldc * element_bytes;
  const std::int64_t expert = g.c_expert_stride * element_bytes;
  return reinterpret_cast<std::uintptr_t>(g.c) % 16 == 0 && row > 0 && row % 16 == 0 && row < limit &&
         expert > 0 && expert % 16 == 0 && expert < limit && g.m < (std::int64_t{1} << 31) &&
         g.n < (std::int64_t{1} << 31);
}
// varlen-M with the weight tiles loaded by TMA (sm90_tma_*.cu): also needs
// weight_tma_possible(g, element size).
template <class T, bool kBKMajor>
void launch_sm90_tma_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream);
// The same kernel with A's rows by TMA as well (sm90_tma_rows_*.cu): also needs
// rows_tma_possible(g, element size).
template <class T, bool kBKMajor>
void launch_sm90_tma_rows_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream);
// Its warp-specialised form (sm90_ws_tma_rows_*.cu): a producer warpgroup issues every copy.
template <class T, bool kBKMajor>
void launch_sm90_ws_tma_rows_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream);
// The warp-specialised kernel for gathered A rows (sm90_ws_gather_*.cu): the producer warpgroup
// gathers them by cp.async beside the weights' TMA.
template <class T, bool kBKMajor>
void launch_sm90_ws_gather_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream);
// The persistent form of both warp-specialised kernels (sm90_ws_persistent_*.cu; kRowsTma: A's
// rows by TMA, else gathered): sm_count blocks at most, each tile stored through staging of its
// own while the producer loads the next.
template <class T, bool kBKMajor, bool kRowsTma>
void launch_sm90_ws_persistent_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count,
                                             cudaStream_t stream);
// The gathering persistent kernel with the SwiGLU in its epilogue (sm90_ws_persistent_glu_*.cu):
// writes C and glu_a; also needs glu_epilogue_shape (so kBKMajor only).
template <class T, bool kBKMajor>
void launch_sm90_ws_persistent_glu_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count,
                                                 cudaStream_t stream);
// The gathering persistent kernel with the MLP backward's SwiGLU row pass in its epilogue
// (sm90_ws_persistent_glu_backward_*.cu; g.glu_backward): also needs glu_backward_epilogue_shape
// (so N-major weights only: dA' of nn.Linear-stored W2).
template <class T, bool kBKMajor>
void launch_sm90_ws_persistent_glu_backward_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count,
                                                          cudaStream_t stream);
// The TMA kernel's persistent form (sm90_persistent_tma_*.cu): sm_count blocks at most.
template <class T, bool kBKMajor>
void launch_sm90_persistent_tma_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count,
                                              cudaStream_t stream);

}  // namespace scattermoe::cuda
