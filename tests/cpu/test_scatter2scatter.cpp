// scatter2scatter on the CPU: all four grouped/scattered modes, bias on and off, both weight
// layouts, over the awkward routings; exact on small integers, float64 reference on random
// values, poison, determinism, strided outputs.
#include "common/test_util.hpp"

namespace scattermoe::testing {
namespace {

struct Case {
  bool x_grouped;
  bool y_grouped;
  bool bias;
  bool transposed;  // W stored (E, d_out, d_in) and passed as .transposed(1, 2)
  std::string name() const {
    return std::string(x_grouped ? "grouped" : "scattered") + "->" +
           (y_grouped ? "grouped" : "scattered") + (bias ? "/bias" : "/no-bias") +
           (transposed ? "/w-transposed" : "/w-contiguous");
  }
};

std::vector<Case> all_cases() {
  std::vector<Case> cs;
  for (int m = 0; m < 4; ++m) {
    for (bool bias : {false, true}) {
      for (bool transposed : {false, true})
        cs.push_back({bool(m & 2), bool(m & 1), bias, transposed});
    }
  }
  return cs;
}

struct Problem {
  HostTensor x, w, b, y;
  Scatter2ScatterArgs args;
  Matrix want;
};

// exact: inputs in {-2..2}, so |y| <= d_in * 4 + 2 = 54 for d_in = 13: exact in bf16.
Problem make_problem(const Routing& r, const Case& c, DType dt, bool exact, std::mt19937_64& rng,
                     std::int64_t d_in = 13, std::int64_t d_out = 7) {
  Problem p;
  p.x = HostTensor(dt, {c.x_grouped ? r.rows() : r.tokens, d_in});
  p.w = HostTensor(dt, {r.experts, d_in, d_out}, c.transposed);
  p.b = HostTensor(dt, {r.experts, d_out});
  p.y = HostTensor(dt, {r.rows(), d_out});
  for (const HostTensor* t : {&p.x, &p.w, &p.b}) {
    if (exact) {
      check::fill_ints(t->view(), rng);
    } else {
      check::fill_normal(t->view(), rng, t == &p.w ? 1.0 / std::sqrt(double(d_in)) : 1.0);
    }
  }
  p.args = Scatter2ScatterArgs{p.x.view(), p.w.view(),  c.bias ? p.b.view() : TensorView{},
                               r.k,        c.x_grouped, c.y_grouped};
  p.want = check::reference_scatter2scatter(read(p.x.view()), check::to_matrices(p.w.view()),
                                            c.bias ? read(p.b.view()) : Matrix(), r.ref, r.k,
                                            c.x_grouped, c.y_grouped);
  p.y.poison();
  return p;
}

void exact_all_modes(DType dt) {
  std::mt19937_64 rng(1);
  for (const Routing& r : awkward_routings(11)) {
    for (const Case& c : all_cases()) {
      SCOPED_TRACE(r.name + "/" + c.name());
      Problem p = make_problem(r, c, dt, true, rng);
      ASSERT_TRUE(fits_exactly(p.want));
      scatter2scatter(p.args, r.plan(), p.y.view());
      EXPECT_TRUE(exactly_equal(p.y.view(), p.want));
    }
  }
}

TEST(Scatter2Scatter, ExactAllModesF32) { exact_all_modes(DType::kFloat32); }
TEST(Scatter2Scatter, ExactAllModesBf16) { exact_all_modes(DType::kBFloat16); }
TEST(Scatter2Scatter, ExactAllModesF16) { exact_all_modes(DType::kFloat16); }

void random_all_modes(DType dt) {
  std::mt19937_64 rng(2);
  for (const Routing& r : awkward_routings(12)) {
    for (const Case& c : all_cases()) {
      SCOPED_TRACE(r.name + "/" + c.name());
      Problem p = make_problem(r, c, dt, false, rng);
      scatter2scatter(p.args, r.plan(), p.y.view());
      EXPECT_TRUE(close_to(p.y.view(), p.want));
    }
  }
}

TEST(Scatter2Scatter, RandomAgainstFloat64F32) { random_all_modes(DType::kFloat32); }
TEST(Scatter2Scatter, RandomAgainstFloat64Bf16) { random_all_modes(DType::kBFloat16); }
TEST(Scatter2Scatter, RandomAgainstFloat64F16) { random_all_modes(DType::kFloat16); }

TEST(Scatter2Scatter, FeatureSizesNotMultipleOfEight) {
  std::mt19937_64 rng(3);
  const auto routings = awkward_routings(13, false);
  for (auto [d_in, d_out] :
       {std::pair<std::int64_t, std::int64_t>{7, 13}, {1, 1}, {13, 13}, {33, 3}}) {
    for (const Case& c : all_cases()) {
      SCOPED_TRACE(std::to_string(d_in) + "x" + std::to_string(d_out) + "/" + c.name());
      Problem p = make_problem(routings[0], c, DType::kBFloat16, true, rng, d_in, d_out);
      ASSERT_TRUE(fits_exactly(p.want));
      scatter2scatter(p.args, routings[0].plan(), p.y.view());
      EXPECT_TRUE(exactly_equal(p.y.view(), p.want));
    }
  }
}

TEST(Scatter2Scatter, TransposedWeightGivesBitwiseSameResultAsContiguous) {
  std::mt19937_64 rng(4);
  const Routing r = awkward_routings(14)[0];
  for (DType dt : {DType::kFloat32, DType::kBFloat16}) {
    Problem a = make_problem(r, {false, false, true, false}, dt, false, rng);
    HostTensor wt(dt, {r.experts, 13, 7}, true);
    check::for_each_index(a.w.view(), [&](const std::int64_t* i) {
      check::write_element(wt.view(), i, check::read_element(a.w.view(), i));
    });
    HostTensor y2(dt, {r.rows(), 7});
    y2.poison();
    Scatter2ScatterArgs args2 = a.args;
    args2.w = wt.view();
    scatter2scatter(a.args, r.plan(), a.y.view());
    scatter2scatter(args2, r.plan(), y2.view());
    EXPECT_TRUE(a.y.same_bytes(y2)) << dtype_name(dt);
  }
}

TEST(Scatter2Scatter, DeterministicRerunsAllModes) {
  std::mt19937_64 rng(5);
  for (const Routing& r : awkward_routings(15)) {
    for (const Case& c : all_cases()) {
      SCOPED_TRACE(r.name + "/" + c.name());
      Problem p = make_problem(r, c, DType::kBFloat16, false, rng);
      scatter2scatter(p.args, r.plan(), p.y.view());
      const HostTensor first = p.y;
      p.y.poison();
      scatter2scatter(p.args, r.plan(), p.y.view());
      EXPECT_TRUE(p.y.same_bytes(first));
    }
  }
}

TEST(Scatter2Scatter, WritesEveryRowOfAStridedOutputAndNothingBetween) {
  // y is a (L, 7) view into a (L, 10) buffer: columns 7..9 must keep their sentinel.
  std::mt19937_64 rng(6);
  const Routing r = awkward_routings(16)[0];
  for (const Case& c : all_cases()) {
    SCOPED_TRACE(c.name());
    Problem p = make_problem(r, c, DType::kFloat32, true, rng);
    HostTensor wide(DType::kFloat32, {r.rows(), 10});
    wide.poison(0x5a);
    const TensorView y = wide.view().narrowed(1, 0, 7);
    scatter2scatter(p.args, r.plan(), y);
    EXPECT_TRUE(exactly_equal(y, p.want));
    const TensorView gap = wide.view().narrowed(1, 7, 10);
    check::for_each_index(gap, [&](const std::int64_t* i) {
      float sentinel;
      std::memset(&sentinel, 0x5a, sizeof(sentinel));
      EXPECT_EQ(check::read_element(gap, i), static_cast<double>(sentinel));
    });
  }
}

TEST(Scatter2Scatter, NoTokensIsValidAndWritesNothing) {
  const Routing r = make_routing("empty", {}, 0, 2, 3);
  for (const Case& c : all_cases()) {
    SCOPED_TRACE(c.name());
    std::vector<float> w(3 * 5 * 4, 1.0f), b(3 * 4, 1.0f);
    const TensorView x = TensorView::contiguous(nullptr, DType::kFloat32, {0, 5});
    const TensorView wv =
        c.transposed ? TensorView::contiguous(w.data(), DType::kFloat32, {3, 4, 5}).transposed(1, 2)
                     : TensorView::contiguous(w.data(), DType::kFloat32, {3, 5, 4});
    const TensorView y = TensorView::contiguous(nullptr, DType::kFloat32, {0, 4});
    const Scatter2ScatterArgs args{
        x,
        wv,
        c.bias ? TensorView::contiguous(b.data(), DType::kFloat32, {3, 4}) : TensorView{},
        2,
        c.x_grouped,
        c.y_grouped};
    EXPECT_NO_THROW(scatter2scatter(args, r.plan(), y));
  }
}

TEST(Scatter2Scatter, KIsIgnoredForGroupedInput) {
  // With x_grouped, x has L rows and k only matters for a scattered x.
  std::mt19937_64 rng(7);
  const Routing r = awkward_routings(17)[0];
  Problem p = make_problem(r, {true, false, false, false}, DType::kFloat32, true, rng);
  Scatter2ScatterArgs args = p.args;
  args.k = 1;
  scatter2scatter(args, r.plan(), p.y.view());
  EXPECT_TRUE(exactly_equal(p.y.view(), p.want));
}

}  // namespace
}  // namespace scattermoe::testing
