// recforge-arch: sm_90a
// dX = dY · dequant(W) on Hopper's warpgroup tensor cores (wgmma): the same contract as
// gemm_w8a16_dx128_bf16 in kernels/gemm_w8a16.cu (read its header), with a mainloop for sm_90a.
// Built to compute_90a PTX (the first line above tells build.rs): loads on H100 / H200 only.
//
// Layout:  dy [M, N] bf16 row-major; wq [N, K] i8, sw [N] f32; dx [M, K] bf16, overwritten or (with
//          accumulate = 1) added to. N a multiple of 8 (16-byte cp.async of dY rows), K of 16.
// Math:    dX[m, k] = Σ_n dy[m, n] · bf16(wq[n, k]·sw[n]) — one bf16 rounding per term, on the W
//          side, as dx128; products and sums in f32 on the tensor cores (wgmma ... f32.bf16.bf16),
//          in the hardware's order (not bit-identical to dx128; the same bound).
// Tiling:  block tile 128 (m) × 256 (k), the reduction over n in steps of 64. 2 warpgroups; warpgroup
//          q computes rows 64q .. 64q+63 × all 256 columns: per step 4 × wgmma.m64n256k16 into 128
//          f32 accumulators per thread.
//          dY step (A, K-major, 16 KiB): global → shared by cp.async through a 3-stage ring, in the
//          unswizzled canonical layout (chunk i = 64·(r/8) + 8·c + r%8 of row r, 16-byte chunk c of
//          the step's 128 bytes, at byte 16·i: LBO 128, SBO 1024), as the W8A8 wgmma tile.
//          W step (B, 64 n × 256 k, 32 KiB as bf16): loaded to registers a step ahead (each thread
//          4 × 16 int8 of one row n), converted (int8 → f32 by the 2^23 trick, × sw[n], one bf16
//          rounding) and stored into a double-buffered tile in wgmma's MN-major canonical layout
//          (k contiguous: element (k, n) at 2·(k%8) + (k/8)·128 + (n%8)·16 + (n/8)·4096, i.e.
//          SBO 128 between 8-column groups, LBO 4096 between 8-row groups; imm-trans-b = 1). The 8
//          lanes that hold rows n..n+7 of one 16-column group write one 128-byte core matrix.
// Pipeline (per step st): wait for dY step st → proxy fence (this thread's copies, zero fill and
//          W stores) → barrier → fence, 4 wgmma, commit → wgmma.wait_group 1 (this warpgroup's step
//          st−1 is done) → barrier (both are) → refill dY stage (st−1)%3 with step st+2 → store W
//          step st+1 into buffer (st+1)%2 (= step st−1's) → load W step st+2 into registers.
// Launch:  grid (ceil(K/256), ceil(M/128)), block (256), dynamic smem 3·16384 + 2·32768 = 114688.
// Kernel:  gemm_w8a16_dx_wg_bf16. Must match: backend::cpu::Cpu::linear_backward_input with
//          LinearWeight::Int8, within the bound tests/kernels_linear.rs states.
#include "common/recforge.cuh"
#include "common/rf_dequant.cuh"
#include "common/rf_wgmma.cuh"

namespace dxwg {
constexpr int THREADS = 256, BM = 128, BK = 256, BN = 64, A_STAGES = 3;
constexpr int A_STAGE = BM * BN * 2, B_TILE = BN * BK * 2, SMEM = A_STAGES * A_STAGE + 2 * B_TILE;
constexpr unsigned A_LBO = 128, A_SBO = 1024, B_SBO = 128, B_LBO = (BK / 8) * 128;

// A thread's 4 items of a W step: item q is row n = 8·(tid/128 + 2q) + tid%8 of the 64, columns
// 16·((tid/8) % 16) .. +16 of the 256.
struct WRegs {
    uint4 v[4];
    float s[4];
};
__device__ __forceinline__ void load_w(WRegs& w, const signed char* __restrict__ wq, const float* __restrict__ sw, int N,
                                       int K, int n0, int k0) {
    const int r8 = threadIdx.x & 7, kg = (threadIdx.x >> 3) & 15, k = k0 + kg * 16;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        const int n = n0 + 8 * ((threadIdx.x >> 7) + 2 * q) + r8;
        const uint4 zero = {0u, 0u, 0u, 0u};
        w.v[q] = zero;
        w.s[q] = 0.0f;
        if (n < N && k < K) {
            w.v[q] = rf_ld16(wq + (size_t)n * K + k);
            w.s[q] = sw[n];
        }
    }
}
__device__ __forceinline__ void store_w(rf_smem_t<unsigned char> sB, const WRegs& w) {
    const int r8 = threadIdx.x & 7, kg = (threadIdx.x >> 3) & 15;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        unsigned o[8];
        rf_dequant16_bf16(w.v[q], w.s[q], o);
        const int ng = (threadIdx.x >> 7) + 2 * q, base = ng * (int)B_LBO + r8 * 16 + 2 * kg * (int)B_SBO;
        rf_st16(sB + base, make_uint4(o[0], o[1], o[2], o[3]));
        rf_st16(sB + base + B_SBO, make_uint4(o[4], o[5], o[6], o[7]));
    }
}

}  // namespace dxwg

extern "C" __global__ void __launch_bounds__(256, 1) gemm_w8a16_dx_wg_bf16(const __nv_bfloat16* __restrict__ dy, const signed char* __restrict__ wq,
                                                 const float* __restrict__ sw, __nv_bfloat16* __restrict__ dx, int M, int N,
                                                 int K, int accumulate) {
    using namespace dxwg;
    RF_DYNAMIC_SMEM(unsigned char, smem);
    rf_smem_t<unsigned char> sB0 = smem + A_STAGES * A_STAGE;
    const int m0 = blockIdx.y * BM, k0 = blockIdx.x * BK, q = threadIdx.x >> 7;
    const int steps = (N + BN - 1) / BN;
    float acc[BK / 2];
#pragma unroll
    for (int i = 0; i < BK / 2; i++) acc[i] = 0.0f;
    // dY step from reduction column n0: 128 rows × 128 bytes, zeros past M and N (N is a multiple
    // of 8, so a 16-byte chunk is all in or all out).
    auto load_a = [&](rf_smem_t<unsigned char> sA, int n0) {
        rf_wgmma_load_kmajor128<THREADS>(sA, reinterpret_cast<const unsigned char*>(dy), BM, M, (size_t)N * 2, m0,
                                         (size_t)n0 * 2);
    };

    // Prologue: dY steps 0 .. A_STAGES-2 in flight (one commit group each, empty past the end);
    // W step 0 in shared memory, W step 1 in registers.
    for (int s = 0; s < A_STAGES - 1; s++) {
        if (s < steps) load_a(smem + s * A_STAGE, s * BN);
        rf_cp_async_commit();
    }
    WRegs wr;
    load_w(wr, wq, sw, N, K, 0, k0);
    store_w(sB0, wr);
    if (steps > 1) load_w(wr, wq, sw, N, K, BN, k0);

    for (int st = 0; st < steps; st++) {
        rf_cp_async_wait<A_STAGES - 2>();
        rf_fence_proxy_async();  // this thread's dY copies and zero fill, and its W stores of step st
        __syncthreads();         // ... every thread's
        rf_smem_t<unsigned char> sA = smem + (st % A_STAGES) * A_STAGE + q * 64 * BN * 2;
        rf_smem_t<unsigned char> sB = sB0 + (st & 1) * B_TILE;
        rf_wgmma_fence_operand(acc);
        rf_wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++)
            rf_wgmma_bf16_tb<BK>(acc, rf_wgmma_desc(sA + kk * 2 * A_LBO, A_LBO, A_SBO),
                                 rf_wgmma_desc(sB + kk * 2 * B_LBO, B_LBO, B_SBO), 1);
        rf_wgmma_commit();
        rf_wgmma_wait<1>(acc);  // this warpgroup's step st-1 is done
        __syncthreads();        // ... and the other's: dY stage (st-1)%3 and W buffer (st+1)%2 are free
        const int na = st + A_STAGES - 1;
        if (na < steps) load_a(smem + (na % A_STAGES) * A_STAGE, na * BN);
        rf_cp_async_commit();
        if (st + 1 < steps) {
            store_w(sB0 + ((st + 1) & 1) * B_TILE, wr);
            if (st + 2 < steps) load_w(wr, wq, sw, N, K, (st + 2) * BN, k0);
        }
    }
    rf_wgmma_wait<0>(acc);
    rf_cp_async_wait_all();
    // Accumulators i, i+1 are columns c, c+1 of one row; K is even, so both are in or both out:
    // one 4-byte access each.
#pragma unroll
    for (int i = 0; i < BK / 2; i += 2) {
        const int r = m0 + 64 * q + rf_wgmma_acc_row(i), c = k0 + rf_wgmma_acc_col(i);
        if (r >= M || c >= K) continue;
        rf_store_bf16x2(dx + (size_t)r * K + c, acc[i], acc[i + 1], accumulate);
    }
}
