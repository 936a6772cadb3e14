// One instantiation per translation unit keeps compile time and memory bounded.
#include "cuda/sm80_grouped_gemm.cuh"

namespace scattermoe::cuda {
template void launch_varlen_m_gemm<cute::bfloat16_t, false>(const VarlenMGemm&, const int*, cudaStream_t);
}  // namespace scattermoe::cuda
