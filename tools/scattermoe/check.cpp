#include "check.hpp"

#include <algorithm>
#include <cstdio>

#include "check/suite.hpp"
#include "common.hpp"
#include "scattermoe/build_info.hpp"

namespace scattermoe::tools {

int run_check(const CheckOptions& options) {
  check::SuiteOptions suite;
  suite.device = parse_device_option(options.device);
  if (!options.dtype.empty()) {
    if (options.dtype != "bf16" && options.dtype != "f16" && options.dtype != "f32") {
      throw UsageError("--dtype: expected bf16, f16 or f32, got '" + options.dtype + "'");
    }
    suite.dtypes = {parse_dtype(options.dtype)};
  }
  suite.seed = options.seed;

  std::printf("scattermoe %s check on %s, seed %llu\n", build_info().version.c_str(),
              device_name(suite.device).c_str(), static_cast<unsigned long long>(suite.seed));
  const std::vector<check::CheckResult> results = check::run_suite(suite);
  int width = 0;
  for (const check::CheckResult& r : results) width = std::max(width, static_cast<int>(r.name.size()));
  int passed = 0, failed = 0;
  for (const check::CheckResult& r : results) {
    (r.passed ? passed : failed) += 1;
    std::printf("%s  %-*s  error %.3g (tolerance %.3g)%s%s\n", r.passed ? "PASS" : "FAIL", width,
                r.name.c_str(), r.error, r.tolerance, r.detail.empty() ? "" : ": ",
                r.detail.c_str());
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

}  // namespace scattermoe::tools
