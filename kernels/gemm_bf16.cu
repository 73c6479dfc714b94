// Dense bf16 GEMM: C[M, N] = A[M, K] · B[N, K]ᵀ with f32 accumulation on the tensor cores, for the
// kept-precision layers (the output head, tied to the embedding table). The tile machinery is
// common/rf_gemm_tiles.cuh (proven by the self-test GEMMs in tests/simulator.rs).
//
// Layout:  A [M, K] bf16, B [N, K] bf16 row-major; C [M, N] f32 (gemm_bf16_f32) or bf16
//          (gemm_bf16_bf16). K must be a multiple of 8; M and N are arbitrary.
// Launch:  grid (ceil(N/64), ceil(M/64)), block (128), dynamic smem 30720 bytes.
// Must match: backend::cpu::Cpu::linear with LinearWeight::Dense.
#include "common/recforge.cuh"
#include "common/rf_gemm_tiles.cuh"

extern "C" __global__ void gemm_bf16_f32(const __nv_bfloat16* A, const __nv_bfloat16* B, float* C, int M, int N, int K) {
    rf_gemm::gemm<false, float, float>(reinterpret_cast<const unsigned char*>(A), reinterpret_cast<const unsigned char*>(B), C, M, N, 2 * K);
}

extern "C" __global__ void gemm_bf16_bf16(const __nv_bfloat16* A, const __nv_bfloat16* B, __nv_bfloat16* C, int M, int N, int K) {
    rf_gemm::gemm<false, float, __nv_bfloat16>(reinterpret_cast<const unsigned char*>(A), reinterpret_cast<const unsigned char*>(B), C, M, N, 2 * K);
}
