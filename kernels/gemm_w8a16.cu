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
//
// The pipelined variants `gemm_{w8a16,bf16}_dx128_bf16` (second half of this file) are the
// training-shape kernels: block tile 128 (m) × 128 (k), 8 warps in 2 × 4 (each 64 × 32), the
// reduction over n in steps of 32. dY goes global → shared by cp.async through a 3-stage ring
// (the scale is folded into W instead, so dY needs no conversion); the W tile of step t+2 is
// loaded into registers while step t computes, and is converted (int8 → f32 exactly, × sw[n],
// one rounding to bf16) and stored into a double-buffered shared tile at the top of step t+1.
// Math:    dX[m, k] = Σ_n dy[m, n] · bf16(wq[n, k]·sw[n]): the same one bf16 rounding per term
//          (now on the W side, at most 2^-8 relative), f32 products and sums on the tensor cores.
// Launch:  grid (ceil(K/128), ceil(M/128)), block (256), dynamic smem 3·128·64 + 2·32·256 = 40960.
//          N must be a multiple of 8 for both (16-byte cp.async of dY rows), K of 16.
#include "common/recforge.cuh"
#include "common/rf_dequant.cuh"

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

// ---- The pipelined 128 × 128 variants ------------------------------------------------------------
namespace dx128 {
constexpr int THREADS = 256, BM = 128, BK = 128, BN = 32, STAGES = 3;
constexpr int A_ROW = BN * 2, A_STAGE = BM * A_ROW;  // dY: 128 rows of 32 bf16 (64 bytes)
constexpr int B_ROW = BK * 2, B_TILE = BN * B_ROW;   // W:  32 rows of 128 bf16 (256 bytes)
constexpr int SMEM = STAGES * A_STAGE + 2 * B_TILE;  // 40960 bytes

// 16-byte chunk c of row r. dY rows have 4 chunks, XORed with (r/2)%4 so the 8 rows an ldmatrix
// phase reads hit 8 different bank groups; W rows have 16 chunks, XORed with r%8 for ldmatrix.trans.
__device__ __forceinline__ int swz_a(int r, int c) { return r * A_ROW + ((c ^ ((r >> 1) & 3)) << 4); }
__device__ __forceinline__ int swz_b(int r, int c) { return r * B_ROW + ((c ^ (r & 7)) << 4); }

// The slice of one W step a thread stages: row r = tid / 8 of the 32, columns 16·(tid % 8) ..+16.
struct WRegs {
    uint4 v0, v1;  // int8: v0 holds the 16 values; bf16: v0, v1 hold 8 each
    float s;       // sw[n] (int8 only)
};

template <bool DENSE>
__device__ __forceinline__ void load_w(WRegs& w, const void* __restrict__ wv, const float* __restrict__ sw, int N, int K,
                                       int n0, int k0) {
    const int r = threadIdx.x >> 3, c = threadIdx.x & 7, n = n0 + r, k = k0 + c * 16;
    const uint4 zero = {0u, 0u, 0u, 0u};
    w.v0 = zero;
    w.v1 = zero;
    w.s = 0.0f;
    if (n >= N || k >= K) return;
    if (DENSE) {
        const __nv_bfloat16* p = static_cast<const __nv_bfloat16*>(wv) + (size_t)n * K + k;
        w.v0 = rf_ld16(p);
        w.v1 = rf_ld16(p + 8);
    } else {
        w.v0 = rf_ld16(static_cast<const signed char*>(wv) + (size_t)n * K + k);
        w.s = sw[n];
    }
}

// The 8 threads of a row store chunks 2c and 2c+1; threads 4-7 store their odd chunk first, so
// each of the two 16-byte store instructions hits 8 different bank groups (2c alone repeats
// chunks 0, 2, 4, 6 mod 8: a 2-way conflict).
__device__ __forceinline__ void store_pair(rf_smem_t<unsigned char> sB, uint4 lo, uint4 hi) {
    const int r = threadIdx.x >> 3, c = threadIdx.x & 7, h = (c >> 2) & 1;
    rf_st16(sB + swz_b(r, 2 * c + h), h ? hi : lo);
    rf_st16(sB + swz_b(r, 2 * c + 1 - h), h ? lo : hi);
}

template <bool DENSE> __device__ __forceinline__ void store_w(rf_smem_t<unsigned char> sB, const WRegs& w) {
    if (DENSE) {
        store_pair(sB, w.v0, w.v1);
        return;
    }
    unsigned o[8];
    rf_dequant16_bf16(w.v0, w.s, o);
    store_pair(sB, make_uint4(o[0], o[1], o[2], o[3]), make_uint4(o[4], o[5], o[6], o[7]));
}

// dY step: 128 rows × 4 chunks of 8 bf16, two chunks a thread; rows past M and columns past N
// are zeros (N is a multiple of 8, so a chunk is all in or all out).
__device__ __forceinline__ void load_a(rf_smem_t<unsigned char> sA, const __nv_bfloat16* __restrict__ dy, int M, int N,
                                       int m0, int n0) {
    const uint4 zero = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int i = threadIdx.x; i < BM * 4; i += THREADS) {
        const int r = i >> 2, c = i & 3, n = n0 + c * 8;
        if (m0 + r < M && n < N) rf_cp_async16(sA + swz_a(r, c), dy + (size_t)(m0 + r) * N + n);
        else rf_st16(sA + swz_a(r, c), zero);
    }
}
}  // namespace dx128

template <bool DENSE>
__device__ __forceinline__ void dx_gemm128(const __nv_bfloat16* __restrict__ dy, const void* __restrict__ wv,
                                           const float* __restrict__ sw, __nv_bfloat16* __restrict__ dx, int M, int N,
                                           int K, int accumulate) {
    using namespace dx128;
    RF_DYNAMIC_SMEM(unsigned char, smem);
    rf_smem_t<unsigned char> sB0 = smem + STAGES * A_STAGE;
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, t = l & 3;
    const int m0 = blockIdx.y * BM, k0 = blockIdx.x * BK, wm = (w >> 2) * 64, wn = (w & 3) * 32;
    const int steps = (N + BN - 1) / BN;
    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    // Prologue: dY steps 0 .. STAGES-2 in flight (one commit group each, empty past the end);
    // W step 0 in shared memory, W step 1 in registers.
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < steps) load_a(smem + s * A_STAGE, dy, M, N, m0, s * BN);
        rf_cp_async_commit();
    }
    WRegs wr;
    load_w<DENSE>(wr, wv, sw, N, K, 0, k0);
    store_w<DENSE>(sB0, wr);
    if (steps > 1) load_w<DENSE>(wr, wv, sw, N, K, BN, k0);

    for (int st = 0; st < steps; st++) {
        // Groups committed so far: STAGES-1 + st; step st's is complete when at most STAGES-2
        // are pending. The barrier then also ends every read of step st-1's buffers.
        rf_cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int na = st + STAGES - 1;
        if (na < steps) load_a(smem + (na % STAGES) * A_STAGE, dy, M, N, m0, na * BN);
        rf_cp_async_commit();
        if (st + 1 < steps) {
            store_w<DENSE>(sB0 + ((st + 1) & 1) * B_TILE, wr);
            if (st + 2 < steps) load_w<DENSE>(wr, wv, sw, N, K, (st + 2) * BN, k0);
        }
        rf_smem_t<unsigned char> sA = smem + (st % STAGES) * A_STAGE;
        rf_smem_t<unsigned char> sB = sB0 + (st & 1) * B_TILE;
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            unsigned a[4][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
                rf_ldmatrix_x4(a[mi][0], a[mi][1], a[mi][2], a[mi][3], sA + swz_a(wm + mi * 16 + (l & 15), 2 * kk + (l >> 4)));
            // W is [n][k]: ldmatrix.trans of (n 0-7, k 0-7), (n 8-15, k 0-7), (n 0-7, k 8-15),
            // (n 8-15, k 8-15) gives two "col" B fragments.
#pragma unroll
            for (int p = 0; p < 2; p++)
                rf_ldmatrix_x4_trans(b[2 * p][0], b[2 * p][1], b[2 * p + 1][0], b[2 * p + 1][1],
                                     sB + swz_b(kk * 16 + (l & 7) + ((l >> 3) & 1) * 8, (wn >> 3) + 2 * p + (l >> 4)));
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int nj = 0; nj < 4; nj++) rf_mma_m16n8k16_bf16(acc[mi][nj], a[mi], b[nj], acc[mi][nj]);
        }
    }
    rf_cp_async_wait_all();
    // Accumulator element e of tile (mi, nj): row g + 8·(e/2), column 2t + e%2. K is even, so the
    // two columns of a pair are both in or both out: one 4-byte access each.
#pragma unroll
    for (int mi = 0; mi < 4; mi++)
#pragma unroll
        for (int nj = 0; nj < 4; nj++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = m0 + wm + mi * 16 + g + 8 * h, c = k0 + wn + nj * 8 + 2 * t;
                if (r >= M || c >= K) continue;
                rf_store_bf16x2(dx + (size_t)r * K + c, acc[mi][nj][2 * h], acc[mi][nj][2 * h + 1], accumulate);
            }
}

extern "C" __global__ void __launch_bounds__(256, 2) gemm_w8a16_dx128_bf16(const __nv_bfloat16* __restrict__ dy, const signed char* __restrict__ wq,
                                                 const float* __restrict__ sw, __nv_bfloat16* __restrict__ dx, int M, int N,
                                                 int K, int accumulate) {
    dx_gemm128<false>(dy, wq, sw, dx, M, N, K, accumulate);
}

extern "C" __global__ void __launch_bounds__(256, 2) gemm_bf16_dx128_bf16(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ w,
                                                __nv_bfloat16* __restrict__ dx, int M, int N, int K, int accumulate) {
    dx_gemm128<true>(dy, w, nullptr, dx, M, N, K, accumulate);
}
