#include "check/reference_f64.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "core/half.hpp"
#include "scattermoe/error.hpp"

namespace scattermoe::check {
namespace {

constexpr double kPi = 3.14159265358979323846;

void require(bool ok, const char* what) {
  if (!ok) throw InvalidArgument(std::string("reference_f64: ") + what);
}

double read_at(const TensorView& v, std::int64_t offset) {
  const char* base = static_cast<const char*>(v.data());
  switch (v.dtype()) {
    case DType::kFloat32: {
      float f;
      std::memcpy(&f, base + offset * 4, 4);
      return f;
    }
    case DType::kFloat16: {
      std::uint16_t h;
      std::memcpy(&h, base + offset * 2, 2);
      return detail::f16_to_float(h);
    }
    case DType::kBFloat16: {
      std::uint16_t h;
      std::memcpy(&h, base + offset * 2, 2);
      return detail::bf16_to_float(h);
    }
    case DType::kInt32: {
      std::int32_t i;
      std::memcpy(&i, base + offset * 4, 4);
      return static_cast<double>(i);
    }
    case DType::kInt64: {
      std::int64_t i;
      std::memcpy(&i, base + offset * 8, 8);
      return static_cast<double>(i);
    }
  }
  return 0.0;
}

void require_host(const TensorView& v) {
  require(v.defined(), "undefined view");
  require(v.device().type == DeviceType::kCPU, "the oracle reads host views only");
  require(v.numel() == 0 || v.data() != nullptr, "null data with elements");
}

// Index of (e, row) in the grouped order helpers.
std::int64_t expert_begin(const Plan64& plan, std::int64_t e) {
  return e == 0 ? 0 : plan.expert_offsets[static_cast<std::size_t>(e - 1)];
}

// Row `r` of `m` times matrix `w` (r_cols == w.rows) -> accumulated into `dst` row `dr`.
void add_row_times(const Matrix& m, std::int64_t r, const Matrix& w, Matrix& dst, std::int64_t dr) {
  for (std::int64_t c = 0; c < w.cols; ++c) {
    double acc = 0.0;
    for (std::int64_t q = 0; q < w.rows; ++q) acc += m(r, q) * w(q, c);
    dst(dr, c) += acc;
  }
}

// Row `r` of `m` times the transpose of `w` (m.cols == w.cols) -> accumulated into `dst` row dr.
void add_row_times_t(const Matrix& m, std::int64_t r, const Matrix& w, Matrix& dst,
                     std::int64_t dr) {
  for (std::int64_t q = 0; q < w.rows; ++q) {
    double acc = 0.0;
    for (std::int64_t c = 0; c < w.cols; ++c) acc += m(r, c) * w(q, c);
    dst(dr, q) += acc;
  }
}

double row_dot(const Matrix& a, std::int64_t ra, const Matrix& b, std::int64_t rb) {
  double acc = 0.0;
  for (std::int64_t c = 0; c < a.cols; ++c) acc += a(ra, c) * b(rb, c);
  return acc;
}

std::vector<Matrix> zeros_like(const std::vector<Matrix>& w) {
  std::vector<Matrix> z;
  z.reserve(w.size());
  for (const Matrix& m : w) z.emplace_back(m.rows, m.cols);
  return z;
}

}  // namespace

double read_element(const TensorView& v, const std::int64_t* index) {
  std::int64_t offset = 0;
  for (int d = 0; d < v.rank(); ++d) offset += index[d] * v.stride(d);
  return read_at(v, offset);
}

double round_to(DType dtype, double value) {
  const float f = static_cast<float>(value);
  switch (dtype) {
    case DType::kFloat32:
      return f;
    case DType::kFloat16:
      return detail::f16_to_float(detail::float_to_f16(f));
    case DType::kBFloat16:
      return detail::bf16_to_float(detail::float_to_bf16(f));
    case DType::kInt32:
    case DType::kInt64:
      return std::nearbyint(value);
  }
  return value;
}

Matrix to_matrix(const TensorView& v) {
  require_host(v);
  require(v.rank() == 1 || v.rank() == 2, "to_matrix needs a rank-1 or rank-2 view");
  const std::int64_t rows = v.size(0);
  const std::int64_t cols = v.rank() == 2 ? v.size(1) : 1;
  const std::int64_t s0 = v.stride(0);
  const std::int64_t s1 = v.rank() == 2 ? v.stride(1) : 0;
  Matrix m(rows, cols);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) m(r, c) = read_at(v, r * s0 + c * s1);
  }
  return m;
}

std::vector<Matrix> to_matrices(const TensorView& v) {
  require_host(v);
  require(v.rank() == 3, "to_matrices needs a rank-3 view");
  std::vector<Matrix> out;
  out.reserve(static_cast<std::size_t>(v.size(0)));
  for (std::int64_t e = 0; e < v.size(0); ++e) {
    Matrix m(v.size(1), v.size(2));
    for (std::int64_t r = 0; r < m.rows; ++r) {
      for (std::int64_t c = 0; c < m.cols; ++c) {
        m(r, c) = read_at(v, e * v.stride(0) + r * v.stride(1) + c * v.stride(2));
      }
    }
    out.push_back(std::move(m));
  }
  return out;
}

Plan64 reference_plan(const std::vector<std::int64_t>& expert_idxs, int num_experts) {
  const std::int64_t rows = static_cast<std::int64_t>(expert_idxs.size());
  Plan64 plan;
  plan.expert_offsets.assign(static_cast<std::size_t>(num_experts), 0);
  // Counting sort: walking the flat positions in ascending order for each expert keeps the
  // order stable (ties by ascending p).
  for (int e = 0; e < num_experts; ++e) {
    for (std::int64_t p = 0; p < rows; ++p) {
      if (expert_idxs[static_cast<std::size_t>(p)] == e) {
        plan.sorted_expert_idxs.push_back(e);
        plan.sorted_scattered_idxs.push_back(p);
      }
    }
    plan.expert_offsets[static_cast<std::size_t>(e)] =
        static_cast<std::int64_t>(plan.sorted_expert_idxs.size());
  }
  require(static_cast<std::int64_t>(plan.sorted_expert_idxs.size()) == rows,
          "reference_plan: an expert index outside [0, num_experts)");
  return plan;
}

Matrix reference_scatter2scatter(const Matrix& x, const std::vector<Matrix>& w, const Matrix& bias,
                                 const Plan64& plan, int k, bool x_grouped, bool y_grouped) {
  const std::int64_t rows = static_cast<std::int64_t>(plan.sorted_expert_idxs.size());
  const std::int64_t d_out = w.empty() ? 0 : w[0].cols;
  Matrix y(rows, d_out);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t p = plan.sorted_scattered_idxs[static_cast<std::size_t>(i)];
    const std::int64_t e = plan.sorted_expert_idxs[static_cast<std::size_t>(i)];
    const std::int64_t xr = x_grouped ? i : p / k;
    const std::int64_t yr = y_grouped ? i : p;
    add_row_times(x, xr, w[static_cast<std::size_t>(e)], y, yr);
    if (bias.rows > 0) {
      for (std::int64_t c = 0; c < d_out; ++c) y(yr, c) += bias(e, c);
    }
  }
  return y;
}

Matrix reference_group(const Matrix& a, const Plan64& plan, int fan_out,
                       const std::vector<double>& coeff) {
  const std::int64_t rows = static_cast<std::int64_t>(plan.sorted_expert_idxs.size());
  Matrix g(rows, a.cols);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t p = plan.sorted_scattered_idxs[static_cast<std::size_t>(i)];
    const double scale = coeff.empty() ? 1.0 : coeff[static_cast<std::size_t>(p)];
    for (std::int64_t c = 0; c < a.cols; ++c) g(i, c) = a(p / fan_out, c) * scale;
  }
  return g;
}

void reference_group_xty(const Matrix& dy, const Matrix& x, const Plan64& plan, int num_experts,
                         std::vector<Matrix>* dw, Matrix* db) {
  if (dw) {
    dw->assign(static_cast<std::size_t>(num_experts), Matrix(x.cols, dy.cols));
  }
  if (db) *db = Matrix(num_experts, dy.cols);
  for (std::int64_t e = 0; e < num_experts; ++e) {
    for (std::int64_t i = expert_begin(plan, e);
         i < plan.expert_offsets[static_cast<std::size_t>(e)]; ++i) {
      if (dw) {
        Matrix& m = (*dw)[static_cast<std::size_t>(e)];
        for (std::int64_t a = 0; a < x.cols; ++a) {
          for (std::int64_t b = 0; b < dy.cols; ++b) m(a, b) += x(i, a) * dy(i, b);
        }
      }
      if (db) {
        for (std::int64_t b = 0; b < dy.cols; ++b) (*db)(e, b) += dy(i, b);
      }
    }
  }
}

double reference_activation(Activation act, double x) {
  switch (act) {
    case Activation::kGelu:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case Activation::kGeluTanh: {
      const double c = std::sqrt(2.0 / kPi);
      return 0.5 * x * (1.0 + std::tanh(c * (x + 0.044715 * x * x * x)));
    }
    case Activation::kSilu:
      return x / (1.0 + std::exp(-x));
    case Activation::kRelu:
      return x > 0.0 ? x : 0.0;
  }
  return x;
}

double reference_activation_grad(Activation act, double x) {
  switch (act) {
    case Activation::kGelu: {
      // d/dx x * Phi(x) = Phi(x) + x * phi(x)
      const double cdf = 0.5 * (1.0 + std::erf(x / std::sqrt(2.0)));
      const double pdf = std::exp(-0.5 * x * x) / std::sqrt(2.0 * kPi);
      return cdf + x * pdf;
    }
    case Activation::kGeluTanh: {
      const double c = std::sqrt(2.0 / kPi);
      const double u = c * (x + 0.044715 * x * x * x);
      const double th = std::tanh(u);
      const double du = c * (1.0 + 3.0 * 0.044715 * x * x);
      return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du;
    }
    case Activation::kSilu: {
      const double s = 1.0 / (1.0 + std::exp(-x));
      return s * (1.0 + x * (1.0 - s));
    }
    case Activation::kRelu:
      return x > 0.0 ? 1.0 : 0.0;
  }
  return 1.0;
}

ReferenceLinear reference_parallel_linear(const Matrix& x, const std::vector<Matrix>& w,
                                          const Matrix& bias, const Matrix& gates,
                                          const Plan64& plan, int k, bool grouped_in,
                                          bool grouped_out, const Matrix* d_out) {
  const std::int64_t rows = static_cast<std::int64_t>(plan.sorted_expert_idxs.size());
  const std::int64_t num_experts = static_cast<std::int64_t>(w.size());
  const bool gated = gates.rows > 0;
  require(!(gated && grouped_out), "gates need a scattered output");
  const std::int64_t kg = gated ? gates.cols : 1;
  const std::int64_t d_out_cols = w.empty() ? 0 : w[0].cols;

  ReferenceLinear r;
  const Matrix y = reference_scatter2scatter(x, w, bias, plan, k, grouped_in, grouped_out);
  if (gated) {
    r.out = Matrix(gates.rows, d_out_cols);
    for (std::int64_t t = 0; t < gates.rows; ++t) {
      for (std::int64_t j = 0; j < kg; ++j) {
        for (std::int64_t c = 0; c < d_out_cols; ++c) r.out(t, c) += gates(t, j) * y(t * kg + j, c);
      }
    }
  } else {
    r.out = y;
  }
  if (!d_out) return r;

  // d_gates[t, j] = <Y[t*kg + j], dOut[t]>  (Y includes the bias)
  if (gated) {
    r.d_gates = Matrix(gates.rows, kg);
    for (std::int64_t t = 0; t < gates.rows; ++t) {
      for (std::int64_t j = 0; j < kg; ++j) r.d_gates(t, j) = row_dot(y, t * kg + j, *d_out, t);
    }
  }
  // dY in grouped order, and X in grouped order.
  Matrix dy(rows, d_out_cols);
  Matrix xg(rows, x.cols);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t p = plan.sorted_scattered_idxs[static_cast<std::size_t>(i)];
    for (std::int64_t c = 0; c < d_out_cols; ++c) {
      if (gated) {
        dy(i, c) = (*d_out)(p / kg, c) * gates(p / kg, p % kg);
      } else {
        dy(i, c) = (*d_out)(grouped_out ? i : p, c);
      }
    }
    const std::int64_t xr = grouped_in ? i : p / k;
    for (std::int64_t c = 0; c < x.cols; ++c) xg(i, c) = x(xr, c);
  }
  reference_group_xty(dy, xg, plan, static_cast<int>(num_experts), &r.dw, &r.db);
  if (bias.rows == 0) r.db = Matrix();
  // dX: row i of dY times W[e]^T, into row i (grouped input) or summed into row p / k.
  r.dx = Matrix(x.rows, x.cols);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t p = plan.sorted_scattered_idxs[static_cast<std::size_t>(i)];
    const std::int64_t e = plan.sorted_expert_idxs[static_cast<std::size_t>(i)];
    add_row_times_t(dy, i, w[static_cast<std::size_t>(e)], r.dx, grouped_in ? i : p / k);
  }
  return r;
}

ReferenceMlp reference_mlp(const Matrix& x, const std::vector<Matrix>& w1, const Matrix& b1,
                           const std::vector<Matrix>& w2, const Matrix& b2, const Matrix& gates,
                           const Plan64& plan, Activation act, bool glu, const Matrix* d_out) {
  const std::int64_t rows = static_cast<std::int64_t>(plan.sorted_expert_idxs.size());
  const std::int64_t k = gates.cols;
  const std::int64_t d = x.cols;
  const std::int64_t h1 = w1.empty() ? 0 : w1[0].cols;  // h or 2h
  const std::int64_t h = glu ? h1 / 2 : h1;
  require(!glu || h1 % 2 == 0, "GLU needs an even hidden width");

  ReferenceMlp r;
  r.hidden = Matrix(rows, h1);
  r.act = Matrix(rows, h);
  r.y2 = Matrix(rows, d);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t p = plan.sorted_scattered_idxs[static_cast<std::size_t>(i)];
    const std::int64_t e = plan.sorted_expert_idxs[static_cast<std::size_t>(i)];
    add_row_times(x, p / k, w1[static_cast<std::size_t>(e)], r.hidden, i);
    if (b1.rows > 0) {
      for (std::int64_t c = 0; c < h1; ++c) r.hidden(i, c) += b1(e, c);
    }
    for (std::int64_t c = 0; c < h; ++c) {
      r.act(i, c) = glu ? reference_activation(act, r.hidden(i, h + c)) * r.hidden(i, c)
                        : reference_activation(act, r.hidden(i, c));
    }
    add_row_times(r.act, i, w2[static_cast<std::size_t>(e)], r.y2, i);
    if (b2.rows > 0) {
      for (std::int64_t c = 0; c < d; ++c) r.y2(i, c) += b2(e, c);
    }
  }
  r.out = Matrix(x.rows, d);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t p = plan.sorted_scattered_idxs[static_cast<std::size_t>(i)];
    const double g = gates(p / k, p % k);
    for (std::int64_t c = 0; c < d; ++c) r.out(p / k, c) += g * r.y2(i, c);
  }
  if (!d_out) return r;

  const std::int64_t num_experts = static_cast<std::int64_t>(w1.size());
  r.d_gates = Matrix(gates.rows, k);
  Matrix dz(rows, d);  // gradient of y2, grouped
  Matrix xg(rows, d);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t p = plan.sorted_scattered_idxs[static_cast<std::size_t>(i)];
    const double g = gates(p / k, p % k);
    r.d_gates(p / k, p % k) = row_dot(r.y2, i, *d_out, p / k);
    for (std::int64_t c = 0; c < d; ++c) {
      dz(i, c) = (*d_out)(p / k, c) * g;
      xg(i, c) = x(p / k, c);
    }
  }
  reference_group_xty(dz, r.act, plan, static_cast<int>(num_experts), &r.dw2, &r.db2);
  if (b2.rows == 0) r.db2 = Matrix();
  Matrix da(rows, h);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t e = plan.sorted_expert_idxs[static_cast<std::size_t>(i)];
    add_row_times_t(dz, i, w2[static_cast<std::size_t>(e)], da, i);
  }
  r.dh = Matrix(rows, h1);
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t c = 0; c < h; ++c) {
      if (glu) {
        const double up = r.hidden(i, c);
        const double gate = r.hidden(i, h + c);
        r.dh(i, c) = da(i, c) * reference_activation(act, gate);
        r.dh(i, h + c) = da(i, c) * up * reference_activation_grad(act, gate);
      } else {
        r.dh(i, c) = da(i, c) * reference_activation_grad(act, r.hidden(i, c));
      }
    }
  }
  reference_group_xty(r.dh, xg, plan, static_cast<int>(num_experts), &r.dw1, &r.db1);
  if (b1.rows == 0) r.db1 = Matrix();
  r.dx = Matrix(x.rows, d);
  for (std::int64_t i = 0; i < rows; ++i) {
    const std::int64_t p = plan.sorted_scattered_idxs[static_cast<std::size_t>(i)];
    const std::int64_t e = plan.sorted_expert_idxs[static_cast<std::size_t>(i)];
    add_row_times_t(r.dh, i, w1[static_cast<std::size_t>(e)], r.dx, p / k);
  }
  return r;
}

double relative_error(const Matrix& a, const Matrix& b) {
  if (a.rows != b.rows || a.cols != b.cols) return std::numeric_limits<double>::infinity();
  double diff = 0.0;
  double ref = 0.0;
  for (std::size_t n = 0; n < a.v.size(); ++n) {
    if (std::isnan(a.v[n]) || std::isnan(b.v[n])) return std::numeric_limits<double>::infinity();
    diff += (a.v[n] - b.v[n]) * (a.v[n] - b.v[n]);
    ref += b.v[n] * b.v[n];
  }
  if (!std::isfinite(diff)) return std::numeric_limits<double>::infinity();
  return std::sqrt(diff) / std::max(std::sqrt(ref), 1e-30);
}

double relative_error(const std::vector<Matrix>& a, const std::vector<Matrix>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  Matrix fa, fb;
  for (std::size_t e = 0; e < a.size(); ++e) {
    if (a[e].rows != b[e].rows || a[e].cols != b[e].cols) {
      return std::numeric_limits<double>::infinity();
    }
    fa.v.insert(fa.v.end(), a[e].v.begin(), a[e].v.end());
    fb.v.insert(fb.v.end(), b[e].v.begin(), b[e].v.end());
  }
  fa.rows = fb.rows = static_cast<std::int64_t>(fa.v.size());
  fa.cols = fb.cols = 1;
  return relative_error(fa, fb);
}

double tolerance_for(DType dtype) {
  // Norm-wise relative error of a result stored in `dtype`, against float64 on the same
  // (already rounded) inputs. Rounding the stored result alone costs the unit roundoff u
  // (bf16 2^-9 ~ 2e-3, f16 2^-12 ~ 2.4e-4, f32 2^-24 ~ 6e-8); the modules also store
  // intermediates (the MLP hidden, dY / dH in backward) in `dtype` and feed them into further
  // products, so errors compound through ~3 roundings and can be amplified by cancellation in
  // the dot products behind d_gates. A ~10x margin over u keeps random checks stable while
  // still catching any indexing mistake (which gives O(1) relative error):
  //   bf16 2e-2 (~10 u), f16 4e-3 (~16 u); f32 1e-5 covers fp32 accumulation over reduction
  //   lengths of a few hundred (~sqrt(n) u growth, far below) plus the compounding above.
  switch (dtype) {
    case DType::kBFloat16:
      return 2e-2;
    case DType::kFloat16:
      return 4e-3;
    case DType::kFloat32:
      return 1e-5;
    default:
      return 0.0;
  }
}

}  // namespace scattermoe::check
