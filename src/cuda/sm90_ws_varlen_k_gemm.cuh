// The warp-specialised persistent varlen-K GEMM (sm_90a), written with CuTe: the weight
// gradients.
//
// The persistent varlen-K kernel of sm90_grouped_gemm.cuh gathers both operands' token rows by
// cp.async from the same warps that issue the wgmma, with a block barrier per k tile, and its
// epilogue stops the tensor cores; deepseek's experts give tiles of 4 k tiles, so each tile's
// copies, barriers and epilogue weigh as much as its products (ncu: issue slots 26%, stalls on
// fixed-latency waits 28%, dispatch 15%, barriers 14%; the copies 35% of the instructions).
// Here a producer warpgroup gathers the rows of every stage (the same lean copies, VarlenKCopies,
// spread over its 128 threads) and arrives on the stage's full barrier when its copies land
// (cp.async.mbarrier.arrive.noinc; the barrier expects 1 + 128 arrivals), walking the block's
// tiles ahead of the consumers across tile boundaries, so the next tile's operands arrive while
// a finished tile is stored. The two consumer warpgroups only wait, multiply and store: the
// finished tile goes through staging buffers of its own (the stages are being refilled) in
// rounds of 64-column boxes, each round leaving by TMA store (Sm90WsVarlenK).
//
// Compiled for sm_90a only (sm90_ws_varlen_k_*.cu); elsewhere the kernel is empty and never
// launched.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/sm90_tma_grouped_gemm.cuh"

namespace scattermoe::cuda {

// The producer warpgroup's view of Config for VarlenKCopies: 128 copying threads, the first of
// them thread kFirst of the block.
template <class Config, int kFirst>
struct ProducerCopyConfig : Config {
  static constexpr int kThreads = 128;
  static constexpr int kFirstCopyThread = kFirst;
};

// The staging of a finished tile: kBuffers buffers of kRoundBoxes 128 x 64 boxes; the tile
// leaves in kRounds rounds, round r through buffer r % kBuffers, so a round waits only for the
// store of the round kBuffers before it (issued by then a round or more ago) to have read its
// buffer. Config::kStages stages of 48 KiB and the staging fill at most 227 KiB. Measured (step
// 34): 4 stages + 2 x 16 KiB, 4 rounds of one box, double-buffered (Sm90WsVarlenKShape) against
// 4 stages + 32 KiB in 2 rounds (each round waiting for the last one's store: 2-3% slower) and
// 3 stages + 64 KiB in one round (dW1 1-4% faster, dW2 up to 5% slower: mixed).
// kPerWarp: each consumer warp stores its own 16 rows of a round (a 16 x 64 box) from its own
// two buffers, with no barrier across warps (lane 0 waits for and issues its warp's stores).
template <class Config, int kBuffers_, int kRoundBoxes_, bool kPerWarp_ = false>
struct Sm90WsVarlenK {
  static constexpr int kBuffers = kBuffers_;
  static constexpr int kRoundBoxes = kRoundBoxes_;
  static constexpr bool kPerWarp = kPerWarp_;
  static constexpr int kWarpRows = 16;  // a consumer warp's rows of the wgmma accumulator
  static_assert(!kPerWarp || kRoundBoxes == 1, "a warp stores one box per round");
  static constexpr int kBoxElements = Config::kBM * 64;
  static constexpr int kRounds = Config::kBN / 64 / kRoundBoxes;
  static_assert(Config::kBN % (64 * kRoundBoxes) == 0 && kRounds % kBuffers == 0,
                "whole rounds of boxes, the same buffer for a round in every tile");
  // The producer holds 8 lines' index entries and B sources: 88 registers, the consumers 208.
  using Ws = Sm90WsShape<Config, 88>;
  using Pipeline = typename Ws::Pipeline;
  static constexpr int kStageElements = cute::cosize(Config::template copy_layout<false, Config::kBM>()) +
                                        cute::cosize(Config::template copy_layout<false, Config::kBN>());
  static constexpr int kStagingElements = kBuffers * kRoundBoxes * kBoxElements;

  static constexpr int smem_bytes() {
    return (kStageElements + kStagingElements) * static_cast<int>(sizeof(typename Config::Element)) +
           static_cast<int>(sizeof(typename Pipeline::SharedStorage));
  }
  static_assert(smem_bytes() <= 227 * 1024, "the stages and the staging fit in shared memory");
};

template <class T>
using Sm90WsVarlenKConfig = Sm90GemmConfig<T, 128, 256, 4>;
template <class T>
using Sm90WsVarlenKShape = Sm90WsVarlenK<Sm90WsVarlenKConfig<T>, 2, 1>;
template <class T>
using Sm90WsVarlenKWarpShape = Sm90WsVarlenK<Sm90WsVarlenKConfig<T>, 2, 1, true>;

template <class Config, class Geometry, VarlenKContiguous kContiguous, class StoreTma>
__global__ void __launch_bounds__(Geometry::Ws::kThreads, 1)
    sm90_ws_varlen_k_gemm_kernel(VarlenKGemm p, VarlenKTiling tiling, CUTE_GRID_CONSTANT StoreTma const store_tma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using T = typename Config::Element;
  using Ws = typename Geometry::Ws;
  using Pipeline = typename Geometry::Pipeline;
  using PipelineState = typename Pipeline::PipelineState;
  using Barrier = ConsumerBarrier<Ws::kConsumers>;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;
  constexpr int kRoundBoxes = Geometry::kRoundBoxes;
  constexpr int kBuffers = Geometry::kBuffers;
  constexpr int kBoxElements = Geometry::kBoxElements;

  const int tiles = p.num_experts * tiling.m_tiles * tiling.n_tiles;
  if (static_cast<int>(blockIdx.x) >= tiles) return;
  auto tile_at = [&](int tile_number) { return varlen_k_tile<kBM, kBN>(tiling, tile_number); };

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(Config::template copy_layout<false, kBM>());
  T* staging = smem_a + Geometry::kStageElements;  // 1024-byte aligned: the stages are 48 KiB each
  auto* storage = reinterpret_cast<typename Pipeline::SharedStorage*>(staging + Geometry::kStagingElements);

  const bool producer = static_cast<int>(threadIdx.x) >= Ws::kConsumers;
  // No TMA loads: the copies' arrivals (the leader's and every producer thread's) complete a stage.
  Pipeline pipeline(*storage, Ws::pipeline_params(0, 1 + Ws::kProducerThreads), cute::Shape<_1, _1, _1>{});
  __syncthreads();  // the barriers initialised, for every thread

  if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Ws::kProducerRegisters>();
    using Copies = VarlenKCopies<ProducerCopyConfig<Config, Ws::kConsumers>, true, kContiguous>;
    Copies copies(p);
    PipelineState write = cutlass::make_producer_start_state<Pipeline>();
    for (int tile_number = static_cast<int>(blockIdx.x); tile_number < tiles;
         tile_number += static_cast<int>(gridDim.x)) {
      const VarlenKTile t = tile_at(tile_number);
      copies.locate(p, t.e, t.m0, t.n0);
      const int k_tiles = copies.k_tiles();
      for (int k = 0; k < k_tiles; ++k) {
        pipeline.producer_acquire(write);  // the leader's arrival (no bytes expected)
        copies.load_a(p, smem_a, write.index(), k);
        copies.load_b(p, smem_b, write.index());
        cutlass::arch::cpasync_barrier_arrive_noinc(pipeline.producer_get_barrier(write));
        ++write;
      }
    }
    // Leave once the copies have landed (their barrier arrivals complete the consumers' stages).
    cute::cp_async_wait<0>();
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Ws::kConsumerRegisters>();
  Tensor s_a = make_tensor(make_smem_ptr(smem_a), Config::template gmma_layout<false, kBM>());  // (BM,BK,STAGES)
  Tensor s_b = make_tensor(make_smem_ptr(smem_b), Config::template gmma_layout<false, kBN>());  // (BN,BK,STAGES)
  typename Config::template TiledMma<false, false> mma;
  ThrMMA thr_mma = mma.get_slice(threadIdx.x);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(s_a));  // descriptors (MMA,M,K,STAGES)
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(s_b));  // descriptors (MMA,N,K,STAGES)
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kBM>{}, Int<kBN>{}));
  Tensor coord = thr_mma.partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
  // A round's accumulator values: a wgmma accumulator orders a thread's values (2 columns, 2 row
  // halves, kBN / 8 column groups of 8), so values [r * V / kRounds, (r + 1) * V / kRounds) are
  // the columns [r * kBN / kRounds, (r + 1) * kBN / kRounds) of round r.
  constexpr int kValues = decltype(size(acc))::value;
  constexpr int kRoundValues = kValues / Geometry::kRounds;
  static_assert(decltype(size<1>(acc))::value == 1 && decltype(size<2>(acc))::value == 1,
                "one wgmma accumulator per thread: its value order gives the rounds' columns");

  constexpr int kBoxRows = Geometry::kPerWarp ? Geometry::kWarpRows : kBM;
  auto box_layout = varlen_k_store_box_layout<Config, kBoxRows>();
  Tensor m_c = store_tma.get_tma_tensor(make_shape(static_cast<int>(p.m), static_cast<int>(p.n), p.num_experts));
  auto cta_tma = store_tma.get_slice(Int<0>{});

  PipelineState read;
  PipelineState release;
  for (int tile_number = static_cast<int>(blockIdx.x); tile_number < tiles;
       tile_number += static_cast<int>(gridDim.x)) {
    const VarlenKTile t = tile_at(tile_number);
    // The producer's count, computed the same way (routed-row positions fit 32 bits).
    const int k_tiles = VarlenKCopies<Config, true, kContiguous>::k_tiles_between(
        static_cast<std::uint32_t>(t.e ? p.expert_offsets[t.e - 1] : 0),
        static_cast<std::uint32_t>(p.expert_offsets[t.e]));
    clear(acc);
    ws_consumer_k_loop<true>(pipeline, read, release, k_tiles, mma, tCrA, tCrB, acc);
    if (k_tiles > 0) {
      pipeline.consumer_release(release);
      ++release;
    }

    Tensor c_tile = m_c(_, _, t.e);
    if constexpr (Geometry::kPerWarp) {
      // Each warp its 16 rows per round, through its own two 16 x 64 buffers: lane 0 waits until
      // its store of two rounds back has read the round's buffer, the lanes write and fence,
      // and lane 0 stores the box (skipped past n, or past m for the whole box).
      const int warp = static_cast<int>(threadIdx.x) / 32;
      const int lane = static_cast<int>(threadIdx.x) % 32;
      const int warp_row0 = warp * Geometry::kWarpRows;
      static_assert(Ws::kConsumers / 32 * kBuffers * Geometry::kWarpRows * 64 <= Geometry::kStagingElements,
                    "every consumer warp has its buffers");
      for_each(make_int_sequence<Geometry::kRounds>{}, [&](auto round_constant) {
        constexpr int kRound = decltype(round_constant)::value;
        constexpr int kWarpBox = Geometry::kWarpRows * 64;
        T* buffer = staging + (warp * kBuffers + kRound % kBuffers) * kWarpBox;
        if (lane == 0) tma_store_wait<kBuffers - 1>();
        __syncwarp();
        StagedEpilogue<Config>::template write_accumulator_range<kRound * kRoundValues, (kRound + 1) * kRoundValues>(
            buffer, acc, coord, nullptr,
            [&](int r, int c) { return swizzled_offset<64, Config::kVec>(r - warp_row0, c % 64); });
        tma_store_fence();  // the staging writes, visible to the TMA unit (async proxy)
        __syncwarp();
        if (lane == 0) {
          const std::int64_t n0 = t.n0 + kRound * 64;
          if (n0 < p.n && t.m0 + warp_row0 < p.m) {
            Tensor s_box = make_tensor(make_smem_ptr(buffer), box_layout);
            Tensor g_box = local_tile(c_tile, make_shape(Int<Geometry::kWarpRows>{}, Int<64>{}),
                                      make_coord(static_cast<int>((t.m0 + warp_row0) / Geometry::kWarpRows),
                                                 static_cast<int>(n0 / 64)));
            copy(store_tma, cta_tma.partition_S(s_box), cta_tma.partition_D(g_box));
          }
          tma_store_arrive();
        }
      });
    } else {
      // The tile in rounds through the staging buffers: thread 0 waits until the store that last
      // read the round's buffer has (kBuffers - 1 later stores may still be reading theirs), the
      // threads write the round's values, and thread 0 stores its boxes as one bulk group.
      for_each(make_int_sequence<Geometry::kRounds>{}, [&](auto round_constant) {
        constexpr int kRound = decltype(round_constant)::value;
        T* buffer = staging + kRound % kBuffers * (kRoundBoxes * kBoxElements);
        if (threadIdx.x == 0) tma_store_wait<kBuffers - 1>();
        Barrier::sync();
        StagedEpilogue<Config>::template write_accumulator_range<kRound * kRoundValues, (kRound + 1) * kRoundValues>(
            buffer, acc, coord, nullptr, [&](int r, int c) {
              const int box = c / 64 - kRound * kRoundBoxes;
              return box * kBoxElements + swizzled_offset<64, Config::kVec>(r, c % 64);
            });
        tma_store_fence();  // the staging writes, visible to the TMA unit (async proxy)
        Barrier::sync();
        if (threadIdx.x == 0) {
          CUTE_UNROLL
          for (int b = 0; b < kRoundBoxes; ++b) {
            const std::int64_t n0 = t.n0 + (kRound * kRoundBoxes + b) * 64;
            if (n0 < p.n) {
              Tensor s_box = make_tensor(make_smem_ptr(buffer + b * kBoxElements), box_layout);
              Tensor g_box = local_tile(c_tile, make_shape(Int<kBM>{}, Int<64>{}),
                                        make_coord(static_cast<int>(t.m0 / kBM), static_cast<int>(n0 / 64)));
              copy(store_tma, cta_tma.partition_S(s_box), cta_tma.partition_D(g_box));
            }
          }
          tma_store_arrive();
        }
      });
    }
  }
  if (Geometry::kPerWarp ? threadIdx.x % 32 == 0 : threadIdx.x == 0) tma_store_wait<0>();
#endif
}

// ---- the entry point of the sm90_ws_varlen_k_*.cu instantiation files (declared in gemm.hpp) ----
template <class T, VarlenKContiguous kContiguous, class Geometry>
void launch_sm90_ws_varlen_k_gemm_with(const VarlenKGemm& g, int sm_count, cudaStream_t stream) {
  using Config = Sm90WsVarlenKConfig<T>;
  constexpr int smem = Geometry::smem_bytes();
  const PersistentVarlenKGrid grid = persistent_varlen_k_grid<Config>(g, sm_count);
  const auto store_tma = make_varlen_k_store_tma<Config, Geometry::kPerWarp ? Geometry::kWarpRows : Config::kBM>(g);
  auto kernel =
      sm90_ws_varlen_k_gemm_kernel<Config, Geometry, kContiguous, std::remove_const_t<decltype(store_tma)>>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "varlen-K GEMM: shared memory size");
  kernel<<<grid.blocks, Geometry::Ws::kThreads, smem, stream>>>(g, grid.tiling, store_tma);
  check_launch("varlen-K GEMM");
}

// Two kernels behind this entry point: per-warp stores (the default, step 38), and with
// warp_stores false each round stored by thread 0 after consumer barriers (kept to measure).
template <class T, VarlenKContiguous kContiguous>
void launch_sm90_ws_varlen_k_gemm(const VarlenKGemm& g, int sm_count, bool warp_stores, cudaStream_t stream) {
  if (warp_stores) {
    launch_sm90_ws_varlen_k_gemm_with<T, kContiguous, Sm90WsVarlenKWarpShape<T>>(g, sm_count, stream);
  } else {
    launch_sm90_ws_varlen_k_gemm_with<T, kContiguous, Sm90WsVarlenKShape<T>>(g, sm_count, stream);
  }
}

}  // namespace scattermoe::cuda
