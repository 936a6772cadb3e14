// Host-side helpers shared by the correctness suite and the GoogleTest suites: owning host
// buffers behind TensorViews, element writes in any storage dtype, seeded fills, NaN poison,
// and workspace scratch. Header-only and test-side only: nothing here is part of the library.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "core/half.hpp"
#include "scattermoe/context.hpp"
#include "scattermoe/plan.hpp"
#include "scattermoe/tensor.hpp"

namespace scattermoe::check {

// An owning, zero-initialised host buffer and its view. With `transposed` the last two dims
// are stored swapped (the nn.Linear parameter layout (E, d_out, d_in) for a logical
// (E, d_in, d_out) weight), and view() is the transposed, non-contiguous view.
class HostTensor {
 public:
  HostTensor() = default;
  HostTensor(DType dtype, std::vector<std::int64_t> shape, bool transposed = false)
      : dtype_(dtype), shape_(std::move(shape)), transposed_(transposed) {
    std::int64_t n = 1;
    for (std::int64_t s : shape_) n *= s;
    bytes_ = static_cast<std::size_t>(n) * dtype_size(dtype_);
    words_.assign(bytes_ / 8 + 1, 0);  // 8-byte aligned storage, never empty
  }

  TensorView view() const {
    const int rank = static_cast<int>(shape_.size());
    std::vector<std::int64_t> stored = shape_;
    if (transposed_ && rank >= 2) std::swap(stored[rank - 1], stored[rank - 2]);
    std::vector<std::int64_t> strides(shape_.size(), 1);
    std::int64_t running = 1;
    for (int i = rank - 1; i >= 0; --i) {
      strides[i] = running;
      running *= std::max<std::int64_t>(stored[i], 1);
    }
    TensorView v(const_cast<std::uint64_t*>(words_.data()), dtype_, rank, stored.data(),
                 strides.data());
    return transposed_ && rank >= 2 ? v.transposed(rank - 2, rank - 1) : v;
  }

  // Fills every byte: 0xff makes every f32 / f16 / bf16 element a NaN and every integer -1.
  void poison(unsigned char byte = 0xff) { std::memset(words_.data(), byte, bytes_); }
  const unsigned char* bytes() const {
    return reinterpret_cast<const unsigned char*>(words_.data());
  }
  unsigned char* bytes() { return reinterpret_cast<unsigned char*>(words_.data()); }
  std::size_t byte_size() const { return bytes_; }
  bool same_bytes(const HostTensor& other) const {
    return bytes_ == other.bytes_ && std::memcmp(bytes(), other.bytes(), bytes_) == 0;
  }
  DType dtype() const { return dtype_; }

 private:
  DType dtype_ = DType::kFloat32;
  std::vector<std::int64_t> shape_;
  bool transposed_ = false;
  std::size_t bytes_ = 0;
  std::vector<std::uint64_t> words_;
};

// Writes `value` (rounded to the view's dtype, through float for the 16-bit types) at `index`.
inline void write_element(const TensorView& v, const std::int64_t* index, double value) {
  std::int64_t offset = 0;
  for (int d = 0; d < v.rank(); ++d) offset += index[d] * v.stride(d);
  char* p =
      static_cast<char*>(v.data()) + offset * static_cast<std::int64_t>(dtype_size(v.dtype()));
  const float f = static_cast<float>(value);
  switch (v.dtype()) {
    case DType::kFloat32:
      std::memcpy(p, &f, 4);
      break;
    case DType::kFloat16: {
      const std::uint16_t h = detail::float_to_f16(f);
      std::memcpy(p, &h, 2);
      break;
    }
    case DType::kBFloat16: {
      const std::uint16_t h = detail::float_to_bf16(f);
      std::memcpy(p, &h, 2);
      break;
    }
    case DType::kInt32: {
      const auto i = static_cast<std::int32_t>(value);
      std::memcpy(p, &i, 4);
      break;
    }
    case DType::kInt64: {
      const auto i = static_cast<std::int64_t>(value);
      std::memcpy(p, &i, 8);
      break;
    }
  }
}

// Calls f(index) for every element of `v` in row-major order of its logical shape.
template <class F>
void for_each_index(const TensorView& v, F f) {
  if (v.numel() == 0) return;
  std::int64_t index[TensorView::kMaxRank] = {0, 0, 0, 0};
  for (;;) {
    f(static_cast<const std::int64_t*>(index));
    int d = v.rank() - 1;
    while (d >= 0 && ++index[d] == v.size(d)) index[d--] = 0;
    if (d < 0) return;
  }
}

// Normal(0, scale^2) values.
inline void fill_normal(const TensorView& v, std::mt19937_64& rng, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  for_each_index(v, [&](const std::int64_t* i) { write_element(v, i, normal(rng)); });
}

// Integers uniform in [lo, hi]; never all zeros (the first element becomes 1 if they are).
inline void fill_ints(const TensorView& v, std::mt19937_64& rng, int lo = -2, int hi = 2) {
  std::uniform_int_distribution<int> dist(lo, hi);
  bool any = false;
  for_each_index(v, [&](const std::int64_t* i) {
    const int value = dist(rng);
    any = any || value != 0;
    write_element(v, i, value);
  });
  if (!any && v.numel() > 0) {
    const std::int64_t zero[TensorView::kMaxRank] = {0, 0, 0, 0};
    write_element(v, zero, 1.0);
  }
}

// Workspace memory for one call: `bytes` at a kWorkspaceAlignment-aligned address, filled with
// 0xff so an op that reads scratch it never wrote sees NaNs.
class Scratch {
 public:
  explicit Scratch(std::size_t bytes)
      : bytes_(bytes), storage_(bytes + kWorkspaceAlignment, 0xff) {}
  Context context() {
    void* p = storage_.data();
    std::size_t space = storage_.size();
    std::align(kWorkspaceAlignment, bytes_, p, space);
    return Context{nullptr, Workspace{p, bytes_}};
  }

 private:
  std::size_t bytes_;
  std::vector<unsigned char> storage_;
};

// Token-major expert ids (T*k): each token picks k distinct experts out of [0, E) minus
// `skip` (an expert left empty; -1 for none).
inline std::vector<std::int64_t> draw_routing(std::mt19937_64& rng, std::int64_t tokens, int k,
                                              int experts, int skip = -1) {
  std::vector<std::int64_t> allowed;
  for (int e = 0; e < experts; ++e) {
    if (e != skip) allowed.push_back(e);
  }
  std::vector<std::int64_t> idx;
  idx.reserve(static_cast<std::size_t>(tokens * k));
  for (std::int64_t t = 0; t < tokens; ++t) {
    for (int j = 0; j < k; ++j) {  // partial Fisher-Yates: k distinct picks
      std::uniform_int_distribution<std::size_t> pick(static_cast<std::size_t>(j),
                                                      allowed.size() - 1);
      std::swap(allowed[static_cast<std::size_t>(j)], allowed[pick(rng)]);
      idx.push_back(allowed[static_cast<std::size_t>(j)]);
    }
  }
  return idx;
}

// Host storage of a routing plan for L routed rows and E experts, and the plan over it.
class HostPlan {
 public:
  HostPlan() = default;
  HostPlan(std::int64_t rows, int experts)
      : sorted_expert_idxs_(DType::kInt64, {rows}),
        sorted_scattered_idxs_(DType::kInt64, {rows}),
        expert_offsets_(DType::kInt64, {experts}) {}

  RoutingPlan plan() const {
    return RoutingPlan{sorted_expert_idxs_.view(), sorted_scattered_idxs_.view(),
                       expert_offsets_.view()};
  }
  void poison(unsigned char byte = 0xff) {
    sorted_expert_idxs_.poison(byte);
    sorted_scattered_idxs_.poison(byte);
    expert_offsets_.poison(byte);
  }
  const HostTensor& sorted_expert_idxs() const { return sorted_expert_idxs_; }
  const HostTensor& sorted_scattered_idxs() const { return sorted_scattered_idxs_; }
  const HostTensor& expert_offsets() const { return expert_offsets_; }

 private:
  HostTensor sorted_expert_idxs_, sorted_scattered_idxs_, expert_offsets_;
};

// expert_idxs (T*k token-major values) as a (T, k) host tensor of `dtype` (i32 or i64).
inline HostTensor make_expert_idxs(const std::vector<std::int64_t>& idx, std::int64_t tokens, int k,
                                   DType dtype = DType::kInt64) {
  HostTensor t(dtype, {tokens, k});
  const TensorView v = t.view();
  for (std::int64_t p = 0; p < tokens * k; ++p) {
    const std::int64_t index[2] = {p / k, p % k};
    write_element(v, index, static_cast<double>(idx[static_cast<std::size_t>(p)]));
  }
  return t;
}

// Builds the plan with the library (on the host, with its own workspace).
inline HostPlan build_host_plan(const std::vector<std::int64_t>& idx, std::int64_t tokens, int k,
                                int experts, DType idx_dtype = DType::kInt64) {
  HostPlan plan(tokens * k, experts);
  plan.poison();
  const HostTensor expert_idxs = make_expert_idxs(idx, tokens, k, idx_dtype);
  Scratch scratch(routing_plan_workspace_size(tokens, k, experts, Device::cpu()));
  build_routing_plan(expert_idxs.view(), experts, plan.plan(), scratch.context());
  return plan;
}

}  // namespace scattermoe::check
