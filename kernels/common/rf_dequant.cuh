// int8 weight → bf16 operand conversion and bf16 pair stores, shared by the dX kernels
// (kernels/gemm_w8a16.cu dx128, kernels/gemm_w8a16_sm90.cu), so both round the same way.
#pragma once
#include "common/recforge.cuh"

// Two f32 → one word of two bf16 (round to nearest even), `lo` in the low half.
__device__ __forceinline__ unsigned rf_pack_bf16x2(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&v);
}

// 16 int8 weights (one uint4, in memory order) × the row scale s → 8 words of bf16 pairs:
// bf16(wq·s), one rounding each. int8 → f32 exactly without an int→float conversion: with
// b = w + 128 (w XOR 0x80 as a byte), the f32 with bits 0x4B000000 | b is 2^23 + b, and
// subtracting 2^23 + 128 leaves w.
__device__ __forceinline__ void rf_dequant16_bf16(uint4 v, float s, unsigned (&o)[8]) {
    const unsigned in[4] = {v.x ^ 0x80808080u, v.y ^ 0x80808080u, v.z ^ 0x80808080u, v.w ^ 0x80808080u};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float f[4];
#pragma unroll
        for (int b = 0; b < 4; b++) f[b] = (__uint_as_float(0x4B000000u | ((in[j] >> (8 * b)) & 0xffu)) - 8388736.0f) * s;
        o[2 * j] = rf_pack_bf16x2(f[0], f[1]);
        o[2 * j + 1] = rf_pack_bf16x2(f[2], f[3]);
    }
}

// p[0..2) = bf16(y0, y1), or with `accumulate` bf16(old + y): one 4-byte access (4-byte aligned).
__device__ __forceinline__ void rf_store_bf16x2(__nv_bfloat16* p, float y0, float y1, int accumulate) {
    unsigned* w = reinterpret_cast<unsigned*>(p);
    if (accumulate) {
        const unsigned old = *w;
        y0 += __uint_as_float(old << 16);
        y1 += __uint_as_float(old & 0xffff0000u);
    }
    *w = rf_pack_bf16x2(y0, y1);
}
