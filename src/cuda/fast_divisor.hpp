// r / d for 0 <= r < 2^31 and 1 <= d < 2^31 as a multiply-high, an add and a shift
// (Granlund and Montgomery's round-up method), for a divisor fixed over a kernel: a 32-bit
// division is a dependent chain of about 20 instructions, and the varlen-K copies divide every
// token row of every k tile. With l = ceil(log2 d) and mul = floor(2^32 (2^l - d) / d) + 1
// (below 2^32), r / d = (umulhi(r, mul) + r) >> l; the sum stays below 2^32 because r < 2^31.
// d = 1 and powers of two are mul = 1 (the high word is 0), so no branch tells the cases apart.
// Plain C++ (no CUDA headers needed), so the host tests check it against integer division.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SCATTERMOE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SCATTERMOE_HOST_DEVICE inline
#endif

namespace scattermoe::cuda {

struct FastDivisor {
  std::uint32_t mul = 1;  // d = 1
  std::uint32_t shift = 0;

  FastDivisor() = default;
  // d in [1, 2^31).
  SCATTERMOE_HOST_DEVICE explicit FastDivisor(std::int64_t d) {
    int log2_ceil = 0;
    while ((std::int64_t{1} << log2_ceil) < d) ++log2_ceil;
    shift = static_cast<std::uint32_t>(log2_ceil);
    const std::uint64_t excess = (std::uint64_t{1} << log2_ceil) - static_cast<std::uint64_t>(d);
    mul = static_cast<std::uint32_t>((excess << 32) / static_cast<std::uint64_t>(d) + 1);
  }
  // r in [0, 2^31).
  SCATTERMOE_HOST_DEVICE std::uint32_t operator()(std::uint32_t r) const {
#if defined(__CUDA_ARCH__)
    return (__umulhi(r, mul) + r) >> shift;
#else
    return static_cast<std::uint32_t>(((static_cast<std::uint64_t>(r) * mul >> 32) + r) >> shift);
#endif
  }
};

}  // namespace scattermoe::cuda
