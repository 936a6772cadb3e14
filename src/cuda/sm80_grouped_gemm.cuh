// The mma.sync configurations of the grouped GEMMs (sm_80 and later), written with CuTe: the
// pipelined stages are read shared -> registers with ldmatrix (tensor-op types) or plain loads
// (fp32, on FMA units for full fp32 accuracy) and accumulated in fp32. The kernels themselves
// are in grouped_gemm.cuh. Included only by the sm80_*.cu instantiation files.
#pragma once

#include <cute/tensor.hpp>

#include "cuda/grouped_gemm.cuh"

// Pipeline depth of the tensor-op configurations; a build-time override for measurements.
#ifndef SCATTERMOE_SM80_STAGES
#define SCATTERMOE_SM80_STAGES 3
#endif

namespace scattermoe::cuda {

// The pipelined mainloop (after the CuTe sm80 tutorial): k_tiles tiles of kBK along K, each
// loaded by load_a(stage, k_tile) / load_b(stage, k_tile), accumulated into acc.
template <class Config, bool kAKMajor, bool kBKMajor, class TensorA, class TensorB, class LoadA,
          class LoadB, class Accum>
__device__ __forceinline__ void gemm_mainloop(TensorA& sA, TensorB& sB, int k_tiles, LoadA&& load_a,
                                              LoadB&& load_b, Accum& acc) {
  using namespace cute;
  constexpr int kStages = Config::kStages;
  typename Config::template TiledMma<kAKMajor, kBKMajor> mma;
  ThrMMA thr_mma = mma.get_slice(threadIdx.x);
  Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA,MMA_M,MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));  // (MMA,MMA_N,MMA_K)

  auto s2r_copy_a = make_tiled_copy_A(typename Config::template S2RAtom<kAKMajor>{}, mma);
  ThrCopy s2r_thr_a = s2r_copy_a.get_slice(threadIdx.x);
  Tensor tXsA = s2r_thr_a.partition_S(sA);  // (CPY,MMA_M,MMA_K,STAGES)
  Tensor tXrA = s2r_thr_a.retile_D(tCrA);   // (CPY,MMA_M,MMA_K)
  auto s2r_copy_b = make_tiled_copy_B(typename Config::template S2RAtom<kBKMajor>{}, mma);
  ThrCopy s2r_thr_b = s2r_copy_b.get_slice(threadIdx.x);
  Tensor tXsB = s2r_thr_b.partition_S(sB);  // (CPY,MMA_N,MMA_K,STAGES)
  Tensor tXrB = s2r_thr_b.retile_D(tCrB);   // (CPY,MMA_N,MMA_K)

  int k_tile_count = k_tiles;
  int k_tile_next = 0;
  CUTE_UNROLL
  for (int stage = 0; stage < kStages - 1; ++stage) {
    load_a(stage, k_tile_next);
    load_b(stage, k_tile_next);
    cp_async_fence();
    --k_tile_count;
    if (k_tile_count > 0) ++k_tile_next;
  }

  int smem_pipe_read = 0;
  int smem_pipe_write = kStages - 1;
  Tensor tXsA_p = tXsA(_, _, _, smem_pipe_read);
  Tensor tXsB_p = tXsB(_, _, _, smem_pipe_read);
  constexpr int kBlocks = decltype(size<2>(tCrA))::value;

  if (kBlocks > 1) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    copy(s2r_copy_a, tXsA_p(_, _, Int<0>{}), tXrA(_, _, Int<0>{}));
    copy(s2r_copy_b, tXsB_p(_, _, Int<0>{}), tXrB(_, _, Int<0>{}));
  }

  CUTE_NO_UNROLL
  while (k_tile_count > -(kStages - 1)) {
    CUTE_UNROLL
    for (int k_block = 0; k_block < kBlocks; ++k_block) {
      if (k_block == kBlocks - 1) {
        tXsA_p = tXsA(_, _, _, smem_pipe_read);
        tXsB_p = tXsB(_, _, _, smem_pipe_read);
        cp_async_wait<kStages - 2>();
        __syncthreads();
      }
      const int k_block_next = (k_block + 1) % kBlocks;
      copy(s2r_copy_a, tXsA_p(_, _, k_block_next), tXrA(_, _, k_block_next));
      copy(s2r_copy_b, tXsB_p(_, _, k_block_next), tXrB(_, _, k_block_next));
      if (k_block == 0) {
        load_a(smem_pipe_write, k_tile_next);
        load_b(smem_pipe_write, k_tile_next);
        cp_async_fence();
        --k_tile_count;
        if (k_tile_count > 0) ++k_tile_next;
        smem_pipe_write = smem_pipe_read;
        smem_pipe_read = (smem_pipe_read == kStages - 1) ? 0 : smem_pipe_read + 1;
      }
      gemm(mma, tCrA(_, _, k_block), tCrB(_, _, k_block), acc);
    }
  }
  cp_async_wait<0>();
}


// The mainloop of a configuration Derived, over its copy layouts.
template <class Derived>
struct Sm80Mainloop {
  template <bool kAKMajor, bool kBKMajor, class T, class LoadA, class LoadB, class Accum>
  static __device__ __forceinline__ void mainloop(T* smem_a, T* smem_b, int k_tiles, LoadA&& load_a,
                                                  LoadB&& load_b, Accum& acc) {
    using namespace cute;
    Tensor sA = make_tensor(make_smem_ptr(smem_a), Derived::template copy_layout<kAKMajor, Derived::kBM>());
    Tensor sB = make_tensor(make_smem_ptr(smem_b), Derived::template copy_layout<kBKMajor, Derived::kBN>());
    gemm_mainloop<Derived, kAKMajor, kBKMajor>(sA, sB, k_tiles, load_a, load_b, acc);
  }
};

// ---------------------------------------------------------------------------------------------
// Tile configurations: one per element type.
template <class T>
struct Sm80GemmConfig;

template <class T16, class MmaAtom>
struct Sm80TensorOpConfig : Sm80Mainloop<Sm80TensorOpConfig<T16, MmaAtom>> {
  using Element = T16;
  static constexpr int kBM = 128;
  static constexpr int kBN = 128;
  static constexpr int kBK = 64;
  static constexpr int kStages = SCATTERMOE_SM80_STAGES;
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocks = 1;
  static constexpr int kVec = 8;  // elements per 16-byte chunk
  // 2x4 warps, each 64x32 of the 128x128 tile (64 fp32 accumulators per thread). Measured
  // against 128x256x32 with 64x64 warp tiles (which spills at 255 registers): docs/perf.md.
  template <bool, bool>
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaAtom>, cute::Layout<cute::Shape<cute::_2, cute::_4, cute::_1>>,
                                  cute::Tile<cute::_32, cute::_64, cute::_16>>;

  template <bool kKMajor>
  using S2RAtom = std::conditional_t<kKMajor, cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, T16>,
                                     cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, T16>>;

  // (MN, BK, STAGES), swizzled so that ldmatrix reads are free of bank conflicts.
  template <bool kKMajor, int kMN>
  static constexpr auto copy_layout() {
    return swizzled_tile_layout<kKMajor, kMN, kBK, kStages>();
  }
};

template <>
struct Sm80GemmConfig<cute::half_t>
    : Sm80TensorOpConfig<cute::half_t, cute::SM80_16x8x16_F32F16F16F32_TN> {};
template <>
struct Sm80GemmConfig<cute::bfloat16_t>
    : Sm80TensorOpConfig<cute::bfloat16_t, cute::SM80_16x8x16_F32BF16BF16F32_TN> {};

template <>
struct Sm80GemmConfig<float> : Sm80Mainloop<Sm80GemmConfig<float>> {
  using Element = float;
  static constexpr int kBM = 64;
  static constexpr int kBN = 64;
  static constexpr int kBK = 16;
  static constexpr int kStages = 3;
  static constexpr int kThreads = 256;
  static constexpr int kMinBlocks = 1;
  static constexpr int kVec = 4;
  template <bool, bool>
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<cute::UniversalFMA<float, float, float, float>>,
                                  cute::Layout<cute::Shape<cute::_16, cute::_16, cute::_1>>>;
  template <bool kKMajor>
  using S2RAtom = cute::Copy_Atom<cute::UniversalCopy<float>, float>;

  // Padded by one 16-byte chunk per line against bank conflicts.
  template <bool kKMajor, int kMN>
  static constexpr auto copy_layout() {
    using namespace cute;
    if constexpr (kKMajor) {
      return make_layout(make_shape(Int<kMN>{}, Int<kBK>{}, Int<kStages>{}),
                         make_stride(Int<kBK + 4>{}, _1{}, Int<kMN * (kBK + 4)>{}));
    } else {
      return make_layout(make_shape(Int<kMN>{}, Int<kBK>{}, Int<kStages>{}),
                         make_stride(_1{}, Int<kMN + 4>{}, Int<(kMN + 4) * kBK>{}));
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The entry points of the sm80_*.cu instantiation files.
template <class T, bool kBKMajor>
void launch_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream) {
  launch_varlen_m_gemm_with<Sm80GemmConfig<T>, kBKMajor>(g, tile_prefix, stream);
}

template <class T>
int varlen_m_tile_rows() {
  return Sm80GemmConfig<T>::kBM;
}

template <class T>
void launch_varlen_k_gemm(const VarlenKGemm& g, cudaStream_t stream) {
  launch_varlen_k_gemm_with<Sm80GemmConfig<T>>(g, stream);
}

}  // namespace scattermoe::cuda
