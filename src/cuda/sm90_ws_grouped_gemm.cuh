// Persistent, warp-specialised wgmma grouped GEMMs (sm_90a), written with CuTe and CUTLASS's
// shared-memory pipeline.
//
// A block of three warpgroups stays on its SM and walks the tiles blockIdx.x, + gridDim.x, ...
// of the device-built schedule. Warpgroup 0 (the producer, few registers) gathers operand rows
// with cp.async into a ring of kStages GMMA-swizzled stages; each stage's "full" barrier
// completes when its copies have landed (cp.async.mbarrier.arrive). Warpgroups 1 and 2 (the
// consumers, many registers) wait on it, issue wgmma from shared memory (each 64 rows of the
// 128 x 256 tile), release the stage once their wgmma on it has retired, and write their tile
// from registers. The producer runs ahead into the next tile while the consumers finish the
// last one, so a tile's prologue and the copies' latency hide behind the previous tile, and
// neither the row lookups nor the address arithmetic of a gather ever delay a wgmma.
//
// Compiled for sm_90a only; on other targets the kernels are empty and never launched.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "cuda/sm90_grouped_gemm.cuh"

namespace scattermoe::cuda {

template <class T>
struct Sm90WsConfig {
  using Element = T;
  using Tile = Sm90GemmConfig<T, 128, 256, 4>;  // layouts and the tiled wgmma of the consumers
  static constexpr int kBM = Tile::kBM;
  static constexpr int kBN = Tile::kBN;
  static constexpr int kBK = Tile::kBK;
  static constexpr int kStages = Tile::kStages;
  static constexpr int kVec = 8;
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  // setmaxnreg moves registers between the block's own warps: the block is launched with 168
  // per thread (65536 / 384, rounded down to 8): 128 x 88 + 256 x 200 <= 384 x 168 (the
  // producers' gather addresses fit in 88 without spilling).
  static constexpr int kProducerRegisters = 88;
  static constexpr int kConsumerRegisters = 200;
  static_assert(kProducerThreads * kProducerRegisters + kConsumerThreads * kConsumerRegisters <=
                    kThreads * (65536 / kThreads / 8 * 8),
                "setmaxnreg can only redistribute the registers the block was launched with");
  using Pipeline = cutlass::PipelineAsync<kStages>;

  // The copy distribution of TileChunks over the producer warpgroup.
  struct Loader {
    using Element = T;
    static constexpr int kVec = 8;
    static constexpr int kBK = 64;
    static constexpr int kThreads = kProducerThreads;
  };

  static constexpr int kTileBytes =
      static_cast<int>((cute::cosize(Tile::template copy_layout<true, kBM>()) +
                        cute::cosize(Tile::template copy_layout<true, kBN>())) * sizeof(T));
  // Operand stages, then the pipeline's barriers.
  static constexpr int kSmemBytes = kTileBytes + static_cast<int>(sizeof(typename Pipeline::SharedStorage));

  // The block's pipeline over the barriers after the operand stages. Every thread calls it; it
  // returns once the barriers are initialised, before anyone waits on them.
  static __device__ __forceinline__ Pipeline make_pipeline(unsigned char* smem) {
    typename Pipeline::Params params;
    params.role = threadIdx.x < kProducerThreads ? Pipeline::ThreadCategory::Producer
                                                 : Pipeline::ThreadCategory::Consumer;
    params.producer_arv_count = kProducerThreads;
    params.consumer_arv_count = kConsumerThreads;
    Pipeline pipeline(*reinterpret_cast<typename Pipeline::SharedStorage*>(smem + kTileBytes), params);
    __syncthreads();
    return pipeline;
  }
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SCATTERMOE_SM90_WS_BODY 1
#endif

// The consumers' half of the pipeline for one tile: k_tiles stages in order, each released once
// the wgmma that read it has retired (one batch stays in flight).
template <class Config, bool kAKMajor, bool kBKMajor, class Pipeline, class State, class Accum>
__device__ __forceinline__ void ws_consume_tile(Pipeline& pipeline, State& read, typename Config::Element* smem_a,
                                                typename Config::Element* smem_b, int k_tiles, Accum& acc) {
#ifdef SCATTERMOE_SM90_WS_BODY
  using namespace cute;
  using Tile = typename Config::Tile;
  Tensor sA = make_tensor(make_smem_ptr(smem_a), Tile::template gmma_layout<kAKMajor, Config::kBM>());
  Tensor sB = make_tensor(make_smem_ptr(smem_b), Tile::template gmma_layout<kBKMajor, Config::kBN>());
  typename Tile::template TiledMma<kAKMajor, kBKMajor> mma;
  ThrMMA thr_mma = mma.get_slice(threadIdx.x - Config::kProducerThreads);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));

  clear(acc);
  State release = read;
  for (int t = 0; t < k_tiles; ++t) {
    pipeline.consumer_wait(read);
    // The stage was written by cp.async (the generic proxy) and wgmma reads it through the async
    // proxy: order the two, as the multistage mainloop does before its barrier.
    cutlass::arch::fence_view_async_shared();
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tCrA(_, _, _, read.index()), tCrB(_, _, _, read.index()), acc);
    warpgroup_commit_batch();
    warpgroup_wait<1>();
    warpgroup_fence_operand(acc);
    if (t > 0) {
      pipeline.consumer_release(release);
      ++release;
    }
    ++read;
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  if (k_tiles > 0) pipeline.consumer_release(release);
#endif
}

// ---------------------------------------------------------------------------------------------
// varlen-M: the schedule is (row tile, column tile) over tile_prefix[E-1] row tiles, in groups of
// raster_group_rows row tiles that walk all column tiles together (L2 reuse of A rows and B).
template <class Config, bool kBKMajor>
__global__ void __launch_bounds__(Config::kThreads, 1)
    sm90_ws_varlen_m_gemm_kernel(VarlenMGemm p, const int* __restrict__ tile_prefix) {
#ifdef SCATTERMOE_SM90_WS_BODY
  using namespace cute;
  using T = typename Config::Element;
  using Tile = typename Config::Tile;
  using Pipeline = typename Config::Pipeline;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;
  constexpr int kBK = Config::kBK;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  constexpr auto layout_a = Tile::template copy_layout<true, kBM>();
  constexpr auto layout_b = Tile::template copy_layout<kBKMajor, kBN>();
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(layout_a);
  Pipeline pipeline = Config::make_pipeline(smem_raw);
  const bool producer = threadIdx.x < Config::kProducerThreads;

  const int row_tiles = p.num_experts ? tile_prefix[p.num_experts - 1] : 0;
  const int column_tiles = static_cast<int>((p.n + kBN - 1) / kBN);
  const int tiles = row_tiles * column_tiles;
  const int k_tiles = static_cast<int>((p.k + kBK - 1) / kBK);

  if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Config::kProducerRegisters>();
    using Loader = typename Config::Loader;
    using ChunksA = TileChunks<Loader, true, kBM>;
    using ChunksB = TileChunks<Loader, kBKMajor, kBN>;
    const ChunksA chunks_a(layout_a);
    const ChunksB chunks_b(layout_b);
    const T* a_base = static_cast<const T*>(p.a.ptr);
    auto write = cutlass::make_producer_start_state<Pipeline>();
    for (int linear = static_cast<int>(blockIdx.x); linear < tiles; linear += static_cast<int>(gridDim.x)) {
      const RasterTile r = raster_tile(linear, row_tiles, column_tiles, p.raster_group_rows);
      const VarlenMTile t = varlen_m_tile<kBM, kBN>(p, tile_prefix, r.row, r.column);
      const T* a_rows[ChunksA::kCount];
      CUTE_UNROLL
      for (int j = 0; j < ChunksA::kCount; ++j) {
        const std::int64_t i = t.row0 + ChunksA::line(j);
        a_rows[j] = i < t.row_end ? a_base + p.a.row(i) * p.a.ld + ChunksA::off() : nullptr;
      }
      const T* b_base = static_cast<const T*>(p.b) + t.e * p.b_expert_stride;
      const int b_valid = kBKMajor ? 0 : valid_elements<Config::kVec>(p.n, t.n0 + ChunksB::off());
      for (int kt = 0; kt < k_tiles; ++kt) {
        pipeline.producer_acquire(write);
        const int stage = static_cast<int>(write.index());
        const std::int64_t k0 = static_cast<std::int64_t>(kt) * kBK;
        const int a_valid = valid_elements<Config::kVec>(p.k, k0 + ChunksA::off());
        CUTE_UNROLL
        for (int j = 0; j < ChunksA::kCount; ++j) {
          chunks_a.template copy<true>(smem_a, stage, j, a_rows[j] + k0, a_rows[j] ? a_valid : 0, a_base);
        }
        CUTE_UNROLL
        for (int j = 0; j < ChunksB::kCount; ++j) {
          if constexpr (kBKMajor) {
            const std::int64_t n = t.n0 + ChunksB::line(j);
            const int valid = n < p.n ? valid_elements<Config::kVec>(p.k, k0 + ChunksB::off()) : 0;
            chunks_b.template copy<true>(smem_b, stage, j, b_base + n * p.b_stride_n + k0 + ChunksB::off(),
                                         valid, b_base);
          } else {
            const std::int64_t k = k0 + ChunksB::line(j);
            chunks_b.template copy<true>(smem_b, stage, j, b_base + k * p.b_stride_k + t.n0 + ChunksB::off(),
                                         k < p.k ? b_valid : 0, b_base);
          }
        }
        pipeline.producer_commit(write, cutlass::arch::cpasync_barrier_arrive);
        ++write;
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Config::kConsumerRegisters>();
    typename Tile::template TiledMma<true, kBKMajor> mma;
    Tensor acc = partition_fragment_C(mma, make_shape(Int<kBM>{}, Int<kBN>{}));
    Tensor coord = mma.get_slice(threadIdx.x - Config::kProducerThreads)
                       .partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
    typename Pipeline::PipelineState read;
    for (int linear = static_cast<int>(blockIdx.x); linear < tiles; linear += static_cast<int>(gridDim.x)) {
      const RasterTile r = raster_tile(linear, row_tiles, column_tiles, p.raster_group_rows);
      const VarlenMTile t = varlen_m_tile<kBM, kBN>(p, tile_prefix, r.row, r.column);
      ws_consume_tile<Config, true, kBKMajor>(pipeline, read, smem_a, smem_b, k_tiles, acc);
      store_varlen_m_tile<T>(p, acc, coord, t.e, t.row0, t.row_end, t.n0);
    }
  }
#endif
}

template <class T, bool kBKMajor>
void launch_sm90_ws_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count, cudaStream_t stream) {
  using Config = Sm90WsConfig<T>;
  auto kernel = sm90_ws_varlen_m_gemm_kernel<Config, kBKMajor>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSmemBytes),
             "varlen-M GEMM: shared memory size");
  // Persistent: one block per SM, or fewer when there are fewer tiles than SMs at most.
  const std::int64_t max_tiles = (static_cast<std::int64_t>(ceil_div(g.rows, Config::kBM)) + g.num_experts) *
                                 ceil_div(g.n, Config::kBN);
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(sm_count, max_tiles));
  kernel<<<blocks, Config::kThreads, Config::kSmemBytes, stream>>>(g, tile_prefix);
  check_launch("varlen-M GEMM");
}

// ---------------------------------------------------------------------------------------------
// varlen-K: the schedule is (expert, M tile, N tile), grouped raster within each expert.
template <class Config>
__global__ void __launch_bounds__(Config::kThreads, 1) sm90_ws_varlen_k_gemm_kernel(VarlenKGemm p) {
#ifdef SCATTERMOE_SM90_WS_BODY
  using namespace cute;
  using T = typename Config::Element;
  using Tile = typename Config::Tile;
  using Pipeline = typename Config::Pipeline;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;
  constexpr int kBK = Config::kBK;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  constexpr auto layout_a = Tile::template copy_layout<false, kBM>();
  constexpr auto layout_b = Tile::template copy_layout<false, kBN>();
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(layout_a);
  Pipeline pipeline = Config::make_pipeline(smem_raw);
  const bool producer = threadIdx.x < Config::kProducerThreads;

  const int m_tiles = static_cast<int>((p.m + kBM - 1) / kBM);
  const int n_tiles = static_cast<int>((p.n + kBN - 1) / kBN);
  const int tiles = p.num_experts * m_tiles * n_tiles;

  if (producer) {
    cutlass::arch::warpgroup_reg_dealloc<Config::kProducerRegisters>();
    // Both operands MN-major, a line is one routed row; B's tile is kParts A-widths, each copied
    // with A's line mapping so each row index is looked up once for both operands.
    constexpr int kParts = kBN / kBM;
    using Chunks = TileChunks<typename Config::Loader, false, kBM>;
    const Chunks chunks_a(layout_a);
    Chunks chunks_b[kParts];
    CUTE_UNROLL
    for (int h = 0; h < kParts; ++h) chunks_b[h] = Chunks(layout_b, h * kBM);
    auto write = cutlass::make_producer_start_state<Pipeline>();
    for (int linear = static_cast<int>(blockIdx.x); linear < tiles; linear += static_cast<int>(gridDim.x)) {
      const VarlenKTile t = varlen_k_tile<kBM, kBN>(m_tiles, n_tiles, linear);
      const std::int64_t r0 = t.e ? p.expert_offsets[t.e - 1] : 0;
      const std::int64_t r1 = p.expert_offsets[t.e];
      const int k_tiles = static_cast<int>((r1 - r0 + kBK - 1) / kBK);
      const T* a_base = static_cast<const T*>(p.a.ptr) + t.m0 + Chunks::off();
      const T* b_base = static_cast<const T*>(p.b.ptr) + t.n0 + Chunks::off();
      const int a_valid = valid_elements<Config::kVec>(p.m, t.m0 + Chunks::off());
      int b_valid[kParts];
      CUTE_UNROLL
      for (int h = 0; h < kParts; ++h) b_valid[h] = valid_elements<Config::kVec>(p.n, t.n0 + h * kBM + Chunks::off());
      // Index entries (row numbers < 2^31) fetched one k tile ahead of their copies.
      int a_next[Chunks::kCount];
      int b_next[Chunks::kCount];
      auto fetch_entries = [&](int kt) {
        const std::int64_t k0 = r0 + static_cast<std::int64_t>(kt) * kBK;
        CUTE_UNROLL
        for (int j = 0; j < Chunks::kCount; ++j) {
          const std::int64_t r = k0 + Chunks::line(j);
          const bool inside = r < r1;
          a_next[j] = inside ? static_cast<int>(p.a.entry(r)) : -1;
          b_next[j] = inside ? static_cast<int>(p.b.entry(r)) : -1;
        }
      };
      fetch_entries(0);
      for (int kt = 0; kt < k_tiles; ++kt) {
        int a_entries[Chunks::kCount];
        int b_entries[Chunks::kCount];
        CUTE_UNROLL
        for (int j = 0; j < Chunks::kCount; ++j) {
          a_entries[j] = a_next[j];
          b_entries[j] = b_next[j];
        }
        fetch_entries(kt + 1);
        pipeline.producer_acquire(write);
        const int stage = static_cast<int>(write.index());
        CUTE_UNROLL
        for (int j = 0; j < Chunks::kCount; ++j) {
          const bool inside = a_entries[j] >= 0;
          const T* a_src = a_base + (inside ? p.a.divide(a_entries[j]) : 0) * p.a.ld;
          chunks_a.template copy<true>(smem_a, stage, j, a_src, inside ? a_valid : 0, a_base);
          const T* b_src = b_base + (inside ? p.b.divide(b_entries[j]) : 0) * p.b.ld;
          CUTE_UNROLL
          for (int h = 0; h < kParts; ++h) {
            chunks_b[h].template copy<true>(smem_b, stage, j, b_src + h * kBM, inside ? b_valid[h] : 0, b_base);
          }
        }
        pipeline.producer_commit(write, cutlass::arch::cpasync_barrier_arrive);
        ++write;
      }
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<Config::kConsumerRegisters>();
    typename Tile::template TiledMma<false, false> mma;
    Tensor acc = partition_fragment_C(mma, make_shape(Int<kBM>{}, Int<kBN>{}));
    Tensor coord = mma.get_slice(threadIdx.x - Config::kProducerThreads)
                       .partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
    typename Pipeline::PipelineState read;
    for (int linear = static_cast<int>(blockIdx.x); linear < tiles; linear += static_cast<int>(gridDim.x)) {
      const VarlenKTile t = varlen_k_tile<kBM, kBN>(m_tiles, n_tiles, linear);
      const std::int64_t r0 = t.e ? p.expert_offsets[t.e - 1] : 0;
      const int k_tiles = static_cast<int>((p.expert_offsets[t.e] - r0 + kBK - 1) / kBK);
      ws_consume_tile<Config, false, false>(pipeline, read, smem_a, smem_b, k_tiles, acc);
      store_varlen_k_tile<T>(p, acc, coord, t.e, t.m0, t.n0);
    }
  }
#endif
}

template <class T>
void launch_sm90_ws_varlen_k_gemm(const VarlenKGemm& g, int sm_count, cudaStream_t stream) {
  using Config = Sm90WsConfig<T>;
  auto kernel = sm90_ws_varlen_k_gemm_kernel<Config>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSmemBytes),
             "varlen-K GEMM: shared memory size");
  const std::int64_t tiles = static_cast<std::int64_t>(g.num_experts) * ceil_div(g.m, Config::kBM) *
                             ceil_div(g.n, Config::kBN);
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(sm_count, tiles));
  kernel<<<blocks, Config::kThreads, Config::kSmemBytes, stream>>>(g);
  check_launch("varlen-K GEMM");
}

}  // namespace scattermoe::cuda
