// group_xty on the CPU: dW[e] = X_e^T @ DY_e, db[e] = sum of DY_e rows; empty experts get zeros;
// dW written through the transposed view of an (E, d_out, d_in) parameter gradient lands in that
// layout.
#include "common/test_util.hpp"

namespace scattermoe::testing {
namespace {

struct Problem {
  HostTensor dy, x, dw, db;
  std::vector<Matrix> want_dw;
  Matrix want_db;
};

Problem make_problem(const Routing& r, bool transposed, DType dt, bool exact, std::mt19937_64& rng,
                     std::int64_t d_in = 13, std::int64_t d_out = 7) {
  Problem p;
  p.dy = HostTensor(dt, {r.rows(), d_out});
  p.x = HostTensor(dt, {r.rows(), d_in});
  p.dw = HostTensor(dt, {r.experts, d_in, d_out}, transposed);
  p.db = HostTensor(dt, {r.experts, d_out});
  for (const HostTensor* t : {&p.dy, &p.x}) {
    if (exact) {
      check::fill_ints(t->view(), rng);
    } else {
      check::fill_normal(t->view(), rng);
    }
  }
  check::reference_group_xty(read(p.dy.view()), read(p.x.view()), r.ref, r.experts, &p.want_dw,
                             &p.want_db);
  p.dw.poison();
  p.db.poison();
  return p;
}

void run_all(DType dt, bool exact) {
  std::mt19937_64 rng(exact ? 31 : 32);
  for (const Routing& r : awkward_routings(33)) {
    for (bool transposed : {false, true}) {
      for (bool with_db : {false, true}) {
        SCOPED_TRACE(r.name + (transposed ? "/dw-transposed" : "/dw-contiguous") +
                     (with_db ? "/db" : "/no-db"));
        Problem p = make_problem(r, transposed, dt, exact, rng);
        // Worst case: 36 rows (one expert takes all) * 4 = 144: exact in bf16.
        if (exact) {
          ASSERT_TRUE(fits_exactly(stack(p.want_dw)) && fits_exactly(p.want_db));
        }
        group_xty(p.dy.view(), p.x.view(), r.plan(), p.dw.view(),
                  with_db ? p.db.view() : TensorView{});
        if (exact) {
          EXPECT_TRUE(exactly_equal(p.dw.view(), stack(p.want_dw)));
          if (with_db) {
            EXPECT_TRUE(exactly_equal(p.db.view(), p.want_db));
          }
        } else {
          EXPECT_TRUE(close_to(p.dw.view(), stack(p.want_dw)));
          if (with_db) {
            EXPECT_TRUE(close_to(p.db.view(), p.want_db));
          }
        }
        if (!with_db) {
          // db not asked for: its buffer keeps the poison.
          HostTensor untouched(dt, {r.experts, 7});
          untouched.poison();
          EXPECT_TRUE(p.db.same_bytes(untouched));
        }
      }
    }
  }
}

TEST(GroupXty, ExactWithAndWithoutDbF32) { run_all(DType::kFloat32, true); }
TEST(GroupXty, ExactWithAndWithoutDbBf16) { run_all(DType::kBFloat16, true); }
TEST(GroupXty, ExactWithAndWithoutDbF16) { run_all(DType::kFloat16, true); }
TEST(GroupXty, RandomAgainstFloat64F32) { run_all(DType::kFloat32, false); }
TEST(GroupXty, RandomAgainstFloat64Bf16) { run_all(DType::kBFloat16, false); }
TEST(GroupXty, RandomAgainstFloat64F16) { run_all(DType::kFloat16, false); }

TEST(GroupXty, EmptyExpertsGetZeroGradients) {
  std::mt19937_64 rng(34);
  const Routing r = make_routing("only-expert-1", std::vector<std::int64_t>(6, 1), 6, 1, 4);
  Problem p = make_problem(r, false, DType::kBFloat16, true, rng);
  group_xty(p.dy.view(), p.x.view(), r.plan(), p.dw.view(), p.db.view());
  const std::vector<Matrix> dw = check::to_matrices(p.dw.view());
  const Matrix db = read(p.db.view());
  for (int e : {0, 2, 3}) {
    for (double v : dw[static_cast<std::size_t>(e)].v) EXPECT_EQ(v, 0.0) << "expert " << e;
    for (std::int64_t c = 0; c < db.cols; ++c) EXPECT_EQ(db(e, c), 0.0) << "expert " << e;
  }
  EXPECT_TRUE(exactly_equal(p.dw.view(), stack(p.want_dw)));
}

TEST(GroupXty, TransposedDwLandsInParameterLayout) {
  // The parameter gradient buffer is (E, d_out, d_in) contiguous: element [e][o][i] = dW[e](i, o).
  std::mt19937_64 rng(35);
  const Routing r = awkward_routings(36)[0];
  const std::int64_t d_in = 13, d_out = 7;
  Problem p = make_problem(r, true, DType::kFloat32, true, rng, d_in, d_out);
  group_xty(p.dy.view(), p.x.view(), r.plan(), p.dw.view(), TensorView{});
  const TensorView param =
      TensorView::contiguous(p.dw.view().data(), DType::kFloat32, {r.experts, d_out, d_in});
  ASSERT_TRUE(param.is_contiguous());
  for (std::int64_t e = 0; e < r.experts; ++e) {
    for (std::int64_t o = 0; o < d_out; ++o) {
      for (std::int64_t i = 0; i < d_in; ++i) {
        const std::int64_t index[3] = {e, o, i};
        ASSERT_EQ(check::read_element(param, index), p.want_dw[static_cast<std::size_t>(e)](i, o))
            << "[" << e << "][" << o << "][" << i << "]";
      }
    }
  }
}

TEST(GroupXty, FeatureSizesNotMultipleOfEight) {
  std::mt19937_64 rng(37);
  const Routing r = awkward_routings(38)[0];
  for (auto [d_in, d_out] : {std::pair<std::int64_t, std::int64_t>{7, 13}, {1, 1}, {33, 3}}) {
    SCOPED_TRACE(std::to_string(d_in) + "x" + std::to_string(d_out));
    Problem p = make_problem(r, false, DType::kBFloat16, true, rng, d_in, d_out);
    group_xty(p.dy.view(), p.x.view(), r.plan(), p.dw.view(), p.db.view());
    EXPECT_TRUE(exactly_equal(p.dw.view(), stack(p.want_dw)));
    EXPECT_TRUE(exactly_equal(p.db.view(), p.want_db));
  }
}

TEST(GroupXty, DeterministicReruns) {
  std::mt19937_64 rng(39);
  for (const Routing& r : awkward_routings(40)) {
    SCOPED_TRACE(r.name);
    Problem p = make_problem(r, true, DType::kBFloat16, false, rng);
    group_xty(p.dy.view(), p.x.view(), r.plan(), p.dw.view(), p.db.view());
    const HostTensor dw = p.dw, db = p.db;
    p.dw.poison();
    p.db.poison();
    group_xty(p.dy.view(), p.x.view(), r.plan(), p.dw.view(), p.db.view());
    EXPECT_TRUE(p.dw.same_bytes(dw));
    EXPECT_TRUE(p.db.same_bytes(db));
  }
}

TEST(GroupXty, NoTokensGivesZeroGradients) {
  const Routing r = make_routing("empty", {}, 0, 2, 3);
  HostTensor dw(DType::kFloat32, {3, 4, 5});
  HostTensor db(DType::kFloat32, {3, 5});
  dw.poison();
  db.poison();
  const TensorView dy = TensorView::contiguous(nullptr, DType::kFloat32, {0, 5});
  const TensorView x = TensorView::contiguous(nullptr, DType::kFloat32, {0, 4});
  ASSERT_NO_THROW(group_xty(dy, x, r.plan(), dw.view(), db.view()));
  for (double v : read(dw.view()).v) EXPECT_EQ(v, 0.0);
  for (double v : read(db.view()).v) EXPECT_EQ(v, 0.0);
}

}  // namespace
}  // namespace scattermoe::testing
