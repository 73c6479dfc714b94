// Embedding gather: out[t] = table[ids[t]].
//
// Layout:  table [vocab, d]  row-major, element type T (f32 or bf16)
//          ids   [tokens]    u32
//          out   [tokens, d] T
//          bad   [1]         i32, set to INT_MAX by the caller before the launch
// Math:    a copy (no conversion). An id ≥ vocab never reads the table: that row of out is
//          written with zeros and atomicMin(bad, t) records the first bad token index, which the
//          wrapper reads back and turns into an error naming the id and its position.
// Access:  16-byte vector copies (4 f32 / 8 bf16) when d is a multiple of that and table and
//          out are 16-byte aligned (checked at run time, uniform over the grid); else scalar.
// Launch:  block = (bx, by): bx = threads per row = clamp(roundup32(items), 32, 256) with items
//          = d / N (vector) or d (scalar), by = rows per block = min(256 / bx, tokens);
//          grid = (ceil(tokens / by)). No barrier: a block's threads past the last token exit.
// Must match: backend::cpu::Cpu::embedding (src/backend/cpu/mod.rs), which errors on a bad id.
#include "common/recforge.cuh"

template <typename T>
__device__ void embedding(const T* __restrict__ table, const unsigned* __restrict__ ids, T* __restrict__ out,
                          int* __restrict__ bad, unsigned vocab, int d, int tokens) {
    const int t = blockIdx.x * blockDim.y + threadIdx.y;
    if (t >= tokens) return;
    const unsigned id = ids[t];
    T* o = out + (size_t)t * d;
    constexpr int N = 16 / (int)sizeof(T);
    const bool vec = d % N == 0 && ((uintptr_t)table & 15) == 0 && ((uintptr_t)out & 15) == 0;
    if (id >= vocab) {
        if (threadIdx.x == 0) atomicMin(bad, t);
        if (vec) {
            for (int j = threadIdx.x; j < d / N; j += blockDim.x) rf_st16(o + (size_t)j * N, make_uint4(0u, 0u, 0u, 0u));
        } else {
            for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = rf_from_float<T>(0.0f);
        }
        return;
    }
    const T* src = table + (size_t)id * d;
    if (vec) {
        for (int j = threadIdx.x; j < d / N; j += blockDim.x) rf_st16(o + (size_t)j * N, rf_ld16(src + (size_t)j * N));
    } else {
        for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = src[i];
    }
}

extern "C" __global__ void embedding_f32(const float* table, const unsigned* ids, float* out, int* bad, unsigned vocab,
                                         int d, int tokens) {
    embedding<float>(table, ids, out, bad, vocab, d, tokens);
}
extern "C" __global__ void embedding_bf16(const __nv_bfloat16* table, const unsigned* ids, __nv_bfloat16* out, int* bad,
                                          unsigned vocab, int d, int tokens) {
    embedding<__nv_bfloat16>(table, ids, out, bad, vocab, d, tokens);
}

// Embedding backward into a trainable table (off by default: LoRA keeps embeddings frozen).
// Layout:  dy [tokens, d] bf16; ids [tokens] u32; dtable [vocab, d] f32, accumulated (+=).
// Math:    dtable[ids[t], i] += dy[t, i] with f32 atomics (tokens sharing an id add in an
//          unspecified order on a GPU); ids ≥ vocab are skipped (the forward reported them).
// Launch:  grid-stride over tokens·d, block (256).
// Must match: backend::cpu::Cpu::embedding_backward.
extern "C" __global__ void embedding_backward_bf16(const __nv_bfloat16* __restrict__ dy, const unsigned* __restrict__ ids,
                                                   float* __restrict__ dtable, unsigned vocab, int d, int tokens) {
    const size_t total = (size_t)tokens * d;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const unsigned id = ids[i / d];
        if (id < vocab) atomicAdd(dtable + (size_t)id * d + i % d, __bfloat162float(dy[i]));
    }
}
