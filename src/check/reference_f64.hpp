// The float64 oracle: the spec's semantics written on plain host vectors of doubles, kept
// apart from the library so that tests and `scattermoe check` compare against something
// computed independently of the CPU backend. Slow and obvious on purpose.
#pragma once

#include <cstdint>
#include <vector>

#include "scattermoe/modules.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::check {

// Row-major dense matrix of doubles.
struct Matrix {
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::vector<double> v;

  Matrix() = default;
  Matrix(std::int64_t r, std::int64_t c) : rows(r), cols(c), v(static_cast<std::size_t>(r * c), 0.0) {}
  double& operator()(std::int64_t r, std::int64_t c) { return v[static_cast<std::size_t>(r * cols + c)]; }
  double operator()(std::int64_t r, std::int64_t c) const { return v[static_cast<std::size_t>(r * cols + c)]; }
};

// Reads any host view of rank 1 or 2 (any dtype, any strides) as doubles; rank 1 -> (n, 1).
Matrix to_matrix(const TensorView& v);
// Reads a rank-3 host view (E, a, b) as E matrices a x b.
std::vector<Matrix> to_matrices(const TensorView& v);
// One element of a host view of any rank, dtype and strides, as a double; `index` has
// v.rank() entries.
double read_element(const TensorView& v, const std::int64_t* index);
// The double `value` rounded to `dtype` (through float for the 16-bit types, as the library
// stores an fp32 accumulator) and read back.
double round_to(DType dtype, double value);

struct Plan64 {
  std::vector<std::int64_t> sorted_expert_idxs;     // (L)
  std::vector<std::int64_t> sorted_scattered_idxs;  // (L)
  std::vector<std::int64_t> expert_offsets;         // (E)
};
// expert_idxs flattened token-major (T*k values).
Plan64 reference_plan(const std::vector<std::int64_t>& expert_idxs, int num_experts);

// The spec's ops; bias empty (rows == 0) means none, coeff empty means none.
Matrix reference_scatter2scatter(const Matrix& x, const std::vector<Matrix>& w, const Matrix& bias,
                                 const Plan64& plan, int k, bool x_grouped, bool y_grouped);
Matrix reference_group(const Matrix& a, const Plan64& plan, int fan_out,
                       const std::vector<double>& coeff);
void reference_group_xty(const Matrix& dy, const Matrix& x, const Plan64& plan, int num_experts,
                         std::vector<Matrix>* dw, Matrix* db);

double reference_activation(Activation act, double x);
double reference_activation_grad(Activation act, double x);

struct ReferenceLinear {
  Matrix out;                // forward output
  Matrix dx;                 // gradients for a given d_out (empty when not asked)
  std::vector<Matrix> dw;
  Matrix db;
  Matrix d_gates;
};
// gates: empty (rows == 0) means none.
ReferenceLinear reference_parallel_linear(const Matrix& x, const std::vector<Matrix>& w,
                                          const Matrix& bias, const Matrix& gates,
                                          const Plan64& plan, int k, bool grouped_in,
                                          bool grouped_out, const Matrix* d_out);

struct ReferenceMlp {
  Matrix out;
  Matrix hidden;  // pre-activation, grouped
  Matrix act;     // A = act(H) (or the GLU product), grouped (L, h)
  Matrix y2;      // A @ W2[e] + b2[e] before gating, grouped (L, d)
  Matrix dh;      // gradient of the loss w.r.t. hidden, grouped (empty when not asked)
  Matrix dx;
  std::vector<Matrix> dw1, dw2;
  Matrix db1, db2;
  Matrix d_gates;
};
ReferenceMlp reference_mlp(const Matrix& x, const std::vector<Matrix>& w1, const Matrix& b1,
                           const std::vector<Matrix>& w2, const Matrix& b2, const Matrix& gates,
                           const Plan64& plan, Activation act, bool glu, const Matrix* d_out);

// Relative error ||a - b|| / max(||b||, tiny) over all elements (NaN anywhere -> +inf).
double relative_error(const Matrix& a, const Matrix& b);
double relative_error(const std::vector<Matrix>& a, const std::vector<Matrix>& b);

// Tolerance on relative_error for results stored in `dtype` (fp32 accumulation): a small
// multiple of the storage rounding (bf16 2^-8, f16 2^-11, f32 ~2^-24 times reduction length).
double tolerance_for(DType dtype);

}  // namespace scattermoe::check
