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
  explicit WorkspaceCarver(const Workspace& ws) : base_(static_cast<char*>(ws.data)) {}

  template <class T>
  T* take(std::int64_t count) {
    const std::size_t offset = used_;
    used_ += round_up(static_cast<std::size_t>(count) * sizeof(T));
    return base_ ? reinterpret_cast<T*>(base_ + offset) : nullptr;
  }

  std::size_t used() const { return used_; }

 private:
  static std::size_t round_up(std::size_t bytes) {
    return (bytes + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment;
  }

  char* base_ = nullptr;
  std::size_t used_ = 0;
};

}  // namespace scattermoe::detail
