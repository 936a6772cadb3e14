// build_routing_plan on the CPU: the stable counting sort of the spec, from i32 and i64 ids.
#include "common/test_util.hpp"

namespace scattermoe::testing {
namespace {

std::vector<std::int64_t> as_vector(const HostTensor& t) {
  const Matrix m = read(t.view());
  std::vector<std::int64_t> v;
  for (double x : m.v) v.push_back(static_cast<std::int64_t>(x));
  return v;
}

void expect_plan(const HostPlan& got, const Plan64& want) {
  EXPECT_EQ(as_vector(got.sorted_expert_idxs()), want.sorted_expert_idxs);
  EXPECT_EQ(as_vector(got.sorted_scattered_idxs()), want.sorted_scattered_idxs);
  EXPECT_EQ(as_vector(got.expert_offsets()), want.expert_offsets);
}

TEST(RoutingPlan, HandWorkedExampleWithAnEmptyExpert) {
  // T = 3, k = 2, E = 4; flat ids p0..p5 = 2 0 | 1 2 | 0 1; expert 3 gets nothing.
  const std::vector<std::int64_t> idx = {2, 0, 1, 2, 0, 1};
  for (DType dt : {DType::kInt32, DType::kInt64}) {
    SCOPED_TRACE(dtype_name(dt));
    const HostPlan plan = check::build_host_plan(idx, 3, 2, 4, dt);
    EXPECT_EQ(as_vector(plan.sorted_expert_idxs()), (std::vector<std::int64_t>{0, 0, 1, 1, 2, 2}));
    EXPECT_EQ(as_vector(plan.sorted_scattered_idxs()),
              (std::vector<std::int64_t>{1, 4, 2, 5, 0, 3}));
    EXPECT_EQ(as_vector(plan.expert_offsets()), (std::vector<std::int64_t>{2, 4, 6, 6}));
  }
}

TEST(RoutingPlan, TiesKeepAscendingFlatPosition) {
  // Every row picks expert 1: grouped order must be the identity (stable sort).
  const std::vector<std::int64_t> idx(12, 1);
  const HostPlan plan = check::build_host_plan(idx, 12, 1, 3);
  std::vector<std::int64_t> identity(12);
  for (int i = 0; i < 12; ++i) identity[static_cast<std::size_t>(i)] = i;
  EXPECT_EQ(as_vector(plan.sorted_scattered_idxs()), identity);
  EXPECT_EQ(as_vector(plan.expert_offsets()), (std::vector<std::int64_t>{0, 12, 12}));
}

TEST(RoutingPlan, MatchesFloat64ReferenceOnAwkwardRoutingsFromI32AndI64) {
  for (const Routing& r : awkward_routings(101)) {
    for (DType dt : {DType::kInt32, DType::kInt64}) {
      SCOPED_TRACE(r.name + "/" + dtype_name(dt));
      expect_plan(check::build_host_plan(r.idx, r.tokens, r.k, r.experts, dt), r.ref);
    }
  }
}

TEST(RoutingPlan, LargerRandomRoutingsAgainstReference) {
  std::mt19937_64 rng(5);
  for (int k : {1, 2, 4, 8}) {
    const int experts = 64;
    const auto idx = check::draw_routing(rng, 300, k, experts);
    SCOPED_TRACE("k = " + std::to_string(k));
    expect_plan(check::build_host_plan(idx, 300, k, experts), check::reference_plan(idx, experts));
  }
}

TEST(RoutingPlan, KEqualToNumberOfExperts) {
  std::mt19937_64 rng(6);
  const auto idx = check::draw_routing(rng, 5, 3, 3);
  expect_plan(check::build_host_plan(idx, 5, 3, 3), check::reference_plan(idx, 3));
}

TEST(RoutingPlan, NoTokensGivesZeroOffsetsAndDoesNotThrow) {
  HostPlan plan(0, 3);
  plan.poison();
  const HostTensor idx(DType::kInt64, {0, 2});
  Scratch scratch(routing_plan_workspace_size(0, 2, 3, Device::cpu()));
  EXPECT_NO_THROW(build_routing_plan(idx.view(), 3, plan.plan(), scratch.context()));
  EXPECT_EQ(as_vector(plan.expert_offsets()), (std::vector<std::int64_t>{0, 0, 0}));
}

TEST(RoutingPlan, NoTokensWithNullDataIsValid) {
  HostPlan plan(0, 2);
  const TensorView idx = TensorView::contiguous(nullptr, DType::kInt32, {0, 1});
  const RoutingPlan p{TensorView::contiguous(nullptr, DType::kInt64, {0}),
                      TensorView::contiguous(nullptr, DType::kInt64, {0}),
                      plan.plan().expert_offsets};
  Scratch scratch(routing_plan_workspace_size(0, 1, 2, Device::cpu()));
  EXPECT_NO_THROW(build_routing_plan(idx, 2, p, scratch.context()));
  EXPECT_EQ(as_vector(plan.expert_offsets()), (std::vector<std::int64_t>{0, 0}));
}

TEST(RoutingPlan, NonContiguousExpertIdsAndPlanViews) {
  // expert_idxs as the transposed view of a (k, T) buffer; plan outputs with stride 2.
  const std::int64_t T = 6;
  const int k = 2;
  const int E = 4;
  std::mt19937_64 rng(9);
  const auto idx = check::draw_routing(rng, T, k, E);
  HostTensor storage(DType::kInt32, {k, T});
  const TensorView ids = storage.view().transposed(0, 1);
  for (std::int64_t p = 0; p < T * k; ++p) {
    const std::int64_t index[2] = {p / k, p % k};
    check::write_element(ids, index, static_cast<double>(idx[static_cast<std::size_t>(p)]));
  }
  std::vector<std::int64_t> se(2 * T * k, -7), ss(2 * T * k, -7), off(2 * E, -7);
  const RoutingPlan plan{TensorView(se.data(), DType::kInt64, {T * k}, {2}),
                         TensorView(ss.data(), DType::kInt64, {T * k}, {2}),
                         TensorView(off.data(), DType::kInt64, {E}, {2})};
  Scratch scratch(routing_plan_workspace_size(T, k, E, Device::cpu()));
  build_routing_plan(ids, E, plan, scratch.context());
  const Plan64 want = check::reference_plan(idx, E);
  for (std::size_t i = 0; i < static_cast<std::size_t>(T * k); ++i) {
    EXPECT_EQ(se[2 * i], want.sorted_expert_idxs[i]);
    EXPECT_EQ(ss[2 * i], want.sorted_scattered_idxs[i]);
    EXPECT_EQ(se[2 * i + 1], -7) << "gap written at " << 2 * i + 1;
    EXPECT_EQ(ss[2 * i + 1], -7) << "gap written at " << 2 * i + 1;
  }
  for (std::size_t e = 0; e < static_cast<std::size_t>(E); ++e) {
    EXPECT_EQ(off[2 * e], want.expert_offsets[e]);
    EXPECT_EQ(off[2 * e + 1], -7);
  }
}

TEST(RoutingPlan, DeterministicRerunsAndPoisonOverwritten) {
  std::mt19937_64 rng(10);
  const auto idx = check::draw_routing(rng, 50, 2, 8);
  const HostPlan a = check::build_host_plan(idx, 50, 2, 8);  // outputs poisoned before the call
  const HostPlan b = check::build_host_plan(idx, 50, 2, 8);
  EXPECT_TRUE(a.sorted_expert_idxs().same_bytes(b.sorted_expert_idxs()));
  EXPECT_TRUE(a.sorted_scattered_idxs().same_bytes(b.sorted_scattered_idxs()));
  EXPECT_TRUE(a.expert_offsets().same_bytes(b.expert_offsets()));
  expect_plan(a, check::reference_plan(idx, 8));
}

TEST(RoutingPlan, WorkspaceSizeIsAvailableForEveryShape) {
  EXPECT_NO_THROW(routing_plan_workspace_size(0, 1, 1, Device::cpu()));
  EXPECT_NO_THROW(routing_plan_workspace_size(1 << 20, 8, 256, Device::cpu()));
}

}  // namespace
}  // namespace scattermoe::testing
