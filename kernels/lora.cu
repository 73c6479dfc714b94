// Gated LoRA: y += scale · ((dropout(x) · Aᵀ) ⊙ gate) · Bᵀ, forward and backward.
//
// One kernel family serves plain LoRA (gate all ones), several adapters in one batch (adapters
// concatenated along the rank, gate one-hot over rank blocks) and per-user mixtures of
// meta-LoRAs (a soft gate). The down-projection is one extra small pass (lora_down_bf16). The
// up-projection scale · u · Bᵀ has two places, and Backend::linear_lora (the training step)
// picks one per run (RECFORGE_LORA_UP): its own pass after the GEMM (lora_up_bf16, the default),
// which reads and writes Y once more but reads B once per 8 rows; or the W8A8 GEMM's epilogue
// (gemm_w8a8_*), which saves that pass over Y but loads R values of u and of B for every output
// element beside the GEMM. Which is cheaper at r 16 is for a GPU to say (results/NOTES.md,
// 2026-12-06, "LoRA up-projection"); both give the same sum, the epilogue with one rounding
// less.
//
// Layout:  x [M, K] bf16 (the linear's input), A [R, K] f32, B [N, R] f32, gate [M, R] f32;
//          h [M, R] f32 = dropout(x)·Aᵀ (saved), u [M, R] f32 = h ⊙ gate (saved);
//          dy [M, N] bf16; dA [R, K] and dB [N, R] f32, accumulated (+=) across micro-batches;
//          dgate [M, R] f32 (overwritten); dx [M, K] bf16, accumulated (+=).
// Dropout: element (m, k) is kept when a SplitMix64 hash of (seed, m·K + k) gives 24 uniform bits
//          u ≥ p, and scaled by 1/(1−p); bit-identical to backend::dropout_keep on the CPU.
// Launch:  lora_down_bf16 / lora_dp_bf16: grid (ceil(M/8)), block (256), 8 rows a block, ranks in
//          chunks of 8 (lora_rowdot). lora_db_bf16 / lora_da_bf16: grid (ceil(N/32) / ceil(K/32)), block
//          (256): 32 columns a block, the rows split over its 8 warps (lora_colsum).
//          lora_dx_bf16 / lora_up_bf16: grid (ceil(M/8), ceil(K/256) / ceil(N/256)), block (256), a
//          thread per column and 8 rows.
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
#define RF_LORA_ROWS 8

// The row products of lora_down (x·Aᵀ, with dropout) and lora_dp (dy·B): for the block's rows
// m0 .. m0+7 and ranks r0 .. r0+7, Σ_c v[m, c] · w(j, c), with w(j, c) = A[j, c] (DOWN) or
// B[c, j]. A block reads each w element once for its 8 rows (a block per row read all of A, R·K
// f32, per row: 1 GiB of L2 traffic per projection at LLaMA-7B shapes), and each element of v
// once per chunk of 8 ranks. Each thread sums its columns; the 8 × 8 sums are reduced over the
// warp by shuffles, then over the 8 warps in warp order through `red` (deterministic). Returns,
// in thread t < 64, the sum for row m0 + t/8, rank r0 + t%8. Block (256).
template <bool DOWN>
__device__ __forceinline__ float lora_rowdot(const __nv_bfloat16* __restrict__ v, const float* __restrict__ w, int M, int C,
                                             int R, int m0, int r0, float p, unsigned long long seed, float* red) {
    float acc[RF_LORA_ROWS][RF_LORA_CHUNK];
#pragma unroll
    for (int i = 0; i < RF_LORA_ROWS; i++)
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++) acc[i][j] = 0.0f;
    const float ks = DOWN ? 1.0f / (1.0f - p) : 1.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float wv[RF_LORA_CHUNK];
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++)
            wv[j] = r0 + j < R ? (DOWN ? w[(size_t)(r0 + j) * C + c] : w[(size_t)c * R + r0 + j]) : 0.0f;
#pragma unroll
        for (int i = 0; i < RF_LORA_ROWS; i++) {
            if (m0 + i >= M) break;
            const unsigned long long idx = (unsigned long long)(m0 + i) * C + c;
            float xv = __bfloat162float(v[idx]);
            if (DOWN) xv = rf_dropout_keep(seed, idx, p) ? xv * ks : 0.0f;
#pragma unroll
            for (int j = 0; j < RF_LORA_CHUNK; j++) acc[i][j] += xv * wv[j];
        }
    }
    const int lane = threadIdx.x & 31, q = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < RF_LORA_ROWS; i++)
#pragma unroll
        for (int j = 0; j < RF_LORA_CHUNK; j++) {
            float t = acc[i][j];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(RF_FULL_MASK, t, o);
            if (lane == 0) red[q * (RF_LORA_ROWS * RF_LORA_CHUNK) + i * RF_LORA_CHUNK + j] = t;
        }
    __syncthreads();
    float t = 0.0f;
    if (threadIdx.x < RF_LORA_ROWS * RF_LORA_CHUNK)
        for (int qq = 0; qq < (int)(blockDim.x >> 5); qq++) t += red[qq * (RF_LORA_ROWS * RF_LORA_CHUNK) + threadIdx.x];
    __syncthreads();  // red is rewritten by the next chunk
    return t;
}

// h = dropout(x)·Aᵀ, u = h ⊙ gate. Grid (ceil(M/8)), block (256).
extern "C" __global__ void __launch_bounds__(256) lora_down_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ a,
                                                                 const float* __restrict__ gate, float* __restrict__ h,
                                                                 float* __restrict__ u, int M, int K, int R, float p,
                                                                 unsigned long long seed) {
    RF_SHARED(float, red, [8 * RF_LORA_ROWS * RF_LORA_CHUNK]);
    const int m0 = blockIdx.x * RF_LORA_ROWS;
    for (int r0 = 0; r0 < R; r0 += RF_LORA_CHUNK) {
        const float s = lora_rowdot<true>(x, a, M, K, R, m0, r0, p, seed, red);
        const int m = m0 + (int)threadIdx.x / RF_LORA_CHUNK, r = r0 + (int)threadIdx.x % RF_LORA_CHUNK;
        if (threadIdx.x < RF_LORA_ROWS * RF_LORA_CHUNK && m < M && r < R) {
            const size_t i = (size_t)m * R + r;
            h[i] = s;
            u[i] = s * gate[i];
        }
    }
}

// dp = scale · dy · B; dh = dp ⊙ gate; dgate = dp ⊙ h. Grid (ceil(M/8)), block (256).
extern "C" __global__ void __launch_bounds__(256) lora_dp_bf16(const __nv_bfloat16* __restrict__ dy, const float* __restrict__ b,
                                                               const float* __restrict__ gate, const float* __restrict__ h,
                                                               float* __restrict__ dh, float* __restrict__ dgate, int M, int N,
                                                               int R, float scale) {
    RF_SHARED(float, red, [8 * RF_LORA_ROWS * RF_LORA_CHUNK]);
    const int m0 = blockIdx.x * RF_LORA_ROWS;
    for (int r0 = 0; r0 < R; r0 += RF_LORA_CHUNK) {
        const float s = lora_rowdot<false>(dy, b, M, N, R, m0, r0, 0.0f, 0, red);
        const int m = m0 + (int)threadIdx.x / RF_LORA_CHUNK, r = r0 + (int)threadIdx.x % RF_LORA_CHUNK;
        if (threadIdx.x < RF_LORA_ROWS * RF_LORA_CHUNK && m < M && r < R) {
            const size_t i = (size_t)m * R + r;
            const float dp = scale * s;
            dh[i] = dp * gate[i];
            dgate[i] = dp * h[i];
        }
    }
}

// The two weight gradients are column sums over the M rows: out[c, j] (dB) or out[j, c] (dA)
// += s · Σ_m v[m, c] · w[m, j], with v = dy, w = u for dB and v = dropout(x), w = dh for dA.
// A block of 256 threads owns 32 columns (a warp-wide run of v's row, 64 bytes); warp q sums the
// rows m ≡ q (mod 8) for its lane's column and up to 16 ranks at once, so each element of v is
// read (and its dropout mask hashed) once; the 8 warps' partial sums are then added in warp
// order through shared memory, so the result is deterministic. This replaced a thread per
// column looping over all M rows (grid K/128: 32 blocks and a 4096-long dependent chain at
// LLaMA-7B shapes; see results/NOTES.md, 2026-12-06).
#define RF_LORA_COLS 32
#define RF_LORA_RBLOCK 16
template <bool DA>
__device__ __forceinline__ void lora_colsum(const __nv_bfloat16* __restrict__ v, const float* __restrict__ w,
                                            float* __restrict__ out, int M, int C, int R, float s, float p,
                                            unsigned long long seed) {
    RF_SHARED(float, red, [8 * RF_LORA_RBLOCK * RF_LORA_COLS]);
    const int lane = threadIdx.x & 31, q = threadIdx.x >> 5;
    const int c = blockIdx.x * RF_LORA_COLS + lane;
    const float ks = DA ? 1.0f / (1.0f - p) : 1.0f;
    for (int r0 = 0; r0 < R; r0 += RF_LORA_RBLOCK) {
        float acc[RF_LORA_RBLOCK];
#pragma unroll
        for (int j = 0; j < RF_LORA_RBLOCK; j++) acc[j] = 0.0f;
        if (c < C) {
#pragma unroll 4
            for (int m = q; m < M; m += 8) {
                const unsigned long long idx = (unsigned long long)m * C + c;
                float xv = __bfloat162float(v[idx]);
                if (DA) xv = rf_dropout_keep(seed, idx, p) ? xv * ks : 0.0f;
                const float* wr = w + (size_t)m * R + r0;
#pragma unroll
                for (int j = 0; j < RF_LORA_RBLOCK; j++)
                    if (r0 + j < R) acc[j] += wr[j] * xv;
            }
        }
#pragma unroll
        for (int j = 0; j < RF_LORA_RBLOCK; j++) red[(q * RF_LORA_RBLOCK + j) * RF_LORA_COLS + lane] = acc[j];
        __syncthreads();
        for (int i = threadIdx.x; i < RF_LORA_RBLOCK * RF_LORA_COLS; i += blockDim.x) {
            const int j = i / RF_LORA_COLS, l = i % RF_LORA_COLS, cc = blockIdx.x * RF_LORA_COLS + l;
            if (cc >= C || r0 + j >= R) continue;
            float t = 0.0f;
            for (int qq = 0; qq < 8; qq++) t += red[(qq * RF_LORA_RBLOCK + j) * RF_LORA_COLS + l];
            float& o = DA ? out[(size_t)(r0 + j) * C + cc] : out[(size_t)cc * R + r0 + j];
            o += s * t;
        }
        __syncthreads();  // red is rewritten by the next block of ranks
    }
}

// dB[n, j] += scale · Σ_m dy[m, n] · u[m, j]. Grid (ceil(N/32)), block (256).
extern "C" __global__ void __launch_bounds__(256) lora_db_bf16(const __nv_bfloat16* __restrict__ dy, const float* __restrict__ u,
                                                               float* __restrict__ db, int M, int N, int R, float scale) {
    lora_colsum<false>(dy, u, db, M, N, R, scale, 0.0f, 0);
}

// dA[j, k] += Σ_m dh[m, j] · dropout(x)[m, k]. Grid (ceil(K/32)), block (256).
extern "C" __global__ void __launch_bounds__(256) lora_da_bf16(const __nv_bfloat16* __restrict__ x, const float* __restrict__ dh,
                                                               float* __restrict__ da, int M, int K, int R, float p,
                                                               unsigned long long seed) {
    lora_colsum<true>(x, dh, da, M, K, R, 1.0f, p, seed);
}

// dx[m, k] += keep(m, k) · (1/(1−p)) · Σ_j dh[m, j] · A[j, k]. Grid (ceil(M/8), ceil(K/256)),
// block (256): a thread per column k and 8 rows, so each A value it loads (ranks in blocks of
// 16, kept in registers) serves 8 rows — a thread per element read R values of A per element,
// R·4 bytes of L2 traffic per element of dx (1 GiB per call at LLaMA-7B shapes, r 16). The sum
// over j runs in j order, one bf16 rounding at the end, as before.
extern "C" __global__ void __launch_bounds__(256) lora_dx_bf16(const float* __restrict__ dh, const float* __restrict__ a,
                                                               __nv_bfloat16* __restrict__ dx, int M, int K, int R, float p,
                                                               unsigned long long seed) {
    const int k = blockIdx.y * blockDim.x + threadIdx.x, m0 = blockIdx.x * RF_LORA_ROWS;
    if (k >= K) return;
    const float ks = 1.0f / (1.0f - p);
    float s[RF_LORA_ROWS];
#pragma unroll
    for (int i = 0; i < RF_LORA_ROWS; i++) s[i] = 0.0f;
    for (int r0 = 0; r0 < R; r0 += RF_LORA_RBLOCK) {
        float av[RF_LORA_RBLOCK];
#pragma unroll
        for (int j = 0; j < RF_LORA_RBLOCK; j++) av[j] = r0 + j < R ? a[(size_t)(r0 + j) * K + k] : 0.0f;
#pragma unroll
        for (int i = 0; i < RF_LORA_ROWS; i++) {
            if (m0 + i >= M) break;
            const float* d = dh + (size_t)(m0 + i) * R + r0;
#pragma unroll
            for (int j = 0; j < RF_LORA_RBLOCK; j++)
                if (r0 + j < R) s[i] += d[j] * av[j];
        }
    }
#pragma unroll
    for (int i = 0; i < RF_LORA_ROWS; i++) {
        if (m0 + i >= M) break;
        const size_t idx = (size_t)(m0 + i) * K + k;
        if (!rf_dropout_keep(seed, idx, p)) continue;
        dx[idx] = __float2bfloat16(__bfloat162float(dx[idx]) + ks * s[i]);
    }
}

// y[m, n] += scale · Σ_j u[m, j]·B[n, j] as a separate pass (Backend::lora_forward, and
// Backend::linear_lora by default; the W8A8 GEMM's epilogue can add the same sum). Grid (ceil(M/8), ceil(N/256)), block
// (256): a thread per column n and 8 rows, B[n, ·] in registers (ranks in blocks of 16), so B
// is read once per 8 rows — a thread per element read R values of B per element, 1 GiB of L2
// traffic per call at LLaMA-7B shapes, r 16. The sum over j runs in j order, as before.
extern "C" __global__ void __launch_bounds__(256) lora_up_bf16(const float* __restrict__ u, const float* __restrict__ b,
                                                               __nv_bfloat16* __restrict__ y, int M, int N, int R, float scale) {
    const int n = blockIdx.y * blockDim.x + threadIdx.x, m0 = blockIdx.x * RF_LORA_ROWS;
    if (n >= N) return;
    float t[RF_LORA_ROWS];
#pragma unroll
    for (int i = 0; i < RF_LORA_ROWS; i++) t[i] = 0.0f;
    for (int r0 = 0; r0 < R; r0 += RF_LORA_RBLOCK) {
        float bv[RF_LORA_RBLOCK];
#pragma unroll
        for (int j = 0; j < RF_LORA_RBLOCK; j++) bv[j] = r0 + j < R ? b[(size_t)n * R + r0 + j] : 0.0f;
#pragma unroll
        for (int i = 0; i < RF_LORA_ROWS; i++) {
            if (m0 + i >= M) break;
            const float* ur = u + (size_t)(m0 + i) * R + r0;
#pragma unroll
            for (int j = 0; j < RF_LORA_RBLOCK; j++)
                if (r0 + j < R) t[i] += ur[j] * bv[j];
        }
    }
#pragma unroll
    for (int i = 0; i < RF_LORA_ROWS; i++) {
        if (m0 + i >= M) break;
        const size_t idx = (size_t)(m0 + i) * N + n;
        y[idx] = __float2bfloat16(__bfloat162float(y[idx]) + scale * t[i]);
    }
}
