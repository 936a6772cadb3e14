#include "bench.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <new>
#include <sstream>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_device.hpp"
#include "check/suite.hpp"
#include "common.hpp"
#include "core/half.hpp"
#include "scattermoe/scattermoe.hpp"

namespace scattermoe::tools {

const std::vector<Preset>& bench_presets() {
  static const std::vector<Preset> presets = {
      {"tiny", {256, 256, 128, 8, 2}, "a CPU smoke test: about a second on 2 cores"},
      {"mixtral-8x7b", {8192, 4096, 14336, 8, 2}, "Mixtral 8x7B"},
      {"olmoe-1b-7b", {16384, 2048, 1024, 64, 8}, "OLMoE-1B-7B"},
      {"qwen3-30b-a3b", {16384, 2048, 768, 128, 8}, "Qwen3-30B-A3B"},
      {"deepseek-v3", {8192, 7168, 2048, 256, 8}, "DeepSeek-V3 (routed experts)"},
  };
  return presets;
}

std::string bench_presets_help() {
  std::ostringstream s;
  s << "Presets (SwiGLU MLP; T tokens, d model width, h expert hidden width, E experts, k per "
       "token):\n";
  char line[160];
  std::snprintf(line, sizeof(line), "  %-14s %6s %6s %6s %4s %2s\n", "name", "T", "d", "h", "E",
                "k");
  s << line;
  for (const Preset& p : bench_presets()) {
    std::snprintf(line, sizeof(line), "  %-14s %6lld %6lld %6lld %4lld %2lld  %s\n",
                  p.name.c_str(), static_cast<long long>(p.shape.tokens),
                  static_cast<long long>(p.shape.d_model), static_cast<long long>(p.shape.d_ff),
                  static_cast<long long>(p.shape.experts), static_cast<long long>(p.shape.topk),
                  p.source.c_str());
    s << line;
  }
  s << "Default: tiny on the CPU; mixtral-8x7b when a GPU and the CUDA backend are present.\n"
       "FLOPs: forward = 6*T*k*d*h, backward = 2x forward, forward+backward = 3x forward.";
  return s.str();
}

namespace {

// ---- deterministic random inputs ------------------------------------------------------------
// Counter-based: element i of stream s depends only on (seed, s, i), so the data do not depend
// on the thread count and any slice can be regenerated.
enum Stream : std::uint64_t { kStreamX = 1, kStreamW1, kStreamW2, kStreamRouter, kStreamDOut };

std::uint64_t mix64(std::uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A standard normal sample (Box-Muller on two 26-bit uniforms in (0, 1)).
float normal_at(std::uint64_t seed, std::uint64_t stream, std::uint64_t i) {
  const std::uint64_t bits = mix64(mix64(seed * 0x9e3779b97f4a7c15ull + stream) + i);
  constexpr double kScale = 1.0 / static_cast<double>(1ull << 26);
  const double u1 = (static_cast<double>(bits >> 38) + 0.5) * kScale;
  const double u2 = (static_cast<double>((bits >> 12) & ((1ull << 26) - 1)) + 0.5) * kScale;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

// Calls fn(begin, end) on disjoint chunks of [0, n), one per hardware thread.
template <class Fn>
void parallel_chunks(std::int64_t n, Fn&& fn) {
  const std::int64_t threads = std::min<std::int64_t>(
      std::max(1u, std::thread::hardware_concurrency()), std::max<std::int64_t>(1, n >> 16));
  std::vector<std::thread> pool;
  for (std::int64_t t = 1; t < threads; ++t) {
    pool.emplace_back([&, t] { fn(n * t / threads, n * (t + 1) / threads); });
  }
  fn(0, n / threads);
  for (std::thread& th : pool) th.join();
}

void store_float(void* base, DType dtype, std::int64_t i, float value) {
  switch (dtype) {
    case DType::kFloat32:
      static_cast<float*>(base)[i] = value;
      return;
    case DType::kFloat16:
      static_cast<std::uint16_t*>(base)[i] = detail::float_to_f16(value);
      return;
    case DType::kBFloat16:
      static_cast<std::uint16_t*>(base)[i] = detail::float_to_bf16(value);
      return;
    default:
      throw Unsupported(std::string("scattermoe bench: cannot store floats as ") +
                        dtype_name(dtype));
  }
}

// n elements of N(0, scale^2), stored in `dtype`.
void fill_normal(void* data, DType dtype, std::int64_t n, float scale, std::uint64_t seed,
                 Stream stream) {
  parallel_chunks(n, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      store_float(data, dtype, i, scale * normal_at(seed, stream, static_cast<std::uint64_t>(i)));
    }
  });
}

// The router: softmax over random logits (T, E), the top k per token (ties to the lower
// expert id), their probabilities renormalised to sum to 1 as the gates.
void fill_routing(const LayerShape& s, std::uint64_t seed, std::int64_t* expert_idxs,
                  void* gates, DType gate_dtype) {
  parallel_chunks(s.tokens, [&](std::int64_t begin, std::int64_t end) {
    std::vector<double> prob(static_cast<std::size_t>(s.experts));
    std::vector<std::int64_t> order(static_cast<std::size_t>(s.experts));
    for (std::int64_t t = begin; t < end; ++t) {
      double max_logit = -INFINITY;
      for (std::int64_t e = 0; e < s.experts; ++e) {
        prob[e] = normal_at(seed, kStreamRouter, static_cast<std::uint64_t>(t * s.experts + e));
        max_logit = std::max(max_logit, prob[e]);
      }
      for (double& p : prob) p = std::exp(p - max_logit);  // softmax up to its normaliser,
      for (std::int64_t e = 0; e < s.experts; ++e) order[e] = e;  // which renormalising drops
      std::partial_sort(order.begin(), order.begin() + s.topk, order.end(),
                        [&](std::int64_t a, std::int64_t b) {
                          return prob[a] != prob[b] ? prob[a] > prob[b] : a < b;
                        });
      double picked = 0.0;
      for (std::int64_t j = 0; j < s.topk; ++j) picked += prob[order[j]];
      for (std::int64_t j = 0; j < s.topk; ++j) {
        expert_idxs[t * s.topk + j] = order[j];
        store_float(gates, gate_dtype, t * s.topk + j,
                    static_cast<float>(prob[order[j]] / picked));
      }
    }
  });
}

// ---- the layer's buffers ----------------------------------------------------------------------
enum class Category { kInput, kWeight, kPlan, kOutput, kHidden, kGradient, kWorkspace };
constexpr const char* kCategoryNames[] = {"inputs",    "weights",   "plan",     "outputs",
                                          "hidden",    "gradients", "workspace"};
constexpr int kNumCategories = 7;

struct Memory {
  std::size_t bytes[kNumCategories] = {};

  std::size_t total() const {
    std::size_t sum = 0;
    for (std::size_t b : bytes) sum += b;
    return sum;
  }
  // Everything the layer needs beyond its inputs and weights.
  std::size_t extra() const {
    return total() - bytes[static_cast<int>(Category::kInput)] -
           bytes[static_cast<int>(Category::kWeight)];
  }
};

// Every buffer the bench allocates for the layer goes through here, so the memory report is
// the bench's whole footprint on the device.
class Buffers {
 public:
  explicit Buffers(BenchDevice& device) : device_(device) {}

  // A contiguous tensor (dims in row-major order).
  TensorView add(Category category, DType dtype, std::initializer_list<std::int64_t> shape) {
    std::size_t bytes = dtype_size(dtype);
    for (std::int64_t d : shape) bytes *= static_cast<std::size_t>(d);
    allocate(bytes);
    memory_.bytes[static_cast<int>(category)] += bytes;
    return TensorView::contiguous(buffers_.back().data(), dtype, shape, device_.device());
  }

  Workspace add_workspace(std::size_t bytes) {
    allocate(bytes);
    memory_.bytes[static_cast<int>(Category::kWorkspace)] += bytes;
    return Workspace{buffers_.back().data(), bytes};
  }

  const Memory& memory() const { return memory_; }

 private:
  void allocate(std::size_t bytes) {
    try {
      buffers_.emplace_back(device_, bytes);
    } catch (const std::bad_alloc&) {
      throw UsageError("the layer does not fit on " + device_name(device_.device()) +
                       ": allocating " + format_bytes(bytes) + " failed after " +
                       format_bytes(memory_.total()) + " (the device has " +
                       format_bytes(device_.memory_available()) + ")");
    }
  }

  BenchDevice& device_;
  std::vector<DeviceBuffer> buffers_;
  Memory memory_;
};

// A tensor's contents on the host: the device memory itself when the host can read it, else a
// copy.
class HostCopy {
 public:
  HostCopy(BenchDevice& device, const TensorView& v) : view_(v) {
    if (device.host_accessible()) return;
    // Copy the byte range the view spans and rebase the view onto the copy.
    const char* first = v.first_byte();
    copy_.resize(static_cast<std::size_t>(v.last_byte() - first));
    device.copy_to_host(copy_.data(), first, copy_.size());
    std::int64_t shape[TensorView::kMaxRank], strides[TensorView::kMaxRank];
    for (int i = 0; i < v.rank(); ++i) {
      shape[i] = v.size(i);
      strides[i] = v.stride(i);
    }
    char* data = copy_.data() + (static_cast<const char*>(v.data()) - first);
    view_ = TensorView(data, v.dtype(), v.rank(), shape, strides, Device::cpu());
  }
  const TensorView& view() const { return view_; }

 private:
  TensorView view_;
  std::vector<char> copy_;
};

// Generates a tensor's contents on the host and puts them on the device.
template <class Fill>
void generate(BenchDevice& device, const TensorView& v, Fill&& fill) {
  if (device.host_accessible()) {
    fill(v.data());
    return;
  }
  std::vector<char> staging(static_cast<std::size_t>(v.numel()) * dtype_size(v.dtype()));
  fill(staging.data());
  device.copy_to_device(v.data(), staging.data(), staging.size());
}

// ---- the run ----------------------------------------------------------------------------------
struct Resolved {
  std::string preset;  // "custom" when a size was given explicitly
  LayerShape shape;
  DType dtype;
  Device device;
  Activation activation;
  int iters;
  int warmup;
  std::int64_t check_rows;
};

const Preset& find_preset(const std::string& name) {
  for (const Preset& p : bench_presets()) {
    if (p.name == name) return p;
  }
  std::string names;
  for (const Preset& p : bench_presets()) names += (names.empty() ? "" : ", ") + p.name;
  throw UsageError("unknown preset '" + name + "'; expected one of " + names);
}

Resolved resolve(const BenchOptions& o) {
  Resolved r;
  if (o.device.empty()) {
    r.device = default_device();
    if (!bench_supports(r.device.type)) r.device = Device::cpu();
  } else {
    r.device = parse_device_option(o.device);
  }
  const bool cpu = r.device.type == DeviceType::kCPU;
  const std::string preset = !o.preset.empty() ? o.preset : cpu ? "tiny" : "mixtral-8x7b";
  r.shape = find_preset(preset).shape;
  r.preset = preset;
  const std::pair<std::int64_t, std::int64_t*> overrides[] = {
      {o.shape.tokens, &r.shape.tokens},   {o.shape.d_model, &r.shape.d_model},
      {o.shape.d_ff, &r.shape.d_ff},       {o.shape.experts, &r.shape.experts},
      {o.shape.topk, &r.shape.topk}};
  for (const auto& [value, field] : overrides) {
    if (value > 0 && value != *field) {
      *field = value;
      r.preset = "custom";
    }
  }
  if (r.shape.topk > r.shape.experts) {
    throw UsageError("--topk " + std::to_string(r.shape.topk) + " is larger than --experts " +
                     std::to_string(r.shape.experts));
  }
  if (o.dtype != "bf16" && o.dtype != "f16" && o.dtype != "f32") {
    throw UsageError("--dtype: expected bf16, f16 or f32, got '" + o.dtype + "'");
  }
  r.dtype = parse_dtype(o.dtype);
  r.activation = parse_activation(o.activation);
  r.iters = o.iters > 0 ? o.iters : cpu ? 5 : 20;
  r.warmup = o.warmup >= 0 ? o.warmup : cpu ? 1 : 5;
  const double forward_flops = 6.0 * static_cast<double>(r.shape.tokens) * r.shape.topk *
                               r.shape.d_model * r.shape.d_ff;
  r.check_rows = o.check_rows >= 0 ? std::min(o.check_rows, r.shape.tokens)
                 : forward_flops <= 1e9 ? r.shape.tokens
                                        : std::min<std::int64_t>(4, r.shape.tokens);
  return r;
}

struct PhaseTimes {
  std::vector<double> ms;  // one per timed iteration

  double median() const {
    std::vector<double> v = ms;
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  }
  double min() const { return *std::min_element(ms.begin(), ms.end()); }
};

struct Phase {
  const char* name;
  double flops;  // 0: no FLOP rate reported
  PhaseTimes times;
};

std::string rate_text(double flops, double ms) {
  if (flops <= 0 || ms <= 0) return "-";
  char text[32];
  std::snprintf(text, sizeof(text), "%.3g", flops / (ms * 1e-3) / 1e12);
  return text;
}

void print_table(const Resolved& r, const BenchDevice& device, const std::vector<Phase>& phases,
                 const Memory& memory, const check::SliceCheck* check) {
  const LayerShape& s = r.shape;
  std::printf("scattermoe bench: %s (T=%lld d=%lld h=%lld E=%lld k=%lld), %s, %s-GLU, on %s\n",
              r.preset.c_str(), static_cast<long long>(s.tokens),
              static_cast<long long>(s.d_model), static_cast<long long>(s.d_ff),
              static_cast<long long>(s.experts), static_cast<long long>(s.topk),
              dtype_name(r.dtype), activation_name(r.activation), device.name().c_str());
  std::printf("%d timed iteration%s after %d warm-up, %s; routing plan built every iteration\n\n",
              r.iters, r.iters == 1 ? "" : "s", r.warmup, device.timer_name().c_str());
  std::printf("%-30s %12s %12s %10s\n", "phase", "median ms", "min ms", "TFLOP/s");
  for (const Phase& p : phases) {
    std::printf("%-30s %12.3f %12.3f %10s\n", p.name, p.times.median(), p.times.min(),
                rate_text(p.flops, p.times.median()).c_str());
  }
  const int first_extra = static_cast<int>(Category::kPlan);
  std::printf("\nmemory: %s for the layer = inputs %s (x, expert_idxs, gates, d_out) + weights %s "
              "+ extra %s\n",
              format_bytes(memory.total()).c_str(),
              format_bytes(memory.bytes[static_cast<int>(Category::kInput)]).c_str(),
              format_bytes(memory.bytes[static_cast<int>(Category::kWeight)]).c_str(),
              format_bytes(memory.extra()).c_str());
  std::printf("        extra = ");
  for (int c = first_extra; c < kNumCategories; ++c) {
    std::printf("%s%s %s", c > first_extra ? " + " : "", kCategoryNames[c],
                format_bytes(memory.bytes[c]).c_str());
  }
  std::printf("\n");
  if (!check) {
    std::printf("check: skipped (--check-rows 0)\n");
  } else {
    std::printf("check: %s  forward rows [0, %lld) of %lld against the float64 oracle: relative "
                "error %.3g, tolerance %.3g\n",
                check->passed ? "PASS" : "FAIL", static_cast<long long>(r.check_rows),
                static_cast<long long>(s.tokens), check->error, check->tolerance);
  }
}

nlohmann::ordered_json to_json(const Resolved& r, const BenchDevice& device,
                       const std::vector<Phase>& phases, const Memory& memory,
                       const check::SliceCheck* check, std::uint64_t seed) {
  const BuildInfo build = build_info();
  nlohmann::ordered_json j;
  j["program"] = "scattermoe bench";
  j["version"] = build.version;
  j["preset"] = r.preset;
  j["layer"] = {{"kind", "glu_mlp"},
                {"activation", activation_name(r.activation)},
                {"tokens", r.shape.tokens},
                {"d_model", r.shape.d_model},
                {"d_ff", r.shape.d_ff},
                {"experts", r.shape.experts},
                {"topk", r.shape.topk},
                {"dtype", dtype_name(r.dtype)},
                {"gates_dtype", dtype_name(r.dtype)},
                {"weight_layout", "(E, d_out, d_in) storage passed as transposed views"}};
  j["device"] = {{"name", device.name()}, {"id", device_name(r.device)},
                 {"timer", device.timer_name()}};
  j["iters"] = r.iters;
  j["warmup"] = r.warmup;
  j["seed"] = seed;
  j["flop_convention"] = "forward = 6*T*k*d*h; backward = 2x forward; forward+backward = 3x";
  nlohmann::ordered_json phase_json = nlohmann::ordered_json::object();
  for (const Phase& p : phases) {
    nlohmann::ordered_json entry = {{"median_ms", p.times.median()},
                            {"min_ms", p.times.min()},
                            {"ms", p.times.ms}};
    if (p.flops > 0) {
      entry["flops"] = p.flops;
      entry["tflops"] = p.flops / (p.times.median() * 1e-3) / 1e12;
    }
    phase_json[p.name] = entry;
  }
  j["phases"] = phase_json;
  nlohmann::ordered_json mem = nlohmann::ordered_json::object();
  for (int c = 0; c < kNumCategories; ++c) mem[kCategoryNames[c]] = memory.bytes[c];
  mem["total"] = memory.total();
  mem["extra"] = memory.extra();
  j["memory_bytes"] = mem;
  if (check) {
    j["check"] = {{"passed", check->passed}, {"rows", r.check_rows},
                  {"relative_error", check->error}, {"tolerance", check->tolerance}};
  } else {
    j["check"] = nullptr;
  }
  return j;
}

}  // namespace

int run_bench(const BenchOptions& options) {
  const Resolved r = resolve(options);
  const LayerShape& s = r.shape;
  std::unique_ptr<BenchDevice> device = make_bench_device(r.device);

  const double forward_flops =
      6.0 * static_cast<double>(s.tokens) * s.topk * s.d_model * s.d_ff;
  const double seconds = 3.0 * forward_flops * (r.iters + r.warmup) /
                         device->estimated_flops_per_second();
  if (seconds > 120.0 && !options.allow_slow) {
    char rate[32];
    std::snprintf(rate, sizeof(rate), "%.3g", device->estimated_flops_per_second() / 1e9);
    throw UsageError("bench " + r.preset + " on " + device_name(r.device) + " would take about " +
                     format_seconds(seconds) + " (" + std::to_string(r.warmup + r.iters) +
                     " iterations at ~" + rate +
                     " GFLOP/s); pass --allow-slow to run it anyway, or use a smaller preset");
  }

  // Opened before the run so that a bad path does not waste it.
  std::ofstream json_file;
  if (!options.json_path.empty()) {
    json_file.open(options.json_path);
    if (!json_file) throw UsageError("--json: cannot write '" + options.json_path + "'");
  }

  // ---- allocate ----
  const std::int64_t T = s.tokens, d = s.d_model, h = s.d_ff, E = s.experts, k = s.topk;
  const std::int64_t L = T * k;
  Buffers buffers(*device);
  MlpArgs args;
  args.x = buffers.add(Category::kInput, r.dtype, {T, d});
  const TensorView expert_idxs = buffers.add(Category::kInput, DType::kInt64, {T, k});
  args.gates = buffers.add(Category::kInput, r.dtype, {T, k});
  const TensorView d_out = buffers.add(Category::kInput, r.dtype, {T, d});
  // Parameters in nn.Linear storage (E, out, in), passed as (E, in, out) transposed views.
  const TensorView w1 = buffers.add(Category::kWeight, r.dtype, {E, 2 * h, d});
  const TensorView w2 = buffers.add(Category::kWeight, r.dtype, {E, d, h});
  args.w1 = w1.transposed(1, 2);
  args.w2 = w2.transposed(1, 2);
  args.activation = r.activation;
  args.glu = true;

  RoutingPlan plan;
  plan.sorted_expert_idxs = buffers.add(Category::kPlan, DType::kInt64, {L});
  plan.sorted_scattered_idxs = buffers.add(Category::kPlan, DType::kInt64, {L});
  plan.expert_offsets = buffers.add(Category::kPlan, DType::kInt64, {E});
  const TensorView out = buffers.add(Category::kOutput, r.dtype, {T, d});
  const TensorView hidden = buffers.add(Category::kHidden, r.dtype, {L, 2 * h});
  MlpGrads grads;
  grads.dx = buffers.add(Category::kGradient, r.dtype, {T, d});
  grads.dw1 = buffers.add(Category::kGradient, r.dtype, {E, 2 * h, d}).transposed(1, 2);
  grads.dw2 = buffers.add(Category::kGradient, r.dtype, {E, d, h}).transposed(1, 2);
  grads.d_gates = buffers.add(Category::kGradient, r.dtype, {T, k});
  // One workspace serves every call (they run one after another).
  const std::size_t workspace_bytes =
      std::max({routing_plan_workspace_size(T, static_cast<int>(k), static_cast<int>(E),
                                            r.device),
                mlp_forward_workspace_size(args, plan), mlp_backward_workspace_size(args, plan)});
  const Context ctx = device->context(buffers.add_workspace(workspace_bytes));

  const Memory& memory = buffers.memory();
  if (memory.total() > device->memory_available()) {
    throw UsageError("bench " + r.preset + " needs " + format_bytes(memory.total()) + " on " +
                     device_name(r.device) + ", which has " +
                     format_bytes(device->memory_available()));
  }

  // ---- inputs: O(1) activations and weights scaled by 1/sqrt(fan_in), so H and out are O(1) --
  const std::uint64_t seed = options.seed;
  generate(*device, args.x, [&](void* p) { fill_normal(p, r.dtype, T * d, 1.0f, seed, kStreamX); });
  generate(*device, d_out,
           [&](void* p) { fill_normal(p, r.dtype, T * d, 1.0f, seed, kStreamDOut); });
  generate(*device, w1, [&](void* p) {
    fill_normal(p, r.dtype, E * 2 * h * d, 1.0f / std::sqrt(static_cast<float>(d)), seed,
                kStreamW1);
  });
  generate(*device, w2, [&](void* p) {
    fill_normal(p, r.dtype, E * d * h, 1.0f / std::sqrt(static_cast<float>(h)), seed, kStreamW2);
  });
  {
    std::vector<std::int64_t> idx(static_cast<std::size_t>(L));
    std::vector<char> gates(static_cast<std::size_t>(L) * dtype_size(r.dtype));
    fill_routing(s, seed, idx.data(), gates.data(), r.dtype);
    generate(*device, expert_idxs,
             [&](void* p) { std::memcpy(p, idx.data(), idx.size() * sizeof(std::int64_t)); });
    generate(*device, args.gates, [&](void* p) { std::memcpy(p, gates.data(), gates.size()); });
  }

  // ---- time ----
  std::vector<Phase> phases = {{"plan", 0.0, {}},
                               {"forward", forward_flops, {}},
                               {"backward", 2.0 * forward_flops, {}},
                               {"forward+backward (with plan)", 3.0 * forward_flops, {}}};
  for (int it = 0; it < r.warmup + r.iters; ++it) {
    device->clear_marks();
    const int m0 = device->mark();
    build_routing_plan(expert_idxs, static_cast<int>(E), plan, ctx);
    const int m1 = device->mark();
    mlp_forward(args, plan, out, hidden, ctx);
    const int m2 = device->mark();
    mlp_backward(args, plan, hidden, d_out, grads, ctx);
    const int m3 = device->mark();
    device->synchronize();
    if (it < r.warmup) continue;
    phases[0].times.ms.push_back(device->elapsed_ms(m0, m1));
    phases[1].times.ms.push_back(device->elapsed_ms(m1, m2));
    phases[2].times.ms.push_back(device->elapsed_ms(m2, m3));
    phases[3].times.ms.push_back(device->elapsed_ms(m0, m3));
  }

  // ---- check a slice of the forward output against the float64 oracle ----
  check::SliceCheck check_result;
  const bool checked = r.check_rows > 0;
  if (checked) {
    const HostCopy x_host(*device, args.x), w1_host(*device, args.w1), w2_host(*device, args.w2),
        gates_host(*device, args.gates), idx_host(*device, expert_idxs), out_host(*device, out);
    MlpArgs host_args = args;
    host_args.x = x_host.view();
    host_args.w1 = w1_host.view();
    host_args.w2 = w2_host.view();
    host_args.gates = gates_host.view();
    check_result =
        check::check_mlp_forward_rows(host_args, idx_host.view(), out_host.view(), r.check_rows);
  }

  print_table(r, *device, phases, memory, checked ? &check_result : nullptr);
  if (json_file.is_open()) {
    json_file << to_json(r, *device, phases, memory, checked ? &check_result : nullptr, seed)
                     .dump(2)
              << "\n";
    if (!json_file) throw UsageError("--json: writing '" + options.json_path + "' failed");
    std::printf("wrote %s\n", options.json_path.c_str());
  }
  return !checked || check_result.passed ? 0 : 1;
}

}  // namespace scattermoe::tools
