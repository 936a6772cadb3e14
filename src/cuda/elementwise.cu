// Memory-bound kernels: one block per row (or token), threads across the columns, 16-byte
// accesses where the layout allows; the MLP backward's row pass takes one warp per row.
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "core/activation_math.hpp"
#include "cuda/kernels.hpp"

namespace scattermoe::cuda {

namespace {

constexpr int kThreads = 256;

// kVec consecutive elements moved as one access (16 bytes when the host found every row
// start and width a multiple of it, else 1).
template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Chunk {
  T v[kVec];
};

template <class T, int kVec>
__device__ __forceinline__ void load_chunk(const T* p, float (&out)[kVec]) {
  const Chunk<T, kVec> c = *reinterpret_cast<const Chunk<T, kVec>*>(p);
  CUTE_UNROLL
  for (int i = 0; i < kVec; ++i) out[i] = to_float(c.v[i]);
}

template <class T, int kVec>
__device__ __forceinline__ void store_chunk(T* p, const float (&in)[kVec]) {
  Chunk<T, kVec> c;
  CUTE_UNROLL
  for (int i = 0; i < kVec; ++i) c.v[i] = T(in[i]);
  *reinterpret_cast<Chunk<T, kVec>*>(p) = c;
}

template <class T, int kVec>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(RowSource src, T* out, std::int64_t ld_out, std::int64_t cols,
                       FlatFloats coeff, bool has_coeff, const std::int64_t* __restrict__ coeff_index) {
  const std::int64_t i = blockIdx.x;
  const T* in = static_cast<const T*>(src.ptr) + src.row(i) * src.ld;
  float scale = 1.0f;
  if (has_coeff) {
    const std::int64_t p = coeff_index ? coeff_index[i] : i;
    scale = load_float(coeff.ptr, coeff.dtype, flat_offset(coeff, p));
  }
  for (std::int64_t c = threadIdx.x * kVec; c < cols; c += blockDim.x * kVec) {
    float v[kVec];
    load_chunk<T, kVec>(in + c, v);
    CUTE_UNROLL
    for (int j = 0; j < kVec; ++j) v[j] *= scale;
    store_chunk<T, kVec>(out + i * ld_out + c, v);
  }
}

// A row gathered by the aggregations, kept inside [0, rows): a plan whose scattered index is not
// a permutation (the CUDA path does not check a caller's plan) leaves entries of its inverse
// unwritten, which then give wrong rows, never an access outside the source.
__device__ __forceinline__ std::int64_t clamp_row(std::int64_t row, std::int64_t rows) {
  return row < 0 ? 0 : (row >= rows ? rows - 1 : row);
}

template <class T, int kVec>
__global__ void __launch_bounds__(kThreads)
    gate_combine_kernel(const T* __restrict__ y, std::int64_t ld_y, FlatFloats gates,
                        T* __restrict__ out, std::int64_t ld_out, std::int64_t cols,
                        const std::int64_t* __restrict__ row_of) {
  const std::int64_t t = blockIdx.x;
  const std::int64_t kg = gates.cols;
  for (std::int64_t c = threadIdx.x * kVec; c < cols; c += blockDim.x * kVec) {
    float acc[kVec] = {};
    for (std::int64_t j = 0; j < kg; ++j) {
      const float g = load_float(gates.ptr, gates.dtype, t * gates.stride0 + j * gates.stride1);
      const std::int64_t row = row_of ? clamp_row(row_of[t * kg + j], gridDim.x * kg) : t * kg + j;
      float v[kVec];
      load_chunk<T, kVec>(y + row * ld_y + c, v);
      CUTE_UNROLL
      for (int q = 0; q < kVec; ++q) acc[q] += g * v[q];
    }
    store_chunk<T, kVec>(out + t * ld_out + c, acc);
  }
}

template <class T, int kVec>
__global__ void __launch_bounds__(kThreads)
    sum_k_rows_kernel(const T* __restrict__ src, std::int64_t ld_src, std::int64_t k,
                      T* __restrict__ out, std::int64_t ld_out, std::int64_t cols,
                      const std::int64_t* __restrict__ row_of) {
  const std::int64_t t = blockIdx.x;
  for (std::int64_t c = threadIdx.x * kVec; c < cols; c += blockDim.x * kVec) {
    float acc[kVec] = {};
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int64_t row = row_of ? clamp_row(row_of[t * k + j], gridDim.x * k) : t * k + j;
      float v[kVec];
      load_chunk<T, kVec>(src + row * ld_src + c, v);
      CUTE_UNROLL
      for (int q = 0; q < kVec; ++q) acc[q] += v[q];
    }
    store_chunk<T, kVec>(out + t * ld_out + c, acc);
  }
}

// One warp per row; lanes stride the columns, then a fixed-order butterfly reduction.
template <class T, int kVec>
__global__ void __launch_bounds__(kThreads) row_dot_kernel(RowDot r) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= r.rows) return;
  const T* a = static_cast<const T*>(r.a.ptr) + r.a.row(i) * r.a.ld;
  const T* b = static_cast<const T*>(r.b.ptr) + r.b.row(i) * r.b.ld;
  float acc = 0.0f;
  for (std::int64_t c = lane * kVec; c < r.cols; c += 32 * kVec) {
    float va[kVec], vb[kVec];
    load_chunk<T, kVec>(a + c, va);
    load_chunk<T, kVec>(b + c, vb);
    CUTE_UNROLL
    for (int q = 0; q < kVec; ++q) acc += va[q] * vb[q];
  }
  if (r.bias) {
    const T* cr = static_cast<const T*>(r.c.ptr) + r.c.row(i) * r.c.ld;
    const T* bias = static_cast<const T*>(r.bias) + r.expert[i] * r.bias_expert_stride;
    for (std::int64_t c = lane; c < r.bias_cols; c += 32) acc += to_float(cr[c]) * to_float(bias[c * r.bias_stride]);
  }
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) {
    const std::int64_t p = r.out_index ? r.out_index[i] : i;
    store_float(r.out.ptr, r.out.dtype, flat_offset(r.out, p), acc);
  }
}

// Each thread owns kVec columns of one expert and sums them down its rows in order.
template <class T, int kVec>
__global__ void __launch_bounds__(kThreads)
    expert_column_sums_kernel(RowSource src, const std::int64_t* __restrict__ expert_offsets,
                              std::int64_t cols, T* __restrict__ db, std::int64_t db_expert_stride,
                              std::int64_t db_stride) {
  const int e = blockIdx.y;
  const std::int64_t c = (static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (c >= cols) return;
  const std::int64_t begin = e ? expert_offsets[e - 1] : 0;
  const std::int64_t end = expert_offsets[e];
  const T* base = static_cast<const T*>(src.ptr);
  float acc[kVec] = {};
  for (std::int64_t i = begin; i < end; ++i) {
    float v[kVec];
    load_chunk<T, kVec>(base + src.row(i) * src.ld + c, v);
    CUTE_UNROLL
    for (int q = 0; q < kVec; ++q) acc[q] += v[q];
  }
  CUTE_UNROLL
  for (int q = 0; q < kVec; ++q) db[e * db_expert_stride + (c + q) * db_stride] = T(acc[q]);
}

template <class T, int kVec>
__global__ void __launch_bounds__(kThreads)
    activation_forward_kernel(Activation act, bool glu, const T* __restrict__ hidden,
                              std::int64_t ld_hidden, std::int64_t h, T* __restrict__ a,
                              std::int64_t ld_a) {
  const std::int64_t i = blockIdx.x;
  const T* row = hidden + i * ld_hidden;
  for (std::int64_t c = threadIdx.x * kVec; c < h; c += blockDim.x * kVec) {
    float first[kVec], out[kVec];
    load_chunk<T, kVec>(row + c, first);
    if (glu) {
      float gate[kVec];
      load_chunk<T, kVec>(row + h + c, gate);
      CUTE_UNROLL
      for (int q = 0; q < kVec; ++q) out[q] = activation_at(act, gate[q]).value * first[q];
    } else {
      CUTE_UNROLL
      for (int q = 0; q < kVec; ++q) out[q] = activation_at(act, first[q]).value;
    }
    store_chunk<T, kVec>(a + i * ld_a + c, out);
  }
}

template <class T, int kVec>
__global__ void __launch_bounds__(kThreads)
    activation_backward_kernel(Activation act, bool glu, const T* __restrict__ hidden,
                               std::int64_t ld_hidden, const T* __restrict__ d_a,
                               std::int64_t ld_d_a, FlatFloats scale, bool has_scale,
                               const std::int64_t* __restrict__ scale_index, std::int64_t h,
                               T* __restrict__ d_hidden, std::int64_t ld_d_hidden) {
  const std::int64_t i = blockIdx.x;
  const T* row = hidden + i * ld_hidden;
  T* out = d_hidden + i * ld_d_hidden;
  float s = 1.0f;
  if (has_scale) {
    const std::int64_t p = scale_index ? scale_index[i] : i;
    s = load_float(scale.ptr, scale.dtype, flat_offset(scale, p));
  }
  for (std::int64_t c = threadIdx.x * kVec; c < h; c += blockDim.x * kVec) {
    float g[kVec], first[kVec], d_first[kVec];
    load_chunk<T, kVec>(d_a + i * ld_d_a + c, g);
    load_chunk<T, kVec>(row + c, first);
    if (glu) {
      float gate[kVec], d_gate[kVec];
      load_chunk<T, kVec>(row + h + c, gate);
      CUTE_UNROLL
      for (int q = 0; q < kVec; ++q) {
        const float dq = g[q] * s;
        const ActivationAt f = activation_at(act, gate[q]);
        d_first[q] = dq * f.value;
        d_gate[q] = dq * first[q] * f.grad;
      }
      store_chunk<T, kVec>(out + h + c, d_gate);
    } else {
      CUTE_UNROLL
      for (int q = 0; q < kVec; ++q) d_first[q] = g[q] * s * activation_at(act, first[q]).grad;
    }
    store_chunk<T, kVec>(out + c, d_first);
  }
}

// One warp per row, lanes striding the columns as row_dot_kernel does, so d_gates is summed in
// the same order; every other value is computed as in the separate kernels.
// One chunk of a row (kVec columns from c): the values loaded, then everything computed and
// stored; `acc` gathers the row dot d_gates takes.
template <class T, int kVec>
struct RowsChunk {
  Chunk<T, kVec> g, first, gate;

  __device__ __forceinline__ void load(const MlpBackwardRows& r, const T* row, const T* d_a, std::int64_t c) {
    g = *reinterpret_cast<const Chunk<T, kVec>*>(d_a + c);
    first = *reinterpret_cast<const Chunk<T, kVec>*>(row + c);
    if (r.glu) gate = *reinterpret_cast<const Chunk<T, kVec>*>(row + r.h + c);
  }

  __device__ __forceinline__ void finish(const MlpBackwardRows& r, float s, T* d_a, T* d_row, std::int64_t c,
                                         float& acc) const {
    float a[kVec];
    if (r.glu) {
      float d_first[kVec], d_gate[kVec];
      CUTE_UNROLL
      for (int q = 0; q < kVec; ++q) {
        const float x = to_float(first.v[q]);
        const ActivationAt f = activation_at(r.act, to_float(gate.v[q]));
        a[q] = to_float(T(f.value * x));
        const float dq = to_float(g.v[q]) * s;
        d_first[q] = dq * f.value;
        d_gate[q] = dq * x * f.grad;
      }
      if (d_row) {
        store_chunk<T, kVec>(d_row + c, d_first);
        store_chunk<T, kVec>(d_row + r.h + c, d_gate);
      }
    } else {
      float d_first[kVec];
      CUTE_UNROLL
      for (int q = 0; q < kVec; ++q) {
        const ActivationAt f = activation_at(r.act, to_float(first.v[q]));
        a[q] = to_float(T(f.value));
        d_first[q] = to_float(g.v[q]) * s * f.grad;
      }
      if (d_row) store_chunk<T, kVec>(d_row + c, d_first);
    }
    CUTE_UNROLL
    for (int q = 0; q < kVec; ++q) acc += to_float(g.v[q]) * a[q];
    if (r.scale_a_in_place) {
      CUTE_UNROLL
      for (int q = 0; q < kVec; ++q) a[q] *= s;
      store_chunk<T, kVec>(d_a + c, a);
    }
  }
};

// All of a chunk's loads are issued before any of its arithmetic; 63 registers, 4 blocks per SM
// (step 33: qwen3 332 us, against 367 us for the form before it, measured in an earlier run).
// Loading the next chunk ahead as well measured slower (80 registers, 3 blocks per SM: 371 us).
template <class T, int kVec>
__global__ void __launch_bounds__(kThreads, 4) mlp_backward_rows_kernel(MlpBackwardRows r) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= r.rows) return;
  const std::int64_t p = r.gate_index[i];
  const float s = load_float(r.gates.ptr, r.gates.dtype, flat_offset(r.gates, p));
  const T* row = static_cast<const T*>(r.hidden) + i * r.ld_hidden;
  T* d_a = static_cast<T*>(r.d_a) + i * r.ld_d_a;
  T* d_row = r.d_hidden ? static_cast<T*>(r.d_hidden) + i * r.ld_d_hidden : nullptr;
  float acc = 0.0f;
  for (std::int64_t c = lane * kVec; c < r.h; c += 32 * kVec) {
    RowsChunk<T, kVec> now;
    now.load(r, row, d_a, c);
    now.finish(r, s, d_a, d_row, c, acc);
  }
  if (r.has_d_gates) {
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
    if (lane == 0) store_float(r.d_gates.ptr, r.d_gates.dtype, flat_offset(r.d_gates, p), acc);
  }
}

// One thread per row: its column tiles' shares in order (deterministic; the same sum every run).
__global__ void __launch_bounds__(kThreads)
    sum_d_gates_partials_kernel(const float* __restrict__ partial, std::int64_t rows, int tiles, FlatFloats d_gates,
                                const std::int64_t* __restrict__ gate_index) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= rows) return;
  float sum = 0.0f;
  for (int t = 0; t < tiles; ++t) sum += partial[i * tiles + t];
  store_float(d_gates.ptr, d_gates.dtype, flat_offset(d_gates, gate_index[i]), sum);
}

// Calls fn(std::integral_constant<int, kVec>) with 16-byte vectors when every pointer is
// 16-byte aligned and every row stride and width is a multiple of the vector, else 1.
template <class T, class Fn>
void with_vector_width(std::initializer_list<const void*> ptrs,
                       std::initializer_list<std::int64_t> extents, Fn&& fn) {
  constexpr int kWide = static_cast<int>(16 / sizeof(T));
  bool wide = true;
  for (const void* p : ptrs) wide = wide && reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
  for (std::int64_t n : extents) wide = wide && n % kWide == 0;
  if (wide) fn(std::integral_constant<int, kWide>{}); else fn(std::integral_constant<int, 1>{});
}

}  // namespace

FlatFloats flat_floats(const TensorView& v) {
  FlatFloats f;
  f.ptr = v.data();
  f.dtype = v.dtype();
  if (v.rank() == 2) {
    f.cols = v.size(1);
    f.stride0 = v.stride(0);
    f.stride1 = v.stride(1);
  } else {
    f.cols = 1;
    f.stride0 = v.stride(0);
    f.stride1 = 0;
  }
  if (f.cols == 0) f.cols = 1;
  return f;
}

void gather_rows(DType dtype, RowSource src, void* out, std::int64_t ld_out, std::int64_t rows,
                 std::int64_t cols, const FlatFloats* coeff, const std::int64_t* coeff_index,
                 cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  dispatch_float(dtype, [&](auto element) {
    using T = decltype(element);
    with_vector_width<T>({src.ptr, out}, {src.ld, ld_out, cols}, [&](auto vec) {
      gather_rows_kernel<T, vec()><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          src, static_cast<T*>(out), ld_out, cols, coeff ? *coeff : FlatFloats{}, coeff != nullptr,
          coeff_index);
    });
  });
  check_launch("gather rows");
}

void gate_combine(DType dtype, const void* y, std::int64_t ld_y, const FlatFloats& gates,
                  std::int64_t tokens, void* out, std::int64_t ld_out, std::int64_t cols,
                  cudaStream_t stream, const std::int64_t* row_of) {
  if (tokens == 0 || cols == 0) return;
  dispatch_float(dtype, [&](auto element) {
    using T = decltype(element);
    with_vector_width<T>({y, out}, {ld_y, ld_out, cols}, [&](auto vec) {
      gate_combine_kernel<T, vec()><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
          static_cast<const T*>(y), ld_y, gates, static_cast<T*>(out), ld_out, cols, row_of);
    });
  });
  check_launch("gate combine");
}

void sum_k_rows(DType dtype, const void* src, std::int64_t ld_src, std::int64_t k,
                std::int64_t tokens, void* out, std::int64_t ld_out, std::int64_t cols,
                cudaStream_t stream, const std::int64_t* row_of) {
  if (tokens == 0 || cols == 0) return;
  dispatch_float(dtype, [&](auto element) {
    using T = decltype(element);
    with_vector_width<T>({src, out}, {ld_src, ld_out, cols}, [&](auto vec) {
      sum_k_rows_kernel<T, vec()><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
          static_cast<const T*>(src), ld_src, k, static_cast<T*>(out), ld_out, cols, row_of);
    });
  });
  check_launch("sum over k");
}

namespace {
__global__ void __launch_bounds__(kThreads)
    invert_rows_kernel(const std::int64_t* __restrict__ index, std::int64_t rows, std::int64_t* __restrict__ inverse) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < rows) inverse[index[i]] = i;
}
}  // namespace

void invert_rows(const std::int64_t* index, std::int64_t rows, std::int64_t* inverse, cudaStream_t stream) {
  if (rows == 0) return;
  invert_rows_kernel<<<static_cast<unsigned>(ceil_div(rows, kThreads)), kThreads, 0, stream>>>(index, rows, inverse);
  check_launch("invert rows");
}

void row_dot(DType dtype, const RowDot& r, cudaStream_t stream) {
  if (r.rows == 0) return;
  dispatch_float(dtype, [&](auto element) {
    using T = decltype(element);
    with_vector_width<T>({r.a.ptr, r.b.ptr}, {r.a.ld, r.b.ld, r.cols}, [&](auto vec) {
      row_dot_kernel<T, vec()><<<ceil_div(r.rows, kThreads / 32), kThreads, 0, stream>>>(r);
    });
  });
  check_launch("row dot");
}

void expert_column_sums(DType dtype, RowSource src, const std::int64_t* expert_offsets,
                        int num_experts, std::int64_t cols, void* db, std::int64_t db_expert_stride,
                        std::int64_t db_stride, cudaStream_t stream) {
  if (num_experts == 0 || cols == 0) return;
  dispatch_float(dtype, [&](auto element) {
    using T = decltype(element);
    with_vector_width<T>({src.ptr}, {src.ld, cols}, [&](auto vec) {
      const dim3 grid(ceil_div(cols, kThreads * vec()), static_cast<unsigned>(num_experts));
      expert_column_sums_kernel<T, vec()><<<grid, kThreads, 0, stream>>>(
          src, expert_offsets, cols, static_cast<T*>(db), db_expert_stride, db_stride);
    });
  });
  check_launch("expert column sums");
}

void activation_forward(DType dtype, Activation act, bool glu, const void* hidden,
                        std::int64_t ld_hidden, std::int64_t rows, std::int64_t h, void* a,
                        std::int64_t ld_a, cudaStream_t stream) {
  if (rows == 0 || h == 0) return;
  dispatch_float(dtype, [&](auto element) {
    using T = decltype(element);
    with_vector_width<T>({hidden, a}, {ld_hidden, ld_a, h}, [&](auto vec) {
      activation_forward_kernel<T, vec()><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          act, glu, static_cast<const T*>(hidden), ld_hidden, h, static_cast<T*>(a), ld_a);
    });
  });
  check_launch("activation forward");
}

void activation_backward(DType dtype, Activation act, bool glu, const void* hidden,
                         std::int64_t ld_hidden, const void* d_a, std::int64_t ld_d_a,
                         const FlatFloats* scale, const std::int64_t* scale_index,
                         std::int64_t rows, std::int64_t h, void* d_hidden,
                         std::int64_t ld_d_hidden, cudaStream_t stream) {
  if (rows == 0 || h == 0) return;
  dispatch_float(dtype, [&](auto element) {
    using T = decltype(element);
    with_vector_width<T>({hidden, d_a, d_hidden}, {ld_hidden, ld_d_a, ld_d_hidden, h}, [&](auto vec) {
      activation_backward_kernel<T, vec()><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          act, glu, static_cast<const T*>(hidden), ld_hidden, static_cast<const T*>(d_a), ld_d_a,
          scale ? *scale : FlatFloats{}, scale != nullptr, scale_index, h, static_cast<T*>(d_hidden),
          ld_d_hidden);
    });
  });
  check_launch("activation backward");
}

void mlp_backward_rows(DType dtype, const MlpBackwardRows& r, cudaStream_t stream) {
  if (r.rows == 0 || r.h == 0) return;
  dispatch_float(dtype, [&](auto element) {
    using T = decltype(element);
    with_vector_width<T>({r.hidden, r.d_a, r.d_hidden}, {r.ld_hidden, r.ld_d_a, r.ld_d_hidden, r.h},
                         [&](auto vec) {
      mlp_backward_rows_kernel<T, vec()><<<ceil_div(r.rows, kThreads / 32), kThreads, 0, stream>>>(r);
    });
  });
  check_launch("mlp backward rows");
}

void sum_d_gates_partials(const float* partial, std::int64_t rows, int tiles, const FlatFloats& d_gates,
                          const std::int64_t* gate_index, cudaStream_t stream) {
  if (rows == 0) return;
  sum_d_gates_partials_kernel<<<ceil_div(rows, kThreads), kThreads, 0, stream>>>(partial, rows, tiles, d_gates,
                                                                                 gate_index);
  check_launch("d_gates sum");
}

}  // namespace scattermoe::cuda
