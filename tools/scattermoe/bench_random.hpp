// The bench's counter-based random numbers, shared by the host generator (bench.cpp) and the
// CUDA fill kernel (bench_device_cuda.cu): element i of stream s depends only on (seed, s, i),
// so the data do not depend on the thread count or the device, and any slice can be regenerated.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define SCATTERMOE_BENCH_HOST_DEVICE __host__ __device__
#else
#define SCATTERMOE_BENCH_HOST_DEVICE
#endif

namespace scattermoe::tools {

// The streams of the bench's inputs.
enum Stream : std::uint64_t { kStreamX = 1, kStreamW1, kStreamW2, kStreamRouter, kStreamDOut };

// splitmix64's finaliser.
SCATTERMOE_BENCH_HOST_DEVICE inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A standard normal sample (Box-Muller on two 26-bit uniforms in (0, 1)). The host's and the
// device's libm may differ in the last bit of log or cos, which rounding to float almost always
// hides.
SCATTERMOE_BENCH_HOST_DEVICE inline float normal_at(std::uint64_t seed, std::uint64_t stream,
                                                    std::uint64_t i) {
  const std::uint64_t bits = mix64(mix64(seed * 0x9e3779b97f4a7c15ull + stream) + i);
  constexpr double kScale = 1.0 / static_cast<double>(1ull << 26);
  const double u1 = (static_cast<double>(bits >> 38) + 0.5) * kScale;
  const double u2 = (static_cast<double>((bits >> 12) & ((1ull << 26) - 1)) + 0.5) * kScale;
  return static_cast<float>(::sqrt(-2.0 * ::log(u1)) * ::cos(6.283185307179586 * u2));
}

}  // namespace scattermoe::tools
