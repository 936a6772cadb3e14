// ParallelLinear forward and backward on the CPU: every mode with and without gates and bias,
// exact on small integers, float64 reference on random values, finite-difference gradient
// checks (library and oracle), parameter-layout gradients, determinism, T = 0.
#include "common/test_util.hpp"

namespace scattermoe::testing {
namespace {

struct Mode {
  bool grouped_in;
  bool grouped_out;
  bool gates;
  std::string name() const {
    return std::string(grouped_in ? "grouped" : "scattered") + "->" +
           (grouped_out ? "grouped" : "scattered") + (gates ? "/gates" : "/no-gates");
  }
};

const Mode kModes[] = {{false, false, false}, {false, true, false}, {true, false, false},
                       {true, true, false},   {false, false, true}, {true, false, true}};

struct Problem {
  HostTensor x, w, b, gates, out, d_out, dx, dw, db, dg;
  ParallelLinearArgs args;
  ParallelLinearGrads grads;
  check::ReferenceLinear want;
  Matrix want_y;  // the ungated rows Y of the oracle
};

// Exact sizes d_in = 7, d_out = 3 with entries in {-2..2}: |Y| <= 30, |out| <= k*2*30 = 240 for
// k = 4, |d_gates| <= 3*30*2, |dW| <= rows * 8 <= 72, |dX| <= k*3*4*2 = 96: all exact in bf16.
Problem make_problem(const Routing& r, const Mode& m, bool bias, bool transposed, DType dt,
                     bool exact, std::mt19937_64& rng, std::int64_t d_in = 7,
                     std::int64_t d_out = 3, DType gate_dt = DType::kFloat32,
                     bool same_gate_dt = true) {
  Problem p;
  const std::int64_t x_rows = m.grouped_in ? r.rows() : r.tokens;
  const std::int64_t out_rows = m.gates ? r.tokens : r.rows();
  const DType gdt = same_gate_dt ? dt : gate_dt;
  p.x = HostTensor(dt, {x_rows, d_in});
  p.w = HostTensor(dt, {r.experts, d_in, d_out}, transposed);
  p.b = HostTensor(dt, {r.experts, d_out});
  p.gates = HostTensor(gdt, {r.tokens, r.k});
  p.out = HostTensor(dt, {out_rows, d_out});
  p.d_out = HostTensor(dt, {out_rows, d_out});
  p.dx = HostTensor(dt, {x_rows, d_in});
  p.dw = HostTensor(dt, {r.experts, d_in, d_out}, transposed);
  p.db = HostTensor(dt, {r.experts, d_out});
  p.dg = HostTensor(gdt, {r.tokens, r.k});
  for (const HostTensor* t : {&p.x, &p.w, &p.b, &p.gates, &p.d_out}) {
    if (exact) {
      check::fill_ints(t->view(), rng);
    } else {
      check::fill_normal(t->view(), rng, t == &p.w ? 1.0 / std::sqrt(double(d_in)) : 1.0);
    }
  }
  p.args.x = p.x.view();
  p.args.w = p.w.view();
  p.args.bias = bias ? p.b.view() : TensorView{};
  p.args.gates = m.gates ? p.gates.view() : TensorView{};
  p.args.k = r.k;
  p.args.grouped_in = m.grouped_in;
  p.args.grouped_out = m.grouped_out;
  p.grads.dx = p.dx.view();
  p.grads.dw = p.dw.view();
  p.grads.db = bias ? p.db.view() : TensorView{};
  p.grads.d_gates = m.gates ? p.dg.view() : TensorView{};
  const Matrix dout = read(p.d_out.view());
  const Matrix bm = bias ? read(p.b.view()) : Matrix();
  p.want = check::reference_parallel_linear(read(p.x.view()), check::to_matrices(p.w.view()), bm,
                                            m.gates ? read(p.gates.view()) : Matrix(), r.ref, r.k,
                                            m.grouped_in, m.grouped_out, &dout);
  p.want_y = check::reference_scatter2scatter(read(p.x.view()), check::to_matrices(p.w.view()), bm,
                                              r.ref, r.k, m.grouped_in, m.grouped_out);
  for (HostTensor* t : {&p.out, &p.dx, &p.dw, &p.db, &p.dg}) t->poison();
  return p;
}

void forward(Problem& p, const RoutingPlan& plan) {
  Scratch scratch(parallel_linear_forward_workspace_size(p.args, plan));
  parallel_linear_forward(p.args, plan, p.out.view(), scratch.context());
}

void backward(Problem& p, const RoutingPlan& plan) {
  Scratch scratch(parallel_linear_backward_workspace_size(p.args, plan, p.grads));
  parallel_linear_backward(p.args, plan, p.d_out.view(), p.grads, scratch.context());
}

void exact_all_modes(DType dt) {
  std::mt19937_64 rng(41);
  for (const Routing& r : awkward_routings(42)) {
    for (const Mode& m : kModes) {
      for (bool bias : {false, true}) {
        for (bool transposed : {false, true}) {
          SCOPED_TRACE(r.name + "/" + m.name() + (bias ? "/bias" : "/no-bias") +
                       (transposed ? "/w-transposed" : "/w-contiguous"));
          Problem p = make_problem(r, m, bias, transposed, dt, true, rng);
          ASSERT_TRUE(fits_exactly(p.want.out) && fits_exactly(p.want.dx) &&
                      fits_exactly(stack(p.want.dw)) && fits_exactly(p.want.db) &&
                      fits_exactly(p.want.d_gates) && fits_exactly(p.want_y));
          forward(p, r.plan());
          EXPECT_TRUE(exactly_equal(p.out.view(), p.want.out)) << "out";
          backward(p, r.plan());
          EXPECT_TRUE(exactly_equal(p.dx.view(), p.want.dx)) << "dx";
          EXPECT_TRUE(exactly_equal(p.dw.view(), stack(p.want.dw))) << "dw";
          if (bias) {
            EXPECT_TRUE(exactly_equal(p.db.view(), p.want.db)) << "db";
          }
          if (m.gates) {
            EXPECT_TRUE(exactly_equal(p.dg.view(), p.want.d_gates)) << "d_gates";
          }
        }
      }
    }
  }
}

TEST(ParallelLinear, ExactForwardBackwardAllModesF32) { exact_all_modes(DType::kFloat32); }
TEST(ParallelLinear, ExactForwardBackwardAllModesBf16) { exact_all_modes(DType::kBFloat16); }
TEST(ParallelLinear, ExactForwardBackwardAllModesF16) { exact_all_modes(DType::kFloat16); }

void random_all_modes(DType dt) {
  std::mt19937_64 rng(43);
  for (const Routing& r : awkward_routings(44)) {
    for (const Mode& m : kModes) {
      for (bool bias : {false, true}) {
        SCOPED_TRACE(r.name + "/" + m.name() + (bias ? "/bias" : "/no-bias"));
        Problem p = make_problem(r, m, bias, /*transposed=*/bias, dt, false, rng, 13, 7);
        forward(p, r.plan());
        EXPECT_TRUE(close_to(p.out.view(), p.want.out)) << "out";
        backward(p, r.plan());
        if (r.rows() == 0) continue;  // nothing to compare against a zero-norm reference
        EXPECT_TRUE(close_to(p.dx.view(), p.want.dx)) << "dx";
        EXPECT_TRUE(close_to(p.dw.view(), stack(p.want.dw))) << "dw";
        if (bias) {
          EXPECT_TRUE(close_to(p.db.view(), p.want.db)) << "db";
        }
        if (m.gates) {
          EXPECT_TRUE(close_to(p.dg.view(), p.want.d_gates)) << "d_gates";
        }
      }
    }
  }
}

TEST(ParallelLinear, RandomAgainstFloat64F32) { random_all_modes(DType::kFloat32); }
TEST(ParallelLinear, RandomAgainstFloat64Bf16) { random_all_modes(DType::kBFloat16); }
TEST(ParallelLinear, RandomAgainstFloat64F16) { random_all_modes(DType::kFloat16); }

// Loss sum(out * R): its gradient with respect to out is R, so backward runs with d_out = R.
// (1) The library's analytic gradients against central differences of the library's own
//     forward in f32 storage (eps = 1e-2; ParallelLinear is linear in each argument, so the
//     quotient is exact up to fp32 rounding of the loss, ~1e-5 relative: tolerance 1e-3).
// (2) The oracle's analytic gradients against central differences of the oracle in float64
//     (eps = 1e-6, tolerance 1e-7), and the library's gradients against the oracle's (f32
//     tolerance).
void finite_difference_check(const Routing& r, const Mode& m) {
  std::mt19937_64 rng(45);
  const bool bias = true;
  Problem p = make_problem(r, m, bias, /*transposed=*/true, DType::kFloat32, false, rng, 6, 5);
  const Matrix R = read(p.d_out.view());
  forward(p, r.plan());
  backward(p, r.plan());

  // (1) library against its own finite differences.
  const auto library_loss = [&] {
    forward(p, r.plan());
    return weighted_sum(read(p.out.view()), R);
  };
  const double eps = 1e-2;
  EXPECT_TRUE(close_to(read(p.dx.view()), finite_difference(p.x.view(), eps, library_loss), 1e-3))
      << "dx";
  EXPECT_TRUE(close_to(read(p.dw.view()), finite_difference(p.w.view(), eps, library_loss), 1e-3))
      << "dw";
  EXPECT_TRUE(close_to(read(p.db.view()), finite_difference(p.b.view(), eps, library_loss), 1e-3))
      << "db";
  if (m.gates) {
    EXPECT_TRUE(
        close_to(read(p.dg.view()), finite_difference(p.gates.view(), eps, library_loss), 1e-3))
        << "d_gates";
  }

  // (2) oracle against its own finite differences, and the library against the oracle.
  Matrix x = read(p.x.view()), b = read(p.b.view()), g = m.gates ? read(p.gates.view()) : Matrix();
  std::vector<Matrix> w = check::to_matrices(p.w.view());
  const auto oracle_loss = [&] {
    return weighted_sum(check::reference_parallel_linear(x, w, b, g, r.ref, r.k, m.grouped_in,
                                                         m.grouped_out, nullptr)
                            .out,
                        R);
  };
  const check::ReferenceLinear ref =
      check::reference_parallel_linear(x, w, b, g, r.ref, r.k, m.grouped_in, m.grouped_out, &R);
  const double h = 1e-6;
  EXPECT_TRUE(close_to(ref.dx, finite_difference(x, h, oracle_loss), 1e-7)) << "oracle dx";
  EXPECT_TRUE(close_to(stack(ref.dw), finite_difference(w, h, oracle_loss), 1e-7)) << "oracle dw";
  EXPECT_TRUE(close_to(ref.db, finite_difference(b, h, oracle_loss), 1e-7)) << "oracle db";
  if (m.gates) {
    EXPECT_TRUE(close_to(ref.d_gates, finite_difference(g, h, oracle_loss), 1e-7))
        << "oracle d_gates";
  }
  const double tol = check::tolerance_for(DType::kFloat32);
  EXPECT_TRUE(close_to(read(p.dx.view()), ref.dx, tol)) << "library dx vs oracle";
  EXPECT_TRUE(close_to(read(p.dw.view()), stack(ref.dw), tol)) << "library dw vs oracle";
  EXPECT_TRUE(close_to(read(p.db.view()), ref.db, tol)) << "library db vs oracle";
  if (m.gates) {
    EXPECT_TRUE(close_to(read(p.dg.view()), ref.d_gates, tol)) << "library d_gates vs oracle";
  }
}

TEST(ParallelLinear, FiniteDifferenceGradientsScatteredWithGates) {
  for (const Routing& r : awkward_routings(46, false)) {
    SCOPED_TRACE(r.name);
    finite_difference_check(r, {false, false, true});
  }
}

TEST(ParallelLinear, FiniteDifferenceGradientsGroupedInWithGates) {
  finite_difference_check(awkward_routings(47, false)[0], {true, false, true});
}

TEST(ParallelLinear, FiniteDifferenceGradientsAllUngatedModes) {
  const Routing r = awkward_routings(48, false)[0];
  for (const Mode& m : kModes) {
    if (m.gates) continue;
    SCOPED_TRACE(m.name());
    finite_difference_check(r, m);
  }
}

TEST(ParallelLinear, TransposedGradientLandsInParameterLayout) {
  std::mt19937_64 rng(49);
  const Routing r = awkward_routings(50)[0];
  const std::int64_t d_in = 7, d_out = 3;
  Problem p =
      make_problem(r, {false, false, true}, true, true, DType::kBFloat16, true, rng, d_in, d_out);
  backward(p, r.plan());
  const TensorView param =
      TensorView::contiguous(p.dw.view().data(), DType::kBFloat16, {r.experts, d_out, d_in});
  for (std::int64_t e = 0; e < r.experts; ++e) {
    for (std::int64_t o = 0; o < d_out; ++o) {
      for (std::int64_t i = 0; i < d_in; ++i) {
        const std::int64_t index[3] = {e, o, i};
        ASSERT_EQ(check::read_element(param, index), p.want.dw[static_cast<std::size_t>(e)](i, o));
      }
    }
  }
}

TEST(ParallelLinear, GatesInF32WithBf16Data) {
  std::mt19937_64 rng(51);
  for (const Routing& r : awkward_routings(52)) {
    SCOPED_TRACE(r.name);
    Problem p = make_problem(r, {false, false, true}, true, false, DType::kBFloat16, true, rng, 7,
                             3, DType::kFloat32, false);
    forward(p, r.plan());
    EXPECT_TRUE(exactly_equal(p.out.view(), p.want.out));
    backward(p, r.plan());
    EXPECT_TRUE(exactly_equal(p.dg.view(), p.want.d_gates));
    EXPECT_TRUE(exactly_equal(p.dx.view(), p.want.dx));
  }
}

TEST(ParallelLinear, OnlyRequestedGradientsAreWritten) {
  std::mt19937_64 rng(53);
  const Routing r = awkward_routings(54)[0];
  Problem p = make_problem(r, {false, false, true}, true, false, DType::kFloat32, true, rng);
  p.grads.dx = TensorView{};
  p.grads.dw = TensorView{};
  p.grads.db = TensorView{};
  backward(p, r.plan());
  EXPECT_TRUE(exactly_equal(p.dg.view(), p.want.d_gates));
  for (const HostTensor* t : {&p.dx, &p.dw, &p.db}) {
    HostTensor poisoned = *t;
    poisoned.poison();
    EXPECT_TRUE(t->same_bytes(poisoned));
  }
  // And the other way round: weight gradients without d_gates.
  Problem q = make_problem(r, {false, false, true}, true, false, DType::kFloat32, true, rng);
  q.grads.d_gates = TensorView{};
  q.grads.dx = TensorView{};
  backward(q, r.plan());
  EXPECT_TRUE(exactly_equal(q.dw.view(), stack(q.want.dw)));
  EXPECT_TRUE(exactly_equal(q.db.view(), q.want.db));
}

TEST(ParallelLinear, DeterministicRerunsForwardAndBackward) {
  std::mt19937_64 rng(55);
  for (const Routing& r : awkward_routings(56)) {
    for (const Mode& m : kModes) {
      SCOPED_TRACE(r.name + "/" + m.name());
      Problem p = make_problem(r, m, true, true, DType::kBFloat16, false, rng, 13, 7);
      forward(p, r.plan());
      backward(p, r.plan());
      const HostTensor out = p.out, dx = p.dx, dw = p.dw, db = p.db, dg = p.dg;
      for (HostTensor* t : {&p.out, &p.dx, &p.dw, &p.db, &p.dg}) t->poison();
      forward(p, r.plan());
      backward(p, r.plan());
      EXPECT_TRUE(p.out.same_bytes(out));
      EXPECT_TRUE(p.dx.same_bytes(dx));
      EXPECT_TRUE(p.dw.same_bytes(dw));
      EXPECT_TRUE(p.db.same_bytes(db));
      if (m.gates) {
        EXPECT_TRUE(p.dg.same_bytes(dg));
      }
    }
  }
}

TEST(ParallelLinear, NoTokensIsValidAndZeroesWeightGradients) {
  std::mt19937_64 rng(57);
  const Routing r = make_routing("empty", {}, 0, 2, 3);
  for (const Mode& m : kModes) {
    SCOPED_TRACE(m.name());
    Problem p = make_problem(r, m, true, true, DType::kFloat32, false, rng);
    ASSERT_NO_THROW(forward(p, r.plan()));
    ASSERT_NO_THROW(backward(p, r.plan()));
    for (double v : read(p.dw.view()).v) EXPECT_EQ(v, 0.0);
    for (double v : read(p.db.view()).v) EXPECT_EQ(v, 0.0);
  }
}

}  // namespace
}  // namespace scattermoe::testing
