// Activation quantization for the W8A8 linear (LLM.int8 "vector-wise" with the mixed-precision
// decomposition), in three small kernels so every step is deterministic:
//
// 1. colmax_bf16     x [M, K] bf16 → colmax [K] u32: bits of max_r |x[r, k]| (non-negative floats
//                    order like their bit patterns, so atomicMax on the bits is a float max).
//                    colmax must be zeroed first. Launch: grid (ceil(K/256), ceil(M/64)), block
//                    (256): a thread owns one column over a slab of 64 rows.
// 2. outlier_cols    colmax [K], threshold → ocols [K] u32: the columns with colmax > threshold in
//                    ascending order, count [1] i32 (0 when threshold ≤ 0). Launch: grid (1), block
//                    (1024): each thread scans a contiguous run of columns, a block-wide exclusive
//                    scan of the per-thread counts places them.
// 3. quantize_rows_bf16  per row r: s = max over non-outlier columns of |x| / 127 (NaN when one
//                    of them is NaN, so the row's outputs are NaN, not computed as if it were 0);
//                    xq[r, k] = round(x / s) clamped to ±127 (0 for outlier columns or s = 0),
//                    sx[r] = s. Launch: grid (M), block (256). (The outlier values themselves
//                    are read from x at [r, ocols[j]] by the GEMM's epilogue: no copy.)
// Must match: backend::cpu::quantize_activations (src/backend/cpu/mod.rs) bit for bit (same
// division and round-half-away-from-zero).
#include "common/recforge.cuh"

// max(a, b), NaN if either is (fmaxf returns the other one). backend::cpu::max_keeping_nan.
__device__ __forceinline__ float rf_max_keeping_nan(float a, float b) { return (a > b || a != a) ? a : b; }

extern "C" __global__ void colmax_bf16(const __nv_bfloat16* __restrict__ x, int M, int K, unsigned* __restrict__ colmax) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= K) return;
    const int r0 = blockIdx.y * 64, r1 = min(M, r0 + 64);
    float m = 0.0f;
    for (int r = r0; r < r1; r++) m = fmaxf(m, fabsf(__bfloat162float(x[(size_t)r * K + k])));
    atomicMax(colmax + k, __float_as_uint(m));
}

extern "C" __global__ void outlier_cols(const unsigned* __restrict__ colmax, int K, float threshold,
                                        unsigned* __restrict__ ocols, int* __restrict__ count) {
    RF_SHARED(int, warp_tot, [32]);
    const int per = (K + blockDim.x - 1) / blockDim.x;
    const int k0 = threadIdx.x * per, k1 = min(K, k0 + per);
    int n = 0;
    if (threshold > 0.0f)
        for (int k = k0; k < k1; k++) n += __uint_as_float(colmax[k]) > threshold;
    // Exclusive scan of n over the block: inclusive within each warp, then across warp totals.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int inc = n;
    for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(RF_FULL_MASK, inc, o);
        if (lane >= o) inc += v;
    }
    if (lane == 31) warp_tot[warp] = inc;
    __syncthreads();
    int before = 0;
    for (int w = 0; w < warp; w++) before += warp_tot[w];
    int pos = before + inc - n;
    if (threshold > 0.0f)
        for (int k = k0; k < k1; k++)
            if (__uint_as_float(colmax[k]) > threshold) ocols[pos++] = (unsigned)k;
    if (threadIdx.x == blockDim.x - 1) *count = before + inc;
}

extern "C" __global__ void quantize_rows_bf16(const __nv_bfloat16* __restrict__ x, int K, const unsigned* __restrict__ colmax,
                                              float threshold, signed char* __restrict__ xq, float* __restrict__ sx) {
    RF_SHARED(float, scratch, [32]);
    const int r = blockIdx.x;
    const __nv_bfloat16* xr = x + (size_t)r * K;
    const bool decompose = threshold > 0.0f;
    float m = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const bool out = decompose && __uint_as_float(colmax[k]) > threshold;
        if (!out) m = rf_max_keeping_nan(m, fabsf(__bfloat162float(xr[k])));
    }
    // Block max through the sum helper's pattern: warp max, then across warps.
    for (int o = 16; o > 0; o >>= 1) m = rf_max_keeping_nan(m, __shfl_xor_sync(RF_FULL_MASK, m, o));
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
    __syncthreads();
    m = (threadIdx.x & 31) < (int)(blockDim.x >> 5) ? scratch[threadIdx.x & 31] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) m = rf_max_keeping_nan(m, __shfl_xor_sync(RF_FULL_MASK, m, o));
    const float s = m / 127.0f;
    if (threadIdx.x == 0) sx[r] = s;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const bool out = decompose && __uint_as_float(colmax[k]) > threshold;
        signed char q = 0;
        if (!out && s > 0.0f) {
            // inf / inf (threshold 0, s infinite) is NaN: 0, as Rust's `as i8` gives, where the
            // clamp would make it -127.
            const float t = roundf(__bfloat162float(xr[k]) / s);
            if (t == t) q = (signed char)fminf(fmaxf(t, -127.0f), 127.0f);
        }
        xq[(size_t)r * K + k] = q;
    }
}

// Zero n u32 words (resetting colmax before colmax_bf16). Launch: grid (ceil(n/256)), block (256).
extern "C" __global__ void zero_u32(unsigned* p, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = 0u;
}
