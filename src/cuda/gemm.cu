// Host side of the grouped GEMMs: the device-built tile list and the choice of instantiation.
#include <cub/block/block_scan.cuh>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cuda/gemm.hpp"
#include "cuda/kernels.hpp"

namespace scattermoe::cuda {

namespace {

constexpr int kScanThreads = 256;

// tile_prefix[e] = sum over e' <= e of ceil(rows(e') / tile_rows); one block, any E.
__global__ void __launch_bounds__(kScanThreads)
    build_tile_prefix_kernel(const std::int64_t* __restrict__ expert_offsets, int num_experts,
                             int tile_rows, int* __restrict__ tile_prefix) {
  using BlockScan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  __shared__ int carry;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < num_experts; base += kScanThreads) {
    const int e = base + static_cast<int>(threadIdx.x);
    int tiles = 0;
    if (e < num_experts) {
      const std::int64_t rows = expert_offsets[e] - (e ? expert_offsets[e - 1] : 0);
      tiles = static_cast<int>((rows + tile_rows - 1) / tile_rows);
    }
    int inclusive = 0;
    int total = 0;
    BlockScan(temp).InclusiveSum(tiles, inclusive, total);
    if (e < num_experts) tile_prefix[e] = carry + inclusive;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
}

// Row tiles that walk the column tiles together: 8 keeps the A rows and B columns of the ~132
// resident blocks within L2 for the model shapes. SCATTERMOE_RASTER_GROUP_ROWS overrides it for
// measurements (a value >= the row-tile count gives plain column-by-column order).
int raster_group_rows() {
  static const int rows = [] {
    const char* env = std::getenv("SCATTERMOE_RASTER_GROUP_ROWS");
    const int value = env ? std::atoi(env) : 0;
    return value > 0 ? value : 8;
  }();
  return rows;
}

// An integer from the environment (for measurements), or `otherwise`.
int env_int(const char* name, int otherwise) {
  const char* env = std::getenv(name);
  return env && *env ? std::atoi(env) : otherwise;
}

// The wgmma kernels serve 16-bit GEMMs on the current device when the library is built for
// sm_90a, the device has compute capability 9.0 (sm_90a code runs there only), and
// SCATTERMOE_SM90=0 does not switch them off. Returns the device's SM count then, else 0.
int sm90_device_sms() {
#ifdef SCATTERMOE_HAS_SM90
  static const std::vector<int> sms = [] {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
    std::vector<int> result(static_cast<std::size_t>(count), 0);
    for (int d = 0; d < count; ++d) {
      int major = 0;
      int minor = 0;
      int processors = 0;
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d);
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d);
      cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, d);
      result[static_cast<std::size_t>(d)] = major == 9 && minor == 0 ? processors : 0;
    }
    return result;
  }();
  static const bool enabled = env_int("SCATTERMOE_SM90", 1) != 0;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "grouped GEMM: current device");
  if (!enabled || device < 0 || static_cast<std::size_t>(device) >= sms.size()) return 0;
  return sms[static_cast<std::size_t>(device)];
#else
  return 0;
#endif
}

// The measurement settings, read once.
const KernelSettings& settings() {
  static const KernelSettings s = [] {
    KernelSettings k;
    k.weight_tma = env_int("SCATTERMOE_SM90_TMA", 1) != 0;
    k.rows_tma = env_int("SCATTERMOE_SM90_ROWS_TMA", 1) != 0;
    k.rows_tma_ws = env_int("SCATTERMOE_SM90_WS", 1) != 0;
    k.gather_ws = env_int("SCATTERMOE_SM90_WS_GATHER", 1) != 0;
    k.ws_persistent = env_int("SCATTERMOE_SM90_WS_PERSISTENT", -1);
    k.persistent = env_int("SCATTERMOE_SM90_PERSISTENT", -1);
    k.persistent_tma = env_int("SCATTERMOE_SM90_PERSISTENT_TMA", 0) != 0;
    k.varlen_k_tma_store = env_int("SCATTERMOE_SM90_VARLEN_K_TMA_STORE", 1) != 0;
    k.varlen_k_ws = env_int("SCATTERMOE_SM90_WS_VARLEN_K", 1) != 0;
    k.varlen_k_warp_stores = env_int("SCATTERMOE_SM90_VARLEN_K_WARP_STORES", 1) != 0;
    k.glu_epilogue = env_int("SCATTERMOE_SM90_GLU_EPILOGUE", 1) != 0;
    k.varlen_m_warp_stores = env_int("SCATTERMOE_SM90_VARLEN_M_WARP_STORES", 1) != 0;
    k.glu_backward_epilogue = env_int("SCATTERMOE_SM90_GLU_BACKWARD_EPILOGUE", 1) != 0;
    k.varlen_m_tma_stores = env_int("SCATTERMOE_SM90_VARLEN_M_TMA_STORES", 1) != 0;
    k.varlen_m_tile_slots = env_int("SCATTERMOE_SM90_VARLEN_M_TILE_SLOTS", 1) != 0;
    k.glu_backward_loads = env_int("SCATTERMOE_SM90_GLU_BACKWARD_LOADS", 4) == 2 ? 2 : 4;
    return k;
  }();
  return s;
}

}  // namespace

bool grouped_aggregation() {
  static const bool grouped = env_int("SCATTERMOE_GROUPED_AGGREGATION", 1) != 0;
  return grouped;
}

std::size_t varlen_m_gemm_workspace_size(int num_experts) {
  return static_cast<std::size_t>(num_experts) * sizeof(int);
}

namespace {

// Whether the row pass `r` after dA' = g has the shape g's epilogue takes (GluBackwardEpilogue):
// SwiGLU over C's own columns (r reads dA' from C), glu_backward_epilogue_shape, and the scratch
// for d_gates when it is wanted; fuse_glu_backward_epilogue adds the kernel and the setting.
bool glu_backward_shape(const VarlenMGemm& g, const MlpBackwardRows& r, bool b_k_major) {
  auto aligned = [](const void* ptr, std::int64_t ld) {
    return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && ld % 8 == 0;
  };
  const bool rows_aligned = aligned(r.hidden, r.ld_hidden) && aligned(g.c, g.ldc) &&
                            (r.d_hidden == nullptr || aligned(r.d_hidden, r.ld_d_hidden));
  return r.glu && r.act == Activation::kSilu && r.d_a == g.c && r.ld_d_a == g.ldc && r.h == g.n &&
         r.rows == g.rows && (!r.has_d_gates || r.d_gates_partial != nullptr) &&
         glu_backward_epilogue_shape(g.n, g.c_index == nullptr, g.bias != nullptr, b_k_major, rows_aligned);
}

}  // namespace

void run_varlen_m_gemm(DType dtype, const VarlenMGemm& g, void* workspace, cudaStream_t stream) {
  if (g.rows == 0 || g.n == 0 || g.num_experts == 0) return;
  if (g.b_stride_k != 1 && g.b_stride_n != 1) {
    throw InvalidArgument("grouped GEMM: argument 'w' has strides (k " + std::to_string(g.b_stride_k) +
                          ", n " + std::to_string(g.b_stride_n) +
                          "); expected unit stride along d_in or d_out on CUDA");
  }
  if (g.a.ld < 0 || g.ldc < 0) {
    throw InvalidArgument("grouped GEMM: row strides must be non-negative on CUDA");
  }
  auto* tile_prefix = static_cast<int*>(workspace);
  VarlenMGemm tuned = g;
  tuned.raster_group_rows = raster_group_rows();
  tuned.warp_stores = settings().varlen_m_warp_stores;
  tuned.tma_stores = tuned.warp_stores && settings().varlen_m_tma_stores;
  tuned.tile_slots = settings().varlen_m_tile_slots;
  dispatch_float(dtype, [&](auto element) {
    using T = decltype(element);
    build_tile_prefix_kernel<<<1, kScanThreads, 0, stream>>>(g.expert_offsets, g.num_experts,
                                                            varlen_m_tile_rows<T>(), tile_prefix);
    check_launch("grouped GEMM tile list");
    // Unit stride along k: both operands K-major (the TN case). Otherwise B is N-major.
    const bool b_k_major = g.b_stride_k == 1;
    VarlenMFacts facts;
    facts.b_k_major = b_k_major;
    facts.rows_per_expert = g.rows / g.num_experts;
    int sms = 0;
    if constexpr (sizeof(T) == 2) {
      // The wgmma tiles have 128 rows, like the mma.sync ones: the same tile list serves.
      sms = sm90_device_sms();
      facts.wgmma = sms > 0 && chunks_aligned(g, 8);
      facts.weight_tma_possible = weight_tma_possible(g, sizeof(T));
      facts.rows_tma_possible = rows_tma_possible(g, sizeof(T));
    }
    const VarlenMKernel kernel = choose_varlen_m_kernel(facts, settings());
    // The up projection's SwiGLU: in the GEMM's epilogue where the kernel has it, else a pass
    // over C after the GEMM.
    const bool glu_fused = g.glu_a && fuse_glu_epilogue(kernel, glu_epilogue_shape(g.n, g.c_index == nullptr, b_k_major), settings());
    // The MLP backward's SwiGLU row pass after dA': in the GEMM's epilogue where the kernel has
    // it, else mlp_backward_rows after the GEMM.
    const MlpBackwardRows* row_pass = g.rows_after;
    const bool rows_fused =
        row_pass && fuse_glu_backward_epilogue(kernel, glu_backward_shape(g, *row_pass, b_k_major), settings());
    if (rows_fused) {
      GluBackwardEpilogue& e = tuned.glu_backward;
      e.hidden = row_pass->hidden;
      e.ld_hidden = row_pass->ld_hidden;
      e.d_hidden = row_pass->d_hidden;
      e.ld_d_hidden = row_pass->ld_d_hidden;
      e.gates = row_pass->gates;
      e.gate_index = row_pass->gate_index;
      e.d_gates_partial = row_pass->has_d_gates ? row_pass->d_gates_partial : nullptr;
      e.c_out = row_pass->scale_a_in_place;
      e.loads = settings().glu_backward_loads;
    }
    [&] {
#ifdef SCATTERMOE_HAS_SM90
      if constexpr (sizeof(T) == 2) {
        if (glu_fused) {  // K-major weights only (glu_epilogue_shape)
          launch_sm90_ws_persistent_glu_varlen_m_gemm<T, true>(tuned, tile_prefix, sms, stream);
          return;
        }
        if (rows_fused) {  // N-major weights only (glu_backward_epilogue_shape)
          launch_sm90_ws_persistent_glu_backward_varlen_m_gemm<T, false>(tuned, tile_prefix, sms, stream);
          return;
        }
        switch (kernel) {
          case VarlenMKernel::kSm90PersistentTma:
            b_k_major ? launch_sm90_persistent_tma_varlen_m_gemm<T, true>(tuned, tile_prefix, sms, stream)
                      : launch_sm90_persistent_tma_varlen_m_gemm<T, false>(tuned, tile_prefix, sms, stream);
            return;
          case VarlenMKernel::kSm90WsTmaRows:
            b_k_major ? launch_sm90_ws_tma_rows_varlen_m_gemm<T, true>(tuned, tile_prefix, stream)
                      : launch_sm90_ws_tma_rows_varlen_m_gemm<T, false>(tuned, tile_prefix, stream);
            return;
          case VarlenMKernel::kSm90WsGather:
            b_k_major ? launch_sm90_ws_gather_varlen_m_gemm<T, true>(tuned, tile_prefix, stream)
                      : launch_sm90_ws_gather_varlen_m_gemm<T, false>(tuned, tile_prefix, stream);
            return;
          case VarlenMKernel::kSm90WsPersistentTmaRows:
            b_k_major ? launch_sm90_ws_persistent_varlen_m_gemm<T, true, true>(tuned, tile_prefix, sms, stream)
                      : launch_sm90_ws_persistent_varlen_m_gemm<T, false, true>(tuned, tile_prefix, sms, stream);
            return;
          case VarlenMKernel::kSm90WsPersistentGather:
            b_k_major ? launch_sm90_ws_persistent_varlen_m_gemm<T, true, false>(tuned, tile_prefix, sms, stream)
                      : launch_sm90_ws_persistent_varlen_m_gemm<T, false, false>(tuned, tile_prefix, sms, stream);
            return;
          case VarlenMKernel::kSm90TmaRows:
            b_k_major ? launch_sm90_tma_rows_varlen_m_gemm<T, true>(tuned, tile_prefix, stream)
                      : launch_sm90_tma_rows_varlen_m_gemm<T, false>(tuned, tile_prefix, stream);
            return;
          case VarlenMKernel::kSm90Tma:
            b_k_major ? launch_sm90_tma_varlen_m_gemm<T, true>(tuned, tile_prefix, stream)
                      : launch_sm90_tma_varlen_m_gemm<T, false>(tuned, tile_prefix, stream);
            return;
          case VarlenMKernel::kSm90Persistent:
            b_k_major ? launch_sm90_persistent_varlen_m_gemm<T, true>(tuned, tile_prefix, sms, stream)
                      : launch_sm90_persistent_varlen_m_gemm<T, false>(tuned, tile_prefix, sms, stream);
            return;
          case VarlenMKernel::kSm90:
            b_k_major ? launch_sm90_varlen_m_gemm<T, true>(tuned, tile_prefix, stream)
                      : launch_sm90_varlen_m_gemm<T, false>(tuned, tile_prefix, stream);
            return;
          case VarlenMKernel::kSm80:
            break;
        }
      }
#endif
      (void)sms;
      if (b_k_major) {
        launch_varlen_m_gemm<T, true>(tuned, tile_prefix, stream);
      } else {
        launch_varlen_m_gemm<T, false>(tuned, tile_prefix, stream);
      }
    }();
    if (g.glu_a && !glu_fused) {
      activation_forward(dtype, Activation::kSilu, true, g.c, g.ldc, g.rows, g.n / 2, g.glu_a, g.glu_lda, stream);
    }
    if (row_pass && !rows_fused) mlp_backward_rows(dtype, *row_pass, stream);
    if (rows_fused && row_pass->has_d_gates) {
      sum_d_gates_partials(row_pass->d_gates_partial, g.rows, static_cast<int>(g.n / kGluBackwardTileColumns),
                           row_pass->d_gates, row_pass->gate_index, stream);
    }
  });
}

void run_varlen_k_gemm(DType dtype, const VarlenKGemm& g, cudaStream_t stream) {
  if (g.m == 0 || g.n == 0 || g.num_experts == 0) return;
  dispatch_float(dtype, [&](auto element) {
    using T = decltype(element);
    VarlenKFacts facts;
    facts.a_contiguous = g.a.contiguous();
    facts.b_contiguous = g.b.contiguous();
    int sms = 0;
    if constexpr (sizeof(T) == 2) {
      sms = sm90_device_sms();
      facts.wgmma = sms > 0 && chunks_aligned(g, 8);
      facts.store_tma_possible = varlen_k_store_tma_possible(g, sizeof(T));
    }
    const VarlenKChoice choice = choose_varlen_k_kernel(facts, settings());
#ifdef SCATTERMOE_HAS_SM90
    if constexpr (sizeof(T) == 2) {
      if (choice.kernel == VarlenKKernel::kSm90Persistent) {
        auto launch = [&](auto contiguous) {
          constexpr VarlenKContiguous kContiguous = decltype(contiguous)::value;
          if (choice.warp_specialised) {
            launch_sm90_ws_varlen_k_gemm<T, kContiguous>(g, sms, choice.warp_stores, stream);
          } else if (choice.tma_store) {
            launch_sm90_persistent_varlen_k_gemm<T, kContiguous, true>(g, sms, stream);
          } else {
            launch_sm90_persistent_varlen_k_gemm<T, kContiguous, false>(g, sms, stream);
          }
        };
        switch (choice.contiguous) {
          case VarlenKContiguous::kB:
            launch(std::integral_constant<VarlenKContiguous, VarlenKContiguous::kB>{});
            return;
          case VarlenKContiguous::kA:
            launch(std::integral_constant<VarlenKContiguous, VarlenKContiguous::kA>{});
            return;
          case VarlenKContiguous::kNeither:
            launch(std::integral_constant<VarlenKContiguous, VarlenKContiguous::kNeither>{});
            return;
        }
      }
      if (choice.kernel == VarlenKKernel::kSm90) {
        launch_sm90_varlen_k_gemm<T>(g, stream);
        return;
      }
    }
#endif
    launch_varlen_k_gemm<T>(g, stream);
  });
}

}  // namespace scattermoe::cuda
