// W8A8 linear on int8 tensor cores: Y[M, N] = dequant(Xq[M, K] · Wq[N, K]ᵀ) (+ outlier side
// product) (+ residual), the forward of every frozen linear (DESIGN.md §3).
//
// Layout:  lora_u [M, R] f32 and lora_b [N, R] f32, or null (R = lora_rank);
//          xq [M, K] i8 (quantize_rows_bf16), sx [M] f32; wq [N, K] i8, sw [N] f32 (per output
//          row absmax scales); x [M, K] bf16 (the unquantized activations: the outlier columns
//          ocols[0..count) are read from it); residual [M, N] bf16 or null; out [M, N] bf16.
//          K must be a multiple of 16 (16-byte chunks); M, N are arbitrary.
// Math:    acc = Σ_k xq·wq in int32 (exact); y = (acc·sx[r])·sw[c]; then, in column order,
//          y += x[r, o]·(wq[c, o]·sw[c]) for every outlier column o; with a LoRA (lora_u non-null,
//          see lora.cu) y += scale · Σ_j u[r, j]·B[c, j]; y += residual; out = bf16(y).
//          Products and sums use the _rn intrinsics so no FMA contraction changes the rounding:
//          the f32 y equals the CPU reference bit for bit.
// Tiling:  block tile 64×64, K in 64-byte stages, a 3-stage cp.async pipeline; shared memory rows
//          of 64 bytes with an XOR swizzle (16-byte chunk c of row r stored at chunk c ^ ((r/2) & 3))
//          so the 8 rows of each ldmatrix land in 8 different bank groups; 4 warps in 2×2, each
//          32×32 = 2 (m16) × 4 (n8) mma.sync.m16n8k32.s8 tiles; 2 mma k-steps per stage.
// Launch:  grid (ceil(N/64), ceil(M/64)), block (128), dynamic smem 3·2·64·64 = 24576 bytes.
// Kernels: gemm_w8a8_i32 writes the raw int32 accumulators (exactness tests); gemm_w8a8_bf16 the
//          full epilogue.
// Must match: backend::cpu::Cpu::linear with LinearWeight::Int8 (src/backend/cpu/mod.rs).
#include "common/recforge.cuh"

namespace w8a8 {
constexpr int STAGES = 3, ROWB = 64, THREADS = 128, TILE = 64 * ROWB;

// Byte offset of 16-byte chunk c (0..3) of row r in a swizzled tile.
__device__ __forceinline__ int swz(int r, int c) { return r * ROWB + ((c ^ ((r >> 1) & 3)) << 4); }

__device__ __forceinline__ void load_stage(rf_smem_t<unsigned char> sA, rf_smem_t<unsigned char> sB, const signed char* A,
                                           const signed char* B, int M, int N, int K, int m0, int n0, int k0) {
    const uint4 zero = {0u, 0u, 0u, 0u};
    for (int i = threadIdx.x; i < 256; i += THREADS) {
        const int r = i >> 2, c = i & 3, gk = k0 + c * 16;
        if (m0 + r < M && gk < K) rf_cp_async16(sA + swz(r, c), A + (size_t)(m0 + r) * K + gk);
        else rf_st16(sA + swz(r, c), zero);
        if (n0 + r < N && gk < K) rf_cp_async16(sB + swz(r, c), B + (size_t)(n0 + r) * K + gk);
        else rf_st16(sB + swz(r, c), zero);
    }
}

// Accumulate the 64×64 tile of Xq·Wqᵀ for this block into acc (per-warp fragments).
__device__ __forceinline__ void mainloop(const signed char* A, const signed char* B, int M, int N, int K, int (&acc)[2][4][4]) {
    RF_DYNAMIC_SMEM(unsigned char, smem);
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int m0 = blockIdx.y * 64, n0 = blockIdx.x * 64, wm = (w >> 1) * 32, wn = (w & 1) * 32;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++)
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0;
    const int ktiles = (K + 63) / 64;
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < ktiles) load_stage(smem + s * 2 * TILE, smem + s * 2 * TILE + TILE, A, B, M, N, K, m0, n0, s * 64);
        rf_cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; kt++) {
        rf_cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt landed for every thread; nobody still reads stage kt-1
        const int nk = kt + STAGES - 1;
        if (nk < ktiles) {
            const int st = nk % STAGES;
            load_stage(smem + st * 2 * TILE, smem + st * 2 * TILE + TILE, A, B, M, N, K, m0, n0, nk * 64);
        }
        rf_cp_async_commit();
        rf_smem_t<unsigned char> sA = smem + (kt % STAGES) * 2 * TILE;
        rf_smem_t<unsigned char> sB = sA + TILE;
        for (int kk = 0; kk < 2; kk++) {
            unsigned a[2][4], b[4][2];
            // A fragment (m16 × k32 bytes): lanes 0-15 rows 0-15 at chunk 2kk, lanes 16-31 at 2kk+1.
            for (int mi = 0; mi < 2; mi++)
                rf_ldmatrix_x4(a[mi][0], a[mi][1], a[mi][2], a[mi][3], sA + swz(wm + mi * 16 + (l & 15), 2 * kk + (l >> 4)));
            // B fragments for two n8 tiles per ldmatrix.x4: matrices (n 0-7, chunk 2kk), (n 0-7,
            // chunk 2kk+1), (n 8-15, chunk 2kk), (n 8-15, chunk 2kk+1).
            for (int p = 0; p < 2; p++)
                rf_ldmatrix_x4(b[2 * p][0], b[2 * p][1], b[2 * p + 1][0], b[2 * p + 1][1],
                               sB + swz(wn + p * 16 + (l & 7) + ((l >> 4) << 3), 2 * kk + ((l >> 3) & 1)));
            for (int mi = 0; mi < 2; mi++)
                for (int nj = 0; nj < 4; nj++) rf_mma_m16n8k32_s8(acc[mi][nj], a[mi], b[nj], acc[mi][nj]);
        }
    }
}
}  // namespace w8a8

extern "C" __global__ void gemm_w8a8_i32(const signed char* xq, const signed char* wq, int* out, int M, int N, int K) {
    int acc[2][4][4];
    w8a8::mainloop(xq, wq, M, N, K, acc);
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, t = l & 3;
    const int m0 = blockIdx.y * 64 + (w >> 1) * 32, n0 = blockIdx.x * 64 + (w & 1) * 32;
    for (int mi = 0; mi < 2; mi++)
        for (int nj = 0; nj < 4; nj++)
            for (int e = 0; e < 4; e++) {
                const int r = m0 + mi * 16 + g + 8 * (e >> 1), c = n0 + nj * 8 + 2 * t + (e & 1);
                if (r < M && c < N) out[(size_t)r * N + c] = acc[mi][nj][e];
            }
}

extern "C" __global__ void gemm_w8a8_bf16(const signed char* xq, const float* sx, const signed char* wq, const float* sw,
                                          const __nv_bfloat16* x, const unsigned* ocols, const int* count,
                                          const float* lora_u, const float* lora_b, int lora_rank, float lora_scale,
                                          const __nv_bfloat16* residual, __nv_bfloat16* out, int M, int N, int K) {
    int acc[2][4][4];
    w8a8::mainloop(xq, wq, M, N, K, acc);
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, t = l & 3;
    const int m0 = blockIdx.y * 64 + (w >> 1) * 32, n0 = blockIdx.x * 64 + (w & 1) * 32;
    const int nout = *count;
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int nj = 0; nj < 4; nj++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int r = m0 + mi * 16 + g + 8 * (e >> 1), c = n0 + nj * 8 + 2 * t + (e & 1);
                if (r >= M || c >= N) continue;
                const float s = sw[c];
                float y = __fmul_rn(__fmul_rn((float)acc[mi][nj][e], sx[r]), s);
                for (int j = 0; j < nout; j++) {
                    const unsigned o = ocols[j];
                    y = __fadd_rn(y, __fmul_rn(__bfloat162float(x[(size_t)r * K + o]), __fmul_rn((float)wq[(size_t)c * K + o], s)));
                }
                if (lora_u) {
                    float lt = 0.0f;
                    for (int j = 0; j < lora_rank; j++)
                        lt = __fadd_rn(lt, __fmul_rn(lora_u[(size_t)r * lora_rank + j], lora_b[(size_t)c * lora_rank + j]));
                    y = __fadd_rn(y, __fmul_rn(lora_scale, lt));
                }
                if (residual) y = __fadd_rn(y, __bfloat162float(residual[(size_t)r * N + c]));
                out[(size_t)r * N + c] = __float2bfloat16(y);
            }
}
