// Same generated pattern, for the simulator's own test kernels (kernels/sim/tests/test_kernels.cu).
#include "common/recforge.cuh"
#include "sim/rf_sim.h"
namespace {
#include "sim/tests/test_kernels.cu"
}  // namespace
extern "C" const rf_sim_kernel rf_sim_kernels_test_kernels[] = {
    RF_SIM_KERNEL(t_shfl_i), RF_SIM_KERNEL(t_shfl_f), RF_SIM_KERNEL(t_shfl_d), RF_SIM_KERNEL(t_shfl_partial),
    RF_SIM_KERNEL(t_vote), RF_SIM_KERNEL(t_atomics), RF_SIM_KERNEL(t_block_reduce), RF_SIM_KERNEL(t_dyn_smem),
    RF_SIM_KERNEL(t_race_static), RF_SIM_KERNEL(t_race_dyn), RF_SIM_KERNEL(t_race_prev), RF_SIM_KERNEL(t_race_war), RF_SIM_KERNEL(t_shared_unwritten), RF_SIM_KERNEL(t_oob), RF_SIM_KERNEL(t_div_barrier),
    RF_SIM_KERNEL(t_div_barrier_rev), RF_SIM_KERNEL(t_misaligned), RF_SIM_KERNEL(t_misaligned_smem),
    RF_SIM_KERNEL(t_lane_exit), RF_SIM_KERNEL(t_mask_mismatch), RF_SIM_KERNEL(t_deadlock), RF_SIM_KERNEL(t_syncwarp_loop),
    RF_SIM_KERNEL(t_helper_clash), RF_SIM_KERNEL(t_ldm), RF_SIM_KERNEL(t_mma), RF_SIM_KERNEL(t_ldm_bad),
    RF_SIM_KERNEL(t_cp_groups), RF_SIM_KERNEL(t_cp_ring),
    RF_SIM_KERNEL_ASYNC_PROXY(t_wgmma_proxy),
};
extern "C" const int rf_sim_kernels_test_kernels_len = sizeof(rf_sim_kernels_test_kernels) / sizeof(rf_sim_kernel);
