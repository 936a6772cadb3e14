// One instantiation per translation unit keeps compile time and memory bounded.
#include "cuda/sm80_grouped_gemm.cuh"

namespace scattermoe::cuda {
template void launch_varlen_k_gemm<cute::bfloat16_t>(const VarlenKGemm&, cudaStream_t);
template int varlen_m_tile_rows<cute::bfloat16_t>();
}  // namespace scattermoe::cuda
