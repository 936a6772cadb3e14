// Carves typed buffers out of a caller's Workspace. The same layout code runs twice: once with
// no memory to measure the size (the *_workspace_size queries), once to hand out pointers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "scattermoe/context.hpp"

namespace scattermoe::detail {

class WorkspaceCarver {
 public:
  WorkspaceCarver() = default;  // measuring mode: take() returns nullptr and counts bytes
  // The caller's memory may start anywhere: buffers are carved from its first aligned byte.
  explicit WorkspaceCarver(const Workspace& ws) : base_(align_up(static_cast<char*>(ws.data))) {}

  template <class T>
  T* take(std::int64_t count) {
    const std::size_t offset = used_;
    used_ += round_up(static_cast<std::size_t>(count) * sizeof(T));
    return base_ ? reinterpret_cast<T*>(base_ + offset) : nullptr;
  }

  // Bytes a caller must provide for what was taken: the buffers plus room to align the base.
  std::size_t used() const { return used_ == 0 ? 0 : used_ + kWorkspaceAlignment - 1; }

 private:
  static char* align_up(char* p) {
    if (p == nullptr) return nullptr;
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    return p + (kWorkspaceAlignment - address % kWorkspaceAlignment) % kWorkspaceAlignment;
  }
  static std::size_t round_up(std::size_t bytes) {
    return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
  }

  char* base_ = nullptr;
  std::size_t used_ = 0;
};

}  // namespace scattermoe::detail
