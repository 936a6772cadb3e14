// The cuBLAS ceiling and the per-expert cuBLAS loop of `scattermoe bench` (bench_cublas.hpp),
// with the memory-bound kernels the loop needs besides the library's `group`: the GLU forward
// and backward, the inverse of the plan's permutation, the (gated) sum of each token's k grouped
// rows, and the gate gradient as a row dot product. Matrices are row-major; sizes and offsets
// are 64-bit, only cuBLAS's dimensions and leading dimensions are int (checked).
#include "bench_cublas.hpp"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "cuda_util.cuh"
#include "scattermoe/error.hpp"
#include "scattermoe/ops.hpp"
#include "scattermoe/plan.hpp"

namespace scattermoe::tools {
namespace {


void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw Unsupported(std::string("bench comparisons: ") + what + ": " +
                      cublasGetStatusName(status) + " (" + cublasGetStatusString(status) + ")");
  }
}

// ---- element types ----------------------------------------------------------------------------
template <class T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}) with the CUDA element type of a float dtype.
template <class Fn>
void dispatch_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(Tag<float>{}); return;
    case DType::kFloat16: fn(Tag<__half>{}); return;
    case DType::kBFloat16: fn(Tag<__nv_bfloat16>{}); return;
    default:
      throw Unsupported(std::string("bench comparisons: no kernels for dtype ") +
                        dtype_name(dtype));
  }
}

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return CUDA_R_32F;
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kBFloat16: return CUDA_R_16BF;
    default:
      throw Unsupported(std::string("bench comparisons: no cuBLAS type for dtype ") +
                        dtype_name(dtype));
  }
}



// V consecutive elements moved as one access (16 bytes when V = 16 / sizeof(T)).
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <class T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <class T, int V>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& value) {
  if constexpr (sizeof(Pack<T, V>) == 16) {  // one 16-byte store: the compiler splits a plain
    uint4 bits;                              // struct copy of 16-bit elements
    memcpy(&bits, &value, sizeof(bits));
    __stcg(reinterpret_cast<uint4*>(p), bits);
  } else {
    *reinterpret_cast<Pack<T, V>*>(p) = value;
  }
}

// 16-byte packs when every row length (and so every row start in these contiguous buffers, all
// cudaMalloc'ed) is a multiple of them; single elements otherwise.
template <class T>
bool packs_fit(std::initializer_list<std::int64_t> row_lengths) {
  constexpr int kPack = 16 / sizeof(T);
  return std::all_of(row_lengths.begin(), row_lengths.end(),
                     [](std::int64_t n) { return n % kPack == 0; });
}

// ---- the activation of the GLU's gate half ----------------------------------------------------
// Compile-time, so that each pack's loop is branch-free and its stores stay 16-byte wide.
template <Activation kAct>
__device__ __forceinline__ float act_value(float x) {
  if constexpr (kAct == Activation::kSilu) {
    return x / (1.0f + __expf(-x));
  } else if constexpr (kAct == Activation::kGelu) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  } else if constexpr (kAct == Activation::kGeluTanh) {
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
  } else {
    return fmaxf(x, 0.0f);
  }
}

template <Activation kAct>
__device__ __forceinline__ float act_derivative(float x) {
  if constexpr (kAct == Activation::kSilu) {
    const float s = 1.0f / (1.0f + __expf(-x));
    return s * (1.0f + x * (1.0f - s));
  } else if constexpr (kAct == Activation::kGelu) {
    return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) +
           x * 0.39894228040143268f * __expf(-0.5f * x * x);
  } else if constexpr (kAct == Activation::kGeluTanh) {
    constexpr float kC = 0.79788456080286536f;
    const float t = tanhf(kC * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kC * (1.0f + 3.0f * 0.044715f * x * x);
  } else {
    return x > 0.0f ? 1.0f : 0.0f;
  }
}

// Calls body(std::integral_constant<Activation, act>) (in device code: one branch per kernel).
template <class Body>
__device__ __forceinline__ void with_activation(Activation act, Body&& body) {
  switch (act) {
    case Activation::kSilu: body(std::integral_constant<Activation, Activation::kSilu>{}); return;
    case Activation::kGelu: body(std::integral_constant<Activation, Activation::kGelu>{}); return;
    case Activation::kGeluTanh:
      body(std::integral_constant<Activation, Activation::kGeluTanh>{});
      return;
    case Activation::kRelu: body(std::integral_constant<Activation, Activation::kRelu>{}); return;
  }
}

// ---- kernels (grid-stride loops over packs) ----------------------------------------------------
__device__ __forceinline__ std::int64_t thread_index() {
  return static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ std::int64_t thread_count() {
  return static_cast<std::int64_t>(gridDim.x) * blockDim.x;
}

// a[r, c] = act(hidden[r, h + c]) * hidden[r, c]                   hidden (rows, 2h), a (rows, h)
template <class T, int V>
__global__ void glu_forward_kernel(const T* __restrict__ hidden, T* __restrict__ a,
                                   std::int64_t rows, std::int64_t h, Activation act) {
  with_activation(act, [&](auto kind) {
    constexpr Activation kAct = decltype(kind)::value;
    const std::int64_t packs = h / V;
    for (std::int64_t i = thread_index(); i < rows * packs; i += thread_count()) {
      const std::int64_t r = i / packs;
      const std::int64_t c = (i - r * packs) * V;
      const Pack<T, V> up = load<T, V>(hidden + r * 2 * h + c);
      const Pack<T, V> gate = load<T, V>(hidden + r * 2 * h + h + c);
      Pack<T, V> out;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        out.v[v] = from_float<T>(act_value<kAct>(to_float(gate.v[v])) * to_float(up.v[v]));
      }
      store<T, V>(a + r * h + c, out);
    }
  });
}

// d_hidden[r, c] = d_a * act(g), d_hidden[r, h + c] = d_a * up * act'(g), with up = hidden[r, c],
// g = hidden[r, h + c], d_a = d_a[r, c].         hidden, d_hidden (rows, 2h), d_a (rows, h)
template <class T, int V>
__global__ void glu_backward_kernel(const T* __restrict__ hidden, const T* __restrict__ d_a,
                                    T* __restrict__ d_hidden, std::int64_t rows, std::int64_t h,
                                    Activation act) {
  with_activation(act, [&](auto kind) {
    constexpr Activation kAct = decltype(kind)::value;
    const std::int64_t packs = h / V;
    for (std::int64_t i = thread_index(); i < rows * packs; i += thread_count()) {
      const std::int64_t r = i / packs;
      const std::int64_t c = (i - r * packs) * V;
      const Pack<T, V> up = load<T, V>(hidden + r * 2 * h + c);
      const Pack<T, V> gate = load<T, V>(hidden + r * 2 * h + h + c);
      const Pack<T, V> grad = load<T, V>(d_a + r * h + c);
      Pack<T, V> d_up, d_gate;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const float g = to_float(gate.v[v]);
        const float da = to_float(grad.v[v]);
        d_up.v[v] = from_float<T>(da * act_value<kAct>(g));
        d_gate.v[v] = from_float<T>(da * to_float(up.v[v]) * act_derivative<kAct>(g));
      }
      store<T, V>(d_hidden + r * 2 * h + c, d_up);
      store<T, V>(d_hidden + r * 2 * h + h + c, d_gate);
    }
  });
}

// inverse[sorted_scattered_idxs[i]] = i: the grouped row of every flat position.
__global__ void invert_permutation_kernel(const std::int64_t* __restrict__ sorted_scattered_idxs,
                                          std::int64_t* __restrict__ inverse, std::int64_t n) {
  for (std::int64_t i = thread_index(); i < n; i += thread_count()) {
    inverse[sorted_scattered_idxs[i]] = i;
  }
}

// out[t, c] = sum_j coeff[t*k + j] * grouped[inverse[t*k + j], c] (coeff 1 when null): the k
// grouped rows of every token back in token order.    grouped (T*k, d), out (T, d), coeff (T*k)
template <class T, int V>
__global__ void sum_token_rows_kernel(const T* __restrict__ grouped,
                                      const std::int64_t* __restrict__ inverse,
                                      const T* __restrict__ coeff, T* __restrict__ out,
                                      std::int64_t tokens, int k, std::int64_t d) {
  const std::int64_t packs = d / V;
  for (std::int64_t i = thread_index(); i < tokens * packs; i += thread_count()) {
    const std::int64_t t = i / packs;
    const std::int64_t c = (i - t * packs) * V;
    float acc[V] = {};
    for (int j = 0; j < k; ++j) {
      const std::int64_t p = t * k + j;
      const float g = coeff ? to_float(coeff[p]) : 1.0f;
      const Pack<T, V> row = load<T, V>(grouped + inverse[p] * d + c);
#pragma unroll
      for (int v = 0; v < V; ++v) acc[v] += g * to_float(row.v[v]);
    }
    Pack<T, V> result;
#pragma unroll
    for (int v = 0; v < V; ++v) result.v[v] = from_float<T>(acc[v]);
    store<T, V>(out + t * d + c, result);
  }
}

// d_gates[p] = <grouped[i], d_out[p / k]> with p = sorted_scattered_idxs[i]: the gradient of the
// gate of routed row p, from the expert output kept by the forward. One warp per grouped row.
template <class T, int V>
__global__ void gate_grad_kernel(const T* __restrict__ grouped, const T* __restrict__ d_out,
                                 const std::int64_t* __restrict__ sorted_scattered_idxs,
                                 T* __restrict__ d_gates, std::int64_t rows, int k,
                                 std::int64_t d) {
  const std::int64_t i = thread_index() / 32;
  const int lane = threadIdx.x % 32;
  if (i >= rows) return;
  const std::int64_t p = sorted_scattered_idxs[i];
  const T* y = grouped + i * d;
  const T* g = d_out + (p / k) * d;
  float acc = 0.0f;
  for (std::int64_t c = static_cast<std::int64_t>(lane) * V; c < d; c += 32 * V) {
    const Pack<T, V> a = load<T, V>(y + c);
    const Pack<T, V> b = load<T, V>(g + c);
#pragma unroll
    for (int v = 0; v < V; ++v) acc += to_float(a.v[v]) * to_float(b.v[v]);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) d_gates[p] = from_float<T>(acc);
}

constexpr int kThreads = 256;

// ---- the shared state of both comparisons -----------------------------------------------------
// One set of grouped (L-row) buffers serves the ceiling and the loop: they run one after another.
class CublasRunner {
 public:
  CublasRunner(BenchDevice& device, const BenchLayer& layer, const Context& ctx)
      : device_(device),
        layer_(layer),
        stream_(reinterpret_cast<cudaStream_t>(ctx.stream)),
        type_(cuda_type(layer.dtype)) {
    const LayerShape& s = layer.shape;
    T_ = s.tokens;
    d_ = s.d_model;
    h_ = s.d_ff;
    E_ = s.experts;
    k_ = s.topk;
    L_ = T_ * k_;
    elem_ = dtype_size(layer.dtype);
    int device_index = 0;
    check_cuda(cudaGetDevice(&device_index), "cudaGetDevice");
    check_cuda(
        cudaDeviceGetAttribute(&multiprocessors_, cudaDevAttrMultiProcessorCount, device_index),
        "cudaDeviceGetAttribute");

    // Grouped rows, shared by the ceiling (as its M = L rows) and the loop.
    xg_ = add_shared({L_, d_});
    hidden_ = add_shared({L_, 2 * h_});
    a_ = add_shared({L_, h_});
    yg_ = add_shared({L_, d_});
    dyg_ = add_shared({L_, d_});
    da_ = add_shared({L_, h_});
    d_hidden_ = add_shared({L_, 2 * h_});
    dxg_ = add_shared({L_, d_});
    // cuBLAS's workspace, set explicitly so that it is counted (32 MiB: NVIDIA's advice for
    // Hopper).
    constexpr std::size_t kCublasWorkspace = std::size_t{32} << 20;
    void* cublas_workspace = allocate(kCublasWorkspace, shared_bytes_);

    // The loop's own: its routing plan, the inverse permutation and its outputs.
    plan_.sorted_expert_idxs = add_loop(DType::kInt64, {L_});
    plan_.sorted_scattered_idxs = add_loop(DType::kInt64, {L_});
    plan_.expert_offsets = add_loop(DType::kInt64, {E_});
    inverse_ = add_loop(DType::kInt64, {L_}).data();
    out_ = add_loop(layer.dtype, {T_, d_});
    dx_ = add_loop(layer.dtype, {T_, d_});
    d_gates_ = add_loop(layer.dtype, {T_, k_});
    const std::size_t plan_workspace = routing_plan_workspace_size(
        T_, static_cast<int>(k_), static_cast<int>(E_), layer.x.device());
    ctx_.stream = ctx.stream;
    ctx_.workspace = Workspace{allocate(plan_workspace, loop_bytes_), plan_workspace};
    check_cuda(cudaMallocHost(&host_offsets_, static_cast<std::size_t>(E_) * sizeof(std::int64_t)),
               "cudaMallocHost");

    check_cublas(cublasCreate(&handle_), "cublasCreate");
    check_cublas(cublasSetStream(handle_, stream_), "cublasSetStream");
    check_cublas(cublasSetWorkspace(handle_, cublas_workspace, kCublasWorkspace),
                 "cublasSetWorkspace");
  }

  ~CublasRunner() {
    if (handle_) cublasDestroy(handle_);
    if (host_offsets_) cudaFreeHost(host_offsets_);
  }
  CublasRunner(const CublasRunner&) = delete;
  CublasRunner& operator=(const CublasRunner&) = delete;

  // ---- the ceiling: the six GEMMs with all L rows in expert 0 ----
  void ceiling_forward() {
    gemm(false, true, L_, 2 * h_, d_, xg_, d_, w1(0), d_, hidden_, 2 * h_);  // H = X W1^T
    gemm(false, true, L_, d_, h_, a_, h_, w2(0), h_, yg_, d_);               // Y = A W2^T
  }
  void ceiling_backward() {
    gemm(false, false, L_, h_, d_, dyg_, d_, w2(0), h_, da_, h_);                // dA = dY W2
    gemm(true, false, d_, h_, L_, dyg_, d_, a_, h_, dw2(0), h_);                 // dW2 = dY^T A
    gemm(false, false, L_, d_, 2 * h_, d_hidden_, 2 * h_, w1(0), d_, dxg_, d_);  // dX = dH W1
    gemm(true, false, 2 * h_, d_, L_, d_hidden_, 2 * h_, xg_, d_, dw1(0), d_);   // dW1 = dH^T X
  }

  // ---- the per-expert loop ----
  void loop_forward() {
    build_routing_plan(layer_.expert_idxs, static_cast<int>(E_), plan_, ctx_);
    // The eager loop's host synchronisation: the expert sizes decide its launches.
    check_cuda(cudaMemcpyAsync(host_offsets_, plan_.expert_offsets.data(),
                               static_cast<std::size_t>(E_) * sizeof(std::int64_t),
                               cudaMemcpyDeviceToHost, stream_),
               "copying the expert offsets to the host");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    invert_permutation_kernel<<<grid(L_), kThreads, 0, stream_>>>(
        static_cast<const std::int64_t*>(plan_.sorted_scattered_idxs.data()),
        static_cast<std::int64_t*>(inverse_), L_);
    check_cuda(cudaGetLastError(), "invert_permutation_kernel");
    group(layer_.x, plan_, static_cast<int>(k_), TensorView{}, view(xg_, {L_, d_}), ctx_);
    std::int64_t start = 0;
    for (std::int64_t e = 0; e < E_; ++e) {
      const std::int64_t end = host_offsets_[e], n = end - start;
      if (n > 0) {
        gemm(false, true, n, 2 * h_, d_, row(xg_, start, d_), d_, w1(e), d_,
             row(hidden_, start, 2 * h_), 2 * h_);
        glu_forward(start, n);
        gemm(false, true, n, d_, h_, row(a_, start, h_), h_, w2(e), h_, row(yg_, start, d_), d_);
      }
      start = end;
    }
    sum_token_rows(yg_, layer_.gates.data(), out_.data());
  }

  void loop_backward() {
    // dY = gate * dOut in grouped order; the gate gradient from the kept expert outputs Y.
    group(layer_.d_out, plan_, static_cast<int>(k_), layer_.gates, view(dyg_, {L_, d_}), ctx_);
    gate_grad();
    std::int64_t start = 0;
    for (std::int64_t e = 0; e < E_; ++e) {
      const std::int64_t end = host_offsets_[e], n = end - start;
      if (n > 0) {
        gemm(false, false, n, h_, d_, row(dyg_, start, d_), d_, w2(e), h_, row(da_, start, h_),
             h_);  // dA
        gemm(true, false, d_, h_, n, row(dyg_, start, d_), d_, row(a_, start, h_), h_, dw2(e),
             h_);                // dW2
        glu_backward(start, n);  // dH
        gemm(false, false, n, d_, 2 * h_, row(d_hidden_, start, 2 * h_), 2 * h_, w1(e), d_,
             row(dxg_, start, d_), d_);  // dX
        gemm(true, false, 2 * h_, d_, n, row(d_hidden_, start, 2 * h_), 2 * h_, row(xg_, start, d_),
             d_, dw1(e), d_);  // dW1
      } else {                 // an expert without rows has zero weight gradients
        check_cuda(
            cudaMemsetAsync(dw1(e), 0, static_cast<std::size_t>(2 * h_ * d_) * elem_, stream_),
            "cudaMemsetAsync");
        check_cuda(cudaMemsetAsync(dw2(e), 0, static_cast<std::size_t>(d_ * h_) * elem_, stream_),
                   "cudaMemsetAsync");
      }
      start = end;
    }
    sum_token_rows(dxg_, nullptr, dx_.data());
  }

  // Bytes beyond inputs and weights: the grouped buffers and cuBLAS's workspace, plus the
  // gradients of one expert's weights (the ceiling) or of all of them, the plan and the outputs
  // (the loop).
  std::size_t ceiling_extra_bytes() const {
    return shared_bytes_ + static_cast<std::size_t>(3 * h_ * d_) * elem_;
  }
  std::size_t loop_extra_bytes() const {
    return shared_bytes_ + loop_bytes_ + static_cast<std::size_t>(E_ * 3 * h_ * d_) * elem_;
  }

  TensorView out() const { return out_; }
  TensorView dx() const { return dx_; }
  TensorView d_gates() const { return d_gates_; }

  std::string type_name() const { return dtype_name(layer_.dtype); }

 private:
  void* allocate(std::size_t bytes, std::size_t& counter) {
    buffers_.emplace_back(device_, bytes);
    counter += bytes;
    void* data = buffers_.back().data();
    // Defined contents before the first run (the ceiling reads buffers the loop writes).
    if (data) check_cuda(cudaMemsetAsync(data, 0, bytes, stream_), "cudaMemsetAsync");
    return data;
  }
  static std::size_t bytes_of(DType dtype, std::initializer_list<std::int64_t> shape) {
    std::size_t bytes = dtype_size(dtype);
    for (std::int64_t n : shape) bytes *= static_cast<std::size_t>(n);
    return bytes;
  }
  void* add_shared(std::initializer_list<std::int64_t> shape) {
    return allocate(bytes_of(layer_.dtype, shape), shared_bytes_);
  }
  TensorView add_loop(DType dtype, std::initializer_list<std::int64_t> shape) {
    return TensorView::contiguous(allocate(bytes_of(dtype, shape), loop_bytes_), dtype, shape,
                                  layer_.x.device());
  }
  TensorView view(void* data, std::initializer_list<std::int64_t> shape) const {
    return TensorView::contiguous(data, layer_.dtype, shape, layer_.x.device());
  }

  // Row r of a row-major matrix with rows of `cols` elements.
  void* row(void* base, std::int64_t r, std::int64_t cols) const {
    return static_cast<char*>(base) + static_cast<std::size_t>(r * cols) * elem_;
  }
  void* w1(std::int64_t e) const { return row(layer_.w1.data(), e * 2 * h_, d_); }
  void* w2(std::int64_t e) const { return row(layer_.w2.data(), e * d_, h_); }
  void* dw1(std::int64_t e) const { return row(layer_.dw1.data(), e * 2 * h_, d_); }
  void* dw2(std::int64_t e) const { return row(layer_.dw2.data(), e * d_, h_); }

  static int to_int(std::int64_t value, const char* what) {
    if (value < 0 || value > INT_MAX) {
      throw Unsupported(std::string("bench comparisons: cuBLAS ") + what + " " +
                        std::to_string(value) + " does not fit in an int");
    }
    return static_cast<int>(value);
  }

  // Row-major C (m x n, row stride ldc) = op(A) (m x kk) * op(B) (kk x n), where A is stored
  // (m x kk) or, transposed, (kk x m) with row stride lda, and B likewise. cuBLAS is
  // column-major: a row-major matrix is its transpose there, so it computes C^T = op(B)^T op(A)^T.
  void gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t kk,
            const void* a, std::int64_t lda, const void* b, std::int64_t ldb, void* c,
            std::int64_t ldc) {
    const float alpha = 1.0f, beta = 0.0f;
    check_cublas(cublasGemmEx(handle_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                              trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, to_int(n, "n"), to_int(m, "m"),
                              to_int(kk, "k"), &alpha, b, type_, to_int(ldb, "ldb"), a, type_,
                              to_int(lda, "lda"), &beta, c, type_, to_int(ldc, "ldc"),
                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 "cublasGemmEx");
  }

  unsigned grid(std::int64_t work) const {
    const std::int64_t blocks = (work + kThreads - 1) / kThreads;
    return static_cast<unsigned>(
        std::max<std::int64_t>(1, std::min<std::int64_t>(blocks, multiprocessors_ * 8)));
  }

  void glu_forward(std::int64_t start, std::int64_t n) {
    dispatch_float(layer_.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      constexpr int kPack = 16 / sizeof(T);
      const T* hidden = static_cast<const T*>(row(hidden_, start, 2 * h_));
      T* a = static_cast<T*>(row(a_, start, h_));
      if (packs_fit<T>({h_})) {
        glu_forward_kernel<T, kPack>
            <<<grid(n * h_ / kPack), kThreads, 0, stream_>>>(hidden, a, n, h_, layer_.activation);
      } else {
        glu_forward_kernel<T, 1>
            <<<grid(n * h_), kThreads, 0, stream_>>>(hidden, a, n, h_, layer_.activation);
      }
    });
    check_cuda(cudaGetLastError(), "glu_forward_kernel");
  }

  void glu_backward(std::int64_t start, std::int64_t n) {
    dispatch_float(layer_.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      constexpr int kPack = 16 / sizeof(T);
      const T* hidden = static_cast<const T*>(row(hidden_, start, 2 * h_));
      const T* d_a = static_cast<const T*>(row(da_, start, h_));
      T* d_hidden = static_cast<T*>(row(d_hidden_, start, 2 * h_));
      if (packs_fit<T>({h_})) {
        glu_backward_kernel<T, kPack><<<grid(n * h_ / kPack), kThreads, 0, stream_>>>(
            hidden, d_a, d_hidden, n, h_, layer_.activation);
      } else {
        glu_backward_kernel<T, 1><<<grid(n * h_), kThreads, 0, stream_>>>(hidden, d_a, d_hidden, n,
                                                                          h_, layer_.activation);
      }
    });
    check_cuda(cudaGetLastError(), "glu_backward_kernel");
  }

  void sum_token_rows(const void* grouped, const void* coeff, void* out) {
    dispatch_float(layer_.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      constexpr int kPack = 16 / sizeof(T);
      const auto* g = static_cast<const T*>(grouped);
      const auto* c = static_cast<const T*>(coeff);
      const auto* inverse = static_cast<const std::int64_t*>(inverse_);
      const int k = static_cast<int>(k_);
      if (packs_fit<T>({d_})) {
        sum_token_rows_kernel<T, kPack><<<grid(T_ * d_ / kPack), kThreads, 0, stream_>>>(
            g, inverse, c, static_cast<T*>(out), T_, k, d_);
      } else {
        sum_token_rows_kernel<T, 1><<<grid(T_ * d_), kThreads, 0, stream_>>>(
            g, inverse, c, static_cast<T*>(out), T_, k, d_);
      }
    });
    check_cuda(cudaGetLastError(), "sum_token_rows_kernel");
  }

  void gate_grad() {
    dispatch_float(layer_.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      constexpr int kPack = 16 / sizeof(T);
      const unsigned blocks = static_cast<unsigned>((L_ * 32 + kThreads - 1) / kThreads);
      const auto* y = static_cast<const T*>(yg_);
      const auto* d_out = static_cast<const T*>(layer_.d_out.data());
      const auto* ss = static_cast<const std::int64_t*>(plan_.sorted_scattered_idxs.data());
      auto* d_gates = static_cast<T*>(d_gates_.data());
      const int k = static_cast<int>(k_);
      if (packs_fit<T>({d_})) {
        gate_grad_kernel<T, kPack>
            <<<blocks, kThreads, 0, stream_>>>(y, d_out, ss, d_gates, L_, k, d_);
      } else {
        gate_grad_kernel<T, 1><<<blocks, kThreads, 0, stream_>>>(y, d_out, ss, d_gates, L_, k, d_);
      }
    });
    check_cuda(cudaGetLastError(), "gate_grad_kernel");
  }

  BenchDevice& device_;
  BenchLayer layer_;
  cudaStream_t stream_ = nullptr;
  cudaDataType_t type_;
  std::int64_t T_ = 0, d_ = 0, h_ = 0, E_ = 0, k_ = 0, L_ = 0;
  std::size_t elem_ = 0;
  int multiprocessors_ = 1;
  cublasHandle_t handle_ = nullptr;

  std::vector<DeviceBuffer> buffers_;
  std::size_t shared_bytes_ = 0;
  std::size_t loop_bytes_ = 0;
  // Grouped (L-row) matrices: X, H = X W1^T (up | gate), A = GLU(H), Y = A W2^T, and the
  // gradients of each.
  void* xg_ = nullptr;
  void* hidden_ = nullptr;
  void* a_ = nullptr;
  void* yg_ = nullptr;
  void* dyg_ = nullptr;
  void* da_ = nullptr;
  void* d_hidden_ = nullptr;
  void* dxg_ = nullptr;

  RoutingPlan plan_;
  Context ctx_;  // the bench's stream, the loop's plan workspace
  void* inverse_ = nullptr;
  std::int64_t* host_offsets_ = nullptr;  // pinned
  TensorView out_, dx_, d_gates_;
};

class CublasCeiling final : public BenchComparison {
 public:
  explicit CublasCeiling(std::shared_ptr<CublasRunner> runner) : runner_(std::move(runner)) {}
  std::string key() const override { return "ceiling"; }
  std::string description() const override {
    return "cuBLAS ceiling: the six cublasGemmEx GEMMs (" + runner_->type_name() +
           ", CUBLAS_COMPUTE_32F) of the MLP's shapes with all T*k routed rows in one expert "
           "(forward [L,d]x[d,2h], [L,h]x[h,d]; backward dX and dW of both); no routing, "
           "gather, activation or aggregation";
  }
  void forward() override { runner_->ceiling_forward(); }
  void backward() override { runner_->ceiling_backward(); }
  std::size_t extra_bytes() const override { return runner_->ceiling_extra_bytes(); }

 private:
  std::shared_ptr<CublasRunner> runner_;
};

class PerExpertLoop final : public BenchComparison {
 public:
  explicit PerExpertLoop(std::shared_ptr<CublasRunner> runner) : runner_(std::move(runner)) {}
  std::string key() const override { return "baseline"; }
  std::string description() const override {
    return "per-expert cuBLAS loop: routing plan, expert offsets copied to the host (a sync), "
           "group() gather, per non-empty expert up|gate GEMM, GLU, down GEMM, gated sum of "
           "each token's k rows; backward: gated dY gather, d_gates row dot, per expert dA, "
           "dW2, GLU backward, dX, dW1 GEMMs, sum of dX over k";
  }
  void forward() override { runner_->loop_forward(); }
  void backward() override { runner_->loop_backward(); }
  std::size_t extra_bytes() const override { return runner_->loop_extra_bytes(); }
  TensorView out() const override { return runner_->out(); }
  TensorView dx() const override { return runner_->dx(); }
  TensorView d_gates() const override { return runner_->d_gates(); }

 private:
  std::shared_ptr<CublasRunner> runner_;
};

}  // namespace

std::vector<std::unique_ptr<BenchComparison>> make_cublas_comparisons(BenchDevice& device,
                                                                      const BenchLayer& layer,
                                                                      const Context& ctx) {
  auto runner = std::make_shared<CublasRunner>(device, layer, ctx);
  // One pass of the loop fills every grouped buffer (the ceiling's operands among them) with the
  // layer's own values, and lets cuBLAS pick its kernels before anything is timed.
  runner->loop_forward();
  runner->loop_backward();
  device.synchronize();
  std::vector<std::unique_ptr<BenchComparison>> comparisons;
  comparisons.push_back(std::make_unique<CublasCeiling>(runner));
  comparisons.push_back(std::make_unique<PerExpertLoop>(runner));
  return comparisons;
}

}  // namespace scattermoe::tools
