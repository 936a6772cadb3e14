// The wgmma configurations of the grouped GEMMs (sm_90a), written with CuTe.
//
// Same kernels as the mma.sync path (grouped_gemm.cuh): cp.async gathers the operand rows into a
// multi-stage pipeline of shared-memory tiles laid out for GMMA (128-byte swizzle, K-major or
// MN-major), and one warpgroup per 64 tile rows issues wgmma straight from shared memory, so no
// operand passes through registers and a 64xNx16 instruction replaces 16 mma.sync per warp.
// The wgmma of k tile t is issued first and overlaps the copies of tile t + kStages - 2: a
// warpgroup waits for its wgmma of tile t-1 before the next barrier, so after that barrier the
// stage of tile t-2 is free in every warpgroup.
//
// Compiled for sm_90a only (sm90_*.cu); on other targets the mainloop is empty, and the host
// chooses this path only on a device of compute capability 9.0.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "cuda/grouped_gemm.cuh"

namespace scattermoe::cuda {

template <class T, int BM, int BN, int Stages>
struct Sm90GemmConfig {
  static_assert(sizeof(T) == 2, "the wgmma path takes 16-bit operands");
  static_assert(BM % 64 == 0 && Stages >= 3, "one warpgroup per 64 rows; at least three stages");
  using Element = T;
  static constexpr int kBM = BM;
  static constexpr int kBN = BN;
  static constexpr int kBK = 64;
  static constexpr int kStages = Stages;
  static constexpr int kThreads = BM / 64 * 128;
  static constexpr int kMinBlocks = 1;
  static constexpr int kVec = 8;

  static constexpr cute::GMMA::Major major(bool k_major) {
    return k_major ? cute::GMMA::Major::K : cute::GMMA::Major::MN;
  }

  // One warpgroup per 64 rows of the tile, each 64 x BN.
  template <bool kAKMajor, bool kBKMajor>
  using TiledMma = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<T, T, float, cute::Shape<cute::_64, cute::Int<BN>, cute::_16>,
                                 major(kAKMajor), major(kBKMajor)>(),
      cute::Layout<cute::Shape<cute::Int<BM / 64>, cute::_1, cute::_1>>{}));

  // The GMMA 128-byte-swizzle layouts, (MN, BK, STAGES).
  template <bool kKMajor, int kMN>
  static constexpr auto gmma_layout() {
    using namespace cute;
    using Atom = std::conditional_t<kKMajor, GMMA::Layout_K_SW128_Atom<T>, GMMA::Layout_MN_SW128_Atom<T>>;
    return tile_to_shape(Atom{}, make_shape(Int<kMN>{}, Int<kBK>{}, Int<kStages>{}));
  }

  // The same layouts as plain element offsets, for the copies (swizzled_tile_layout: the
  // shared-memory base is 1024-byte aligned).
  template <bool kKMajor, int kMN>
  static constexpr auto copy_layout() {
    return swizzled_tile_layout<kKMajor, kMN, kBK, kStages>();
  }

  template <bool kAKMajor, bool kBKMajor, class LoadA, class LoadB, class Accum>
  static __device__ __forceinline__ void mainloop(T* smem_a, T* smem_b, int k_tiles, LoadA&& load_a,
                                                  LoadB&& load_b, Accum& acc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace cute;
    Tensor sA = make_tensor(make_smem_ptr(smem_a), gmma_layout<kAKMajor, kBM>());  // (BM,BK,STAGES)
    Tensor sB = make_tensor(make_smem_ptr(smem_b), gmma_layout<kBKMajor, kBN>());  // (BN,BK,STAGES)
    TiledMma<kAKMajor, kBKMajor> mma;
    ThrMMA thr_mma = mma.get_slice(threadIdx.x);
    Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));  // descriptors (MMA,M,K,STAGES)
    Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));  // descriptors (MMA,N,K,STAGES)

    // Prologue: tiles 0 .. kStages-3 in flight, one commit group each (empty past the end).
    CUTE_UNROLL
    for (int t = 0; t < kStages - 2; ++t) {
      if (t < k_tiles) {
        load_a(t, t);
        load_b(t, t);
      }
      cp_async_fence();
    }
    int read_stage = 0;
    int write_stage = kStages - 2;
    CUTE_NO_UNROLL
    for (int t = 0; t < k_tiles; ++t) {
      // Tile t has landed (this thread's copies); make them visible to the async proxy that
      // wgmma reads through, then to every thread.
      cp_async_wait<kStages - 3>();
      cutlass::arch::fence_view_async_shared();
      __syncthreads();
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      gemm(mma, tCrA(_, _, _, read_stage), tCrB(_, _, _, read_stage), acc);
      warpgroup_commit_batch();
      // While the tensor cores work: every warpgroup has retired its wgmma of tile t-2, so that
      // stage takes tile t + kStages - 2 (the row lookups of a gather wait here, not the wgmma).
      const int next = t + kStages - 2;
      if (next < k_tiles) {
        load_a(write_stage, next);
        load_b(write_stage, next);
      }
      cp_async_fence();
      warpgroup_wait<1>();
      warpgroup_fence_operand(acc);
      read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
      write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
    cp_async_wait<0>();
#endif
  }
};

// ---- the entry points of the sm90_*.cu instantiation files (declared in gemm.hpp) ----
// 128 x 256 tiles, 4 stages, one block per SM: 128 x 128 ones (85 -> 64 flop per byte copied
// through L2), even two to an SM so that one's prologue and epilogue overlap the other's wgmma,
// measured slower on every model shape (docs/perf.md).
template <class T>
using Sm90Config = Sm90GemmConfig<T, 128, 256, 4>;

template <class T, bool kBKMajor>
void launch_sm90_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream) {
  launch_varlen_m_gemm_with<Sm90Config<T>, kBKMajor, true>(g, tile_prefix, stream);
}

template <class T>
void launch_sm90_varlen_k_gemm(const VarlenKGemm& g, cudaStream_t stream) {
  launch_varlen_k_gemm_with<Sm90Config<T>, true>(g, stream);
}

}  // namespace scattermoe::cuda
