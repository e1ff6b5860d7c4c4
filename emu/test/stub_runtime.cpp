// stub_runtime.cpp: a TEST STUB for the kernel emulator (emu/emu_api.h), used only to
// test emu/driver.cpp on its own (emu/test/driver_check.rs). The real emulator is
// emu/runtime.cpp. Kernels known here:
//   update_expert_bias(float* bias, const long long* counts, int n, float rate)
//       the real kernel's semantics (the CPU reference's exact integer sign rule);
//       insists on grid (1,1,1), block (256,1,1), no dynamic shared memory.
//   emu_test_fill(float* p, int n, float v)      p[i] = v for i < n
//   emu_test_poke(unsigned char* p, long long off) p[off] = 0x42 (any offset: for
//                                                 out-of-bounds detection tests)
//   emu_test_fail()                              always fails with a message
#include "../emu_api.h"

#include <cstdio>
#include <cstring>

namespace {
const char* const kKernels[] = {"update_expert_bias", "emu_test_fill", "emu_test_poke",
                                "emu_test_fail"};
}

extern "C" int moe_emu_has_kernel(const char* name) {
    for (const char* k : kKernels)
        if (strcmp(k, name) == 0) return 1;
    return 0;
}

extern "C" int moe_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,
                              unsigned bx, unsigned by, unsigned bz, unsigned dyn_smem,
                              void** params, char* err, size_t errlen) {
    if (strcmp(name, "update_expert_bias") == 0) {
        if (gx != 1 || gy != 1 || gz != 1 || bx != 256 || by != 1 || bz != 1 || dyn_smem != 0) {
            snprintf(err, errlen,
                     "stub: update_expert_bias launched with grid (%u,%u,%u) block (%u,%u,%u) "
                     "smem %u",
                     gx, gy, gz, bx, by, bz, dyn_smem);
            return 1;
        }
        float* bias = *static_cast<float**>(params[0]);
        const long long* counts = *static_cast<const long long**>(params[1]);
        int n = *static_cast<int*>(params[2]);
        float rate = *static_cast<float*>(params[3]);
        __int128 total = 0;
        for (int e = 0; e < n; ++e) total += counts[e];
        for (int e = 0; e < n; ++e) {
            __int128 d = total - static_cast<__int128>(n) * counts[e];
            if (d > 0) bias[e] += rate;
            if (d < 0) bias[e] -= rate;
        }
        return 0;
    }
    if (strcmp(name, "emu_test_fill") == 0) {
        float* p = *static_cast<float**>(params[0]);
        int n = *static_cast<int*>(params[1]);
        float v = *static_cast<float*>(params[2]);
        for (int i = 0; i < n; ++i) p[i] = v;
        return 0;
    }
    if (strcmp(name, "emu_test_poke") == 0) {
        unsigned char* p = *static_cast<unsigned char**>(params[0]);
        long long off = *static_cast<long long*>(params[1]);
        p[off] = 0x42;
        return 0;
    }
    if (strcmp(name, "emu_test_fail") == 0) {
        snprintf(err, errlen, "stub: emu_test_fail always fails");
        return 1;
    }
    snprintf(err, errlen, "stub: unknown kernel %s", name);
    return 1;
}
