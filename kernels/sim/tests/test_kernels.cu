// Test kernels of the SIMT simulator (kernels/sim/tests). Plain CUDA C++: they also compile with
// nvcc (run.sh checks that), so the GPU self-test can run the same kernels on hardware.
#include "common/recforge.cuh"
#include "common/rf_wgmma.cuh"

#define LIN (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z))

// op: 0 __shfl_sync, 1 __shfl_up_sync, 2 __shfl_down_sync, 3 __shfl_xor_sync; b[t]: the lane
// argument of thread t. Full mask. One block.
template <class T> __device__ void shfl_any(int op, int width, const int* b, const T* in, T* out) {
    const int t = threadIdx.x;
    T v = in[t], r;
    if (op == 0) r = __shfl_sync(RF_FULL_MASK, v, b[t], width);
    else if (op == 1) r = __shfl_up_sync(RF_FULL_MASK, v, (unsigned)b[t], width);
    else if (op == 2) r = __shfl_down_sync(RF_FULL_MASK, v, (unsigned)b[t], width);
    else r = __shfl_xor_sync(RF_FULL_MASK, v, b[t], width);
    out[t] = r;
}
extern "C" __global__ void t_shfl_i(int op, int width, const int* b, const int* in, int* out) { shfl_any<int>(op, width, b, in, out); }
extern "C" __global__ void t_shfl_f(int op, int width, const int* b, const float* in, float* out) { shfl_any<float>(op, width, b, in, out); }
extern "C" __global__ void t_shfl_d(int op, int width, const int* b, const double* in, double* out) { shfl_any<double>(op, width, b, in, out); }

// Two independent groups per warp: lanes 0..15 (mask 0x0000ffff) butterfly-sum over 16 lanes;
// lanes 16..31 (mask 0xffff0000) shuffle down by 3 with width 8.
extern "C" __global__ void t_shfl_partial(const int* in, int* out) {
    const int t = threadIdx.x, lane = t & 31;
    int v = in[t];
    if (lane < 16) {
        for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, o);
    } else {
        v = __shfl_down_sync(0xffff0000u, v, 3, 8);
    }
    out[t] = v;
}

// Even lanes vote among themselves (mask 0x55555555), odd lanes among themselves (0xaaaaaaaa).
extern "C" __global__ void t_vote(int* out) {
    const int t = threadIdx.x, lane = t & 31;
    const unsigned m = (lane & 1) ? 0xaaaaaaaau : 0x55555555u;
    const unsigned b = __ballot_sync(m, t % 3 == 0);
    const int a = __any_sync(m, t == 6 || t == 33);
    const int l = __all_sync(m, (lane & 1) || t < 40);
    out[3 * t + 0] = (int)b;
    out[3 * t + 1] = a;
    out[3 * t + 2] = l;
}

extern "C" __global__ void t_atomics(int* ci, unsigned* cu, float* cf, int* mx, unsigned* mxu, int* cas, int* mn) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(ci, 1);
    atomicAdd(cu, 2u);
    atomicAdd(cf, 1.0f);
    atomicMax(mx, (g * 7919) % 100003);
    atomicMax(mxu, (unsigned)g);
    atomicMin(mn, 1000000 - g);
    int old = *cas, seen;
    while ((seen = atomicCAS(cas, old, old + 3)) != old) old = seen;
}

// Block-wide tree reduction through shared memory (any block shape up to 1024 threads), plus the
// __syncthreads_count/and/or forms. out[4*block + {sum, count, and, or}].
extern "C" __global__ void t_block_reduce(const int* in, int* out) {
    __shared__ int s[1024];
    const int n = blockDim.x * blockDim.y * blockDim.z, lin = LIN;
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    s[lin] = in[b * n + lin];
    __syncthreads();
    int p = 1;
    while (p < n) p <<= 1;
    for (int stride = p >> 1; stride > 0; stride >>= 1) {
        if (lin < stride && lin + stride < n) s[lin] += s[lin + stride];
        __syncthreads();
    }
    const int c = __syncthreads_count(in[b * n + lin] % 3 == 0);
    const int a = __syncthreads_and(lin < n - 1);
    const int o = __syncthreads_or(lin == n - 1);
    if (lin == 0) {
        out[4 * b + 0] = s[0];
        out[4 * b + 1] = c;
        out[4 * b + 2] = a;
        out[4 * b + 3] = o;
    }
}

// Dynamic shared memory (n floats): reverse through smem, plus 16-byte vector copies smem <-> global.
extern "C" __global__ void t_dyn_smem(const float* in, float* out, int n, uint4* vout) {
    RF_DYNAMIC_SMEM(float, buf);
    const float* xr = in + (size_t)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) buf[n - 1 - i] = xr[i];
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[(size_t)blockIdx.x * n + i] = 2.0f * buf[i];
    __syncthreads();
    rf_smem_t<float> p = buf;  // a checked pointer in the simulator, float* on the GPU
    for (int i = threadIdx.x; i < n / 4; i += blockDim.x) rf_st16(vout + (size_t)blockIdx.x * (n / 4) + i, rf_ld16(p + 4 * i));
}

// PLANTED BUG (a): writes shared memory, then reads another warp's slot without __syncthreads.
extern "C" __global__ void t_race_static(int* out) {
    __shared__ int s[64];
    const int t = threadIdx.x;
    s[t] = (int)blockIdx.x * 1000 + t + 1;
    out[blockIdx.x * 64 + t] = s[(t + 32) & 63];  // missing __syncthreads() before this read
}
extern "C" __global__ void t_race_dyn(int* out) {
    RF_DYNAMIC_SMEM(int, s);
    const int t = threadIdx.x;
    s[t] = (int)blockIdx.x * 1000 + t + 1;
    out[blockIdx.x * 64 + t] = s[(t + 32) & 63];  // missing __syncthreads() before this read
}

// PLANTED BUG (a'): the same missing barrier, read from the thread below (slot t - 1). In linear
// order the writer always ran first, so only another schedule shows it.
extern "C" __global__ void t_race_prev(int* out) {
    RF_DYNAMIC_SMEM(int, s);
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = (int)blockIdx.x * 1000 + t + 1;
    out[blockIdx.x * n + t] = s[(t + n - 1) % n];  // missing __syncthreads() before this read
}

// PLANTED BUG (a''): the buffer is rewritten for the next round with no barrier after the last
// read of the previous one (a write-after-read race across warps, as in a pipelined GEMM that
// refills a stage too early). A warp-wide step between the read and the write keeps the warps of
// a round-robin schedule in step, so only a warp that runs ahead shows it.
extern "C" __global__ void t_race_war(int rounds, int* out) {
    RF_DYNAMIC_SMEM(int, s);
    const int t = threadIdx.x;
    int sum = 0;
    for (int r = 0; r < rounds; r++) {
        s[t] = r * 1000 + t;
        __syncthreads();
        sum += s[(t + 32) & 63];
        __syncwarp();  // missing __syncthreads() after this: the next round's write races the read
    }
    out[blockIdx.x * 64 + t] = sum;
}

// PLANTED BUG (a3): reads static shared slots no thread of this block wrote. Block b writes only
// slot b % 64 (thread 0), then every thread reads slot t: with RF_SHARED the unwritten slots read
// the poison (-1) in every block, not a previous block's value and not zero.
extern "C" __global__ void t_shared_unwritten(int* out) {
    RF_SHARED(int, s, [64]);
    const int t = threadIdx.x;
    if (t == 0) s[blockIdx.x % 64] = (int)blockIdx.x + 100;
    __syncthreads();
    out[blockIdx.x * 64 + t] = s[t];
}

// PLANTED BUG (b): thread t reads slot t+1 of n = blockDim.x slots: the last one is past the end.
extern "C" __global__ void t_oob(float* out) {
    RF_DYNAMIC_SMEM(float, s);
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x + 1];
}

// PLANTED BUG (c): __syncthreads in a divergent branch (threads >= cut / < cut exit first).
extern "C" __global__ void t_div_barrier(int* out, int cut) {
    if ((int)threadIdx.x >= cut) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}
extern "C" __global__ void t_div_barrier_rev(int* out, int cut) {
    if ((int)threadIdx.x < cut) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

// PLANTED BUG (e): 16-byte load from in + off (misaligned unless off % 16 == 0).
extern "C" __global__ void t_misaligned(const unsigned char* in, uint4* out, int off) {
    out[threadIdx.x] = rf_ld16(in + off + 16 * threadIdx.x);
}
extern "C" __global__ void t_misaligned_smem(uint4* out, int off_floats) {
    RF_DYNAMIC_SMEM(float, s);
    rf_st16(s + off_floats, make_uint4(1, 2, 3, 4));
    out[threadIdx.x] = rf_ld16(s + off_floats);
}

// Lane 5 exits before the full-mask shuffle.
extern "C" __global__ void t_lane_exit(float* out) {
    if ((threadIdx.x & 31) == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(RF_FULL_MASK, 1.0f, 1);
}
// Lane 0 names the full warp, lane 1 only lanes 0-1.
extern "C" __global__ void t_mask_mismatch(int* out) {
    const unsigned m = (threadIdx.x & 31) == 1 ? 0x3u : RF_FULL_MASK;
    out[threadIdx.x] = __shfl_sync(m, (int)threadIdx.x, 0);
}
// Lane 0 of warp 0 waits at __syncthreads while lanes 1..31 wait for it in __syncwarp.
extern "C" __global__ void t_deadlock(int* out) {
    if (threadIdx.x == 0) __syncthreads();
    else if (threadIdx.x < 32) __syncwarp();
    else __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void t_syncwarp_loop(int iters, int* out) {
    int s = 0;
    for (int i = 0; i < iters; i++) {
        __syncwarp();
        s++;
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

// A non-inline helper whose name the test program also defines: links only because the
// generated sim_<stem>.cpp wraps the kernel source in an anonymous namespace.
__device__ int rf_test_helper(int x) { return x * 3 + 1; }
extern "C" __global__ void t_helper_clash(int* out) { out[threadIdx.x] = rf_test_helper((int)threadIdx.x); }

// ldmatrix: 32 rows of 8 b16 in global memory; lane l points at row perm(l) = (5l + 3) % 32 of the
// copy in shared memory (cp.async). out[(variant * 32 + lane) * 4 + reg], variants x1, x2, x4,
// x1.trans, x2.trans, x4.trans.
extern "C" __global__ void t_ldm(const unsigned short* M, unsigned* out) {
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

// One warp computes D = A*B + C through cp.async -> ldmatrix -> mma.sync.
// kind 0: bf16 m16n8k16, 1: f16 m16n8k16 (A 16x16, Bt = B^T 8x16, Brow = B 16x8; D from Bt with
// ldmatrix, D2 from Brow with ldmatrix.trans), 2: s8 m16n8k32 (A 16x32, Bt 8x32; D only).
// Every row of A and Bt is 32 bytes, every row of Brow 16 bytes.
extern "C" __global__ void t_mma(int kind, const unsigned char* A, const unsigned char* Bt, const unsigned char* Brow,
                                 const void* C, void* D, void* D2) {
    RF_DYNAMIC_SMEM(unsigned char, s);  // [0, 512) A, [512, 768) Bt, [768, 1024) Brow
    const int l = threadIdx.x, g = l >> 2, t = l & 3;
    rf_cp_async16(s + 16 * l, A + 16 * l);
    if (l < 16) rf_cp_async16(s + 512 + 16 * l, Bt + 16 * l);
    else rf_cp_async16(s + 768 + 16 * (l - 16), Brow + 16 * (l - 16));
    rf_cp_async_commit();
    rf_cp_async_wait_all();
    __syncthreads();
    unsigned a[4], b[2], b2[2];
    rf_ldmatrix_x4(a[0], a[1], a[2], a[3], s + (l % 8 + 8 * ((l / 8) & 1)) * 32 + 16 * (l / 16));
    rf_ldmatrix_x2(b[0], b[1], s + 512 + (l % 8) * 32 + 16 * ((l / 8) & 1));
    rf_ldmatrix_x2_trans(b2[0], b2[1], s + 768 + (l % 16) * 16);
    if (kind == 2) {
        int c[4], d[4];
        for (int i = 0; i < 4; i++) c[i] = static_cast<const int*>(C)[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
        rf_mma_m16n8k32_s8(d, a, b, c);
        for (int i = 0; i < 4; i++) static_cast<int*>(D)[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
    } else {
        float c[4], d[4], d2[4];
        for (int i = 0; i < 4; i++) c[i] = static_cast<const float*>(C)[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
        if (kind == 0) {
            rf_mma_m16n8k16_bf16(d, a, b, c);
            rf_mma_m16n8k16_bf16(d2, a, b2, c);
        } else {
            rf_mma_m16n8k16_f16(d, a, b, c);
            rf_mma_m16n8k16_f16(d2, a, b2, c);
        }
        for (int i = 0; i < 4; i++) {
            static_cast<float*>(D)[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
            static_cast<float*>(D2)[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d2[i];
        }
    }
}

// cp.async groups: each thread copies its three uint4 of src (src[32 k + lane], k = 0..2) into
// slots s[32 k + lane]: slot 0 in group 0, slot 1 in group 1, slot 2 left uncommitted. It reads
// its own slots before any wait (phase 0), after wait_group 1 (1), wait_group 0 (2) and wait_all
// (3): out[(3 * phase + k) * 32 + lane].
extern "C" __global__ void t_cp_groups(const uint4* src, uint4* out) {
    RF_DYNAMIC_SMEM(uint4, s);
    const int l = threadIdx.x;
    rf_cp_async16(s + l, src + l);
    rf_cp_async_commit();
    rf_cp_async16(s + 32 + l, src + 32 + l);
    rf_cp_async_commit();
    rf_cp_async16(s + 64 + l, src + 64 + l);
    for (int k = 0; k < 3; k++) out[k * 32 + l] = rf_ld16(s + 32 * k + l);
    rf_cp_async_wait<1>();
    for (int k = 0; k < 3; k++) out[(3 + k) * 32 + l] = rf_ld16(s + 32 * k + l);
    rf_cp_async_wait<0>();
    for (int k = 0; k < 3; k++) out[(6 + k) * 32 + l] = rf_ld16(s + 32 * k + l);
    rf_cp_async_wait_all();
    for (int k = 0; k < 3; k++) out[(9 + k) * 32 + l] = rf_ld16(s + 32 * k + l);
}

// A 3-stage cp.async ring as the GEMMs run it: one warp sums n_tiles tiles of 32 uint4 (tile t in
// stage t % 3), each lane reading its right neighbour's slot (as an mma operand read crosses
// lanes), out[lane] = the sum of that uint4's four words over the tiles. bug 0: correct
// (wait_group 1 = STAGES - 2, then a barrier, then the refill); 1: wait_group 2 (the stage about
// to be read may still be in flight); 2: the refill issued before the barrier (into the stage
// other lanes may still be reading).
extern "C" __global__ void t_cp_ring(const uint4* src, int n_tiles, int bug, unsigned* out) {
    RF_DYNAMIC_SMEM(uint4, s);
    const int l = threadIdx.x;
    for (int t = 0; t < 2; t++) {
        if (t < n_tiles) rf_cp_async16(s + 32 * t + l, src + 32 * t + l);
        rf_cp_async_commit();
    }
    unsigned acc = 0;
    for (int t = 0; t < n_tiles; t++) {
        if (bug == 1) rf_cp_async_wait<2>();
        else rf_cp_async_wait<1>();
        if (bug == 2 && t + 2 < n_tiles) rf_cp_async16(s + 32 * ((t + 2) % 3) + l, src + 32 * (t + 2) + l);
        __syncthreads();
        if (bug != 2 && t + 2 < n_tiles) rf_cp_async16(s + 32 * ((t + 2) % 3) + l, src + 32 * (t + 2) + l);
        rf_cp_async_commit();
        const uint4 v = rf_ld16(s + 32 * (t % 3) + ((l + 1) & 31));
        acc += v.x + v.y + v.z + v.w;
    }
    rf_cp_async_wait_all();
    out[l] = acc;
}

// The generic -> async proxy rule for wgmma operands (registered with RF_SIM_KERNEL_ASYNC_PROXY).
// One warpgroup computes D[64 × 128] = A[64 × 32] · B[128 × 32]ᵀ (s8, both K-major in global
// memory, 8 u32 a row) with one wgmma.m64n128k32 from the canonical no-swizzle layout: 16-byte
// chunk c of row r at (r % 8)·16 + (r / 8)·256 + c·128, A from byte 0, B from byte 2048 (6144
// bytes of dynamic smem). out [64 × 128] int32 row-major. mode 0: every thread stores its share of
// chunks, fences, barrier (correct); 1: as 0 but thread 77 skips its fence; 2: thread 0 stores
// every chunk and fences, nobody else does (correct: only writers need to fence); 3: cp.async,
// wait_all, fence (correct); 4: cp.async, wait_all, no fence; 5: the fence before the stores.
extern "C" __global__ void t_wgmma_proxy(int mode, const unsigned* a, const unsigned* b, int* out) {
    RF_DYNAMIC_SMEM(unsigned char, smem);
    const int tid = threadIdx.x;
    if (mode == 5) rf_fence_proxy_async();
    for (int i = mode == 2 ? (tid == 0 ? 0 : 384) : tid; i < 384; i += mode == 2 ? 1 : 128) {
        const bool is_a = i < 128;
        const int j = is_a ? i : i - 128, r = j >> 1, c = j & 1;
        const unsigned* src = (is_a ? a : b) + r * 8 + c * 4;
        rf_smem_t<unsigned char> dst = smem + (is_a ? 0 : 2048) + (r % 8) * 16 + (r / 8) * 256 + c * 128;
        if (mode == 3 || mode == 4) rf_cp_async16(dst, src);
        else rf_st16(dst, uint4{src[0], src[1], src[2], src[3]});
    }
    if (mode == 3 || mode == 4) rf_cp_async_wait_all();
    if (mode == 0 || mode == 3 || (mode == 1 && tid != 77) || (mode == 2 && tid == 0)) rf_fence_proxy_async();
    __syncthreads();
    int d[64];
#pragma unroll
    for (int i = 0; i < 64; i++) d[i] = 0;
    rf_wgmma_fence_operand(d);
    rf_wgmma_fence();
    rf_wgmma_s8<128>(d, rf_wgmma_desc(smem, 128, 256), rf_wgmma_desc(smem + 2048, 128, 256), 0);
    rf_wgmma_commit();
    rf_wgmma_wait<0>(d);
    for (int i = 0; i < 64; i++) out[rf_wgmma_acc_row(i) * 128 + rf_wgmma_acc_col(i)] = d[i];
}

// Misuse: mode 0 a misaligned ldmatrix row, 1 ldmatrix by half a warp, 2 misaligned cp.async.
extern "C" __global__ void t_ldm_bad(int mode, unsigned* out) {
    RF_DYNAMIC_SMEM(unsigned short, s);
    unsigned r = 0;
    if (mode == 0) rf_ldmatrix_x1(r, s + 8 * (threadIdx.x & 7) + 1);
    if (mode == 1) {
        if (threadIdx.x >= 16) return;
        rf_ldmatrix_x1(r, s + 8 * (threadIdx.x & 7));
    }
    if (mode == 2) rf_cp_async16(s + 8 * threadIdx.x + 4, out);
    out[threadIdx.x] = r;
}
