// recforge-arch: sm_90a
// W8A8 linear on Hopper's warpgroup tensor cores (wgmma): the same contract, math and epilogue
// as kernels/gemm_w8a8.cu (read its header), with a mainloop for sm_90a. Built to compute_90a PTX
// (the first line above tells build.rs), so it loads on H100 / H200 only; other GPUs keep the
// mma.sync tiles.
//
// Why: mma.sync runs on Hopper at a fraction of the tensor cores' rate, which only wgmma reaches
// (DESIGN.md §6: "on Hopper a wgmma path"); the forward GEMMs are two thirds of a LoRA training
// step's tensor work (forward + checkpoint recompute).
//
// Layout:  as gemm_w8a8.cu: xq [M, K] i8, wq [N, K] i8 (both K-major, as wgmma wants 8-bit
//          operands), K a multiple of 16; M, N arbitrary.
// Tiling:  block tile 128 × 256, K in 128-byte stages, a 4-stage cp.async ring (48 KiB a stage).
//          Each operand tile is stored as wgmma's unswizzled K-major canonical layout
//          (rf_wgmma_load_kmajor128 in common/rf_wgmma.cuh): core matrices of 8 rows × 16 bytes, 128 contiguous bytes, with
//          LBO = 128 (next 16 bytes of K) and SBO = 1024 (next 8 rows). Chunk i of a stage's
//          operand (i = 64·(r/8) + 8·c + r%8 for row r, 16-byte chunk c of the 128) sits at byte
//          16·i, so the 8 lanes that write one core matrix write 128 contiguous bytes, and a warp
//          reads 64 contiguous bytes from each of 8 rows of global memory.
//          2 warpgroups (256 threads); warpgroup q computes rows 64q .. 64q+63 × all 256 columns:
//          per stage 4 × wgmma.m64n256k32.s32.s8.s8 into 128 int32 accumulators per thread.
// Pipeline (per stage kt): wait for stage kt's copies → proxy fence → barrier → fence, 4 wgmma, commit →
//          wgmma.wait_group 1 (this warpgroup's stage kt−1 batch is done) → barrier (both are) →
//          refill stage kt−1's buffer with stage kt+3 → commit. The tensor cores always have the
//          current batch queued while the copies of the next three are in flight.
// Launch:  grid (ceil(N/256), ceil(M/128)), block (256), dynamic smem 4 · (128 + 256) · 128 =
//          196608 bytes (opt-in above 48 KiB; an H100 block may have 227 KiB).
// Kernels: gemm_w8a8_wg_i32 (raw int32, exactness tests), gemm_w8a8_wg_bf16 (full epilogue).
// Must match: backend::cpu::Cpu::linear with LinearWeight::Int8, bit for bit (as gemm_w8a8.cu).
#include "common/recforge.cuh"
#include "common/rf_w8a8_epilogue.cuh"
#include "common/rf_wgmma.cuh"

namespace w8a8_wg {
constexpr int BM = 128, BN = 256, BK = 128, STAGES = 4, THREADS = 256;
constexpr int A_BYTES = BM * BK, STAGE = (BM + BN) * BK, SMEM = STAGES * STAGE;
constexpr unsigned LBO = 128, SBO = 1024;

// Accumulate this block's 128 × 256 tile of Xq·Wqᵀ: thread (warpgroup q, warp w of it, lane
// g·4 + t) ends with acc[4j + v] = Y[64q + 16w + g + 8(v/2)][8j + 2t + v%2] of the tile.
__device__ __forceinline__ void mainloop(const signed char* A, const signed char* B, int M, int N, int K, int (&acc)[BN / 2]) {
    RF_DYNAMIC_SMEM(unsigned char, smem);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, q = threadIdx.x >> 7;
#pragma unroll
    for (int i = 0; i < BN / 2; i++) acc[i] = 0;
    const int ktiles = (K + BK - 1) / BK;
    auto load_stage = [&](int st, int k0) {
        const unsigned char *a = reinterpret_cast<const unsigned char*>(A), *b = reinterpret_cast<const unsigned char*>(B);
        rf_wgmma_load_kmajor128<THREADS>(smem + st * STAGE, a, BM, M, (size_t)K, m0, (size_t)k0);
        rf_wgmma_load_kmajor128<THREADS>(smem + st * STAGE + A_BYTES, b, BN, N, (size_t)K, n0, (size_t)k0);
    };
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < ktiles) load_stage(s, s * BK);
        rf_cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; kt++) {
        rf_cp_async_wait<STAGES - 2>();
        rf_fence_proxy_async();  // this thread's copies and zero fill, visible to the tensor cores
        __syncthreads();         // ... for every thread's
        rf_smem_t<unsigned char> sA = smem + (kt % STAGES) * STAGE + q * 64 * BK;
        rf_smem_t<unsigned char> sB = smem + (kt % STAGES) * STAGE + A_BYTES;
        rf_wgmma_fence_operand(acc);
        rf_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 32; kk++)
            rf_wgmma_s8<BN>(acc, rf_wgmma_desc(sA + kk * 2 * LBO, LBO, SBO), rf_wgmma_desc(sB + kk * 2 * LBO, LBO, SBO), 1);
        rf_wgmma_commit();
        rf_wgmma_wait<1>(acc);  // this warpgroup's batch of stage kt-1 is done
        __syncthreads();        // ... and the other's: stage kt-1's buffer is free
        const int nk = kt + STAGES - 1;
        if (nk < ktiles) load_stage(nk % STAGES, nk * BK);
        rf_cp_async_commit();
    }
    rf_wgmma_wait<0>(acc);
    rf_cp_async_wait_all();
}

}  // namespace w8a8_wg

extern "C" __global__ void __launch_bounds__(256, 1) gemm_w8a8_wg_i32(const signed char* xq, const signed char* wq, int* out, int M, int N, int K) {
    using namespace w8a8_wg;
    int acc[BN / 2];
    mainloop(xq, wq, M, N, K, acc);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
#pragma unroll
    for (int i = 0; i < BN / 2; i++) {
        const int r = m0 + 64 * (threadIdx.x >> 7) + rf_wgmma_acc_row(i), c = n0 + rf_wgmma_acc_col(i);
        if (r < M && c < N) out[(size_t)r * N + c] = acc[i];
    }
}

extern "C" __global__ void __launch_bounds__(256, 1) gemm_w8a8_wg_bf16(const signed char* xq, const float* sx, const signed char* wq, const float* sw,
                                          const __nv_bfloat16* x, const unsigned* ocols, const int* count,
                                          const float* lora_u, const float* lora_b, int lora_rank, float lora_scale,
                                          const __nv_bfloat16* residual, __nv_bfloat16* out, int M, int N, int K) {
    using namespace w8a8_wg;
    int acc[BN / 2];
    mainloop(xq, wq, M, N, K, acc);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const w8a8::Epilogue e{sx, wq, sw, x, ocols, *count, lora_u, lora_b, lora_rank, lora_scale, residual, out, M, N, K};
#pragma unroll
    for (int i = 0; i < BN / 2; i++) e.store(acc[i], m0 + 64 * (threadIdx.x >> 7) + rf_wgmma_acc_row(i), n0 + rf_wgmma_acc_col(i));
}
