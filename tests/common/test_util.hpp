// Shared helpers of the GoogleTest suites: routings for the awkward cases, comparisons against
// the float64 oracle (exact and with tolerance), error-message matching and finite differences.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "check/host_tensor.hpp"
#include "check/reference_f64.hpp"
#include "common/contains.hpp"
#include "scattermoe/scattermoe.hpp"

namespace scattermoe::testing {

using check::HostPlan;
using check::HostTensor;
using check::Matrix;
using check::Plan64;
using check::Scratch;

inline const char* short_name(DType dtype) { return dtype_name(dtype); }

// ---- routings ------------------------------------------------------------------------------

struct Routing {
  std::string name;
  std::int64_t tokens = 0;
  int k = 1;
  int experts = 1;
  std::vector<std::int64_t> idx;  // (T*k) token-major
  HostPlan host;
  Plan64 ref;

  std::int64_t rows() const { return tokens * k; }
  RoutingPlan plan() const { return host.plan(); }
};

inline Routing make_routing(std::string name, std::vector<std::int64_t> idx, std::int64_t tokens,
                            int k, int experts) {
  Routing r;
  r.name = std::move(name);
  r.tokens = tokens;
  r.k = k;
  r.experts = experts;
  r.idx = std::move(idx);
  r.host = check::build_host_plan(r.idx, tokens, k, experts);
  r.ref = check::reference_plan(r.idx, experts);
  return r;
}

// The awkward cases of the house style: an empty expert, one expert taking every token, T = 1,
// k = 1, k = 4, and (when with_empty) T = 0.
inline std::vector<Routing> awkward_routings(std::uint64_t seed, bool with_empty = true) {
  std::mt19937_64 rng(seed);
  std::vector<Routing> rs;
  rs.push_back(
      make_routing("mixed-k2-empty-expert", check::draw_routing(rng, 11, 2, 5, 2), 11, 2, 5));
  rs.push_back(make_routing("one-expert-takes-all-k1", std::vector<std::int64_t>(9, 3), 9, 1, 4));
  {
    std::vector<std::int64_t> idx;  // expert 0 in every token, the second choice rotates
    for (int t = 0; t < 8; ++t) {
      idx.push_back(0);
      idx.push_back(1 + t % 3);
    }
    rs.push_back(make_routing("expert0-in-every-token-k2", idx, 8, 2, 4));
  }
  rs.push_back(make_routing("single-token-k2", check::draw_routing(rng, 1, 2, 3), 1, 2, 3));
  rs.push_back(make_routing("k1", check::draw_routing(rng, 10, 1, 3), 10, 1, 3));
  rs.push_back(make_routing("k4", check::draw_routing(rng, 7, 4, 6), 7, 4, 6));
  if (with_empty) rs.push_back(make_routing("no-tokens", {}, 0, 2, 3));
  return rs;
}

// ---- reading and comparing -----------------------------------------------------------------

// E matrices a x b stacked into (E*a, b).
inline Matrix stack(const std::vector<Matrix>& ms) {
  Matrix s;
  for (const Matrix& m : ms) {
    s.cols = m.cols;
    s.rows += m.rows;
    s.v.insert(s.v.end(), m.v.begin(), m.v.end());
  }
  return s;
}

inline Matrix read(const TensorView& v) {
  return v.rank() == 3 ? stack(check::to_matrices(v)) : check::to_matrix(v);
}

inline std::string fmt(double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}

// Bitwise: every element equals the oracle's value rounded to `dtype` (NaN never equals).
inline ::testing::AssertionResult exactly_equal(const Matrix& got, const Matrix& want,
                                                DType dtype) {
  if (got.v.empty() && want.v.empty()) return ::testing::AssertionSuccess();
  if (got.rows != want.rows || got.cols != want.cols) {
    return ::testing::AssertionFailure()
           << "shape (" << got.rows << ", " << got.cols << ") vs oracle (" << want.rows << ", "
           << want.cols << ")";
  }
  for (std::size_t n = 0; n < got.v.size(); ++n) {
    const double expected = check::round_to(dtype, want.v[n]);
    if (!(got.v[n] == expected)) {
      const std::int64_t cols = std::max<std::int64_t>(got.cols, 1);
      return ::testing::AssertionFailure()
             << "element [" << static_cast<std::int64_t>(n) / cols << ", "
             << static_cast<std::int64_t>(n) % cols << "] is " << fmt(got.v[n])
             << "; expected exactly " << fmt(expected);
    }
  }
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult exactly_equal(const TensorView& got, const Matrix& want) {
  return exactly_equal(read(got), want, got.dtype());
}

inline ::testing::AssertionResult close_to(const Matrix& got, const Matrix& want,
                                           double tolerance) {
  if (got.v.empty() && want.v.empty()) return ::testing::AssertionSuccess();
  const double err = check::relative_error(got, want);
  if (err <= tolerance) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "relative error " << fmt(err) << " above " << fmt(tolerance);
}

inline ::testing::AssertionResult close_to(const TensorView& got, const Matrix& want) {
  return close_to(read(got), want, check::tolerance_for(got.dtype()));
}

// Every small integer the exact tests produce must stay exact in bf16.
inline bool fits_exactly(const Matrix& m, double limit = 256.0) {
  for (double v : m.v) {
    if (!(std::fabs(v) <= limit) || v != std::nearbyint(v)) return false;
  }
  return true;
}

// ---- errors --------------------------------------------------------------------------------

// The message of the InvalidArgument that f throws, or a description of what happened instead.
template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<threw another exception: ") + e.what() + ">";
  }
  return "<did not throw>";
}

// Throws InvalidArgument, and the message has the form "<op>: argument '<arg>' is ...".
#define SCATTERMOE_EXPECT_INVALID_ARGUMENT(statement, op, arg)                                    \
  do {                                                                                            \
    EXPECT_THROW(statement, ::scattermoe::InvalidArgument);                                       \
    EXPECT_TRUE(                                                                                  \
        ::scattermoe::testing::contains(::scattermoe::testing::error_message([&] { statement; }), \
                                        std::string(op) + ": argument '" + (arg) + "' is "));     \
  } while (0)

// ---- finite differences --------------------------------------------------------------------

// Central differences of loss() with respect to every element of the host view `param`
// (perturbed in place by +-eps in its storage dtype and restored). The step actually taken is
// read back from storage, so rounding of the stored value does not bias the quotient.
inline Matrix finite_difference(const TensorView& param, double eps,
                                const std::function<double()>& loss) {
  Matrix fd = read(param);
  std::size_t n = 0;
  check::for_each_index(param, [&](const std::int64_t* index) {
    const double v = check::read_element(param, index);
    check::write_element(param, index, v + eps);
    const double up_value = check::read_element(param, index);
    const double up = loss();
    check::write_element(param, index, v - eps);
    const double down_value = check::read_element(param, index);
    const double down = loss();
    check::write_element(param, index, v);
    fd.v[n++] = (up - down) / (up_value - down_value);
  });
  return fd;
}

// Central differences of loss() with respect to every element of a float64 matrix.
inline Matrix finite_difference(Matrix& m, double eps, const std::function<double()>& loss) {
  Matrix fd(m.rows, m.cols);
  for (std::size_t n = 0; n < m.v.size(); ++n) {
    const double v = m.v[n];
    m.v[n] = v + eps;
    const double up = loss();
    m.v[n] = v - eps;
    const double down = loss();
    m.v[n] = v;
    fd.v[n] = (up - down) / (2 * eps);
  }
  return fd;
}

inline Matrix finite_difference(std::vector<Matrix>& ms, double eps,
                                const std::function<double()>& loss) {
  std::vector<Matrix> parts;
  for (Matrix& m : ms) parts.push_back(finite_difference(m, eps, loss));
  return stack(parts);
}

// sum(out * r) in double.
inline double weighted_sum(const Matrix& out, const Matrix& r) {
  double s = 0.0;
  for (std::size_t n = 0; n < out.v.size(); ++n) s += out.v[n] * r.v[n];
  return s;
}

}  // namespace scattermoe::testing
