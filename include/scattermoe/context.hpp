// Where an operation runs and the scratch memory it may use.
#pragma once

#include <cstddef>

struct CUstream_st;  // cudaStream_t is CUstream_st*; declared here so no CUDA header is needed

namespace scattermoe {

// Caller-provided scratch memory. Every operation that needs temporaries has a
// *_workspace_size() query with the same arguments; the operation uses only this memory
// (on the device of its tensors) and allocates nothing itself.
struct Workspace {
  void* data = nullptr;
  std::size_t bytes = 0;
};

struct Context {
  CUstream_st* stream = nullptr;  // CUDA stream (nullptr: the default stream); unused on CPU
  Workspace workspace;
};

// Alignment of every buffer an operation carves out of its workspace. The workspace itself may
// start at any address: the *_workspace_size queries include room to align it.
inline constexpr std::size_t kWorkspaceAlignment = 256;

}  // namespace scattermoe
