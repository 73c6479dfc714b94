// Rotary position embedding (RoPE), forward and backward, in place; Hugging Face's rotate-half
// convention (element i pairs with element i + head_dim/2 of the same head).
//
// Layout:  x          [tokens, heads, head_dim]  row-major, element type T (f32 or bf16), in place
//          positions  [tokens]                   u32, per token (packed / paged batches work)
// Math:    for i < half = head_dim/2: inv_freq_i = 1 / theta^(2i / head_dim),
//          a = positions[t]·inv_freq_i, both in f32 exactly as HF computes them (powf, an IEEE
//          division, one f32 product), then sincosf (the accurate one, not __sinf);
//          x'[i] = x[i]·cos a − x[i+half]·sin a,  x'[i+half] = x[i+half]·cos a + x[i]·sin a,
//          with sin negated when `inverse` ≠ 0 (the backward: rotation by −a, i.e. the transpose).
// Table:   each token's cos/sin for its `half` frequencies are computed once per block into
//          dynamic shared memory ([by][2·half] f32: cos then sin) and reused by every head.
// Access:  16-byte vectors (4 f32 / 8 bf16 of x[i..] and of x[i+half..]) when half is a
//          multiple of that and x is 16-byte aligned (checked at run time); else scalar pairs.
// Launch:  block = (bx, by): bx = threads per token = clamp(roundup32(items), 32, 256) with
//          items = heads·half / N (vector) or heads·half (scalar), by = tokens per block =
//          min(256 / bx, tokens); grid = (ceil(tokens / by)); dynamic smem = by·head_dim·4 bytes.
//          One __syncthreads (after the table), reached by every thread.
// Must match: backend::cpu::Cpu::rope (src/backend/cpu/mod.rs), which computes the angle in f64.
#include "common/recforge.cuh"


template <typename T>
__device__ void rope(T* __restrict__ x, const unsigned* __restrict__ positions, int tokens, int heads, int hd,
                     float theta, int inverse) {
    RF_DYNAMIC_SMEM(float, smem);
    const int half = hd / 2;
    const int t = blockIdx.x * blockDim.y + threadIdx.y;
    rf_smem_t<float> cs = smem + threadIdx.y * hd;  // cos [half], then sin [half]
    if (t < tokens) {
        const float p = (float)positions[t];
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
            float s, c;
            sincosf(p * inv_freq, &s, &c);
            cs[i] = c;
            cs[half + i] = inverse ? -s : s;
        }
    }
    __syncthreads();
    if (t >= tokens) return;
    T* row = x + (size_t)t * heads * hd;
    constexpr int N = rf_vec16<T>::N;
    if (half % N == 0 && rf_aligned16(x)) {
        const int per_head = half / N, items = heads * per_head;
        for (int k = threadIdx.x; k < items; k += blockDim.x) {
            const int h = k / per_head, i0 = (k - h * per_head) * N;
            T* a = row + h * hd + i0;
            float va[N], vb[N], ra[N], rb[N];
            rf_vec16<T>::load(a, va);
            rf_vec16<T>::load(a + half, vb);
#pragma unroll
            for (int j = 0; j < N; j++) {
                const float c = cs[i0 + j], s = cs[half + i0 + j];
                ra[j] = va[j] * c - vb[j] * s;
                rb[j] = vb[j] * c + va[j] * s;
            }
            rf_vec16<T>::store(a, ra);
            rf_vec16<T>::store(a + half, rb);
        }
    } else {
        const int items = heads * half;
        for (int k = threadIdx.x; k < items; k += blockDim.x) {
            const int h = k / half, i = k - h * half;
            T* a = row + h * hd + i;
            const float va = rf_to_float(a[0]), vb = rf_to_float(a[half]), c = cs[i], s = cs[half + i];
            a[0] = rf_from_float<T>(va * c - vb * s);
            a[half] = rf_from_float<T>(vb * c + va * s);
        }
    }
}

extern "C" __global__ void rope_f32(float* x, const unsigned* positions, int tokens, int heads, int head_dim,
                                    float theta, int inverse) {
    rope<float>(x, positions, tokens, heads, head_dim, theta, inverse);
}
extern "C" __global__ void rope_bf16(__nv_bfloat16* x, const unsigned* positions, int tokens, int heads, int head_dim,
                                     float theta, int inverse) {
    rope<__nv_bfloat16>(x, positions, tokens, heads, head_dim, theta, inverse);
}
