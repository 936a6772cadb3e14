// The SMoE MLP and GLU-MLP on the CPU: forward (out and the grouped pre-activation hidden) and
// backward (dx, dw1, db1, dw2, db2, d_gates); exact with ReLU on small integers, float64
// reference with every activation, finite differences (library and oracle), parameter-layout
// weights and gradients, determinism, T = 0.
#include "common/test_util.hpp"

namespace scattermoe::testing {
namespace {

struct Config {
  bool glu;
  bool bias;
  Activation act;
  bool transposed;  // w1, w2 (and dw1, dw2) in the (E, out, in) parameter layout
  std::string name() const {
    return std::string(glu ? "glu" : "mlp") + "/" + activation_name(act) +
           (bias ? "/bias" : "/no-bias") + (transposed ? "/w-transposed" : "/w-contiguous");
  }
};

struct Problem {
  HostTensor x, w1, b1, w2, b2, gates, out, hidden, d_out, dx, dw1, db1, dw2, db2, dg;
  MlpArgs args;
  MlpGrads grads;
  check::ReferenceMlp want;
};

bool all_fit(const check::ReferenceMlp& w) {
  for (const Matrix* m :
       {&w.out, &w.hidden, &w.act, &w.y2, &w.dh, &w.dx, &w.db1, &w.db2, &w.d_gates}) {
    if (!fits_exactly(*m)) return false;
  }
  return fits_exactly(stack(w.dw1)) && fits_exactly(stack(w.dw2));
}

// exact: x, W1, b1, W2, b2 in {-1..1}, gates and d_out in {-2..2}, redrawn until every oracle
// value (outputs and the intermediates H, A, A@W2+b2, dH the library may store) is an integer
// within +-256 (typical draws are far inside it).
Problem make_problem(const Routing& r, const Config& c, DType dt, bool exact, std::mt19937_64& rng,
                     std::int64_t d = 5, std::int64_t h = 3) {
  Problem p;
  const std::int64_t h1 = c.glu ? 2 * h : h;
  p.x = HostTensor(dt, {r.tokens, d});
  p.w1 = HostTensor(dt, {r.experts, d, h1}, c.transposed);
  p.b1 = HostTensor(dt, {r.experts, h1});
  p.w2 = HostTensor(dt, {r.experts, h, d}, c.transposed);
  p.b2 = HostTensor(dt, {r.experts, d});
  p.gates = HostTensor(dt, {r.tokens, r.k});
  p.out = HostTensor(dt, {r.tokens, d});
  p.hidden = HostTensor(dt, {r.rows(), h1});
  p.d_out = HostTensor(dt, {r.tokens, d});
  p.dx = HostTensor(dt, {r.tokens, d});
  p.dw1 = HostTensor(dt, {r.experts, d, h1}, c.transposed);
  p.db1 = HostTensor(dt, {r.experts, h1});
  p.dw2 = HostTensor(dt, {r.experts, h, d}, c.transposed);
  p.db2 = HostTensor(dt, {r.experts, d});
  p.dg = HostTensor(dt, {r.tokens, r.k});
  for (int attempt = 0; attempt < 200; ++attempt) {
    if (exact) {
      for (const HostTensor* t : {&p.x, &p.w1, &p.b1, &p.w2, &p.b2})
        check::fill_ints(t->view(), rng, -1, 1);
      check::fill_ints(p.gates.view(), rng);
      check::fill_ints(p.d_out.view(), rng);
    } else {
      check::fill_normal(p.x.view(), rng);
      check::fill_normal(p.w1.view(), rng, 1.0 / std::sqrt(double(d)));
      check::fill_normal(p.w2.view(), rng, 1.0 / std::sqrt(double(h)));
      check::fill_normal(p.b1.view(), rng, 0.5);
      check::fill_normal(p.b2.view(), rng, 0.5);
      check::fill_normal(p.gates.view(), rng);
      check::fill_normal(p.d_out.view(), rng);
    }
    const Matrix dout = read(p.d_out.view());
    p.want = check::reference_mlp(
        read(p.x.view()), check::to_matrices(p.w1.view()), c.bias ? read(p.b1.view()) : Matrix(),
        check::to_matrices(p.w2.view()), c.bias ? read(p.b2.view()) : Matrix(),
        read(p.gates.view()), r.ref, c.act, c.glu, &dout);
    if (!exact || all_fit(p.want)) break;
  }
  p.args.x = p.x.view();
  p.args.w1 = p.w1.view();
  p.args.b1 = c.bias ? p.b1.view() : TensorView{};
  p.args.w2 = p.w2.view();
  p.args.b2 = c.bias ? p.b2.view() : TensorView{};
  p.args.gates = p.gates.view();
  p.args.activation = c.act;
  p.args.glu = c.glu;
  p.grads.dx = p.dx.view();
  p.grads.dw1 = p.dw1.view();
  p.grads.db1 = c.bias ? p.db1.view() : TensorView{};
  p.grads.dw2 = p.dw2.view();
  p.grads.db2 = c.bias ? p.db2.view() : TensorView{};
  p.grads.d_gates = p.dg.view();
  for (HostTensor* t : {&p.out, &p.hidden, &p.dx, &p.dw1, &p.db1, &p.dw2, &p.db2, &p.dg})
    t->poison();
  return p;
}

void forward(Problem& p, const RoutingPlan& plan) {
  Scratch scratch(mlp_forward_workspace_size(p.args, plan));
  mlp_forward(p.args, plan, p.out.view(), p.hidden.view(), scratch.context());
}

void backward(Problem& p, const RoutingPlan& plan) {
  Scratch scratch(mlp_backward_workspace_size(p.args, plan));
  mlp_backward(p.args, plan, p.hidden.view(), p.d_out.view(), p.grads, scratch.context());
}

void exact_relu(DType dt) {
  std::mt19937_64 rng(61);
  for (const Routing& r : awkward_routings(62)) {
    for (bool glu : {false, true}) {
      for (bool bias : {false, true}) {
        for (bool transposed : {false, true}) {
          const Config c{glu, bias, Activation::kRelu, transposed};
          SCOPED_TRACE(r.name + "/" + c.name());
          Problem p = make_problem(r, c, dt, true, rng);
          ASSERT_TRUE(all_fit(p.want));
          forward(p, r.plan());
          EXPECT_TRUE(exactly_equal(p.out.view(), p.want.out)) << "out";
          EXPECT_TRUE(exactly_equal(p.hidden.view(), p.want.hidden)) << "hidden";
          backward(p, r.plan());
          EXPECT_TRUE(exactly_equal(p.dx.view(), p.want.dx)) << "dx";
          EXPECT_TRUE(exactly_equal(p.dw1.view(), stack(p.want.dw1))) << "dw1";
          EXPECT_TRUE(exactly_equal(p.dw2.view(), stack(p.want.dw2))) << "dw2";
          if (bias) {
            EXPECT_TRUE(exactly_equal(p.db1.view(), p.want.db1)) << "db1";
            EXPECT_TRUE(exactly_equal(p.db2.view(), p.want.db2)) << "db2";
          }
          EXPECT_TRUE(exactly_equal(p.dg.view(), p.want.d_gates)) << "d_gates";
        }
      }
    }
  }
}

TEST(Mlp, ExactReluMlpAndGluF32) { exact_relu(DType::kFloat32); }
TEST(Mlp, ExactReluMlpAndGluBf16) { exact_relu(DType::kBFloat16); }
TEST(Mlp, ExactReluMlpAndGluF16) { exact_relu(DType::kFloat16); }

void random_all_activations(DType dt) {
  std::mt19937_64 rng(63);
  for (const Routing& r : awkward_routings(64)) {
    for (bool glu : {false, true}) {
      for (Activation act :
           {Activation::kGelu, Activation::kGeluTanh, Activation::kSilu, Activation::kRelu}) {
        const Config c{glu, act != Activation::kSilu, act, glu};
        SCOPED_TRACE(r.name + "/" + c.name());
        Problem p = make_problem(r, c, dt, false, rng, 13, 7);
        forward(p, r.plan());
        EXPECT_TRUE(close_to(p.out.view(), p.want.out)) << "out";
        EXPECT_TRUE(close_to(p.hidden.view(), p.want.hidden)) << "hidden";
        backward(p, r.plan());
        EXPECT_TRUE(close_to(p.dx.view(), p.want.dx)) << "dx";
        EXPECT_TRUE(close_to(p.dw1.view(), stack(p.want.dw1))) << "dw1";
        EXPECT_TRUE(close_to(p.dw2.view(), stack(p.want.dw2))) << "dw2";
        if (c.bias) {
          EXPECT_TRUE(close_to(p.db1.view(), p.want.db1)) << "db1";
          EXPECT_TRUE(close_to(p.db2.view(), p.want.db2)) << "db2";
        }
        EXPECT_TRUE(close_to(p.dg.view(), p.want.d_gates)) << "d_gates";
      }
    }
  }
}

TEST(Mlp, RandomAllActivationsAgainstFloat64F32) { random_all_activations(DType::kFloat32); }
TEST(Mlp, RandomAllActivationsAgainstFloat64Bf16) { random_all_activations(DType::kBFloat16); }
TEST(Mlp, RandomAllActivationsAgainstFloat64F16) { random_all_activations(DType::kFloat16); }

// Loss sum(out * R), so backward runs with d_out = R.
// (1) library gradients against central differences of the library forward in f32 storage,
//     eps = 1e-2: truncation error O(eps^2 * f''') and fp32 rounding of the loss / (2 eps) both
//     stay near 1e-4 relative; tolerance 2e-3. Smooth activations only (ReLU has kinks).
// (2) oracle gradients against float64 central differences (eps = 1e-6, tolerance 1e-6), and
//     library gradients against the oracle's (f32 tolerance).
void finite_difference_check(const Routing& r, const Config& c) {
  std::mt19937_64 rng(65);
  Problem p = make_problem(r, c, DType::kFloat32, false, rng, 5, 4);
  const Matrix R = read(p.d_out.view());
  forward(p, r.plan());
  backward(p, r.plan());

  const auto library_loss = [&] {
    forward(p, r.plan());
    return weighted_sum(read(p.out.view()), R);
  };
  const double eps = 1e-2, tol_fd = 2e-3;
  EXPECT_TRUE(close_to(read(p.dx.view()), finite_difference(p.x.view(), eps, library_loss), tol_fd))
      << "dx";
  EXPECT_TRUE(
      close_to(read(p.dw1.view()), finite_difference(p.w1.view(), eps, library_loss), tol_fd))
      << "dw1";
  EXPECT_TRUE(
      close_to(read(p.dw2.view()), finite_difference(p.w2.view(), eps, library_loss), tol_fd))
      << "dw2";
  if (c.bias) {
    EXPECT_TRUE(
        close_to(read(p.db1.view()), finite_difference(p.b1.view(), eps, library_loss), tol_fd))
        << "db1";
    EXPECT_TRUE(
        close_to(read(p.db2.view()), finite_difference(p.b2.view(), eps, library_loss), tol_fd))
        << "db2";
  }
  EXPECT_TRUE(
      close_to(read(p.dg.view()), finite_difference(p.gates.view(), eps, library_loss), tol_fd))
      << "d_gates";

  Matrix x = read(p.x.view()), g = read(p.gates.view());
  Matrix b1 = c.bias ? read(p.b1.view()) : Matrix(), b2 = c.bias ? read(p.b2.view()) : Matrix();
  std::vector<Matrix> w1 = check::to_matrices(p.w1.view()), w2 = check::to_matrices(p.w2.view());
  const auto oracle_loss = [&] {
    return weighted_sum(
        check::reference_mlp(x, w1, b1, w2, b2, g, r.ref, c.act, c.glu, nullptr).out, R);
  };
  const check::ReferenceMlp ref =
      check::reference_mlp(x, w1, b1, w2, b2, g, r.ref, c.act, c.glu, &R);
  const double h = 1e-6, tol_oracle = 1e-6;
  EXPECT_TRUE(close_to(ref.dx, finite_difference(x, h, oracle_loss), tol_oracle)) << "oracle dx";
  EXPECT_TRUE(close_to(stack(ref.dw1), finite_difference(w1, h, oracle_loss), tol_oracle))
      << "oracle dw1";
  EXPECT_TRUE(close_to(stack(ref.dw2), finite_difference(w2, h, oracle_loss), tol_oracle))
      << "oracle dw2";
  if (c.bias) {
    EXPECT_TRUE(close_to(ref.db1, finite_difference(b1, h, oracle_loss), tol_oracle))
        << "oracle db1";
    EXPECT_TRUE(close_to(ref.db2, finite_difference(b2, h, oracle_loss), tol_oracle))
        << "oracle db2";
  }
  EXPECT_TRUE(close_to(ref.d_gates, finite_difference(g, h, oracle_loss), tol_oracle))
      << "oracle d_gates";

  const double tol = check::tolerance_for(DType::kFloat32);
  EXPECT_TRUE(close_to(read(p.dx.view()), ref.dx, tol)) << "library dx vs oracle";
  EXPECT_TRUE(close_to(read(p.dw1.view()), stack(ref.dw1), tol)) << "library dw1 vs oracle";
  EXPECT_TRUE(close_to(read(p.dw2.view()), stack(ref.dw2), tol)) << "library dw2 vs oracle";
  if (c.bias) {
    EXPECT_TRUE(close_to(read(p.db1.view()), ref.db1, tol)) << "library db1 vs oracle";
    EXPECT_TRUE(close_to(read(p.db2.view()), ref.db2, tol)) << "library db2 vs oracle";
  }
  EXPECT_TRUE(close_to(read(p.dg.view()), ref.d_gates, tol)) << "library d_gates vs oracle";
}

TEST(Mlp, FiniteDifferenceGradients) {
  for (const Routing& r : awkward_routings(66, false)) {
    for (Activation act : {Activation::kGelu, Activation::kGeluTanh, Activation::kSilu}) {
      const Config c{false, true, act, false};
      SCOPED_TRACE(r.name + "/" + c.name());
      finite_difference_check(r, c);
    }
  }
}

TEST(GluMlp, FiniteDifferenceGradients) {
  for (const Routing& r : awkward_routings(67, false)) {
    for (Activation act : {Activation::kSilu, Activation::kGelu, Activation::kGeluTanh}) {
      const Config c{true, true, act, true};
      SCOPED_TRACE(r.name + "/" + c.name());
      finite_difference_check(r, c);
    }
  }
}

TEST(GluMlp, UpIsTheFirstHalfAndGateTheSecond) {
  // One token, one expert, h = 1: W1 columns [up | gate]. With up = 3 and gate = 2 and SiLU,
  // out = silu(2) * 3 * w2; swapping the halves would give silu(3) * 2 * w2.
  const Routing r = make_routing("one", {0}, 1, 1, 1);
  std::vector<float> x{1.0f}, w1{3.0f, 2.0f}, w2{1.0f}, g{1.0f}, out(1, NAN), hidden(2, NAN);
  MlpArgs args;
  args.x = TensorView::contiguous(x.data(), DType::kFloat32, {1, 1});
  args.w1 = TensorView::contiguous(w1.data(), DType::kFloat32, {1, 1, 2});
  args.w2 = TensorView::contiguous(w2.data(), DType::kFloat32, {1, 1, 1});
  args.gates = TensorView::contiguous(g.data(), DType::kFloat32, {1, 1});
  args.activation = Activation::kSilu;
  args.glu = true;
  Scratch scratch(mlp_forward_workspace_size(args, r.plan()));
  mlp_forward(args, r.plan(), TensorView::contiguous(out.data(), DType::kFloat32, {1, 1}),
              TensorView::contiguous(hidden.data(), DType::kFloat32, {1, 2}), scratch.context());
  EXPECT_NEAR(out[0], 3.0 * 2.0 / (1.0 + std::exp(-2.0)), 1e-6);
  EXPECT_EQ(hidden[0], 3.0f);
  EXPECT_EQ(hidden[1], 2.0f);
}

TEST(Mlp, ReluGradientIsZeroAtZero) {
  // H = 0 exactly: relu'(0) = 0, so dW1, db1 and dx get nothing through that unit.
  const Routing r = make_routing("one", {0}, 1, 1, 1);
  std::vector<float> x{1.0f}, w1{0.0f}, b1{0.0f}, w2{1.0f}, g{1.0f}, out(1), hidden(1), dout{1.0f};
  std::vector<float> dx(1, NAN), dw1(1, NAN), db1(1, NAN), dw2(1, NAN), dg(1, NAN);
  MlpArgs args;
  args.x = TensorView::contiguous(x.data(), DType::kFloat32, {1, 1});
  args.w1 = TensorView::contiguous(w1.data(), DType::kFloat32, {1, 1, 1});
  args.b1 = TensorView::contiguous(b1.data(), DType::kFloat32, {1, 1});
  args.w2 = TensorView::contiguous(w2.data(), DType::kFloat32, {1, 1, 1});
  args.gates = TensorView::contiguous(g.data(), DType::kFloat32, {1, 1});
  args.activation = Activation::kRelu;
  Scratch fw(mlp_forward_workspace_size(args, r.plan()));
  const TensorView hv = TensorView::contiguous(hidden.data(), DType::kFloat32, {1, 1});
  mlp_forward(args, r.plan(), TensorView::contiguous(out.data(), DType::kFloat32, {1, 1}), hv,
              fw.context());
  MlpGrads grads;
  grads.dx = TensorView::contiguous(dx.data(), DType::kFloat32, {1, 1});
  grads.dw1 = TensorView::contiguous(dw1.data(), DType::kFloat32, {1, 1, 1});
  grads.db1 = TensorView::contiguous(db1.data(), DType::kFloat32, {1, 1});
  grads.dw2 = TensorView::contiguous(dw2.data(), DType::kFloat32, {1, 1, 1});
  grads.d_gates = TensorView::contiguous(dg.data(), DType::kFloat32, {1, 1});
  Scratch bw(mlp_backward_workspace_size(args, r.plan()));
  mlp_backward(args, r.plan(), hv, TensorView::contiguous(dout.data(), DType::kFloat32, {1, 1}),
               grads, bw.context());
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(dx[0], 0.0f);
  EXPECT_EQ(dw1[0], 0.0f);
  EXPECT_EQ(db1[0], 0.0f);
  EXPECT_EQ(dw2[0], 0.0f);
  EXPECT_EQ(dg[0], 0.0f);
}

TEST(Mlp, FeatureSizesNotMultipleOfEight) {
  std::mt19937_64 rng(68);
  const Routing r = awkward_routings(69)[0];
  for (auto [d, h] : {std::pair<std::int64_t, std::int64_t>{13, 7}, {7, 13}, {1, 1}}) {
    for (bool glu : {false, true}) {
      const Config c{glu, true, Activation::kGeluTanh, glu};
      SCOPED_TRACE(std::to_string(d) + "x" + std::to_string(h) + "/" + c.name());
      Problem p = make_problem(r, c, DType::kFloat32, false, rng, d, h);
      forward(p, r.plan());
      backward(p, r.plan());
      EXPECT_TRUE(close_to(p.out.view(), p.want.out));
      EXPECT_TRUE(close_to(p.dx.view(), p.want.dx));
      EXPECT_TRUE(close_to(p.dw1.view(), stack(p.want.dw1)));
      EXPECT_TRUE(close_to(p.dw2.view(), stack(p.want.dw2)));
      EXPECT_TRUE(close_to(p.dg.view(), p.want.d_gates));
    }
  }
}

TEST(Mlp, DeterministicRerunsForwardAndBackward) {
  std::mt19937_64 rng(70);
  for (const Routing& r : awkward_routings(71)) {
    for (bool glu : {false, true}) {
      const Config c{glu, true, Activation::kSilu, glu};
      SCOPED_TRACE(r.name + "/" + c.name());
      Problem p = make_problem(r, c, DType::kBFloat16, false, rng, 13, 7);
      forward(p, r.plan());
      backward(p, r.plan());
      std::vector<HostTensor*> outs{&p.out, &p.hidden, &p.dx,  &p.dw1,
                                    &p.db1, &p.dw2,    &p.db2, &p.dg};
      std::vector<HostTensor> first;
      for (HostTensor* t : outs) first.push_back(*t);
      for (HostTensor* t : outs) t->poison();
      forward(p, r.plan());
      backward(p, r.plan());
      for (std::size_t n = 0; n < outs.size(); ++n)
        EXPECT_TRUE(outs[n]->same_bytes(first[n])) << "output " << n;
    }
  }
}

TEST(Mlp, NoTokensIsValidAndZeroesWeightGradients) {
  std::mt19937_64 rng(72);
  const Routing r = make_routing("empty", {}, 0, 2, 3);
  for (bool glu : {false, true}) {
    Problem p = make_problem(r, {glu, true, Activation::kGelu, glu}, DType::kFloat32, false, rng);
    ASSERT_NO_THROW(forward(p, r.plan()));
    ASSERT_NO_THROW(backward(p, r.plan()));
    for (const HostTensor* t : {&p.dw1, &p.db1, &p.dw2, &p.db2}) {
      for (double v : read(t->view()).v) EXPECT_EQ(v, 0.0);
    }
  }
}

}  // namespace
}  // namespace scattermoe::testing
