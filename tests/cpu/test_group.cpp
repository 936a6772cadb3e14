// group on the CPU: G[i] = A[p / fan_out] * coeff[p], fan-out 1 and k, coeff absent, flat and
// (T, k), over the awkward routings.
#include "common/test_util.hpp"

namespace scattermoe::testing {
namespace {

enum class Coeff { kNone, kFlat, kTokenByChoice };

const char* coeff_name(Coeff c) {
  switch (c) {
    case Coeff::kNone:
      return "no-coeff";
    case Coeff::kFlat:
      return "coeff-flat";
    case Coeff::kTokenByChoice:
      return "coeff-(T,k)";
  }
  return "?";
}

struct Problem {
  HostTensor a, coeff, g;
  Matrix want;
};

Problem make_problem(const Routing& r, int fan_out, Coeff c, DType dt, bool exact,
                     std::mt19937_64& rng, std::int64_t d = 13) {
  Problem p;
  p.a = HostTensor(dt, {r.rows() / fan_out, d});
  p.coeff = c == Coeff::kFlat ? HostTensor(dt, {r.rows()}) : HostTensor(dt, {r.tokens, r.k});
  p.g = HostTensor(dt, {r.rows(), d});
  for (const HostTensor* t : {&p.a, &p.coeff}) {
    if (exact) {
      check::fill_ints(t->view(), rng);
    } else {
      check::fill_normal(t->view(), rng);
    }
  }
  std::vector<double> coeff;
  if (c != Coeff::kNone) coeff = read(p.coeff.view()).v;
  p.want = check::reference_group(read(p.a.view()), r.ref, fan_out, coeff);
  p.g.poison();
  return p;
}

void run_all(DType dt, bool exact) {
  std::mt19937_64 rng(exact ? 21 : 22);
  for (const Routing& r : awkward_routings(23)) {
    for (int fan_out : {1, r.k}) {
      for (Coeff c : {Coeff::kNone, Coeff::kFlat, Coeff::kTokenByChoice}) {
        SCOPED_TRACE(r.name + "/fan-out-" + std::to_string(fan_out) + "/" + coeff_name(c));
        Problem p = make_problem(r, fan_out, c, dt, exact, rng);
        group(p.a.view(), r.plan(), fan_out, c == Coeff::kNone ? TensorView{} : p.coeff.view(),
              p.g.view());
        if (exact) {
          EXPECT_TRUE(exactly_equal(p.g.view(), p.want));
        } else {
          EXPECT_TRUE(close_to(p.g.view(), p.want));
        }
      }
    }
  }
}

TEST(Group, ExactFanOutAndCoeffF32) { run_all(DType::kFloat32, true); }
TEST(Group, ExactFanOutAndCoeffBf16) { run_all(DType::kBFloat16, true); }
TEST(Group, ExactFanOutAndCoeffF16) { run_all(DType::kFloat16, true); }
TEST(Group, RandomAgainstFloat64F32) { run_all(DType::kFloat32, false); }
TEST(Group, RandomAgainstFloat64Bf16) { run_all(DType::kBFloat16, false); }
TEST(Group, RandomAgainstFloat64F16) { run_all(DType::kFloat16, false); }

TEST(Group, WithoutCoeffIsAPureCopyOfRows) {
  // Rows are copied bit for bit, whatever their values.
  std::mt19937_64 rng(24);
  const Routing r = awkward_routings(25)[0];
  for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    Problem p = make_problem(r, r.k, Coeff::kNone, dt, false, rng, 7);
    group(p.a.view(), r.plan(), r.k, TensorView{}, p.g.view());
    EXPECT_TRUE(exactly_equal(p.g.view(), p.want)) << dtype_name(dt);
  }
}

TEST(Group, CoeffInAnotherFloatDtype) {
  // coeff f32 with bf16 rows: products of small integers stay exact.
  std::mt19937_64 rng(26);
  const Routing r = awkward_routings(27)[0];
  HostTensor a(DType::kBFloat16, {r.tokens, 5});
  HostTensor coeff(DType::kFloat32, {r.tokens, r.k});
  HostTensor g(DType::kBFloat16, {r.rows(), 5});
  check::fill_ints(a.view(), rng);
  check::fill_ints(coeff.view(), rng);
  g.poison();
  group(a.view(), r.plan(), r.k, coeff.view(), g.view());
  EXPECT_TRUE(exactly_equal(
      g.view(), check::reference_group(read(a.view()), r.ref, r.k, read(coeff.view()).v)));
}

TEST(Group, DeterministicReruns) {
  std::mt19937_64 rng(28);
  for (const Routing& r : awkward_routings(29)) {
    SCOPED_TRACE(r.name);
    Problem p = make_problem(r, r.k, Coeff::kFlat, DType::kBFloat16, false, rng);
    group(p.a.view(), r.plan(), r.k, p.coeff.view(), p.g.view());
    const HostTensor first = p.g;
    p.g.poison();
    group(p.a.view(), r.plan(), r.k, p.coeff.view(), p.g.view());
    EXPECT_TRUE(p.g.same_bytes(first));
  }
}

TEST(Group, NoTokensIsValid) {
  const Routing r = make_routing("empty", {}, 0, 2, 3);
  const TensorView a = TensorView::contiguous(nullptr, DType::kFloat32, {0, 4});
  const TensorView g = TensorView::contiguous(nullptr, DType::kFloat32, {0, 4});
  EXPECT_NO_THROW(group(a, r.plan(), 2, TensorView{}, g));
  EXPECT_NO_THROW(group(a, r.plan(), 1, TensorView::contiguous(nullptr, DType::kFloat32, {0}), g));
}

}  // namespace
}  // namespace scattermoe::testing
