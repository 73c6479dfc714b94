// The paged KV cache on the device: writing new K/V into their slots, and decode attention that
// reads K/V through per-sequence block tables (host side: src/infer/paged.rs; launch wrappers:
// src/backend/gpu/ops/paged.rs).
//
// Cache layout: k_cache, v_cache [num_blocks · block_size, KVH, hd] bf16 — slot s = block ·
// block_size + offset is one row of KVH · hd values, so a block is block_size consecutive rows.
//
// kv_write_bf16 — k, v [T, KVH, hd] bf16 (after RoPE), slots [T] u32 → k_cache[slots[t]] = k[t],
//   v_cache[slots[t]] = v[t]. Launch: grid (T), block (128); 16-byte copies when KVH·hd is a
//   multiple of 8, else scalar. Must match: a plain row scatter (tests/kernels_paged.rs).
//
// kv_gather_bf16 — the reverse: k[t] = k_cache[slots[t]], v[t] = v_cache[slots[t]], the same
//   layouts and launch. A sequence's K/V gathered into contiguous rows lets a long prefill after a
//   shared prefix run the tiled flash attention instead of the decode kernel, which reads K/V
//   once per 8 query rows. Must match: a plain row gather (tests/kernels_paged.rs).
//
// paged_decode_bf16 + paged_decode_reduce_bf16 — decode attention of a few query tokens per
//   sequence over the paged cache, split along the context ("flash-decoding" / paged attention
//   v2 style).
//   Layouts: q, out [B, Q, H, hd] bf16 (Q query tokens per sequence: 1 for plain decode, a few
//     for speculative / chunked decode); block_tables [B, max_blocks] i32; context_lens [B] i32 =
//     tokens in the cache for the sequence, the Q new ones included. H is a multiple of KVH (query
//     head h reads KV head h / (H/KVH)); hd ≤ 128, hd % 32 == 0; any block_size ≥ 1.
//   Mask: query i (0 ≤ i < Q) of sequence b sees keys j ≤ context_lens[b] − Q + i (causal within
//     the Q new tokens); key j lives at slot block_tables[b, j / block_size] · block_size +
//     j % block_size. A query that sees no key (context_lens[b] − Q + i < 0) gets 0.
//   Partitions: the context is cut into partitions of RF_PD_PART = 512 keys (the Rust constant
//     PAGED_DECODE_PARTITION). A sequence needs n_b = max(1, ceil(len / 512)) partitions.
//   paged_decode_bf16 — one block per (partition, KV head × row chunk, sequence): grid (P, KVH ·
//     ceil(G·Q / 8), B) with P = max_b n_b and G = H / KVH, block (128) = 4 warps. A block serves
//     up to RF_PD_ROWS = 8 "rows" (query token i, query head of the KV head's group; row r =
//     i · G + g), so K and V of a KV head are read from memory once for all its query heads and
//     tokens (more than 8 rows: the rest in more blocks). Three phases over the ≤ 512 keys:
//       1. scores: a group of GL = 4 / 8 / 16 lanes (hd ≤ 32 / 64 / 128) reads one K row in
//          16-byte pieces (lane piece = 8 dims), dots it with every row's q (held in registers,
//          pre-multiplied by scale · log2 e) and reduces over the group with shuffles; the scores
//          of the partition go to shared memory [8 rows][512] f32. Warps take keys in turn, four
//          16-byte loads in flight per thread.
//       2. softmax per row (a warp per row): m = max of the row's visible scores, p = 2^(s − m)
//          written over the scores, l = Σ p.
//       3. P·V: the same lane mapping reads each V row once and accumulates p · v for every row
//          in registers (8 dims per lane); shuffles then shared memory sum over the key slots.
//     If n_b == 1 the block writes out = acc / l (bf16) directly. Otherwise it writes the
//     partition's partial to f32 scratch `partials`: ml [B, Q, H, P, 2] = (m, l) followed by
//     acc [B, Q, H, P, hd] (unnormalised Σ p·v); m is in log2 units. Blocks of partitions
//     p ≥ n_b exit at once. Rows of a partition that see none of its keys write m = −inf, l = 0.
//   paged_decode_reduce_bf16 — grid (H, Q, B), block (hd): one thread per output element of a
//     sequence with n_b > 1 (others were finished by the first kernel and are skipped):
//     M = max_p m_p, out = Σ_p 2^(m_p − M) acc_p / Σ_p 2^(m_p − M) l_p rounded to bf16.
//   Math: scores, softmax and sums in f32; bf16 → f32 is exact; one rounding to bf16 at the end.
//   Preconditions (checked by the wrapper or guaranteed by the host allocator): 0 ≤ len ≤
//     max_blocks · block_size, block-table entries below num_blocks, caches 16-byte aligned
//     (whole device buffers are).
//   Must match: backend::cpu::Cpu::attention on the same K/V stored contiguously, with positions
//     len − Q + i for the Q queries (tests/kernels_paged.rs).
#include "common/recforge.cuh"

#define RF_PD_PART 512  // keys per partition (= ops::paged::PAGED_DECODE_PARTITION)
#define RF_PD_WARPS 4   // warps per block of paged_decode_bf16
#define RF_PD_ROWS 8    // rows (query token × query head of one KV head) per block
#define RF_PD_UNROLL 4  // 16-byte K / V loads in flight per thread

extern "C" __global__ void kv_write_bf16(const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
                                         const unsigned* __restrict__ slots, __nv_bfloat16* __restrict__ k_cache,
                                         __nv_bfloat16* __restrict__ v_cache, int row) {
    const int t = blockIdx.x;
    const size_t src = (size_t)t * row, dst = (size_t)slots[t] * row;
    if (row % 8 == 0 && rf_aligned16(k) && rf_aligned16(v) && rf_aligned16(k_cache) && rf_aligned16(v_cache)) {
        for (int i = threadIdx.x; i < row / 8; i += blockDim.x) {
            rf_st16(k_cache + dst + 8 * i, rf_ld16(k + src + 8 * i));
            rf_st16(v_cache + dst + 8 * i, rf_ld16(v + src + 8 * i));
        }
    } else {
        for (int i = threadIdx.x; i < row; i += blockDim.x) {
            k_cache[dst + i] = k[src + i];
            v_cache[dst + i] = v[src + i];
        }
    }
}

extern "C" __global__ void kv_gather_bf16(const __nv_bfloat16* __restrict__ k_cache,
                                          const __nv_bfloat16* __restrict__ v_cache,
                                          const unsigned* __restrict__ slots, __nv_bfloat16* __restrict__ k,
                                          __nv_bfloat16* __restrict__ v, int row) {
    const int t = blockIdx.x;
    const size_t dst = (size_t)t * row, src = (size_t)slots[t] * row;
    if (row % 8 == 0 && rf_aligned16(k) && rf_aligned16(v) && rf_aligned16(k_cache) && rf_aligned16(v_cache)) {
        for (int i = threadIdx.x; i < row / 8; i += blockDim.x) {
            rf_st16(k + dst + 8 * i, rf_ld16(k_cache + src + 8 * i));
            rf_st16(v + dst + 8 * i, rf_ld16(v_cache + src + 8 * i));
        }
    } else {
        for (int i = threadIdx.x; i < row; i += blockDim.x) {
            k[dst + i] = k_cache[src + i];
            v[dst + i] = v_cache[src + i];
        }
    }
}

// 8 bf16 of a 16-byte piece as floats (exact).
__device__ __forceinline__ void rf_pd_unpack(const uint4& u, float (&f)[8]) {
    typedef rf_vec16<__nv_bfloat16> V;
    f[0] = V::lo(u.x), f[1] = V::hi(u.x), f[2] = V::lo(u.y), f[3] = V::hi(u.y);
    f[4] = V::lo(u.z), f[5] = V::hi(u.z), f[6] = V::lo(u.w), f[7] = V::hi(u.w);
}

__device__ __forceinline__ float rf_pd_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(RF_FULL_MASK, v, o));
    return v;
}

// The body of paged_decode_bf16 for GL lanes per K / V row (see the header).
template <int GL>
__device__ __forceinline__ void rf_paged_decode(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
                                                const __nv_bfloat16* __restrict__ v_cache, const int* __restrict__ block_tables,
                                                const int* __restrict__ context_lens, __nv_bfloat16* __restrict__ out,
                                                float* __restrict__ partials, int B, int Q, int H, int KVH, int hd,
                                                int block_size, int max_blocks, int P, float scale_log2, float* s_p,
                                                float* s_m, float* s_l) {
    constexpr int KPW = 32 / GL;              // keys per warp step
    constexpr int KSTEP = RF_PD_WARPS * KPW;  // keys per block step

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int part = blockIdx.x, b = blockIdx.z;
    const int G = H / KVH, R = G * Q, chunks = (R + RF_PD_ROWS - 1) / RF_PD_ROWS;
    const int kvh = blockIdx.y / chunks, r0 = (blockIdx.y % chunks) * RF_PD_ROWS;
    const int nrows = min(RF_PD_ROWS, R - r0);
    const int len = context_lens[b];
    const int nparts = max(1, (len + RF_PD_PART - 1) / RF_PD_PART);
    if (part >= nparts) return;  // the whole block
    const int k0 = part * RF_PD_PART;
    // The block's last row has the latest query token, so the most visible keys.
    const int kend = max(k0, min(k0 + RF_PD_PART, len - Q + (r0 + nrows - 1) / G + 1));
    const int slot_in_warp = lane / GL, piece = lane % GL;
    const bool has_piece = piece * 8 < hd;  // hd = 96 leaves 4 of 16 lanes without a piece
    const int* table = block_tables + (size_t)b * max_blocks;
    // Element offset of this lane's piece of key j's row for KV head kvh.
    auto row_of = [&](int j) {
        const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        return (slot * KVH + kvh) * hd + piece * 8;
    };

    // ---- Phase 1: scores (log2 units) of every row against the partition's keys.
    {
        float qv[RF_PD_ROWS][8];
#pragma unroll
        for (int r = 0; r < RF_PD_ROWS; r++) {
            uint4 u = make_uint4(0, 0, 0, 0);
            if (r < nrows && has_piece) {
                const int ra = r0 + r, qi = ra / G, h = kvh * G + ra % G;
                u = rf_ld16(q + ((size_t)(b * Q + qi) * H + h) * hd + piece * 8);
            }
            rf_pd_unpack(u, qv[r]);
#pragma unroll
            for (int e = 0; e < 8; e++) qv[r][e] *= scale_log2;
        }
        for (int base = k0; base < kend; base += KSTEP * RF_PD_UNROLL) {
            uint4 kk[RF_PD_UNROLL];
#pragma unroll
            for (int u = 0; u < RF_PD_UNROLL; u++) {
                const int j = base + u * KSTEP + warp * KPW + slot_in_warp;
                kk[u] = make_uint4(0, 0, 0, 0);
                if (j < kend && has_piece) kk[u] = rf_ld16(k_cache + row_of(j));
            }
#pragma unroll
            for (int u = 0; u < RF_PD_UNROLL; u++) {
                const int j = base + u * KSTEP + warp * KPW + slot_in_warp;
                float kf[8];
                rf_pd_unpack(kk[u], kf);
#pragma unroll
                for (int r = 0; r < RF_PD_ROWS; r++) {
                    if (r < nrows) {  // uniform over the block
                        float dot = 0.0f;
#pragma unroll
                        for (int e = 0; e < 8; e++) dot = fmaf(qv[r][e], kf[e], dot);
#pragma unroll
                        for (int o = GL / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(RF_FULL_MASK, dot, o);
                        if (piece == 0 && j < kend) s_p[r * RF_PD_PART + (j - k0)] = dot;
                    }
                }
            }
        }
    }
    __syncthreads();

    // ---- Phase 2: softmax numerators over each row's visible keys of the partition.
    for (int r = warp; r < nrows; r += RF_PD_WARPS) {
        const int qi = (r0 + r) / G;
        const int n = min(kend, len - Q + qi + 1) - k0;  // visible keys here; may be ≤ 0
        float* sp = s_p + r * RF_PD_PART;
        float m = -INFINITY;
        for (int j = lane; j < n; j += 32) m = fmaxf(m, sp[j]);
        m = rf_pd_warp_max(m);
        float l = 0.0f;
        for (int j = lane; j < kend - k0; j += 32) {
            const float p = j < n ? exp2f(sp[j] - m) : 0.0f;
            sp[j] = p;
            l += p;
        }
        l = rf_warp_sum(l);
        if (lane == 0) s_m[r] = m, s_l[r] = l;
    }
    __syncthreads();

    // ---- Phase 3: Σ p · v per row; lane holds dims piece·8 .. piece·8 + 7 of key slot slot_in_warp.
    float acc[RF_PD_ROWS][8];
#pragma unroll
    for (int r = 0; r < RF_PD_ROWS; r++)
#pragma unroll
        for (int e = 0; e < 8; e++) acc[r][e] = 0.0f;
    for (int base = k0; base < kend; base += KSTEP * RF_PD_UNROLL) {
        uint4 vv[RF_PD_UNROLL];
#pragma unroll
        for (int u = 0; u < RF_PD_UNROLL; u++) {
            const int j = base + u * KSTEP + warp * KPW + slot_in_warp;
            vv[u] = make_uint4(0, 0, 0, 0);
            if (j < kend && has_piece) vv[u] = rf_ld16(v_cache + row_of(j));
        }
#pragma unroll
        for (int u = 0; u < RF_PD_UNROLL; u++) {
            const int j = base + u * KSTEP + warp * KPW + slot_in_warp;
            if (j >= kend) continue;
            float vf[8];
            rf_pd_unpack(vv[u], vf);
#pragma unroll
            for (int r = 0; r < RF_PD_ROWS; r++) {
                if (r < nrows) {
                    const float p = s_p[r * RF_PD_PART + (j - k0)];
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[r][e] = fmaf(p, vf[e], acc[r][e]);
                }
            }
        }
    }
    // Sum over the key slots of the warp (lanes with the same piece), then over the warps.
#pragma unroll
    for (int r = 0; r < RF_PD_ROWS; r++) {
        if (r < nrows) {
#pragma unroll
            for (int e = 0; e < 8; e++)
#pragma unroll
                for (int o = GL; o < 32; o <<= 1) acc[r][e] += __shfl_xor_sync(RF_FULL_MASK, acc[r][e], o);
        }
    }
    __syncthreads();  // every read of p is done: s_p now holds the per-warp sums [warp][row][hd]
    if (slot_in_warp == 0 && has_piece) {
#pragma unroll
        for (int r = 0; r < RF_PD_ROWS; r++) {
            if (r < nrows) {
#pragma unroll
                for (int e = 0; e < 8; e++) s_p[(warp * RF_PD_ROWS + r) * hd + piece * 8 + e] = acc[r][e];
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nrows * hd; i += blockDim.x) {
        const int r = i / hd, d = i % hd, ra = r0 + r, qi = ra / G, h = kvh * G + ra % G;
        float a = 0.0f;
#pragma unroll
        for (int w = 0; w < RF_PD_WARPS; w++) a += s_p[(w * RF_PD_ROWS + r) * hd + d];
        const size_t orow = (size_t)(b * Q + qi) * H + h;
        if (nparts == 1) {
            const float l = s_l[r];
            out[orow * hd + d] = __float2bfloat16(l > 0.0f ? a / l : 0.0f);
        } else {
            const size_t pr = orow * P + part;
            partials[(size_t)B * Q * H * P * 2 + pr * hd + d] = a;
            if (d == 0) partials[2 * pr] = s_m[r], partials[2 * pr + 1] = s_l[r];
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
    paged_decode_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
                      const __nv_bfloat16* __restrict__ v_cache, const int* __restrict__ block_tables,
                      const int* __restrict__ context_lens, __nv_bfloat16* __restrict__ out, float* __restrict__ partials,
                      int B, int Q, int H, int KVH, int hd, int block_size, int max_blocks, int P, float scale_log2) {
    // Shared memory lives here, not in the three instantiations of the body (one copy, 16 KiB).
    static_assert(RF_PD_ROWS * RF_PD_PART >= RF_PD_WARPS * RF_PD_ROWS * 128, "the P·V sums reuse the score buffer");
    RF_SHARED(float, s_p, [RF_PD_ROWS * RF_PD_PART]);  // scores, then p, then the per-warp P·V sums
    RF_SHARED(float, s_m, [RF_PD_ROWS]);
    RF_SHARED(float, s_l, [RF_PD_ROWS]);
    if (hd <= 32)
        rf_paged_decode<4>(q, k_cache, v_cache, block_tables, context_lens, out, partials, B, Q, H, KVH, hd, block_size,
                           max_blocks, P, scale_log2, s_p, s_m, s_l);
    else if (hd <= 64)
        rf_paged_decode<8>(q, k_cache, v_cache, block_tables, context_lens, out, partials, B, Q, H, KVH, hd, block_size,
                           max_blocks, P, scale_log2, s_p, s_m, s_l);
    else
        rf_paged_decode<16>(q, k_cache, v_cache, block_tables, context_lens, out, partials, B, Q, H, KVH, hd, block_size,
                            max_blocks, P, scale_log2, s_p, s_m, s_l);
}

extern "C" __global__ void paged_decode_reduce_bf16(const float* __restrict__ partials, const int* __restrict__ context_lens,
                                                    __nv_bfloat16* __restrict__ out, int B, int Q, int H, int hd, int P) {
    const int h = blockIdx.x, qi = blockIdx.y, b = blockIdx.z, d = threadIdx.x;
    const int n = (context_lens[b] + RF_PD_PART - 1) / RF_PD_PART;
    if (n <= 1 || d >= hd) return;  // one partition: written by paged_decode_bf16
    const size_t row = (size_t)(b * Q + qi) * H + h;
    const float* ml = partials + row * P * 2;
    const float* acc = partials + (size_t)B * Q * H * P * 2 + row * P * hd + d;
    float M = -INFINITY;
    for (int p = 0; p < n; p++) M = fmaxf(M, ml[2 * p]);
    float L = 0.0f, A = 0.0f;
    for (int p = 0; p < n; p++) {
        const float w = ml[2 * p] == -INFINITY ? 0.0f : exp2f(ml[2 * p] - M);  // M = −inf: no term
        L = fmaf(w, ml[2 * p + 1], L);
        A = fmaf(w, acc[(size_t)p * hd], A);
    }
    out[row * hd + d] = __float2bfloat16(L > 0.0f ? A / L : 0.0f);
}
