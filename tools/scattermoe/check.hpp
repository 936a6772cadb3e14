// `scattermoe check`: the correctness suite against the float64 oracle.
#pragma once

#include <cstdint>
#include <string>

namespace scattermoe::tools {

struct CheckOptions {
  std::string device = "cpu";
  std::string dtype;  // empty: every float dtype (f32, bf16, f16)
  std::uint64_t seed = 1234;
};

// Prints one line per check and "N passed, M failed"; returns 0 iff every check passed.
int run_check(const CheckOptions& options);

}  // namespace scattermoe::tools
