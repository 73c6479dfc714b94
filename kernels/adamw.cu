// AdamW on f32 parameters, and the deterministic sum of squares behind the global gradient norm.
//
// adamw_f32 — Layout: param, grad, m, v: [n] f32, updated in place (grad read only).
//   Math (PyTorch AdamW): g' = g·grad_scale; p −= lr·wd·p; m = β1·m + (1−β1)·g';
//   v = β2·v + (1−β2)·g'²; p −= lr · (m/bc1) / (sqrt(v/bc2) + eps), with the bias corrections
//   bc1 = 1 − β1^t, bc2 = 1 − β2^t computed on the host in f64.
//   Launch: grid (min(ceil(n/256), 4096)), block (256), grid-stride loop.
//   Must match: backend::cpu::Cpu::adamw.
//
// sum_squares_partial_f32 / sum_squares_final_f32 — Σ x² in two passes with a fixed order (so the
//   result is the same on every run, unlike float atomics): pass 1, grid (B ≤ 1024) × block
//   (256), writes partial[b] = Σ over the grid-stride elements of block b; pass 2, grid (1) ×
//   block (1024), sums partial[0..B) into out[0].
//   Must match: backend::cpu::Cpu::sum_squares (to f32 summation-order error).
#include "common/recforge.cuh"

extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                     float* __restrict__ v, int n, float lr, float beta1, float beta2, float eps,
                                     float weight_decay, float bc1, float bc2, float grad_scale) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float gi = g[i] * grad_scale;
        float pi = p[i];
        pi -= lr * weight_decay * pi;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        pi -= lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
        p[i] = pi;
    }
}

extern "C" __global__ void sum_squares_partial_f32(const float* __restrict__ x, int n, float* __restrict__ partial) {
    RF_SHARED(float, scratch, [32]);
    float s = 0.0f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) s += x[i] * x[i];
    s = rf_block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

extern "C" __global__ void sum_squares_final_f32(const float* __restrict__ partial, int nb, float* __restrict__ out) {
    RF_SHARED(float, scratch, [32]);
    float s = 0.0f;
    for (int i = threadIdx.x; i < nb; i += blockDim.x) s += partial[i];
    s = rf_block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = s;
}
