// Tiled tensor-core GEMM building block shared by kernels: C[M,N] = A[M,K] · B[N,K]ᵀ, both
// operands row-major with K contiguous (activations × weights); bf16 (m16n8k16) or s8
// (m16n8k32) inputs, f32 or s32 accumulation, any M and N, K a multiple of 16 bytes.
// Block tile 64×64×(64 bytes of K), 4 warps in 2×2 (each 32×32 = 2 m16 × 4 n8 mma tiles), a
// 3-stage cp.async pipeline into padded shared memory (rows of 64 + 16 bytes), ldmatrix.
// Launch: grid (ceil(N/64), ceil(M/64)), block (128), dynamic smem 3 × 2 × 64 × 80 = 30720.
#pragma once
#include "common/recforge.cuh"

namespace rf_gemm {
constexpr int STAGES = 3, ROW = 80, THREADS = 128, KB = 64;
constexpr int TILE = 64 * ROW;  // bytes of one operand tile in one stage

template <class Out> __device__ __forceinline__ Out store(float v);
template <> __device__ __forceinline__ float store<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <class Out> __device__ __forceinline__ Out store(int v);
template <> __device__ __forceinline__ int store<int>(int v) { return v; }

__device__ __forceinline__ void load_stage(rf_smem_t<unsigned char> sA, rf_smem_t<unsigned char> sB,
                                           const unsigned char* A, const unsigned char* B, int M, int N,
                                           int kbytes, int m0, int n0, int kb0) {
    for (int c = threadIdx.x; c < 256; c += THREADS) {
        const int r = c >> 2, col = (c & 3) * 16, gk = kb0 + col;
        const uint4 zero = {0u, 0u, 0u, 0u};
        if (m0 + r < M && gk < kbytes) rf_cp_async16(sA + r * ROW + col, A + (size_t)(m0 + r) * kbytes + gk);
        else rf_st16(sA + r * ROW + col, zero);
        if (n0 + r < N && gk < kbytes) rf_cp_async16(sB + r * ROW + col, B + (size_t)(n0 + r) * kbytes + gk);
        else rf_st16(sB + r * ROW + col, zero);
    }
}

template <bool S8, class Acc, class Out>
__device__ __forceinline__ void gemm(const unsigned char* A, const unsigned char* B, Out* C, int M, int N, int kbytes) {
    RF_DYNAMIC_SMEM(unsigned char, smem);
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, t = l & 3;
    const int m0 = blockIdx.y * 64, n0 = blockIdx.x * 64, wm = (w >> 1) * 32, wn = (w & 1) * 32;
    Acc acc[2][4][4];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++)
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0;
    const int ktiles = (kbytes + KB - 1) / KB;
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < ktiles) load_stage(smem + s * 2 * TILE, smem + s * 2 * TILE + TILE, A, B, M, N, kbytes, m0, n0, s * KB);
        rf_cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; kt++) {
        rf_cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt is complete for every thread; stage kt-1 is no longer read
        const int nk = kt + STAGES - 1;
        if (nk < ktiles) {
            const int st = nk % STAGES;
            load_stage(smem + st * 2 * TILE, smem + st * 2 * TILE + TILE, A, B, M, N, kbytes, m0, n0, nk * KB);
        }
        rf_cp_async_commit();
        rf_smem_t<unsigned char> sA = smem + (kt % STAGES) * 2 * TILE;
        rf_smem_t<unsigned char> sB = sA + TILE;
        for (int kk = 0; kk < 2; kk++) {
            unsigned a[2][4], b[4][2];
            for (int mi = 0; mi < 2; mi++)
                rf_ldmatrix_x4(a[mi][0], a[mi][1], a[mi][2], a[mi][3],
                               sA + (wm + mi * 16 + (l & 15)) * ROW + kk * 32 + (l >> 4) * 16);
            for (int p = 0; p < 2; p++)
                rf_ldmatrix_x4(b[2 * p][0], b[2 * p][1], b[2 * p + 1][0], b[2 * p + 1][1],
                               sB + (wn + p * 16 + (l & 7) + ((l >> 4) << 3)) * ROW + kk * 32 + ((l >> 3) & 1) * 16);
            for (int mi = 0; mi < 2; mi++)
                for (int nj = 0; nj < 4; nj++) {
                    if constexpr (S8) rf_mma_m16n8k32_s8(acc[mi][nj], a[mi], b[nj], acc[mi][nj]);
                    else rf_mma_m16n8k16_bf16(acc[mi][nj], a[mi], b[nj], acc[mi][nj]);
                }
        }
    }
    // Accumulator fragment: element e of tile (mi, nj) is row g + 8·(e/2), column 2t + e%2.
    for (int mi = 0; mi < 2; mi++)
        for (int nj = 0; nj < 4; nj++)
            for (int e = 0; e < 4; e++) {
                const int r = m0 + wm + mi * 16 + g + 8 * (e >> 1), c = n0 + wn + nj * 8 + 2 * t + (e & 1);
                if (r < M && c < N) C[(size_t)r * N + c] = store<Out>(acc[mi][nj][e]);
            }
}
}  // namespace rf_gemm
