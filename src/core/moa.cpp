// MoA attention: argument checks, then the backend (CPU only for now).
#include <cmath>
#include <string>

#include "core/checks.hpp"
#include "core/op_checks.hpp"
#include "cpu/backend.hpp"
#include "scattermoe/error.hpp"
#include "scattermoe/moa.hpp"

namespace scattermoe {

namespace {

struct MoaShape {
  std::int64_t tokens = 0;  // B*S
  std::int64_t rows = 0;    // B*S*k
  std::int64_t width = 0;   // h_kv*hd
  std::int64_t heads = 0;   // h_kv
};

void expect_positive(const char* op, const char* name, int value, int minimum) {
  if (value < minimum) {
    detail::fail(op, name, std::to_string(value), "an integer >= " + std::to_string(minimum));
  }
}

MoaShape check_moa(const char* op, const MoaAttentionArgs& args) {
  expect_positive(op, "batch", args.batch, 0);
  expect_positive(op, "seq_len", args.seq_len, 0);
  expect_positive(op, "top_k", args.top_k, 1);
  expect_positive(op, "kv_heads", args.kv_heads, 1);
  expect_positive(op, "head_dim", args.head_dim, 1);
  if (!std::isfinite(args.scale)) {
    detail::fail(op, "scale", std::to_string(args.scale),
                 "a finite number (0 for 1/sqrt(head_dim))");
  }
  MoaShape s;
  s.tokens = static_cast<std::int64_t>(args.batch) * args.seq_len;
  s.rows = s.tokens * args.top_k;
  s.heads = args.kv_heads;
  s.width = static_cast<std::int64_t>(args.kv_heads) * args.head_dim;

  detail::expect_defined(op, "q", args.q);
  detail::expect_float(op, "q", args.q);
  detail::expect_shape(op, "q", args.q, {s.rows, s.width});
  const Device device = args.q.device();
  const DType dtype = args.q.dtype();
  for (const detail::NamedView& kv :
       {detail::NamedView{"k_proj", args.k_proj}, detail::NamedView{"v_proj", args.v_proj}}) {
    detail::expect_defined(op, kv.first, kv.second);
    detail::expect_dtype(op, kv.first, kv.second, dtype, "q");
    detail::expect_device(op, kv.first, kv.second, device, "q");
    detail::expect_shape(op, kv.first, kv.second, {s.tokens, s.width});
  }
  if (args.key_padding_mask.defined()) {
    detail::expect_data(op, "key_padding_mask", args.key_padding_mask);
    detail::expect_integral(op, "key_padding_mask", args.key_padding_mask);
    detail::expect_device(op, "key_padding_mask", args.key_padding_mask, device, "q");
    detail::expect_shape(op, "key_padding_mask", args.key_padding_mask,
                         {args.batch, args.seq_len});
  }
  return s;
}

// An input saved by forward or given by the caller: defined, dtype, device, shape.
void expect_input(const char* op, const char* name, const TensorView& v, DType dtype,
                  const char* like, Device device, std::int64_t rows, std::int64_t cols) {
  detail::expect_defined(op, name, v);
  detail::expect_dtype(op, name, v, dtype, like);
  detail::expect_device(op, name, v, device, "q");
  detail::expect_shape(op, name, v, {rows, cols});
}

void expect_lse_output(const char* op, const TensorView& lse, const MoaAttentionArgs& args,
                       const MoaShape& s) {
  detail::expect_defined(op, "lse", lse);
  detail::expect_dtype(op, "lse", lse, DType::kFloat32, nullptr);
  detail::expect_device(op, "lse", lse, args.q.device(), "q");
  detail::expect_shape(op, "lse", lse, {s.rows, s.heads});
  detail::expect_distinct_elements(op, "lse", lse);
}

void expect_apart(const char* op, const char* name, const TensorView& out,
                  std::initializer_list<detail::NamedView> others) {
  if (!out.defined()) return;
  for (const detail::NamedView& in : others) {
    detail::expect_no_overlap(op, name, out, in.first, in.second);
  }
}

// The CPU backend receives the scale resolved.
MoaAttentionArgs resolved(const MoaAttentionArgs& args) {
  MoaAttentionArgs r = args;
  if (r.scale == 0.0f) r.scale = 1.0f / std::sqrt(static_cast<float>(args.head_dim));
  return r;
}

void expect_cpu(const char* op, Device device) {
  if (device.type != DeviceType::kCPU) {
    throw Unsupported(std::string(op) + ": tensors are on " + device_name(device) +
                      "; MoA attention is not on CUDA yet (CPU tensors only)");
  }
}

}  // namespace

std::size_t moa_attention_forward_workspace_size(const MoaAttentionArgs& args) {
  expect_cpu("moa_attention_forward_workspace_size", args.q.device());
  return cpu::moa_attention_forward_workspace_size(args);
}

void moa_attention_forward(const MoaAttentionArgs& args, const TensorView& out,
                           const TensorView& lse, const Context& ctx) {
  constexpr const char* op = "moa_attention_forward";
  const MoaShape s = check_moa(op, args);
  detail::expect_output(op, "out", out, {s.rows, s.width}, args.q);
  expect_lse_output(op, lse, args, s);
  const std::initializer_list<detail::NamedView> inputs = {
      {"q", args.q}, {"k_proj", args.k_proj}, {"v_proj", args.v_proj},
      {"key_padding_mask", args.key_padding_mask}};
  expect_apart(op, "out", out, inputs);
  expect_apart(op, "lse", lse, inputs);
  detail::expect_no_overlap(op, "lse", lse, "out", out);
  expect_cpu(op, args.q.device());
  detail::expect_workspace(op, ctx, moa_attention_forward_workspace_size(args));
  cpu::moa_attention_forward(resolved(args), out, lse, ctx.workspace);
}

std::size_t moa_attention_backward_workspace_size(const MoaAttentionArgs& args) {
  expect_cpu("moa_attention_backward_workspace_size", args.q.device());
  return cpu::moa_attention_backward_workspace_size(args);
}

void moa_attention_backward(const MoaAttentionArgs& args, const TensorView& out,
                            const TensorView& lse, const TensorView& d_out, const TensorView& dq,
                            const TensorView& dk, const TensorView& dv, const Context& ctx) {
  constexpr const char* op = "moa_attention_backward";
  const MoaShape s = check_moa(op, args);
  const Device device = args.q.device();
  const DType dtype = args.q.dtype();
  expect_input(op, "out", out, dtype, "q", device, s.rows, s.width);
  expect_input(op, "lse", lse, DType::kFloat32, nullptr, device, s.rows, s.heads);
  expect_input(op, "d_out", d_out, dtype, "q", device, s.rows, s.width);
  const std::initializer_list<detail::NamedView> inputs = {
      {"q", args.q},   {"k_proj", args.k_proj}, {"v_proj", args.v_proj},
      {"key_padding_mask", args.key_padding_mask}, {"out", out}, {"lse", lse},
      {"d_out", d_out}};
  if (dq.defined()) detail::expect_output(op, "dq", dq, {s.rows, s.width}, args.q);
  if (dk.defined()) detail::expect_output(op, "dk", dk, {s.tokens, s.width}, args.q);
  if (dv.defined()) detail::expect_output(op, "dv", dv, {s.tokens, s.width}, args.q);
  expect_apart(op, "dq", dq, inputs);
  expect_apart(op, "dk", dk, inputs);
  expect_apart(op, "dv", dv, inputs);
  if (dk.defined()) detail::expect_no_overlap(op, "dk", dk, "dq", dq);
  if (dv.defined()) {
    detail::expect_no_overlap(op, "dv", dv, "dq", dq);
    detail::expect_no_overlap(op, "dv", dv, "dk", dk);
  }
  expect_cpu(op, device);
  detail::expect_workspace(op, ctx, moa_attention_backward_workspace_size(args));
  cpu::moa_attention_backward(resolved(args), out, lse, d_out, dq, dk, dv, ctx.workspace);
}

}  // namespace scattermoe
