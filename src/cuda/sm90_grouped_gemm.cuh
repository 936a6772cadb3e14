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

#include <algorithm>
#include <limits>
#include <string>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "cuda/grouped_gemm.cuh"
#include "cuda/varlen_k_tiling.hpp"

namespace scattermoe::cuda {

// kKFirst: MN-major tiles place their 64 x 8 swizzle atoms K-first (a 64-column block is 64 x 64
// contiguous), so a TMA box covers 64 x 64 instead of one 64 x 8 atom; the cp.async kernels keep
// the MN-first order their copy layout assumes.
template <class T, int BM, int BN, int Stages, bool kKFirst = false>
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
    if constexpr (!kKMajor && kKFirst) {
      return tile_to_shape(Atom{}, make_shape(Int<kMN>{}, Int<kBK>{}, Int<kStages>{}), Step<_2, _1, _3>{});
    } else {
      return tile_to_shape(Atom{}, make_shape(Int<kMN>{}, Int<kBK>{}, Int<kStages>{}));
    }
  }

  // One stage of gmma_layout, (MN, BK): the box a TMA copy fills.
  template <bool kKMajor, int kMN>
  static constexpr auto gmma_stage_layout() {
    using namespace cute;
    using Atom = std::conditional_t<kKMajor, GMMA::Layout_K_SW128_Atom<T>, GMMA::Layout_MN_SW128_Atom<T>>;
    if constexpr (!kKMajor && kKFirst) {
      return tile_to_shape(Atom{}, make_shape(Int<kMN>{}, Int<kBK>{}), Step<_2, _1>{});
    } else {
      return tile_to_shape(Atom{}, make_shape(Int<kMN>{}, Int<kBK>{}));
    }
  }

  // The same layouts as plain element offsets, for the copies (swizzled_tile_layout: the
  // shared-memory base is 1024-byte aligned). K-first MN-major tiles place the same atoms in
  // gmma_layout's order; a 16-byte chunk is still 8 contiguous mn elements of one atom.
  template <bool kKMajor, int kMN>
  static constexpr auto copy_layout() {
    using namespace cute;
    if constexpr (!kKMajor && kKFirst) {
      auto atom = composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, Stride<_1, _64>>{});
      return tile_to_shape(atom, make_shape(Int<kMN>{}, Int<kBK>{}, Int<kStages>{}), Step<_2, _1, _3>{});
    } else {
      return swizzled_tile_layout<kKMajor, kMN, kBK, kStages>();
    }
  }

  // The pipeline's prologue: k tiles 0 .. kStages-3 in flight, one commit group each (empty past
  // the end). Every stage must be free: no wgmma of this block reads one any more.
  template <class LoadA, class LoadB>
  static __device__ __forceinline__ void prologue(int k_tiles, LoadA&& load_a, LoadB&& load_b) {
    CUTE_UNROLL
    for (int t = 0; t < kStages - 2; ++t) {
      if (t < k_tiles) {
        load_a(t, t);
        load_b(t, t);
      }
      cute::cp_async_fence();
    }
  }

  // The k loop after the prologue: acc += the tile's product. On return every wgmma and copy of
  // this thread has completed (the other warpgroups' wgmma may still run: synchronise before
  // the stages are written again).
  // wait_b(stage) returns once that stage's B tile has landed when B comes by TMA (cp.async
  // copies are waited for here); the other overload has nothing to wait for.
  template <bool kAKMajor, bool kBKMajor, class LoadA, class LoadB, class Accum>
  static __device__ __forceinline__ void steady(T* smem_a, T* smem_b, int k_tiles, LoadA&& load_a,
                                                LoadB&& load_b, Accum& acc) {
    steady<kAKMajor, kBKMajor>(smem_a, smem_b, k_tiles, load_a, load_b, acc, [](int) {});
  }

  template <bool kAKMajor, bool kBKMajor, class LoadA, class LoadB, class Accum, class WaitB>
  static __device__ __forceinline__ void steady(T* smem_a, T* smem_b, int k_tiles, LoadA&& load_a,
                                                LoadB&& load_b, Accum& acc, WaitB&& wait_b) {
    int read_stage = 0;
    int write_stage = kStages - 2;
    iterations<kAKMajor, kBKMajor>(
        smem_a, smem_b, k_tiles, read_stage, write_stage, acc, wait_b, [&](int stage, int next) {
          if (next < k_tiles) {
            load_a(stage, next);
            load_b(stage, next);
          }
        });
    cute::cp_async_wait<0>();
  }

  // The k loop's iterations over k tiles [0, k_tiles), the first read from read_stage, the first
  // copies issued into write_stage (both advanced on return, so a block may run the iterations of
  // several tiles as one pipeline). Per k tile t: wait for the stage to land (cp.async) and
  // before_barrier(stage) (a TMA wait), fence and barrier, issue the wgmma, then issue(stage,
  // t + kStages - 2) fills the stage every warpgroup has retired (one commit group follows it).
  // On return this thread's wgmma have completed; copies may still be in flight.
  template <bool kAKMajor, bool kBKMajor, class Accum, class BeforeBarrier, class Issue>
  static __device__ __forceinline__ void iterations(T* smem_a, T* smem_b, int k_tiles, int& read_stage,
                                                    int& write_stage, Accum& acc, BeforeBarrier&& before_barrier,
                                                    Issue&& issue) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    using namespace cute;
    Tensor sA = make_tensor(make_smem_ptr(smem_a), gmma_layout<kAKMajor, kBM>());  // (BM,BK,STAGES)
    Tensor sB = make_tensor(make_smem_ptr(smem_b), gmma_layout<kBKMajor, kBN>());  // (BN,BK,STAGES)
    TiledMma<kAKMajor, kBKMajor> mma;
    ThrMMA thr_mma = mma.get_slice(threadIdx.x);
    Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));  // descriptors (MMA,M,K,STAGES)
    Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));  // descriptors (MMA,N,K,STAGES)

    CUTE_NO_UNROLL
    for (int t = 0; t < k_tiles; ++t) {
      // Tile t has landed (this thread's copies); make them visible to the async proxy that
      // wgmma reads through, then to every thread.
      cp_async_wait<kStages - 3>();
      before_barrier(read_stage);
      cutlass::arch::fence_view_async_shared();
      __syncthreads();
      warpgroup_fence_operand(acc);
      warpgroup_arrive();
      gemm(mma, tCrA(_, _, _, read_stage), tCrB(_, _, _, read_stage), acc);
      warpgroup_commit_batch();
      // While the tensor cores work: every warpgroup has retired its wgmma of tile t-2, so that
      // stage takes tile t + kStages - 2 (the row lookups of a gather wait here, not the wgmma).
      issue(write_stage, t + kStages - 2);
      cp_async_fence();
      warpgroup_wait<1>();
      warpgroup_fence_operand(acc);
      read_stage = read_stage == kStages - 1 ? 0 : read_stage + 1;
      write_stage = write_stage == kStages - 1 ? 0 : write_stage + 1;
    }
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc);
#endif
  }

  template <bool kAKMajor, bool kBKMajor, class LoadA, class LoadB, class Accum>
  static __device__ __forceinline__ void mainloop(T* smem_a, T* smem_b, int k_tiles, LoadA&& load_a,
                                                  LoadB&& load_b, Accum& acc) {
    prologue(k_tiles, load_a, load_b);
    steady<kAKMajor, kBKMajor>(smem_a, smem_b, k_tiles, load_a, load_b, acc);
  }
};

// ---------------------------------------------------------------------------------------------
// Persistent forms of the same kernels: one block per SM walks the tile schedule
// (persistent_walk below).

// A varlen-K tile: expert e's output rows from m0, columns from n0.
struct VarlenKTile {
  int e;
  std::int64_t m0;
  std::int64_t n0;
};

// Tile `tile_number` of a persistent varlen-K walk, as kBM x kBN output tiles.
template <int kBM, int kBN>
__device__ __forceinline__ VarlenKTile varlen_k_tile(const VarlenKTiling& tiling, int tile_number) {
  const VarlenKTiling::Tile t = tiling(tile_number);
  return VarlenKTile{t.e, static_cast<std::int64_t>(t.m_tile) * kBM, static_cast<std::int64_t>(t.n_tile) * kBN};
}

// The persistent walk shared by the persistent kernels: tiles blockIdx.x, + gridDim.x, ... below
// `tiles` (the caller returned already when blockIdx.x >= tiles). start(n) locates tile n and
// issues its prologue, returning its description; k_loop() runs the current tile's k loop into
// the accumulators; store(tile) writes a finished tile. The next tile starts (after a barrier:
// every warpgroup's wgmma has retired, so the stages are free) before the finished one is
// stored, so its first copies overlap the stores; the staging tile lies in stages the prologue
// leaves alone (StagedEpilogue::clear_of_prologue), and the next k loop first writes them after
// the barrier that opens it, once every thread has written its rows out.
template <class Start, class KLoop, class Store>
__device__ __forceinline__ void persistent_walk(int tiles, Start&& start, KLoop&& k_loop, Store&& store) {
  int linear = static_cast<int>(blockIdx.x);
  auto tile = start(linear);
  while (true) {
    k_loop();
    const auto done = tile;
    linear += static_cast<int>(gridDim.x);
    const bool more = linear < tiles;
    if (more) {
      __syncthreads();
      tile = start(linear);
    }
    store(done);
    if (!more) break;
  }
}

template <class Config, bool kBKMajor>
__global__ void __launch_bounds__(Config::kThreads, 1)
    sm90_persistent_varlen_m_gemm_kernel(VarlenMGemm p, const int* __restrict__ tile_prefix) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using T = typename Config::Element;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;
  constexpr int kBK = Config::kBK;

  const int row_tiles = p.num_experts ? tile_prefix[p.num_experts - 1] : 0;
  const int column_tiles = static_cast<int>((p.n + kBN - 1) / kBN);
  const int tiles = row_tiles * column_tiles;
  if (static_cast<int>(blockIdx.x) >= tiles) return;
  const int k_tiles = static_cast<int>((p.k + kBK - 1) / kBK);

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  constexpr auto layout_a = Config::template copy_layout<true, kBM>();
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(layout_a);

  // `copies` always points at the tile being loaded: the next one while a tile is written.
  VarlenMCopies<Config, kBKMajor, true> copies;
  auto load_a = [&](int stage, int k_tile) { copies.load_a(p, smem_a, stage, k_tile); };
  auto load_b = [&](int stage, int k_tile) { copies.load_b(p, smem_b, stage, k_tile); };
  auto start = [&](int tile_number) {
    const RasterTile r = raster_tile(tile_number, row_tiles, column_tiles, p.raster_group_rows);
    const VarlenMTile t = varlen_m_tile<kBM, kBN>(p, tile_prefix, r.row, r.column);
    copies.locate(p, t.e, t.row0, t.row_end, t.n0);
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
        Config::template steady<true, kBKMajor>(smem_a, smem_b, k_tiles, load_a, load_b, acc);
      },
      [&](const VarlenMTile& done) {
        store_varlen_m_tile<Config, kBKMajor>(p, acc, coord, smem_raw, done.e, done.row0, done.row_end, done.n0);
      });
#endif
}

// One 64-column box of a varlen-K output tile as TMA stores it: BM rows of 64 columns,
// 128-byte-swizzled (GMMA's K-major atom: 8 rows x 64 columns), 16 KiB; a tile is kBN / 64 boxes.
// The accumulator pairs a warp writes into it land in distinct banks.
// kRows: a box of fewer rows (a warp's 16 of the tile, warp-specialised varlen-K).
template <class Config, int kRows = Config::kBM>
constexpr auto varlen_k_store_box_layout() {
  using namespace cute;
  return tile_to_shape(GMMA::Layout_K_SW128_Atom<typename Config::Element>{},
                       make_shape(Int<kRows>{}, Int<64>{}));
}

// C as one (M, N, E) tensor and its TMA store of one box (varlen_k_store_box_layout).
template <class Config, int kBoxRows = Config::kBM>
auto make_varlen_k_store_tma(const VarlenKGemm& g) {
  using namespace cute;
  using T = typename Config::Element;
  Tensor c = make_tensor(make_gmem_ptr(static_cast<T*>(g.c)),
                         make_layout(make_shape(static_cast<int>(g.m), static_cast<int>(g.n), g.num_experts),
                                     make_stride(g.ldc, Int<1>{}, g.c_expert_stride)));
  return make_tma_copy(SM90_TMA_STORE{}, c, varlen_k_store_box_layout<Config, kBoxRows>());
}

// kTmaStore: the block's tiles run as one pipeline of k tiles. Copies run kStages - 2 k tiles
// ahead across tile boundaries, so the next tile's first operands arrive while a finished tile is
// staged (deepseek's experts give 4-k-tile tiles, whose prologue was exposed at every tile). A
// finished tile is staged in the B stages of its last two k tiles, the stages no copy is writing
// (their next k tiles are issued one and two iterations later), as two pairs of boxes, and thread
// 0 stores each pair by TMA as one bulk group. In the iteration that refills the first stage,
// thread 0 waits for the first group to have been read after the iteration's wgmma is issued,
// and an extra barrier holds the other threads' copies until then; before the next iteration's
// barrier it waits for the second group.
// Otherwise (thread stores) the tiles are walked as persistent_walk does: the next tile's
// prologue, then the finished tile's stores.
template <class Config, VarlenKContiguous kContiguous, bool kTmaStore, class StoreTma>
__global__ void __launch_bounds__(Config::kThreads, 1)
    sm90_persistent_varlen_k_gemm_kernel(VarlenKGemm p, VarlenKTiling tiling, CUTE_GRID_CONSTANT StoreTma const store_tma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using T = typename Config::Element;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;
  constexpr int kStages = Config::kStages;

  const int tiles = p.num_experts * tiling.m_tiles * tiling.n_tiles;
  if (static_cast<int>(blockIdx.x) >= tiles) return;
  auto tile_at = [&](int tile_number) { return varlen_k_tile<kBM, kBN>(tiling, tile_number); };

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  constexpr auto layout_a = Config::template copy_layout<false, kBM>();
  constexpr auto layout_b = Config::template copy_layout<false, kBN>();
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(layout_a);

  VarlenKCopies<Config, true, kContiguous> copies(p);
  auto load_a = [&](int stage, int k_tile) { copies.load_a(p, smem_a, stage, k_tile); };
  auto load_b = [&](int stage, int) { copies.load_b(p, smem_b, stage); };
  auto locate = [&](int tile_number) {
    const VarlenKTile t = tile_at(tile_number);
    copies.locate(p, t.e, t.m0, t.n0);
    return t;
  };

  typename Config::template TiledMma<false, false> mma;
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kBM>{}, Int<kBN>{}));
  Tensor coord = mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
  if constexpr (kTmaStore) {
    constexpr int kBoxes = kBN / 64;
    constexpr int kBoxElements = kBM * 64;
    constexpr int kStageElements = cosize(layout_b) / kStages;
    static_assert(kBoxes % 2 == 0 && kBoxes / 2 * kBoxElements <= kStageElements,
                  "half the tile's boxes fit in one B stage");
    static_assert(kStages >= 4, "two stages free of copies when a tile finishes");

    // The loading cursor: tile load_tile (`copies` located there), its next k tile load_k of
    // load_k_tiles; past the block's last tile it issues empty commit groups.
    int load_tile = static_cast<int>(blockIdx.x);
    locate(load_tile);
    int load_k = 0;
    int load_k_tiles = copies.k_tiles();
    int since_store = 2;  // k loop iterations since the last stores were issued (2: none to wait for)
    auto issue = [&](int stage, int) {
      // The first iteration after a store refills the stage of the store's first group: thread 0
      // waits for that group to have been read once the iteration's wgmma is issued (the wgmma
      // reads other stages), and a barrier holds the other threads' copies until then.
      if (since_store == 1) {
        if (threadIdx.x == 0) tma_store_wait<1>();
        __syncthreads();
      }
      while (load_k == load_k_tiles && load_tile < tiles) {
        load_tile += static_cast<int>(gridDim.x);
        if (load_tile < tiles) {
          locate(load_tile);
          load_k = 0;
          load_k_tiles = copies.k_tiles();
        }
      }
      if (load_tile < tiles) {
        load_a(stage, load_k);
        load_b(stage, load_k);
        ++load_k;
      }
    };
    CUTE_UNROLL
    for (int s = 0; s < kStages - 2; ++s) {
      issue(s, s);
      cp_async_fence();
    }

    auto box_layout = varlen_k_store_box_layout<Config>();
    Tensor m_c = store_tma.get_tma_tensor(make_shape(static_cast<int>(p.m), static_cast<int>(p.n), p.num_experts));
    auto cta_tma = store_tma.get_slice(Int<0>{});
    int read_stage = 0;
    int write_stage = kStages - 2;
    for (int tile_number = static_cast<int>(blockIdx.x); tile_number < tiles;
         tile_number += static_cast<int>(gridDim.x)) {
      const VarlenKTile t = tile_at(tile_number);
      // The loading cursor's count, computed the same way (routed-row positions fit 32 bits).
      const int k_tiles = decltype(copies)::k_tiles_between(
          static_cast<std::uint32_t>(t.e ? p.expert_offsets[t.e - 1] : 0),
          static_cast<std::uint32_t>(p.expert_offsets[t.e]));
      clear(acc);
      Config::template iterations<false, false>(
          smem_a, smem_b, k_tiles, read_stage, write_stage, acc,
          [&](int) {
            // The second iteration after a store refills the stage of its second group (the
            // first iteration waits for the first group in issue, after its wgmma).
            if (threadIdx.x == 0 && since_store == 1) tma_store_wait<0>();
            since_store += since_store < 2;
          },
          issue);

      // The B stages of the block's last two k tiles (this tile's, or its predecessors' when it
      // has fewer than two; before the first, the stages kStages - 2 and kStages - 1, which the
      // prologue leaves alone): every warpgroup's wgmma has read them, no copy is writing them.
      const int low = (read_stage + kStages - 2) % kStages * kStageElements;
      const int high = (read_stage + kStages - 1) % kStages * kStageElements;
      if (threadIdx.x == 0) tma_store_wait<0>();  // a tile of 0 or 1 k tiles restages a stage being stored
      __syncthreads();
      // Box b's staging: the first half of the boxes in `low`, the second in `high`.
      auto box_base = [&](int box) { return (box < kBoxes / 2 ? low : high) + box % (kBoxes / 2) * kBoxElements; };
      // Within a box, varlen_k_store_box_layout written out (Swizzle<3, 3, 3> of 16-bit elements).
      StagedEpilogue<Config>::write_accumulators(smem_b, acc, coord, nullptr, [&](int r, int c) {
        return box_base(c / 64) + swizzled_offset<64, Config::kVec>(r, c % 64);
      });
      tma_store_fence();  // the staging writes, visible to the TMA unit (async proxy)
      __syncthreads();
      if (threadIdx.x == 0) {
        Tensor c_tile = m_c(_, _, t.e);
        CUTE_UNROLL
        for (int box = 0; box < kBoxes; ++box) {
          const std::int64_t n0 = t.n0 + box * 64;
          if (n0 < p.n) {
            Tensor s_box = make_tensor(make_smem_ptr(smem_b + box_base(box)), box_layout);
            Tensor g_box = local_tile(c_tile, make_shape(Int<kBM>{}, Int<64>{}),
                                      make_coord(static_cast<int>(t.m0 / kBM), static_cast<int>(n0 / 64)));
            copy(store_tma, cta_tma.partition_S(s_box), cta_tma.partition_D(g_box));
          }
          if (box == kBoxes / 2 - 1 || box == kBoxes - 1) tma_store_arrive();
        }
      }
      since_store = 0;
    }
    if (threadIdx.x == 0) tma_store_wait<0>();
    cp_async_wait<0>();
  } else {
    static_assert(StagedEpilogue<Config>::template clear_of_prologue<false>(),
                  "the next tile's prologue must not overwrite the staged epilogue");
    auto start = [&](int tile_number) {
      const VarlenKTile t = locate(tile_number);
      Config::prologue(copies.k_tiles(), load_a, load_b);
      return t;
    };
    persistent_walk(
        tiles, start,
        [&] {
          clear(acc);
          Config::template steady<false, false>(smem_a, smem_b, copies.k_tiles(), load_a, load_b, acc);
        },
        [&](const VarlenKTile& done) { store_varlen_k_tile<Config>(p, acc, coord, smem_raw, done.e, done.m0, done.n0); });
  }
#endif
}

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

// The persistent kernels: sm_count blocks at most (one per SM: 192 KiB of stages each).
template <class T, bool kBKMajor>
void launch_sm90_persistent_varlen_m_gemm(const VarlenMGemm& g, const int* tile_prefix, int sm_count,
                                          cudaStream_t stream) {
  using Config = Sm90Config<T>;
  constexpr int smem = gemm_smem_bytes<Config, true, kBKMajor>();
  auto kernel = sm90_persistent_varlen_m_gemm_kernel<Config, kBKMajor>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "varlen-M GEMM: shared memory size");
  const std::int64_t max_tiles = (static_cast<std::int64_t>(ceil_div(g.rows, Config::kBM)) + g.num_experts) *
                                 ceil_div(g.n, Config::kBN);
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(sm_count, max_tiles));
  kernel<<<blocks, Config::kThreads, smem, stream>>>(g, tile_prefix);
  check_launch("varlen-M GEMM");
}

// A persistent varlen-K launch's tile walk and grid (sm_count blocks at most).
struct PersistentVarlenKGrid {
  VarlenKTiling tiling;
  unsigned blocks;
};

template <class Config>
PersistentVarlenKGrid persistent_varlen_k_grid(const VarlenKGemm& g, int sm_count) {
  const std::int64_t tiles = static_cast<std::int64_t>(g.num_experts) * ceil_div(g.m, Config::kBM) *
                             ceil_div(g.n, Config::kBN);
  // The kernel numbers tiles, and steps a block's tile number by the grid, in 32 bits.
  if (tiles > std::numeric_limits<int>::max() - std::int64_t{sm_count}) {
    throw Unsupported("varlen-K GEMM: " + std::to_string(tiles) + " output tiles (experts x " +
                      std::to_string(Config::kBM) + "-row x " + std::to_string(Config::kBN) +
                      "-column tiles of m = " + std::to_string(g.m) + ", n = " + std::to_string(g.n) +
                      "); at most 2^31 - 1 - the SM count are supported");
  }
  return {VarlenKTiling(static_cast<int>(ceil_div(g.m, Config::kBM)), static_cast<int>(ceil_div(g.n, Config::kBN))),
          static_cast<unsigned>(std::min<std::int64_t>(sm_count, tiles))};
}

template <class T, VarlenKContiguous kContiguous, bool kTmaStore>
void launch_sm90_persistent_varlen_k_gemm(const VarlenKGemm& g, int sm_count, cudaStream_t stream) {
  using Config = Sm90Config<T>;
  constexpr int smem = gemm_smem_bytes<Config, false, false>();
  const PersistentVarlenKGrid grid = persistent_varlen_k_grid<Config>(g, sm_count);
  auto launch = [&](auto kernel, const auto& store_tma) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "varlen-K GEMM: shared memory size");
    kernel<<<grid.blocks, Config::kThreads, smem, stream>>>(g, grid.tiling, store_tma);
    check_launch("varlen-K GEMM");
  };
  if constexpr (kTmaStore) {
    const auto store_tma = make_varlen_k_store_tma<Config>(g);
    launch(sm90_persistent_varlen_k_gemm_kernel<Config, kContiguous, true, std::remove_const_t<decltype(store_tma)>>,
           store_tma);
  } else {
    launch(sm90_persistent_varlen_k_gemm_kernel<Config, kContiguous, false, int>, 0);
  }
}

}  // namespace scattermoe::cuda
