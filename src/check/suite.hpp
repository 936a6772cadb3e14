// The correctness suite behind `scattermoe check`: every op and module on a device against the
// float64 oracle on random inputs and exactly on small-integer inputs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "scattermoe/modules.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::check {

struct CheckResult {
  std::string name;       // "scatter2scatter/bf16/scattered->grouped/bias"
  bool passed = false;
  double error = 0.0;     // relative error against the oracle (0 for exact checks that pass)
  double tolerance = 0.0;
  std::string detail;     // why it failed, empty when passed
};

struct SuiteOptions {
  Device device = Device::cpu();
  std::vector<DType> dtypes = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  std::uint64_t seed = 1234;
};

std::vector<CheckResult> run_suite(const SuiteOptions& options);

// Compares the first `num_rows` rows of a GLU/MLP forward output (host views) against the
// float64 oracle computed from the same host inputs and expert_idxs (T, k).
struct SliceCheck {
  double error = 0.0;
  double tolerance = 0.0;
  bool passed = false;
};
SliceCheck check_mlp_forward_rows(const MlpArgs& args, const TensorView& expert_idxs,
                                  const TensorView& out, std::int64_t num_rows);

}  // namespace scattermoe::check
