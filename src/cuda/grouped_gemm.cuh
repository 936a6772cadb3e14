// The grouped GEMM kernels of the CUDA backend, generic over a tile configuration.
//
// Operand tiles are copied global -> shared by cp.async (16-byte chunks; rows gathered through
// an index list, so no grouped copy of the input is ever made) into a multi-stage pipeline; the
// configuration's mainloop multiplies them (mma.sync on sm_80+: sm80_grouped_gemm.cuh; wgmma on
// sm_90a: sm90_grouped_gemm.cuh) into fp32 accumulators, and the epilogue adds the bias and
// writes rows to their destination through a staging tile in shared memory.
//
// A configuration provides: Element, kBM, kBN, kBK, kStages, kThreads, kVec (elements per
// 16-byte chunk), kMinBlocks (blocks per SM to fit in registers), copy_layout<kKMajor, kMN>() (the (MN, BK, STAGES) shared-memory layout, as
// plain offsets), TiledMma<kAKMajor, kBKMajor> (for the accumulator fragment and its
// coordinates) and mainloop<kAKMajor, kBKMajor>(smem_a, smem_b, k_tiles, load_a, load_b, acc).
// Included only by the instantiation files.
#pragma once

#include <cstddef>
#include <type_traits>
#include <utility>

#include <cute/tensor.hpp>

#include "cuda/gemm.hpp"

namespace scattermoe::cuda {

// The (MN, BK, STAGES) shared-memory layout of 16-bit operand tiles: 8 x 64 (K-major) or 64 x 8
// (MN-major) atoms whose 16-byte chunks are swizzled by the line index (Swizzle<3,3,3> on element
// offsets). ldmatrix reads it without bank conflicts, and it is GMMA's 128-byte swizzle for
// 2-byte elements (byte address bits 4-6 XOR bits 7-9) when the tile starts 1024-byte aligned.
template <bool kKMajor, int kMN, int kBK, int kStages>
constexpr auto swizzled_tile_layout() {
  using namespace cute;
  if constexpr (kKMajor) {
    auto atom = composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{});
    return tile_to_shape(atom, make_shape(Int<kMN>{}, Int<kBK>{}, Int<kStages>{}));
  } else {
    auto atom = composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, Stride<_1, _64>>{});
    return tile_to_shape(atom, make_shape(Int<kMN>{}, Int<kBK>{}, Int<kStages>{}));
  }
}

template <class Config, bool kAKMajor, bool kBKMajor>
constexpr int gemm_smem_bytes() {
  using T = typename Config::Element;
  return static_cast<int>(
      (cute::cosize(Config::template copy_layout<kAKMajor, Config::kBM>()) +
       cute::cosize(Config::template copy_layout<kBKMajor, Config::kBN>())) * sizeof(T));
}

// The first thread of those that copy operand tiles: 0 (the whole block), or a config's
// kFirstCopyThread (a warp-specialised kernel's producer warps, after its consumers).
template <class Config, class = void>
struct FirstCopyThread : std::integral_constant<int, 0> {};
template <class Config>
struct FirstCopyThread<Config, std::void_t<decltype(Config::kFirstCopyThread)>>
    : std::integral_constant<int, Config::kFirstCopyThread> {};

// ---------------------------------------------------------------------------------------------
// The 16-byte chunks of one operand tile (kMN x kBK) that this thread copies global -> shared.
// K-major: a line is one mn index, contiguous along k. MN-major: a line is one k index,
// contiguous along mn. Every thread copies chunks at one fixed offset `off` within kCount lines
// (line(j)), kLinesPerPass lines apart. The tile may be the part of a wider one (kLayoutMN
// columns) from column mn_offset. Lines kLinesPerPass apart (a multiple of 8) lie in different
// swizzle atoms at the same place within them, and so do columns a multiple of 64 apart, so
// chunk j sits a compile-time distance from chunk 0 (the layout at line kLinesPerPass * j of
// column 0): a k tile costs one shared-memory base per stage and an immediate offset per chunk.
template <class Config, bool kKMajor, int kMN, int kLayoutMN = kMN>
struct TileChunks {
  using T = typename Config::Element;
  static constexpr int kVec = Config::kVec;
  static constexpr int kPerLine = (kKMajor ? Config::kBK : kMN) / kVec;
  static constexpr int kLinesPerPass = Config::kThreads / kPerLine;
  static constexpr int kCount = (kKMajor ? kMN : Config::kBK) / kLinesPerPass;
  static_assert(Config::kThreads % kPerLine == 0 && kCount * kLinesPerPass == (kKMajor ? kMN : Config::kBK),
                "tile chunks must divide evenly over threads");
  static_assert(kLinesPerPass % 8 == 0, "a thread's lines lie whole swizzle atoms apart");

  static constexpr auto layout() { return Config::template copy_layout<kKMajor, kLayoutMN>(); }

  std::uint32_t base = 0;  // element offset of chunk 0 within stage 0

  TileChunks() = default;
  // mn_offset (a multiple of 64) places these chunks at columns [mn_offset, mn_offset + kMN).
  __device__ explicit TileChunks(int mn_offset) {
    base = static_cast<std::uint32_t>(kKMajor ? layout()(mn_offset + line(0), off(), 0)
                                              : layout()(mn_offset + off(), line(0), 0));
  }

  __device__ static int thread() { return static_cast<int>(threadIdx.x) - FirstCopyThread<Config>::value; }
  __device__ static int off() { return thread() % kPerLine * kVec; }
  __device__ static int line(int j) { return thread() / kPerLine + j * kLinesPerPass; }
  // Chunk j's distance from chunk 0, and a stage's size (constants once j is unrolled).
  __device__ static int delta(int j) {
    return static_cast<int>(kKMajor ? layout()(j * kLinesPerPass, 0, 0) : layout()(0, j * kLinesPerPass, 0));
  }
  __device__ static int stage_stride() { return static_cast<int>(layout()(0, 0, 1)); }

  // Copies `valid` (0..kVec) elements from src into chunk j of `stage`, zero-filling the rest.
  // Aligned kernels (16-byte addresses, valid either 0 or kVec) issue one cp.async; the others,
  // compiled apart so the fast ones carry none of it, copy element by element.
  template <bool kAligned>
  __device__ __forceinline__ void copy(T* smem, int stage, int j, const T* src, int valid,
                                       const T* any_valid) const {
    T* dst = smem + (stage * stage_stride() + static_cast<int>(base)) + delta(j);
    if constexpr (kAligned) {
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(valid > 0 ? src : any_valid),
          *reinterpret_cast<cute::uint128_t*>(dst), valid > 0);
    } else {
      CUTE_UNROLL
      for (int v = 0; v < kVec; ++v) dst[v] = v < valid ? src[v] : T(0);
    }
  }
};

// Element offset of (r, c) in rows of kWidth elements whose 16-byte chunks (kVec elements) are
// permuted by r % 8 (the chunk index XOR-ed with it): the staged epilogues' layout, and for
// 64-element rows of 16-bit elements GMMA's 128-byte-swizzled K-major atom, which TMA stores.
template <int kWidth, int kVec>
__device__ __forceinline__ int swizzled_offset(int r, int c) {
  return r * kWidth + (((c / kVec) ^ (r % 8)) * kVec) + c % kVec;
}

// How many of the kVec elements starting at `position` lie below `extent`.
template <int kVec>
__device__ __forceinline__ int valid_elements(std::int64_t extent, std::int64_t position) {
  const std::int64_t left = extent - position;
  return left <= 0 ? 0 : (left >= kVec ? kVec : static_cast<int>(left));
}

// Whether accumulator values v and v+1 of this thread sit in adjacent columns of one row (true
// for the tensor-op fragments; the compiler folds it, the thread offset cancelling out).
template <class Coord>
__device__ __forceinline__ bool adjacent_columns(const Coord& coord, int v) {
  return cute::get<0>(coord(v + 1)) == cute::get<0>(coord(v)) &&
         cute::get<1>(coord(v + 1)) == cute::get<1>(coord(v)) + 1;
}

// Grouped raster: `group_rows` consecutive row tiles walk all column tiles before the next group
// starts, so the blocks resident at once share their A rows and B columns in L2. Maps this
// block's (blockIdx.x, blockIdx.y) to the (row tile, column tile) it computes.
struct RasterTile {
  int row;
  int column;
};

// The same walk for tile number `linear` of row_tiles x column_tiles (a persistent block's loop).
__device__ __forceinline__ RasterTile raster_tile(int linear, int row_tiles, int column_tiles, int group_rows) {
  const int first_row_tile = linear / (group_rows * column_tiles) * group_rows;
  const int rows_here = min(row_tiles - first_row_tile, group_rows);
  const int in_group = linear % (group_rows * column_tiles);
  return RasterTile{first_row_tile + in_group % rows_here, in_group / rows_here};
}

__device__ __forceinline__ RasterTile grouped_raster(int group_rows) {
  const int row_tiles = static_cast<int>(gridDim.x);
  const int column_tiles = static_cast<int>(gridDim.y);
  const int linear = static_cast<int>(blockIdx.y) * row_tiles + static_cast<int>(blockIdx.x);
  return raster_tile(linear, row_tiles, column_tiles, group_rows);
}

// A varlen-M tile: expert e's rows [row0, row_end) of the grouped order, columns from n0.
struct VarlenMTile {
  int e;
  std::int64_t row0;
  std::int64_t row_end;
  std::int64_t n0;
};

// Row tile `tile` of the device-built list (tile_prefix[e] = inclusive count of kBM-row tiles of
// experts 0..e; tile < tile_prefix[E-1]) and column tile `column_tile`.
template <int kBM, int kBN>
__device__ __forceinline__ VarlenMTile varlen_m_tile(const VarlenMGemm& p, const int* tile_prefix, int tile,
                                                     int column_tile) {
  int lo = 0;
  int hi = p.num_experts - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (tile_prefix[mid] > tile) hi = mid; else lo = mid + 1;
  }
  VarlenMTile t;
  t.e = lo;
  const std::int64_t expert_begin = lo ? p.expert_offsets[lo - 1] : 0;
  t.row0 = expert_begin + static_cast<std::int64_t>(tile - (lo ? tile_prefix[lo - 1] : 0)) * kBM;
  t.row_end = min(p.expert_offsets[lo], t.row0 + kBM);
  t.n0 = static_cast<std::int64_t>(column_tile) * kBN;
  return t;
}

// ---------------------------------------------------------------------------------------------
// The epilogue, staged through shared memory: the block's finished tile (bias added, converted)
// goes to a kBM x kBN tile in shared memory, then whole rows leave it in 16-byte chunks, so a
// warp stores one row's 512 contiguous bytes (a 128 x 256 tile of 16-bit values) instead of
// 4-byte pairs spread over 8 rows, and each row's destination is looked up once per chunk, not
// per pair. The 16-byte chunks of row r sit at chunk index c ^ (r % 8): a warp's accumulator
// writes (8 consecutive rows, one chunk each) and its row reads both hit 32 distinct banks.
// The staging tile is the last kBM*kBN elements of the operand stages, which the pipeline's
// prologue does not touch (it fills stages 0 .. kStages-3 of A first, then of B), so a persistent
// kernel may start its next tile's copies before staging the finished one.
// The barrier the epilogues synchronise their threads with: the whole block, or (warp-specialised
// kernels, whose producer warps do not take part) the first kThreads threads on named barrier 8,
// the first id CUTLASS leaves to its users (0 is __syncthreads', 1-7 its own epilogues' and
// schedulers').
struct BlockBarrier {
  __device__ static void sync() { __syncthreads(); }
};
template <int kThreads>
struct ConsumerBarrier {
  __device__ static void sync() { asm volatile("bar.sync 8, %0;" ::"n"(kThreads) : "memory"); }
};

template <class Config>
struct StagedEpilogue {
  using T = typename Config::Element;
  static constexpr int kBM = Config::kBM;
  static constexpr int kBN = Config::kBN;
  static constexpr int kVec = Config::kVec;
  static constexpr int kChunks = kBN / kVec;  // 16-byte chunks per row
  static constexpr int kElements = kBM * kBN;
  static_assert(kVec * static_cast<int>(sizeof(T)) == 16, "a chunk is 16 bytes");
  static_assert(kChunks % 8 == 0, "the swizzle permutes chunks within a row");

  __device__ static int offset(int r, int c) { return swizzled_offset<kBN, kVec>(r, c); }

  // The staging tile: the tail of the stages, clear of what the prologue fills (see above).
  template <bool kAKMajor, bool kBKMajor>
  __device__ static T* tile(unsigned char* smem) {
    constexpr int stages_elements = gemm_smem_bytes<Config, kAKMajor, kBKMajor>() / static_cast<int>(sizeof(T));
    static_assert(kElements <= stages_elements, "the staging tile fits in the stages");
    return reinterpret_cast<T*>(smem) + (stages_elements - kElements);
  }

  // Whether the staging tile lies in B's stages that the prologue leaves alone (kStages-2 and
  // later), as a persistent kernel that starts its next tile first needs.
  template <bool kBKMajor>
  static constexpr bool clear_of_prologue() {
    constexpr int b_stage = cute::cosize(Config::template copy_layout<kBKMajor, kBN>()) / Config::kStages;
    return kElements <= 2 * b_stage;
  }

  // acc (+ bias(c) for tile column c; bias nullptr: nothing added) into a staging tile laid out
  // by place(r, c) (an element offset that keeps 16-byte chunks whole, so an even column and the
  // next stay adjacent). The caller synchronised the block after its last read of that memory;
  // no barrier follows.
  template <class Acc, class Coord, class Bias, class Place>
  __device__ static void write_accumulators(T* staged, const Acc& acc, const Coord& coord, Bias&& bias,
                                            Place&& place) {
    constexpr int kValues = decltype(cute::size(std::declval<const Acc&>()))::value;
    write_accumulator_range<0, kValues>(staged, acc, coord, bias, place);
  }

  // The same for this thread's accumulator values [kBegin, kEnd) only (kBegin even).
  template <int kBegin, int kEnd, class Acc, class Coord, class Bias, class Place>
  __device__ static void write_accumulator_range(T* staged, const Acc& acc, const Coord& coord, Bias&& bias,
                                                 Place&& place) {
    write_value_range<kBegin, kEnd>(staged, coord, place, [&](int v, int c) {
      if constexpr (std::is_same_v<std::decay_t<Bias>, std::nullptr_t>) {
        return T(acc(v));
      } else {
        return T(acc(v) + bias(c));
      }
    });
  }

  // value(v, c) (a T) for this thread's accumulator values [kBegin, kEnd) (kBegin even) at their
  // coordinates, laid out by place as above.
  template <int kBegin, int kEnd, class Coord, class Place, class Value>
  __device__ static void write_value_range(T* staged, const Coord& coord, Place&& place, Value&& value) {
    static_assert(kBegin % 2 == 0, "value pairs stay whole");
    using namespace cute;
    struct alignas(2 * sizeof(T)) Pair {
      T x, y;
    };
    constexpr bool kPairs = sizeof(T) == 2;
    CUTE_UNROLL
    for (int v = kBegin; v < kEnd; v += kPairs ? 2 : 1) {
      const int r = get<0>(coord(v));
      const int c = get<1>(coord(v));
      if constexpr (kPairs) {
        if (adjacent_columns(coord, v) && c % 2 == 0) {
          *reinterpret_cast<Pair*>(staged + place(r, c)) = Pair{value(v, c), value(v + 1, c + 1)};
        } else {
          staged[place(r, c)] = value(v, c);
          const int r2 = get<0>(coord(v + 1));
          const int c2 = get<1>(coord(v + 1));
          staged[place(r2, c2)] = value(v + 1, c2);
        }
      } else {
        staged[place(r, c)] = value(v, c);
      }
    }
  }

  // write_accumulators in this epilogue's layout (offset), then a barrier.
  template <class Barrier = BlockBarrier, class Acc, class Coord, class Bias>
  __device__ static void stage(T* staged, const Acc& acc, const Coord& coord, Bias&& bias) {
    write_accumulators(staged, acc, coord, bias, [](int r, int c) { return offset(r, c); });
    Barrier::sync();
  }

  // Rows [0, rows) and columns [0, cols) of the staged tile to row_ptr(r) (tile row r's first
  // column in global memory); 16-byte stores when `wide` (every row pointer 16-byte aligned).
  template <class RowPtr>
  __device__ static void write(const T* staged, int rows, int cols, bool wide, RowPtr&& row_ptr) {
    for (int q = static_cast<int>(threadIdx.x); q < kBM * kChunks; q += Config::kThreads) {
      const int r = q / kChunks;
      if (r >= rows) break;
      const int c = q % kChunks * kVec;
      if (c >= cols) continue;
      T* dst = row_ptr(r) + c;
      const T* src = staged + offset(r, c);
      if (wide && c + kVec <= cols) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
        for (int j = 0; j < kVec && c + j < cols; ++j) dst[j] = src[j];
      }
    }
  }
};

// varlen-M epilogue: bias, convert, and rows [row0, row_end) of expert e to their destination
// row c_index[i] (or i), columns from n0. `smem` is the block's dynamic shared memory, every
// stage free of wgmma / ldmatrix reads once the block synchronises (done here first, with
// Barrier: the threads that hold the accumulators, Config::kThreads of them).
template <class Config, bool kBKMajor, class Barrier = BlockBarrier, class Acc, class Coord>
__device__ __forceinline__ void store_varlen_m_tile(const VarlenMGemm& p, const Acc& acc, const Coord& coord,
                                                    unsigned char* smem, int e, std::int64_t row0,
                                                    std::int64_t row_end, std::int64_t n0) {
  using T = typename Config::Element;
  using Epilogue = StagedEpilogue<Config>;
  static_assert(Config::kBM <= Config::kThreads, "a thread looks up each row");
  T* staged = Epilogue::template tile<true, kBKMajor>(smem);
  const std::int64_t cols = min(static_cast<std::int64_t>(Config::kBN), p.n - n0);
  const int rows = static_cast<int>(row_end - row0);
  // The tile's destination rows of C (c_index): thread r < rows loads row r's at the start and
  // puts it in shared memory before the staging barrier, so the load's latency passes while the
  // accumulators are staged and the stores wait for none (looked up per store, a load's latency
  // stood before each of a thread's rows in turn).
  __shared__ std::int64_t c_rows[Config::kBM];
  const int me = static_cast<int>(threadIdx.x);
  const bool looks_up = p.c_index != nullptr && me < rows;
  const std::int64_t my_row = looks_up ? p.c_index[row0 + me] : 0;
  auto stage = [&](auto&& bias) {
    Epilogue::write_accumulators(staged, acc, coord, bias, [](int r, int c) { return Epilogue::offset(r, c); });
    if (looks_up) c_rows[me] = my_row;
    Barrier::sync();
  };
  if (p.bias) {
    // The tile's bias columns in shared memory, read per accumulator (global loads there, which
    // the compiler hoists ahead of the conversions, would take a register each).
    __shared__ float bias_tile[Config::kBN];
    const T* bias = static_cast<const T*>(p.bias) + e * p.bias_expert_stride;
    for (int c = static_cast<int>(threadIdx.x); c < Config::kBN; c += Config::kThreads) {
      bias_tile[c] = c < cols ? to_float(bias[(n0 + c) * p.bias_stride_n]) : 0.0f;
    }
    Barrier::sync();
    stage([&](int c) { return bias_tile[c]; });
  } else {
    Barrier::sync();
    stage([](int) { return 0.0f; });
  }
  T* out = static_cast<T*>(p.c) + n0;
  const bool wide = reinterpret_cast<std::uintptr_t>(out) % 16 == 0 && p.ldc % Config::kVec == 0;
  const bool indexed = p.c_index != nullptr;
  const std::int64_t ldc = p.ldc;
  Epilogue::write(staged, rows, static_cast<int>(cols), wide, [&](int r) {
    return out + (indexed ? c_rows[r] : row0 + r) * ldc;
  });
}

// varlen-K epilogue: the (m0, n0) tile of C[e], converted; staged as above.
template <class Config, class Acc, class Coord>
__device__ __forceinline__ void store_varlen_k_tile(const VarlenKGemm& p, const Acc& acc, const Coord& coord,
                                                    unsigned char* smem, int e, std::int64_t m0,
                                                    std::int64_t n0) {
  using T = typename Config::Element;
  using Epilogue = StagedEpilogue<Config>;
  T* staged = Epilogue::template tile<false, false>(smem);
  __syncthreads();
  Epilogue::stage(staged, acc, coord, [](int) { return 0.0f; });
  T* out = static_cast<T*>(p.c) + e * p.c_expert_stride + m0 * p.ldc + n0;
  const bool wide = reinterpret_cast<std::uintptr_t>(out) % 16 == 0 && p.ldc % Config::kVec == 0;
  const std::int64_t ldc = p.ldc;
  Epilogue::write(staged, static_cast<int>(min(static_cast<std::int64_t>(Config::kBM), p.m - m0)),
                  static_cast<int>(min(static_cast<std::int64_t>(Config::kBN), p.n - n0)), wide,
                  [&](int r) { return out + r * ldc; });
}

// ---------------------------------------------------------------------------------------------
// The copies this thread makes for one tile's operands, shared by every kernel of a GEMM kind:
// locate() points them at a tile, load_a / load_b copy k tile `k_tile` into a pipeline stage.

// varlen-M: A's gathered rows [row0, row_end) (each row looked up once per tile) and expert e's
// weight, K-major (lines are columns n) or N-major (lines are k).
template <class Config, bool kBKMajor, bool kAligned>
struct VarlenMCopies {
  using T = typename Config::Element;
  static constexpr int kBM = Config::kBM;
  static constexpr int kBN = Config::kBN;
  static constexpr int kBK = Config::kBK;
  using ChunksA = TileChunks<Config, true, kBM>;
  using ChunksB = TileChunks<Config, kBKMajor, kBN>;

  ChunksA chunks_a;
  ChunksB chunks_b;
  const T* a_rows[ChunksA::kCount];
  const T* b_lines[ChunksB::kCount];
  int b_valid = 0;  // N-major: elements of the chunk inside N (fixed for the tile)

  __device__ VarlenMCopies() : chunks_a(0), chunks_b(0) {}

  __device__ __forceinline__ void locate(const VarlenMGemm& p, int e, std::int64_t row0,
                                         std::int64_t row_end, std::int64_t n0) {
    locate_rows(p, row0, row_end);
    locate_weight(p, e, n0);
  }

  // A alone (for kernels whose B tiles come another way).
  __device__ __forceinline__ void locate_rows(const VarlenMGemm& p, std::int64_t row0, std::int64_t row_end) {
    const T* a_base = static_cast<const T*>(p.a.ptr);
    CUTE_UNROLL
    for (int j = 0; j < ChunksA::kCount; ++j) {
      const std::int64_t i = row0 + ChunksA::line(j);
      a_rows[j] = i < row_end ? a_base + p.a.row(i) * p.a.ld + ChunksA::off() : nullptr;
    }
  }

  __device__ __forceinline__ void locate_weight(const VarlenMGemm& p, int e, std::int64_t n0) {
    const T* b_base = static_cast<const T*>(p.b) + e * p.b_expert_stride;
    CUTE_UNROLL
    for (int j = 0; j < ChunksB::kCount; ++j) {
      if constexpr (kBKMajor) {
        const std::int64_t n = n0 + ChunksB::line(j);
        b_lines[j] = n < p.n ? b_base + n * p.b_stride_n + ChunksB::off() : nullptr;
      } else {
        b_lines[j] = b_base + ChunksB::line(j) * p.b_stride_k + n0 + ChunksB::off();
      }
    }
    if constexpr (!kBKMajor) b_valid = valid_elements<Config::kVec>(p.n, n0 + ChunksB::off());
  }

  __device__ __forceinline__ void load_a(const VarlenMGemm& p, T* smem_a, int stage, int k_tile) const {
    const std::int64_t k0 = static_cast<std::int64_t>(k_tile) * kBK;
    const int valid = valid_elements<Config::kVec>(p.k, k0 + ChunksA::off());
    const T* any = static_cast<const T*>(p.a.ptr);
    CUTE_UNROLL
    for (int j = 0; j < ChunksA::kCount; ++j) {
      chunks_a.template copy<kAligned>(smem_a, stage, j, a_rows[j] + k0, a_rows[j] ? valid : 0, any);
    }
  }

  __device__ __forceinline__ void load_b(const VarlenMGemm& p, T* smem_b, int stage, int k_tile) const {
    const std::int64_t k0 = static_cast<std::int64_t>(k_tile) * kBK;
    const T* any = static_cast<const T*>(p.b);
    if constexpr (kBKMajor) {
      const int valid = valid_elements<Config::kVec>(p.k, k0 + ChunksB::off());
      CUTE_UNROLL
      for (int j = 0; j < ChunksB::kCount; ++j) {
        chunks_b.template copy<kAligned>(smem_b, stage, j, b_lines[j] + k0, b_lines[j] ? valid : 0, any);
      }
    } else {
      const std::int64_t advance = k0 * p.b_stride_k;
      CUTE_UNROLL
      for (int j = 0; j < ChunksB::kCount; ++j) {
        const bool inside = k0 + ChunksB::line(j) < p.k;
        chunks_b.template copy<kAligned>(smem_b, stage, j, b_lines[j] + advance, inside ? b_valid : 0, any);
      }
    }
  }
};

// varlen-K: both operands MN-major, a line is one routed row of expert e. The B tile is kParts
// A-widths and each part copies with A's line mapping, so each row index is resolved once for
// both operands; the index entries are fetched one k tile ahead (load_a runs over the k tiles in
// order), so their latency hides behind a whole tile instead of stalling the copies.
// The copies run inside every k tile of the weight-gradient GEMMs, on the threads that issue the
// wgmma, so they are kept lean: rows in 32 bits (fewer than 2^31 routed rows on CUDA), a line
// past the expert's end reads the expert's last row instead (always a valid address) and is
// zero-filled by its predicate, and a column chunk past m or n reads column 0 the same way, so
// no source pointer is selected per chunk. kContiguous: that operand's row is the routed row
// itself, so its copies read no index and divide nothing.
template <class Config, bool kAligned, VarlenKContiguous kContiguous = VarlenKContiguous::kNeither>
struct VarlenKCopies {
  using T = typename Config::Element;
  static constexpr int kBM = Config::kBM;
  static constexpr int kBN = Config::kBN;
  static constexpr int kBK = Config::kBK;
  static_assert(kBN % kBM == 0, "varlen-K shares row lines between its operands");
  static constexpr int kParts = kBN / kBM;
  using Chunks = TileChunks<Config, false, kBM>;
  using ChunksB = TileChunks<Config, false, kBM, kBN>;  // part h: columns [h * kBM, (h + 1) * kBM)
  static constexpr bool kAIndexed = kContiguous != VarlenKContiguous::kA;
  static constexpr bool kBIndexed = kContiguous != VarlenKContiguous::kB;

  Chunks chunks_a;
  ChunksB chunks_b[kParts];
  const char* a_col = nullptr;  // this thread's column of A (m0 + off), of B (n0 + off); column 0
  const char* b_col = nullptr;  // when that lies past m (n): a valid address the predicate masks
  std::int64_t a_ld_bytes = 0;
  std::int64_t b_ld_bytes = 0;
  int a_valid = 0;              // elements of this thread's chunk inside m, inside n (0..kVec)
  int b_valid[kParts];
  int b_part[kParts];           // B part h's offset from the line pointer in bytes (0 past n)
  // The expert's routed rows [r0, r1). Unsigned: a k tile's lines run up to 127 past r1, and r1
  // may lie just below 2^31.
  std::uint32_t r0 = 0;
  std::uint32_t r1 = 0;
  std::uint32_t a_next[Chunks::kCount];  // the next k tile's entries (lines past r1: row r1 - 1's)
  std::uint32_t b_next[Chunks::kCount];
  const char* b_src[Chunks::kCount];  // B's lines of a tile: resolved by load_a, used by load_b
  unsigned inside = 0;             // bit j: line j of that tile lies inside the expert
  FastDivisor a_divide;            // p.a.divisor, p.b.divisor (fixed for the launch)
  FastDivisor b_divide;

  __device__ explicit VarlenKCopies(const VarlenKGemm& p)
      : chunks_a(0),
        a_ld_bytes(p.a.ld * static_cast<std::int64_t>(sizeof(T))),
        b_ld_bytes(p.b.ld * static_cast<std::int64_t>(sizeof(T))),
        a_divide(p.a.divisor),
        b_divide(p.b.divisor) {
    CUTE_UNROLL
    for (int h = 0; h < kParts; ++h) chunks_b[h] = ChunksB(h * kBM);
  }

  __device__ __forceinline__ void locate(const VarlenKGemm& p, int e, std::int64_t m0, std::int64_t n0) {
    r0 = static_cast<std::uint32_t>(e ? p.expert_offsets[e - 1] : 0);
    r1 = static_cast<std::uint32_t>(p.expert_offsets[e]);
    a_valid = valid_elements<Config::kVec>(p.m, m0 + Chunks::off());
    a_col = static_cast<const char*>(p.a.ptr) + (a_valid > 0 ? m0 + Chunks::off() : 0) * sizeof(T);
    CUTE_UNROLL
    for (int h = 0; h < kParts; ++h) {
      b_valid[h] = valid_elements<Config::kVec>(p.n, n0 + h * kBM + Chunks::off());
      b_part[h] = b_valid[h] > 0 ? h * kBM * static_cast<int>(sizeof(T)) : 0;
    }
    // The parts share one line pointer at part 0's column (column 0 when even that lies past
    // n; then so do the later parts), and a part past n reads part 0's bytes, masked.
    b_col = static_cast<const char*>(p.b.ptr) + (b_valid[0] > 0 ? n0 + Chunks::off() : 0) * sizeof(T);
    if (r1 > r0) fetch_entries(p, 0);
  }

  __device__ __forceinline__ int k_tiles() const { return k_tiles_between(r0, r1); }
  // The k tiles of routed rows [r0, r1) (none when r1 <= r0), for every party that walks them.
  static __device__ __forceinline__ int k_tiles_between(std::uint32_t r0, std::uint32_t r1) {
    return r1 > r0 ? static_cast<int>((r1 - r0 + kBK - 1) / kBK) : 0;
  }

  // An entry of the index as 32 bits: entries are routed-row positions, below 2^31, so the low
  // word of the little-endian int64 is the value.
  static __device__ __forceinline__ std::uint32_t entry(const RowSource& src, std::uint32_t position) {
    return src.index ? *reinterpret_cast<const std::uint32_t*>(src.index + position)
                     : static_cast<std::uint32_t>(position);
  }

  __device__ __forceinline__ void fetch_entries(const VarlenKGemm& p, int k_tile) {
    const std::uint32_t k0 = r0 + static_cast<std::uint32_t>(k_tile) * kBK;
    CUTE_UNROLL
    for (int j = 0; j < Chunks::kCount; ++j) {
      const std::uint32_t r = min(k0 + static_cast<std::uint32_t>(Chunks::line(j)), r1 - 1);
      if constexpr (kAIndexed) a_next[j] = entry(p.a, r);
      if constexpr (kBIndexed) b_next[j] = entry(p.b, r);
    }
  }

  __device__ __forceinline__ void load_a(const VarlenKGemm& p, T* smem_a, int stage, int k_tile) {
    const std::uint32_t k0 = r0 + static_cast<std::uint32_t>(k_tile) * kBK;
    std::uint32_t a_rows[Chunks::kCount];
    inside = 0;
    CUTE_UNROLL
    for (int j = 0; j < Chunks::kCount; ++j) {
      const std::uint32_t r = k0 + static_cast<std::uint32_t>(Chunks::line(j));
      inside |= (r < r1 ? 1u : 0u) << j;
      const std::uint32_t clamped = min(r, r1 - 1);
      a_rows[j] = kAIndexed ? a_divide(a_next[j]) : clamped;
      const std::uint32_t b_row = kBIndexed ? b_divide(b_next[j]) : clamped;
      b_src[j] = b_col + static_cast<std::uint64_t>(b_row) * b_ld_bytes;
    }
    if (r1 > r0) fetch_entries(p, k_tile + 1);
    CUTE_UNROLL
    for (int j = 0; j < Chunks::kCount; ++j) {
      const T* src = reinterpret_cast<const T*>(a_col + static_cast<std::uint64_t>(a_rows[j]) * a_ld_bytes);
      chunks_a.template copy<kAligned>(smem_a, stage, j, src, (inside >> j) & 1u ? a_valid : 0, src);
    }
  }

  __device__ __forceinline__ void load_b(const VarlenKGemm& p, T* smem_b, int stage) const {
    CUTE_UNROLL
    for (int j = 0; j < Chunks::kCount; ++j) {
      const bool in = (inside >> j) & 1u;
      CUTE_UNROLL
      for (int h = 0; h < kParts; ++h) {
        const T* src = reinterpret_cast<const T*>(b_src[j] + b_part[h]);
        chunks_b[h].template copy<kAligned>(smem_b, stage, j, src, in ? b_valid[h] : 0, src);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// varlen-M: the grid spans (row tiles, column tiles); row tiles index the device-built tile list
// (tile_prefix[e] = inclusive count of kBM-row tiles of experts 0..e), visited in groups.

template <class Config, bool kBKMajor, bool kAligned>
__global__ void __launch_bounds__(Config::kThreads, Config::kMinBlocks)
    varlen_m_gemm_kernel(VarlenMGemm p, const int* __restrict__ tile_prefix) {
  using namespace cute;
  using T = typename Config::Element;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;
  constexpr int kBK = Config::kBK;

  const RasterTile raster = grouped_raster(p.raster_group_rows);
  if (p.num_experts == 0 || raster.row >= tile_prefix[p.num_experts - 1]) return;
  const VarlenMTile t = varlen_m_tile<kBM, kBN>(p, tile_prefix, raster.row, raster.column);

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  constexpr auto layout_a = Config::template copy_layout<true, kBM>();
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(layout_a);

  VarlenMCopies<Config, kBKMajor, kAligned> copies;
  copies.locate(p, t.e, t.row0, t.row_end, t.n0);
  auto load_a = [&](int stage, int k_tile) { copies.load_a(p, smem_a, stage, k_tile); };
  auto load_b = [&](int stage, int k_tile) { copies.load_b(p, smem_b, stage, k_tile); };

  typename Config::template TiledMma<true, kBKMajor> mma;
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kBM>{}, Int<kBN>{}));  // (MMA,MMA_M,MMA_N)
  clear(acc);
  const int k_tiles = static_cast<int>((p.k + kBK - 1) / kBK);
  Config::template mainloop<true, kBKMajor>(smem_a, smem_b, k_tiles, load_a, load_b, acc);

  // Epilogue: bias, convert, scatter rows to their destination.
  Tensor coord = mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
  store_varlen_m_tile<Config, kBKMajor>(p, acc, coord, smem_raw, t.e, t.row0, t.row_end, t.n0);
}

// The grid of a one-tile-per-block varlen-M launch: (row tiles, column tiles). At most
// ceil(L / BM) + E row tiles exist; the blocks past the device-built count return.
template <class Config>
dim3 varlen_m_grid(const VarlenMGemm& g) {
  return dim3(ceil_div(g.rows, Config::kBM) + static_cast<unsigned>(g.num_experts), ceil_div(g.n, Config::kBN));
}

// Launches the varlen-M kernel of Config; kAlignedOnly configurations have no element-wise
// copy path (the caller checked chunks_aligned).
template <class Config, bool kBKMajor, bool kAlignedOnly = false>
void launch_varlen_m_gemm_with(const VarlenMGemm& g, const int* tile_prefix, cudaStream_t stream) {
  constexpr int smem = gemm_smem_bytes<Config, true, kBKMajor>();
  auto kernel = varlen_m_gemm_kernel<Config, kBKMajor, true>;
  if constexpr (!kAlignedOnly) {
    if (!chunks_aligned(g, Config::kVec)) kernel = varlen_m_gemm_kernel<Config, kBKMajor, false>;
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "varlen-M GEMM: shared memory size");
  const dim3 grid = varlen_m_grid<Config>(g);
  kernel<<<grid, Config::kThreads, smem, stream>>>(g, tile_prefix);
  check_launch("varlen-M GEMM");
}

// ---------------------------------------------------------------------------------------------
// varlen-K: grid (M tiles, N tiles, experts); each block reduces over its expert's rows.
template <class Config, bool kAligned>
__global__ void __launch_bounds__(Config::kThreads, Config::kMinBlocks)
    varlen_k_gemm_kernel(VarlenKGemm p) {
  using namespace cute;
  using T = typename Config::Element;
  constexpr int kBM = Config::kBM;
  constexpr int kBN = Config::kBN;

  const int e = static_cast<int>(blockIdx.z);
  // Grouped raster over (M tiles, N tiles) within the expert, as in varlen-M.
  const RasterTile raster = grouped_raster(8);
  const std::int64_t m0 = static_cast<std::int64_t>(raster.row) * kBM;
  const std::int64_t n0 = static_cast<std::int64_t>(raster.column) * kBN;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  constexpr auto layout_a = Config::template copy_layout<false, kBM>();
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + cosize(layout_a);

  VarlenKCopies<Config, kAligned> copies(p);
  copies.locate(p, e, m0, n0);
  auto load_a = [&](int stage, int k_tile) { copies.load_a(p, smem_a, stage, k_tile); };
  auto load_b = [&](int stage, int) { copies.load_b(p, smem_b, stage); };

  typename Config::template TiledMma<false, false> mma;
  Tensor acc = partition_fragment_C(mma, make_shape(Int<kBM>{}, Int<kBN>{}));
  clear(acc);
  const int k_tiles = copies.k_tiles();
  Config::template mainloop<false, false>(smem_a, smem_b, k_tiles, load_a, load_b, acc);

  Tensor coord = mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(make_shape(Int<kBM>{}, Int<kBN>{})));
  store_varlen_k_tile<Config>(p, acc, coord, smem_raw, e, m0, n0);
}

template <class Config, bool kAlignedOnly = false>
void launch_varlen_k_gemm_with(const VarlenKGemm& g, cudaStream_t stream) {
  constexpr int smem = gemm_smem_bytes<Config, false, false>();
  auto kernel = varlen_k_gemm_kernel<Config, true>;
  if constexpr (!kAlignedOnly) {
    if (!chunks_aligned(g, Config::kVec)) kernel = varlen_k_gemm_kernel<Config, false>;
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
             "varlen-K GEMM: shared memory size");
  const dim3 grid(ceil_div(g.m, Config::kBM), ceil_div(g.n, Config::kBN),
                  static_cast<unsigned>(g.num_experts));
  kernel<<<grid, Config::kThreads, smem, stream>>>(g);
  check_launch("varlen-K GEMM");
}

}  // namespace scattermoe::cuda
