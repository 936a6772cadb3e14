// wgmma GEMMs with one operand by TMA (sm_90a), written with CuTe.
//
// The multistage kernels of sm90_grouped_gemm.cuh with one change: each stage's tile of an
// operand that need not be gathered comes by TMA copies issued by one thread, instead of
// 16-byte cp.async spread over the block, so the threads copy only the gathered rows. The TMA
// completes a transaction barrier per stage; the k loop waits on it beside the cp.async group.
// Token rows gathered through an index cannot come by TMA; weights can (varlen-M: one (N, K, E)
// tensor, described once per launch on the host), and so can a varlen-M A whose rows are read in
// the grouped order (the down projection's activations, dX's dH): one (rows, K) tensor, each
// tile's box starting at its first row. A box that runs past the expert's last row reads the
// next expert's rows (or zeros past the end); their products land in accumulator rows the
// epilogue does not store, so no thread copies anything and no row needs zeroing. A varlen-K
// form that loaded the operand whose rows are contiguous by TMA measured slower than the lean
// cp.async copies (docs/perf.md step 22) and was removed.
//
// Compiled for sm_90a only (sm90_tma_*.cu, sm90_tma_rows_*.cu, sm90_ws_tma_rows_*.cu,
// sm90_persistent_tma_*.cu); elsewhere the kernels are empty and never launched.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "core/activation_math.hpp"
#include "cuda/sm90_grouped_gemm.cuh"

namespace scattermoe::cuda {

// The tile configuration of every TMA kernel: that of the cp.async kernels, with MN-major stages
// ordered K-first (a TMA box covers 64 x 64: 4 per 256-wide stage instead of 32 of 64 x 8).
template <class T>
using Sm90TmaConfig = Sm90GemmConfig<T, 128, 256, 4, true>;

// One transaction barrier per pipeline stage, completed by the stage's TMA copies (issued by
// thread 0), in shared memory after the operand stages; and this thread's expected parity of
// each, flipped on every wait (every copy issued is waited for exactly once, in stage order).
template <int kStages>
struct StageBarriers {
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  static constexpr int kBytes = kStages * static_cast<int>(sizeof(std::uint64_t));

  std::uint64_t* full;
  std::uint32_t phases = 0;  // bit s: the parity stage s's barrier completes with next

  // Thread 0 initialises them; the block synchronises.
  __device__ explicit StageBarriers(void* memory) : full(static_cast<std::uint64_t*>(memory)) {
    if (threadIdx.x == 0) {
      CUTE_UNROLL
      for (int s = 0; s < kStages; ++s) Barrier::init(&full[s], 1);
      cutlass::arch::fence_barrier_init();
    }
    __syncthreads();
  }

  // Thread 0, before the stage's copies: the barrier they complete, expecting `bytes`.
  __device__ std::uint64_t& expect(int stage, std::uint32_t bytes) {
    Barrier::arrive_and_expect_tx(&full[stage], bytes);
    return full[stage];
  }

  // Every thread: returns once the stage's copies have landed.
  __device__ void wait(int stage) {
    Barrier::wait(&full[stage], (phases >> stage) & 1u);
    phases ^= 1u << stage;
  }
};

// Marks a varlen-M TMA kernel whose A rows the threads copy (cp.async): gathered rows.
struct RowsByThreads {};

// A's rows as one (rows, K) tensor, K-contiguous (A.contiguous(): row i is row i), and its TMA
// copy into one (BM, BK) stage of Config's GMMA layout.
template <class Config>
auto make_rows_tma(const VarlenMGemm& g) {
  using namespace cute;
  using T = typename Config::Element;
  Tensor rows = make_tensor(make_gmem_ptr(static_cast<const T*>(g.a.ptr)),
                            make_layout(make_shape(static_cast<int>(g.rows), static_cast<int>(g.k)),
                                        make_stride(g.a.ld, Int<1>{})));
  return make_tma_copy(SM90_TMA_LOAD{}, rows, Config::template gmma_stage_layout<true, Config::kBM>());
}

// Grouped row row0's (BM, BK) boxes along k, as make_rows_tma's coordinates: (BM, BK, k).
template <class Config, class RowTma>
__device__ __forceinline__ auto row_boxes(const RowTma& row_tma, const VarlenMGemm& p, std::int64_t row0) {
  using namespace cute;
  Tensor m_a = row_tma.get_tma_tensor(make_shape(static_cast<int>(p.rows), static_cast<int>(p.k)));
  return local_tile(domain_offset(make_coord(static_cast<int>(row0), 0), m_a),
                    make_shape(Int<Config::kBM>{}, Int<Config::kBK>{}), make_coord(0, _));
}

// Expert e's (kRows, BK) weight tiles of column tile `column` (columns column * kRows, ...)
// along k, as make_weight_tma's coordinates: (kRows, BK, k).
template <class Config, int kRows = Config::kBN, class WeightTma>
__device__ __forceinline__ auto weight_tiles(const WeightTma& weight_tma, const VarlenMGemm& p, int e, int column) {
  using namespace cute;
  Tensor m_b = weight_tma.get_tma_tensor(make_shape(static_cast<int>(p.n), static_cast<int>(p.k), p.num_experts));
  return local_tile(m_b(_, _, e), make_shape(Int<kRows>{}, Int<Config::kBK>{}), make_coord(column, _));
}

// The weights as one (N, K, E) tensor (unit stride along K when kBKMajor, else along N) and its
// TMA copy into one (kRows, BK) stage of Config's GMMA layout (kRows < BN: part of a stage; the
// stage layouts place N rows [0, kRows) first, so a stage is BN / kRows such boxes in a row).
template <class Config, bool kBKMajor, int kRows = Config::kBN>
auto make_weight_tma(const VarlenMGemm& g) {
  using namespace cute;
  using T = typename Config::Element;
  auto shape = make_shape(static_cast<int>(g.n), static_cast<int>(g.k), g.num_experts);
  auto stride = [&] {
    if constexpr (kBKMajor) {
      return make_stride(g.b_stride_n, Int<1>{}, g.b_expert_stride);
    } else {
      return make_stride(Int<1>{}, g.b_stride_k, g.b_expert_stride);
    }
  }();
  Tensor weights = make_tensor(make_gmem_ptr(static_cast<const T*>(g.b)), make_layout(shape, stride));
  return make_tma_copy(SM90_TMA_LOAD{}, weights, Config::template gmma_stage_layout<kBKMajor, kRows>());
}

// RowTma: RowsByThreads (A's rows by cp.async, gathered or not) or make_rows_tma's copy (both
// operands by TMA, issued by thread 0; the threads only multiply and store).
template <class Config, bool kBKMajor, class WeightTma, class RowTma>
__global__ void __launch_bounds__(Config::kThreads, 1)
    sm90_tma_varlen_m_gemm_kernel(VarlenMGemm p, const int* __restrict__ tile_prefix,
                                  CUTE_GRID_CONSTANT WeightTma const weight_tma,
                                  CUTE_GRID_CONSTANT RowTma const row_tma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using T = typename Config::Element;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;
  constexpr int kBK = Config::kBK;
  constexpr int kStages = Config::kStages;
  constexpr bool kRowsTma = !std::is_same_v<RowTma, RowsByThreads>;
  constexpr std::uint32_t kStageBytes = (kBN + (kRowsTma ? kBM : 0)) * kBK * sizeof(T);

  const RasterTile raster = grouped_raster(p.raster_group_rows);
  if (p.num_experts == 0 || raster.row >= tile_prefix[p.num_experts - 1]) return;
  const VarlenMTile t = varlen_m_tile<kBM, kBN>(p, tile_prefix, raster.row, raster.column);

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  constexpr auto layout_a = Config::template copy_layout<true, kBM>();
  constexpr auto layout_b = Config::template copy_layout<kBKMajor, kBN>();
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(layout_a);
  StageBarriers<kStages> barriers(smem_b + cosize(layout_b));

  VarlenMCopies<Config, kBKMajor, true> copies;
  if constexpr (!kRowsTma) copies.locate_rows(p, t.row0, t.row_end);
  auto load_a = [&](int stage, int k_tile) {
    if constexpr (!kRowsTma) copies.load_a(p, smem_a, stage, k_tile);
  };

  // The tile's (BM, BK) row boxes along k from its first row, and the stages they land in (TMA
  // rows only; load_b issues them with the weight tile, on the same barrier).
  auto rows_parts = [&] {
    if constexpr (kRowsTma) {
      Tensor g_a = row_boxes<Config>(row_tma, p, t.row0);                                         // (BM,BK,k)
      Tensor s_a = make_tensor(make_smem_ptr(smem_a), Config::template gmma_layout<true, kBM>());  // (BM,BK,STAGES)
      auto cta_rows = row_tma.get_slice(Int<0>{});
      return cute::make_tuple(cta_rows.partition_S(g_a), cta_rows.partition_D(s_a));
    } else {
      return 0;
    }
  }();

  // Expert e's (BN, BK) weight tiles along k, and the stages they land in.
  Tensor g_b = weight_tiles<Config>(weight_tma, p, t.e, static_cast<int>(t.n0 / kBN));             // (BN,BK,k)
  Tensor s_b = make_tensor(make_smem_ptr(smem_b), Config::template gmma_layout<kBKMajor, kBN>());  // (BN,BK,STAGES)
  auto cta_tma = weight_tma.get_slice(Int<0>{});
  Tensor tBgB = cta_tma.partition_S(g_b);  // (TMA,TMA_N,TMA_K,k)
  Tensor tBsB = cta_tma.partition_D(s_b);  // (TMA,TMA_N,TMA_K,STAGES)
  auto load_b = [&](int stage, int k_tile) {
    if (threadIdx.x == 0) {
      std::uint64_t& landed = barriers.expect(stage, kStageBytes);
      copy(weight_tma.with(landed), tBgB(_, _, _, k_tile), tBsB(_, _, _, stage));
      if constexpr (kRowsTma) {
        copy(row_tma.with(landed), get<0>(rows_parts)(_, _, _, k_tile), get<1>(rows_parts)(_, _, _, stage));
      }
    }
  };
  auto wait_b = [&](int stage) { barriers.wait(stage); };

  typename Config::template TiledMma<true, kBKMajor> mma;
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kBM>{}, Int<kBN>{}));
  clear(acc);
  const int k_tiles = static_cast<int>((p.k + kBK - 1) / kBK);
  Config::prologue(k_tiles, load_a, load_b);
  Config::template steady<true, kBKMajor>(smem_a, smem_b, k_tiles, load_a, load_b, acc, wait_b);

  Tensor coord = mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
  store_varlen_m_tile<Config, kBKMajor>(p, acc, coord, smem_raw, t.e, t.row0, t.row_end, t.n0);
#endif
}

// ---------------------------------------------------------------------------------------------
// The warp-specialised form for A rows by TMA: a producer warpgroup (after the two consumer
// warpgroups; one of its threads issues every copy, the rest give their registers away) keeps
// every stage in flight on CUTLASS's TMA pipeline (a full barrier per stage completed by the
// copies' bytes, an empty barrier per stage released by the consumers' arrivals once their wgmma
// has read it), and the consumers only wait, multiply and store: no block-wide barrier per k
// tile, and kStages k tiles in flight instead of kStages - 2.
// kProducerRegisters: what the producer warpgroup keeps after setmaxnreg (40 when one thread
// issues TMA copies; more when its threads gather rows and hold their addresses); the consumers
// take the rest of the block's 384 x 168: 128 x 40 + 256 x 232, 128 x 56 + 256 x 224, ...
template <class Config, int kProducerRegisters_ = 40>
struct Sm90WsShape {
  static constexpr int kConsumers = Config::kThreads;  // the accumulator warpgroups
  static constexpr int kProducerThreads = 128;
  static constexpr int kThreads = kConsumers + kProducerThreads;  // + the producer warpgroup
  static constexpr int kProducerRegisters = kProducerRegisters_;
  static constexpr int kConsumerRegisters =
      std::min(232, (384 * 168 - kProducerThreads * kProducerRegisters) / kConsumers / 8 * 8);
  static_assert(kProducerRegisters % 8 == 0 && kProducerRegisters >= 24, "setmaxnreg takes multiples of 8");
  static_assert(128 * kProducerRegisters + kConsumers * kConsumerRegisters <= 384 * 168,
                "setmaxnreg moves registers between the block's warps only");
  static_assert(kConsumers == 256, "the register split assumes two consumer warpgroups");
  using Pipeline = cutlass::PipelineTmaAsync<Config::kStages>;

  // This thread's pipeline parameters: the threads past the consumers produce, the first of them
  // leads (its arrival expects transaction_bytes of TMA copies per stage), and `producers`
  // arrivals complete a stage's full barrier.
  __device__ static typename Pipeline::Params pipeline_params(std::uint32_t transaction_bytes, int producers) {
    const bool producer = static_cast<int>(threadIdx.x) >= kConsumers;
    typename Pipeline::Params params;
    params.transaction_bytes = transaction_bytes;
    params.role = producer ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    params.is_leader = threadIdx.x == kConsumers;
    params.num_consumers = kConsumers;
    params.num_producers = producers;
    return params;
  }
};

// The consumers' k loop of the warp-specialised kernels: acc += the tile's product over k tiles
// [0, k_tiles), each stage waited for and, once the next k tile's wgmma is issued and this one's
// has read it, handed back; on return every wgmma has completed and every stage but the last is
// back (the caller hands that one back when the producer goes on to another tile). kFence: the
// operands came (partly) by cp.async, the generic proxy, and wgmma reads through the async one.
// after_k(k), when given, runs once k tile k's wgmma is issued and k tile k-1's stage handed back.
struct NoHook {
  __device__ void operator()(int) const {}
};
template <bool kFence, class Pipeline, class State, class Mma, class FragA, class FragB, class Acc,
          class AfterK = NoHook>
__device__ __forceinline__ void ws_consumer_k_loop(Pipeline& pipeline, State& read, State& release, int k_tiles,
                                                   Mma& mma, FragA& tCrA, FragB& tCrB, Acc& acc,
                                                   AfterK&& after_k = AfterK{}) {
  using namespace cute;
  for (int k = 0; k < k_tiles; ++k) {
    pipeline.consumer_wait(read);
    if constexpr (kFence) cutlass::arch::fence_view_async_shared();
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tCrA(_, _, _, read.index()), tCrB(_, _, _, read.index()), acc);
    warpgroup_commit_batch();
    warpgroup_wait<1>();  // k tile k-1's wgmma has read its stage: hand it back
    warpgroup_fence_operand(acc);
    if (k > 0) {
      pipeline.consumer_release(release);
      ++release;
    }
    ++read;
    after_k(k);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
}

// A's rows of a varlen-M tile gathered by a producer warpgroup's 128 threads (the first of them
// thread kFirst) by cp.async: thread q copies chunk q % 8 (8 elements) of rows q / 8, + 16, ...,
// + 112 of the tile, each row looked up once per tile.
template <class Config, int kFirst>
struct GatheredRows {
  using T = typename Config::Element;
  static constexpr int kPerRow = Config::kBK / Config::kVec;  // 8 chunks per row
  static constexpr int kRowsPerPass = 128 / kPerRow;           // 16
  static constexpr int kPasses = Config::kBM / kRowsPerPass;   // 8

  int chunk;
  int row;
  const T* base;
  const T* rows[kPasses];  // this thread's chunk of each of its rows (nullptr past the tile's end)

  __device__ explicit GatheredRows(const VarlenMGemm& p)
      : chunk((static_cast<int>(threadIdx.x) - kFirst) % kPerRow * Config::kVec),
        row((static_cast<int>(threadIdx.x) - kFirst) / kPerRow),
        base(static_cast<const T*>(p.a.ptr)) {}

  __device__ __forceinline__ void locate(const VarlenMGemm& p, std::int64_t row0, std::int64_t row_end) {
    CUTE_UNROLL
    for (int j = 0; j < kPasses; ++j) {
      const std::int64_t i = row0 + row + j * kRowsPerPass;
      rows[j] = i < row_end ? base + p.a.row(i) * p.a.ld + chunk : nullptr;
    }
  }

  // k tile k of the rows into `stage` of A's stages (zeros past the tile's rows and past K).
  __device__ __forceinline__ void load(const VarlenMGemm& p, T* smem_a, int stage, int k) const {
    constexpr auto layout_a = Config::template copy_layout<true, Config::kBM>();  // element offsets (BM,BK,STAGES)
    const std::int64_t k0 = static_cast<std::int64_t>(k) * Config::kBK;
    const bool inside = k0 + chunk < p.k;  // K % 8 == 0 on this path: a chunk is all in or out
    T* dst = smem_a + layout_a(0, 0, stage);
    CUTE_UNROLL
    for (int j = 0; j < kPasses; ++j) {
      const bool valid = inside && rows[j] != nullptr;
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(valid ? rows[j] + k0 : base),
          *reinterpret_cast<cute::uint128_t*>(dst + layout_a(row + j * kRowsPerPass, chunk, 0)), valid);
    }
  }
};

template <class Config, bool kBKMajor, class WeightTma, class RowTma>
__global__ void __launch_bounds__(Sm90WsShape<Config>::kThreads, 1)
    sm90_ws_tma_varlen_m_gemm_kernel(VarlenMGemm p, const int* __restrict__ tile_prefix,
                                     CUTE_GRID_CONSTANT WeightTma const weight_tma,
                                     CUTE_GRID_CONSTANT RowTma const row_tma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using T = typename Config::Element;
  // Gathered rows (RowsByThreads): the producer warpgroup's 128 threads copy A's rows by
  // cp.async, each arriving on the stage's full barrier when its copies land (noinc), beside the
  // one TMA of the weight tile; the full barrier expects 1 + 128 arrivals and the weight bytes.
  constexpr bool kRowsTma = !std::is_same_v<RowTma, RowsByThreads>;
  using Ws = Sm90WsShape<Config, kRowsTma ? 40 : 56>;
  using Pipeline = typename Ws::Pipeline;
  using PipelineState = typename Pipeline::PipelineState;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;
  constexpr int kBK = Config::kBK;
  constexpr std::uint32_t kStageBytes = (kBN + (kRowsTma ? kBM : 0)) * kBK * sizeof(T);

  const RasterTile raster = grouped_raster(p.raster_group_rows);
  if (p.num_experts == 0 || raster.row >= tile_prefix[p.num_experts - 1]) return;
  const VarlenMTile t = varlen_m_tile<kBM, kBN>(p, tile_prefix, raster.row, raster.column);
  const int k_tiles = static_cast<int>((p.k + kBK - 1) / kBK);

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(Config::template copy_layout<true, kBM>());
  auto* storage = reinterpret_cast<typename Pipeline::SharedStorage*>(smem_b + cosize(Config::template copy_layout<kBKMajor, kBN>()));
  Tensor s_a = make_tensor(make_smem_ptr(smem_a), Config::template gmma_layout<true, kBM>());      // (BM,BK,STAGES)
  Tensor s_b = make_tensor(make_smem_ptr(smem_b), Config::template gmma_layout<kBKMajor, kBN>());  // (BN,BK,STAGES)

  const bool producer = static_cast<int>(threadIdx.x) >= Ws::kConsumers;
  Pipeline pipeline(*storage, Ws::pipeline_params(kStageBytes, kRowsTma ? 1 : 1 + Ws::kProducerThreads),
                    cute::Shape<_1, _1, _1>{});
  __syncthreads();  // the barriers initialised, for every thread

  if constexpr (!kRowsTma) {
    if (producer) {
      cutlass::arch::warpgroup_reg_dealloc<Ws::kProducerRegisters>();
      GatheredRows<Config, Ws::kConsumers> rows(p);
      rows.locate(p, t.row0, t.row_end);
      Tensor g_b = weight_tiles<Config>(weight_tma, p, t.e, static_cast<int>(t.n0 / kBN));  // (BN,BK,k)
      auto weights = weight_tma.get_slice(Int<0>{});
      Tensor tBgB = weights.partition_S(g_b);
      Tensor tBsB = weights.partition_D(s_b);
      PipelineState write = cutlass::make_producer_start_state<Pipeline>();
      for (int k = 0; k < k_tiles; ++k) {
        pipeline.producer_acquire(write);  // the leader's arrival expects the weight tile's bytes
        auto* landed = pipeline.producer_get_barrier(write);
        if (threadIdx.x == Ws::kConsumers) {
          copy(weight_tma.with(*landed), tBgB(_, _, _, k), tBsB(_, _, _, write.index()));
        }
        rows.load(p, smem_a, write.index(), k);
        cutlass::arch::cpasync_barrier_arrive_noinc(landed);
        ++write;
      }
      // Leave once the copies have landed (their barrier arrivals complete the consumers'
      // stages); the epilogue is the consumers'.
      cute::cp_async_wait<0>();
      return;
    }
  } else if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Ws::kProducerRegisters>();
    if (threadIdx.x == Ws::kConsumers) {
      // The tile's row boxes from its first row and expert e's weight tiles, along k.
      Tensor g_a = row_boxes<Config>(row_tma, p, t.row0);                                // (BM,BK,k)
      Tensor g_b = weight_tiles<Config>(weight_tma, p, t.e, static_cast<int>(t.n0 / kBN));  // (BN,BK,k)
      auto rows = row_tma.get_slice(Int<0>{});
      auto weights = weight_tma.get_slice(Int<0>{});
      Tensor tAgA = rows.partition_S(g_a);
      Tensor tAsA = rows.partition_D(s_a);
      Tensor tBgB = weights.partition_S(g_b);
      Tensor tBsB = weights.partition_D(s_b);
      PipelineState write = cutlass::make_producer_start_state<Pipeline>();
      for (int k = 0; k < k_tiles; ++k) {
        pipeline.producer_acquire(write);
        auto* landed = pipeline.producer_get_barrier(write);
        copy(row_tma.with(*landed), tAgA(_, _, _, k), tAsA(_, _, _, write.index()));
        copy(weight_tma.with(*landed), tBgB(_, _, _, k), tBsB(_, _, _, write.index()));
        ++write;
      }
    }
    // The copies in flight complete the consumers' barriers; the epilogue is theirs. (Leaving
    // early is safe for a cluster of one block only: a multicast producer must wait for its
    // peers' last reads first, as CUTLASS's producer_tail does.)
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Ws::kConsumerRegisters>();
  typename Config::template TiledMma<true, kBKMajor> mma;
  ThrMMA thr_mma = mma.get_slice(threadIdx.x);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(s_a));  // descriptors (MMA,M,K,STAGES)
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(s_b));  // descriptors (MMA,N,K,STAGES)
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kBM>{}, Int<kBN>{}));
  clear(acc);
  PipelineState read;
  PipelineState release;
  ws_consumer_k_loop<!kRowsTma>(pipeline, read, release, k_tiles, mma, tCrA, tCrB, acc);

  Tensor coord = thr_mma.partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
  store_varlen_m_tile<Config, kBKMajor, ConsumerBarrier<Ws::kConsumers>>(p, acc, coord, smem_raw, t.e, t.row0,
                                                                           t.row_end, t.n0);
#endif
}

// ---------------------------------------------------------------------------------------------
// The warp-specialised kernel, persistent: one block per SM walks the tile schedule (as
// sm90_persistent_varlen_m_gemm_kernel does); the producer runs ahead across tile boundaries, so
// the next tile's operands arrive while the consumers store a finished one, and the pipeline
// fills once per block instead of once per tile. The stages stay 4 (192 KiB); the finished tile
// goes through two 16 KiB staging buffers of its own in four rounds of 64 columns (a round's
// buffer was last read by the round two before it, which one barrier per round orders), each
// round written out by the consumers in 16-byte chunks of whole rows, or (p.tma_stores, below)
// by one TMA store per warp.
// kGlu (gathered rows only): the SwiGLU of an up projection whose C is [first | gate], n = 2h
// columns, h a multiple of BN / 2 (the caller checked glu_epilogue_shape; VarlenMGemm::glu_a). Column tile j covers
// C's columns j * BN/2 + [0, BN/2) of both halves: its weight stage is two (BN/2, BK) TMA boxes,
// so a thread holds each first-half accumulator and its gate partner (value v + V/2, column
// c + BN/2). After C's four rounds, two more write A = silu(gate) * first to glu_a's columns
// j * BN/2 + [0, BN/2), computed from the values as rounded into C (as the activation kernel
// would read them back), with the fast exponential and division. Instantiated for K-major
// weights only (glu_epilogue_shape): the N-major form's boxes would rely on the K-first stage
// layout placing N rows [0, BN/2) first, which no GPU test has run.
// silu(x) and its derivative from one fast sigmoid (__expf and __fdividef: two MUFU operations),
// for the SwiGLU epilogues of both directions, so the backward's A is the forward's bit for bit.
// IEEE expf and division cost ~40 instructions an element there, where no other warps hide them
// (measured: the up projection +250 us on qwen3-30b-a3b, more than the 209 us pass it replaced);
// their error (a few fp32 ulp) is far below T's rounding.
__device__ __forceinline__ ActivationAt fast_silu_at(float x) {
  const float sigmoid = __fdividef(1.0f, 1.0f + __expf(-x));
  return {x * sigmoid, sigmoid * (1.0f + x * (1.0f - sigmoid))};
}

template <class Config>
struct Sm90WsPersistentVarlenM {
  static constexpr int kRoundColumns = 64;
  static constexpr int kRounds = Config::kBN / kRoundColumns;
  static constexpr int kBufferElements = Config::kBM * kRoundColumns;
  static constexpr int kStagingElements = 2 * kBufferElements;
  static_assert(kRounds % 2 == 0, "a round's buffer is the same in every tile");
  template <bool kBKMajor>
  static constexpr int stage_elements() {
    return cute::cosize(Config::template copy_layout<true, Config::kBM>()) +
           cute::cosize(Config::template copy_layout<kBKMajor, Config::kBN>());
  }
  template <bool kBKMajor, class Pipeline>
  static constexpr int smem_bytes() {
    return (stage_elements<kBKMajor>() + kStagingElements) * static_cast<int>(sizeof(typename Config::Element)) +
           static_cast<int>(sizeof(typename Pipeline::SharedStorage));
  }
};

// kGluBackward (gathered rows, no bias, n a multiple of BN, C in grouped order; the caller
// checked glu_backward_epilogue_shape): the accumulators are dA' of the MLP backward, and the
// epilogue runs its SwiGLU row pass (GluBackwardEpilogue, p.glu_backward) instead of storing
// them: each round of dA' is staged as T, then each thread takes its rows' 8-column chunks of the
// round with the matching chunks of H's two halves (prefetched into L2 during the k loop, loaded
// two passes at a time after the staging), and writes dH and g * A; its share of each row's dot
// <dA', A> is summed over the rounds, then over the 8 lanes of the row, into d_gates_partial's
// column-tile slot. silu and its derivative come from fast_silu_at, as in the forward's SwiGLU
// epilogue, so A is the A that epilogue wrote; the row pass after the GEMM uses the accurate
// sigmoid, so the two paths may differ by an ulp of T in A and what follows.
// p.tma_stores: a consumer warp whose 16 rows of the tile all belong to its expert stores each
// round's 16 x 64 box from its staging buffer by TMA (c_store; kGlu's A rounds a_store), lane 0
// waiting before a buffer is rewritten until the store that read it two rounds before has; a warp
// straddling the expert's last row stores by its threads.
// The consumers take each tile's coordinates from the producer (tile_slots, written by its leader
// before its first arrival on the tile's first stage) once that stage has landed, and look up the
// tile's destination rows then, with the first k tile's wgmma in flight: computed before the k
// loop (a division, a binary search of dependent loads, the expert's offsets), they held the
// tensor cores idle between tiles (ncu, qwen3-30b-a3b's down projection: 13% of stall samples).
template <class Config, bool kBKMajor, class WeightTma, class RowTma, bool kGlu = false, bool kGluBackward = false,
          class StoreTma = RowsByThreads, int kGluBackwardLoads = 4>
__global__ void __launch_bounds__(Sm90WsShape<Config>::kThreads, 1)
    sm90_ws_persistent_varlen_m_gemm_kernel(VarlenMGemm p, const int* __restrict__ tile_prefix,
                                            CUTE_GRID_CONSTANT WeightTma const weight_tma,
                                            CUTE_GRID_CONSTANT RowTma const row_tma,
                                            CUTE_GRID_CONSTANT StoreTma const c_store,
                                            CUTE_GRID_CONSTANT StoreTma const a_store) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using T = typename Config::Element;
  constexpr bool kRowsTma = !std::is_same_v<RowTma, RowsByThreads>;
  static_assert(!(kGlu && kRowsTma), "the GLU epilogue serves the up projection, whose rows are gathered");
  static_assert(!(kGluBackward && (kRowsTma || kGlu)), "the GLU backward epilogue serves dA', whose rows are gathered");
  using Ws = Sm90WsShape<Config, kRowsTma ? 40 : 56>;
  using Geometry = Sm90WsPersistentVarlenM<Config>;
  using Pipeline = typename Ws::Pipeline;
  using PipelineState = typename Pipeline::PipelineState;
  using Barrier = ConsumerBarrier<Ws::kConsumers>;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;
  constexpr int kBK = Config::kBK;
  constexpr std::uint32_t kStageBytes = (kBN + (kRowsTma ? kBM : 0)) * kBK * sizeof(T);

  const int row_tiles = p.num_experts ? tile_prefix[p.num_experts - 1] : 0;
  const int column_tiles = static_cast<int>((p.n + kBN - 1) / kBN);
  const int tiles = row_tiles * column_tiles;
  if (static_cast<int>(blockIdx.x) >= tiles) return;
  const int k_tiles = static_cast<int>((p.k + kBK - 1) / kBK);
  auto tile_at = [&](int tile_number) {
    const RasterTile r = raster_tile(tile_number, row_tiles, column_tiles, p.raster_group_rows);
    return varlen_m_tile<kBM, kBN>(p, tile_prefix, r.row, r.column);
  };

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(Config::template copy_layout<true, kBM>());
  T* staging = smem_a + Geometry::template stage_elements<kBKMajor>();  // 1024-byte aligned
  auto* storage = reinterpret_cast<typename Pipeline::SharedStorage*>(staging + Geometry::kStagingElements);
  Tensor s_a = make_tensor(make_smem_ptr(smem_a), Config::template gmma_layout<true, kBM>());      // (BM,BK,STAGES)
  Tensor s_b = make_tensor(make_smem_ptr(smem_b), Config::template gmma_layout<kBKMajor, kBN>());  // (BN,BK,STAGES)

  const bool producer = static_cast<int>(threadIdx.x) >= Ws::kConsumers;
  Pipeline pipeline(*storage, Ws::pipeline_params(kStageBytes, kRowsTma ? 1 : 1 + Ws::kProducerThreads),
                    cute::Shape<_1, _1, _1>{});
  // The block's i-th tile's coordinates in slot i % kTileSlots. The producer's leader writes a
  // slot before acquiring the tile's first stage, which it holds only once the consumers have
  // handed back the stage of kStages k tiles before (a tile has at least one): by then they have
  // read the slots of every tile before that, so more slots than stages never overwrite one
  // still to be read. (No k tiles, K = 0: no stage orders them, and the consumers compute it.)
  constexpr int kTileSlots = 8;
  static_assert(kTileSlots > Config::kStages, "a slot is rewritten only after it has been read");
  __shared__ VarlenMTile tile_slots[kTileSlots];
  __syncthreads();  // the barriers initialised, for every thread

  if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Ws::kProducerRegisters>();
    if (!kRowsTma || threadIdx.x == Ws::kConsumers) {
      auto weights = weight_tma.get_slice(Int<0>{});
      Tensor tBsB = weights.partition_D(s_b);
      PipelineState write = cutlass::make_producer_start_state<Pipeline>();
      int slot = 0;
      for (int tile_number = static_cast<int>(blockIdx.x); tile_number < tiles;
           tile_number += static_cast<int>(gridDim.x), slot = (slot + 1) % kTileSlots) {
        const VarlenMTile t = tile_at(tile_number);
        if (threadIdx.x == Ws::kConsumers) tile_slots[slot] = t;  // before its arrival on the first stage
        asm volatile("" ::: "memory");  // (CUTLASS's arrive has no memory clobber: keep the store before it)
        // The tile's weights of k tile k into `stage`, completing `landed`: one (BN, BK) box, or
        // (kGlu) two of BN/2 rows: column tile j's first-half columns and its gate columns, h on.
        auto copy_weights = [&] {
          if constexpr (kGlu) {
            constexpr int kHalf = kBN / 2;
            const int first = static_cast<int>(t.n0 / 2 / kHalf);
            const int gate = static_cast<int>(p.n / 2 / kHalf) + first;
            Tensor tBgB_first = weights.partition_S(weight_tiles<Config, kHalf>(weight_tma, p, t.e, first));
            Tensor tBgB_gate = weights.partition_S(weight_tiles<Config, kHalf>(weight_tma, p, t.e, gate));
            return [&, tBgB_first, tBgB_gate](std::uint64_t* landed, int k, int stage) {
              auto half_of_stage = [&](int half) {  // rows [half * kHalf, + kHalf) of the stage
                return weights.partition_D(make_tensor(make_smem_ptr(smem_b + (stage * kBN + half * kHalf) * kBK),
                                                       Config::template gmma_stage_layout<kBKMajor, kHalf>()));
              };
              copy(weight_tma.with(*landed), tBgB_first(_, _, _, k), half_of_stage(0));
              copy(weight_tma.with(*landed), tBgB_gate(_, _, _, k), half_of_stage(1));
            };
          } else {
            Tensor tBgB = weights.partition_S(weight_tiles<Config>(weight_tma, p, t.e, static_cast<int>(t.n0 / kBN)));
            return [&, tBgB](std::uint64_t* landed, int k, int stage) {
              copy(weight_tma.with(*landed), tBgB(_, _, _, k), tBsB(_, _, _, stage));
            };
          }
        }();
        if constexpr (kRowsTma) {
          auto rows = row_tma.get_slice(Int<0>{});
          Tensor tAgA = rows.partition_S(row_boxes<Config>(row_tma, p, t.row0));
          Tensor tAsA = rows.partition_D(s_a);
          for (int k = 0; k < k_tiles; ++k) {
            pipeline.producer_acquire(write);
            auto* landed = pipeline.producer_get_barrier(write);
            copy(row_tma.with(*landed), tAgA(_, _, _, k), tAsA(_, _, _, write.index()));
            copy_weights(landed, k, write.index());
            ++write;
          }
        } else {
          GatheredRows<Config, Ws::kConsumers> rows(p);
          rows.locate(p, t.row0, t.row_end);
          for (int k = 0; k < k_tiles; ++k) {
            pipeline.producer_acquire(write);  // the leader's arrival expects the weight tile's bytes
            auto* landed = pipeline.producer_get_barrier(write);
            if (threadIdx.x == Ws::kConsumers) copy_weights(landed, k, write.index());
            rows.load(p, smem_a, write.index(), k);
            cutlass::arch::cpasync_barrier_arrive_noinc(landed);
            ++write;
          }
        }
      }
    }
    // Leave once the copies have landed (their barrier arrivals complete the consumers' stages;
    // TMA copies need no thread to wait).
    if constexpr (!kRowsTma) cute::cp_async_wait<0>();
    return;
  }

  cutlass::arch::warpgroup_reg_alloc<Ws::kConsumerRegisters>();
  typename Config::template TiledMma<true, kBKMajor> mma;
  ThrMMA thr_mma = mma.get_slice(threadIdx.x);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(s_a));  // descriptors (MMA,M,K,STAGES)
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(s_b));  // descriptors (MMA,N,K,STAGES)
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kBM>{}, Int<kBN>{}));
  Tensor coord = thr_mma.partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
  // A round's accumulator values: a wgmma accumulator orders a thread's values (2 columns, 2 row
  // halves, kBN / 8 column groups of 8), so values [r * V / kRounds, (r + 1) * V / kRounds) are
  // the columns [r * 64, (r + 1) * 64).
  constexpr int kValues = decltype(size(acc))::value;
  constexpr int kRoundValues = kValues / Geometry::kRounds;
  static_assert(decltype(size<1>(acc))::value == 1 && decltype(size<2>(acc))::value == 1,
                "one wgmma accumulator per thread: its value order gives the rounds' columns");
  __shared__ float bias_tile[kBN];
  // The rounds' stores. Block-wide (SCATTERMOE_SM90_VARLEN_M_WARP_STORES=0): thread q writes
  // 16-byte chunk q % kChunks of rows q / kChunks + 32 j (j < kPasses) of a round staged by all
  // consumers, after a barrier across them. Per warp (p.warp_stores, the default): a warp stages and stores only its own
  // 16 accumulator rows (a wgmma warpgroup's warp w holds rows 16 w + [0, 16) of its 64), in two
  // 16 x 64 buffers of its own, lane l chunk l % kChunks of rows l / kChunks + 4 j, with
  // __syncwarp instead of the barrier. Either way a thread keeps its chunk and its kPasses rows in
  // every round, so their destination rows of C (c_index) are looked up once per tile, before
  // the k loop, whose wgmma hide the loads' latency (looked up per store, each load's latency
  // stood in the epilogue, kPasses times per round).
  constexpr int kChunks = Geometry::kRoundColumns / Config::kVec;  // 16-byte chunks per row
  constexpr int kWarpRows = 16;
  constexpr int kPasses = kBM * kChunks / Ws::kConsumers;
  static_assert(kPasses == kWarpRows * kChunks / 32, "both forms give a thread kPasses rows");
  static_assert(Ws::kConsumers / 32 * 2 * kWarpRows * Geometry::kRoundColumns <= Geometry::kStagingElements,
                "two buffers per consumer warp fit in the staging");
  const int chunk = static_cast<int>(threadIdx.x) % kChunks * Config::kVec;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int row_base = p.warp_stores ? warp * kWarpRows : 0;  // the first row this thread stages
  const int row_first = row_base + (p.warp_stores ? static_cast<int>(threadIdx.x) % 32 : static_cast<int>(threadIdx.x)) / kChunks;
  const int row_stride = p.warp_stores ? 32 / kChunks : Ws::kConsumers / kChunks;
  // Round r's staging buffer for this thread, and a round's barrier.
  auto round_buffer = [&](int round) {
    return p.warp_stores ? staging + (warp * 2 + round % 2) * kWarpRows * Geometry::kRoundColumns
                         : staging + round % 2 * Geometry::kBufferElements;
  };
  auto round_barrier = [&] {
    if (p.warp_stores) {
      __syncwarp();
    } else {
      Barrier::sync();
    }
  };

  // TMA stores of a round's box (p.tma_stores, per warp): C's and (kGlu) A's coordinates.
  // (The coordinate tensors are made where used: built here, their extents would stay in
  // registers through the k loop, which has none to spare.)
  const int lane = static_cast<int>(threadIdx.x) % 32;
  auto store_box = [&](const StoreTma& tma, std::int64_t columns, const T* buffer, std::int64_t row,
                       std::int64_t column) {
    Tensor m = tma.get_tma_tensor(make_shape(static_cast<int>(p.rows), static_cast<int>(columns)));
    Tensor s_box = make_tensor(make_smem_ptr(buffer), varlen_k_store_box_layout<Config, kWarpRows>());
    Tensor g_box = local_tile(domain_offset(make_coord(static_cast<int>(row), static_cast<int>(column)), m),
                              make_shape(Int<kWarpRows>{}, Int<Geometry::kRoundColumns>{}), make_coord(0, 0));
    auto cta = tma.get_slice(Int<0>{});
    copy(tma, cta.partition_S(s_box), cta.partition_D(g_box));
  };
  PipelineState read;
  PipelineState release;
  int slot = 0;
  for (int tile_number = static_cast<int>(blockIdx.x); tile_number < tiles;
       tile_number += static_cast<int>(gridDim.x), slot = (slot + 1) % kTileSlots) {
    // The tile's coordinates and what depends on them, looked up once the first stage has landed
    // and its wgmma is issued (the k loop's hook after k tile 0), or before the loop without k
    // tiles. The lookups' loads complete under the wgmma; their values are used by the epilogue.
    VarlenMTile t;
    // This thread's destination rows of C (its passes'), where C may be scattered: the fused
    // SwiGLU epilogues write C in the grouped order (their shape checks), and keep no registers
    // for it.
    constexpr bool kRowLookup = !kGlu && !kGluBackward;
    std::int64_t c_rows[kRowLookup ? kPasses : 1];
    // kGluBackward: the tile's routing weights g, row 16 w + l by lane l < 16 of consumer warp w,
    // into half (tile parity) of the unused bias tile (the epilogue's barriers order the write
    // before every read; the other half keeps the last tile's for a thread still reading them).
    // In shared memory, not registers: the consumers have none to spare beside the accumulators.
    [[maybe_unused]] float* const g_tile = bias_tile + (tile_number / static_cast<int>(gridDim.x)) % 2 * kBM;
    // (kGluBackward keeps it before the loop, from its own lookup: in the hook, its gate loads
    // and H prefetches spill beside the accumulators.)
    // (p.tile_slots false, to measure: the consumers look the tile up before the loop as well.)
    const bool before_loop = kGluBackward || !p.tile_slots;
    auto tile_prologue = [&] {
      t = k_tiles > 0 && !before_loop ? tile_slots[slot] : tile_at(tile_number);
      if constexpr (kRowLookup) {
        CUTE_UNROLL
        for (int j = 0; j < kPasses; ++j) {
          const std::int64_t i = t.row0 + row_first + j * row_stride;
          c_rows[j] = p.c_index && i < t.row_end ? p.c_index[i] : i;
        }
      }
      if constexpr (kGluBackward) {
        static_assert(2 * kBM <= kBN && Ws::kConsumers / 32 * 16 == kBM, "two tiles' weights fit the bias tile");
        const int lane = static_cast<int>(threadIdx.x) % 32;
        const int r = warp * 16 + lane;
        const GluBackwardEpilogue& gb = p.glu_backward;
        if (lane < 16 && t.row0 + r < t.row_end) {
          g_tile[r] = load_float(gb.gates.ptr, gb.gates.dtype, flat_offset(gb.gates, gb.gate_index[t.row0 + r]));
        }
        // The tile's rows of H (128-byte lines: a round's 64 columns of one half of a row) into L2
        // while the k loop runs, 4 lines a thread, so the epilogue's loads wait for L2, not DRAM.
        const T* const h_tile = static_cast<const T*>(gb.hidden) + t.row0 * gb.ld_hidden + t.n0;
        CUTE_UNROLL
        for (int m = 0; m < 2 * Geometry::kRounds * kBM / Ws::kConsumers; ++m) {
          const int line = static_cast<int>(threadIdx.x) + m * Ws::kConsumers;
          const int row = line % kBM;
          const int round = line / kBM % Geometry::kRounds;
          const int half = line / kBM / Geometry::kRounds;
          if (t.row0 + row < t.row_end) {
            const T* address = h_tile + row * gb.ld_hidden + half * p.n + round * Geometry::kRoundColumns;
            asm volatile("prefetch.global.L2 [%0];" ::"l"(address));
          }
        }
      }
    };
    if (k_tiles == 0 || before_loop) tile_prologue();
    clear(acc);
    ws_consumer_k_loop<!kRowsTma>(pipeline, read, release, k_tiles, mma, tCrA, tCrB, acc, [&](int k) {
      if (!before_loop && k == 0) tile_prologue();
    });
    if (k_tiles > 0) {
      pipeline.consumer_release(release);
      ++release;
    }

    // The epilogue: bias (read while staging: block-wide, every thread has staged the last tile's
    // values once the barrier of its last round has passed; per warp, a barrier first), then the
    // rounds.
    const int rows = static_cast<int>(t.row_end - t.row0);
    const int cols = static_cast<int>(min(static_cast<std::int64_t>(kBN), p.n - t.n0));
    // Tile column c's column of C: t.n0 + c, or (kGlu) t.n0 / 2 + c in the first half for
    // c < BN/2 and its gate partner's, h further on, for the rest.
    auto c_column = [&](int c) -> std::int64_t {
      if constexpr (kGlu) {
        return t.n0 / 2 + c + (c < kBN / 2 ? 0 : p.n / 2 - kBN / 2);
      } else {
        return t.n0 + c;
      }
    };
    if (p.bias) {
      if (p.warp_stores) Barrier::sync();
      const T* bias = static_cast<const T*>(p.bias) + t.e * p.bias_expert_stride;
      for (int c = static_cast<int>(threadIdx.x); c < kBN; c += Ws::kConsumers) {
        bias_tile[c] = c < cols ? to_float(bias[c_column(c) * p.bias_stride_n]) : 0.0f;
      }
      Barrier::sync();
    }
    // A staged round (tile columns [column0, column0 + 64), those below `limit`) out: this
    // thread's pass j (tile row r) to row_start(j, r) + tile column, in 16-byte chunks where `wide`.
    auto write_round = [&](const T* buffer, int column0, int limit, bool wide, auto&& row_start) {
      const int c = column0 + chunk;
      if (c >= limit) return;
      CUTE_UNROLL
      for (int j = 0; j < kPasses; ++j) {
        const int r = row_first + j * row_stride;
        if (r >= rows) break;
        T* dst = row_start(j, r) + c;
        const T* src = buffer + swizzled_offset<Geometry::kRoundColumns, Config::kVec>(r - row_base, c - column0);
        if (wide && c + Config::kVec <= limit) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
          for (int q = 0; q < Config::kVec && c + q < limit; ++q) dst[q] = src[q];
        }
      }
    };
    T* const c_base = static_cast<T*>(p.c);
    if constexpr (kGluBackward) {
      static_assert(Config::kVec == 8 && Geometry::kRoundColumns / Config::kVec == 8,
                    "a row's chunks of a round are 8 consecutive lanes");
      using Vec = cute::uint128_t;
      const GluBackwardEpilogue& gb = p.glu_backward;
      const T* const h_base = static_cast<const T*>(gb.hidden);
      T* const dh_base = static_cast<T*>(gb.d_hidden);
      float dot[kPasses];
      CUTE_UNROLL
      for (int j = 0; j < kPasses; ++j) dot[j] = 0.0f;
      for_each(make_int_sequence<Geometry::kRounds>{}, [&](auto round_constant) {
        constexpr int kRound = decltype(round_constant)::value;
        constexpr int kColumn0 = kRound * Geometry::kRoundColumns;
        T* buffer = round_buffer(kRound);
        const std::int64_t column = t.n0 + kColumn0 + chunk;  // of C and of H's first half
        StagedEpilogue<Config>::template write_accumulator_range<kRound * kRoundValues, (kRound + 1) * kRoundValues>(
            buffer, acc, coord, nullptr, [&](int r, int c) {
              return swizzled_offset<Geometry::kRoundColumns, Config::kVec>(r - row_base, c - kColumn0);
            });
        round_barrier();
        // The passes in groups of kGroup: their H chunks loaded together (2 x 16 bytes a pass),
        // then computed. All four of a round at once (kGluBackwardLoads, step 50): the epilogue
        // waits on these loads, and twice the bytes in flight halve its waits.
        constexpr int kGroup = kGluBackwardLoads;
        Vec first[kGroup], gate[kGroup];
        CUTE_UNROLL
        for (int j = 0; j < kPasses; ++j) {
          const int r = row_first + j * row_stride;
          if (j % kGroup == 0) {
            CUTE_UNROLL
            for (int u = 0; u < kGroup; ++u) {
              const int ru = r + u * row_stride;
              if (ru < rows) {
                const T* h_row = h_base + (t.row0 + ru) * gb.ld_hidden + column;
                first[u] = *reinterpret_cast<const Vec*>(h_row);
                gate[u] = *reinterpret_cast<const Vec*>(h_row + p.n);
              }
            }
          }
          if (r >= rows) continue;
          const Vec staged =
              *reinterpret_cast<const Vec*>(buffer + swizzled_offset<Geometry::kRoundColumns, Config::kVec>(r - row_base, chunk));
          const T* d_a = reinterpret_cast<const T*>(&staged);
          const T* x = reinterpret_cast<const T*>(&first[j % kGroup]);
          const T* z = reinterpret_cast<const T*>(&gate[j % kGroup]);
          const float g_row = g_tile[r];
          Vec d_first, d_gate, scaled;
          T* out_first = reinterpret_cast<T*>(&d_first);
          T* out_gate = reinterpret_cast<T*>(&d_gate);
          T* out_a = reinterpret_cast<T*>(&scaled);
          CUTE_UNROLL
          for (int q = 0; q < Config::kVec; ++q) {
            const ActivationAt f = fast_silu_at(to_float(z[q]));
            const float xq = to_float(x[q]);
            const float a = to_float(T(f.value * xq));
            const float g = to_float(d_a[q]);
            const float dq = g * g_row;
            out_first[q] = T(dq * f.value);
            out_gate[q] = T(dq * xq * f.grad);
            out_a[q] = T(a * g_row);
            dot[j] += g * a;
          }
          const std::int64_t i = t.row0 + r;
          if (dh_base) {
            T* dh_row = dh_base + i * gb.ld_d_hidden + column;
            *reinterpret_cast<Vec*>(dh_row) = d_first;
            *reinterpret_cast<Vec*>(dh_row + p.n) = d_gate;
          }
          if (gb.c_out) *reinterpret_cast<Vec*>(c_base + i * p.ldc + column) = scaled;
        }
      });
      if (gb.d_gates_partial) {
        const int column_tiles_of_c = static_cast<int>(p.n / kBN);
        CUTE_UNROLL
        for (int j = 0; j < kPasses; ++j) {
          float v = dot[j];
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          v += __shfl_xor_sync(0xffffffffu, v, 4);
          const int r = row_first + j * row_stride;
          if (chunk == 0 && r < rows) {
            gb.d_gates_partial[(t.row0 + r) * column_tiles_of_c + t.n0 / kBN] = v;
          }
        }
      }
      continue;
    }
    const bool wide = reinterpret_cast<std::uintptr_t>(c_base + t.n0) % 16 == 0 && p.ldc % Config::kVec == 0;
    // p.tma_stores: whether this warp's rows all belong to the tile (its boxes go by TMA), and
    // before a round's staging writes, the wait for the store that last read its buffer.
    const bool warp_box = p.tma_stores && row_base + kWarpRows <= rows;
    auto before_staging = [&] {
      if (p.tma_stores) {
        if (lane == 0) tma_store_wait<1>();
        __syncwarp();
      }
    };
    // After a round's staging writes: the box by TMA from lane 0 (one bulk group per round, empty
    // when the warp stores by its threads), or the threads' stores.
    auto store_round = [&](const StoreTma& tma, std::int64_t columns, const T* buffer, std::int64_t column,
                           bool inside, auto&& by_threads) {
      if (warp_box) {
        tma_store_fence();  // the staging writes, visible to the TMA unit (async proxy)
        __syncwarp();
        if (lane == 0) {
          if (inside) store_box(tma, columns, buffer, t.row0 + row_base, column);
          tma_store_arrive();
        }
      } else {
        round_barrier();
        by_threads();
        if (p.tma_stores && lane == 0) tma_store_arrive();
      }
    };
    for_each(make_int_sequence<Geometry::kRounds>{}, [&](auto round_constant) {
      constexpr int kRound = decltype(round_constant)::value;
      constexpr int kColumn0 = kRound * Geometry::kRoundColumns;
      T* buffer = round_buffer(kRound);
      before_staging();
      auto place = [&](int r, int c) {
        return swizzled_offset<Geometry::kRoundColumns, Config::kVec>(r - row_base, c - kColumn0);
      };
      if (p.bias) {
        StagedEpilogue<Config>::template write_accumulator_range<kRound * kRoundValues, (kRound + 1) * kRoundValues>(
            buffer, acc, coord, [&](int c) { return bias_tile[c]; }, place);
      } else {
        StagedEpilogue<Config>::template write_accumulator_range<kRound * kRoundValues, (kRound + 1) * kRoundValues>(
            buffer, acc, coord, nullptr, place);
      }
      // A round's columns stay in one half: one shift from tile column to C's column.
      const std::int64_t shift = c_column(kColumn0) - kColumn0;
      store_round(c_store, p.n, buffer, c_column(kColumn0), kColumn0 < cols, [&] {
        write_round(buffer, kColumn0, cols, wide, [&](int j, int r) {
          if constexpr (kRowLookup) {
            return c_base + c_rows[j] * p.ldc + shift;
          } else {
            return c_base + (t.row0 + r) * p.ldc + shift;
          }
        });
      });
    });
    if constexpr (kGlu) {
      // Two more rounds: A's columns t.n0 / 2 + [0, BN/2) from the first-half values [0, V/2) and
      // their gate partners V/2 on, each rounded to T first as C holds it.
      T* const a_base = static_cast<T*>(p.glu_a) + t.n0 / 2;
      const bool wide_a = reinterpret_cast<std::uintptr_t>(a_base) % 16 == 0 && p.glu_lda % Config::kVec == 0;
      for_each(make_int_sequence<Geometry::kRounds / 2>{}, [&](auto round_constant) {
        constexpr int kRound = Geometry::kRounds + decltype(round_constant)::value;
        constexpr int kColumn0 = decltype(round_constant)::value * Geometry::kRoundColumns;
        constexpr int kFirst = decltype(round_constant)::value * kRoundValues;
        T* buffer = round_buffer(kRound);
        before_staging();
        auto place = [&](int r, int c) {
          return swizzled_offset<Geometry::kRoundColumns, Config::kVec>(r - row_base, c - kColumn0);
        };
        auto glu = [&](auto&& rounded) {
          return [&](int v, int c) {
            const float first = rounded(v, c);
            const float gate = rounded(v + kValues / 2, c + kBN / 2);
            return T(fast_silu_at(gate).value * first);
          };
        };
        if (p.bias) {
          StagedEpilogue<Config>::template write_value_range<kFirst, kFirst + kRoundValues>(
              buffer, coord, place, glu([&](int v, int c) { return to_float(T(acc(v) + bias_tile[c])); }));
        } else {
          StagedEpilogue<Config>::template write_value_range<kFirst, kFirst + kRoundValues>(
              buffer, coord, place, glu([&](int v, int) { return to_float(T(acc(v))); }));
        }
        store_round(a_store, p.n / 2, buffer, t.n0 / 2 + kColumn0, true, [&] {
          write_round(buffer, kColumn0, kBN / 2, wide_a, [&](int, int r) { return a_base + (t.row0 + r) * p.glu_lda; });
        });
      });
    }
  }
  if (p.tma_stores && lane == 0) tma_store_wait<0>();  // the staging stays until its stores have read it
#endif
}

// ---------------------------------------------------------------------------------------------
// The persistent form of the TMA varlen-M kernel: one block per SM walks the tile schedule as
// sm90_persistent_varlen_m_gemm_kernel does, starting each next tile's copies (A's rows by
// cp.async, the weight tile by TMA) before it writes the finished one. Meant for short-K GEMMs
// (qwen3's down projection: 12 k tiles), where each tile's start and end are a large share.
template <class Config, bool kBKMajor, class WeightTma>
__global__ void __launch_bounds__(Config::kThreads, 1)
    sm90_persistent_tma_varlen_m_gemm_kernel(VarlenMGemm p, const int* __restrict__ tile_prefix,
                                             CUTE_GRID_CONSTANT WeightTma const weight_tma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using T = typename Config::Element;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;
  constexpr int kBK = Config::kBK;
  constexpr int kStages = Config::kStages;
  constexpr std::uint32_t kWeightTileBytes = kBN * kBK * sizeof(T);

  const int row_tiles = p.num_experts ? tile_prefix[p.num_experts - 1] : 0;
  const int column_tiles = static_cast<int>((p.n + kBN - 1) / kBN);
  const int tiles = row_tiles * column_tiles;
  if (static_cast<int>(blockIdx.x) >= tiles) return;
  const int k_tiles = static_cast<int>((p.k + kBK - 1) / kBK);

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  constexpr auto layout_a = Config::template copy_layout<true, kBM>();
  constexpr auto layout_b = Config::template copy_layout<kBKMajor, kBN>();
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(layout_a);
  StageBarriers<kStages> barriers(smem_b + cosize(layout_b));

  VarlenMCopies<Config, kBKMajor, true> copies;
  Tensor s_b = make_tensor(make_smem_ptr(smem_b), Config::template gmma_layout<kBKMajor, kBN>());  // (BN,BK,STAGES)
  auto cta_tma = weight_tma.get_slice(Int<0>{});
  Tensor tBsB = cta_tma.partition_D(s_b);  // (TMA,TMA_N,TMA_K,STAGES)
  int expert = 0;  // the tile being loaded: its expert and column tile
  int column_tile = 0;

  auto load_a = [&](int stage, int k_tile) { copies.load_a(p, smem_a, stage, k_tile); };
  auto load_b = [&](int stage, int k_tile) {
    if (threadIdx.x == 0) {
      Tensor g_b = weight_tiles<Config>(weight_tma, p, expert, column_tile);  // (BN,BK,k)
      Tensor tBgB = cta_tma.partition_S(g_b);              // (TMA,TMA_N,TMA_K,k)
      copy(weight_tma.with(barriers.expect(stage, kWeightTileBytes)), tBgB(_, _, _, k_tile), tBsB(_, _, _, stage));
    }
  };
  auto wait_b = [&](int stage) { barriers.wait(stage); };
  auto start = [&](int tile_number) {
    const RasterTile r = raster_tile(tile_number, row_tiles, column_tiles, p.raster_group_rows);
    const VarlenMTile t = varlen_m_tile<kBM, kBN>(p, tile_prefix, r.row, r.column);
    copies.locate_rows(p, t.row0, t.row_end);
    expert = t.e;
    column_tile = r.column;
    Config::prologue(k_tiles, load_a, load_b);
    return t;
  };

  typename Config::template TiledMma<true, kBKMajor> mma;
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kBM>{}, Int<kBN>{}));
  Tensor coord = mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
  static_assert(StagedEpilogue<Config>::template clear_of_prologue<kBKMajor>(),
                "the next tile's prologue must not overwrite the staged epilogue");
  persistent_walk(
      tiles, start,
      [&] {
        clear(acc);
        Config::template steady<true, kBKMajor>(smem_a, smem_b, k_tiles, load_a, load_b, acc, wait_b);
      },
      [&](const VarlenMTile& done) {
        store_varlen_m_tile<Config, kBKMajor>(p, acc, coord, smem_raw, done.e, done.row0, done.row_end, done.n0);
      });
#endif
}

// The caller checked chunks_aligned and weight_tma_possible (gemm.hpp).

template <class T, bool kBKMajor>
void launch_sm90_persistent_tma_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count,
                                              cudaStream_t stream) {
  using Config = Sm90TmaConfig<T>;
  const auto weight_tma = make_weight_tma<Config, kBKMajor>(g);
  auto kernel = sm90_persistent_tma_varlen_m_gemm_kernel<Config, kBKMajor, std::remove_const_t<decltype(weight_tma)>>;
  constexpr int smem = gemm_smem_bytes<Config, true, kBKMajor>() + StageBarriers<Config::kStages>::kBytes;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "varlen-M GEMM: shared memory size");
  const std::int64_t max_tiles = (static_cast<std::int64_t>(ceil_div(g.rows, Config::kBM)) + g.num_experts) *
                                 ceil_div(g.n, Config::kBN);
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(sm_count, max_tiles));
  kernel<<<blocks, Config::kThreads, smem, stream>>>(g, tile_prefix, weight_tma);
  check_launch("varlen-M GEMM");
}

// kRowsTma: A's rows by TMA too (the caller checked rows_tma_possible).
template <class T, bool kBKMajor, bool kRowsTma>
void launch_sm90_tma_varlen_m_gemm_with(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream) {
  using Config = Sm90TmaConfig<T>;
  const auto weight_tma = make_weight_tma<Config, kBKMajor>(g);
  const auto row_tma = [&] {
    if constexpr (kRowsTma) {
      return make_rows_tma<Config>(g);
    } else {
      return RowsByThreads{};
    }
  }();
  auto kernel = sm90_tma_varlen_m_gemm_kernel<Config, kBKMajor, std::remove_const_t<decltype(weight_tma)>,
                                              std::remove_const_t<decltype(row_tma)>>;
  constexpr int smem = gemm_smem_bytes<Config, true, kBKMajor>() + StageBarriers<Config::kStages>::kBytes;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "varlen-M GEMM: shared memory size");
  const dim3 grid = varlen_m_grid<Config>(g);
  kernel<<<grid, Config::kThreads, smem, stream>>>(g, tile_prefix, weight_tma, row_tma);
  check_launch("varlen-M GEMM");
}

template <class T, bool kBKMajor>
void launch_sm90_tma_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream) {
  launch_sm90_tma_varlen_m_gemm_with<T, kBKMajor, false>(g, tile_prefix, stream);
}

template <class T, bool kBKMajor, bool kRowsTma>
void launch_sm90_ws_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream) {
  using Config = Sm90TmaConfig<T>;
  using Ws = Sm90WsShape<Config, kRowsTma ? 40 : 56>;
  const auto weight_tma = make_weight_tma<Config, kBKMajor>(g);
  const auto row_tma = [&] {
    if constexpr (kRowsTma) {
      return make_rows_tma<Config>(g);
    } else {
      return RowsByThreads{};
    }
  }();
  auto kernel = sm90_ws_tma_varlen_m_gemm_kernel<Config, kBKMajor, std::remove_const_t<decltype(weight_tma)>,
                                                 std::remove_const_t<decltype(row_tma)>>;
  constexpr int smem = gemm_smem_bytes<Config, true, kBKMajor>() +
                       static_cast<int>(sizeof(typename Ws::Pipeline::SharedStorage));
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "varlen-M GEMM: shared memory size");
  const dim3 grid = varlen_m_grid<Config>(g);
  kernel<<<grid, Ws::kThreads, smem, stream>>>(g, tile_prefix, weight_tma, row_tma);
  check_launch("varlen-M GEMM");
}

// A (rows, columns) output in the grouped order, row stride ld, and its TMA store of one consumer
// warp's 16 x 64 box of a round (the per-warp staging's swizzle, varlen_k_store_box_layout's).
template <class Config>
auto make_varlen_m_store_tma(void* ptr, std::int64_t rows, std::int64_t columns, std::int64_t ld) {
  using namespace cute;
  using T = typename Config::Element;
  Tensor c = make_tensor(make_gmem_ptr(static_cast<T*>(ptr)),
                         make_layout(make_shape(static_cast<int>(rows), static_cast<int>(columns)),
                                     make_stride(ld, Int<1>{})));
  return make_tma_copy(SM90_TMA_STORE{}, c, varlen_k_store_box_layout<Config, 16>());
}

// The persistent form (the caller checked the same as for launch_sm90_ws_varlen_m_gemm; kGlu:
// also glu_epilogue_shape).
template <class T, bool kBKMajor, bool kRowsTma, bool kGlu, bool kGluBackward = false, int kGluBackwardLoads = 4>
void launch_sm90_ws_persistent_varlen_m_gemm_with(const VarlenMGemm& given, const int* tile_prefix, int sm_count,
                                                  cudaStream_t stream) {
  using Config = Sm90TmaConfig<T>;
  using Ws = Sm90WsShape<Config, kRowsTma ? 40 : 56>;
  VarlenMGemm g = given;
  g.tma_stores = g.tma_stores && g.warp_stores && !kGluBackward && varlen_m_tma_stores_possible(g, kGlu, sizeof(T));
  // Where the outputs cannot go by TMA, the descriptors describe a 16 x 64 piece of the weights
  // (16-byte aligned: the weight tiles come by TMA) that is never stored to.
  auto store_tma = [&](void* ptr, std::int64_t columns, std::int64_t ld) {
    return g.tma_stores ? make_varlen_m_store_tma<Config>(ptr, g.rows, columns, ld)
                        : make_varlen_m_store_tma<Config>(const_cast<void*>(g.b), 16, 64, 64);
  };
  const auto c_store = store_tma(g.c, g.n, g.ldc);
  const auto a_store = kGlu ? store_tma(g.glu_a, g.n / 2, g.glu_lda) : c_store;
  const auto weight_tma = make_weight_tma<Config, kBKMajor, kGlu ? Config::kBN / 2 : Config::kBN>(g);
  const auto row_tma = [&] {
    if constexpr (kRowsTma) {
      return make_rows_tma<Config>(g);
    } else {
      return RowsByThreads{};
    }
  }();
  auto kernel = sm90_ws_persistent_varlen_m_gemm_kernel<Config, kBKMajor, std::remove_const_t<decltype(weight_tma)>,
                                                        std::remove_const_t<decltype(row_tma)>, kGlu, kGluBackward,
                                                        std::remove_const_t<decltype(c_store)>, kGluBackwardLoads>;
  constexpr int smem =
      Sm90WsPersistentVarlenM<Config>::template smem_bytes<kBKMajor, typename Ws::Pipeline>();
  // The static part (bias tile, tile slots) as the compiler places it: rounded up to 1024 bytes,
  // so that the dynamic part stays 1024-byte aligned.
  static_assert(smem + (Config::kBN * sizeof(float) + 8 * sizeof(VarlenMTile) + 1023) / 1024 * 1024 <= 227 * 1024,
                "the stages, the staging, the bias tile and the tile slots (static) fit in shared memory");
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "varlen-M GEMM: shared memory size");
  const std::int64_t max_tiles = (static_cast<std::int64_t>(ceil_div(g.rows, Config::kBM)) + g.num_experts) *
                                 ceil_div(g.n, Config::kBN);
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(sm_count, max_tiles));
  kernel<<<blocks, Ws::kThreads, smem, stream>>>(g, tile_prefix, weight_tma, row_tma, c_store, a_store);
  check_launch("varlen-M GEMM");
}

template <class T, bool kBKMajor, bool kRowsTma>
void launch_sm90_ws_persistent_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count,
                                             cudaStream_t stream) {
  launch_sm90_ws_persistent_varlen_m_gemm_with<T, kBKMajor, kRowsTma, false>(g, tile_prefix, sm_count, stream);
}

template <class T, bool kBKMajor>
void launch_sm90_ws_persistent_glu_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count,
                                                 cudaStream_t stream) {
  launch_sm90_ws_persistent_varlen_m_gemm_with<T, kBKMajor, false, true>(g, tile_prefix, sm_count, stream);
}

template <class T, bool kBKMajor>
void launch_sm90_ws_persistent_glu_backward_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count,
                                                          cudaStream_t stream) {
  static_assert(Sm90TmaConfig<T>::kBN == kGluBackwardTileColumns, "d_gates_partial has one slot per column tile");
  if (g.bias != nullptr || g.n % kGluBackwardTileColumns != 0 || g.c_index != nullptr) {
    // The kernel keeps the routing weights where a bias tile would go and writes whole tiles of
    // C in the grouped order (glu_backward_epilogue_shape, which run_varlen_m_gemm checked).
    throw InvalidArgument("grouped GEMM: the SwiGLU backward epilogue takes no bias, n a multiple of " +
                          std::to_string(kGluBackwardTileColumns) + " (got " + std::to_string(g.n) +
                          ") and C in the grouped order");
  }
  if (g.glu_backward.loads == 2) {
    launch_sm90_ws_persistent_varlen_m_gemm_with<T, kBKMajor, false, false, true, 2>(g, tile_prefix, sm_count, stream);
  } else {
    launch_sm90_ws_persistent_varlen_m_gemm_with<T, kBKMajor, false, false, true, 4>(g, tile_prefix, sm_count, stream);
  }
}

template <class T, bool kBKMajor>
void launch_sm90_ws_tma_rows_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream) {
  launch_sm90_ws_varlen_m_gemm<T, kBKMajor, true>(g, tile_prefix, stream);
}

template <class T, bool kBKMajor>
void launch_sm90_ws_gather_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream) {
  launch_sm90_ws_varlen_m_gemm<T, kBKMajor, false>(g, tile_prefix, stream);
}

template <class T, bool kBKMajor>
void launch_sm90_tma_rows_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream) {
  launch_sm90_tma_varlen_m_gemm_with<T, kBKMajor, true>(g, tile_prefix, stream);
}

}  // namespace scattermoe::cuda
