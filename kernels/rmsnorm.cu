// RMSNorm forward.
//
// Layout:  x   [rows, d]  row-major, element type T (f32 or bf16)
//          w   [d]        f32 (norm weights are kept in full precision)
//          out [rows, d]  T
// Math:    out[r, i] = x[r, i] * rsqrt(mean_i(x[r, i]^2) + eps) * w[i], statistics in f32.
// Launch:  grid = (rows), block = (256) — one block per row, any d (threads stride the row).
// Must match: backend::cpu::Cpu::rmsnorm (src/backend/cpu/mod.rs).
#include "common/recforge.cuh"

template <typename T>
__device__ void rmsnorm(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ out,
                        int d, float eps) {
    RF_SHARED(float, scratch, [32]);
    const T* xr = x + (size_t)blockIdx.x * d;
    T* yr = out + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = rf_to_float(xr[i]);
        ss += v * v;
    }
    ss = rf_block_sum(ss, scratch);
    const float r = rsqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = rf_from_float<T>(rf_to_float(xr[i]) * r * w[i]);
}

extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* out, int d, float eps) {
    rmsnorm<float>(x, w, out, d, eps);
}

extern "C" __global__ void rmsnorm_bf16(const __nv_bfloat16* x, const float* w, __nv_bfloat16* out, int d,
                                        float eps) {
    rmsnorm<__nv_bfloat16>(x, w, out, d, eps);
}

// RMSNorm backward, dx only (the norm weight is frozen: no dw).
//
// Layout:  x, dy, dx [rows, d]  row-major, element type T (f32 or bf16); dx overwritten, or added
//                                to with accumulate = 1 (the residual stream's gradient, in one pass)
//          w         [d]        f32
// Math:    y = x·r·w with r = rsqrt(mean_i(x²) + eps)  ⇒  with g = dy·w and x̂ = x·r,
//          dx = r·(g − x̂·mean_i(g·x̂)) = r·g − x·r³·(Σ_i g·x)/d. Both row sums (x² and g·x)
//          in f32, one pass; a second pass writes dx (the row is re-read, mostly from L1/L2).
// Access:  16-byte vectors (4 f32 / 8 bf16 of x, dy, dx; 4 or 8 f32 of w) when d is a multiple
//          of that and every pointer is 16-byte aligned (checked at run time, uniform over the
//          grid); otherwise scalar. Each thread sums its own elements, then a block tree sum.
// Launch:  grid = (rows), block = (256) — one block per row, any d (threads stride the row).
// Must match: backend::cpu::Cpu::rmsnorm_backward (src/backend/cpu/mod.rs).


template <int N> __device__ __forceinline__ void load_f32(const float* p, float (&v)[N]) {
#pragma unroll
    for (int c = 0; c < N / 4; c++) {
        float t[4];
        rf_vec16<float>::load(p + 4 * c, t);
#pragma unroll
        for (int k = 0; k < 4; k++) v[4 * c + k] = t[k];
    }
}

template <typename T>
__device__ void rmsnorm_backward(const T* __restrict__ x, const float* __restrict__ w, const T* __restrict__ dy,
                                 T* __restrict__ dx, int d, float eps, int accumulate) {
    RF_SHARED(float, scratch, [32]);
    constexpr int N = rf_vec16<T>::N;
    const size_t row = (size_t)blockIdx.x * d;
    const T* xr = x + row;
    const T* gr = dy + row;
    T* dr = dx + row;
    const bool vec = d % N == 0 && rf_aligned16(x) && rf_aligned16(w) && rf_aligned16(dy) && rf_aligned16(dx);
    float ss = 0.0f, sg = 0.0f;
    if (vec) {
        for (int j = threadIdx.x * N; j < d; j += blockDim.x * N) {
            float xv[N], gv[N], wv[N];
            rf_vec16<T>::load(xr + j, xv);
            rf_vec16<T>::load(gr + j, gv);
            load_f32<N>(w + j, wv);
#pragma unroll
            for (int k = 0; k < N; k++) {
                ss += xv[k] * xv[k];
                sg += gv[k] * wv[k] * xv[k];
            }
        }
    } else {
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            const float v = rf_to_float(xr[i]);
            ss += v * v;
            sg += rf_to_float(gr[i]) * w[i] * v;
        }
    }
    ss = rf_block_sum(ss, scratch);
    sg = rf_block_sum(sg, scratch);
    const float r = rsqrtf(ss / (float)d + eps);
    const float dot = sg * r / (float)d;  // mean(g·x̂)
    const float c = r * r * dot;          // dx = r·g − x·c
    if (vec) {
        for (int j = threadIdx.x * N; j < d; j += blockDim.x * N) {
            float xv[N], gv[N], wv[N];
            rf_vec16<T>::load(xr + j, xv);
            rf_vec16<T>::load(gr + j, gv);
            load_f32<N>(w + j, wv);
#pragma unroll
            for (int k = 0; k < N; k++) xv[k] = r * (gv[k] * wv[k]) - xv[k] * c;
            if (accumulate) {
                float pv[N];
                rf_vec16<T>::load(dr + j, pv);
#pragma unroll
                for (int k = 0; k < N; k++) xv[k] += pv[k];
            }
            rf_vec16<T>::store(dr + j, xv);
        }
    } else {
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            const float v = r * (rf_to_float(gr[i]) * w[i]) - rf_to_float(xr[i]) * c;
            dr[i] = rf_from_float<T>(accumulate ? rf_to_float(dr[i]) + v : v);
        }
    }
}

extern "C" __global__ void rmsnorm_backward_f32(const float* x, const float* w, const float* dy, float* dx, int d,
                                                float eps, int accumulate) {
    rmsnorm_backward<float>(x, w, dy, dx, d, eps, accumulate);
}

extern "C" __global__ void rmsnorm_backward_bf16(const __nv_bfloat16* x, const float* w, const __nv_bfloat16* dy,
                                                 __nv_bfloat16* dx, int d, float eps, int accumulate) {
    rmsnorm_backward<__nv_bfloat16>(x, w, dy, dx, d, eps, accumulate);
}
