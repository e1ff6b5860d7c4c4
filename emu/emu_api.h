// emu_api.h: the interface between the CPU CUDA-driver stand-in (driver.cpp, which
// cudarc loads as `libcuda.so`) and the kernel emulator (runtime.cpp, which runs the
// kernels of cuda/*.cu compiled as C++ by g++).
//
// Device memory is host memory: a CUdeviceptr is the host address. All launches are
// synchronous (the kernel has finished when moe_emu_launch returns), so streams and
// events are bookkeeping only.
#pragma once
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// 1 when an emulated kernel with this entry-point name exists (for example
// "topk_gating_fwd_warp_f32"), else 0.
int moe_emu_has_kernel(const char* name);

// Run kernel `name` over grid (gx, gy, gz) of blocks (bx, by, bz) with `dyn_smem`
// bytes of dynamic shared memory; `params` as cuLaunchKernel's kernelParams (one
// pointer per kernel parameter, pointing at its value). Returns 0 on success; on
// failure (unknown kernel, bad launch shape, deadlock at a barrier, a warp collective
// whose mask names a lane that is not there, ...) returns non-zero and writes a
// NUL-terminated message of at most errlen bytes to err.
int moe_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                   unsigned by, unsigned bz, unsigned dyn_smem, void** params, char* err,
                   size_t errlen);

#ifdef __cplusplus
}
#endif
