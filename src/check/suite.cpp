#include "check/suite.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "check/device_memory.hpp"
#include "check/host_tensor.hpp"
#include "check/reference_f64.hpp"
#include "core/half.hpp"
#include "scattermoe/error.hpp"
#include "scattermoe/ops.hpp"
#include "scattermoe/plan.hpp"

namespace scattermoe::check {
namespace {

// Every integer in [-256, 256] is exact in bf16 (8 significant bits), and so in f16 and f32:
// small-integer inputs whose products, sums and stored intermediates stay within it give the
// same bits whatever the accumulation order.
constexpr double kExactLimit = 256.0;

// Problem sizes: d not a multiple of 8, an empty expert, k = 2.
constexpr std::int64_t kTokens = 11;
constexpr int kTopK = 2;
constexpr int kExperts = 5;
constexpr int kEmptyExpert = 2;
constexpr std::int64_t kRows = kTokens * kTopK;
constexpr std::int64_t kDIn = 13;
constexpr std::int64_t kDOut = 7;
constexpr std::int64_t kMlpD = 9;
constexpr std::int64_t kMlpH = 5;

bool fits_exactly(const Matrix& m) {
  for (double v : m.v) {
    if (!(std::fabs(v) <= kExactLimit) || v != std::nearbyint(v)) return false;
  }
  return true;
}

bool fits_exactly(const std::vector<Matrix>& ms) {
  for (const Matrix& m : ms) {
    if (!fits_exactly(m)) return false;
  }
  return true;
}

// E matrices a x b stacked as (E*a, b), so one comparison covers them all.
Matrix stack(const std::vector<Matrix>& ms) {
  Matrix s;
  for (const Matrix& m : ms) {
    s.cols = m.cols;
    s.rows += m.rows;
    s.v.insert(s.v.end(), m.v.begin(), m.v.end());
  }
  return s;
}

Matrix read(const TensorView& v) { return v.rank() == 3 ? stack(to_matrices(v)) : to_matrix(v); }

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

std::string mode_name(bool in_grouped, bool out_grouped) {
  return std::string(in_grouped ? "grouped" : "scattered") + "->" +
         (out_grouped ? "grouped" : "scattered");
}

Matrix none() { return Matrix(); }

// One tensor of a check. The suite fills and reads the host tensor (the oracle and every
// comparison work on the host); the op gets arg(): the host view itself on the CPU, or on a
// CUDA device a mirror in device memory with the same shape and strides. Inputs are uploaded
// once drawn, outputs are poisoned on both sides and downloaded after the op.
class Operand {
 public:
  Operand() = default;
  Operand(Device device, DType dtype, std::vector<std::int64_t> shape, bool transposed = false)
      : Operand(device, HostTensor(dtype, std::move(shape), transposed)) {}
  Operand(Device device, HostTensor host) : host_(std::move(host)), device_(device) {
#ifdef SCATTERMOE_CHECK_CUDA
    if (on_cuda()) mirror_ = DeviceBuffer(host_.byte_size());
#endif
  }

  // The host tensor's view: what the suite fills and reads.
  TensorView view() const { return host_.view(); }
  const HostTensor& host() const { return host_; }

  // What the op is given.
  TensorView arg() const {
    const TensorView h = host_.view();
#ifdef SCATTERMOE_CHECK_CUDA
    if (on_cuda()) {
      std::int64_t shape[TensorView::kMaxRank], strides[TensorView::kMaxRank];
      for (int d = 0; d < h.rank(); ++d) {
        shape[d] = h.size(d);
        strides[d] = h.stride(d);
      }
      // A transposed host view may start inside its buffer: the mirror starts at the same byte.
      const std::ptrdiff_t offset =
          static_cast<const unsigned char*>(h.data()) - host_.bytes();
      return TensorView(static_cast<unsigned char*>(mirror_.data()) + offset, h.dtype(), h.rank(),
                        shape, strides, device_);
    }
#endif
    return h;
  }

  // Host bytes -> device (inputs, after they are drawn).
  void upload() {
#ifdef SCATTERMOE_CHECK_CUDA
    if (on_cuda()) mirror_.upload(host_.bytes());
#endif
  }
  // Device bytes -> host (outputs, after the op finished).
  void download() {
#ifdef SCATTERMOE_CHECK_CUDA
    if (on_cuda()) mirror_.download(host_.bytes());
#endif
  }
  // NaN everywhere the op may write, on both sides.
  void poison() {
    host_.poison();
#ifdef SCATTERMOE_CHECK_CUDA
    if (on_cuda()) mirror_.fill(0xff);
#endif
  }

 private:
  bool on_cuda() const { return device_.type == DeviceType::kCUDA; }

  HostTensor host_;
  Device device_ = Device::cpu();
#ifdef SCATTERMOE_CHECK_CUDA
  DeviceBuffer mirror_;
#endif
};

// A routing plan's three vectors as operands.
struct PlanOperands {
  Operand sorted_expert_idxs, sorted_scattered_idxs, expert_offsets;
  RoutingPlan plan() const {
    return RoutingPlan{sorted_expert_idxs.arg(), sorted_scattered_idxs.arg(), expert_offsets.arg()};
  }
};

class Suite {
 public:
  Suite(std::uint64_t seed, Device device) : rng_(seed), device_(device) {}

  std::vector<CheckResult> take() { return std::move(results_); }

  void plan_checks() {
    for (DType idx_dtype : {DType::kInt32, DType::kInt64}) {
      struct Case {
        const char* name;
        std::int64_t tokens;
        int k;
        int experts;
        int skip;
      };
      for (const Case& c : {Case{"mixed-empty-expert", kTokens, kTopK, kExperts, kEmptyExpert},
                            Case{"k4", 6, 4, 7, -1}, Case{"one-token", 1, 1, 3, -1},
                            Case{"no-tokens", 0, 2, 4, -1}}) {
        const std::string name = std::string("plan/") + dtype_name(idx_dtype) + "/" + c.name;
        guarded(name, [&] {
          const auto idx = draw_routing(rng_, c.tokens, c.k, c.experts, c.skip);
          const PlanOperands plan = build_plan(idx, c.tokens, c.k, c.experts, idx_dtype);
          const Plan64 want = reference_plan(idx, c.experts);
          const auto as_matrix = [](const std::vector<std::int64_t>& v) {
            Matrix m(static_cast<std::int64_t>(v.size()), 1);
            for (std::size_t i = 0; i < v.size(); ++i) m.v[i] = static_cast<double>(v[i]);
            return m;
          };
          Matrix got = stack({to_matrix(plan.sorted_expert_idxs.view()),
                              to_matrix(plan.sorted_scattered_idxs.view()),
                              to_matrix(plan.expert_offsets.view())});
          Matrix expected =
              stack({as_matrix(want.sorted_expert_idxs), as_matrix(want.sorted_scattered_idxs),
                     as_matrix(want.expert_offsets)});
          compare(name, got, expected, DType::kInt64, true);
        });
      }
    }
  }

  void dtype_checks(DType dtype) {
    dtype_ = dtype;
    idx_ = draw_routing(rng_, kTokens, kTopK, kExperts, kEmptyExpert);
    plan_ = build_plan(idx_, kTokens, kTopK, kExperts, DType::kInt64);
    ref_ = reference_plan(idx_, kExperts);
    for (bool exact : {true, false}) {
      exact_ = exact;
      scatter2scatter_checks();
      group_checks();
      group_xty_checks();
      parallel_linear_checks();
      mlp_checks();
    }
  }

 private:
  bool on_cuda() const { return device_.type == DeviceType::kCUDA; }

  std::string prefix(const char* op) const {
    return std::string(op) + "/" + dtype_name(dtype_) + "/";
  }
  std::string suffix() const { return exact_ ? "/exact" : "/random"; }

  Operand operand(DType dtype, std::vector<std::int64_t> shape, bool transposed = false) const {
    return Operand(device_, dtype, std::move(shape), transposed);
  }

  // Small integers in [lo, hi] for exact checks, normal(0, scale^2) for random ones.
  void fill(const TensorView& v, double scale = 1.0, int lo = -2, int hi = 2) {
    if (exact_) {
      fill_ints(v, rng_, lo, hi);
    } else {
      fill_normal(v, rng_, scale);
    }
  }

  // Redraws inputs (draw() fills them and computes the oracle) until, for exact checks, every
  // value the oracle produces fits kExactLimit; random checks take the first draw.
  bool draw_inputs(const std::function<bool()>& draw) {
    for (int attempt = 0; attempt < 64; ++attempt) {
      if (draw() || !exact_) return true;
    }
    return false;
  }

  static void upload(std::initializer_list<Operand*> inputs) {
    for (Operand* o : inputs) o->upload();
  }

  // After an op: waits for the device (reporting its errors) and copies the outputs back.
  void finish(const std::vector<Operand*>& outputs) {
#ifdef SCATTERMOE_CHECK_CUDA
    if (on_cuda()) synchronize_device("running the op on " + device_name(device_));
#endif
    for (Operand* o : outputs) o->download();
  }

  // Builds the plan with the library on the suite's device, from expert_idxs in `idx_dtype`.
  PlanOperands build_plan(const std::vector<std::int64_t>& idx, std::int64_t tokens, int k,
                          int experts, DType idx_dtype) {
    Operand ids(device_, make_expert_idxs(idx, tokens, k, idx_dtype));
    ids.upload();
    PlanOperands plan{operand(DType::kInt64, {tokens * k}), operand(DType::kInt64, {tokens * k}),
                      operand(DType::kInt64, {experts})};
    std::vector<Operand*> outs{&plan.sorted_expert_idxs, &plan.sorted_scattered_idxs,
                               &plan.expert_offsets};
    for (Operand* o : outs) o->poison();
    build_routing_plan(ids.arg(), experts, plan.plan(),
                       context(routing_plan_workspace_size(tokens, k, experts, device_)));
    finish(outs);
    return plan;
  }

  void add(CheckResult r) { results_.push_back(std::move(r)); }

  template <class F>
  void guarded(const std::string& name, F f) {
    try {
      f();
    } catch (const std::exception& e) {
      add(CheckResult{name, false, 0.0, 0.0, std::string("threw: ") + e.what()});
    }
  }

  // Exact: every element equals the oracle rounded to `dtype`, bit for bit (NaN never equals).
  // Random: norm-wise relative error within tolerance_scale * tolerance_for(dtype).
  void compare(const std::string& name, const Matrix& got, const Matrix& want, DType dtype,
               bool exact, const std::string& extra = "", double tolerance_scale = 1.0) {
    CheckResult r;
    r.name = name;
    if (got.rows != want.rows || got.cols != want.cols) {
      r.detail = "shape mismatch against the oracle";
    } else if (exact) {
      for (std::size_t n = 0; n < got.v.size() && r.detail.empty(); ++n) {
        const double expected = round_to(dtype, want.v[n]);
        if (!(got.v[n] == expected)) {
          const std::int64_t row =
              static_cast<std::int64_t>(n) / std::max<std::int64_t>(got.cols, 1);
          const std::int64_t col =
              static_cast<std::int64_t>(n) % std::max<std::int64_t>(got.cols, 1);
          r.detail = "element [" + std::to_string(row) + ", " + std::to_string(col) + "] is " +
                     fmt(got.v[n]) + "; expected exactly " + fmt(expected);
          r.error = std::isnan(got.v[n]) ? std::numeric_limits<double>::infinity()
                                         : std::fabs(got.v[n] - expected);
        }
      }
    } else {
      r.error = relative_error(got, want);
      r.tolerance = tolerance_scale * tolerance_for(dtype);
      if (!(r.error <= r.tolerance)) {
        r.detail = "relative error " + fmt(r.error) + " above tolerance " + fmt(r.tolerance);
      }
    }
    if (r.detail.empty() && !extra.empty()) r.detail = extra;
    r.passed = r.detail.empty();
    add(std::move(r));
  }

  // Runs `run` again on re-poisoned outputs and reports whether any output changed a bit.
  // `run` must leave its outputs on the host (finish()).
  std::string rerun_differs(const std::function<void()>& run,
                            const std::vector<Operand*>& outputs) {
    std::vector<HostTensor> first;
    for (Operand* o : outputs) {
      first.push_back(o->host());
      o->poison();
    }
    run();
    for (std::size_t n = 0; n < outputs.size(); ++n) {
      if (!outputs[n]->host().same_bytes(first[n]))
        return "a second run on the same inputs changed output bits";
    }
    return "";
  }

  // Workspace for one call on the suite's device, filled with 0xff (NaN) bytes; valid until
  // the next call.
  Context context(std::size_t bytes) {
#ifdef SCATTERMOE_CHECK_CUDA
    if (on_cuda()) {
      device_scratch_ = DeviceBuffer();  // the previous op has finished: free before allocating
      device_scratch_ = DeviceBuffer(bytes);
      device_scratch_.fill(0xff);
      return Context{nullptr, Workspace{device_scratch_.data(), bytes}};
    }
#endif
    scratch_ = std::make_unique<Scratch>(bytes);
    return scratch_->context();
  }

  // ---- scatter2scatter: four modes, bias on and off, both weight layouts -------------------
  void scatter2scatter_checks() {
    for (int mode = 0; mode < 4; ++mode) {
      for (bool bias : {false, true}) {
        const bool xg = mode & 2;
        const bool yg = mode & 1;
        const bool transposed = !bias;  // each mode runs once in each weight layout
        const std::string name = prefix("scatter2scatter") + mode_name(xg, yg) +
                                 (bias ? "/bias" : "/no-bias") +
                                 (transposed ? "/w-transposed" : "") + suffix();
        guarded(name, [&] {
          Operand x = operand(dtype_, {xg ? kRows : kTokens, kDIn});
          Operand w = operand(dtype_, {kExperts, kDIn, kDOut}, transposed);
          Operand b = operand(dtype_, {kExperts, kDOut});
          Operand y = operand(dtype_, {kRows, kDOut});
          Matrix want;
          const bool drawn = draw_inputs([&] {
            fill(x.view());
            fill(w.view(), 1.0 / std::sqrt(double(kDIn)));
            if (bias) fill(b.view());
            want = reference_scatter2scatter(read(x.view()), to_matrices(w.view()),
                                             bias ? read(b.view()) : none(), ref_, kTopK, xg, yg);
            return fits_exactly(want);
          });
          if (!drawn) return no_draw(name);
          upload({&x, &w, &b});
          const Scatter2ScatterArgs args{x.arg(), w.arg(), bias ? b.arg() : TensorView{},
                                         kTopK,   xg,      yg};
          const RoutingPlan plan = plan_.plan();
          const auto run = [&] {
            scatter2scatter(args, plan, y.arg(),
                            context(scatter2scatter_workspace_size(args, plan)));
            finish({&y});
          };
          y.poison();
          run();
          const Matrix got = read(y.view());
          compare(name, got, want, dtype_, exact_, exact_ ? "" : rerun_differs(run, {&y}));
        });
      }
    }
  }

  // ---- group: fan-out 1 and k, coeff absent, flat (L) and (T, k) --------------------------
  void group_checks() {
    for (int fan_out : {1, kTopK}) {
      for (int coeff_kind = 0; coeff_kind < 3; ++coeff_kind) {
        static const char* const kCoeff[] = {"/no-coeff", "/coeff-flat", "/coeff-2d"};
        const std::string name =
            prefix("group") + "fan-out-" + std::to_string(fan_out) + kCoeff[coeff_kind] + suffix();
        guarded(name, [&] {
          Operand a = operand(dtype_, {kRows / fan_out, kDIn});
          Operand coeff = coeff_kind == 1 ? operand(dtype_, {kRows})
                                          : operand(dtype_, {kTokens, kTopK});
          Operand g = operand(dtype_, {kRows, kDIn});
          Matrix want;
          const bool drawn = draw_inputs([&] {
            fill(a.view());
            if (coeff_kind) fill(coeff.view());
            std::vector<double> c;
            if (coeff_kind) c = read(coeff.view()).v;  // token-major either way
            want = reference_group(read(a.view()), ref_, fan_out, c);
            return fits_exactly(want);
          });
          if (!drawn) return no_draw(name);
          upload({&a, &coeff});
          const TensorView coeff_view = coeff_kind ? coeff.arg() : TensorView{};
          const auto run = [&] {
            group(a.arg(), plan_.plan(), fan_out, coeff_view, g.arg());
            finish({&g});
          };
          g.poison();
          run();
          compare(name, read(g.view()), want, dtype_, exact_,
                  exact_ ? "" : rerun_differs(run, {&g}));
        });
      }
    }
  }

  // ---- group_xty: db on and off, dW in both layouts ---------------------------------------
  void group_xty_checks() {
    for (bool with_db : {false, true}) {
      const bool transposed = with_db;
      const std::string name = prefix("group_xty") + (with_db ? "db" : "no-db") +
                               (transposed ? "/dw-transposed" : "") + suffix();
      guarded(name, [&] {
        Operand dy = operand(dtype_, {kRows, kDOut});
        Operand x = operand(dtype_, {kRows, kDIn});
        Operand dw = operand(dtype_, {kExperts, kDIn, kDOut}, transposed);
        Operand db = operand(dtype_, {kExperts, kDOut});
        std::vector<Matrix> want_dw;
        Matrix want_db;
        const bool drawn = draw_inputs([&] {
          fill(dy.view());
          fill(x.view());
          reference_group_xty(read(dy.view()), read(x.view()), ref_, kExperts, &want_dw, &want_db);
          return fits_exactly(want_dw) && fits_exactly(want_db);
        });
        if (!drawn) return no_draw(name);
        upload({&dy, &x});
        std::vector<Operand*> outs{&dw};
        if (with_db) outs.push_back(&db);
        const auto run = [&] {
          group_xty(dy.arg(), x.arg(), plan_.plan(), dw.arg(), with_db ? db.arg() : TensorView{});
          finish(outs);
        };
        dw.poison();
        db.poison();
        run();
        std::vector<Matrix> got{read(dw.view())};
        Matrix want = stack(want_dw);
        if (with_db) {
          got.push_back(read(db.view()));
          want = stack({want, want_db});
        }
        compare(name, stack(got), want, dtype_, exact_, exact_ ? "" : rerun_differs(run, outs));
      });
    }
  }

  // ---- ParallelLinear forward and backward --------------------------------------------------
  void parallel_linear_checks() {
    struct Mode {
      bool gi, go, gates;
    };
    for (const Mode m :
         {Mode{false, false, false}, Mode{false, true, false}, Mode{true, false, false},
          Mode{true, true, false}, Mode{false, false, true}, Mode{true, false, true}}) {
      for (bool bias : {false, true}) {
        const bool transposed = bias == m.gates;
        const std::string what = mode_name(m.gi, m.go) + (m.gates ? "/gates" : "/no-gates") +
                                 (bias ? "/bias" : "/no-bias") +
                                 (transposed ? "/w-transposed" : "") + suffix();
        const std::string fwd_name = prefix("parallel_linear_forward") + what;
        const std::string bwd_name = prefix("parallel_linear_backward") + what;
        guarded(fwd_name, [&] {
          const std::int64_t out_rows = m.gates ? kTokens : kRows;
          Operand x = operand(dtype_, {m.gi ? kRows : kTokens, kDIn});
          Operand w = operand(dtype_, {kExperts, kDIn, kDOut}, transposed);
          Operand b = operand(dtype_, {kExperts, kDOut});
          Operand gates = operand(dtype_, {kTokens, kTopK});
          Operand out = operand(dtype_, {out_rows, kDOut});
          Operand d_out = operand(dtype_, {out_rows, kDOut});
          Operand dx = operand(dtype_, {m.gi ? kRows : kTokens, kDIn});
          Operand dw = operand(dtype_, {kExperts, kDIn, kDOut}, transposed);
          Operand db = operand(dtype_, {kExperts, kDOut});
          Operand dg = operand(dtype_, {kTokens, kTopK});
          ReferenceLinear want;
          const bool drawn = draw_inputs([&] {
            fill(x.view());
            fill(w.view(), 1.0 / std::sqrt(double(kDIn)));
            if (bias) fill(b.view());
            if (m.gates) fill(gates.view());
            fill(d_out.view());
            const Matrix dout = read(d_out.view());
            const Matrix xm = read(x.view());
            const auto wm = to_matrices(w.view());
            const Matrix bm = bias ? read(b.view()) : none();
            want = reference_parallel_linear(xm, wm, bm, m.gates ? read(gates.view()) : none(),
                                             ref_, kTopK, m.gi, m.go, &dout);
            // Y (recomputed for d_gates) and dY = d_out * gate may be stored in the dtype.
            const Matrix y = reference_scatter2scatter(xm, wm, bm, ref_, kTopK, m.gi, m.go);
            return fits_exactly(want.out) && fits_exactly(want.dx) && fits_exactly(want.dw) &&
                   fits_exactly(want.db) && fits_exactly(want.d_gates) && fits_exactly(y);
          });
          if (!drawn) return no_draw(fwd_name);
          upload({&x, &w, &b, &gates, &d_out});
          ParallelLinearArgs args;
          args.x = x.arg();
          args.w = w.arg();
          args.bias = bias ? b.arg() : TensorView{};
          args.gates = m.gates ? gates.arg() : TensorView{};
          args.k = kTopK;
          args.grouped_in = m.gi;
          args.grouped_out = m.go;
          const RoutingPlan plan = plan_.plan();

          const auto forward = [&] {
            parallel_linear_forward(args, plan, out.arg(),
                                    context(parallel_linear_forward_workspace_size(args, plan)));
            finish({&out});
          };
          out.poison();
          forward();
          compare(fwd_name, read(out.view()), want.out, dtype_, exact_,
                  exact_ ? "" : rerun_differs(forward, {&out}));

          guarded(bwd_name, [&] {
            ParallelLinearGrads grads;
            grads.dx = dx.arg();
            grads.dw = dw.arg();
            grads.db = bias ? db.arg() : TensorView{};
            grads.d_gates = m.gates ? dg.arg() : TensorView{};
            std::vector<Operand*> outs{&dx, &dw};
            if (bias) outs.push_back(&db);
            if (m.gates) outs.push_back(&dg);
            const auto backward = [&] {
              parallel_linear_backward(
                  args, plan, d_out.arg(), grads,
                  context(parallel_linear_backward_workspace_size(args, plan, grads)));
              finish(outs);
            };
            for (Operand* o : outs) o->poison();
            backward();
            Matrix got = stack({read(dx.view()), read(dw.view())});
            Matrix expected = stack({want.dx, stack(want.dw)});
            if (bias) {
              got = stack({got, read(db.view())});
              expected = stack({expected, want.db});
            }
            // Compared apart: d_gates has its own width (k columns).
            compare(bwd_name, got, expected, dtype_, exact_,
                    exact_ ? "" : rerun_differs(backward, outs));
            if (m.gates) {
              compare(bwd_name + "/d_gates", read(dg.view()), want.d_gates, dtype_, exact_);
            }
          });
        });
      }
    }
  }

  // ---- MLP and GLU-MLP forward and backward -------------------------------------------------
  void mlp_checks() {
    struct Config {
      bool glu;
      bool bias;
      Activation act;
    };
    std::vector<Config> configs;
    if (exact_) {
      // ReLU is the activation that keeps small integers integers.
      configs = {{false, true, Activation::kRelu},
                 {false, false, Activation::kRelu},
                 {true, true, Activation::kRelu},
                 {true, false, Activation::kRelu}};
    } else {
      configs = {{false, true, Activation::kGelu},   {false, false, Activation::kGeluTanh},
                 {false, true, Activation::kSilu},   {false, true, Activation::kRelu},
                 {true, false, Activation::kSilu},   {true, true, Activation::kGelu},
                 {true, true, Activation::kGeluTanh}};
    }
    for (const Config& c : configs) {
      const std::int64_t h1 = c.glu ? 2 * kMlpH : kMlpH;
      const bool transposed = c.glu;  // GLU weights in the (E, out, in) parameter layout
      const std::string what = std::string(c.glu ? "glu" : "mlp") + "/" + activation_name(c.act) +
                               (c.bias ? "/bias" : "/no-bias") +
                               (transposed ? "/w-transposed" : "") + suffix();
      const std::string fwd_name = prefix("mlp_forward") + what;
      const std::string bwd_name = prefix("mlp_backward") + what;
      guarded(fwd_name, [&] {
        Operand x = operand(dtype_, {kTokens, kMlpD});
        Operand w1 = operand(dtype_, {kExperts, kMlpD, h1}, transposed);
        Operand b1 = operand(dtype_, {kExperts, h1});
        Operand w2 = operand(dtype_, {kExperts, kMlpH, kMlpD}, transposed);
        Operand b2 = operand(dtype_, {kExperts, kMlpD});
        Operand gates = operand(dtype_, {kTokens, kTopK});
        Operand out = operand(dtype_, {kTokens, kMlpD});
        Operand hidden = operand(dtype_, {kRows, h1});
        Operand d_out = operand(dtype_, {kTokens, kMlpD});
        Operand dx = operand(dtype_, {kTokens, kMlpD});
        Operand dw1 = operand(dtype_, {kExperts, kMlpD, h1}, transposed);
        Operand db1 = operand(dtype_, {kExperts, h1});
        Operand dw2 = operand(dtype_, {kExperts, kMlpH, kMlpD}, transposed);
        Operand db2 = operand(dtype_, {kExperts, kMlpD});
        Operand dg = operand(dtype_, {kTokens, kTopK});
        ReferenceMlp want;
        const bool drawn = draw_inputs([&] {
          fill(x.view(), 1.0, -1, 1);
          fill(w1.view(), 1.0 / std::sqrt(double(kMlpD)), -1, 1);
          fill(w2.view(), 1.0 / std::sqrt(double(kMlpH)), -1, 1);
          if (c.bias) {
            fill(b1.view(), 0.5, -1, 1);
            fill(b2.view(), 0.5, -1, 1);
          }
          fill(gates.view());
          fill(d_out.view());
          const Matrix dout = read(d_out.view());
          want = reference_mlp(read(x.view()), to_matrices(w1.view()),
                               c.bias ? read(b1.view()) : none(), to_matrices(w2.view()),
                               c.bias ? read(b2.view()) : none(), read(gates.view()), ref_, c.act,
                               c.glu, &dout);
          return fits_exactly(want.out) && fits_exactly(want.hidden) && fits_exactly(want.act) &&
                 fits_exactly(want.y2) && fits_exactly(want.dh) && fits_exactly(want.dx) &&
                 fits_exactly(want.dw1) && fits_exactly(want.db1) && fits_exactly(want.dw2) &&
                 fits_exactly(want.db2) && fits_exactly(want.d_gates);
        });
        if (!drawn) return no_draw(fwd_name);
        upload({&x, &w1, &b1, &w2, &b2, &gates, &d_out});
        MlpArgs args;
        args.x = x.arg();
        args.w1 = w1.arg();
        args.b1 = c.bias ? b1.arg() : TensorView{};
        args.w2 = w2.arg();
        args.b2 = c.bias ? b2.arg() : TensorView{};
        args.gates = gates.arg();
        args.activation = c.act;
        args.glu = c.glu;
        const RoutingPlan plan = plan_.plan();

        const auto forward = [&] {
          mlp_forward(args, plan, out.arg(), hidden.arg(),
                      context(mlp_forward_workspace_size(args, plan)));
          finish({&out, &hidden});
        };
        out.poison();
        hidden.poison();
        forward();
        compare(fwd_name, read(out.view()), want.out, dtype_, exact_,
                exact_ ? "" : rerun_differs(forward, {&out, &hidden}));
        compare(fwd_name + "/hidden", read(hidden.view()), want.hidden, dtype_, exact_);

        guarded(bwd_name, [&] {
          MlpGrads grads;
          grads.dx = dx.arg();
          grads.dw1 = dw1.arg();
          grads.db1 = c.bias ? db1.arg() : TensorView{};
          grads.dw2 = dw2.arg();
          grads.db2 = c.bias ? db2.arg() : TensorView{};
          grads.d_gates = dg.arg();
          std::vector<Operand*> outs{&dx, &dw1, &dw2, &dg};
          if (c.bias) {
            outs.push_back(&db1);
            outs.push_back(&db2);
          }
          // Backward reads the hidden that forward left on the device.
          const auto backward = [&] {
            mlp_backward(args, plan, hidden.arg(), d_out.arg(), grads,
                         context(mlp_backward_workspace_size(args, plan)));
            finish(outs);
          };
          for (Operand* o : outs) o->poison();
          backward();
          const std::string rerun = exact_ ? "" : rerun_differs(backward, outs);
          compare(bwd_name + "/dx", read(dx.view()), want.dx, dtype_, exact_, rerun);
          compare(bwd_name + "/dw1", read(dw1.view()), stack(want.dw1), dtype_, exact_);
          compare(bwd_name + "/dw2", read(dw2.view()), stack(want.dw2), dtype_, exact_);
          if (c.bias) {
            compare(bwd_name + "/db1", read(db1.view()), want.db1, dtype_, exact_);
            compare(bwd_name + "/db2", read(db2.view()), want.db2, dtype_, exact_);
          }
          // The CUDA backend stores the MLP's intermediates (A, dA) in the storage dtype, and
          // d_gates is a dot product over h of such values where the oracle has exact ones:
          // cancellation in that sum amplifies their rounding by up to sum|a_i b_i| /
          // |sum a_i b_i|, about sqrt(h) on random data. So 4x the tolerance there (random
          // checks only; exact ones are unaffected, their intermediates are exact integers).
          compare(bwd_name + "/d_gates", read(dg.view()), want.d_gates, dtype_, exact_, "",
                  on_cuda() ? 4.0 : 1.0);
        });
      });
    }
  }

  void no_draw(const std::string& name) {
    add(CheckResult{name, false, 0.0, 0.0,
                    "the suite could not draw small-integer inputs whose results stay within +-" +
                        fmt(kExactLimit) + " (a bug in the suite, not the library)"});
  }

  std::mt19937_64 rng_;
  Device device_;
  std::vector<CheckResult> results_;
  DType dtype_ = DType::kFloat32;
  bool exact_ = true;
  std::vector<std::int64_t> idx_;
  PlanOperands plan_;
  Plan64 ref_;
  std::unique_ptr<Scratch> scratch_;
#ifdef SCATTERMOE_CHECK_CUDA
  DeviceBuffer device_scratch_;
#endif
};

void expect_host_view(const char* name, const TensorView& v) {
  if (!v.defined()) {
    throw InvalidArgument(std::string("check_mlp_forward_rows: argument '") + name +
                          "' is undefined; expected a host tensor");
  }
  if (v.device().type != DeviceType::kCPU) {
    throw InvalidArgument(std::string("check_mlp_forward_rows: argument '") + name + "' is " +
                          v.describe() + "; expected a tensor on cpu");
  }
}

// Reads n elements of `v` starting at element offset `base`, `stride` apart, as doubles.
void read_strided(const TensorView& v, std::int64_t base, std::int64_t stride, std::int64_t n,
                  double* dst) {
  const char* p = static_cast<const char*>(v.data());
  const auto at = [&](std::int64_t i) { return base + i * stride; };
  switch (v.dtype()) {
    case DType::kFloat32:
      for (std::int64_t i = 0; i < n; ++i) {
        float f;
        std::memcpy(&f, p + at(i) * 4, 4);
        dst[i] = f;
      }
      return;
    case DType::kFloat16:
    case DType::kBFloat16: {
      const bool bf16 = v.dtype() == DType::kBFloat16;
      for (std::int64_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, p + at(i) * 2, 2);
        dst[i] = bf16 ? detail::bf16_to_float(h) : detail::f16_to_float(h);
      }
      return;
    }
    case DType::kInt32:
    case DType::kInt64: {
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t index[1] = {at(i)};
        const std::int64_t shape[1] = {1};
        const std::int64_t strides[1] = {1};
        dst[i] = read_element(TensorView(v.data(), v.dtype(), 1, shape, strides), index);
      }
      return;
    }
  }
}

// y[c] = sum_q x[q] * w[e, q, c] for c < n_out, q < n_in, walking w along its smaller stride so
// that a large weight (in either layout) streams through memory instead of striding across it.
void expert_matvec(const TensorView& w, std::int64_t e, const std::vector<double>& x,
                   std::int64_t n_in, std::int64_t n_out, std::vector<double>& y,
                   std::vector<double>& buf) {
  const std::int64_t base = e * w.stride(0);
  std::fill(y.begin(), y.begin() + n_out, 0.0);
  if (std::llabs(w.stride(1)) < std::llabs(w.stride(2))) {
    // (E, out, in) parameter layout: column c of W[e] is contiguous.
    buf.resize(static_cast<std::size_t>(n_in));
    for (std::int64_t c = 0; c < n_out; ++c) {
      read_strided(w, base + c * w.stride(2), w.stride(1), n_in, buf.data());
      double acc = 0.0;
      for (std::int64_t q = 0; q < n_in; ++q)
        acc += x[static_cast<std::size_t>(q)] * buf[static_cast<std::size_t>(q)];
      y[static_cast<std::size_t>(c)] = acc;
    }
  } else {
    buf.resize(static_cast<std::size_t>(n_out));
    for (std::int64_t q = 0; q < n_in; ++q) {
      read_strided(w, base + q * w.stride(1), w.stride(2), n_out, buf.data());
      const double xq = x[static_cast<std::size_t>(q)];
      for (std::int64_t c = 0; c < n_out; ++c)
        y[static_cast<std::size_t>(c)] += xq * buf[static_cast<std::size_t>(c)];
    }
  }
}

}  // namespace

std::vector<CheckResult> run_suite(const SuiteOptions& options) {
  for (DType dtype : options.dtypes) {
    if (!is_floating(dtype)) {
      throw InvalidArgument(std::string("run_suite: argument 'options.dtypes' holds ") +
                            dtype_name(dtype) + "; expected f32, f16 or bf16");
    }
  }
  const auto run = [&] {
    Suite suite(options.seed, options.device);
    suite.plan_checks();
    for (DType dtype : options.dtypes) suite.dtype_checks(dtype);
    return suite.take();
  };
  if (options.device.type == DeviceType::kCUDA) {
#ifdef SCATTERMOE_CHECK_CUDA
    // Inputs are drawn and checked on the host; every operand is mirrored to this device.
    require_cuda_device(options.device);
    const CurrentDevice current(options.device.index);
    return run();
#else
    throw Unsupported("run_suite: device " + device_name(options.device) +
                      " needs the CUDA backend, and this build has none (configure with "
                      "-DSCATTERMOE_CUDA=ON)");
#endif
  }
  return run();
}

SliceCheck check_mlp_forward_rows(const MlpArgs& args, const TensorView& expert_idxs,
                                  const TensorView& out, std::int64_t num_rows) {
  expect_host_view("args.x", args.x);
  expect_host_view("args.w1", args.w1);
  expect_host_view("args.w2", args.w2);
  expect_host_view("args.gates", args.gates);
  expect_host_view("expert_idxs", expert_idxs);
  expect_host_view("out", out);
  if (args.b1.defined()) expect_host_view("args.b1", args.b1);
  if (args.b2.defined()) expect_host_view("args.b2", args.b2);
  const auto expect_shape = [](const char* name, const TensorView& v,
                               std::initializer_list<std::int64_t> shape) {
    bool ok = v.rank() == static_cast<int>(shape.size());
    for (int i = 0; ok && i < v.rank(); ++i)
      ok = shape.begin()[i] < 0 || v.size(i) == shape.begin()[i];
    if (!ok) {
      throw InvalidArgument(std::string("check_mlp_forward_rows: argument '") + name + "' is " +
                            v.describe() + "; expected a shape consistent with the MLP's");
    }
  };
  expect_shape("args.x", args.x, {-1, -1});
  const std::int64_t tokens = args.x.size(0);
  const std::int64_t d = args.x.size(1);
  expect_shape("args.w2", args.w2, {-1, -1, d});
  const std::int64_t experts = args.w2.size(0);
  const std::int64_t h = args.w2.size(1);
  const std::int64_t h1 = args.glu ? 2 * h : h;
  expect_shape("args.w1", args.w1, {experts, d, h1});
  if (args.b1.defined()) expect_shape("args.b1", args.b1, {experts, h1});
  if (args.b2.defined()) expect_shape("args.b2", args.b2, {experts, d});
  expect_shape("expert_idxs", expert_idxs, {tokens, -1});
  const std::int64_t k = expert_idxs.size(1);
  expect_shape("args.gates", args.gates, {tokens, k});
  if (num_rows < 0 || num_rows > tokens || out.rank() != 2 || out.size(0) < num_rows ||
      out.size(1) != d) {
    throw InvalidArgument("check_mlp_forward_rows: argument 'num_rows' is " +
                          std::to_string(num_rows) + " with out " + out.describe() +
                          "; expected 0 <= num_rows <= T and out (T, d)");
  }

  // Token by token, straight from expert_idxs: the plan only orders the routed rows, so the
  // value of row t is sum_j g[t,j] * (act(x[t] @ W1[e] + b1[e]) @ W2[e] + b2[e]) with
  // e = expert_idxs[t, j]. This touches only the first num_rows tokens:
  // O(num_rows * k * d * h) work however large the layer is.
  Matrix want(num_rows, d);
  std::vector<double> xrow(static_cast<std::size_t>(d)), hid(static_cast<std::size_t>(h1));
  std::vector<double> act(static_cast<std::size_t>(h)), z(static_cast<std::size_t>(d));
  std::vector<double> bias, buf;
  for (std::int64_t t = 0; t < num_rows; ++t) {
    read_strided(args.x, t * args.x.stride(0), args.x.stride(1), d, xrow.data());
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int64_t ti[2] = {t, j};
      const double ev = read_element(expert_idxs, ti);
      const std::int64_t e = static_cast<std::int64_t>(ev);
      if (e < 0 || e >= experts) {
        throw InvalidArgument("check_mlp_forward_rows: argument 'expert_idxs' holds " + fmt(ev) +
                              " at [" + std::to_string(t) + ", " + std::to_string(j) +
                              "]; expected ids in [0, " + std::to_string(experts) + ")");
      }
      expert_matvec(args.w1, e, xrow, d, h1, hid, buf);
      if (args.b1.defined()) {
        bias.resize(static_cast<std::size_t>(h1));
        read_strided(args.b1, e * args.b1.stride(0), args.b1.stride(1), h1, bias.data());
        for (std::size_t c = 0; c < hid.size(); ++c) hid[c] += bias[c];
      }
      for (std::size_t c = 0; c < act.size(); ++c) {
        act[c] = args.glu
                     ? reference_activation(args.activation, hid[static_cast<std::size_t>(h) + c]) *
                           hid[c]
                     : reference_activation(args.activation, hid[c]);
      }
      expert_matvec(args.w2, e, act, h, d, z, buf);
      if (args.b2.defined()) {
        bias.resize(static_cast<std::size_t>(d));
        read_strided(args.b2, e * args.b2.stride(0), args.b2.stride(1), d, bias.data());
        for (std::size_t o = 0; o < z.size(); ++o) z[o] += bias[o];
      }
      const double g = read_element(args.gates, ti);
      for (std::int64_t o = 0; o < d; ++o) want(t, o) += g * z[static_cast<std::size_t>(o)];
    }
  }
  const Matrix got = to_matrix(out.narrowed(0, 0, num_rows));
  SliceCheck r;
  r.error = relative_error(got, want);
  r.tolerance = tolerance_for(out.dtype());
  r.passed = r.error <= r.tolerance;
  return r;
}

}  // namespace scattermoe::check
