// W8A16 GEMV for decode: y[M, N] = x[M, K] · dequant(W)[N, K]ᵀ for a few rows (M = 1..16, one
// token per sequence), bandwidth-bound by design: every weight byte is read once per launch
// (per 8 rows of x) with 16-byte loads and dequantized in registers; x is small and stays in
// L1/L2.
//
// Layout:  x [M, K] bf16; wq [N, K] i8, sw [N] f32; residual [M, N] bf16 or null; y [M, N] bf16.
//          K must be a multiple of 16.
// Math:    y[m, n] = bf16((Σ_k x[m, k]·wq[n, k])·sw[n] (+ residual)), f32 accumulation.
// Launch:  grid (ceil(N/8), ceil(M/8)), block (256): warp w of block b owns output column
//          n = 8b + w for rows 8·blockIdx.y .. +8; lanes stride K in 16-element chunks.
// Must match: backend::cpu::Cpu::linear with a dense weight equal to dequant(W) (the decode
//          path does not quantize activations).
#include "common/recforge.cuh"

#define RF_GEMV_ROWS 8

extern "C" __global__ void gemv_w8a16_bf16(const __nv_bfloat16* __restrict__ x, const signed char* __restrict__ wq,
                                           const float* __restrict__ sw, const __nv_bfloat16* __restrict__ residual,
                                           __nv_bfloat16* __restrict__ y, int M, int N, int K) {
    const int lane = threadIdx.x & 31, n = blockIdx.x * 8 + (threadIdx.x >> 5), m0 = blockIdx.y * RF_GEMV_ROWS;
    if (n >= N) return;  // whole warps leave together: no collective below is split
    float acc[RF_GEMV_ROWS];
#pragma unroll
    for (int j = 0; j < RF_GEMV_ROWS; j++) acc[j] = 0.0f;
    const signed char* wr = wq + (size_t)n * K;
    for (int k = lane * 16; k < K; k += 32 * 16) {
        const uint4 raw = rf_ld16(wr + k);
        const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
        float w[16];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int b = 0; b < 4; b++) w[4 * i + b] = (float)(signed char)((words[i] >> (8 * b)) & 0xff);
#pragma unroll
        for (int j = 0; j < RF_GEMV_ROWS; j++) {
            if (m0 + j >= M) break;
            const __nv_bfloat16* xr = x + (size_t)(m0 + j) * K + k;
            const uint4 x0 = rf_ld16(xr), x1 = rf_ld16(xr + 8);
            const unsigned xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                s += __uint_as_float(xs[i] << 16) * w[2 * i];
                s += __uint_as_float(xs[i] & 0xffff0000u) * w[2 * i + 1];
            }
            acc[j] += s;
        }
    }
#pragma unroll
    for (int j = 0; j < RF_GEMV_ROWS; j++) {
        const float s = rf_warp_sum(acc[j]);
        if (lane == 0 && m0 + j < M) {
            float v = s * sw[n];
            if (residual) v += __bfloat162float(residual[(size_t)(m0 + j) * N + n]);
            y[(size_t)(m0 + j) * N + n] = __float2bfloat16(v);
        }
    }
}
