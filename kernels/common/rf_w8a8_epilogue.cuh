// The W8A8 linear's fused epilogue for one output element, shared by every W8A8 GEMM mainloop
// (kernels/gemm_w8a8.cu: mma.sync tiles; kernels/gemm_w8a8_sm90.cu: wgmma), so all of them give
// the same bits. Contract and math: the header of kernels/gemm_w8a8.cu.
#pragma once
#include "common/recforge.cuh"

namespace w8a8 {
struct Epilogue {
    const float* sx;
    const signed char* wq;
    const float* sw;
    const __nv_bfloat16* x;
    const unsigned* ocols;
    int nout;
    const float* lora_u;
    const float* lora_b;
    int lora_rank;
    float lora_scale;
    const __nv_bfloat16* residual;
    __nv_bfloat16* out;
    int M, N, K;

    // out[r, c] from the int32 accumulator `acc` of that element; nothing outside M × N.
    __device__ __forceinline__ void store(int acc, int r, int c) const {
        if (r >= M || c >= N) return;
        const float s = sw[c];
        float y = __fmul_rn(__fmul_rn((float)acc, sx[r]), s);
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
};
}  // namespace w8a8
