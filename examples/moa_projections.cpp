// Mixture of Attention (MoA) with the attention step supplied by the caller. scattermoe runs the
// per-expert query projection (scattered in, scattered out: the k query rows of each token come
// out in token order, so attention sees the sequence as it is, with no per-expert copies) and
// the gated per-expert output projection; keys and values come from one shared projection (a
// ParallelLinear with a single expert is a dense layer). With the CUDA backend built and a GPU
// present the projections run on the GPU and the result is compared with the same code on the
// CPU backend; otherwise everything runs on the CPU, and the program says so.
// Compiled and run as a test (ctest -R example_moa_projections), so this code is known to work.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef SCATTERMOE_EXAMPLE_CUDA
#include <cuda_runtime.h>
#endif

#include "scattermoe/scattermoe.hpp"

using scattermoe::Context;
using scattermoe::Device;
using scattermoe::DeviceType;
using scattermoe::DType;
using scattermoe::TensorView;

namespace {

// batch, sequence, model width, head width, kv heads, experts, top-k
constexpr std::int64_t B = 2, S = 6, d = 16, hd = 4, H = 2, E = 4, k = 2;
constexpr std::int64_t T = B * S, width = H * hd;  // tokens; width of q, k, v and attention

#ifdef SCATTERMOE_EXAMPLE_CUDA
void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}
#endif

// Owns every buffer it hands out, on one device (host memory on the CPU, cudaMalloc on a GPU).
class Arena {
 public:
  explicit Arena(Device device) : device_(device) {}
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    for (void* p : blocks_) {
#ifdef SCATTERMOE_EXAMPLE_CUDA
      if (device_.type == DeviceType::kCUDA) {
        cudaFree(p);
        continue;
      }
#endif
      std::free(p);
    }
  }

  void* bytes(std::size_t n) {
    void* p = nullptr;
    n = std::max<std::size_t>(n, 1);
#ifdef SCATTERMOE_EXAMPLE_CUDA
    if (device_.type == DeviceType::kCUDA) check_cuda(cudaMalloc(&p, n), "cudaMalloc");
#endif
    if (device_.type == DeviceType::kCPU) p = std::malloc(n);
    if (p == nullptr) throw std::runtime_error("out of memory");
    blocks_.push_back(p);
    return p;
  }

  // A contiguous (rows, cols) or (rows) tensor.
  TensorView tensor(DType dtype, std::int64_t rows, std::int64_t cols = 0) {
    const std::int64_t n = rows * std::max<std::int64_t>(cols, 1);
    void* p = bytes(static_cast<std::size_t>(n) * scattermoe::dtype_size(dtype));
    return cols == 0 ? TensorView::contiguous(p, dtype, {rows}, device_)
                     : TensorView::contiguous(p, dtype, {rows, cols}, device_);
  }

  // A Context whose workspace holds `n` bytes.
  Context context(std::size_t n) {
    Context ctx;
    ctx.workspace = {bytes(n), n};
    return ctx;
  }

 private:
  Device device_;
  std::vector<void*> blocks_;
};

// Copies a rank-1 or rank-2 view (unit stride along its last dimension; rows may be strided)
// into another of the same shape, on either device.
void copy(const TensorView& src, const TensorView& dst) {
  const std::size_t elem = scattermoe::dtype_size(src.dtype());
  const std::int64_t rows = src.rank() == 2 ? src.size(0) : 1;
  const std::size_t row_bytes = static_cast<std::size_t>(src.size(src.rank() - 1)) * elem;
  const std::size_t src_pitch = src.rank() == 2 ? src.stride(0) * elem : row_bytes;
  const std::size_t dst_pitch = dst.rank() == 2 ? dst.stride(0) * elem : row_bytes;
#ifdef SCATTERMOE_EXAMPLE_CUDA
  if (src.device().type == DeviceType::kCUDA || dst.device().type == DeviceType::kCUDA) {
    check_cuda(cudaMemcpy2D(dst.data(), dst_pitch, src.data(), src_pitch, row_bytes,
                            static_cast<std::size_t>(rows), cudaMemcpyDefault),
               "cudaMemcpy2D");
    return;
  }
#endif
  for (std::int64_t r = 0; r < rows; ++r) {
    std::memcpy(static_cast<char*>(dst.data()) + r * dst_pitch,
                static_cast<const char*>(src.data()) + r * src_pitch, row_bytes);
  }
}

// The caller's attention step. q: (T*k, H*hd), row t*k + j = query heads (j, 0..H-1) of token
// t; k_proj, v_proj: (T, H*hd) shared keys and values; out: q's shape. Query head (j, g) attends
// with kv head g (grouped-query attention, k query heads per kv head).
using AttentionStep = std::function<void(const TensorView& q, const TensorView& k_proj,
                                         const TensorView& v_proj, const TensorView& out)>;

// What the caller holds: token rows, the router's choice and weights, and the weights in the
// layout of nn.Linear (out_features, in_features), on the device of the run.
struct MoaInputs {
  TensorView x;            // (T, d)
  TensorView expert_idxs;  // (T, k) int64
  TensorView gates;        // (T, k)
  TensorView wq;           // (E, H*hd, d) per-expert query projections
  TensorView wkv;          // (2*H*hd, d) shared keys, then values
  TensorView wo;           // (E, d, H*hd) per-expert output projections
};

// out (T, d) = sum_j gates[t, j] * Wo[e_j] attention(Wq[e_j] x_t, Wkv x).
void moa_forward(Device device, const MoaInputs& in, const AttentionStep& attention,
                 const TensorView& out) {
  Arena arena(device);
  // Routing plans: the router's (T, k), and one with every token on a single expert, which
  // makes scatter2scatter a dense layer for the shared k/v projection.
  auto build_plan = [&](const TensorView& idxs, std::int64_t experts) {
    scattermoe::RoutingPlan plan;
    plan.sorted_expert_idxs = arena.tensor(DType::kInt64, idxs.numel());
    plan.sorted_scattered_idxs = arena.tensor(DType::kInt64, idxs.numel());
    plan.expert_offsets = arena.tensor(DType::kInt64, experts);
    const Context ctx = arena.context(scattermoe::routing_plan_workspace_size(
        idxs.size(0), static_cast<int>(idxs.size(1)), static_cast<int>(experts), device));
    scattermoe::build_routing_plan(idxs, static_cast<int>(experts), plan, ctx);
    return plan;
  };
  const scattermoe::RoutingPlan plan = build_plan(in.expert_idxs, E);
  std::vector<std::int64_t> zeros(T, 0);
  const TensorView one_expert = arena.tensor(DType::kInt64, T, 1);
  copy(TensorView::contiguous(zeros.data(), DType::kInt64, {T, 1}), one_expert);
  const scattermoe::RoutingPlan dense_plan = build_plan(one_expert, 1);

  // 1. q = x @ Wq[e]^T for each (token, choice), scattered in and scattered out: (T*k, H*hd).
  //    The weight goes in as the transposed view of its (E, out, in) storage: no copy.
  const TensorView q = arena.tensor(DType::kFloat32, T * k, width);
  scattermoe::Scatter2ScatterArgs q_args;
  q_args.x = in.x;
  q_args.w = in.wq.transposed(1, 2);  // (E, d, H*hd)
  q_args.k = static_cast<int>(k);
  scattermoe::scatter2scatter(
      q_args, plan, q, arena.context(scattermoe::scatter2scatter_workspace_size(q_args, plan)));

  // 2. [keys | values] = x @ Wkv^T: (T, 2*H*hd), Wkv seen as one expert (1, d, 2*H*hd).
  const TensorView kv = arena.tensor(DType::kFloat32, T, 2 * width);
  scattermoe::Scatter2ScatterArgs kv_args;
  kv_args.x = in.x;
  kv_args.w = TensorView(in.wkv.data(), DType::kFloat32, {1, d, 2 * width},
                         {2 * width * d, 1, d}, device);
  scattermoe::scatter2scatter(
      kv_args, dense_plan, kv,
      arena.context(scattermoe::scatter2scatter_workspace_size(kv_args, dense_plan)));

  // 3. The caller's attention, on token-ordered rows.
  const TensorView attn = arena.tensor(DType::kFloat32, T * k, width);
  attention(q, kv.narrowed(1, 0, width), kv.narrowed(1, width, 2 * width), attn);

  // 4. out[t] = sum_j gates[t, j] * attn[t*k + j] @ Wo[e]^T: scattered in (fan-out 1: row p of
  //    attn is flat position p), gated into (T, d).
  scattermoe::ParallelLinearArgs o_args;
  o_args.x = attn;
  o_args.w = in.wo.transposed(1, 2);  // (E, H*hd, d)
  o_args.gates = in.gates;
  o_args.k = 1;
  scattermoe::parallel_linear_forward(
      o_args, plan, out,
      arena.context(scattermoe::parallel_linear_forward_workspace_size(o_args, plan)));
}

// The attention step of this example: the library's CPU reference (scattermoe/moa.hpp), causal,
// run on host copies of its inputs (they are on the GPU when the projections ran there). A
// model would call its own attention kernel on the device here, FlashAttention for instance.
void reference_attention(const TensorView& q, const TensorView& k_proj, const TensorView& v_proj,
                         const TensorView& out) {
  Arena host(Device::cpu());
  scattermoe::MoaAttentionArgs args;
  args.q = host.tensor(DType::kFloat32, T * k, width);
  args.k_proj = host.tensor(DType::kFloat32, T, width);
  args.v_proj = host.tensor(DType::kFloat32, T, width);
  copy(q, args.q);
  copy(k_proj, args.k_proj);
  copy(v_proj, args.v_proj);
  args.batch = static_cast<int>(B);
  args.seq_len = static_cast<int>(S);
  args.top_k = static_cast<int>(k);
  args.kv_heads = static_cast<int>(H);
  args.head_dim = static_cast<int>(hd);
  args.causal = true;
  const TensorView host_out = host.tensor(DType::kFloat32, T * k, width);
  const TensorView lse = host.tensor(DType::kFloat32, T * k, H);  // what backward would need
  scattermoe::moa_attention_forward(
      args, host_out, lse, host.context(scattermoe::moa_attention_forward_workspace_size(args)));
  copy(host_out, out);
}

struct HostData {
  std::vector<float> x, gates, wq, wkv, wo;
  std::vector<std::int64_t> expert_idxs;
};

// Uploads the inputs to `device`, runs the layer there and returns out (T, d) on the host.
std::vector<float> run(Device device, const HostData& h) {
  Arena arena(device);
  auto upload = [&](const void* data, DType dtype, std::int64_t rows, std::int64_t cols) {
    const TensorView v = arena.tensor(dtype, rows, cols);
    copy(TensorView::contiguous(data, dtype, {rows, cols}), v);
    return v;
  };
  MoaInputs in;
  in.x = upload(h.x.data(), DType::kFloat32, T, d);
  in.expert_idxs = upload(h.expert_idxs.data(), DType::kInt64, T, k);
  in.gates = upload(h.gates.data(), DType::kFloat32, T, k);
  in.wq = upload(h.wq.data(), DType::kFloat32, E * width, d);
  in.wq = TensorView::contiguous(in.wq.data(), DType::kFloat32, {E, width, d}, device);
  in.wkv = upload(h.wkv.data(), DType::kFloat32, 2 * width, d);
  in.wo = upload(h.wo.data(), DType::kFloat32, E * d, width);
  in.wo = TensorView::contiguous(in.wo.data(), DType::kFloat32, {E, d, width}, device);
  const TensorView out = arena.tensor(DType::kFloat32, T, d);
  moa_forward(device, in, reference_attention, out);
  std::vector<float> result(T * d);
  copy(out, TensorView::contiguous(result.data(), DType::kFloat32, {T, d}));
  return result;
}

}  // namespace

int main() {
  // The router's choice (k distinct experts per token) and its renormalised weights; the
  // weights as nn.Linear stores them. Any values will do.
  HostData h;
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  for (std::int64_t t = 0; t < T; ++t) {
    const std::int64_t first = t % E, second = (first + 1 + t % (E - 1)) % E;
    const float p = 0.5f + 0.4f * std::fabs(uniform(rng));
    h.expert_idxs.insert(h.expert_idxs.end(), {first, second});
    h.gates.insert(h.gates.end(), {p, 1.0f - p});
  }
  auto fill = [&](std::vector<float>& v, std::size_t n, float scale) {
    v.resize(n);
    for (float& e : v) e = scale * uniform(rng);
  };
  fill(h.x, T * d, 1.0f);
  fill(h.wq, E * width * d, 0.5f);
  fill(h.wkv, 2 * width * d, 0.5f);
  fill(h.wo, E * d * width, 0.5f);

  bool gpu = false;
  for (const scattermoe::DeviceInfo& info : scattermoe::list_devices()) {
    gpu = gpu || info.device.type == DeviceType::kCUDA;
  }
  if (!scattermoe::build_info().cuda_backend) {
    std::printf("CUDA backend not built: the projections run on the CPU backend\n");
  } else if (!gpu) {
    std::printf("CUDA backend built, but no GPU found: the projections run on the CPU backend\n");
  }
  const Device device = gpu ? Device::cuda(0) : Device::cpu();
  const std::vector<float> out = run(device, h);
  std::printf("MoA on %s: B=%lld S=%lld d=%lld, %lld experts, top-%lld, %lld kv heads of %lld\n",
              scattermoe::device_name(device).c_str(), static_cast<long long>(B),
              static_cast<long long>(S), static_cast<long long>(d), static_cast<long long>(E),
              static_cast<long long>(k), static_cast<long long>(H), static_cast<long long>(hd));
  std::printf("out[0][0..3] = %.6f %.6f %.6f %.6f\n", out[0], out[1], out[2], out[3]);

  if (gpu) {
    // The same layer on the CPU backend: f32 on both, so they agree to fp32 rounding.
    const std::vector<float> expected = run(Device::cpu(), h);
    double err = 0.0, scale = 0.0;
    for (std::size_t i = 0; i < out.size(); ++i) {
      err = std::max(err, std::fabs(static_cast<double>(out[i]) - expected[i]));
      scale = std::max(scale, std::fabs(static_cast<double>(expected[i])));
    }
    std::printf("max |cuda - cpu| = %.3g (largest |out| %.3g)\n", err, scale);
    if (!(err <= 1e-4 * scale)) return 1;
  }
  return 0;
}
