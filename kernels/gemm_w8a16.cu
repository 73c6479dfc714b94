// W8A16 GEMM for the backward pass to the input: dX[M, K] = dY[M, N] · dequant(W)[N, K], with W the
// frozen int8 weight [N, K] and per-row scales sw[N] — W is never materialized in bf16 in device
// memory (DESIGN.md §3): each tile is converted while it is staged into shared memory.
//
// Layout:  dy [M, N] bf16 row-major; wq [N, K] i8, sw [N] f32; dx [M, K] bf16, overwritten or (with
//          accumulate = 1) added to, since dX sums the q/k/v (or gate/up) projections' gradients.
//          N must be a multiple of 8 and K of 16 (16-byte loads); M is arbitrary.
// Math:    dX[m, k] = Σ_n bf16(dy[m, n]·sw[n]) · wq[n, k]: int8 converts to bf16 exactly, the row
//          scale is folded into the dY operand (one bf16 rounding per term, at most 2^-8 relative),
//          products and sums in f32 on the tensor cores (mma.sync.m16n8k16.bf16).
// Tiling:  block tile 64 (m) × 64 (k), the reduction over n in steps of 32; dY tile rows of 64 bytes
//          and W tile rows of 128 bytes, both XOR-swizzled by 16-byte chunk so ldmatrix (and
//          ldmatrix.trans for W, which is [n][k] = k-major) is conflict-free; 4 warps in 2×2, each
//          32×32. Staging goes through registers (the conversion), one stage, no pipeline yet.
// Launch:  grid (ceil(K/64), ceil(M/64)), block (128), dynamic smem 64·64 + 32·128 = 8192 bytes.
// Must match: backend::cpu::Cpu::linear_backward_input with LinearWeight::Int8.
#include "common/recforge.cuh"

namespace w8a16 {
constexpr int THREADS = 128, A_ROW = 64, B_ROW = 128, A_TILE = 64 * A_ROW;

__device__ __forceinline__ int swz_a(int r, int c) { return r * A_ROW + ((c ^ ((r >> 1) & 3)) << 4); }
__device__ __forceinline__ int swz_b(int r, int c) { return r * B_ROW + ((c ^ (r & 7)) << 4); }

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    const __nv_bfloat16 a = __float2bfloat16(lo), b = __float2bfloat16(hi);
    return (unsigned)*reinterpret_cast<const unsigned short*>(&a) | ((unsigned)*reinterpret_cast<const unsigned short*>(&b) << 16);
}
}  // namespace w8a16

// DENSE: W is bf16 [N, K] (the kept-precision output head), no scales, and any N (the vocabulary).
template <bool DENSE>
__device__ __forceinline__ void dx_gemm(const __nv_bfloat16* __restrict__ dy, const void* __restrict__ wv,
                                        const float* __restrict__ sw, __nv_bfloat16* __restrict__ dx, int M, int N, int K,
                                        int accumulate) {
    using namespace w8a16;
    RF_DYNAMIC_SMEM(unsigned char, smem);
    rf_smem_t<unsigned char> sA = smem, sB = smem + A_TILE;
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, t = l & 3;
    const int m0 = blockIdx.y * 64, k0 = blockIdx.x * 64, wm = (w >> 1) * 32, wn = (w & 1) * 32;
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;
    const uint4 zero = {0u, 0u, 0u, 0u};
    for (int n0 = 0; n0 < N; n0 += 32) {
        // dY tile: 64 rows × 32 values (4 chunks of 8 bf16), each value scaled by sw[n].
        for (int i = threadIdx.x; i < 256; i += THREADS) {
            const int r = i >> 2, c = i & 3, n = n0 + c * 8;
            uint4 v = zero;
            if (m0 + r < M && n < N) {
                if (DENSE && (N & 7)) {
                    // A vocabulary that is not a multiple of 8: rows are not 16-byte aligned, so
                    // element loads, zero past the end.
                    const unsigned short* row = reinterpret_cast<const unsigned short*>(dy + (size_t)(m0 + r) * N);
                    unsigned e[8];
                    for (int j = 0; j < 8; j++) e[j] = n + j < N ? row[n + j] : 0u;
                    v = make_uint4(e[0] | (e[1] << 16), e[2] | (e[3] << 16), e[4] | (e[5] << 16), e[6] | (e[7] << 16));
                } else if (DENSE) {
                    v = rf_ld16(dy + (size_t)(m0 + r) * N + n);
                } else {
                    const uint4 raw = rf_ld16(dy + (size_t)(m0 + r) * N + n);
                    const unsigned in[4] = {raw.x, raw.y, raw.z, raw.w};
                    unsigned o[4];
                    for (int j = 0; j < 4; j++) {
                        const float lo = __uint_as_float(in[j] << 16) * sw[n + 2 * j];
                        const float hi = __uint_as_float(in[j] & 0xffff0000u) * sw[n + 2 * j + 1];
                        o[j] = pack_bf16(lo, hi);
                    }
                    v = make_uint4(o[0], o[1], o[2], o[3]);
                }
            }
            rf_st16(sA + swz_a(r, c), v);
        }
        // W tile: 32 rows (n) × 64 columns (k); 16 int8 → 16 bf16 = two 16-byte chunks.
        {
            const int r = threadIdx.x >> 2, c = threadIdx.x & 3;
            uint4 v0 = zero, v1 = zero;
            if (DENSE && n0 + r < N && k0 + c * 16 < K) {
                const __nv_bfloat16* wb = static_cast<const __nv_bfloat16*>(wv) + (size_t)(n0 + r) * K + k0 + c * 16;
                v0 = rf_ld16(wb);
                v1 = rf_ld16(wb + 8);
            } else if (!DENSE && n0 + r < N && k0 + c * 16 < K) {
                const signed char* wq = static_cast<const signed char*>(wv);
                const uint4 raw = rf_ld16(wq + (size_t)(n0 + r) * K + k0 + c * 16);
                const unsigned in[4] = {raw.x, raw.y, raw.z, raw.w};
                unsigned o[8];
                for (int j = 0; j < 4; j++) {
                    const float b0 = (float)(signed char)(in[j] & 0xff), b1 = (float)(signed char)((in[j] >> 8) & 0xff);
                    const float b2 = (float)(signed char)((in[j] >> 16) & 0xff), b3 = (float)(signed char)(in[j] >> 24);
                    o[2 * j] = pack_bf16(b0, b1);
                    o[2 * j + 1] = pack_bf16(b2, b3);
                }
                v0 = make_uint4(o[0], o[1], o[2], o[3]);
                v1 = make_uint4(o[4], o[5], o[6], o[7]);
            }
            rf_st16(sB + swz_b(r, 2 * c), v0);
            rf_st16(sB + swz_b(r, 2 * c + 1), v1);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            unsigned a[2][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
                rf_ldmatrix_x4(a[mi][0], a[mi][1], a[mi][2], a[mi][3], sA + swz_a(wm + mi * 16 + (l & 15), 2 * kk + (l >> 4)));
            // W is [n][k] (reduction rows, output columns): ldmatrix.trans gives the "col" B
            // fragment. Matrices: (n 0-7, k 0-7), (n 8-15, k 0-7), (n 0-7, k 8-15), (n 8-15, k 8-15).
#pragma unroll
            for (int p = 0; p < 2; p++)
                rf_ldmatrix_x4_trans(b[2 * p][0], b[2 * p][1], b[2 * p + 1][0], b[2 * p + 1][1],
                                     sB + swz_b(kk * 16 + (l & 7) + ((l >> 3) & 1) * 8, (wn >> 3) + 2 * p + (l >> 4)));
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int nj = 0; nj < 4; nj++) rf_mma_m16n8k16_bf16(acc[mi][nj], a[mi], b[nj], acc[mi][nj]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int nj = 0; nj < 4; nj++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = m0 + wm + mi * 16 + g + 8 * (e >> 1), c = k0 + wn + nj * 8 + 2 * t + (e & 1);
                if (r >= M || c >= K) continue;
                float y = acc[mi][nj][e];
                if (accumulate) y += __bfloat162float(dx[(size_t)r * K + c]);
                dx[(size_t)r * K + c] = __float2bfloat16(y);
            }
}

extern "C" __global__ void gemm_w8a16_dx_bf16(const __nv_bfloat16* __restrict__ dy, const signed char* __restrict__ wq,
                                              const float* __restrict__ sw, __nv_bfloat16* __restrict__ dx, int M, int N,
                                              int K, int accumulate) {
    dx_gemm<false>(dy, wq, sw, dx, M, N, K, accumulate);
}

// dX = dY · W for a dense bf16 W [N, K] (the backward of the output head): same tiles, no scales.
extern "C" __global__ void gemm_bf16_dx_bf16(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ w,
                                             __nv_bfloat16* __restrict__ dx, int M, int N, int K, int accumulate) {
    dx_gemm<true>(dy, w, nullptr, dx, M, N, K, accumulate);
}
