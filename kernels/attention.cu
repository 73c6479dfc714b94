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

// ------------------------------------------------------------------------------------------------
// Tiled tensor-core ("flash") forward, FlashAttention-2 style: the same contract as
// attention_fwd_bf16 (layouts, spans, mask, lse) for head_dim HD = 64 or 128.
// Launch:  grid (ceil(max q_len / 64), H, S), block (128) = 4 warps, dynamic shared memory
//          2 · 64 · (2·HD + 16) bytes (K tile + V tile; 18 KiB at HD 64, 34 KiB at HD 128).
// Per block: 64 query rows of one head of one span, warp w owns rows 16w .. 16w+15. The Q tile
//   is staged through the K buffer into registers once (A fragments of mma.m16n8k16). Then for
//   each tile of 64 keys up to the last key any of the 64 rows may see:
//     cp.async K and V tiles (rows past kv_len zero) → S = Q·Kᵀ (mma, f32, 16×64 per warp) →
//     scale and mask (−inf where key > position or ≥ kv_len) → online softmax per row in
//     base 2 (running max m, sum l, both f32; the 4 lanes of a row combine with shuffles) →
//     P rounded to bf16 in registers reused as A fragments (the accumulator layout of two
//     n8 tiles is the A layout of one k16 step) → O += P·V (V fragments by ldmatrix.trans).
//   Out = O / l rounded to bf16, lse = (m + log2 l) · ln 2. No [seq × seq] buffer anywhere.
// Numerics vs the CPU reference: P enters the PV product as bf16 (relative 2^-9 per weight,
//   as FlashAttention), l sums the f32 weights; exp2f instead of expf.
// Rotary embedding is applied before this kernel (rope_bf16 on q and k): K is rotated once per
//   token and also stored in the KV cache rotated, so decode reuses it; rotating inside would
//   redo K's rotation for every query tile.
// Must match: backend::cpu::Cpu::attention (tests/kernels_attention.rs).
namespace rf_flash {
constexpr int BR = 64, BC = 64, THREADS = 128;

template <int HD, int NR = 64>
__device__ __forceinline__ void load_rows(rf_smem_t<unsigned char> dst, const __nv_bfloat16* src, int rows_valid,
                                          size_t row_stride) {
    constexpr int ROWB = 2 * HD + 16, CH = HD / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < NR * CH; c += THREADS) {
        const int r = c / CH, col = c % CH;
        if (r < rows_valid) rf_cp_async16(dst + r * ROWB + col * 16, src + (size_t)r * row_stride + col * 8);
        else rf_st16(dst + r * ROWB + col * 16, make_uint4(0u, 0u, 0u, 0u));
    }
}

__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16(lo)) | ((unsigned)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
}

template <int HD>
__device__ __forceinline__ void fwd(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                    const __nv_bfloat16* __restrict__ v, const unsigned* __restrict__ positions,
                                    const int* __restrict__ spans, __nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                                    int H, int KVH, float scale) {
    constexpr int ROWB = 2 * HD + 16, KS = HD / 16, NT = HD / 8;
    RF_DYNAMIC_SMEM(unsigned char, smem);
    rf_smem_t<unsigned char> sK = smem;
    rf_smem_t<unsigned char> sV = smem + BC * ROWB;
    RF_SHARED(int, s_last);
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, tq = l & 3;
    const int h = blockIdx.y, s = blockIdx.z;
    const int q_start = spans[4 * s], q_len = spans[4 * s + 1], kv_start = spans[4 * s + 2], kv_len = spans[4 * s + 3];
    const int i0 = blockIdx.x * BR;
    if (i0 >= q_len) return;  // the whole block
    const int kh = h / (H / KVH), rows = min(BR, q_len - i0);

    // The last key any row of the tile may see.
    if (threadIdx.x == 0) s_last = -1;
    __syncthreads();
    for (int r = threadIdx.x; r < rows; r += THREADS)
        atomicMax(&s_last, min((int)positions[q_start + i0 + r], kv_len - 1));
    // Q tile → registers, through the K buffer.
    load_rows<HD>(sK, q + ((size_t)(q_start + i0) * H + h) * HD, rows, (size_t)H * HD);
    rf_cp_async_commit();
    rf_cp_async_wait_all();
    __syncthreads();
    const int last = s_last;
    unsigned qf[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
        rf_ldmatrix_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], sK + (16 * w + (l & 15)) * ROWB + kk * 32 + (l >> 4) * 16);
    // Positions of this thread's two rows; −1 sees nothing (rows past q_len).
    const int r0 = 16 * w + g, r1 = r0 + 8;
    const int p0 = r0 < rows ? min((int)positions[q_start + i0 + r0], kv_len - 1) : -1;
    const int p1 = r1 < rows ? min((int)positions[q_start + i0 + r1], kv_len - 1) : -1;
    const float sl2 = scale * 1.44269504f;  // scores in base 2
    float o[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

    for (int j0 = 0; j0 <= last; j0 += BC) {
        __syncthreads();  // every warp is done with the previous tiles (and with Q in sK)
        const int kv_rows = min(BC, kv_len - j0);
        const size_t kr = ((size_t)(kv_start + j0) * KVH + kh) * HD;
        load_rows<HD>(sK, k + kr, kv_rows, (size_t)KVH * HD);
        load_rows<HD>(sV, v + kr, kv_rows, (size_t)KVH * HD);
        rf_cp_async_commit();
        rf_cp_async_wait_all();
        __syncthreads();

        float sc[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++)
#pragma unroll
            for (int p = 0; p < 4; p++) {
                unsigned b[2][2];
                rf_ldmatrix_x4(b[0][0], b[0][1], b[1][0], b[1][1],
                               sK + (p * 16 + (l & 7) + ((l >> 4) << 3)) * ROWB + kk * 32 + ((l >> 3) & 1) * 16);
                rf_mma_m16n8k16_bf16(sc[2 * p], qf[kk], b[0], sc[2 * p]);
                rf_mma_m16n8k16_bf16(sc[2 * p + 1], qf[kk], b[1], sc[2 * p + 1]);
            }
        // Scale, mask, tile row max.
        float tm0 = -INFINITY, tm1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int key = j0 + j * 8 + 2 * tq + (e & 1);
                const bool vis = key <= (e < 2 ? p0 : p1);
                const float x = vis ? sc[j][e] * sl2 : -INFINITY;
                sc[j][e] = x;
                if (e < 2) tm0 = fmaxf(tm0, x);
                else tm1 = fmaxf(tm1, x);
            }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            tm0 = fmaxf(tm0, __shfl_xor_sync(RF_FULL_MASK, tm0, off));
            tm1 = fmaxf(tm1, __shfl_xor_sync(RF_FULL_MASK, tm1, off));
        }
        const float n0 = fmaxf(m0, tm0), n1 = fmaxf(m1, tm1);
        // A row that has seen nothing yet keeps base 0 so that exp2 never sees −inf − −inf.
        const float b0 = n0 == -INFINITY ? 0.0f : n0, b1 = n1 == -INFINITY ? 0.0f : n1;
        const float c0 = exp2f(m0 - b0), c1 = exp2f(m1 - b1);
        m0 = n0;
        m1 = n1;
        float ts0 = 0.0f, ts1 = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            sc[j][0] = exp2f(sc[j][0] - b0);
            sc[j][1] = exp2f(sc[j][1] - b0);
            sc[j][2] = exp2f(sc[j][2] - b1);
            sc[j][3] = exp2f(sc[j][3] - b1);
            ts0 += sc[j][0] + sc[j][1];
            ts1 += sc[j][2] + sc[j][3];
        }
        l0 = l0 * c0 + ts0;  // this lane's share; the quad is summed at the end
        l1 = l1 * c1 + ts1;
#pragma unroll
        for (int j = 0; j < NT; j++) {
            o[j][0] *= c0;
            o[j][1] *= c0;
            o[j][2] *= c1;
            o[j][3] *= c1;
        }
        // O += P·V over the tile's 4 key steps of 16.
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            const unsigned a[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                                   pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                   pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                unsigned b[2][2];
                rf_ldmatrix_x4_trans(b[0][0], b[0][1], b[1][0], b[1][1],
                                     sV + (kk * 16 + (l & 7) + ((l >> 3) & 1) * 8) * ROWB + (nt * 8 + (l >> 4) * 8) * 2);
                rf_mma_m16n8k16_bf16(o[nt], a, b[0], o[nt]);
                rf_mma_m16n8k16_bf16(o[nt + 1], a, b[1], o[nt + 1]);
            }
        }
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l0 += __shfl_xor_sync(RF_FULL_MASK, l0, off);
        l1 += __shfl_xor_sync(RF_FULL_MASK, l1, off);
    }
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int d = j * 8 + 2 * tq;
        if (r0 < rows) {
            const size_t at = ((size_t)(q_start + i0 + r0) * H + h) * HD + d;
            *reinterpret_cast<unsigned*>(out + at) = pack_bf16(o[j][0] * inv0, o[j][1] * inv0);
        }
        if (r1 < rows) {
            const size_t at = ((size_t)(q_start + i0 + r1) * H + h) * HD + d;
            *reinterpret_cast<unsigned*>(out + at) = pack_bf16(o[j][2] * inv1, o[j][3] * inv1);
        }
    }
    if (tq == 0) {
        const float ln2 = 0.69314718f;
        if (r0 < rows) lse[(size_t)(q_start + i0 + r0) * H + h] = l0 > 0.0f ? (m0 + log2f(l0)) * ln2 : -INFINITY;
        if (r1 < rows) lse[(size_t)(q_start + i0 + r1) * H + h] = l1 > 0.0f ? (m1 + log2f(l1)) * ln2 : -INFINITY;
    }
}
}  // namespace rf_flash

extern "C" __global__ void __launch_bounds__(128) attention_fwd_hd64_bf16(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const unsigned* __restrict__ positions, const int* __restrict__ spans, __nv_bfloat16* __restrict__ out,
    float* __restrict__ lse, int H, int KVH, int hd, float scale) {
    rf_flash::fwd<64>(q, k, v, positions, spans, out, lse, H, KVH, scale);
}

extern "C" __global__ void __launch_bounds__(128) attention_fwd_hd128_bf16(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const unsigned* __restrict__ positions, const int* __restrict__ spans, __nv_bfloat16* __restrict__ out,
    float* __restrict__ lse, int H, int KVH, int hd, float scale) {
    rf_flash::fwd<128>(q, k, v, positions, spans, out, lse, H, KVH, scale);
}

// ------------------------------------------------------------------------------------------------
// Tiled tensor-core backward (FlashAttention-2 style) for head_dim 64 and 128. Same contract as
// attention_bwd_bf16; the wrapper (ops::attention::attention_backward) first runs the tiled
// forward for O and lse and attention_bwd_delta_bf16 for D = rowsum(dy ⊙ O), zeroes the f32
// accumulators dq32, dk32, dv32, and converts them to bf16 afterwards.
//
// attention_bwd_delta_bf16 — dy, o [n, hd] bf16 (n = Tq·H rows) → delta [n] f32 = Σ_d dy·o.
//   Launch: grid (ceil(n/4)), block (128): a warp per row.
//
// attention_bwd_hd{64,128}_bf16 — grid (ceil(max kv_len / 64), H, S), block (128) = 4 warps,
//   dynamic shared memory (2·64 + 2·BQ) · (2·HD + 16) (K, V, Q, dO tiles) + 64 · (2·BQ + 16)
//   (dS) bytes, BQ = 64 query rows per tile at HD 64 (46 KiB), 32 at HD 128 (56 KiB, above
//   48 KiB: the launch opts in), so that dK_w and dV_w fit the registers.
//   Block = 64 keys (j0 .. j0+63) of one span, seen from query head h; warp w owns keys
//   16w .. 16w+15 and keeps dK_w, dV_w [16 × HD] f32 in registers. For each BQ-row query tile
//   whose rows may see these keys (position ≥ j0):
//     cp.async Q and dO tiles; lse (base 2), D and the clamped positions to shared memory;
//     Sᵀ = K_w·Qᵀ (mma) → Pᵀ = 2^(Sᵀ·scale·log2 e − lse₂) masked (key ≤ position);
//     dV_w += Pᵀ·dO (Pᵀ as bf16 A fragments);   dPᵀ = V_w·dOᵀ;   dSᵀ = Pᵀ ⊙ (dPᵀ − D);
//     dK_w += dSᵀ·Q (bf16 A fragments);   dSᵀ → shared memory (bf16), then each warp takes 16
//     query rows and a slice of the head dims: dQ = dS·K_tile (A fragments by ldmatrix.trans of
//     dSᵀ), atomically added (f32, × scale) into dq32.
//   At the end dK_w · scale and dV_w are atomically added into dk32 / dv32 (query heads of a
//   group share them). No [seq × seq] buffer: Sᵀ, Pᵀ, dPᵀ live in registers, dS in one tile.
// Numerics vs the CPU reference: P and dS enter their products as bf16 (relative 2^-8 each),
//   D uses the bf16-rounded O; everything else accumulates in f32.
// Must match: backend::cpu::Cpu::attention_backward (tests/kernels_attention.rs).
extern "C" __global__ void attention_bwd_delta_bf16(const __nv_bfloat16* __restrict__ dy, const __nv_bfloat16* __restrict__ o,
                                                    float* __restrict__ delta, int n, int hd) {
    const int lane = threadIdx.x & 31, row = blockIdx.x * 4 + (threadIdx.x >> 5);
    if (row >= n) return;
    float s = 0.0f;
    for (int d = lane; d < hd; d += 32)
        s += __bfloat162float(dy[(size_t)row * hd + d]) * __bfloat162float(o[(size_t)row * hd + d]);
    s = rf_warp_sum(s);
    if (lane == 0) delta[row] = s;
}

namespace rf_flash {
// Query rows per tile of the backward: 64 at HD 64; 32 at HD 128, where dK_w and dV_w already
// take 128 registers per thread (64 rows spilled).
template <int HD> struct bwd_rows { static constexpr int value = HD == 128 ? 32 : 64; };

template <int HD>
__device__ __forceinline__ void bwd(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
                                    const __nv_bfloat16* __restrict__ v, const unsigned* __restrict__ positions,
                                    const int* __restrict__ spans, const __nv_bfloat16* __restrict__ dy,
                                    const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq32,
                                    float* __restrict__ dk32, float* __restrict__ dv32, int H, int KVH, float scale) {
    constexpr int ROWB = 2 * HD + 16, KS = HD / 16, NT = HD / 8;
    constexpr int BQ = bwd_rows<HD>::value, DSB = 2 * BQ + 16;  // dSᵀ tile [64 keys][BQ queries] bf16
    constexpr int RG = BQ / 16, NS = 4 / RG, NTS = NT / NS;  // dQ: row groups × column slices
    RF_DYNAMIC_SMEM(unsigned char, smem);
    rf_smem_t<unsigned char> sK = smem;
    rf_smem_t<unsigned char> sV = smem + 64 * ROWB;
    rf_smem_t<unsigned char> sQ = smem + 2 * 64 * ROWB;
    rf_smem_t<unsigned char> sO = sQ + BQ * ROWB;  // dO
    rf_smem_t<unsigned char> sS = sO + BQ * ROWB;  // dSᵀ
    RF_SHARED(float, s_lse, [BQ]);
    RF_SHARED(float, s_d, [BQ]);
    RF_SHARED(int, s_pos, [BQ]);
    const int l = threadIdx.x & 31, w = threadIdx.x >> 5, g = l >> 2, tq = l & 3;
    const int h = blockIdx.y, s = blockIdx.z;
    const int q_start = spans[4 * s], q_len = spans[4 * s + 1], kv_start = spans[4 * s + 2], kv_len = spans[4 * s + 3];
    const int j0 = blockIdx.x * 64;
    if (j0 >= kv_len) return;  // the whole block
    const int kh = h / (H / KVH), keys = min(64, kv_len - j0);
    const float sl2 = scale * 1.44269504f;
    const size_t kr = ((size_t)(kv_start + j0) * KVH + kh) * HD;
    load_rows<HD>(sK, k + kr, keys, (size_t)KVH * HD);
    load_rows<HD>(sV, v + kr, keys, (size_t)KVH * HD);
    rf_cp_async_commit();

    float dk[NT][4], dv[NT][4];
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[j][e] = dv[j][e] = 0.0f;
    // This thread's two key rows in the accumulator layout.
    const int key0 = j0 + 16 * w + g, key1 = key0 + 8;

    for (int i0 = 0; i0 < q_len; i0 += BQ) {
        const int rows = min(BQ, q_len - i0);
        __syncthreads();  // the previous tile's Q, dO, dS and per-row values are no longer read
        int any = 0;
        for (int r = threadIdx.x; r < BQ; r += THREADS) {
            // Rows past the tile's end see no key (p = -1, so P = 0) but still enter dS = P ⊙
            // (dP − D): their D must be finite, not whatever shared memory held (0 · NaN = NaN).
            int p = -1;
            float lse2 = 0.0f, d = 0.0f;
            if (r < rows) {
                const size_t t = (size_t)(q_start + i0 + r);
                p = min((int)positions[t], kv_len - 1);
                lse2 = lse[t * H + h] * 1.44269504f;
                d = delta[t * H + h];
            }
            s_lse[r] = lse2;
            s_d[r] = d;
            s_pos[r] = p;
            any |= p >= j0;
        }
        if (!__syncthreads_or(any)) continue;  // no row of this tile sees these keys
        load_rows<HD, BQ>(sQ, q + ((size_t)(q_start + i0) * H + h) * HD, rows, (size_t)H * HD);
        load_rows<HD, BQ>(sO, dy + ((size_t)(q_start + i0) * H + h) * HD, rows, (size_t)H * HD);
        rf_cp_async_commit();
        rf_cp_async_wait_all();
        __syncthreads();

        // Sᵀ [16 keys × BQ queries] for this warp's keys, then Pᵀ (masked) in place.
        float st[BQ / 8][4];
#pragma unroll
        for (int j = 0; j < BQ / 8; j++) st[j][0] = st[j][1] = st[j][2] = st[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            unsigned ak[4];
            rf_ldmatrix_x4(ak[0], ak[1], ak[2], ak[3], sK + (16 * w + (l & 15)) * ROWB + kk * 32 + (l >> 4) * 16);
#pragma unroll
            for (int p = 0; p < BQ / 16; p++) {
                unsigned b[2][2];
                rf_ldmatrix_x4(b[0][0], b[0][1], b[1][0], b[1][1],
                               sQ + (p * 16 + (l & 7) + ((l >> 4) << 3)) * ROWB + kk * 32 + ((l >> 3) & 1) * 16);
                rf_mma_m16n8k16_bf16(st[2 * p], ak, b[0], st[2 * p]);
                rf_mma_m16n8k16_bf16(st[2 * p + 1], ak, b[1], st[2 * p + 1]);
            }
        }
#pragma unroll
        for (int j = 0; j < BQ / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int qr = j * 8 + 2 * tq + (e & 1);
                const int key = e < 2 ? key0 : key1;
                st[j][e] = key <= s_pos[qr] ? exp2f(st[j][e] * sl2 - s_lse[qr]) : 0.0f;
            }
        // Per step of 16 queries (kept small for registers): dPᵀ = V_w·dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − D),
        // dV_w += Pᵀ·dO, dK_w += dSᵀ·Q, and dSᵀ → shared memory for dQ.
#pragma unroll
        for (int kq = 0; kq < BQ / 16; kq++) {
            float dp[2][4];
#pragma unroll
            for (int jj = 0; jj < 2; jj++) dp[jj][0] = dp[jj][1] = dp[jj][2] = dp[jj][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                unsigned av[4], b[2][2];
                rf_ldmatrix_x4(av[0], av[1], av[2], av[3], sV + (16 * w + (l & 15)) * ROWB + kk * 32 + (l >> 4) * 16);
                rf_ldmatrix_x4(b[0][0], b[0][1], b[1][0], b[1][1],
                               sO + (kq * 16 + (l & 7) + ((l >> 4) << 3)) * ROWB + kk * 32 + ((l >> 3) & 1) * 16);
                rf_mma_m16n8k16_bf16(dp[0], av, b[0], dp[0]);
                rf_mma_m16n8k16_bf16(dp[1], av, b[1], dp[1]);
            }
#pragma unroll
            for (int jj = 0; jj < 2; jj++)
#pragma unroll
                for (int e = 0; e < 4; e++) dp[jj][e] = st[2 * kq + jj][e] * (dp[jj][e] - s_d[(2 * kq + jj) * 8 + 2 * tq + (e & 1)]);
            const unsigned ap[4] = {pack_bf16(st[2 * kq][0], st[2 * kq][1]), pack_bf16(st[2 * kq][2], st[2 * kq][3]),
                                    pack_bf16(st[2 * kq + 1][0], st[2 * kq + 1][1]),
                                    pack_bf16(st[2 * kq + 1][2], st[2 * kq + 1][3])};
            const unsigned as[4] = {pack_bf16(dp[0][0], dp[0][1]), pack_bf16(dp[0][2], dp[0][3]), pack_bf16(dp[1][0], dp[1][1]),
                                    pack_bf16(dp[1][2], dp[1][3])};
#pragma unroll
            for (int nt = 0; nt < NT; nt += 2) {
                unsigned b[2][2];
                const int brow = (kq * 16 + (l & 7) + ((l >> 3) & 1) * 8) * ROWB + (nt * 8 + (l >> 4) * 8) * 2;
                rf_ldmatrix_x4_trans(b[0][0], b[0][1], b[1][0], b[1][1], sO + brow);
                rf_mma_m16n8k16_bf16(dv[nt], ap, b[0], dv[nt]);
                rf_mma_m16n8k16_bf16(dv[nt + 1], ap, b[1], dv[nt + 1]);
                rf_ldmatrix_x4_trans(b[0][0], b[0][1], b[1][0], b[1][1], sQ + brow);
                rf_mma_m16n8k16_bf16(dk[nt], as, b[0], dk[nt]);
                rf_mma_m16n8k16_bf16(dk[nt + 1], as, b[1], dk[nt + 1]);
            }
            *rf_ptr_cast<unsigned>(sS + (16 * w + g) * DSB + (kq * 16 + 2 * tq) * 2) = as[0];
            *rf_ptr_cast<unsigned>(sS + (16 * w + g + 8) * DSB + (kq * 16 + 2 * tq) * 2) = as[1];
            *rf_ptr_cast<unsigned>(sS + (16 * w + g) * DSB + (kq * 16 + 8 + 2 * tq) * 2) = as[2];
            *rf_ptr_cast<unsigned>(sS + (16 * w + g + 8) * DSB + (kq * 16 + 8 + 2 * tq) * 2) = as[3];
        }
        __syncthreads();
        // dQ = dS · K_tile: warp w takes query rows 16·rg .. +15 and head-dim tiles of slice cs.
        const int rg = w % RG, cs = w / RG;
        const int qr0 = 16 * rg + g, qr1 = qr0 + 8;
        {
            float acc[NTS][4];
#pragma unroll
            for (int j = 0; j < NTS; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                unsigned a[4];
                rf_ldmatrix_x4_trans(a[0], a[1], a[2], a[3],
                                     sS + (kk * 16 + (l & 7) + ((l >> 4) << 3)) * DSB + (16 * rg + ((l >> 3) & 1) * 8) * 2);
#pragma unroll
                for (int nt = 0; nt < NTS; nt += 2) {
                    unsigned b[2][2];
                    rf_ldmatrix_x4_trans(b[0][0], b[0][1], b[1][0], b[1][1],
                                         sK + (kk * 16 + (l & 7) + ((l >> 3) & 1) * 8) * ROWB + ((cs * NTS + nt) * 8 + (l >> 4) * 8) * 2);
                    rf_mma_m16n8k16_bf16(acc[nt], a, b[0], acc[nt]);
                    rf_mma_m16n8k16_bf16(acc[nt + 1], a, b[1], acc[nt + 1]);
                }
            }
#pragma unroll
            for (int j = 0; j < NTS; j++) {
                const int d = (cs * NTS + j) * 8 + 2 * tq;
                if (qr0 < rows) {
                    float* at = dq32 + ((size_t)(q_start + i0 + qr0) * H + h) * HD + d;
                    atomicAdd(at, acc[j][0] * scale);
                    atomicAdd(at + 1, acc[j][1] * scale);
                }
                if (qr1 < rows) {
                    float* at = dq32 + ((size_t)(q_start + i0 + qr1) * H + h) * HD + d;
                    atomicAdd(at, acc[j][2] * scale);
                    atomicAdd(at + 1, acc[j][3] * scale);
                }
            }
        }
    }
    rf_cp_async_wait_all();  // K/V loads issued when no query tile ran
#pragma unroll
    for (int j = 0; j < NT; j++) {
        const int d = j * 8 + 2 * tq;
        if (key0 < kv_len) {
            const size_t at = ((size_t)(kv_start + key0) * KVH + kh) * HD + d;
            atomicAdd(dk32 + at, dk[j][0] * scale);
            atomicAdd(dk32 + at + 1, dk[j][1] * scale);
            atomicAdd(dv32 + at, dv[j][0]);
            atomicAdd(dv32 + at + 1, dv[j][1]);
        }
        if (key1 < kv_len) {
            const size_t at = ((size_t)(kv_start + key1) * KVH + kh) * HD + d;
            atomicAdd(dk32 + at, dk[j][2] * scale);
            atomicAdd(dk32 + at + 1, dk[j][3] * scale);
            atomicAdd(dv32 + at, dv[j][2]);
            atomicAdd(dv32 + at + 1, dv[j][3]);
        }
    }
}
}  // namespace rf_flash

extern "C" __global__ void __launch_bounds__(128) attention_bwd_hd64_bf16(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const unsigned* __restrict__ positions, const int* __restrict__ spans, const __nv_bfloat16* __restrict__ dy,
    const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq32, float* __restrict__ dk32,
    float* __restrict__ dv32, int H, int KVH, int hd, float scale) {
    rf_flash::bwd<64>(q, k, v, positions, spans, dy, lse, delta, dq32, dk32, dv32, H, KVH, scale);
}

extern "C" __global__ void __launch_bounds__(128) attention_bwd_hd128_bf16(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const unsigned* __restrict__ positions, const int* __restrict__ spans, const __nv_bfloat16* __restrict__ dy,
    const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq32, float* __restrict__ dk32,
    float* __restrict__ dv32, int H, int KVH, int hd, float scale) {
    rf_flash::bwd<128>(q, k, v, positions, spans, dy, lse, delta, dq32, dk32, dv32, H, KVH, scale);
}
