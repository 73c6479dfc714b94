// Causal grouped-query attention forward over packed sequences, with the per-row logsumexp saved
// for the backward pass. First version: correct and simple, one warp per query row with an
// online softmax over the keys in f32; the tiled tensor-core (flash) version replaces it once a
// GPU is there to measure against.
//
// Layout:  q [Tq, H, hd] bf16, k and v [Tk, KVH, hd] bf16 (H a multiple of KVH; query head h reads
//          KV head h / (H/KVH)); positions [Tq] u32, each query's position in its sequence;
//          spans [S, 4] i32 = (q_start, q_len, kv_start, kv_len) per sequence; out [Tq, H, hd] bf16;
//          lse [Tq, H] f32 = log Σ_j exp(scale·q·k_j) over the visible keys.
// Mask:    query t of a span sees keys j (0-based within the span) with j ≤ positions[t] and
//          j < kv_len, so a KV-cached decode step and a packed training batch use the same kernel.
// Math:    scores and the softmax in f32 (exp of score − running max), the output rounded to bf16.
// Launch:  grid (ceil(max q_len / 4), H, S), block (128): warp w handles query row 4·blockIdx.x + w
//          of span blockIdx.z; lane l holds dims l, l+32, l+64, l+96 (hd ≤ 128, hd % 32 == 0).
// Must match: backend::cpu::Cpu::attention (src/backend/cpu/mod.rs).
#include "common/recforge.cuh"

extern "C" __global__ void attention_fwd_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                              const __nv_bfloat16* __restrict__ v, const unsigned* __restrict__ positions,
                                              const int* __restrict__ spans, __nv_bfloat16* __restrict__ out,
                                              float* __restrict__ lse, int H, int KVH, int hd, float scale) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int h = blockIdx.y, s = blockIdx.z;
    const int q_start = spans[4 * s], q_len = spans[4 * s + 1], kv_start = spans[4 * s + 2], kv_len = spans[4 * s + 3];
    const int i = blockIdx.x * 4 + warp;
    if (i >= q_len) return;  // the whole warp leaves together
    const int t = q_start + i, kh = h / (H / KVH), per = hd / 32;
    float qv[4], acc[4];
#pragma unroll
    for (int d = 0; d < 4; d++) {
        qv[d] = d < per ? __bfloat162float(q[((size_t)t * H + h) * hd + lane + 32 * d]) : 0.0f;
        acc[d] = 0.0f;
    }
    const int visible = min((int)positions[t] + 1, kv_len);
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j < visible; j++) {
        const size_t kr = ((size_t)(kv_start + j) * KVH + kh) * hd;
        float dot = 0.0f;
#pragma unroll
        for (int d = 0; d < 4; d++)
            if (d < per) dot += qv[d] * __bfloat162float(k[kr + lane + 32 * d]);
        const float sc = rf_warp_sum(dot) * scale;
        const float mn = fmaxf(m, sc);
        const float corr = expf(m - mn), p = expf(sc - mn);
        l = l * corr + p;
#pragma unroll
        for (int d = 0; d < 4; d++)
            if (d < per) acc[d] = acc[d] * corr + p * __bfloat162float(v[kr + lane + 32 * d]);
        m = mn;
    }
#pragma unroll
    for (int d = 0; d < 4; d++)
        if (d < per) out[((size_t)t * H + h) * hd + lane + 32 * d] = __float2bfloat16(visible > 0 ? acc[d] / l : 0.0f);
    if (lane == 0) lse[(size_t)t * H + h] = visible > 0 ? m + logf(l) : -INFINITY;
}

// Backward of attention_fwd_bf16 (first version, same geometry: one warp per query row and head).
// Per query row i: recompute the logsumexp over its visible keys (pass 1), then
// D = Σ_j p_j·(dy·v_j) (pass 2), then for every key (pass 3) with p_j = exp(s_j − lse) and
// ds_j = p_j·(dy·v_j − D)·scale: dq_i = Σ_j ds_j·k_j, dk_j += ds_j·q_i, dv_j += p_j·dy_i.
// dk and dv gather contributions from every query row and every query head of the group, so they
// accumulate in f32 scratch with atomics (zeroed by the caller) and are converted to bf16 by
// attention_bwd_finish_bf16.
// Layout:  as the forward; dy, dq [Tq, H, hd] bf16; dk32, dv32 [Tk, KVH, hd] f32.
// Must match: backend::cpu::Cpu::attention_backward.
extern "C" __global__ void attention_bwd_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                              const __nv_bfloat16* __restrict__ v, const unsigned* __restrict__ positions,
                                              const int* __restrict__ spans, const __nv_bfloat16* __restrict__ dy,
                                              __nv_bfloat16* __restrict__ dq, float* __restrict__ dk32, float* __restrict__ dv32,
                                              int H, int KVH, int hd, float scale) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int h = blockIdx.y, s = blockIdx.z;
    const int q_start = spans[4 * s], q_len = spans[4 * s + 1], kv_start = spans[4 * s + 2], kv_len = spans[4 * s + 3];
    const int i = blockIdx.x * 4 + warp;
    if (i >= q_len) return;
    const int t = q_start + i, kh = h / (H / KVH), per = hd / 32;
    float qv[4], g[4], dqa[4];
#pragma unroll
    for (int d = 0; d < 4; d++) {
        const bool in = d < per;
        qv[d] = in ? __bfloat162float(q[((size_t)t * H + h) * hd + lane + 32 * d]) : 0.0f;
        g[d] = in ? __bfloat162float(dy[((size_t)t * H + h) * hd + lane + 32 * d]) : 0.0f;
        dqa[d] = 0.0f;
    }
    const int visible = min((int)positions[t] + 1, kv_len);
    auto score = [&](int j) {
        const size_t kr = ((size_t)(kv_start + j) * KVH + kh) * hd;
        float dot = 0.0f;
#pragma unroll
        for (int d = 0; d < 4; d++)
            if (d < per) dot += qv[d] * __bfloat162float(k[kr + lane + 32 * d]);
        return rf_warp_sum(dot) * scale;
    };
    auto dyv = [&](int j) {
        const size_t vr = ((size_t)(kv_start + j) * KVH + kh) * hd;
        float dot = 0.0f;
#pragma unroll
        for (int d = 0; d < 4; d++)
            if (d < per) dot += g[d] * __bfloat162float(v[vr + lane + 32 * d]);
        return rf_warp_sum(dot);
    };
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j < visible; j++) {
        const float sc = score(j), mn = fmaxf(m, sc);
        l = l * expf(m - mn) + expf(sc - mn);
        m = mn;
    }
    const float lse = m + logf(l);
    float D = 0.0f;
    for (int j = 0; j < visible; j++) D += expf(score(j) - lse) * dyv(j);
    for (int j = 0; j < visible; j++) {
        const float p = expf(score(j) - lse);
        const float ds = p * (dyv(j) - D) * scale;
        const size_t kr = ((size_t)(kv_start + j) * KVH + kh) * hd;
#pragma unroll
        for (int d = 0; d < 4; d++) {
            if (d >= per) continue;
            const size_t e = kr + lane + 32 * d;
            dqa[d] += ds * __bfloat162float(k[e]);
            atomicAdd(dk32 + e, ds * qv[d]);
            atomicAdd(dv32 + e, p * g[d]);
        }
    }
#pragma unroll
    for (int d = 0; d < 4; d++)
        if (d < per) dq[((size_t)t * H + h) * hd + lane + 32 * d] = __float2bfloat16(dqa[d]);
}

// dk, dv: f32 scratch → bf16. Launch: grid-stride over n, block (256).
extern "C" __global__ void attention_bwd_finish_bf16(const float* __restrict__ dk32, const float* __restrict__ dv32,
                                                     __nv_bfloat16* __restrict__ dk, __nv_bfloat16* __restrict__ dv, int n) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < n; e += gridDim.x * blockDim.x) {
        dk[e] = __float2bfloat16(dk32[e]);
        dv[e] = __float2bfloat16(dv32[e]);
    }
}
