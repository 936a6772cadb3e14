// The correctness suite behind `scattermoe check`, run on the CPU backend, and the row-slice
// MLP check used by the benchmark.
#include "scattermoe/build_info.hpp"
#include "check/suite.hpp"
#include "common/test_util.hpp"

namespace scattermoe::testing {
namespace {

TEST(CorrectnessSuite, EveryCheckPassesOnCpu) {
  const std::vector<check::CheckResult> results = check::run_suite(check::SuiteOptions{});
  ASSERT_GT(results.size(), 100u);
  int exact = 0, random = 0;
  for (const check::CheckResult& r : results) {
    EXPECT_TRUE(r.passed) << r.name << ": " << r.detail;
    EXPECT_FALSE(r.name.empty());
    if (r.name.find("/exact") != std::string::npos) ++exact;
    if (r.name.find("/random") != std::string::npos) ++random;
  }
  EXPECT_GT(exact, 50);
  EXPECT_GT(random, 50);
}

TEST(CorrectnessSuite, NamesAreUniqueAndCoverEveryOpAndDtype) {
  const std::vector<check::CheckResult> results = check::run_suite(check::SuiteOptions{});
  std::set<std::string> names;
  for (const check::CheckResult& r : results) EXPECT_TRUE(names.insert(r.name).second) << r.name;
  for (const char* op :
       {"plan/", "scatter2scatter/", "group/", "group_xty/", "parallel_linear_forward/",
        "parallel_linear_backward/", "mlp_forward/", "mlp_backward/"}) {
    for (const char* dt : {"f32/", "bf16/", "f16/"}) {
      const std::string prefix = std::string(op) + (std::string(op) == "plan/" ? "" : dt);
      const bool found =
          std::any_of(results.begin(), results.end(),
                      [&](const check::CheckResult& r) { return r.name.rfind(prefix, 0) == 0; });
      EXPECT_TRUE(found) << prefix;
    }
  }
}

TEST(CorrectnessSuite, SameSeedSameResults) {
  check::SuiteOptions options;
  options.dtypes = {DType::kBFloat16};
  options.seed = 99;
  const auto a = check::run_suite(options);
  const auto b = check::run_suite(options);
  ASSERT_EQ(a.size(), b.size());
  for (std::size_t n = 0; n < a.size(); ++n) {
    EXPECT_EQ(a[n].name, b[n].name);
    EXPECT_EQ(a[n].error, b[n].error) << a[n].name;
  }
}

// Without a CUDA backend or a GPU the suite refuses a CUDA device; with both it runs there
// (tests/cuda covers that case in depth).
TEST(CorrectnessSuite, CudaDeviceRunsOnlyWhereABackendAndAGpuExist) {
  check::SuiteOptions options;
  options.device = Device::cuda(0);
  bool gpu = false;
  for (const DeviceInfo& d : list_devices()) gpu = gpu || d.device.type == DeviceType::kCUDA;
  if (!build_info().cuda_backend || !gpu) {
    EXPECT_THROW(check::run_suite(options), Unsupported);
    return;
  }
  options.dtypes = {DType::kBFloat16};
  for (const check::CheckResult& r : check::run_suite(options)) EXPECT_TRUE(r.passed) << r.name << ": " << r.detail;
}

TEST(CorrectnessSuite, RejectsIntegerDtypes) {
  check::SuiteOptions options;
  options.dtypes = {DType::kInt32};
  EXPECT_THROW(check::run_suite(options), InvalidArgument);
}

// A GLU MLP forward through the library, for the slice check.
struct SliceProblem {
  Routing routing;
  HostTensor x, w1, b1, w2, b2, gates, out, hidden, ids;
  MlpArgs args;
};

SliceProblem make_slice_problem(DType dt, bool glu, std::int64_t tokens = 40) {
  std::mt19937_64 rng(123);
  SliceProblem p;
  const int k = 2, experts = 6;
  const std::int64_t d = 24, h = 20, h1 = glu ? 2 * h : h;
  const auto idx = check::draw_routing(rng, tokens, k, experts);
  p.routing = make_routing("slice", idx, tokens, k, experts);
  p.ids = check::make_expert_idxs(idx, tokens, k, DType::kInt32);
  p.x = HostTensor(dt, {tokens, d});
  p.w1 = HostTensor(dt, {experts, d, h1}, true);
  p.b1 = HostTensor(dt, {experts, h1});
  p.w2 = HostTensor(dt, {experts, h, d}, true);
  p.b2 = HostTensor(dt, {experts, d});
  p.gates = HostTensor(DType::kFloat32, {tokens, k});
  check::fill_normal(p.x.view(), rng);
  check::fill_normal(p.w1.view(), rng, 0.2);
  check::fill_normal(p.w2.view(), rng, 0.2);
  check::fill_normal(p.b1.view(), rng, 0.1);
  check::fill_normal(p.b2.view(), rng, 0.1);
  check::fill_normal(p.gates.view(), rng, 0.5);
  p.out = HostTensor(dt, {tokens, d});
  p.hidden = HostTensor(dt, {tokens * k, h1});
  p.args.x = p.x.view();
  p.args.w1 = p.w1.view();
  p.args.b1 = p.b1.view();
  p.args.w2 = p.w2.view();
  p.args.b2 = p.b2.view();
  p.args.gates = p.gates.view();
  p.args.activation = Activation::kSilu;
  p.args.glu = glu;
  Scratch scratch(mlp_forward_workspace_size(p.args, p.routing.plan()));
  mlp_forward(p.args, p.routing.plan(), p.out.view(), p.hidden.view(), scratch.context());
  return p;
}

TEST(MlpRowSliceCheck, PassesOnLibraryOutput) {
  for (DType dt : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    for (bool glu : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (glu ? "/glu" : "/mlp"));
      const SliceProblem p = make_slice_problem(dt, glu);
      for (std::int64_t rows : {std::int64_t{1}, std::int64_t{7}, std::int64_t{40}}) {
        const check::SliceCheck c =
            check::check_mlp_forward_rows(p.args, p.ids.view(), p.out.view(), rows);
        EXPECT_TRUE(c.passed) << rows << " rows: error " << c.error << " tolerance " << c.tolerance;
        EXPECT_EQ(c.tolerance, check::tolerance_for(dt));
      }
    }
  }
}

TEST(MlpRowSliceCheck, AgreesWithTheFullOracle) {
  // The token-by-token slice oracle and reference_mlp compute the same function: feed the
  // full oracle's output (rounded to f32) and expect an error near f32 rounding.
  SliceProblem p = make_slice_problem(DType::kFloat32, true);
  const check::ReferenceMlp full =
      check::reference_mlp(read(p.x.view()), check::to_matrices(p.w1.view()), read(p.b1.view()),
                           check::to_matrices(p.w2.view()), read(p.b2.view()), read(p.gates.view()),
                           p.routing.ref, Activation::kSilu, true, nullptr);
  check::for_each_index(p.out.view(), [&](const std::int64_t* i) {
    check::write_element(p.out.view(), i, full.out(i[0], i[1]));
  });
  const check::SliceCheck c = check::check_mlp_forward_rows(p.args, p.ids.view(), p.out.view(), 40);
  EXPECT_LT(c.error, 1e-7);
}

TEST(MlpRowSliceCheck, OnlyTheRequestedRowsMatter) {
  SliceProblem p = make_slice_problem(DType::kBFloat16, true);
  // Rows past the slice are garbage: the check must not look at them.
  const TensorView tail = p.out.view().narrowed(0, 10, 40);
  check::for_each_index(tail, [&](const std::int64_t* i) { check::write_element(tail, i, NAN); });
  EXPECT_TRUE(check::check_mlp_forward_rows(p.args, p.ids.view(), p.out.view(), 10).passed);
  EXPECT_FALSE(check::check_mlp_forward_rows(p.args, p.ids.view(), p.out.view(), 11).passed);
  EXPECT_TRUE(check::check_mlp_forward_rows(p.args, p.ids.view(), p.out.view(), 0).passed);
}

TEST(MlpRowSliceCheck, DetectsAWrongRow) {
  SliceProblem p = make_slice_problem(DType::kFloat32, false);
  const std::int64_t index[2] = {3, 5};
  check::write_element(p.out.view(), index, check::read_element(p.out.view(), index) + 1.0);
  const check::SliceCheck c = check::check_mlp_forward_rows(p.args, p.ids.view(), p.out.view(), 8);
  EXPECT_FALSE(c.passed);
  EXPECT_GT(c.error, c.tolerance);
}

TEST(MlpRowSliceCheck, RejectsBadArguments) {
  const SliceProblem p = make_slice_problem(DType::kFloat32, false, 4);
  EXPECT_THROW(check::check_mlp_forward_rows(p.args, p.ids.view(), p.out.view(), 5),
               InvalidArgument);
  EXPECT_THROW(check::check_mlp_forward_rows(p.args, p.ids.view(), p.out.view(), -1),
               InvalidArgument);
  const HostTensor bad_ids = check::make_expert_idxs({0, 1, 2, 9, 0, 1, 2, 3}, 4, 2);
  EXPECT_THROW(check::check_mlp_forward_rows(p.args, bad_ids.view(), p.out.view(), 4),
               InvalidArgument);
}

}  // namespace
}  // namespace scattermoe::testing
