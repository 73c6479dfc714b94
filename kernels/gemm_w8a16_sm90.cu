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
#include "common/rf_wgmma.cuh"

namespace dxwg {
constexpr int THREADS = 256, BM = 128, BK = 256, BN = 64, A_STAGES = 3;
constexpr int A_STAGE = BM * BN * 2, B_TILE = BN * BK * 2, SMEM = A_STAGES * A_STAGE + 2 * B_TILE;
constexpr unsigned A_LBO = 128, A_SBO = 1024, B_SBO = 128, B_LBO = (BK / 8) * 128;

__device__ __forceinline__ unsigned pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&v);
}

// dY step: 128 rows × 8 chunks of 8 bf16; rows past M and columns past N are zeros (N is a
// multiple of 8, so a chunk is all in or all out).
__device__ __forceinline__ void load_a(rf_smem_t<unsigned char> sA, const __nv_bfloat16* __restrict__ dy, int M, int N,
                                       int m0, int n0) {
    const uint4 zero = {0u, 0u, 0u, 0u};
    for (int i = threadIdx.x; i < BM * 8; i += THREADS) {
        const int r = (i >> 6) * 8 + (i & 7), n = n0 + ((i >> 3) & 7) * 8;
        if (m0 + r < M && n < N) rf_cp_async16(sA + 16 * i, dy + (size_t)(m0 + r) * N + n);
        else rf_st16(sA + 16 * i, zero);
    }
}

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
        // int8 → f32 exactly without an int→float conversion: with b = w + 128 (w XOR 0x80 as a
        // byte), the f32 with bits 0x4B000000 | b is 2^23 + b, and subtracting 2^23 + 128 leaves w.
        const unsigned in[4] = {w.v[q].x ^ 0x80808080u, w.v[q].y ^ 0x80808080u, w.v[q].z ^ 0x80808080u, w.v[q].w ^ 0x80808080u};
        unsigned o[8];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float f[4];
#pragma unroll
            for (int b = 0; b < 4; b++) f[b] = (__uint_as_float(0x4B000000u | ((in[j] >> (8 * b)) & 0xffu)) - 8388736.0f) * w.s[q];
            o[2 * j] = pack(f[0], f[1]);
            o[2 * j + 1] = pack(f[2], f[3]);
        }
        const int ng = (threadIdx.x >> 7) + 2 * q, base = ng * (int)B_LBO + r8 * 16 + 2 * kg * (int)B_SBO;
        rf_st16(sB + base, make_uint4(o[0], o[1], o[2], o[3]));
        rf_st16(sB + base + B_SBO, make_uint4(o[4], o[5], o[6], o[7]));
    }
}

// Output coordinates of accumulator i of this thread, relative to the block tile.
__device__ __forceinline__ int acc_row(int i) {
    const int l = threadIdx.x & 31;
    return (threadIdx.x >> 7) * 64 + ((threadIdx.x >> 5) & 3) * 16 + (l >> 2) + 8 * ((i & 3) >> 1);
}
__device__ __forceinline__ int acc_col(int i) { return (i >> 2) * 8 + 2 * (threadIdx.x & 3) + (i & 1); }
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

    // Prologue: dY steps 0 .. A_STAGES-2 in flight (one commit group each, empty past the end);
    // W step 0 in shared memory, W step 1 in registers.
    for (int s = 0; s < A_STAGES - 1; s++) {
        if (s < steps) load_a(smem + s * A_STAGE, dy, M, N, m0, s * BN);
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
        if (na < steps) load_a(smem + (na % A_STAGES) * A_STAGE, dy, M, N, m0, na * BN);
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
        const int r = m0 + acc_row(i), c = k0 + acc_col(i);
        if (r >= M || c >= K) continue;
        unsigned* p = reinterpret_cast<unsigned*>(dx + (size_t)r * K + c);
        float y0 = acc[i], y1 = acc[i + 1];
        if (accumulate) {
            const unsigned old = *p;
            y0 += __uint_as_float(old << 16);
            y1 += __uint_as_float(old & 0xffff0000u);
        }
        *p = pack(y0, y1);
    }
}
