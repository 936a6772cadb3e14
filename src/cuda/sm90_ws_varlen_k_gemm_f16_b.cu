// One instantiation per translation unit keeps compile time and memory bounded (sm_90a only).
#include "cuda/sm90_ws_varlen_k_gemm.cuh"

namespace scattermoe::cuda {
template void launch_sm90_ws_varlen_k_gemm<cute::half_t, VarlenKContiguous::kB>(const VarlenKGemm&, int, bool,
                                                                                cudaStream_t);
}  // namespace scattermoe::cuda
