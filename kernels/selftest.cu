// Self-test kernels: each exercises primitives of kernels/common/rf_cuda.cuh so that the SIMT
// simulator can be checked against the documented semantics (tests/simulator.rs, on every test
// run) and against the hardware (the same kernel on the same inputs on both devices, when a GPU
// is present). Planted-bug kernels show what the simulator reports; they never run on a GPU.
//
// Layouts and launch geometry are stated per kernel. CPU references: tests/simulator.rs.
#include "common/recforge.cuh"

// Shuffles. Launch: grid (G), block (multiple of 32). One i32 per thread, i = global thread id.
// op 0: __shfl_sync(v, arg[i], width); 1: __shfl_xor_sync; 2: __shfl_down_sync; 3: __shfl_up_sync.
extern "C" __global__ void selftest_shfl_i32(int op, int width, const int* arg, const int* in, int* out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int v = in[i], a = arg[i];
    int r;
    if (op == 0) r = __shfl_sync(RF_FULL_MASK, v, a, width);
    else if (op == 1) r = __shfl_xor_sync(RF_FULL_MASK, v, a, width);
    else if (op == 2) r = __shfl_down_sync(RF_FULL_MASK, v, (unsigned)a, width);
    else r = __shfl_up_sync(RF_FULL_MASK, v, (unsigned)a, width);
    out[i] = r;
}

// Votes. Launch: grid (G), block (multiple of 32). Lanes whose bit is set in `mask` vote on
// pred[i] != 0 with that mask and write out[3i..3i+3) = ballot, any, all; other lanes write nothing.
extern "C" __global__ void selftest_vote(unsigned mask, const int* pred, unsigned* out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int lane = threadIdx.x & 31;
    if (!((mask >> lane) & 1u)) return;
    const int p = pred[i] != 0;
    out[3 * i + 0] = __ballot_sync(mask, p);
    out[3 * i + 1] = (unsigned)__any_sync(mask, p);
    out[3 * i + 2] = (unsigned)__all_sync(mask, p);
}

// Atomics from every thread of the grid: sum[0] += v, umax[0] = max(umax[0], v), fsum[0] += v/4
// (exact in f32 for small integers), cas[0] += 1 through an atomicCAS loop. Grid-stride over n.
extern "C" __global__ void selftest_atomics(const int* vals, int n, int* sum, unsigned* umax, float* fsum, int* cas) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const int v = vals[i];
        atomicAdd(sum, v);
        atomicMax(umax, (unsigned)v);
        atomicAdd(fsum, 0.25f * (float)v);
        int old = *(volatile int*)cas, seen;
        while ((seen = atomicCAS(cas, old, old + 1)) != old) old = seen;
    }
}

// ldmatrix. Launch: grid (1), block (32), dynamic smem 512 bytes. M: 32 rows × 8 b16 (row r at
// M + 8r); lane l copies row l to shared memory (cp.async) and points ldmatrix at row
// (5l + 3) % 32. out[(variant·32 + lane)·4 + reg] for variants x1, x2, x4, x1.trans, x2.trans,
// x4.trans (registers a variant does not produce are left untouched).
extern "C" __global__ void selftest_ldmatrix(const unsigned short* M, unsigned* out) {
    RF_DYNAMIC_SMEM(unsigned short, s);
    const int l = threadIdx.x;
    rf_cp_async16(s + 8 * l, M + 8 * l);
    rf_cp_async_commit();
    rf_cp_async_wait<0>();
    __syncthreads();
    rf_smem_t<unsigned short> row = s + 8 * ((5 * l + 3) % 32);
    unsigned* o = out + 4 * l;
    rf_ldmatrix_x1(o[0], row);
    o += 128;
    rf_ldmatrix_x2(o[0], o[1], row);
    o += 128;
    rf_ldmatrix_x4(o[0], o[1], o[2], o[3], row);
    o += 128;
    rf_ldmatrix_x1_trans(o[0], row);
    o += 128;
    rf_ldmatrix_x2_trans(o[0], o[1], row);
    o += 128;
    rf_ldmatrix_x4_trans(o[0], o[1], o[2], o[3], row);
}

// One mma.sync from raw fragment registers. Launch: grid (1), block (32).
// kind 0: m16n8k16 bf16, 1: m16n8k16 f16 (a: 4 regs, b: 2 regs, c/d: 4 f32 per lane);
// kind 2: m16n8k32 s8 (c/d: 4 s32 per lane). a[4l + r], b[2l + r], c[4l + r], d[4l + r].
extern "C" __global__ void selftest_mma(int kind, const unsigned* a, const unsigned* b, const unsigned* c, unsigned* d) {
    const int l = threadIdx.x;
    const unsigned ra[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
    const unsigned rb[2] = {b[2 * l], b[2 * l + 1]};
    if (kind == 2) {
        int rc[4], rd[4];
        for (int i = 0; i < 4; i++) rc[i] = (int)c[4 * l + i];
        rf_mma_m16n8k32_s8(rd, ra, rb, rc);
        for (int i = 0; i < 4; i++) d[4 * l + i] = (unsigned)rd[i];
    } else {
        float rc[4], rd[4];
        for (int i = 0; i < 4; i++) rc[i] = __uint_as_float(c[4 * l + i]);
        if (kind == 0) rf_mma_m16n8k16_bf16(rd, ra, rb, rc);
        else rf_mma_m16n8k16_f16(rd, ra, rb, rc);
        for (int i = 0; i < 4; i++) d[4 * l + i] = __float_as_uint(rd[i]);
    }
}

// PLANTED BUG: no __syncthreads between writing shared memory and reading another warp's slot.
// Launch: grid (1), block (64), dynamic smem 256 bytes. Correct code would give out[t] = (t+32)%64.
extern "C" __global__ void selftest_bug_missing_sync(int* out) {
    RF_DYNAMIC_SMEM(int, s);
    const int t = threadIdx.x;
    s[t] = t;
    out[t] = s[(t + 32) % 64];
}

// PLANTED BUG (with n > the length of x): copies n elements of x, reading past its end.
// Launch: grid (ceil(n / B)), block (B). Run only on the simulator, whose buffers end at a guard page.
extern "C" __global__ void selftest_bug_global_overrun(const float* x, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i];
}

// PLANTED BUG: copies x[i - 1] to out[i], reading the element before x's start at i = 0.
// Launch: grid (ceil(n / B)), block (B). Run only on the simulator with its guard page before buffers.
extern "C" __global__ void selftest_bug_global_underrun(const float* x, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i - 1];
}

// PLANTED BUG: reads `shift` elements past each thread's slot of a blockDim-float dynamic array.
// Launch: grid (1), block (B), dynamic smem 4·B bytes.
extern "C" __global__ void selftest_bug_smem_oob(float* out, int shift) {
    RF_DYNAMIC_SMEM(float, s);
    const int t = threadIdx.x;
    s[t] = (float)t;
    __syncthreads();
    out[t] = s[t + shift];
}
