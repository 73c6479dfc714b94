// recforge SIMT simulator: the interface between kernel code compiled with -DRF_SIM (through
// kernels/common/rf_cuda.cuh) and the runtime (rf_sim.cpp). Not for kernels to include directly.
//
// Everything here is inline / templates / declarations only, so any number of sim_<stem>.cpp
// translation units can include it and be linked together.
#pragma once
#include "rf_sim.h"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// CUDA's index types (global namespace, as in CUDA).
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace rf_sim {

// What kernel code sees of the current fiber / block. The runtime's Fiber and Block derive
// from these. Fibers of one block always run on the OS thread that runs the block, so these
// thread_local pointers always name the running fiber and its block.
struct FiberPub {
    uint3 tid;        // threadIdx
    unsigned linear;  // x + y*bx + z*bx*by
    unsigned warp, lane;
};
struct BlockPub {
    uint3 bid;  // blockIdx
    dim3 bdim, gdim;
    unsigned char* smem;  // dynamic shared memory of this block (poisoned with 0xFF at block start)
    size_t smem_size;     // bytes requested by the launch
    const char* kname;
};
inline thread_local FiberPub* tls_fiber = nullptr;
inline thread_local BlockPub* tls_block = nullptr;

// Records the first error of the launch (prefixed with the kernel name, block and thread),
// abandons the block and switches back to the scheduler. Never returns.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// RF_SHARED: fill a static shared variable with 0xFF bytes the first time the current block
// reaches its declaration.
void shared_poison_once(void* p, size_t bytes);

// __syncthreads family. op: 0 plain, 1 count, 2 and, 3 or.
int syncthreads_op(int op, int pred);

// Warp collectives. The value travels as 64 raw bits.
enum WarpOp : int {
    W_SYNC = 0, W_SHFL_IDX, W_SHFL_UP, W_SHFL_DOWN, W_SHFL_XOR, W_BALLOT, W_ANY, W_ALL,
};
uint64_t warp_op(int op, unsigned mask, uint64_t value, int b, int width);
// A warp-wide operation computed in one step (ldmatrix, mma): every lane of `mask` arrives with
// its own `io` block; when the last one arrives, fn(io, mask) runs once (io[lane] is that lane's
// block, nullptr outside the mask) and reads inputs from / writes results into every block.
// All lanes must pass the same fn. `name` is used in error messages.
typedef void (*warp_fn)(void* const* io, unsigned mask);
void warp_call(unsigned mask, void* io, warp_fn fn, const char* name);

// cp.async (see CpAsync in rf_sim.cpp): issue 16 bytes from src (read now) to dst; close the
// thread's open group; wait until at most n of its newest committed groups are pending (n < 0:
// wait_all, which also covers uncommitted copies).
void cp_async16(unsigned char* dst, const unsigned char* src);
void cp_async_commit();
void cp_async_wait(int n);

// wgmma (kernels/common/rf_wgmma.cuh): record this thread's part of an m64nNk32 s8 MMA (d: its
// n/2 accumulators) at issue; compute it when wgmma_wait(k) leaves its commit group outside the k
// newest. A thread that exits with one pending fails the launch.
void wgmma_fence();
void wgmma_s8(int* d, int n, uint64_t da, uint64_t db, int accumulate);
// m64nNk16 f32.bf16.bf16, A K-major, B MN-major (imm-trans-b = 1).
void wgmma_bf16_tb(float* d, int n, uint64_t da, uint64_t db, int accumulate);
void wgmma_commit();
void wgmma_wait(int n);
// Generic -> async proxy ordering (see proxy_note_writes in rf_sim.cpp): a kernel registered with
// RF_SIM_KERNEL_ASYNC_PROXY turns tracking on for its block before any of its code runs; then a
// wgmma operand byte that a thread wrote (ordinary store or cp.async) and did not follow with
// fence_proxy_async() (fence.proxy.async) fails the launch. A wgmma in an untracked kernel fails.
void track_async_proxy();
void fence_proxy_async();

// --- kernel registration --------------------------------------------------------------------
// invoker<&kernel>::invoke(args) unpacks CUDA kernelParams into the kernel's own parameter types.
template <auto F> struct invoker;
template <typename... A, void (*F)(A...)> struct invoker<F> {
    template <size_t... I> static void call(void** args, std::index_sequence<I...>) {
        (void)args;
        F(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
    }
    static void invoke(void** args) { call(args, std::index_sequence_for<A...>{}); }
};

template <auto F> struct invoker_async_proxy {
    static void invoke(void** args) {
        track_async_proxy();
        invoker<F>::invoke(args);
    }
};

}  // namespace rf_sim

// Entry of a kernel table: `{ "name", invoke }`.
#define RF_SIM_KERNEL(name) ::rf_sim_kernel{#name, &::rf_sim::invoker<&name>::invoke}
// The same for a kernel whose wgmma operands the simulator checks for proxy fences (Hopper files).
#define RF_SIM_KERNEL_ASYNC_PROXY(name) ::rf_sim_kernel{#name, &::rf_sim::invoker_async_proxy<&name>::invoke}
