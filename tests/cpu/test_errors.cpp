// Bad input: every entry point throws InvalidArgument whose message names the operation and the
// argument ("<op>: argument '<name>' is ..."), and leaves every output untouched (outputs carry a
// sentinel byte pattern before the call and must still carry it after).
#include <cstring>

#include "common/test_util.hpp"

namespace scattermoe::testing {
namespace {

constexpr unsigned char kSentinel = 0x5a;

::testing::AssertionResult untouched(const HostTensor& t) {
  for (std::size_t n = 0; n < t.byte_size(); ++n) {
    if (t.bytes()[n] != kSentinel) {
      return ::testing::AssertionFailure() << "byte " << n << " was overwritten";
    }
  }
  return ::testing::AssertionSuccess();
}

// ---- build_routing_plan ----------------------------------------------------------------------

class RoutingPlanErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    plan_ = HostPlan(kT * kK, kE);
    plan_.poison(kSentinel);
    ids_ = check::make_expert_idxs({0, 1, 2, 3, 1, 2, 0, 3}, kT, kK);
    scratch_ = std::make_unique<Scratch>(routing_plan_workspace_size(kT, kK, kE, Device::cpu()));
  }
  void expect_plan_untouched() {
    EXPECT_TRUE(untouched(plan_.sorted_expert_idxs()));
    EXPECT_TRUE(untouched(plan_.sorted_scattered_idxs()));
    EXPECT_TRUE(untouched(plan_.expert_offsets()));
  }
  void set_id(std::int64_t t, std::int64_t j, double value) {
    const std::int64_t index[2] = {t, j};
    check::write_element(ids_.view(), index, value);
  }
  static constexpr std::int64_t kT = 4;
  static constexpr int kK = 2;
  static constexpr int kE = 4;
  HostPlan plan_;
  HostTensor ids_;
  std::unique_ptr<Scratch> scratch_;
};

TEST_F(RoutingPlanErrors, NegativeExpertIndex) {
  set_id(3, 1, -1);  // the last id: all ids are checked before anything is written
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      build_routing_plan(ids_.view(), kE, plan_.plan(), scratch_->context()), "build_routing_plan",
      "expert_idxs");
  expect_plan_untouched();
}

TEST_F(RoutingPlanErrors, ExpertIndexEqualToNumExperts) {
  set_id(3, 1, kE);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      build_routing_plan(ids_.view(), kE, plan_.plan(), scratch_->context()), "build_routing_plan",
      "expert_idxs");
  expect_plan_untouched();
  for (DType dt : {DType::kInt32, DType::kInt64}) {
    const HostTensor big = check::make_expert_idxs({0, 1, 2, 3, 1, 2, 0, 1000}, kT, kK, dt);
    SCATTERMOE_EXPECT_INVALID_ARGUMENT(
        build_routing_plan(big.view(), kE, plan_.plan(), scratch_->context()), "build_routing_plan",
        "expert_idxs");
    expect_plan_untouched();
  }
}

TEST_F(RoutingPlanErrors, KBelowOne) {
  const HostTensor empty_k(DType::kInt64, {kT, 0});
  HostPlan plan(0, kE);
  plan.poison(kSentinel);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      build_routing_plan(empty_k.view(), kE, plan.plan(), scratch_->context()),
      "build_routing_plan", "expert_idxs");
  EXPECT_TRUE(untouched(plan.expert_offsets()));
}

TEST_F(RoutingPlanErrors, KAboveNumExperts) {
  const HostTensor ids = check::make_expert_idxs({0, 1, 2, 0, 1, 2}, 2, 3);
  HostPlan plan(6, 2);
  plan.poison(kSentinel);
  Scratch scratch(routing_plan_workspace_size(2, 3, 3, Device::cpu()));
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      build_routing_plan(ids.view(), 2, plan.plan(), scratch.context()), "build_routing_plan",
      "expert_idxs");
  EXPECT_TRUE(untouched(plan.sorted_expert_idxs()));
  EXPECT_TRUE(untouched(plan.expert_offsets()));
}

TEST_F(RoutingPlanErrors, FloatExpertIndices) {
  const HostTensor ids(DType::kFloat32, {kT, kK});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      build_routing_plan(ids.view(), kE, plan_.plan(), scratch_->context()), "build_routing_plan",
      "expert_idxs");
  expect_plan_untouched();
}

TEST_F(RoutingPlanErrors, MisShapedPlanOutput) {
  HostTensor offsets(DType::kInt64, {kE + 1});
  offsets.poison(kSentinel);
  RoutingPlan plan = plan_.plan();
  plan.expert_offsets = offsets.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(build_routing_plan(ids_.view(), kE, plan, scratch_->context()),
                                     "build_routing_plan", "plan.expert_offsets");
  expect_plan_untouched();
  EXPECT_TRUE(untouched(offsets));
}

TEST_F(RoutingPlanErrors, PlanOutputAliasingExpertIdxs) {
  // sorted_scattered_idxs written over the i64 ids buffer itself.
  RoutingPlan plan = plan_.plan();
  plan.sorted_scattered_idxs = TensorView::contiguous(ids_.view().data(), DType::kInt64, {kT * kK});
  const HostTensor before = ids_;
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(build_routing_plan(ids_.view(), kE, plan, scratch_->context()),
                                     "build_routing_plan", "plan.sorted_scattered_idxs");
  EXPECT_TRUE(ids_.same_bytes(before));
  expect_plan_untouched();
}

TEST_F(RoutingPlanErrors, NullDataWithElements) {
  const TensorView null_ids = TensorView::contiguous(nullptr, DType::kInt64, {kT, kK});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      build_routing_plan(null_ids, kE, plan_.plan(), scratch_->context()), "build_routing_plan",
      "expert_idxs");
  expect_plan_untouched();
}

TEST_F(RoutingPlanErrors, TooSmallWorkspace) {
  const std::size_t need = routing_plan_workspace_size(kT, kK, kE, Device::cpu());
  if (need == 0) GTEST_SKIP() << "build_routing_plan needs no workspace on the CPU";
  std::vector<unsigned char> mem(need);
  const Context small{nullptr, Workspace{mem.data(), need - 1}};
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(build_routing_plan(ids_.view(), kE, plan_.plan(), small),
                                     "build_routing_plan", "ctx.workspace");
  const Context null_ws{nullptr, Workspace{nullptr, need}};
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(build_routing_plan(ids_.view(), kE, plan_.plan(), null_ws),
                                     "build_routing_plan", "ctx.workspace");
  expect_plan_untouched();
}

// ---- the primitives ----------------------------------------------------------------------------

class OpErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    std::mt19937_64 rng(81);
    routing_ = make_routing("mixed", check::draw_routing(rng, kT, kK, kE), kT, kK, kE);
    x_ = HostTensor(DType::kFloat32, {kT, kDIn});
    xg_ = HostTensor(DType::kFloat32, {kT * kK, kDIn});
    w_ = HostTensor(DType::kFloat32, {kE, kDIn, kDOut});
    b_ = HostTensor(DType::kFloat32, {kE, kDOut});
    gates_ = HostTensor(DType::kFloat32, {kT, kK});
    for (const HostTensor* t : {&x_, &xg_, &w_, &b_, &gates_}) check::fill_ints(t->view(), rng);
    y_ = HostTensor(DType::kFloat32, {kT * kK, kDOut});
    y_.poison(kSentinel);
  }
  Scatter2ScatterArgs s2s_args() const {
    return Scatter2ScatterArgs{x_.view(), w_.view(), b_.view(), kK, false, false};
  }
  static constexpr std::int64_t kT = 5;
  static constexpr int kK = 2;
  static constexpr int kE = 3;
  static constexpr std::int64_t kDIn = 4;
  static constexpr std::int64_t kDOut = 3;
  Routing routing_;
  HostTensor x_, xg_, w_, b_, gates_, y_;
};

TEST_F(OpErrors, Scatter2ScatterShapeMismatch) {
  HostTensor w_bad(DType::kFloat32, {kE, kDIn + 1, kDOut});
  Scatter2ScatterArgs args = s2s_args();
  args.w = w_bad.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), y_.view()),
                                     "scatter2scatter", "w");
  EXPECT_TRUE(untouched(y_));
  HostTensor y_bad(DType::kFloat32, {kT * kK + 1, kDOut});
  y_bad.poison(kSentinel);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(s2s_args(), routing_.plan(), y_bad.view()),
                                     "scatter2scatter", "y");
  EXPECT_TRUE(untouched(y_bad));
  HostTensor b_bad(DType::kFloat32, {kE, kDOut + 1});
  args = s2s_args();
  args.bias = b_bad.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), y_.view()),
                                     "scatter2scatter", "bias");
  // Scattered x must have L / k rows; grouped x must have L rows.
  args = s2s_args();
  args.x = xg_.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), y_.view()),
                                     "scatter2scatter", "x");
  args.x = x_.view();
  args.x_grouped = true;
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), y_.view()),
                                     "scatter2scatter", "x");
  EXPECT_TRUE(untouched(y_));
}

TEST_F(OpErrors, Scatter2ScatterDtypeMismatch) {
  HostTensor w_bf16(DType::kBFloat16, {kE, kDIn, kDOut});
  Scatter2ScatterArgs args = s2s_args();
  args.w = w_bf16.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), y_.view()),
                                     "scatter2scatter", "w");
  EXPECT_TRUE(untouched(y_));
  HostTensor y_f16(DType::kFloat16, {kT * kK, kDOut});
  y_f16.poison(kSentinel);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(s2s_args(), routing_.plan(), y_f16.view()),
                                     "scatter2scatter", "y");
  EXPECT_TRUE(untouched(y_f16));
  HostTensor x_int(DType::kInt32, {kT, kDIn});
  args = s2s_args();
  args.x = x_int.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), y_.view()),
                                     "scatter2scatter", "x");
  EXPECT_TRUE(untouched(y_));
}

TEST_F(OpErrors, Scatter2ScatterKBelowOne) {
  Scatter2ScatterArgs args = s2s_args();
  args.k = 0;
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), y_.view()),
                                     "scatter2scatter", "k");
  args.k = -2;
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), y_.view()),
                                     "scatter2scatter", "k");
  EXPECT_TRUE(untouched(y_));
}

TEST_F(OpErrors, Scatter2ScatterOutputAliasingAnInput) {
  // y == x's buffer (viewed with y's shape), and y overlapping the weights.
  HostTensor shared(DType::kFloat32, {kT * kK, kDOut});
  shared.poison(kSentinel);
  Scatter2ScatterArgs args = s2s_args();
  args.x = TensorView::contiguous(shared.view().data(), DType::kFloat32, {kT, kDIn});
  const HostTensor before = shared;
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), shared.view()),
                                     "scatter2scatter", "y");
  EXPECT_TRUE(shared.same_bytes(before));
  const HostTensor w_before = w_;
  const TensorView y_in_w =
      TensorView::contiguous(w_.view().data(), DType::kFloat32, {kT * kK, kDOut});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(s2s_args(), routing_.plan(), y_in_w),
                                     "scatter2scatter", "y");
  EXPECT_TRUE(w_.same_bytes(w_before));
}

TEST_F(OpErrors, Scatter2ScatterNullDataWithElements) {
  Scatter2ScatterArgs args = s2s_args();
  args.x = TensorView::contiguous(nullptr, DType::kFloat32, {kT, kDIn});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), y_.view()),
                                     "scatter2scatter", "x");
  args = s2s_args();
  args.w = TensorView::contiguous(nullptr, DType::kFloat32, {kE, kDIn, kDOut});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, routing_.plan(), y_.view()),
                                     "scatter2scatter", "w");
  EXPECT_TRUE(untouched(y_));
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      scatter2scatter(s2s_args(), routing_.plan(),
                      TensorView::contiguous(nullptr, DType::kFloat32, {kT * kK, kDOut})),
      "scatter2scatter", "y");
}

TEST_F(OpErrors, Scatter2ScatterBadPlanContents) {
  // An expert id past E in a caller-built plan is caught before anything is written.
  HostPlan bad = routing_.host;
  const std::int64_t last[1] = {kT * kK - 1};
  check::write_element(bad.sorted_expert_idxs().view(), last, kE);
  EXPECT_THROW(scatter2scatter(s2s_args(), bad.plan(), y_.view()), InvalidArgument);
  EXPECT_TRUE(contains(error_message([&] { scatter2scatter(s2s_args(), bad.plan(), y_.view()); }),
                       "scatter2scatter: argument 'plan."));
  EXPECT_TRUE(untouched(y_));
  // A plan for another number of experts than w has.
  const Routing other =
      make_routing("other", std::vector<std::int64_t>(kT * kK, 0), kT, kK, kE + 1);
  EXPECT_THROW(scatter2scatter(s2s_args(), other.plan(), y_.view()), InvalidArgument);
  EXPECT_TRUE(untouched(y_));
}

TEST_F(OpErrors, Scatter2ScatterOutputWithRepeatedElements) {
  // A zero row stride maps every row onto one: the output's elements must be distinct.
  const TensorView y_rows_shared(y_.view().data(), DType::kFloat32, {kT * kK, kDOut}, {0, 1});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(s2s_args(), routing_.plan(), y_rows_shared),
                                     "scatter2scatter", "y");
  EXPECT_TRUE(untouched(y_));
}

TEST_F(OpErrors, Scatter2ScatterPlanNotAPermutation) {
  // Two grouped rows naming the same flat position: one row would be written twice, one never.
  HostPlan bad = routing_.host;
  const std::int64_t first[1] = {0};
  const std::int64_t second[1] = {1};
  const double p0 = check::to_matrix(bad.sorted_scattered_idxs().view())(0, 0);
  check::write_element(bad.sorted_scattered_idxs().view(), second, p0);
  check::write_element(bad.sorted_scattered_idxs().view(), first, p0);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(s2s_args(), bad.plan(), y_.view()),
                                     "scatter2scatter", "plan.sorted_scattered_idxs");
  EXPECT_TRUE(untouched(y_));
}

TEST_F(OpErrors, Scatter2ScatterRowsWithoutExperts) {
  // E = 0 experts but routed rows: the offsets cannot account for them.
  HostTensor w0(DType::kFloat32, {0, kDIn, kDOut});
  HostPlan plan(kT * kK, 0);
  const HostPlan& good = routing_.host;
  std::memcpy(plan.sorted_expert_idxs().view().data(), good.sorted_expert_idxs().bytes(),
              good.sorted_expert_idxs().byte_size());
  std::memcpy(plan.sorted_scattered_idxs().view().data(), good.sorted_scattered_idxs().bytes(),
              good.sorted_scattered_idxs().byte_size());
  Scatter2ScatterArgs args{x_.view(), w0.view(), TensorView{}, kK, false, false};
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(scatter2scatter(args, plan.plan(), y_.view()),
                                     "scatter2scatter", "plan.expert_offsets");
  EXPECT_TRUE(untouched(y_));
}

TEST(TensorViewErrors, ContiguousRankAboveFour) {
  float data[1] = {0.0f};
  EXPECT_THROW(TensorView::contiguous(data, DType::kFloat32, {1, 1, 1, 1, 1}), InvalidArgument);
}

TEST_F(OpErrors, GroupBadArguments) {
  HostTensor g(DType::kFloat32, {kT * kK, kDIn});
  g.poison(kSentinel);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(group(x_.view(), routing_.plan(), 0, TensorView{}, g.view()),
                                     "group", "fan_out");
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(group(x_.view(), routing_.plan(), 1, TensorView{}, g.view()),
                                     "group", "a");
  HostTensor coeff_bad(DType::kFloat32, {kT * kK + 1});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      group(x_.view(), routing_.plan(), kK, coeff_bad.view(), g.view()), "group", "coeff");
  HostTensor g_bf16(DType::kBFloat16, {kT * kK, kDIn});
  g_bf16.poison(kSentinel);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      group(x_.view(), routing_.plan(), kK, TensorView{}, g_bf16.view()), "group", "g");
  EXPECT_TRUE(untouched(g_bf16));
  HostTensor g_bad(DType::kFloat32, {kT * kK, kDIn + 1});
  g_bad.poison(kSentinel);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      group(x_.view(), routing_.plan(), kK, TensorView{}, g_bad.view()), "group", "g");
  EXPECT_TRUE(untouched(g_bad));
  // g over a's own memory.
  HostTensor big(DType::kFloat32, {kT * kK, kDIn});
  const TensorView a_in_big = big.view().narrowed(0, 0, kT);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(group(a_in_big, routing_.plan(), kK, TensorView{}, big.view()),
                                     "group", "g");
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      group(x_.view(), routing_.plan(), kK, TensorView{},
            TensorView::contiguous(nullptr, DType::kFloat32, {kT * kK, kDIn})),
      "group", "g");
  EXPECT_TRUE(untouched(g));
}

TEST_F(OpErrors, GroupXtyBadArguments) {
  HostTensor dy(DType::kFloat32, {kT * kK, kDOut});
  HostTensor dw(DType::kFloat32, {kE, kDIn, kDOut});
  HostTensor db(DType::kFloat32, {kE, kDOut});
  dw.poison(kSentinel);
  db.poison(kSentinel);
  HostTensor dw_bad(DType::kFloat32, {kE, kDOut, kDIn});  // the parameter layout, not transposed
  dw_bad.poison(kSentinel);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      group_xty(dy.view(), xg_.view(), routing_.plan(), dw_bad.view(), db.view()), "group_xty",
      "dw");
  EXPECT_TRUE(untouched(dw_bad));
  HostTensor x_bf16(DType::kBFloat16, {kT * kK, kDIn});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      group_xty(dy.view(), x_bf16.view(), routing_.plan(), dw.view(), db.view()), "group_xty", "x");
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      group_xty(dy.view(), x_.view(), routing_.plan(), dw.view(), db.view()), "group_xty", "x");
  const TensorView db_over_dy =
      TensorView::contiguous(dy.view().data(), DType::kFloat32, {kE, kDOut});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      group_xty(dy.view(), xg_.view(), routing_.plan(), dw.view(), db_over_dy), "group_xty", "db");
  const TensorView dw_over_x =
      TensorView::contiguous(xg_.view().data(), DType::kFloat32, {kE, kDIn, kDOut});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      group_xty(dy.view(), xg_.view(), routing_.plan(), dw_over_x, db.view()), "group_xty", "dw");
  EXPECT_TRUE(untouched(dw));
  EXPECT_TRUE(untouched(db));
}

// ---- ParallelLinear and MLP
// ----------------------------------------------------------------------

TEST_F(OpErrors, ParallelLinearGatesWithGroupedOutput) {
  ParallelLinearArgs args;
  args.x = x_.view();
  args.w = w_.view();
  args.gates = gates_.view();
  args.k = kK;
  args.grouped_out = true;
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(parallel_linear_forward(args, routing_.plan(), y_.view()),
                                     "parallel_linear_forward", "gates");
  EXPECT_TRUE(untouched(y_));
  HostTensor d_out(DType::kFloat32, {kT * kK, kDOut});
  HostTensor dx(DType::kFloat32, {kT, kDIn});
  dx.poison(kSentinel);
  ParallelLinearGrads grads;
  grads.dx = dx.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      parallel_linear_backward(args, routing_.plan(), d_out.view(), grads),
      "parallel_linear_backward", "gates");
  EXPECT_TRUE(untouched(dx));
}

TEST_F(OpErrors, ParallelLinearForwardBadArguments) {
  ParallelLinearArgs args;
  args.x = x_.view();
  args.w = w_.view();
  args.bias = b_.view();
  args.gates = gates_.view();
  args.k = kK;
  HostTensor out(DType::kFloat32, {kT, kDOut});
  out.poison(kSentinel);
  const std::size_t need = parallel_linear_forward_workspace_size(args, routing_.plan());
  ASSERT_GT(need, 0u) << "a gated forward combines rows through scratch";
  std::vector<unsigned char> mem(need);
  const Context small{nullptr, Workspace{mem.data(), need - 1}};
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      parallel_linear_forward(args, routing_.plan(), out.view(), small), "parallel_linear_forward",
      "ctx.workspace");
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(parallel_linear_forward(args, routing_.plan(), out.view()),
                                     "parallel_linear_forward", "ctx.workspace");
  const Context ok{nullptr, Workspace{mem.data(), need}};
  ParallelLinearArgs bad = args;
  HostTensor w_bf16(DType::kBFloat16, {kE, kDIn, kDOut});
  bad.w = w_bf16.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(parallel_linear_forward(bad, routing_.plan(), out.view(), ok),
                                     "parallel_linear_forward", "w");
  bad = args;
  bad.k = 0;
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(parallel_linear_forward(bad, routing_.plan(), out.view(), ok),
                                     "parallel_linear_forward", "k");
  bad = args;
  HostTensor gates_bad(DType::kFloat32, {kT + 1, kK});
  bad.gates = gates_bad.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(parallel_linear_forward(bad, routing_.plan(), out.view(), ok),
                                     "parallel_linear_forward", "gates");
  HostTensor out_bad(DType::kFloat32, {kT * kK, kDOut});  // ungated shape with gates given
  out_bad.poison(kSentinel);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      parallel_linear_forward(args, routing_.plan(), out_bad.view(), ok), "parallel_linear_forward",
      "out");
  EXPECT_TRUE(untouched(out_bad));
  const TensorView out_over_x =
      TensorView::contiguous(x_.view().data(), DType::kFloat32, {kT, kDOut});
  const HostTensor x_before = x_;
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(parallel_linear_forward(args, routing_.plan(), out_over_x, ok),
                                     "parallel_linear_forward", "out");
  EXPECT_TRUE(x_.same_bytes(x_before));
  EXPECT_TRUE(untouched(out));
}

TEST_F(OpErrors, ParallelLinearBackwardBadArguments) {
  ParallelLinearArgs args;
  args.x = x_.view();
  args.w = w_.view();
  args.bias = b_.view();
  args.gates = gates_.view();
  args.k = kK;
  HostTensor d_out(DType::kFloat32, {kT, kDOut});
  std::mt19937_64 rng(3);
  check::fill_ints(d_out.view(), rng);
  HostTensor dx(DType::kFloat32, {kT, kDIn}), dw(DType::kFloat32, {kE, kDIn, kDOut}),
      db(DType::kFloat32, {kE, kDOut}), dg(DType::kFloat32, {kT, kK});
  for (HostTensor* t : {&dx, &dw, &db, &dg}) t->poison(kSentinel);
  ParallelLinearGrads grads{dx.view(), dw.view(), db.view(), dg.view()};
  const std::size_t need = parallel_linear_backward_workspace_size(args, routing_.plan(), grads);
  std::vector<unsigned char> mem(need + 1);
  const Context ok{nullptr, Workspace{mem.data(), need}};
  if (need > 0) {
    const Context small{nullptr, Workspace{mem.data(), need - 1}};
    SCATTERMOE_EXPECT_INVALID_ARGUMENT(
        parallel_linear_backward(args, routing_.plan(), d_out.view(), grads, small),
        "parallel_linear_backward", "ctx.workspace");
  }
  HostTensor dw_bad(DType::kFloat32, {kE, kDOut, kDIn});
  ParallelLinearGrads bad = grads;
  bad.dw = dw_bad.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      parallel_linear_backward(args, routing_.plan(), d_out.view(), bad, ok),
      "parallel_linear_backward", "grads.dw");
  ParallelLinearArgs no_gates = args;
  no_gates.gates = TensorView{};
  HostTensor d_out_rows(DType::kFloat32, {kT * kK, kDOut});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      parallel_linear_backward(no_gates, routing_.plan(), d_out_rows.view(), grads, ok),
      "parallel_linear_backward", "grads.d_gates");
  HostTensor d_out_bf16(DType::kBFloat16, {kT, kDOut});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      parallel_linear_backward(args, routing_.plan(), d_out_bf16.view(), grads, ok),
      "parallel_linear_backward", "d_out");
  bad = grads;
  bad.dx = x_.view();  // the gradient written over the input it belongs to
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      parallel_linear_backward(args, routing_.plan(), d_out.view(), bad, ok),
      "parallel_linear_backward", "grads.dx");
  bad = grads;
  bad.db = TensorView::contiguous(dw.view().data(), DType::kFloat32, {kE, kDOut});  // over dw
  EXPECT_THROW(parallel_linear_backward(args, routing_.plan(), d_out.view(), bad, ok),
               InvalidArgument);
  for (HostTensor* t : {&dx, &dw, &db, &dg}) EXPECT_TRUE(untouched(*t));
}

class MlpErrors : public OpErrors {
 protected:
  void SetUp() override {
    OpErrors::SetUp();
    std::mt19937_64 rng(82);
    xm_ = HostTensor(DType::kFloat32, {kT, kD});
    w1_ = HostTensor(DType::kFloat32, {kE, kD, kH});
    w2_ = HostTensor(DType::kFloat32, {kE, kH, kD});
    for (const HostTensor* t : {&xm_, &w1_, &w2_}) check::fill_ints(t->view(), rng);
    out_ = HostTensor(DType::kFloat32, {kT, kD});
    hidden_ = HostTensor(DType::kFloat32, {kT * kK, kH});
    out_.poison(kSentinel);
    hidden_.poison(kSentinel);
    args_.x = xm_.view();
    args_.w1 = w1_.view();
    args_.w2 = w2_.view();
    args_.gates = gates_.view();
    args_.activation = Activation::kGelu;
    ws_ = std::make_unique<Scratch>(std::max(mlp_forward_workspace_size(args_, routing_.plan()),
                                             mlp_backward_workspace_size(args_, routing_.plan())));
  }
  void expect_forward_outputs_untouched() {
    EXPECT_TRUE(untouched(out_));
    EXPECT_TRUE(untouched(hidden_));
  }
  static constexpr std::int64_t kD = 6;
  static constexpr std::int64_t kH = 5;
  HostTensor xm_, w1_, w2_, out_, hidden_;
  MlpArgs args_;
  std::unique_ptr<Scratch> ws_;
};

TEST_F(MlpErrors, ForwardShapeAndDtypeMismatch) {
  MlpArgs bad = args_;
  HostTensor w1_bad(DType::kFloat32, {kE, kD, kH + 1});
  bad.w1 = w1_bad.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_forward(bad, routing_.plan(), out_.view(), hidden_.view(), ws_->context()), "mlp_forward",
      "w1");
  bad = args_;
  bad.glu = true;  // w1 must then be (E, d, 2h)
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_forward(bad, routing_.plan(), out_.view(), hidden_.view(), ws_->context()), "mlp_forward",
      "w1");
  bad = args_;
  HostTensor w2_bf16(DType::kBFloat16, {kE, kH, kD});
  bad.w2 = w2_bf16.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_forward(bad, routing_.plan(), out_.view(), hidden_.view(), ws_->context()), "mlp_forward",
      "w2");
  bad = args_;
  HostTensor gates_bad(DType::kFloat32, {kT, kK + 1});
  bad.gates = gates_bad.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_forward(bad, routing_.plan(), out_.view(), hidden_.view(), ws_->context()), "mlp_forward",
      "gates");
  bad = args_;
  HostTensor b1_bad(DType::kFloat32, {kE, kH + 1});
  bad.b1 = b1_bad.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_forward(bad, routing_.plan(), out_.view(), hidden_.view(), ws_->context()), "mlp_forward",
      "b1");
  HostTensor hidden_bad(DType::kFloat32, {kT * kK, kH + 1});
  hidden_bad.poison(kSentinel);
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_forward(args_, routing_.plan(), out_.view(), hidden_bad.view(), ws_->context()),
      "mlp_forward", "hidden");
  EXPECT_TRUE(untouched(hidden_bad));
  expect_forward_outputs_untouched();
}

TEST_F(MlpErrors, ForwardOutputAliasing) {
  const TensorView out_over_x = xm_.view();
  const HostTensor before = xm_;
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_forward(args_, routing_.plan(), out_over_x, hidden_.view(), ws_->context()),
      "mlp_forward", "out");
  EXPECT_TRUE(xm_.same_bytes(before));
  HostTensor both(DType::kFloat32,
                  {kT * kK, kH + kD});  // hidden and out in one buffer, overlapping
  both.poison(kSentinel);
  const TensorView hidden_in_both =
      TensorView::contiguous(both.view().data(), DType::kFloat32, {kT * kK, kH});
  const TensorView out_in_both =
      TensorView::contiguous(both.view().data(), DType::kFloat32, {kT, kD});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_forward(args_, routing_.plan(), out_in_both, hidden_in_both, ws_->context()),
      "mlp_forward", "hidden");
  EXPECT_TRUE(untouched(both));
  expect_forward_outputs_untouched();
}

TEST_F(MlpErrors, ForwardTooSmallWorkspaceAndNullData) {
  const std::size_t need = mlp_forward_workspace_size(args_, routing_.plan());
  if (need > 0) {
    std::vector<unsigned char> mem(need);
    SCATTERMOE_EXPECT_INVALID_ARGUMENT(
        mlp_forward(args_, routing_.plan(), out_.view(), hidden_.view(),
                    Context{nullptr, Workspace{mem.data(), need - 1}}),
        "mlp_forward", "ctx.workspace");
    SCATTERMOE_EXPECT_INVALID_ARGUMENT(
        mlp_forward(args_, routing_.plan(), out_.view(), hidden_.view()), "mlp_forward",
        "ctx.workspace");
  }
  MlpArgs bad = args_;
  bad.x = TensorView::contiguous(nullptr, DType::kFloat32, {kT, kD});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_forward(bad, routing_.plan(), out_.view(), hidden_.view(), ws_->context()), "mlp_forward",
      "x");
  bad = args_;
  bad.gates = TensorView{};
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_forward(bad, routing_.plan(), out_.view(), hidden_.view(), ws_->context()), "mlp_forward",
      "gates");
  expect_forward_outputs_untouched();
}

TEST_F(MlpErrors, BackwardBadArguments) {
  HostTensor hidden(DType::kFloat32, {kT * kK, kH});
  HostTensor d_out(DType::kFloat32, {kT, kD});
  HostTensor dx(DType::kFloat32, {kT, kD}), dw1(DType::kFloat32, {kE, kD, kH}),
      db1(DType::kFloat32, {kE, kH}), dw2(DType::kFloat32, {kE, kH, kD}),
      dg(DType::kFloat32, {kT, kK});
  for (HostTensor* t : {&dx, &dw1, &db1, &dw2, &dg}) t->poison(kSentinel);
  MlpGrads grads;
  grads.dx = dx.view();
  grads.dw1 = dw1.view();
  grads.dw2 = dw2.view();
  grads.d_gates = dg.view();
  const auto call = [&](const MlpArgs& a, const MlpGrads& g, const Context& ctx) {
    mlp_backward(a, routing_.plan(), hidden.view(), d_out.view(), g, ctx);
  };
  MlpGrads bad = grads;
  HostTensor dw1_bad(DType::kFloat32, {kE, kH, kD});
  bad.dw1 = dw1_bad.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(call(args_, bad, ws_->context()), "mlp_backward", "grads.dw1");
  bad = grads;
  bad.db1 = db1.view();  // args_ has no b1
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(call(args_, bad, ws_->context()), "mlp_backward", "grads.db1");
  bad = grads;
  bad.dx = TensorView::contiguous(hidden.view().data(), DType::kFloat32, {kT, kD});  // over hidden
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(call(args_, bad, ws_->context()), "mlp_backward", "grads.dx");
  bad = grads;
  HostTensor dg_bf16(DType::kBFloat16, {kT, kK});
  bad.d_gates = dg_bf16.view();
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(call(args_, bad, ws_->context()), "mlp_backward",
                                     "grads.d_gates");
  HostTensor hidden_bad(DType::kFloat32, {kT * kK, kH + 1});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_backward(args_, routing_.plan(), hidden_bad.view(), d_out.view(), grads, ws_->context()),
      "mlp_backward", "hidden");
  HostTensor d_out_bad(DType::kFloat32, {kT * kK, kD});
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(
      mlp_backward(args_, routing_.plan(), hidden.view(), d_out_bad.view(), grads, ws_->context()),
      "mlp_backward", "d_out");
  const std::size_t need = mlp_backward_workspace_size(args_, routing_.plan());
  if (need > 0) {
    std::vector<unsigned char> mem(need);
    SCATTERMOE_EXPECT_INVALID_ARGUMENT(
        call(args_, grads, Context{nullptr, Workspace{mem.data(), need - 1}}), "mlp_backward",
        "ctx.workspace");
  }
  for (HostTensor* t : {&dx, &dw1, &db1, &dw2, &dg}) EXPECT_TRUE(untouched(*t));
}

TEST(ActivationNames, ParseAndNameRoundTrip) {
  for (Activation a :
       {Activation::kGelu, Activation::kGeluTanh, Activation::kSilu, Activation::kRelu}) {
    EXPECT_EQ(parse_activation(activation_name(a)), a);
  }
  EXPECT_STREQ(activation_name(Activation::kGelu), "gelu");
  EXPECT_STREQ(activation_name(Activation::kGeluTanh), "gelu_tanh");
  SCATTERMOE_EXPECT_INVALID_ARGUMENT(parse_activation("tanh"), "parse_activation", "name");
}

}  // namespace
}  // namespace scattermoe::testing
