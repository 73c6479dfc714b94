// recforge-arch: sm_90a
// Self-test of the Hopper warpgroup MMA primitives of kernels/common/rf_wgmma.cuh, so the
// simulator's model of wgmma (descriptors, the unswizzled K-major layout, the accumulator
// fragment, scale-d, commit / wait) is checked against the documented semantics on every test run
// (tests/simulator.rs) and against an H100 when one is there: the same kernel, inputs and
// expected values on both. Built for sm_90a only (first line).
//
// selftest_wgmma_s8: one warpgroup (block 128). a [64 × 32] i8 and b [256 × 32] i8, row-major
//   (K-major), packed 4 per u32. Thread i copies them into shared memory in the canonical layout
//   with the given strides (byte k of row r at (r % 8)·16 + (r / 8)·sbo + (k / 16)·lbo + k % 16,
//   A from byte 0, B from byte 8192), then: D = A·Bᵀ (scale-d 0), and D += A·Bᵀ again (scale-d 1)
//   in a second batch when `twice`. out [64 × 256] i32 row-major from the fragment: thread
//   (warp w, lane 4g + t) writes d[4j + v] to row 16w + g + 8(v/2), column 8j + 2t + v%2.
//   Dynamic shared memory: 8192 + B's extent (31·sbo_b + lbo_b + 128) bytes, given by the caller.
#include "common/recforge.cuh"
#include "common/rf_wgmma.cuh"

// out [64 × 256] row-major from the accumulator fragment (32-bit values): thread (warp w, lane
// 4g + t) holds d[4j + v] = row 16w + g + 8(v/2), column 8j + 2t + v%2.
__device__ __forceinline__ unsigned bits_of(int x) { return (unsigned)x; }
__device__ __forceinline__ unsigned bits_of(float x) { return __float_as_uint(x); }
template <class T> __device__ __forceinline__ void store_fragment(unsigned* out, const T (&d)[128]) {
    const int w = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
#pragma unroll
    for (int i = 0; i < 128; i++) {
        const int j = i >> 2, v = i & 3;
        out[(16 * w + g + 8 * (v >> 1)) * 256 + 8 * j + 2 * t + (v & 1)] = bits_of(d[i]);
    }
}

extern "C" __global__ void __launch_bounds__(128) selftest_wgmma_s8(unsigned lbo_a, unsigned sbo_a, unsigned lbo_b, unsigned sbo_b,
                                                                    int twice, const unsigned* a, const unsigned* b, unsigned* out) {
    RF_DYNAMIC_SMEM(unsigned char, smem);
    rf_smem_t<unsigned char> sa = smem, sb = smem + 8192;
    const int tid = threadIdx.x;
    // 16-byte chunk c (0, 1) of row r: 64 + 256 rows × 2 chunks, each a uint4 of the input.
    for (int i = tid; i < (64 + 256) * 2; i += 128) {
        const bool is_a = i < 128;
        const int j = is_a ? i : i - 128, r = j >> 1, c = j & 1;
        const unsigned* src = (is_a ? a : b) + r * 8 + c * 4;
        const uint4 v = {src[0], src[1], src[2], src[3]};
        if (is_a) rf_st16(sa + (r % 8) * 16 + (r / 8) * sbo_a + c * lbo_a, v);
        else rf_st16(sb + (r % 8) * 16 + (r / 8) * sbo_b + c * lbo_b, v);
    }
    rf_fence_proxy_async();  // ordinary stores → the tensor cores' (async proxy) reads
    __syncthreads();
    int d[128];
#pragma unroll
    for (int i = 0; i < 128; i++) d[i] = 0x5A5A5A5A;  // scale-d 0 must ignore this
    const uint64_t da = rf_wgmma_desc(sa, lbo_a, sbo_a), db = rf_wgmma_desc(sb, lbo_b, sbo_b);
    rf_wgmma_fence_operand(d);
    rf_wgmma_fence();
    rf_wgmma_s8<256>(d, da, db, 0);
    rf_wgmma_commit();
    if (twice) {
        rf_wgmma_s8<256>(d, da, db, 1);
        rf_wgmma_commit();
    }
    rf_wgmma_wait<0>(d);
    store_fragment(out, d);
}

// selftest_wgmma_bf16: one warpgroup (block 128). a [64 × 16] bf16 row-major (K-major) and b
//   [16 × 256] bf16 row-major, i.e. B with the N dimension contiguous (MN-major), 2 per u32. Thread
//   i copies them into shared memory in the canonical layouts: A's 16-byte chunk c of row r at
//   (r % 8)·16 + (r / 8)·sbo_a + c·lbo_a from byte 0; B's 8 columns 8j .. 8j+7 of row k at
//   (k % 8)·16 + j·sbo_b + (k / 8)·lbo_b from byte 8192. Then D = A·B (scale-d 0) and, when
//   `twice`, D += A·B in a second batch, by wgmma.m64n256k16.f32.bf16.bf16 with imm-trans-b = 1.
//   out [64 × 256] f32 row-major from the fragment, as selftest_wgmma_s8.
//   Dynamic shared memory: 8192 + 31·sbo_b + lbo_b + 128 bytes, given by the caller.
extern "C" __global__ void __launch_bounds__(128) selftest_wgmma_bf16(unsigned lbo_a, unsigned sbo_a, unsigned lbo_b, unsigned sbo_b,
                                                                      int twice, const unsigned* a, const unsigned* b, unsigned* out) {
    RF_DYNAMIC_SMEM(unsigned char, smem);
    rf_smem_t<unsigned char> sa = smem, sb = smem + 8192;
    const int tid = threadIdx.x;
    // A: 64 rows × 2 chunks; B: 16 rows × 32 chunks. Each chunk is 4 u32 of the input.
    for (int i = tid; i < 64 * 2 + 16 * 32; i += 128) {
        if (i < 128) {
            const int r = i >> 1, c = i & 1;
            const unsigned* src = a + r * 8 + c * 4;
            rf_st16(sa + (r % 8) * 16 + (r / 8) * sbo_a + c * lbo_a, uint4{src[0], src[1], src[2], src[3]});
        } else {
            const int j = i - 128, k = j >> 5, c = j & 31;
            const unsigned* src = b + k * 128 + c * 4;
            rf_st16(sb + (k % 8) * 16 + c * sbo_b + (k / 8) * lbo_b, uint4{src[0], src[1], src[2], src[3]});
        }
    }
    rf_fence_proxy_async();
    __syncthreads();
    float d[128];
#pragma unroll
    for (int i = 0; i < 128; i++) d[i] = 1e30f;  // scale-d 0 must ignore this
    const uint64_t da = rf_wgmma_desc(sa, lbo_a, sbo_a), db = rf_wgmma_desc(sb, lbo_b, sbo_b);
    rf_wgmma_fence_operand(d);
    rf_wgmma_fence();
    rf_wgmma_bf16_tb<256>(d, da, db, 0);
    rf_wgmma_commit();
    if (twice) {
        rf_wgmma_bf16_tb<256>(d, da, db, 1);
        rf_wgmma_commit();
    }
    rf_wgmma_wait<0>(d);
    store_fragment(out, d);
}
