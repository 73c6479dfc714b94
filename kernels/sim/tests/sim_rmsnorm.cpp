// Example of the file build.rs generates for every kernels/<stem>.cu (here: rmsnorm.cu), compiled
// with: g++ -std=c++17 -O2 -DRF_SIM -I kernels -Wno-unknown-pragmas
// The kernel source is wrapped in an anonymous namespace so that non-inline helpers of different
// .cu files cannot clash at link time (the extern "C" kernels keep their C names). The primitives
// header is included first, outside the namespace (it includes the standard headers).
#include "common/recforge.cuh"
#include "sim/rf_sim.h"
namespace {
#include "rmsnorm.cu"
}  // namespace
extern "C" const rf_sim_kernel rf_sim_kernels_rmsnorm[] = {
    RF_SIM_KERNEL(rmsnorm_f32),
    RF_SIM_KERNEL(rmsnorm_bf16),
};
extern "C" const int rf_sim_kernels_rmsnorm_len = 2;
