// Token sampling (temperature, top-k, top-p, greedy) and token log-probabilities over f32 logits.
//
// Semantics: src/backend/sampling.rs (module comment) — every decision is integer arithmetic on
// values the CPU computes bit-identically, so the GPU picks the same token as the reference
// for the same uniform number.
//
// sample_f32 — logits [B, V] f32; params [B, 4] u32 = (temperature f32 bits, top_k, top_p f32
//   bits, uniform f32 bits); tokens [B] u32 (0xFFFFFFFF for a row with a NaN / +inf / no finite
//   logit). Launch: grid (B), block (RF_SAMPLE_THREADS = 512): one block per row.
//   Algorithm, without sorting the vocabulary (each "pass" reads the row once, from L2 after the
//   first):
//     1. max logit and bad-value check                                             1 pass
//        temperature 0: the lowest index holding the max                            +1, done
//     2. top-k (0 < k < V): the k-th largest order key by a 4-digit radix select:
//        per digit, a 256-bin shared histogram of the keys matching the prefix so far, then
//        warp 0 picks the lowest non-empty bin whose count of larger keys is < k    4 passes
//     3. top-p (p < 1): the same radix select over the top-k survivors, histograms of their
//        fixed-point weights; the first digit's total is W, the bound p·W (f64)     4 passes
//     4. draw: each thread owns a contiguous chunk of the vocabulary; chunk weights, a block
//        exclusive scan, r = ⌊u·W'⌋ from the scan's total, and the one thread whose range holds
//        r walks its chunk to the token                                             ~1 pass
//   So ≤ 10 reads of the row (V = 32000: 1.25 MiB per row, L2-resident), no scratch memory.
//   The weights are recomputed in each pass rather than stored: a few FMAs against a 4-byte read.
//
// token_logprobs_f32 — logits [B, V] f32, ids [B, n] u32, out [B, n] f32 = logit[id] − logsumexp
//   (temperature 1, no filtering; NaN for id ≥ V). Launch: grid (B), block (256); online softmax
//   in f32 as kernels/cross_entropy.cu.
//
// Must match: backend::sampling::{sample_row, token_logprobs_row} (src/backend/sampling.rs),
// which backend::cpu::Cpu::{sample, token_logprobs} run.
#include "common/recforge.cuh"

#define RF_SAMPLE_THREADS 512
#define RF_SAMPLE_BAD 0xFFFFFFFFu
#define RF_W_BITS 40

// Monotone f32 → u32 (backend::sampling::order_key).
__device__ __forceinline__ unsigned rf_order_key(float x) {
    const unsigned b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// ⌊e^d · 2^40⌋ for d ≤ 0 (backend::sampling::weight, op for op). The _rn intrinsics keep nvcc
// from contracting a multiply and a subtract into an FMA, which would change the result.
__device__ __forceinline__ unsigned long long rf_sample_weight(float d) {
    const float t = __fmul_rn(d, 1.442695f);  // f32 log2(e), the same float as Rust's f32::consts::LOG2_E
    if (!(t > -(float)(RF_W_BITS + 1))) return 0ull;
    const float n = floorf(t);
    const float f = __fsub_rn(t, n);
    float p = 1.3215487e-6f;
    p = __fmaf_rn(p, f, 1.5252734e-5f);
    p = __fmaf_rn(p, f, 0.0001540353f);
    p = __fmaf_rn(p, f, 0.0013333558f);
    p = __fmaf_rn(p, f, 0.009618129f);
    p = __fmaf_rn(p, f, 0.05550411f);
    p = __fmaf_rn(p, f, 0.2402265f);
    p = __fmaf_rn(p, f, 0.6931472f);
    p = __fmaf_rn(p, f, 1.0f);
    const int e = (int)n + RF_W_BITS;
    const float scale = __int_as_float((127 + e) << 23);
    return (unsigned long long)__fmul_rn(p, scale);
}

// Warp 0 of the block: given the 256-bin histogram (val = count or weight of the candidates in
// each bin, cnt = how many candidates) and `above` (the value of candidates with larger keys
// than the current prefix), pick the lowest non-empty bin whose value above it satisfies the
// keep test. MODE 0 (top-k): above < k. MODE 1 (top-p): above < thr || above == 0, with thr =
// p·total computed here when `first` (total = the histogram's sum). Writes *bin (-1 if none) and
// updates *above.
template <int MODE>
__device__ __forceinline__ void rf_pick_bin(const unsigned long long* hval, const unsigned* hcnt, unsigned long long k,
                                            float p, bool first, double* thr, unsigned long long* above, int* bin) {
    const int lane = threadIdx.x & 31;
    unsigned long long mine = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) mine += hval[8 * lane + i];
    // Inclusive suffix sum over lanes: lanes lane..31 (the bins at and above this lane's).
    unsigned long long suf = mine;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long t = __shfl_down_sync(RF_FULL_MASK, suf, o);
        if (lane + o < 32) suf += t;
    }
    if (MODE == 1 && first) {
        const unsigned long long total = __shfl_sync(RF_FULL_MASK, suf, 0);
        if (lane == 0) *thr = (double)p * (double)total;
    }
    __syncwarp();
    const double th = MODE == 1 ? *thr : 0.0;
    const unsigned long long base = *above;
    unsigned long long a = base + (suf - mine);  // value strictly above this lane's top bin
    int cand = -1;
    unsigned long long cand_above = 0;
    for (int i = 7; i >= 0; i--) {
        const int b = 8 * lane + i;
        const bool keep = MODE == 0 ? a < k : ((double)a < th || a == 0);
        if (!keep) break;
        if (hcnt[b] > 0) {
            cand = b;
            cand_above = a;
        }
        a += hval[b];
    }
    const unsigned has = __ballot_sync(RF_FULL_MASK, cand >= 0);
    __syncwarp();
    if (has == 0) {
        if (lane == 0) *bin = -1;
        return;
    }
    const int src = __ffs((int)has) - 1;
    const int b = __shfl_sync(RF_FULL_MASK, cand, src);
    const unsigned long long ab = __shfl_sync(RF_FULL_MASK, cand_above, src);
    if (lane == 0) {
        *bin = b;
        *above = ab;
    }
}

extern "C" __global__ void __launch_bounds__(RF_SAMPLE_THREADS, 1) sample_f32(const float* __restrict__ logits, const unsigned* __restrict__ params,
                                      unsigned* __restrict__ tokens, int V) {
    RF_SHARED(unsigned long long, hval, [256]);
    RF_SHARED(unsigned, hcnt, [256]);
    RF_SHARED(float, redf, [32]);
    RF_SHARED(unsigned long long, red64, [32]);
    RF_SHARED(unsigned long long, s_above);
    RF_SHARED(double, s_thr);
    RF_SHARED(int, s_bin);
    RF_SHARED(unsigned, s_u);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const int b = blockIdx.x;
    const float* x = logits + (size_t)b * V;
    const float temp = __uint_as_float(params[4 * b]);
    const unsigned top_k = params[4 * b + 1];
    const float top_p = __uint_as_float(params[4 * b + 2]);
    const float u = __uint_as_float(params[4 * b + 3]);

    // 1. max and bad values.
    float m = -INFINITY;
    int bad = 0;
    for (int i = tid; i < V; i += blockDim.x) {
        const float v = x[i];
        bad |= (v != v) | (v == INFINITY);
        m = fmaxf(m, v);
    }
    bad = __syncthreads_or(bad);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(RF_FULL_MASK, m, o));
    if (lane == 0) redf[warp] = m;
    __syncthreads();
    m = lane < nwarps ? redf[lane] : -INFINITY;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(RF_FULL_MASK, m, o));
    if (bad || m == -INFINITY) {
        if (tid == 0) tokens[b] = RF_SAMPLE_BAD;
        return;
    }

    if (temp == 0.0f) {  // greedy: the lowest index holding the max
        unsigned first = 0xFFFFFFFFu;
        for (int i = tid; i < V; i += blockDim.x)
            if (x[i] == m) {
                first = i;
                break;
            }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) first = min(first, __shfl_xor_sync(RF_FULL_MASK, first, o));
        if (lane == 0) hcnt[warp] = first;
        __syncthreads();
        if (tid == 0) {
            unsigned best = 0xFFFFFFFFu;
            for (int w = 0; w < nwarps; w++) best = min(best, hcnt[w]);
            tokens[b] = best;
        }
        return;
    }
    const float inv_t = __fdiv_rn(1.0f, temp);

    // 2. top-k: the k-th largest key by radix select on counts.
    unsigned kth = 0;
    if (top_k > 0 && top_k < (unsigned)V) {
        unsigned prefix = 0, mask = 0;
        if (tid == 0) s_above = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += blockDim.x) hval[i] = 0, hcnt[i] = 0;
            __syncthreads();
            for (int i = tid; i < V; i += blockDim.x) {
                const unsigned key = rf_order_key(x[i]);
                if ((key & mask) == prefix) atomicAdd(&hcnt[(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            for (int i = tid; i < 256; i += blockDim.x) hval[i] = hcnt[i];
            __syncthreads();
            if (warp == 0) rf_pick_bin<0>(hval, hcnt, top_k, 0.0f, false, &s_thr, &s_above, &s_bin);
            __syncthreads();
            if (s_bin < 0) {  // cannot happen (the top bin always qualifies); fail loudly
                if (tid == 0) tokens[b] = RF_SAMPLE_BAD;
                return;
            }
            prefix |= (unsigned)s_bin << shift;
            mask |= 255u << shift;
            __syncthreads();  // s_bin is rewritten by the next digit
        }
        kth = prefix;
    }

    // 3. top-p: radix select on the survivors' weights.
    unsigned cut = kth;
    if (top_p < 1.0f) {
        unsigned prefix = 0, mask = 0;
        if (tid == 0) s_above = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int i = tid; i < 256; i += blockDim.x) hval[i] = 0, hcnt[i] = 0;
            __syncthreads();
            for (int i = tid; i < V; i += blockDim.x) {
                const float v = x[i];
                const unsigned key = rf_order_key(v);
                if (key >= kth && (key & mask) == prefix) {
                    const unsigned bin = (key >> shift) & 255u;
                    atomicAdd(&hcnt[bin], 1u);
                    const unsigned long long w = rf_sample_weight(__fmul_rn(__fsub_rn(v, m), inv_t));
                    if (w) atomicAdd(&hval[bin], w);
                }
            }
            __syncthreads();
            if (warp == 0) rf_pick_bin<1>(hval, hcnt, 0, top_p, shift == 24, &s_thr, &s_above, &s_bin);
            __syncthreads();
            if (s_bin < 0) {
                if (tid == 0) tokens[b] = RF_SAMPLE_BAD;
                return;
            }
            prefix |= (unsigned)s_bin << shift;
            mask |= 255u << shift;
            __syncthreads();
        }
        cut = prefix;
    }

    // 4. draw: chunk weights, block exclusive scan, the owner of r walks its chunk.
    const int chunk = (V + blockDim.x - 1) / blockDim.x;
    const int lo = min(tid * chunk, V), hi = min(lo + chunk, V);
    unsigned long long mine = 0;
    for (int i = lo; i < hi; i++) {
        const float v = x[i];
        if (rf_order_key(v) >= cut) mine += rf_sample_weight(__fmul_rn(__fsub_rn(v, m), inv_t));
    }
    unsigned long long inc = mine;  // inclusive scan within the warp
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long t = __shfl_up_sync(RF_FULL_MASK, inc, o);
        if (lane >= o) inc += t;
    }
    if (lane == 31) red64[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        unsigned long long w = lane < nwarps ? red64[lane] : 0ull;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const unsigned long long t = __shfl_up_sync(RF_FULL_MASK, w, o);
            if (lane >= o) w += t;
        }
        if (lane < nwarps) red64[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const unsigned long long total = red64[nwarps - 1];
    const unsigned long long excl = (warp > 0 ? red64[warp - 1] : 0ull) + inc - mine;
    if (tid == 0) s_u = RF_SAMPLE_BAD;
    __syncthreads();
    unsigned long long r = (unsigned long long)((double)u * (double)total);
    if (r > total - 1) r = total - 1;
    if (mine > 0 && r >= excl && r < excl + mine) {
        unsigned long long cum = excl;
        for (int i = lo; i < hi; i++) {
            const float v = x[i];
            if (rf_order_key(v) >= cut) cum += rf_sample_weight(__fmul_rn(__fsub_rn(v, m), inv_t));
            if (cum > r) {
                s_u = i;
                break;
            }
        }
    }
    __syncthreads();
    if (tid == 0) tokens[b] = s_u;
}

extern "C" __global__ void __launch_bounds__(256) token_logprobs_f32(const float* __restrict__ logits, const unsigned* __restrict__ ids,
                                              float* __restrict__ out, int V, int n) {
    RF_SHARED(float, sm, [32]);
    RF_SHARED(float, ss, [32]);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
    const float* x = logits + (size_t)blockIdx.x * V;
    float m = -INFINITY, s = 0.0f;
    for (int i = tid; i < V; i += blockDim.x) rf_softmax_merge(m, s, x[i], 1.0f);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(RF_FULL_MASK, m, o), s2 = __shfl_xor_sync(RF_FULL_MASK, s, o);
        rf_softmax_merge(m, s, m2, s2);
    }
    if (lane == 0) sm[warp] = m, ss[warp] = s;
    __syncthreads();
    if (tid == 0) {
        float M = -INFINITY, S = 0.0f;
        for (int w = 0; w < nwarps; w++) rf_softmax_merge(M, S, sm[w], ss[w]);
        sm[0] = M + logf(S);
    }
    __syncthreads();
    const float lse = sm[0];
    for (int j = tid; j < n; j += blockDim.x) {
        const unsigned id = ids[(size_t)blockIdx.x * n + j];
        out[(size_t)blockIdx.x * n + j] = id < (unsigned)V ? x[id] - lse : __int_as_float(0x7fc00000);
    }
}
