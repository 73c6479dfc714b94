// SwiGLU forward and backward (the LLaMA MLP's gate: out = silu(gate) ⊙ up).
//
// Layout:  gate, up, out, dy, dgate, dup  [n] contiguous, element type T (f32 or bf16) — any
//          shape [rows, intermediate] flattened; elementwise, so rows do not matter.
// Math:    s = 1 / (1 + exp(−g)) (f32, expf: not the fast __expf);
//          forward   out   = g·s·u
//          backward  dgate = dy·u·s·(1 + g·(1 − s)),  dup = dy·g·s
// Access:  bandwidth-bound, so 16-byte vector loads/stores (4 f32 or 8 bf16 per access) when
//          every pointer is 16-byte aligned (checked at run time, uniform over the grid: device
//          buffers are 256-byte aligned), then a scalar tail of n mod 4|8 elements; a misaligned
//          pointer (a view into a buffer) takes the scalar path for everything.
// Launch:  grid = (ceil(ceil(n / N) / 256)) capped at 65536, block = (256), grid-stride loops
//          (N = 4 for f32, 8 for bf16); indices are 64-bit.
// Must match: backend::cpu::Cpu::swiglu, Cpu::swiglu_backward (src/backend/cpu/mod.rs).
#include "common/recforge.cuh"


__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T>
__device__ void swiglu(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out,
                       unsigned long long n) {
    constexpr int N = rf_vec16<T>::N;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long nv = (rf_aligned16(gate) && rf_aligned16(up) && rf_aligned16(out)) ? n / N : 0;
    for (unsigned long long v = tid; v < nv; v += stride) {
        float g[N], u[N];
        rf_vec16<T>::load(gate + v * N, g);
        rf_vec16<T>::load(up + v * N, u);
#pragma unroll
        for (int j = 0; j < N; j++) g[j] = g[j] * sigmoidf_(g[j]) * u[j];
        rf_vec16<T>::store(out + v * N, g);
    }
    for (unsigned long long i = nv * N + tid; i < n; i += stride) {
        const float g = rf_to_float(gate[i]);
        out[i] = rf_from_float<T>(g * sigmoidf_(g) * rf_to_float(up[i]));
    }
}

template <typename T>
__device__ void swiglu_backward(const T* __restrict__ gate, const T* __restrict__ up, const T* __restrict__ dy,
                                T* __restrict__ dgate, T* __restrict__ dup, unsigned long long n) {
    constexpr int N = rf_vec16<T>::N;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool vec = rf_aligned16(gate) && rf_aligned16(up) && rf_aligned16(dy) && rf_aligned16(dgate) && rf_aligned16(dup);
    const unsigned long long nv = vec ? n / N : 0;
    for (unsigned long long v = tid; v < nv; v += stride) {
        float g[N], u[N], d[N];
        rf_vec16<T>::load(gate + v * N, g);
        rf_vec16<T>::load(up + v * N, u);
        rf_vec16<T>::load(dy + v * N, d);
#pragma unroll
        for (int j = 0; j < N; j++) {
            const float s = sigmoidf_(g[j]);
            const float dg = d[j] * u[j] * s * (1.0f + g[j] * (1.0f - s));
            u[j] = d[j] * (g[j] * s);  // dup
            g[j] = dg;
        }
        rf_vec16<T>::store(dgate + v * N, g);
        rf_vec16<T>::store(dup + v * N, u);
    }
    for (unsigned long long i = nv * N + tid; i < n; i += stride) {
        const float g = rf_to_float(gate[i]), u = rf_to_float(up[i]), d = rf_to_float(dy[i]);
        const float s = sigmoidf_(g);
        dgate[i] = rf_from_float<T>(d * u * s * (1.0f + g * (1.0f - s)));
        dup[i] = rf_from_float<T>(d * (g * s));
    }
}

extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* out, unsigned long long n) {
    swiglu<float>(gate, up, out, n);
}
extern "C" __global__ void swiglu_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up, __nv_bfloat16* out,
                                       unsigned long long n) {
    swiglu<__nv_bfloat16>(gate, up, out, n);
}
extern "C" __global__ void swiglu_backward_f32(const float* gate, const float* up, const float* dy, float* dgate,
                                               float* dup, unsigned long long n) {
    swiglu_backward<float>(gate, up, dy, dgate, dup, n);
}
extern "C" __global__ void swiglu_backward_bf16(const __nv_bfloat16* gate, const __nv_bfloat16* up,
                                                const __nv_bfloat16* dy, __nv_bfloat16* dgate, __nv_bfloat16* dup,
                                                unsigned long long n) {
    swiglu_backward<__nv_bfloat16>(gate, up, dy, dgate, dup, n);
}
