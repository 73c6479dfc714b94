// Residual add, in place: x += y.
//
// Layout:  x, y  [n] contiguous, element type T (f32 or bf16) — any shape flattened; x and y
//          must not overlap (x += x is the only aliasing that would still be correct).
// Math:    x[i] = x[i] + y[i] in f32, rounded once to T.
// Access:  16-byte vector loads/stores (4 f32 or 8 bf16) when both pointers are 16-byte aligned
//          (checked at run time, uniform over the grid), then a scalar tail of n mod 4|8; a
//          misaligned pointer takes the scalar path for everything.
// Launch:  grid = (ceil(ceil(n / N) / 256)) capped at 65536, block = (256), grid-stride loops
//          (N = 4 for f32, 8 for bf16); indices are 64-bit.
// Must match: backend::cpu::Cpu::add_assign (src/backend/cpu/mod.rs).
#include "common/recforge.cuh"


template <typename T>
__device__ void add_assign(T* __restrict__ x, const T* __restrict__ y, unsigned long long n) {
    constexpr int N = rf_vec16<T>::N;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned long long tid = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned long long nv = (rf_aligned16(x) && rf_aligned16(y)) ? n / N : 0;
    for (unsigned long long v = tid; v < nv; v += stride) {
        float a[N], b[N];
        rf_vec16<T>::load(x + v * N, a);
        rf_vec16<T>::load(y + v * N, b);
#pragma unroll
        for (int j = 0; j < N; j++) a[j] += b[j];
        rf_vec16<T>::store(x + v * N, a);
    }
    for (unsigned long long i = nv * N + tid; i < n; i += stride)
        x[i] = rf_from_float<T>(rf_to_float(x[i]) + rf_to_float(y[i]));
}

extern "C" __global__ void add_f32(float* x, const float* y, unsigned long long n) { add_assign<float>(x, y, n); }
extern "C" __global__ void add_bf16(__nv_bfloat16* x, const __nv_bfloat16* y, unsigned long long n) {
    add_assign<__nv_bfloat16>(x, y, n);
}

// Conversion between element types: y[i] = T(x[i]) (f32 → bf16 rounds to nearest even).
// Layout:  x [n] of S, y [n] of T, any shape flattened. Launch: as add_<dtype>, grid-stride.
// Must match: backend::cpu::Cpu::convert.
template <typename S, typename T>
__device__ void convert(const S* __restrict__ x, T* __restrict__ y, unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = rf_from_float<T>(rf_to_float(x[i]));
}

extern "C" __global__ void convert_f32_bf16(const float* x, __nv_bfloat16* y, unsigned long long n) { convert(x, y, n); }
extern "C" __global__ void convert_bf16_f32(const __nv_bfloat16* x, float* y, unsigned long long n) { convert(x, y, n); }
