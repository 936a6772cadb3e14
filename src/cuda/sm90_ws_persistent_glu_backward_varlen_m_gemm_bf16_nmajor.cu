// One instantiation per translation unit keeps compile time and memory bounded (sm_90a only).
#include "cuda/sm90_tma_grouped_gemm.cuh"

namespace scattermoe::cuda {
template void launch_sm90_ws_persistent_glu_backward_varlen_m_gemm<cute::bfloat16_t, false>(const VarlenMGemm&, const int*,
                                                                               int, cudaStream_t);
}  // namespace scattermoe::cuda
