// The one place that decides which grouped-GEMM kernel runs a GEMM, one function per kind
// (varlen-M, varlen-K), from what the GEMM is, what the device offers and the measurement
// settings. Every default is the one measured fastest on the H200 (docs/perf.md, the step named
// beside it). Plain C++, so the host tests check the choices.
#pragma once

#include <cstdint>

namespace scattermoe::cuda {

// Which operand of a varlen-K GEMM reads its rows in the grouped order (no index, divisor 1).
enum class VarlenKContiguous { kNeither, kA, kB };

// Settings for measurements (the dispatcher reads them from the environment once per process).
struct KernelSettings {
  bool weight_tma = true;          // SCATTERMOE_SM90_TMA: varlen-M weight tiles by TMA
  bool rows_tma = true;            // SCATTERMOE_SM90_ROWS_TMA: varlen-M grouped A rows by TMA too
  bool rows_tma_ws = true;         // SCATTERMOE_SM90_WS: those GEMMs warp-specialised
  bool gather_ws = true;           // SCATTERMOE_SM90_WS_GATHER: gathered-A GEMMs warp-specialised
  int ws_persistent = -1;          // SCATTERMOE_SM90_WS_PERSISTENT: those two kernels persistent
                                   // (1 always, 0 never, -1 by kPersistentRowsPerExpert)
  int persistent = -1;             // SCATTERMOE_SM90_PERSISTENT: 1 every cp.async GEMM, 0 none
  bool persistent_tma = false;     // SCATTERMOE_SM90_PERSISTENT_TMA: the TMA varlen-M kernel persistent
  bool varlen_k_tma_store = true;  // SCATTERMOE_SM90_VARLEN_K_TMA_STORE: varlen-K tiles pipelined, TMA-stored
  bool varlen_k_ws = true;         // SCATTERMOE_SM90_WS_VARLEN_K: varlen-K warp-specialised
  bool varlen_k_warp_stores = true;  // SCATTERMOE_SM90_VARLEN_K_WARP_STORES: its stores per warp
  bool glu_epilogue = true;        // SCATTERMOE_SM90_GLU_EPILOGUE: the SwiGLU in the up projection's epilogue
  bool varlen_m_warp_stores = true;  // SCATTERMOE_SM90_VARLEN_M_WARP_STORES: VarlenMGemm::warp_stores
  bool glu_backward_epilogue = true;  // SCATTERMOE_SM90_GLU_BACKWARD_EPILOGUE: the dA' GEMM runs the row pass
  bool varlen_m_tma_stores = true;   // SCATTERMOE_SM90_VARLEN_M_TMA_STORES: VarlenMGemm::tma_stores (step 46)
  bool varlen_m_tile_slots = true;   // SCATTERMOE_SM90_VARLEN_M_TILE_SLOTS: VarlenMGemm::tile_slots (step 47)
  int glu_backward_loads = 4;        // SCATTERMOE_SM90_GLU_BACKWARD_LOADS: GluBackwardEpilogue::loads (step 50)
};

// Whether the persistent varlen-M kernel's outputs can leave by TMA (VarlenMGemm::tma_stores): C
// written in the grouped order (a box is consecutive rows), with 16-byte aligned rows and row
// counts and strides a tensor map describes (rows no shorter than the columns); with glu, the
// SwiGLU's A (n / 2 columns) as well.
struct VarlenMOutput {
  const void* ptr = nullptr;
  std::int64_t ld = 0;  // row stride in elements
};
inline bool varlen_m_tma_stores_possible(bool grouped, std::int64_t rows, std::int64_t n, VarlenMOutput c, bool glu,
                                         VarlenMOutput a, std::int64_t element_bytes) {
  auto describable = [&](VarlenMOutput o, std::int64_t columns) {
    return o.ptr != nullptr && reinterpret_cast<std::uintptr_t>(o.ptr) % 16 == 0 && o.ld >= columns && o.ld > 0 &&
           (o.ld * element_bytes) % 16 == 0 && o.ld * element_bytes < (std::int64_t{1} << 40);
  };
  return grouped && rows < (std::int64_t{1} << 31) && n < (std::int64_t{1} << 31) && describable(c, n) &&
         (!glu || describable(a, n / 2));
}

// What the dispatcher knows about a GEMM and the device. The wgmma kernels take 16-bit operands
// whose 16-byte chunks are all aligned, on a device of compute capability 9.0 with the library
// built for sm_90a (and SCATTERMOE_SM90 not 0): `wgmma`.
struct VarlenMFacts {
  bool wgmma = false;
  bool b_k_major = false;            // the weight has unit stride along k
  bool weight_tma_possible = false;  // the weights describable as one TMA tensor
  bool rows_tma_possible = false;    // A read in the grouped order, describable as one TMA tensor
  std::int64_t rows_per_expert = 0;  // routed rows over experts (the host knows no more)
};

// The warp-specialised varlen-M kernels run persistent from this many routed rows per expert
// on average (4 row tiles). Measured per kernel (step 36): persistent is 4-13% faster on
// qwen3-30b-a3b (1024 rows per expert) and olmoe-1b-7b (2048), level on mixtral-8x7b (2048, whose
// tiles have 100-450 k tiles), and 2-30% slower on deepseek-v3 (256: two row tiles share each
// expert's weight tiles, which outgrow L2 and are read again once the persistent blocks drift
// apart).
constexpr std::int64_t kPersistentRowsPerExpert = 512;

enum class VarlenMKernel {
  kSm80,               // mma.sync, any type and alignment
  kSm90,               // wgmma, both operands by cp.async
  kSm90Persistent,     // the same, one block per SM walking the tiles
  kSm90Tma,            // wgmma, weight tiles by TMA (the default for gathered A, steps 16-17)
  kSm90TmaRows,        // the same with A's grouped rows by TMA too (step 30)
  kSm90WsTmaRows,      // that, warp-specialised: a producer warpgroup issues the copies (step 31)
  kSm90WsGather,       // gathered A, warp-specialised: the producer gathers A, TMA for B
  kSm90WsPersistentTmaRows,  // kSm90WsTmaRows, persistent (kPersistentRowsPerExpert; step 36)
  kSm90WsPersistentGather,   // kSm90WsGather, persistent (the same)
  kSm90PersistentTma,  // the same, persistent (within 2% per kernel, step 23: opt-in)
};

inline VarlenMKernel choose_varlen_m_kernel(const VarlenMFacts& f, const KernelSettings& s) {
  if (!f.wgmma) return VarlenMKernel::kSm80;
  const bool ws_persistent =
      s.ws_persistent == 1 || (s.ws_persistent < 0 && f.rows_per_expert >= kPersistentRowsPerExpert);
  if (s.weight_tma && f.weight_tma_possible) {
    if (s.persistent_tma) return VarlenMKernel::kSm90PersistentTma;
    if (!s.rows_tma || !f.rows_tma_possible) {
      if (!s.gather_ws) return VarlenMKernel::kSm90Tma;
      return ws_persistent ? VarlenMKernel::kSm90WsPersistentGather : VarlenMKernel::kSm90WsGather;
    }
    if (!s.rows_tma_ws) return VarlenMKernel::kSm90TmaRows;
    return ws_persistent ? VarlenMKernel::kSm90WsPersistentTmaRows : VarlenMKernel::kSm90WsTmaRows;
  }
  // Without TMA, the persistent walk helps the N-major weights (dA', dX: 7-8% on mixtral) and
  // costs the K-major up|gate GEMM 6% (step 15).
  const bool persistent = s.persistent == 1 || (s.persistent < 0 && !f.b_k_major);
  return persistent ? VarlenMKernel::kSm90Persistent : VarlenMKernel::kSm90;
}

// Whether an up projection's output C = [first | gate] (n = 2h columns) lets the epilogue
// compute A: h a multiple of 128 (a 256-column tile pairs 128 columns of each half), C written
// in the grouped order, and K-major weights (nn.Linear's (E, 2h, d) storage; the kernel is
// instantiated for those only).
inline bool glu_epilogue_shape(std::int64_t n, bool grouped_c, bool b_k_major) {
  return n % 256 == 0 && grouped_c && b_k_major;
}

// Whether an up projection's SwiGLU runs in its GEMM's epilogue instead of a pass after it: only
// the persistent gathering kernel has that epilogue; `shape_ok`: glu_epilogue_shape.
inline bool fuse_glu_epilogue(VarlenMKernel kernel, bool shape_ok, const KernelSettings& s) {
  return s.glu_epilogue && shape_ok && kernel == VarlenMKernel::kSm90WsPersistentGather;
}

// The dA' GEMM with the MLP backward's SwiGLU row pass in its epilogue (GluBackwardEpilogue): C
// (n = h columns) in whole 256-column tiles, no bias, written in the grouped order, N-major
// weights (dA' reads nn.Linear's (E, d, h) W2 along h; the kernel is instantiated for those
// only), and every row of H, dH and C 16-byte aligned (`aligned`).
constexpr int kGluBackwardTileColumns = 256;
inline bool glu_backward_epilogue_shape(std::int64_t n, bool grouped_c, bool has_bias, bool b_k_major, bool aligned) {
  return n % kGluBackwardTileColumns == 0 && grouped_c && !has_bias && !b_k_major && aligned;
}

// Whether that row pass runs in the GEMM's epilogue instead of after it: only the persistent
// gathering kernel has that epilogue; `shape_ok`: glu_backward_epilogue_shape.
inline bool fuse_glu_backward_epilogue(VarlenMKernel kernel, bool shape_ok, const KernelSettings& s) {
  return s.glu_backward_epilogue && shape_ok && kernel == VarlenMKernel::kSm90WsPersistentGather;
}

struct VarlenKFacts {
  bool wgmma = false;
  bool a_contiguous = false;        // A's rows in grouped order
  bool b_contiguous = false;
  bool store_tma_possible = false;  // the output describable as one (M, N, E) TMA tensor
};

enum class VarlenKKernel {
  kSm80,            // mma.sync, any type and alignment
  kSm90,            // wgmma, one block per tile (SCATTERMOE_SM90_PERSISTENT=0)
  kSm90Persistent,  // wgmma, one block per SM walking the tiles (the default)
};

struct VarlenKChoice {
  VarlenKKernel kernel = VarlenKKernel::kSm80;
  // For kSm90Persistent: the operand whose copies skip the index (B when both are contiguous,
  // the wider tile; step 25) and whether tiles leave by TMA store (steps 26-27: the one k-tile
  // pipeline across tiles), and whether a producer warpgroup gathers the operands (step 34; it
  // stores by TMA).
  VarlenKContiguous contiguous = VarlenKContiguous::kNeither;
  bool tma_store = false;
  bool warp_specialised = false;
  bool warp_stores = false;  // warp_specialised: each warp stores its own rows (step 38)
};

inline VarlenKChoice choose_varlen_k_kernel(const VarlenKFacts& f, const KernelSettings& s) {
  VarlenKChoice c;
  if (!f.wgmma) return c;
  if (s.persistent == 0) {
    c.kernel = VarlenKKernel::kSm90;
    return c;
  }
  c.kernel = VarlenKKernel::kSm90Persistent;
  c.contiguous = f.b_contiguous   ? VarlenKContiguous::kB
                 : f.a_contiguous ? VarlenKContiguous::kA
                                  : VarlenKContiguous::kNeither;
  c.tma_store = s.varlen_k_tma_store && f.store_tma_possible;
  c.warp_specialised = c.tma_store && s.varlen_k_ws;
  c.warp_stores = c.warp_specialised && s.varlen_k_warp_stores;
  return c;
}

}  // namespace scattermoe::cuda
