// The paged KV cache on the device: writing new K/V into their slots, and decode attention that
// reads K/V through per-sequence block tables (host side: src/infer/paged.rs).
//
// Cache layout: k_cache, v_cache [num_blocks · block_size, KVH, hd] bf16 — slot s = block ·
// block_size + offset is one row of KVH · hd values, so a block is block_size consecutive rows.
//
// kv_write_bf16 — k, v [T, KVH, hd] bf16 (after RoPE), slots [T] u32 → k_cache[slots[t]] = k[t],
//   v_cache[slots[t]] = v[t]. Launch: grid (T), block (128); 16-byte copies when KVH·hd is a
//   multiple of 8, else scalar. Must match: a plain row scatter (tests/kernels_paged.rs).
//
// paged_decode_bf16 — one query token per sequence: q [B, H, hd] bf16, block_tables [B, max_blocks]
//   i32, context_lens [B] i32 (keys 0 .. len−1 visible), out [B, H, hd] bf16. One warp per
//   (sequence, query head) with an online softmax in f32 over the context, reading key j at slot
//   block_tables[b, j / block_size] · block_size + j % block_size. First version (no split along
//   the context yet). Block-table entries must be valid blocks and context_lens ≤ max_blocks ·
//   block_size — both come from the host allocator, which guarantees it. Launch: grid
//   (ceil(H/4), B), block (128); hd ≤ 128, hd % 32 == 0.
//   Must match: backend::cpu::Cpu::attention on the same K/V stored contiguously.
#include "common/recforge.cuh"

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

extern "C" __global__ void paged_decode_bf16(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
                                             const __nv_bfloat16* __restrict__ v_cache, const int* __restrict__ block_tables,
                                             const int* __restrict__ context_lens, __nv_bfloat16* __restrict__ out, int H,
                                             int KVH, int hd, int block_size, int max_blocks, float scale) {
    const int lane = threadIdx.x & 31, h = blockIdx.x * 4 + (threadIdx.x >> 5), b = blockIdx.y;
    if (h >= H) return;  // whole warps
    const int kh = h / (H / KVH), per = hd / 32, len = context_lens[b];
    const int* table = block_tables + (size_t)b * max_blocks;
    float qv[4], acc[4];
#pragma unroll
    for (int d = 0; d < 4; d++) {
        qv[d] = d < per ? __bfloat162float(q[((size_t)b * H + h) * hd + lane + 32 * d]) : 0.0f;
        acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j < len; j++) {
        const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        const size_t r = (slot * KVH + kh) * hd;
        float dot = 0.0f;
#pragma unroll
        for (int d = 0; d < 4; d++)
            if (d < per) dot += qv[d] * __bfloat162float(k_cache[r + lane + 32 * d]);
        const float sc = rf_warp_sum(dot) * scale, mn = fmaxf(m, sc);
        const float corr = expf(m - mn), p = expf(sc - mn);
        l = l * corr + p;
#pragma unroll
        for (int d = 0; d < 4; d++)
            if (d < per) acc[d] = acc[d] * corr + p * __bfloat162float(v_cache[r + lane + 32 * d]);
        m = mn;
    }
#pragma unroll
    for (int d = 0; d < 4; d++)
        if (d < per) out[((size_t)b * H + h) * hd + lane + 32 * d] = __float2bfloat16(len > 0 ? acc[d] / l : 0.0f);
}
