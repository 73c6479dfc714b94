// Fused softmax cross-entropy, forward and backward, in place over a chunk of rows.
//
// Layout:  logits [T, V] row-major, element type E (f32 or bf16); overwritten with the gradient
//                 (softmax(row) − onehot(label)) · grad_scale, or zeros for an ignored row
//          labels [T] u32; 0xFFFFFFFF = ignored (prompt tokens, padding)
//          loss   [T] f32: logsumexp(row) − row[label]; 0 for an ignored row; NaN (and zero
//                 gradient) for a label ≥ V, so a bad label cannot go unnoticed
// Math:    f32 throughout; one pass for the running max and the sum of exponentials (online
//          softmax: each thread keeps (m, s), pairs merge as s1·e^(m1−M) + s2·e^(m2−M)), then one
//          pass writing the gradient. Each row is read twice and written once.
// Launch:  grid (T), block (256): one block per row, threads stride the vocabulary.
// Must match: backend::cpu::Cpu::cross_entropy (src/backend/cpu/mod.rs).
#include "common/recforge.cuh"

#define RF_CE_IGNORE 0xFFFFFFFFu

template <typename E>
__device__ void cross_entropy(E* __restrict__ logits, const unsigned* __restrict__ labels, float grad_scale,
                              float* __restrict__ loss, int V) {
    RF_SHARED(float, sm, [32]);
    RF_SHARED(float, ss, [32]);
    const int row = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    E* x = logits + (size_t)row * V;
    const unsigned label = labels[row];
    if (label == RF_CE_IGNORE || label >= (unsigned)V) {
        for (int i = threadIdx.x; i < V; i += blockDim.x) x[i] = rf_from_float<E>(0.0f);
        if (threadIdx.x == 0) loss[row] = label == RF_CE_IGNORE ? 0.0f : NAN;
        return;
    }
    float m = -INFINITY, s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = rf_to_float(x[i]);
        if (v > m) {
            s = (m == -INFINITY ? 0.0f : s * expf(m - v)) + 1.0f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(RF_FULL_MASK, m, o), s2 = __shfl_xor_sync(RF_FULL_MASK, s, o);
        rf_softmax_merge(m, s, m2, s2);
    }
    if (lane == 0) {
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    m = lane < nwarps ? sm[lane] : -INFINITY;
    s = lane < nwarps ? ss[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(RF_FULL_MASK, m, o), s2 = __shfl_xor_sync(RF_FULL_MASK, s, o);
        rf_softmax_merge(m, s, m2, s2);
    }
    const float lse = m + logf(s);
    const float xl = rf_to_float(x[label]);
    __syncthreads();  // every thread has read x[label] before anyone overwrites it
    if (threadIdx.x == 0) loss[row] = lse - xl;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float p = expf(rf_to_float(x[i]) - lse);
        x[i] = rf_from_float<E>((p - (i == (int)label ? 1.0f : 0.0f)) * grad_scale);
    }
}

extern "C" __global__ void cross_entropy_f32(float* logits, const unsigned* labels, float grad_scale, float* loss, int V) {
    cross_entropy<float>(logits, labels, grad_scale, loss, V);
}

extern "C" __global__ void cross_entropy_bf16(__nv_bfloat16* logits, const unsigned* labels, float grad_scale, float* loss,
                                              int V) {
    cross_entropy<__nv_bfloat16>(logits, labels, grad_scale, loss, V);
}
