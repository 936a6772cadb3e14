// The float64 oracle itself against hand-computed tiny examples, and its gradients against
// float64 finite differences.
#include "common/test_util.hpp"

namespace scattermoe::testing {
namespace {

using check::reference_activation;
using check::reference_activation_grad;

Matrix mat(std::int64_t rows, std::int64_t cols, std::vector<double> v) {
  Matrix m(rows, cols);
  m.v = std::move(v);
  return m;
}

TEST(ReferencePlan, HandWorkedExample) {
  // T = 3, k = 2: flat ids 2 0 | 1 2 | 0 1, E = 4 (expert 3 empty).
  const Plan64 p = check::reference_plan({2, 0, 1, 2, 0, 1}, 4);
  EXPECT_EQ(p.sorted_expert_idxs, (std::vector<std::int64_t>{0, 0, 1, 1, 2, 2}));
  EXPECT_EQ(p.sorted_scattered_idxs, (std::vector<std::int64_t>{1, 4, 2, 5, 0, 3}));
  EXPECT_EQ(p.expert_offsets, (std::vector<std::int64_t>{2, 4, 6, 6}));
  EXPECT_THROW(check::reference_plan({0, 4}, 4), InvalidArgument);
  const Plan64 empty = check::reference_plan({}, 2);
  EXPECT_EQ(empty.expert_offsets, (std::vector<std::int64_t>{0, 0}));
}

TEST(ReferenceScatter2Scatter, HandWorkedExampleAllModes) {
  // T = 2, k = 1, E = 2, d_in = 2, d_out = 1; token 0 -> expert 1, token 1 -> expert 0.
  // x = [[1, 2], [3, 4]], W0 = [[1], [1]], W1 = [[1], [-1]], bias = [[10], [20]].
  const Plan64 plan = check::reference_plan({1, 0}, 2);  // grouped order: p = 1, then p = 0
  const Matrix x = mat(2, 2, {1, 2, 3, 4});
  const std::vector<Matrix> w = {mat(2, 1, {1, 1}), mat(2, 1, {1, -1})};
  const Matrix bias = mat(2, 1, {10, 20});
  // scattered -> scattered: y[0] = x0 @ W1 = -1, y[1] = x1 @ W0 = 7.
  EXPECT_EQ(check::reference_scatter2scatter(x, w, Matrix(), plan, 1, false, false).v,
            (std::vector<double>{-1, 7}));
  EXPECT_EQ(check::reference_scatter2scatter(x, w, bias, plan, 1, false, false).v,
            (std::vector<double>{19, 17}));
  // scattered -> grouped: row 0 is p = 1 (expert 0), row 1 is p = 0 (expert 1).
  EXPECT_EQ(check::reference_scatter2scatter(x, w, Matrix(), plan, 1, false, true).v,
            (std::vector<double>{7, -1}));
  // grouped -> grouped: x row i feeds grouped row i: [1,2] @ W0 = 3, [3,4] @ W1 = -1.
  EXPECT_EQ(check::reference_scatter2scatter(x, w, Matrix(), plan, 1, true, true).v,
            (std::vector<double>{3, -1}));
  // grouped -> scattered: grouped row 0 (p = 1) gets 3, grouped row 1 (p = 0) gets -1.
  EXPECT_EQ(check::reference_scatter2scatter(x, w, bias, plan, 1, true, false).v,
            (std::vector<double>{19, 13}));
}

TEST(ReferenceScatter2Scatter, FanOutReadsRowPOverK) {
  // T = 1, k = 2: both routed rows read x row 0.
  const Plan64 plan = check::reference_plan({1, 0}, 2);
  const Matrix x = mat(1, 1, {5});
  const std::vector<Matrix> w = {mat(1, 1, {2}), mat(1, 1, {3})};
  EXPECT_EQ(check::reference_scatter2scatter(x, w, Matrix(), plan, 2, false, false).v,
            (std::vector<double>{15, 10}));
  EXPECT_EQ(check::reference_scatter2scatter(x, w, Matrix(), plan, 2, false, true).v,
            (std::vector<double>{10, 15}));
}

TEST(ReferenceGroup, HandWorkedExample) {
  const Plan64 plan = check::reference_plan({1, 0, 0, 1}, 2);  // grouped p: 1, 2, 0, 3
  const Matrix a = mat(2, 1, {10, 20});
  EXPECT_EQ(check::reference_group(a, plan, 2, {}).v, (std::vector<double>{10, 20, 10, 20}));
  EXPECT_EQ(check::reference_group(a, plan, 2, {1, 2, 3, 4}).v,
            (std::vector<double>{20, 60, 10, 80}));
  const Matrix rows = mat(4, 1, {1, 2, 3, 4});
  EXPECT_EQ(check::reference_group(rows, plan, 1, {}).v, (std::vector<double>{2, 3, 1, 4}));
}

TEST(ReferenceGroupXty, HandWorkedExampleWithEmptyExpert) {
  const Plan64 plan = check::reference_plan({0, 2, 0}, 3);  // expert 1 empty; grouped p: 0, 2, 1
  const Matrix dy = mat(3, 1, {1, 2, 3});
  const Matrix x = mat(3, 2, {1, 1, 2, 0, 0, 5});
  std::vector<Matrix> dw;
  Matrix db;
  check::reference_group_xty(dy, x, plan, 3, &dw, &db);
  ASSERT_EQ(dw.size(), 3u);
  EXPECT_EQ(dw[0].v, (std::vector<double>{1 * 1 + 2 * 2, 1 * 1 + 0 * 2}));
  EXPECT_EQ(dw[1].v, (std::vector<double>{0, 0}));
  EXPECT_EQ(dw[2].v, (std::vector<double>{0, 15}));
  EXPECT_EQ(db.v, (std::vector<double>{3, 0, 3}));
}

TEST(ReferenceActivation, KnownValues) {
  EXPECT_NEAR(reference_activation(Activation::kGelu, 1.0), 0.8413447460685429, 1e-15);
  EXPECT_NEAR(reference_activation(Activation::kGelu, -1.0), -0.15865525393145707, 1e-15);
  EXPECT_NEAR(reference_activation(Activation::kGeluTanh, 1.0), 0.8411919906082768, 1e-15);
  EXPECT_NEAR(reference_activation(Activation::kSilu, 1.0), 0.7310585786300049, 1e-15);
  EXPECT_NEAR(reference_activation(Activation::kSilu, -2.0), -0.2384058440442351, 1e-15);
  EXPECT_EQ(reference_activation(Activation::kRelu, -3.0), 0.0);
  EXPECT_EQ(reference_activation(Activation::kRelu, 2.5), 2.5);
  for (Activation a :
       {Activation::kGelu, Activation::kGeluTanh, Activation::kSilu, Activation::kRelu}) {
    EXPECT_EQ(reference_activation(a, 0.0), 0.0) << activation_name(a);
  }
}

TEST(ReferenceActivation, GradientsMatchFiniteDifferences) {
  for (Activation a :
       {Activation::kGelu, Activation::kGeluTanh, Activation::kSilu, Activation::kRelu}) {
    for (double x : {-4.0, -1.3, -0.2, 0.1, 0.7, 2.0, 5.5}) {
      const double h = 1e-6;
      const double fd = (reference_activation(a, x + h) - reference_activation(a, x - h)) / (2 * h);
      EXPECT_NEAR(reference_activation_grad(a, x), fd, 1e-8) << activation_name(a) << " at " << x;
    }
  }
  EXPECT_EQ(reference_activation_grad(Activation::kRelu, 0.0), 0.0);
  EXPECT_EQ(reference_activation_grad(Activation::kRelu, -1e-300), 0.0);
  EXPECT_EQ(reference_activation_grad(Activation::kRelu, 1e-300), 1.0);
}

TEST(ReferenceParallelLinear, HandWorkedGatedExample) {
  // T = 1, k = 2, experts 1 then 0, d_in = d_out = 1. x = 2, W0 = 3, W1 = 5, bias = [1, -1].
  // Y = [2*5 - 1, 2*3 + 1] = [9, 7] token-major; gates [0.5, 2]: out = 4.5 + 14 = 18.5.
  const Plan64 plan = check::reference_plan({1, 0}, 2);
  const Matrix x = mat(1, 1, {2});
  const std::vector<Matrix> w = {mat(1, 1, {3}), mat(1, 1, {5})};
  const Matrix bias = mat(2, 1, {1, -1});
  const Matrix gates = mat(1, 2, {0.5, 2});
  const Matrix d_out = mat(1, 1, {10});
  const check::ReferenceLinear r =
      check::reference_parallel_linear(x, w, bias, gates, plan, 2, false, false, &d_out);
  EXPECT_EQ(r.out.v, (std::vector<double>{18.5}));
  // d_gates = <Y_j, dOut> (bias included): [90, 70].
  EXPECT_EQ(r.d_gates.v, (std::vector<double>{90, 70}));
  // dY rows: expert 1 row gets 10 * 0.5 = 5, expert 0 row gets 10 * 2 = 20.
  EXPECT_EQ(r.dw[0].v, (std::vector<double>{2 * 20}));
  EXPECT_EQ(r.dw[1].v, (std::vector<double>{2 * 5}));
  EXPECT_EQ(r.db.v, (std::vector<double>{20, 5}));
  // dX = 5 * 5 + 20 * 3, summed over both choices of the token.
  EXPECT_EQ(r.dx.v, (std::vector<double>{85}));
}

TEST(ReferenceMlp, HandWorkedTinyExample) {
  // T = 1, k = 1, E = 1, d = h = 1, ReLU: H = 2 * 3 + 1 = 7, A = 7, y2 = 7 * 2 - 1 = 13,
  // out = 0.5 * 13 = 6.5. d_out = 1: dz = 0.5, d_gates = 13, dW2 = 3.5, db2 = 0.5, dA = 1,
  // dH = 1, dW1 = 2, db1 = 1, dx = 3.
  const Plan64 plan = check::reference_plan({0}, 1);
  const Matrix x = mat(1, 1, {2}), b1 = mat(1, 1, {1}), b2 = mat(1, 1, {-1}), g = mat(1, 1, {0.5});
  const std::vector<Matrix> w1 = {mat(1, 1, {3})}, w2 = {mat(1, 1, {2})};
  const Matrix d_out = mat(1, 1, {1});
  const check::ReferenceMlp r =
      check::reference_mlp(x, w1, b1, w2, b2, g, plan, Activation::kRelu, false, &d_out);
  EXPECT_EQ(r.hidden.v, (std::vector<double>{7}));
  EXPECT_EQ(r.out.v, (std::vector<double>{6.5}));
  EXPECT_EQ(r.d_gates.v, (std::vector<double>{13}));
  EXPECT_EQ(r.dw2[0].v, (std::vector<double>{3.5}));
  EXPECT_EQ(r.db2.v, (std::vector<double>{0.5}));
  EXPECT_EQ(r.dw1[0].v, (std::vector<double>{2}));
  EXPECT_EQ(r.db1.v, (std::vector<double>{1}));
  EXPECT_EQ(r.dx.v, (std::vector<double>{3}));
}

TEST(ReferenceMlp, GluUsesFirstHalfAsUpAndSecondAsGate) {
  // h = 1: H = [up, gate] = [3, -2]; A = relu(gate) * up = 0. And [3, 2]: A = 6.
  const Plan64 plan = check::reference_plan({0}, 1);
  const Matrix x = mat(1, 1, {1}), g = mat(1, 1, {1});
  const std::vector<Matrix> w2 = {mat(1, 1, {1})};
  EXPECT_EQ(check::reference_mlp(x, {mat(1, 2, {3, -2})}, Matrix(), w2, Matrix(), g, plan,
                                 Activation::kRelu, true, nullptr)
                .out.v,
            (std::vector<double>{0}));
  EXPECT_EQ(check::reference_mlp(x, {mat(1, 2, {3, 2})}, Matrix(), w2, Matrix(), g, plan,
                                 Activation::kRelu, true, nullptr)
                .out.v,
            (std::vector<double>{6}));
}

TEST(ReferenceMlp, GradientsMatchFloat64FiniteDifferences) {
  std::mt19937_64 rng(91);
  std::normal_distribution<double> normal;
  const auto idx = check::draw_routing(rng, 6, 2, 4, 1);
  const Plan64 plan = check::reference_plan(idx, 4);
  const auto random = [&](std::int64_t r, std::int64_t c) {
    Matrix m(r, c);
    for (double& v : m.v) v = normal(rng);
    return m;
  };
  for (bool glu : {false, true}) {
    for (Activation act : {Activation::kGelu, Activation::kGeluTanh, Activation::kSilu}) {
      SCOPED_TRACE(std::string(glu ? "glu/" : "mlp/") + activation_name(act));
      const std::int64_t d = 3, h = 4, h1 = glu ? 2 * h : h;
      Matrix x = random(6, d), b1 = random(4, h1), b2 = random(4, d), g = random(6, 2),
             R = random(6, d);
      std::vector<Matrix> w1, w2;
      for (int e = 0; e < 4; ++e) {
        w1.push_back(random(d, h1));
        w2.push_back(random(h, d));
      }
      const auto loss = [&] {
        return weighted_sum(check::reference_mlp(x, w1, b1, w2, b2, g, plan, act, glu, nullptr).out,
                            R);
      };
      const check::ReferenceMlp r = check::reference_mlp(x, w1, b1, w2, b2, g, plan, act, glu, &R);
      EXPECT_TRUE(close_to(r.dx, finite_difference(x, 1e-6, loss), 1e-7));
      EXPECT_TRUE(close_to(stack(r.dw1), finite_difference(w1, 1e-6, loss), 1e-7));
      EXPECT_TRUE(close_to(r.db1, finite_difference(b1, 1e-6, loss), 1e-7));
      EXPECT_TRUE(close_to(stack(r.dw2), finite_difference(w2, 1e-6, loss), 1e-7));
      EXPECT_TRUE(close_to(r.db2, finite_difference(b2, 1e-6, loss), 1e-7));
      EXPECT_TRUE(close_to(r.d_gates, finite_difference(g, 1e-6, loss), 1e-7));
    }
  }
}

TEST(ReferenceReading, ToMatrixReadsEveryDtypeThroughStrides) {
  // A transposed (3, 2) view of a (2, 3) f32 buffer.
  std::vector<float> f{1, 2, 3, 4, 5, 6};
  const TensorView t = TensorView::contiguous(f.data(), DType::kFloat32, {2, 3}).transposed(0, 1);
  EXPECT_EQ(check::to_matrix(t).v, (std::vector<double>{1, 4, 2, 5, 3, 6}));
  // bf16 / f16 patterns of 1.5 and -2.
  std::vector<std::uint16_t> bf{0x3fc0, 0xc000}, hf{0x3e00, 0xc000};
  EXPECT_EQ(check::to_matrix(TensorView::contiguous(bf.data(), DType::kBFloat16, {2})).v,
            (std::vector<double>{1.5, -2}));
  EXPECT_EQ(check::to_matrix(TensorView::contiguous(hf.data(), DType::kFloat16, {1, 2})).v,
            (std::vector<double>{1.5, -2}));
  std::vector<std::int32_t> i32{-7, 8};
  std::vector<std::int64_t> i64{std::int64_t{1} << 40, -3};
  EXPECT_EQ(check::to_matrix(TensorView::contiguous(i32.data(), DType::kInt32, {2})).v,
            (std::vector<double>{-7, 8}));
  EXPECT_EQ(check::to_matrix(TensorView::contiguous(i64.data(), DType::kInt64, {2})).v,
            (std::vector<double>{1099511627776.0, -3}));
  // Rank 3 with a transposed last pair.
  std::vector<float> w(2 * 2 * 3);
  for (std::size_t n = 0; n < w.size(); ++n) w[n] = static_cast<float>(n);
  const auto ms = check::to_matrices(
      TensorView::contiguous(w.data(), DType::kFloat32, {2, 2, 3}).transposed(1, 2));
  ASSERT_EQ(ms.size(), 2u);
  EXPECT_EQ(ms[1].rows, 3);
  EXPECT_EQ(ms[1].v, (std::vector<double>{6, 9, 7, 10, 8, 11}));
}

TEST(ReferenceReading, RoundTo) {
  EXPECT_EQ(check::round_to(DType::kBFloat16, 1.0 + 1.0 / 256), 1.0);
  EXPECT_EQ(check::round_to(DType::kBFloat16, 257.0), 256.0);
  EXPECT_EQ(check::round_to(DType::kFloat16, 2049.0), 2048.0);
  EXPECT_EQ(check::round_to(DType::kFloat32, 16777217.0), 16777216.0);
  EXPECT_EQ(check::round_to(DType::kFloat32, 0.1), static_cast<double>(0.1f));
}

TEST(ReferenceError, RelativeErrorAndTolerances) {
  const Matrix a = mat(1, 2, {3, 4}), b = mat(1, 2, {3, 4.05});
  EXPECT_EQ(check::relative_error(a, a), 0.0);
  EXPECT_NEAR(check::relative_error(b, a), 0.01, 1e-12);
  EXPECT_TRUE(std::isinf(check::relative_error(mat(1, 2, {NAN, 4}), a)));
  EXPECT_TRUE(std::isinf(check::relative_error(mat(1, 1, {3}), a)));
  EXPECT_EQ(check::relative_error(mat(1, 1, {0}), mat(1, 1, {0})), 0.0);
  EXPECT_GT(check::relative_error(mat(1, 1, {1e-3}), mat(1, 1, {0})), 1.0);
  EXPECT_DOUBLE_EQ(check::tolerance_for(DType::kBFloat16), 2e-2);
  EXPECT_DOUBLE_EQ(check::tolerance_for(DType::kFloat16), 4e-3);
  EXPECT_DOUBLE_EQ(check::tolerance_for(DType::kFloat32), 1e-5);
  EXPECT_LT(check::tolerance_for(DType::kFloat32), check::tolerance_for(DType::kFloat16));
}

}  // namespace
}  // namespace scattermoe::testing
