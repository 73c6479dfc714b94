// rf_wgmma.cuh — Hopper warpgroup MMA (wgmma, PTX ISA 9.7.15) for kernels built for sm_90a only:
// a kernel file that includes this header must start with the line `// recforge-arch: sm_90a`
// (build.rs compiles it to compute_90a PTX, which loads on Hopper only). Both paths: the real
// instructions under nvcc, the simulator's model under RF_SIM (kernels/sim/rf_sim.cpp, WGMMA).
//
// What is used here, and only that:
//   - shared-memory matrix descriptors (9.7.15.5.1.2.2) without swizzling: start address, leading
//     byte offset (LBO) and stride byte offset (SBO), each >> 4 in 14 bits; base offset 0; mode 0.
//     K-major, no swizzle (the canonical layout ((8,m),(T,2k)):((1T,SBO),(1,LBO)) in elements of
//     16 bytes): byte k of row r of the operand is at
//         start + (r % 8)·16 + (r / 8)·SBO + (k % 16) + (k / 16)·LBO,
//     i.e. "core matrices" of 8 rows × 16 bytes, 128 contiguous bytes each.
//   - wgmma.mma_async.sync.aligned.m64nNk32.s32.s8.s8 (N = 128, 256): D[64×N] (+)= A[64×32]·B[N×32]ᵀ,
//     both operands K-major from shared memory (8-bit types have no transpose), int32 accumulators.
//     Accumulator layout (9.7.15.5.1.1, the m64nNk32 D fragment): warp w = (thread % 128) / 32 of the
//     warpgroup holds rows 16w .. 16w+15; lane l (g = l/4, t = l%4) holds d[4j + v] =
//     D[16w + g + 8·(v/2)][8j + 2t + v%2] for j < N/8, v < 4 — the mma.m16n8 C layout, N/8 times.
//   - wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 with imm-trans-b = 1: A K-major as
//     above (byte 2k' of row r for element k'), B "MN-major" (9.7.15.5.1.2: the N dimension
//     contiguous), canonical ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)) with T = 8: element (n, k) of
//     B at start + 2·(n % 8) + (n / 8)·SBO + (k % 8)·16 + (k / 8)·LBO — core matrices of 8 k × 8 n
//     (16 bytes each), 128 contiguous bytes. f32 accumulators in the same fragment layout.
//   - fence.proxy.async.shared::cta in every thread that wrote an operand by ordinary stores or
//     cp.async (the generic proxy), after the data landed and before the barrier that precedes
//     the wgmma (which reads through the async proxy). The simulator checks it: a wgmma operand
//     byte whose last writer has not fenced since the write fails the launch (rf_sim.cpp,
//     proxy_note_writes; kernels registered with RF_SIM_KERNEL_ASYNC_PROXY, as build.rs does
//     for sm_90a files).
//   - wgmma.fence before the first wgmma of a batch (accumulators written by ordinary code before
//     it, pinned there with rf_wgmma_fence_operand), wgmma.commit_group, wgmma.wait_group N: the accumulators of a batch and the shared
//     memory it reads belong to the hardware from issue until a wait covers its group.
#pragma once
#include "common/rf_cuda.cuh"

// Row and column, within the warpgroup's 64 × N tile, of accumulator i of this thread (the
// fragment layout above; the thread's index within its warpgroup is threadIdx.x % 128).
__device__ __forceinline__ int rf_wgmma_acc_row(int i) {
    return ((threadIdx.x >> 5) & 3) * 16 + ((threadIdx.x & 31) >> 2) + 8 * ((i & 3) >> 1);
}
__device__ __forceinline__ int rf_wgmma_acc_col(int i) { return (i >> 2) * 8 + 2 * (threadIdx.x & 3) + (i & 1); }

// `rows` rows × 128 bytes from `src` (row stride `row_bytes`) at row r0, byte column c0, into the
// unswizzled K-major layout at `dst` (LBO 128, SBO 1024): 16-byte chunk c of row r is chunk
// i = 64·(r/8) + 8·c + r%8, at byte 16·i, so the 8 lanes that write one core matrix write 128
// contiguous bytes. cp.async for chunks inside `limit` rows and `row_bytes`; zeros for the rest
// (a chunk is all in or all out: `row_bytes` and c0 are multiples of 16).
template <int THREADS>
__device__ __forceinline__ void rf_wgmma_load_kmajor128(rf_smem_t<unsigned char> dst, const unsigned char* src, int rows,
                                                        int limit, size_t row_bytes, int r0, size_t c0) {
    const uint4 zero = {0u, 0u, 0u, 0u};
    for (int i = threadIdx.x; i < rows * 8; i += THREADS) {
        const int r = (i >> 6) * 8 + (i & 7);
        const size_t c = c0 + (size_t)((i >> 3) & 7) * 16;
        if (r0 + r < limit && c < row_bytes) rf_cp_async16(dst + 16 * i, src + (size_t)(r0 + r) * row_bytes + c);
        else rf_st16(dst + 16 * i, zero);
    }
}

#if defined(__CUDACC__)
#include <stdint.h>

// The 64-bit descriptor of an operand at `p` (16-byte aligned), no swizzle, K- or MN-major (the
// instruction's imm-trans says which; LBO and SBO are as the layouts above define them).
__device__ __forceinline__ uint64_t rf_wgmma_desc(const void* p, unsigned lbo, unsigned sbo) {
    unsigned addr = 0;
#if defined(__CUDA_ARCH__)
    addr = (unsigned)__cvta_generic_to_shared(p);
#endif
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32);
}
__device__ __forceinline__ void rf_fence_proxy_async() {
#if defined(__CUDA_ARCH__)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void rf_wgmma_fence() {
#if defined(__CUDA_ARCH__)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void rf_wgmma_commit() {
#if defined(__CUDA_ARCH__)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
// Pin the accumulators before wgmma.fence: ordinary code that writes them (the zero fill) must
// be ordered before the fence, or the behaviour is undefined (ptxas serializes the wgmmas).
__device__ __forceinline__ void rf_pin(int& x) { asm volatile("" : "+r"(x)::"memory"); }
__device__ __forceinline__ void rf_pin(float& x) { asm volatile("" : "+f"(x)::"memory"); }
template <class T, int R> __device__ __forceinline__ void rf_wgmma_fence_operand(T (&d)[R]) {
#if defined(__CUDA_ARCH__)
#pragma unroll
    for (int i = 0; i < R; i++) rf_pin(d[i]);
#endif
}
// Wait until at most N batches are pending, then pin the accumulators so the compiler cannot move
// their reads above the wait.
template <int N, class T, int R> __device__ __forceinline__ void rf_wgmma_wait(T (&d)[R]) {
#if defined(__CUDA_ARCH__)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#pragma unroll
    for (int i = 0; i < R; i++) rf_pin(d[i]);
#endif
}
template <int N> __device__ __forceinline__ void rf_wgmma_s8(int (&d)[N / 2], uint64_t da, uint64_t db, int accumulate);
template <> __device__ __forceinline__ void rf_wgmma_s8<128>(int (&d)[64], uint64_t da, uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH__)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
        : "l"(da), "l"(db), "r"(accumulate));
#endif
}
template <> __device__ __forceinline__ void rf_wgmma_s8<256>(int (&d)[128], uint64_t da, uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH__)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]), "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]), "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]), "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]), "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]), "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]), "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]), "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]), "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
        : "l"(da), "l"(db), "r"(accumulate));
#endif
}

// D[64×256] (+)= A[64×16]·B[16×256], bf16 operands, f32 accumulators: A K-major, B MN-major (the
// output dimension contiguous: imm-trans-b = 1), imm-scale-a = imm-scale-b = 1.
template <int N> __device__ __forceinline__ void rf_wgmma_bf16_tb(float (&d)[N / 2], uint64_t da, uint64_t db, int accumulate);
template <> __device__ __forceinline__ void rf_wgmma_bf16_tb<256>(float (&d)[128], uint64_t da, uint64_t db, int accumulate) {
#if defined(__CUDA_ARCH__)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db), "r"(accumulate));
#endif
}
#elif defined(RF_SIM)
// Simulator: each thread records its part of a wgmma at issue; a wgmma.wait_group that covers the
// batch computes it then, in issue order, from shared memory as it is AT THE WAIT (so a stage
// refilled before the wait gives wrong sums) into the accumulators (so reading them before the
// wait sees the old values). The descriptor's address is the byte offset in dynamic shared memory.
template <class T> inline uint64_t rf_wgmma_desc(::rf_sim::smem_ptr<T> p, unsigned lbo, unsigned sbo) {
    const long long off = (long long)(p.p - (uintptr_t)p.base);
    if (off < 0 || (size_t)off >= p.size) ::rf_sim::fail("wgmma descriptor: byte offset %lld is outside dynamic shared memory", off);
    const unsigned addr = (unsigned)off;
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)((lbo & 0x3FFFF) >> 4) << 16) |
           ((uint64_t)((sbo & 0x3FFFF) >> 4) << 32);
}
inline void rf_fence_proxy_async() { ::rf_sim::fence_proxy_async(); }
template <class T, int R> inline void rf_wgmma_fence_operand(T (&)[R]) {}
inline void rf_wgmma_fence() { ::rf_sim::wgmma_fence(); }
inline void rf_wgmma_commit() { ::rf_sim::wgmma_commit(); }
template <int N, class T, int R> inline void rf_wgmma_wait(T (&)[R]) {
    static_assert(N >= 0, "wgmma.wait_group takes a non-negative count");
    ::rf_sim::wgmma_wait(N);
}
template <int N> inline void rf_wgmma_s8(int (&d)[N / 2], uint64_t da, uint64_t db, int accumulate) {
    static_assert(N == 128 || N == 256, "m64nNk32: N = 128 or 256 here");
    ::rf_sim::wgmma_s8(d, N, da, db, accumulate);
}
template <int N> inline void rf_wgmma_bf16_tb(float (&d)[N / 2], uint64_t da, uint64_t db, int accumulate) {
    static_assert(N == 256, "m64nNk16 bf16: N = 256 here");
    ::rf_sim::wgmma_bf16_tb(d, N, da, db, accumulate);
}
#else
#error "rf_wgmma.cuh: compile with nvcc or with -DRF_SIM"
#endif
