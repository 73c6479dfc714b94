// Gated LoRA: y += scale · ((dropout(x) · Aᵀ) ⊙ gate) · Bᵀ, forward and backward.
//
// One kernel family serves plain LoRA (gate all ones), several adapters in one batch (adapters
// concatenated along the rank, gate one-hot over rank blocks) and per-user mixtures of
// meta-LoRAs (a soft gate). The down-projection is one extra small pass (lora_down_bf16); the
// up-projection scale · u · Bᵀ is fused into the W8A8 GEMM's epilogue (gemm_w8a8_bf16), where
// it costs R multiply-adds per output element on data already in registers — cheaper than a
// separate pass that would read and write Y again.
//
// Layout:  x [M, K] bf16 (the linear's input), A [R, K] f32, B [N, R] f32, gate [M, R] f32;
//          h [M, R] f32 = dropout(x)·Aᵀ (saved), u [M, R] f32 = h ⊙ gate (saved);
//          dy [M, N] bf16; dA [R, K] and dB [N, R] f32, accumulated (+=) across micro-batches;
//          dgate [M, R] f32 (overwritten); dx [M, K] bf16, accumulated (+=).
// Dropout: element (m, k) is kept when a SplitMix64 hash of (seed, m·K + k) gives 24 uniform bits
//          u ≥ p, and scaled by 1/(1−p); bit-identical to backend::dropout_keep on the CPU.
// Launch:  lora_down_bf16 / lora_dp_bf16: grid (M), block (256), ranks in chunks of 8 with a block
//          reduction per chunk. lora_db_bf16: grid (ceil(N/128)), block (128), a thread per output
//          column n summing over the M rows; lora_da_bf16 likewise with a thread per input column k.
//          lora_dx_bf16: grid-stride over M·K.
// Must match: backend::cpu::Cpu::lora_forward / lora_backward.
#include "common/recforge.cuh"

__device__ __forceinline__ bool rf_dropout_keep(unsigned long long seed, unsigned long long idx, float p) {
    if (p <= 0.0f) return true;
    unsigned long long z = seed ^ (idx * 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = (float)(unsigned)(z >> 40) * (1.0f / 16777216.0f);
    return u >= p;
}

#define RF_LORA_CHUNK 8

extern "C" __global__ void lora_down_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ a,
                                          const float* __restrict__ gate, float* __restrict__ h, float* __restrict__ u,
                                          int M, int K, int R, float p, unsigned long long seed) {
    RF_SHARED(float, scratch, [32]);
    const int m = blockIdx.x;
    const float ks = 1.0f / (1.0f - p);
    for (int r0 = 0; r0 < R; r0 += RF_LORA_CHUNK) {
        float acc[RF_LORA_CHUNK];
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++) acc[j] = 0.0f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            const unsigned long long idx = (unsigned long long)m * K + k;
            const float xv = rf_dropout_keep(seed, idx, p) ? __bfloat162float(x[idx]) * ks : 0.0f;
#pragma unroll
            for (int j = 0; j < RF_LORA_CHUNK; j++)
                if (r0 + j < R) acc[j] += xv * a[(size_t)(r0 + j) * K + k];
        }
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++) {
            const float s = rf_block_sum(acc[j], scratch);
            if (threadIdx.x == 0 && r0 + j < R) {
                h[(size_t)m * R + r0 + j] = s;
                u[(size_t)m * R + r0 + j] = s * gate[(size_t)m * R + r0 + j];
            }
        }
    }
}

// dp = scale · dy · B; dh = dp ⊙ gate; dgate = dp ⊙ h.
extern "C" __global__ void lora_dp_bf16(const __nv_bfloat16* __restrict__ dy, const float* __restrict__ b,
                                        const float* __restrict__ gate, const float* __restrict__ h, float* __restrict__ dh,
                                        float* __restrict__ dgate, int M, int N, int R, float scale) {
    RF_SHARED(float, scratch, [32]);
    const int m = blockIdx.x;
    for (int r0 = 0; r0 < R; r0 += RF_LORA_CHUNK) {
        float acc[RF_LORA_CHUNK];
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++) acc[j] = 0.0f;
        for (int n = threadIdx.x; n < N; n += blockDim.x) {
            const float d = __bfloat162float(dy[(size_t)m * N + n]);
#pragma unroll
            for (int j = 0; j < RF_LORA_CHUNK; j++)
                if (r0 + j < R) acc[j] += d * b[(size_t)n * R + r0 + j];
        }
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++) {
            const float s = rf_block_sum(acc[j], scratch);
            if (threadIdx.x == 0 && r0 + j < R) {
                const size_t i = (size_t)m * R + r0 + j;
                const float dp = scale * s;
                dh[i] = dp * gate[i];
                dgate[i] = dp * h[i];
            }
        }
    }
}

// dB[n, j] += scale · Σ_m dy[m, n] · u[m, j]
extern "C" __global__ void lora_db_bf16(const __nv_bfloat16* __restrict__ dy, const float* __restrict__ u, float* __restrict__ db,
                                        int M, int N, int R, float scale) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    for (int r0 = 0; r0 < R; r0 += RF_LORA_CHUNK) {
        float acc[RF_LORA_CHUNK];
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++) acc[j] = 0.0f;
        for (int m = 0; m < M; m++) {
            const float d = __bfloat162float(dy[(size_t)m * N + n]);
#pragma unroll
            for (int j = 0; j < RF_LORA_CHUNK; j++)
                if (r0 + j < R) acc[j] += d * u[(size_t)m * R + r0 + j];
        }
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++)
            if (r0 + j < R) db[(size_t)n * R + r0 + j] += scale * acc[j];
    }
}

// dA[j, k] += Σ_m dh[m, j] · dropout(x)[m, k]
extern "C" __global__ void lora_da_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ dh, float* __restrict__ da,
                                        int M, int K, int R, float p, unsigned long long seed) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    const float ks = 1.0f / (1.0f - p);
    for (int r0 = 0; r0 < R; r0 += RF_LORA_CHUNK) {
        float acc[RF_LORA_CHUNK];
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++) acc[j] = 0.0f;
        for (int m = 0; m < M; m++) {
            const unsigned long long idx = (unsigned long long)m * K + k;
            if (!rf_dropout_keep(seed, idx, p)) continue;
            const float xv = __bfloat162float(x[idx]);
#pragma unroll
            for (int j = 0; j < RF_LORA_CHUNK; j++)
                if (r0 + j < R) acc[j] += dh[(size_t)m * R + r0 + j] * xv * ks;
        }
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++)
            if (r0 + j < R) da[(size_t)(r0 + j) * K + k] += acc[j];
    }
}

// dx[m, k] += keep(m, k) · (1/(1−p)) · Σ_j dh[m, j] · A[j, k]
extern "C" __global__ void lora_dx_bf16(const float* __restrict__ dh, const float* __restrict__ a, __nv_bfloat16* __restrict__ dx,
                                        int M, int K, int R, float p, unsigned long long seed) {
    const float ks = 1.0f / (1.0f - p);
    const size_t total = (size_t)M * K;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        if (!rf_dropout_keep(seed, i, p)) continue;
        const size_t m = i / K, k = i % K;
        float s = 0.0f;
        for (int j = 0; j < R; j++) s += dh[m * R + j] * a[(size_t)j * K + k];
        dx[i] = __float2bfloat16(__bfloat162float(dx[i]) + ks * s);
    }
}

// y[m, n] += scale · Σ_j u[m, j]·B[n, j] as a separate pass (the Backend trait's lora_forward;
// the W8A8 GEMM fuses the same sum into its epilogue). Grid-stride over M·N, block (256).
extern "C" __global__ void lora_up_bf16(const float* __restrict__ u, const float* __restrict__ b, __nv_bfloat16* __restrict__ y,
                                        int M, int N, int R, float scale) {
    const size_t total = (size_t)M * N;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t m = i / N, n = i % N;
        float t = 0.0f;
        for (int j = 0; j < R; j++) t += u[m * R + j] * b[n * R + j];
        y[i] = __float2bfloat16(__bfloat162float(y[i]) + scale * t);
    }
}
