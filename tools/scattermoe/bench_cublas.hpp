// The CUDA comparisons of `scattermoe bench` (bench_cublas.cu), built only with the CUDA backend:
//   ceiling:  the six cuBLAS GEMMs of the MLP's shapes (forward, dX and dW of both projections)
//             as if all L = T*k routed rows belonged to one expert: no routing, gather,
//             activation or aggregation. bf16/f16/f32 storage, fp32 accumulation.
//   baseline: a per-expert cuBLAS loop as an eager framework runs it: the routing plan, the
//             expert offsets copied to the host (a synchronisation), the token rows gathered
//             into grouped order, per non-empty expert its GEMMs and the GLU, and the gated
//             aggregation of the k rows of every token (and the sum of dX over them).
// This header needs no CUDA headers: bench_device.cpp calls it from plain C++.
#pragma once

#include <memory>
#include <vector>

#include "bench_comparison.hpp"

namespace scattermoe::tools {

// {ceiling, baseline}. `device` is the CUDA BenchDevice, ctx its context (the stream).
std::vector<std::unique_ptr<BenchComparison>> make_cublas_comparisons(BenchDevice& device,
                                                                      const BenchLayer& layer,
                                                                      const Context& ctx);

}  // namespace scattermoe::tools
