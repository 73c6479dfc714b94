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
#include "common/rf_w8a8_epilogue.cuh"

namespace w8a8 {
constexpr int STAGES = 3, ROWB = 64;

// A block tile of BM × BN outputs computed by WARPS_M × WARPS_N warps.
template <int BM_, int BN_, int WARPS_M, int WARPS_N> struct Tile {
    static constexpr int BM = BM_, BN = BN_, THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // one warp's outputs
    static constexpr int MI = WTM / 16, NJ = WTN / 8;             // its m16 × n8 mma tiles
    static constexpr int A_BYTES = BM * ROWB, STAGE = (BM + BN) * ROWB, SMEM = STAGES * STAGE;
    static __device__ __forceinline__ int warp_m() { return (int)(threadIdx.x >> 5) / WARPS_N * WTM; }
    static __device__ __forceinline__ int warp_n() { return (int)(threadIdx.x >> 5) % WARPS_N * WTN; }
};
using T64 = Tile<64, 64, 2, 2>;
using T128 = Tile<128, 128, 2, 4>;

// Byte offset of 16-byte chunk c (0..3) of row r in a swizzled tile.
__device__ __forceinline__ int swz(int r, int c) { return r * ROWB + ((c ^ ((r >> 1) & 3)) << 4); }

// `rows` rows of 64 bytes from `src` (row stride K) at column k0, zeros past `limit` rows or K.
template <int THREADS>
__device__ __forceinline__ void load_rows(rf_smem_t<unsigned char> dst, const signed char* src, int rows, int limit, int K,
                                          int r0, int k0) {
    const uint4 zero = {0u, 0u, 0u, 0u};
    for (int i = threadIdx.x; i < rows * 4; i += THREADS) {
        const int r = i >> 2, c = i & 3, gk = k0 + c * 16;
        if (r0 + r < limit && gk < K) rf_cp_async16(dst + swz(r, c), src + (size_t)(r0 + r) * K + gk);
        else rf_st16(dst + swz(r, c), zero);
    }
}

// Accumulate this block's tile of Xq·Wqᵀ into acc (per-warp fragments).
template <class T>
__device__ __forceinline__ void mainloop(const signed char* A, const signed char* B, int M, int N, int K,
                                         int (&acc)[T::MI][T::NJ][4]) {
    RF_DYNAMIC_SMEM(unsigned char, smem);
    const int l = threadIdx.x & 31;
    const int m0 = blockIdx.y * T::BM, n0 = blockIdx.x * T::BN, wm = T::warp_m(), wn = T::warp_n();
#pragma unroll
    for (int i = 0; i < T::MI; i++)
#pragma unroll
        for (int j = 0; j < T::NJ; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0;
    const int ktiles = (K + 63) / 64;
    auto load_stage = [&](int st, int k0) {
        load_rows<T::THREADS>(smem + st * T::STAGE, A, T::BM, M, K, m0, k0);
        load_rows<T::THREADS>(smem + st * T::STAGE + T::A_BYTES, B, T::BN, N, K, n0, k0);
    };
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < ktiles) load_stage(s, s * 64);
        rf_cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; kt++) {
        rf_cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kt landed for every thread; nobody still reads stage kt-1
        const int nk = kt + STAGES - 1;
        if (nk < ktiles) load_stage(nk % STAGES, nk * 64);
        rf_cp_async_commit();
        rf_smem_t<unsigned char> sA = smem + (kt % STAGES) * T::STAGE;
        rf_smem_t<unsigned char> sB = sA + T::A_BYTES;
#pragma unroll
        for (int kk = 0; kk < 2; kk++) {
            unsigned a[T::MI][4], b[T::NJ][2];
            // A fragment (m16 × k32 bytes): lanes 0-15 rows 0-15 at chunk 2kk, lanes 16-31 at 2kk+1.
#pragma unroll
            for (int mi = 0; mi < T::MI; mi++)
                rf_ldmatrix_x4(a[mi][0], a[mi][1], a[mi][2], a[mi][3], sA + swz(wm + mi * 16 + (l & 15), 2 * kk + (l >> 4)));
            // B fragments for two n8 tiles per ldmatrix.x4: matrices (n 0-7, chunk 2kk), (n 0-7,
            // chunk 2kk+1), (n 8-15, chunk 2kk), (n 8-15, chunk 2kk+1).
#pragma unroll
            for (int p = 0; p < T::NJ / 2; p++)
                rf_ldmatrix_x4(b[2 * p][0], b[2 * p][1], b[2 * p + 1][0], b[2 * p + 1][1],
                               sB + swz(wn + p * 16 + (l & 7) + ((l >> 4) << 3), 2 * kk + ((l >> 3) & 1)));
#pragma unroll
            for (int mi = 0; mi < T::MI; mi++)
#pragma unroll
                for (int nj = 0; nj < T::NJ; nj++) rf_mma_m16n8k32_s8(acc[mi][nj], a[mi], b[nj], acc[mi][nj]);
        }
    }
    rf_cp_async_wait_all();
}

template <class T> __device__ __forceinline__ void gemm_i32(const signed char* xq, const signed char* wq, int* out, int M, int N, int K) {
    int acc[T::MI][T::NJ][4];
    mainloop<T>(xq, wq, M, N, K, acc);
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
    const int m0 = blockIdx.y * T::BM + T::warp_m(), n0 = blockIdx.x * T::BN + T::warp_n();
    for (int mi = 0; mi < T::MI; mi++)
        for (int nj = 0; nj < T::NJ; nj++)
            for (int e = 0; e < 4; e++) {
                const int r = m0 + mi * 16 + g + 8 * (e >> 1), c = n0 + nj * 8 + 2 * t + (e & 1);
                if (r < M && c < N) out[(size_t)r * N + c] = acc[mi][nj][e];
            }
}

template <class T>
__device__ __forceinline__ void gemm_bf16(const signed char* xq, const float* sx, const signed char* wq, const float* sw,
                                          const __nv_bfloat16* x, const unsigned* ocols, const int* count,
                                          const float* lora_u, const float* lora_b, int lora_rank, float lora_scale,
                                          const __nv_bfloat16* residual, __nv_bfloat16* out, int M, int N, int K) {
    int acc[T::MI][T::NJ][4];
    mainloop<T>(xq, wq, M, N, K, acc);
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
    const int m0 = blockIdx.y * T::BM + T::warp_m(), n0 = blockIdx.x * T::BN + T::warp_n();
    const Epilogue e{sx, wq, sw, x, ocols, *count, lora_u, lora_b, lora_rank, lora_scale, residual, out, M, N, K};
#pragma unroll
    for (int mi = 0; mi < T::MI; mi++)
#pragma unroll
        for (int nj = 0; nj < T::NJ; nj++)
#pragma unroll
            for (int v = 0; v < 4; v++) e.store(acc[mi][nj][v], m0 + mi * 16 + g + 8 * (v >> 1), n0 + nj * 8 + 2 * t + (v & 1));
}
}  // namespace w8a8

extern "C" __global__ void __launch_bounds__(128) gemm_w8a8_i32(const signed char* xq, const signed char* wq, int* out, int M, int N, int K) {
    w8a8::gemm_i32<w8a8::T64>(xq, wq, out, M, N, K);
}

extern "C" __global__ void __launch_bounds__(256, 2) gemm_w8a8_t128_i32(const signed char* xq, const signed char* wq, int* out, int M, int N, int K) {
    w8a8::gemm_i32<w8a8::T128>(xq, wq, out, M, N, K);
}

extern "C" __global__ void __launch_bounds__(128) gemm_w8a8_bf16(const signed char* xq, const float* sx, const signed char* wq, const float* sw,
                                          const __nv_bfloat16* x, const unsigned* ocols, const int* count,
                                          const float* lora_u, const float* lora_b, int lora_rank, float lora_scale,
                                          const __nv_bfloat16* residual, __nv_bfloat16* out, int M, int N, int K) {
    w8a8::gemm_bf16<w8a8::T64>(xq, sx, wq, sw, x, ocols, count, lora_u, lora_b, lora_rank, lora_scale, residual, out, M, N, K);
}

extern "C" __global__ void __launch_bounds__(256, 2) gemm_w8a8_t128_bf16(const signed char* xq, const float* sx, const signed char* wq, const float* sw,
                                          const __nv_bfloat16* x, const unsigned* ocols, const int* count,
                                          const float* lora_u, const float* lora_b, int lora_rank, float lora_scale,
                                          const __nv_bfloat16* residual, __nv_bfloat16* out, int M, int N, int K) {
    w8a8::gemm_bf16<w8a8::T128>(xq, sx, wq, sw, x, ocols, count, lora_u, lora_b, lora_rank, lora_scale, residual, out, M, N, K);
}
