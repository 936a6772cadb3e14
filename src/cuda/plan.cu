// Routing plan on the GPU: a stable radix sort of the flat expert ids (CUB), then each
// expert's inclusive end offset by binary search over the sorted ids. No host synchronisation.
#include <cub/device/device_radix_sort.cuh>

#include "core/workspace.hpp"
#include "cuda/kernels.hpp"

namespace scattermoe::cuda {

namespace {

constexpr int kThreads = 256;

// Ids are clamped into [0, E): the plan is built without a host round trip, so a bad id cannot
// raise an error here, but it must never send a GEMM outside the weights.
template <class Index>
__global__ void flatten_keys_kernel(const Index* __restrict__ expert_idxs, std::int64_t stride0,
                                    std::int64_t stride1, std::int64_t k, std::int64_t rows,
                                    int num_experts, int* __restrict__ keys,
                                    std::int64_t* __restrict__ positions) {
  const std::int64_t p = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= rows) return;
  const std::int64_t id = static_cast<std::int64_t>(expert_idxs[(p / k) * stride0 + (p % k) * stride1]);
  keys[p] = static_cast<int>(id < 0 ? 0 : (id >= num_experts ? num_experts - 1 : id));
  positions[p] = p;
}

__global__ void finish_plan_kernel(const int* __restrict__ sorted_keys, std::int64_t rows,
                                   int num_experts, std::int64_t* __restrict__ sorted_expert,
                                   std::int64_t* __restrict__ expert_offsets,
                                   std::int64_t offsets_stride) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < rows) sorted_expert[i] = sorted_keys[i];
  if (i < num_experts) {
    // number of sorted keys <= i (upper bound)
    std::int64_t lo = 0;
    std::int64_t hi = rows;
    while (lo < hi) {
      const std::int64_t mid = (lo + hi) / 2;
      if (sorted_keys[mid] <= i) lo = mid + 1; else hi = mid;
    }
    expert_offsets[i * offsets_stride] = lo;
  }
}

struct PlanScratch {
  int* keys = nullptr;
  int* sorted_keys = nullptr;
  std::int64_t* positions = nullptr;
  void* sort_temp = nullptr;
  std::size_t sort_temp_bytes = 0;
};

int key_bits(int num_experts) {
  int bits = 1;
  while ((1LL << bits) < num_experts) ++bits;
  return bits;
}

PlanScratch plan_layout(detail::WorkspaceCarver& carver, std::int64_t rows, int num_experts) {
  PlanScratch s;
  s.keys = carver.take<int>(rows);
  s.sorted_keys = carver.take<int>(rows);
  s.positions = carver.take<std::int64_t>(rows);
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, s.sort_temp_bytes, static_cast<const int*>(nullptr),
                                             static_cast<int*>(nullptr),
                                             static_cast<const std::int64_t*>(nullptr),
                                             static_cast<std::int64_t*>(nullptr), static_cast<int>(rows),
                                             0, key_bits(num_experts)),
             "build_routing_plan: radix sort size");
  s.sort_temp = carver.take<unsigned char>(static_cast<std::int64_t>(s.sort_temp_bytes));
  return s;
}

}  // namespace

std::size_t plan_workspace_size(std::int64_t rows, int num_experts) {
  if (rows >= (std::int64_t{1} << 31)) {
    throw InvalidArgument("build_routing_plan: argument 'expert_idxs' has " + std::to_string(rows) +
                          " routed rows; expected fewer than 2^31 on CUDA");
  }
  detail::WorkspaceCarver carver;
  plan_layout(carver, rows, num_experts);
  return carver.used();
}

void build_plan(const TensorView& expert_idxs, int num_experts, std::int64_t* sorted_expert,
                std::int64_t* sorted_scattered, std::int64_t* expert_offsets,
                std::int64_t offsets_stride, void* workspace, std::size_t workspace_bytes,
                cudaStream_t stream) {
  const std::int64_t k = expert_idxs.size(1);
  const std::int64_t rows = expert_idxs.size(0) * k;
  detail::WorkspaceCarver carver(Workspace{workspace, workspace_bytes});
  PlanScratch s = plan_layout(carver, rows, num_experts);
  if (rows > 0) {
    const unsigned blocks = ceil_div(rows, kThreads);
    if (expert_idxs.dtype() == DType::kInt32) {
      flatten_keys_kernel<<<blocks, kThreads, 0, stream>>>(
          static_cast<const std::int32_t*>(expert_idxs.data()), expert_idxs.stride(0),
          expert_idxs.stride(1), k, rows, num_experts, s.keys, s.positions);
    } else {
      flatten_keys_kernel<<<blocks, kThreads, 0, stream>>>(
          static_cast<const std::int64_t*>(expert_idxs.data()), expert_idxs.stride(0),
          expert_idxs.stride(1), k, rows, num_experts, s.keys, s.positions);
    }
    check_launch("build_routing_plan: flatten");
    // Radix sort is stable: equal experts keep ascending flat positions.
    check_cuda(cub::DeviceRadixSort::SortPairs(s.sort_temp, s.sort_temp_bytes, s.keys, s.sorted_keys,
                                               s.positions, sorted_scattered, static_cast<int>(rows),
                                               0, key_bits(num_experts), stream),
               "build_routing_plan: radix sort");
  }
  const std::int64_t n = rows > num_experts ? rows : num_experts;
  finish_plan_kernel<<<ceil_div(n, kThreads), kThreads, 0, stream>>>(
      s.sorted_keys, rows, num_experts, sorted_expert, expert_offsets, offsets_stride);
  check_launch("build_routing_plan: offsets");
}

}  // namespace scattermoe::cuda
