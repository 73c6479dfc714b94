/* recforge SIMT simulator: C ABI used by the Rust `Sim` device.
 *
 * Every kernels/<stem>.cu is compiled as host C++17 with -DRF_SIM (see sim_<stem>.cpp, generated
 * by build.rs) and exports a table of rf_sim_kernel entries; rf_sim_launch runs one kernel over a
 * grid, every CUDA thread as a fiber. Thread-safe: several launches may run at the same time from
 * different OS threads. */
#ifndef RF_SIM_H
#define RF_SIM_H
#include <stddef.h>
#ifdef __cplusplus
extern "C" {
#endif

typedef struct { unsigned x, y, z; } rf_sim_dim3;
/* Unpacks args (CUDA kernelParams convention) and calls the kernel for the CURRENT fiber. */
typedef void (*rf_sim_invoke_fn)(void** args);
typedef struct { const char* name; rf_sim_invoke_fn invoke; } rf_sim_kernel;

/* Launch: args[i] points at the i-th argument's value; pointer arguments are host pointers.
 * Returns 0 on success; otherwise non-zero and writes a NUL-terminated message (kernel name
 * included) into err (capacity err_cap; err may be NULL when err_cap is 0). */
int rf_sim_launch(const rf_sim_kernel* k, rf_sim_dim3 grid, rf_sim_dim3 block, size_t dyn_smem_bytes,
                  void** args, char* err, size_t err_cap);

/* Number of OS threads that run blocks in parallel (default: env RF_SIM_THREADS, else 2).
 * n <= 0 restores the default. Returns the previous value. */
int rf_sim_set_threads(int n);

/* The order runnable threads are queued in (see rf_sim.cpp): 0 forward, 1 reverse, 2 shuffle
 * (default: env RF_SIM_SCHEDULE = forward | reverse | shuffle, else shuffle). A value outside
 * 0..2 restores the default. Applies to launches that start after the call. Returns the
 * previous value. */
int rf_sim_set_schedule(int mode);

/* When cp.async copies land (see rf_sim.cpp): 0 wait (default: the destination reads 0xFF from
 * issue until the issuing thread's cp.async.wait_group / wait_all covers the copy), 1 issue
 * (complete at issue). Default: env RF_SIM_CP_ASYNC = wait | issue, else wait. A value outside
 * 0..1 restores the default. Applies to launches that start after the call. Returns the
 * previous value. */
int rf_sim_set_cp_async(int mode);

/* Largest dynamic shared memory a launch may request: 227 KiB, the H100 (sm_90) opt-in limit. */
#define RF_SIM_MAX_DYN_SMEM (227u * 1024u)

#ifdef __cplusplus
}
#endif
#endif
