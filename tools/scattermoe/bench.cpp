#include "bench.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <new>
#include <sstream>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "bench_comparison.hpp"
#include "bench_device.hpp"
#include "bench_random.hpp"
#include "check/reference_f64.hpp"
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

// ---- deterministic random inputs (the generator is in bench_random.hpp) ----------------------
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
// copy of the byte range the view spans. With `experts`, only those slices along dim 0 of an
// (E, ...) weight are copied; the rest of the copy is left unwritten (and, for a large weight,
// never touched, so the host does not commit its pages): read only those experts.
class HostCopy {
 public:
  HostCopy(BenchDevice& device, const TensorView& v,
           const std::vector<std::int64_t>* experts = nullptr)
      : view_(v) {
    if (device.host_accessible()) return;
    const char* first = v.first_byte();
    const std::size_t bytes = static_cast<std::size_t>(v.last_byte() - first);
    copy_.reset(new char[bytes > 0 ? bytes : 1]);  // uninitialised on purpose (see above)
    if (!experts) {
      device.copy_to_host(copy_.get(), first, bytes);
    } else {
      for (std::int64_t e : *experts) {
        const TensorView slice = v.narrowed(0, e, e + 1);
        device.copy_to_host(copy_.get() + (slice.first_byte() - first), slice.first_byte(),
                            static_cast<std::size_t>(slice.last_byte() - slice.first_byte()));
      }
    }
    std::int64_t shape[TensorView::kMaxRank], strides[TensorView::kMaxRank];
    for (int i = 0; i < v.rank(); ++i) {
      shape[i] = v.size(i);
      strides[i] = v.stride(i);
    }
    char* data = copy_.get() + (static_cast<const char*>(v.data()) - first);
    view_ = TensorView(data, v.dtype(), v.rank(), shape, strides, Device::cpu());
  }
  const TensorView& view() const { return view_; }

 private:
  TensorView view_;
  std::unique_ptr<char[]> copy_;
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

// N(0, scale^2) values from the counter-based generator: on the device when it can, else on the
// host (the same values up to the last bit of libm's log and cos).
void generate_normal(BenchDevice& device, const TensorView& v, float scale, std::uint64_t seed,
                     Stream stream) {
  if (device.fill_normal(v.data(), v.dtype(), v.numel(), scale, seed, stream)) return;
  generate(device, v,
           [&](void* p) { fill_normal(p, v.dtype(), v.numel(), scale, seed, stream); });
}

// Element i of contiguous host memory as a double.
double load_float(const void* base, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::kFloat32:
      return static_cast<const float*>(base)[i];
    case DType::kFloat16:
      return detail::f16_to_float(static_cast<const std::uint16_t*>(base)[i]);
    case DType::kBFloat16:
      return detail::bf16_to_float(static_cast<const std::uint16_t*>(base)[i]);
    default:
      throw Unsupported(std::string("scattermoe bench: cannot read floats from ") +
                        dtype_name(dtype));
  }
}

// ||got - want||_2 / ||want||_2 over two contiguous tensors of one shape on the device.
double relative_difference(BenchDevice& device, const TensorView& got, const TensorView& want) {
  const HostCopy g(device, got), w(device, want);
  double diff = 0.0, norm = 0.0;
  for (std::int64_t i = 0; i < want.numel(); ++i) {
    const double a = load_float(g.view().data(), got.dtype(), i);
    const double b = load_float(w.view().data(), want.dtype(), i);
    diff += (a - b) * (a - b);
    norm += b * b;
  }
  return norm > 0.0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// ---- the run ----------------------------------------------------------------------------------
// Default iterations. On CUDA each implementation (ours, the ceiling, the loop) runs
// warm-up + iters times, one iteration of each per round: a model preset's forward+backward
// takes tens of ms on an H200.
constexpr int kCpuIters = 5, kCpuWarmup = 1;
constexpr int kCudaIters = 10, kCudaWarmup = 3;

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
  r.iters = o.iters > 0 ? o.iters : cpu ? kCpuIters : kCudaIters;
  r.warmup = o.warmup >= 0 ? o.warmup : cpu ? kCpuWarmup : kCudaWarmup;
  const double forward_flops = 6.0 * static_cast<double>(r.shape.tokens) * r.shape.topk *
                               r.shape.d_model * r.shape.d_ff;
  r.check_rows = o.check_rows >= 0 ? std::min(o.check_rows, r.shape.tokens)
                 : forward_flops <= 1e9 ? r.shape.tokens
                                        : std::min<std::int64_t>(4, r.shape.tokens);
  return r;
}

// ---- timing -----------------------------------------------------------------------------------
double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct PhaseTimes {
  std::vector<double> ms;  // one per timed iteration

  double median() const { return median_of(ms); }
  double min() const { return *std::min_element(ms.begin(), ms.end()); }
};

struct Phase {
  std::string name;
  double flops;  // 0: no FLOP rate reported
  PhaseTimes times;
};

// Per timed iteration of one implementation, the ms from its first timestamp to the end of each
// of its steps.
using StepEnds = std::vector<std::vector<double>>;

// Times several implementations, each a list of steps, in warmup + iters rounds: each round runs
// one iteration of every implementation in turn, in the order given. Before each iteration the
// device's cache is flushed (outside the timed region); a timestamp is taken before its first
// step and after each. Interleaved because a GPU's clock steps down and up (on an H200 by ~10%,
// for several iterations at a time: power, temperature): timed one after another, a clock step
// could slow one implementation and not the next and move their ratio from run to run;
// interleaved, all see the same clock history. An implementation's steps still run back to back,
// so those that share buffers (the ceiling and the loop share their grouped ones) find their own
// values from forward to backward. Nothing waits for the device between iterations (unless a
// step does itself, as the per-expert loop's forward does), so on a GPU the host's launch latency
// hides behind the device's work; every mark is read after the one synchronize at the end.
// Returns one StepEnds per implementation; entry i of each is from timed round i.
std::vector<StepEnds> time_interleaved(
    BenchDevice& device, const std::vector<std::vector<std::function<void()>>>& implementations,
    int warmup, int iters) {
  device.clear_marks();
  // marks[implementation][timed round]: the timestamps of one iteration.
  std::vector<std::vector<std::vector<int>>> marks(implementations.size());
  for (int round = 0; round < warmup + iters; ++round) {
    for (std::size_t i = 0; i < implementations.size(); ++i) {
      device.flush_cache();
      std::vector<int> m = {device.mark()};
      for (const std::function<void()>& step : implementations[i]) {
        step();
        m.push_back(device.mark());
      }
      if (round >= warmup) marks[i].push_back(std::move(m));
    }
  }
  device.synchronize();
  std::vector<StepEnds> ends(implementations.size());
  for (std::size_t i = 0; i < implementations.size(); ++i) {
    for (const std::vector<int>& m : marks[i]) {
      std::vector<double> e;
      for (std::size_t j = 1; j < m.size(); ++j) e.push_back(device.elapsed_ms(m[0], m[j]));
      ends[i].push_back(std::move(e));
    }
  }
  device.clear_marks();
  return ends;
}

// One implementation alone: time_interleaved with nothing to interleave.
StepEnds time_steps(BenchDevice& device, const std::vector<std::function<void()>>& steps,
                    int warmup, int iters) {
  return time_interleaved(device, {steps}, warmup, iters)[0];
}

// The times of steps (first, last] of every iteration; first = -1 starts at the first timestamp.
PhaseTimes steps_between(const StepEnds& ends, int first, int last) {
  PhaseTimes t;
  for (const std::vector<double>& e : ends) {
    t.ms.push_back(e[static_cast<std::size_t>(last)] -
                   (first < 0 ? 0.0 : e[static_cast<std::size_t>(first)]));
  }
  return t;
}

// One implementation's measurements: the library's layer ("ours") or a comparison.
struct Measured {
  std::string key;
  std::string description;
  std::vector<Phase> phases;  // forward, backward, forward+backward (ours: + routing plan)
  std::size_t extra_bytes = 0;

  const Phase* find(const std::string& name) const {
    for (const Phase& p : phases) {
      if (p.name == name) return &p;
    }
    return nullptr;
  }
};

// The memory-bound kernels that end the forward and dX (each token's k output rows read and
// summed into one: the gate combine, the sum over k) move `bytes`, T*k*d elements read and T*d
// written. A plain device-to-device copy of as many bytes (half read, half written), timed as
// the layer is (cache flushed before each iteration), gives the rate they are measured against;
// the kernels' own times come from scripts/kernel-times.
struct AggregationCopy {
  std::size_t bytes = 0;  // the aggregation's bytes, read + written
  std::size_t copied = 0; // the copy's bytes, read + written (bytes rounded to even)
  PhaseTimes times;       // empty when not measured (see note)
  std::string note;
};

AggregationCopy time_aggregation_copy(BenchDevice& device, const Resolved& r) {
  const LayerShape& s = r.shape;
  AggregationCopy c;
  c.bytes = static_cast<std::size_t>((s.tokens * s.topk + s.tokens) * s.d_model) * dtype_size(r.dtype);
  const std::size_t half = c.bytes / 2;
  c.copied = 2 * half;
  if (half == 0) {
    c.note = "nothing to copy";
    return c;
  }
  try {
    DeviceBuffer src(device, half);
    DeviceBuffer dst(device, half);
    const StepEnds ends = time_steps(
        device, {[&] { device.copy_on_device(dst.data(), src.data(), half); }}, r.warmup, r.iters);
    for (const std::vector<double>& e : ends) c.times.ms.push_back(e[0]);
  } catch (const std::bad_alloc&) {
    c.note = "not measured: two buffers of " + format_bytes(half) + " do not fit next to the layer's";
  } catch (const Unsupported& e) {
    c.note = std::string("not measured: ") + e.what();
  }
  return c;
}

// The baseline's outputs against ours: norm-wise relative differences.
struct Agreement {
  double out = 0.0, dx = 0.0, d_gates = 0.0;
  double tolerance = 0.0;  // twice the oracle check's: both sides carry rounding errors
  bool agrees() const { return out <= tolerance && dx <= tolerance && d_gates <= tolerance; }
};

// Bytes the forward keeps for the backward: ours X, the pre-activation H and the plan; the
// original ScatterMoE's GLU-MLP (from its autograd graph) X, H, act(gate) * up and the expert
// outputs Y before the gated sum.
struct KeptBytes {
  std::size_t ours = 0;
  std::size_t original = 0;
};

KeptBytes kept_bytes(const LayerShape& s, DType dtype, const Memory& memory) {
  const std::size_t e = dtype_size(dtype);
  const std::size_t T = static_cast<std::size_t>(s.tokens), d = static_cast<std::size_t>(s.d_model),
                    h = static_cast<std::size_t>(s.d_ff), L = T * static_cast<std::size_t>(s.topk);
  KeptBytes k;
  k.ours = (T * d + L * 2 * h) * e + memory.bytes[static_cast<int>(Category::kPlan)];
  k.original = (T * d + L * 2 * h + L * h + L * d) * e;
  return k;
}

// ---- the report -------------------------------------------------------------------------------
std::string rate_text(double flops, double ms) {
  if (flops <= 0 || ms <= 0) return "-";
  const double tflops = flops / (ms * 1e-3) / 1e12;
  char text[32];
  std::snprintf(text, sizeof(text), tflops >= 10 ? "%.1f" : "%.3g", tflops);
  return text;
}

std::string number_text(const char* format, double value) {
  char text[32];
  std::snprintf(text, sizeof(text), format, value);
  return text;
}

const Measured* find_comparison(const std::vector<Measured>& comparisons, const char* key) {
  for (const Measured& m : comparisons) {
    if (m.key == key) return &m;
  }
  return nullptr;
}

// Median ms of a phase of a comparison, or nothing.
const Phase* comparison_phase(const std::vector<Measured>& comparisons, const char* key,
                              const std::string& phase) {
  const Measured* m = find_comparison(comparisons, key);
  return m ? m->find(phase) : nullptr;
}

constexpr const char* kFwdBwd = "forward+backward";

// A comparison's forward+backward ms over ours', round by round: the table's ratio (ours' rate
// as a fraction of the comparison's) paired within each round, where both ran next to each other
// at the same clock. Empty when either lacks the phase or their rounds differ in number.
std::vector<double> ratios_per_round(const Measured& ours, const Measured& comparison) {
  const Phase* o = ours.find(kFwdBwd);
  const Phase* c = comparison.find(kFwdBwd);
  std::vector<double> ratios;
  if (!o || !c || o->times.ms.size() != c->times.ms.size()) return ratios;
  for (std::size_t i = 0; i < o->times.ms.size(); ++i) {
    ratios.push_back(c->times.ms[i] / o->times.ms[i]);
  }
  return ratios;
}

// "the ceiling", "the loop": a comparison as the header line names it.
std::string short_name(const Measured& m) {
  if (m.key == "ceiling") return "the ceiling";
  if (m.key == "baseline") return "the loop";
  return m.key;
}

std::string summary_line(const Measured& ours, const std::vector<Measured>& comparisons,
                         const Memory& memory, const check::SliceCheck* check) {
  const Phase& fb = *ours.find(kFwdBwd);
  std::string line = "fwd+bwd " + rate_text(fb.flops, fb.times.median()) + " TFLOP/s";
  if (const Phase* c = comparison_phase(comparisons, "ceiling", kFwdBwd)) {
    line += ", " + number_text("%.2f", c->times.median() / fb.times.median()) +
            " of cuBLAS ceiling";
  }
  if (const Phase* b = comparison_phase(comparisons, "baseline", kFwdBwd)) {
    line += ", " + number_text("%.2f", b->times.median() / fb.times.median()) +
            "x per-expert loop";
  }
  line += ", peak extra " + format_bytes(memory.extra());
  line += !check ? ", check skipped" : check->passed ? ", check pass" : ", check FAIL";
  return line;
}

void print_report(const Resolved& r, const BenchDevice& device, const Measured& ours,
                  const std::vector<Measured>& comparisons, const std::string& comparisons_note,
                  const Agreement* agreement, const Memory& memory, const AggregationCopy& copy,
                  const check::SliceCheck* check) {
  const LayerShape& s = r.shape;
  std::printf("scattermoe bench: %s (T=%lld d=%lld h=%lld E=%lld k=%lld), %s, %s-GLU, on %s\n",
              r.preset.c_str(), static_cast<long long>(s.tokens),
              static_cast<long long>(s.d_model), static_cast<long long>(s.d_ff),
              static_cast<long long>(s.experts), static_cast<long long>(s.topk),
              dtype_name(r.dtype), activation_name(r.activation), device.name().c_str());
  if (comparisons.empty()) {
    std::printf("%d timed iteration%s after %d warm-up, %s, median; ", r.iters,
                r.iters == 1 ? "" : "s", r.warmup, device.timer_name().c_str());
  } else {
    // "ours, the ceiling and the loop": the order of each round.
    std::string order = "ours";
    for (std::size_t i = 0; i < comparisons.size(); ++i) {
      order += (i + 1 < comparisons.size() ? ", " : " and ") + short_name(comparisons[i]);
    }
    std::printf("%d timed round%s after %d warm-up, each running %s in turn, %s, median; ",
                r.iters, r.iters == 1 ? "" : "s", r.warmup, order.c_str(),
                device.timer_name().c_str());
  }
  if (device.flush_bytes() > 0) {
    std::printf("L2 flushed before each iteration (%s written); ",
                format_bytes(device.flush_bytes()).c_str());
  }
  std::printf("forward includes building the routing plan\n\n");

  std::printf("%-20s %10s %9s %11s %13s %12s %14s\n", "phase", "ours ms", "TFLOP/s", "ceiling ms",
              "ours/ceiling", "baseline ms", "ours/baseline");
  for (const Phase& p : ours.phases) {
    const double ms = p.times.median();
    const Phase* c = comparison_phase(comparisons, "ceiling", p.name);
    const Phase* b = comparison_phase(comparisons, "baseline", p.name);
    const std::string name = p.flops > 0 ? p.name : "  " + p.name;
    std::printf("%-20s %10.3f %9s %11s %13s %12s %14s\n", name.c_str(), ms,
                rate_text(p.flops, ms).c_str(),
                c ? number_text("%.3f", c->times.median()).c_str() : "-",
                c ? number_text("%.2f", c->times.median() / ms).c_str() : "-",
                b ? number_text("%.3f", b->times.median()).c_str() : "-",
                b ? number_text("%.2fx", b->times.median() / ms).c_str() : "-");
  }
  if (!comparisons.empty()) {
    std::string paired;
    for (const Measured& m : comparisons) {
      const std::vector<double> ratios = ratios_per_round(ours, m);
      if (ratios.empty()) continue;
      const char* format = m.key == "baseline" ? "%.2fx" : "%.2f";
      const auto [lo, hi] = std::minmax_element(ratios.begin(), ratios.end());
      paired += std::string(paired.empty() ? " " : "; ") + "ours/" + m.key + " " +
                number_text(format, median_of(ratios)) + " (range " + number_text(format, *lo) +
                "-" + number_text(format, *hi) + ")";
    }
    if (!paired.empty()) {
      std::printf("paired: forward+backward per round, median%s\n", paired.c_str());
    }
  }
  std::printf("\n");
  for (const Measured& m : comparisons) {
    std::printf("%s: %s\n", m.key.c_str(), m.description.c_str());
  }
  if (!comparisons_note.empty()) std::printf("ceiling, baseline: %s\n", comparisons_note.c_str());
  if (agreement) {
    std::printf("baseline vs ours (norm-wise relative difference): out %.3g, dx %.3g, d_gates "
                "%.3g: %s (tolerance %.3g)\n",
                agreement->out, agreement->dx, agreement->d_gates,
                agreement->agrees() ? "agree" : "DIFFER", agreement->tolerance);
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
  std::printf("\n        (all allocated before the first call and held throughout: the peak)\n");
  const KeptBytes kept = kept_bytes(s, r.dtype, memory);
  std::printf("        kept from forward for backward: ours %s (X, H, plan); original ScatterMoE "
              "%s (X, H, act(gate)*up, Y; from the shapes): %.2fx\n",
              format_bytes(kept.ours).c_str(), format_bytes(kept.original).c_str(),
              static_cast<double>(kept.ours) / static_cast<double>(kept.original));
  if (const Measured* b = find_comparison(comparisons, "baseline")) {
    std::printf("        per-expert loop: extra %s (grouped X, H, A, Y and their gradients, "
                "plan, outputs, weight gradients, cuBLAS workspace): ours %.2fx\n",
                format_bytes(b->extra_bytes).c_str(),
                static_cast<double>(memory.extra()) / static_cast<double>(b->extra_bytes));
  }
  if (copy.times.ms.empty()) {
    std::printf("\naggregation: %s (each token's k rows read, one written); plain copy %s\n",
                format_bytes(copy.bytes).c_str(), copy.note.c_str());
  } else {
    std::printf("\naggregation: %s (each token's k rows read, one written: the gate combine, the sum "
                "over k); a plain device copy of as many bytes: %.3f ms, %.0f GB/s\n",
                format_bytes(copy.bytes).c_str(), copy.times.median(),
                static_cast<double>(copy.copied) / (copy.times.median() * 1e-3) / 1e9);
  }
  if (!check) {
    std::printf("check: skipped (--check-rows 0)\n");
  } else {
    std::printf("check: %s  forward rows [0, %lld) of %lld against the float64 oracle: relative "
                "error %.3g, tolerance %.3g\n",
                check->passed ? "PASS" : "FAIL", static_cast<long long>(r.check_rows),
                static_cast<long long>(s.tokens), check->error, check->tolerance);
  }
  std::printf("summary: %s\n", summary_line(ours, comparisons, memory, check).c_str());
}

nlohmann::ordered_json phases_json(const std::vector<Phase>& phases) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  for (const Phase& p : phases) {
    nlohmann::ordered_json entry = {
        {"median_ms", p.times.median()}, {"min_ms", p.times.min()}, {"ms", p.times.ms}};
    if (p.flops > 0) {
      entry["flops"] = p.flops;
      entry["tflops"] = p.flops / (p.times.median() * 1e-3) / 1e12;
    }
    j[p.name] = entry;
  }
  return j;
}

nlohmann::ordered_json to_json(const Resolved& r, const BenchDevice& device, const Measured& ours,
                               const std::vector<Measured>& comparisons,
                               const std::string& comparisons_note, const Agreement* agreement,
                               const Memory& memory, const AggregationCopy& copy,
                               const check::SliceCheck* check, std::uint64_t seed) {
  const BuildInfo build = build_info();
  nlohmann::ordered_json j;
  j["program"] = "scattermoe bench";
  j["version"] = build.version;
  j["preset"] = r.preset;
  j["summary"] = summary_line(ours, comparisons, memory, check);
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
  j["timing"] = {{"statistic", "median over the timed iterations"},
                 {"cache_flush_bytes", device.flush_bytes()},
                 {"cache_flush", device.flush_bytes() > 0
                                     ? "a scratch buffer written before every iteration, untimed"
                                     : "none"},
                 {"forward", "builds the routing plan, then runs mlp_forward"},
                 {"order", "interleaved: one iteration of each implementation per round"},
                 {"ratio_per_round",
                  "per comparison: the median over timed rounds of its forward+backward ms "
                  "over ours in the same round (the direction of ours_over_ceiling and "
                  "ours_speedup)"}};
  j["flop_convention"] = "forward = 6*T*k*d*h; backward = 2x forward; forward+backward = 3x";
  j["phases"] = phases_json(ours.phases);
  for (const char* key : {"ceiling", "baseline"}) {
    const Measured* m = find_comparison(comparisons, key);
    if (!m) {
      j[key] = nullptr;
      continue;
    }
    nlohmann::ordered_json c = {{"description", m->description},
                                {"phases", phases_json(m->phases)},
                                {"extra_bytes", m->extra_bytes}};
    nlohmann::ordered_json ratios = nlohmann::ordered_json::object();
    for (const Phase& p : m->phases) {
      if (const Phase* o = ours.find(p.name)) {
        ratios[p.name] = p.times.median() / o->times.median();
      }
    }
    // ceiling: ours as a fraction of the ceiling's rate; baseline: ours' speed-up over it.
    c[std::string(key) == "ceiling" ? "ours_over_ceiling" : "ours_speedup"] = ratios;
    const std::vector<double> per_round = ratios_per_round(ours, *m);
    if (per_round.empty()) {
      c["ratio_per_round"] = nullptr;
    } else {
      c["ratio_per_round"] = median_of(per_round);
    }
    j[key] = c;
  }
  if (!comparisons_note.empty()) j["comparisons_note"] = comparisons_note;
  if (agreement) {
    j["baseline"]["agreement_with_ours"] = {{"out", agreement->out},
                                            {"dx", agreement->dx},
                                            {"d_gates", agreement->d_gates},
                                            {"tolerance", agreement->tolerance},
                                            {"agrees", agreement->agrees()},
                                            {"measure", "norm-wise relative difference"}};
  }
  nlohmann::ordered_json mem = nlohmann::ordered_json::object();
  for (int c = 0; c < kNumCategories; ++c) mem[kCategoryNames[c]] = memory.bytes[c];
  mem["total"] = memory.total();
  mem["extra"] = memory.extra();
  const KeptBytes kept = kept_bytes(r.shape, r.dtype, memory);
  mem["kept_for_backward"] = kept.ours;
  mem["original_scattermoe_kept_for_backward"] = kept.original;
  j["memory_bytes"] = mem;
  nlohmann::ordered_json agg = {
      {"bytes", copy.bytes},
      {"description", "each token's k output rows read and one row written (the gate combine, "
                      "the sum over k); plain_copy: a device-to-device copy of as many bytes"}};
  if (copy.times.ms.empty()) {
    agg["plain_copy"] = nullptr;
    agg["note"] = copy.note;
  } else {
    agg["plain_copy"] = {{"bytes", copy.copied},
                         {"median_ms", copy.times.median()},
                         {"min_ms", copy.times.min()},
                         {"bytes_per_second", static_cast<double>(copy.copied) / (copy.times.median() * 1e-3)}};
  }
  j["aggregation"] = agg;
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
  const TensorView dw1 = buffers.add(Category::kGradient, r.dtype, {E, 2 * h, d});
  const TensorView dw2 = buffers.add(Category::kGradient, r.dtype, {E, d, h});
  grads.dw1 = dw1.transposed(1, 2);
  grads.dw2 = dw2.transposed(1, 2);
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
  generate_normal(*device, args.x, 1.0f, seed, kStreamX);
  generate_normal(*device, d_out, 1.0f, seed, kStreamDOut);
  generate_normal(*device, w1, 1.0f / std::sqrt(static_cast<float>(d)), seed, kStreamW1);
  generate_normal(*device, w2, 1.0f / std::sqrt(static_cast<float>(h)), seed, kStreamW2);
  {
    std::vector<std::int64_t> idx(static_cast<std::size_t>(L));
    std::vector<char> gates(static_cast<std::size_t>(L) * dtype_size(r.dtype));
    fill_routing(s, seed, idx.data(), gates.data(), r.dtype);
    generate(*device, expert_idxs,
             [&](void* p) { std::memcpy(p, idx.data(), idx.size() * sizeof(std::int64_t)); });
    generate(*device, args.gates, [&](void* p) { std::memcpy(p, gates.data(), gates.size()); });
  }
  device->synchronize();

  // ---- the comparisons (CUDA: the cuBLAS ceiling and the per-expert loop) on the same inputs --
  BenchLayer layer;
  layer.shape = s;
  layer.dtype = r.dtype;
  layer.activation = r.activation;
  layer.x = args.x;
  layer.expert_idxs = expert_idxs;
  layer.gates = args.gates;
  layer.d_out = d_out;
  layer.w1 = w1;
  layer.w2 = w2;
  layer.dw1 = dw1;
  layer.dw2 = dw2;
  std::vector<std::unique_ptr<BenchComparison>> comparisons;
  std::string comparisons_note;
  try {
    comparisons = make_bench_comparisons(*device, layer, ctx);
    if (comparisons.empty()) {
      comparisons_note = "not measured on " + device_name(r.device) + " (cuBLAS, CUDA only)";
    }
  } catch (const std::bad_alloc&) {
    comparisons.clear();
    comparisons_note = "skipped: their buffers do not fit on " + device_name(r.device) +
                       " next to the layer's";
  } catch (const Unsupported& e) {  // cuBLAS or CUDA refused: still report the layer
    comparisons.clear();
    comparisons_note = std::string("skipped: ") + e.what();
  }

  // ---- time ours and each comparison, interleaved round by round (time_interleaved) ----
  std::vector<std::vector<std::function<void()>>> implementations = {
      {[&] { build_routing_plan(expert_idxs, static_cast<int>(E), plan, ctx); },
       [&] { mlp_forward(args, plan, out, hidden, ctx); },
       [&] { mlp_backward(args, plan, hidden, d_out, grads, ctx); }}};
  for (const std::unique_ptr<BenchComparison>& c : comparisons) {
    implementations.push_back({[&c] { c->forward(); }, [&c] { c->backward(); }});
  }
  const std::vector<StepEnds> ends = time_interleaved(*device, implementations, r.warmup, r.iters);
  Measured ours;
  ours.key = "ours";
  ours.extra_bytes = memory.extra();
  ours.phases = {{"forward", forward_flops, steps_between(ends[0], -1, 1)},
                 {"backward", 2.0 * forward_flops, steps_between(ends[0], 1, 2)},
                 {kFwdBwd, 3.0 * forward_flops, steps_between(ends[0], -1, 2)},
                 {"routing plan", 0.0, steps_between(ends[0], -1, 0)}};
  std::vector<Measured> measured;
  for (std::size_t i = 0; i < comparisons.size(); ++i) {
    const BenchComparison& c = *comparisons[i];
    const StepEnds& e = ends[i + 1];
    Measured m;
    m.key = c.key();
    m.description = c.description();
    m.extra_bytes = c.extra_bytes();
    m.phases = {{"forward", forward_flops, steps_between(e, -1, 0)},
                {"backward", 2.0 * forward_flops, steps_between(e, 0, 1)},
                {kFwdBwd, 3.0 * forward_flops, steps_between(e, -1, 1)}};
    measured.push_back(std::move(m));
  }

  const AggregationCopy copy = time_aggregation_copy(*device, r);

  // ---- check a slice of the forward output against the float64 oracle ----
  // Only the first check_rows tokens and the experts they chose are read (and copied to the host).
  check::SliceCheck check_result;
  const bool checked = r.check_rows > 0;
  if (checked) {
    const std::int64_t rows = r.check_rows;
    const HostCopy idx_host(*device, expert_idxs.narrowed(0, 0, rows));
    std::vector<std::int64_t> experts;
    for (std::int64_t i = 0; i < rows * k; ++i) {
      experts.push_back(static_cast<const std::int64_t*>(idx_host.view().data())[i]);
    }
    std::sort(experts.begin(), experts.end());
    experts.erase(std::unique(experts.begin(), experts.end()), experts.end());
    experts.erase(std::remove_if(experts.begin(), experts.end(),
                                 [&](std::int64_t e) { return e < 0 || e >= E; }),
                  experts.end());
    const HostCopy x_host(*device, args.x.narrowed(0, 0, rows)),
        w1_host(*device, args.w1, &experts), w2_host(*device, args.w2, &experts),
        gates_host(*device, args.gates.narrowed(0, 0, rows)),
        out_host(*device, out.narrowed(0, 0, rows));
    MlpArgs host_args = args;
    host_args.x = x_host.view();
    host_args.w1 = w1_host.view();
    host_args.w2 = w2_host.view();
    host_args.gates = gates_host.view();
    check_result =
        check::check_mlp_forward_rows(host_args, idx_host.view(), out_host.view(), rows);
  }

  // ---- the per-expert loop computes the same layer: how close are its results to ours ----
  Agreement agreement;
  bool compared = false;
  for (const std::unique_ptr<BenchComparison>& c : comparisons) {
    if (!c->out().defined()) continue;
    agreement.out = relative_difference(*device, c->out(), out);
    agreement.dx = relative_difference(*device, c->dx(), grads.dx);
    agreement.d_gates = relative_difference(*device, c->d_gates(), grads.d_gates);
    agreement.tolerance = 2.0 * check::tolerance_for(r.dtype);
    compared = true;
  }

  print_report(r, *device, ours, measured, comparisons_note, compared ? &agreement : nullptr,
               memory, copy, checked ? &check_result : nullptr);
  if (json_file.is_open()) {
    json_file << to_json(r, *device, ours, measured, comparisons_note,
                         compared ? &agreement : nullptr, memory, copy,
                         checked ? &check_result : nullptr, seed)
                     .dump(2)
              << "\n";
    if (!json_file) throw UsageError("--json: writing '" + options.json_path + "' failed");
    std::printf("wrote %s\n", options.json_path.c_str());
  }
  return !checked || check_result.passed ? 0 : 1;
}

}  // namespace scattermoe::tools
