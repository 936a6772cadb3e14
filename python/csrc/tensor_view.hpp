// at::Tensor -> scattermoe::TensorView, workspaces and streams: all the binding needs from torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <utility>

#include "scattermoe/context.hpp"
#include "scattermoe/error.hpp"
#include "scattermoe/tensor.hpp"

#ifdef SCATTERMOE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace scattermoe::torch_binding {

inline DType to_dtype(const char* name, at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kInt: return DType::kInt32;
    case at::kLong: return DType::kInt64;
    default:
      TORCH_CHECK_VALUE(false, "scattermoe: ", name, " has dtype torch.",
                        c10::getDtypeNames(type).first, "; expected float32, float16, bfloat16, int32 or int64");
  }
}

inline Device to_device(const char* name, const at::Device& device) {
  if (device.is_cpu()) return Device::cpu();
  if (device.is_cuda()) return Device::cuda(device.has_index() ? device.index() : 0);
  TORCH_CHECK_VALUE(false, "scattermoe: ", name, " is on ", device, "; expected cpu or cuda");
}

// A view of `t` (no copy); an undefined tensor gives an undefined view (an absent optional).
inline TensorView view(const char* name, const at::Tensor& t) {
  if (!t.defined()) return TensorView{};
  TORCH_CHECK_VALUE(t.dim() <= TensorView::kMaxRank, "scattermoe: ", name, " has ", t.dim(),
                    " dimensions; at most ", TensorView::kMaxRank, " are supported");
  return TensorView(t.data_ptr(), to_dtype(name, t.scalar_type()), static_cast<int>(t.dim()),
                    t.sizes().data(), t.strides().data(), to_device(name, t.device()));
}

inline TensorView view(const char* name, const c10::optional<at::Tensor>& t) {
  return t.has_value() ? view(name, *t) : TensorView{};
}

// Holds the workspace tensor alive for the duration of one library call.
struct OwnedContext {
  at::Tensor workspace;
  Context ctx;
};

// A context on `device` with `bytes` of scratch memory from torch's caching allocator and, on
// CUDA, torch's current stream.
inline OwnedContext make_context(const at::Device& device, std::size_t bytes) {
  OwnedContext owned;
  if (bytes > 0) {
    owned.workspace = at::empty({static_cast<std::int64_t>(bytes)},
                                at::TensorOptions().dtype(at::kByte).device(device));
    owned.ctx.workspace = Workspace{owned.workspace.data_ptr(), bytes};
  }
#ifdef SCATTERMOE_WITH_CUDA
  if (device.is_cuda()) {
    owned.ctx.stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  }
#endif
  return owned;
}

// Runs a library call, turning its exceptions into torch's: bad arguments become ValueError,
// anything the build or machine cannot serve becomes RuntimeError, both keeping the message.
template <typename Fn>
decltype(auto) call(Fn&& fn) {
  try {
    return std::forward<Fn>(fn)();
  } catch (const InvalidArgument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const Unsupported& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace scattermoe::torch_binding
