// Tiled tensor-core GEMM test kernels: C[M,N] = A[M,K] · B[N,K]ᵀ, both operands row-major with K
// contiguous (activations × weights). They assemble the pieces the production GEMMs use — a
// 3-stage cp.async pipeline into padded shared memory, ldmatrix fragments, mma.sync — so the
// simulator is proven on the whole pattern, not only on single instructions.
//
// Shapes: any M and N; K a multiple of 8 (bf16) or 16 (s8), so that every 16-byte chunk of a row
// is wholly inside or outside the matrix (chunks outside are zero-filled in shared memory).
// Tiling: block tile 64×64×(64 bytes of K), 4 warps in 2×2, each warp 32×32 = 2 (m16) × 4 (n8)
// mma tiles; per 64-byte K step, 2 mma k-steps (k16 for bf16, k32 for s8 — both 32 bytes).
// Shared memory: STAGES × {A, B} × 64 rows × 80 bytes (64 data + 16 pad: rows stay 16-byte
// aligned for ldmatrix and land on different banks).
// Launch: grid (ceil(N/64), ceil(M/64)), block (128), dynamic smem GEMM_SMEM_BYTES = 30720.
// CPU reference: tests/simulator.rs (f32 matmul of the bf16 values; exact i32 matmul for s8).
#include "common/recforge.cuh"
#include "common/rf_gemm_tiles.cuh"


extern "C" __global__ void selftest_gemm_bf16(const __nv_bfloat16* A, const __nv_bfloat16* B, float* C, int M, int N, int K) {
    rf_gemm::gemm<false, float, float>(reinterpret_cast<const unsigned char*>(A), reinterpret_cast<const unsigned char*>(B), C, M, N, 2 * K);
}

extern "C" __global__ void selftest_gemm_s8(const signed char* A, const signed char* B, int* C, int M, int N, int K) {
    rf_gemm::gemm<true, int, int>(reinterpret_cast<const unsigned char*>(A), reinterpret_cast<const unsigned char*>(B), C, M, N, K);
}
