// driver.cpp: a CPU stand-in for the CUDA driver library (libcuda.so), so that the
// real host code (cudarc 0.19 with dynamic loading) and the real kernels of cuda/*.cu
// (run by the kernel emulator behind emu/emu_api.h) work on a machine without a GPU.
//
// Build (together with the kernel emulator):
//   g++ -std=c++17 -O1 -fPIC -shared -o libcuda.so emu/driver.cpp emu/runtime.cpp
//   ln -sf libcuda.so libcuda.so.1
// and put that directory first on LD_LIBRARY_PATH.
//
// The emulated device: one device (ordinal 0), "moe-router CPU emulator", compute
// capability 9.0, 16 GiB, memory pools supported (so cudarc takes the same
// cuMemAllocAsync / cuMemFreeAsync path as on an H100).
//
// Device memory is host memory: a CUdeviceptr is the host address. Every allocation
// has a 4 KiB canary guard before and after it and starts out filled with 0xCD
// ("poison", never zero, so a kernel that forgets to write shows up). The guards of
// every live allocation are checked after every kernel launch and on free; a damaged
// guard is reported on stderr, repaired, and turned into CUDA_ERROR_ILLEGAL_ADDRESS.
// Copies and memsets must lie inside one live allocation; ranges the driver never
// allocated (borrowed pointers: upgrade_device_ptr) are allowed with a one-time
// warning unless they touch a live allocation's guard or a freed allocation.
//
// Sanitizer build (MOE_EMU_SANITIZE=1 bash scripts/build_emu.sh, under
// AddressSanitizer): an allocation is exactly the requested size (256-byte aligned)
// with no canary guards, so ASan's own redzones catch every out-of-bounds read or
// write as it happens; freed allocations are still poisoned (0xCD) and quarantined,
// and are also marked poisoned for ASan, so a kernel touching one is reported.
//
// Everything runs synchronously on the calling thread: streams and events are
// bookkeeping, and a global mutex serialises kernel launches.
//
// Every driver entry point that cudarc's safe layer can reach exists (cudarc panics
// on a missing symbol); the ones this emulator does not model (graphs, external
// memory, memory-pool objects, managed memory, cooperative launches, module globals,
// clusters) print their name and return CUDA_ERROR_NOT_SUPPORTED.

#include "emu_api.h"

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <string>

#if defined(__SANITIZE_ADDRESS__)
#define MOE_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#else
#define MOE_EMU_ASAN 0
#endif

// Only the driver API (EMU_API) is exported; everything below is hidden, including
// the template instantiations over this file's types.
#pragma GCC visibility push(hidden)

// ---------------------------------------------------------------------------------
// CUDA driver types (layouts and values as in cuda.h / cudarc's driver::sys).

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct EmuCtx* CUcontext;
typedef struct EmuStream* CUstream;
typedef struct EmuEvent* CUevent;
typedef struct EmuModule* CUmodule;
typedef struct EmuFunction* CUfunction;
typedef struct EmuOpaque* CUmemoryPool;
typedef struct EmuOpaque* CUgraph;
typedef struct EmuOpaque* CUgraphExec;
typedef struct EmuOpaque* CUexternalMemory;
typedef void (*CUhostFn)(void* userData);
typedef size_t (*CUoccupancyB2DSize)(int blockSize);

struct CUuuid {
    char bytes[16];
};
struct CUexecAffinityParam;
struct CUctxCigParam;
struct CUctxCreateParams {
    CUexecAffinityParam* execAffinityParams;
    int numExecAffinityParams;
    CUctxCigParam* cigParams;
};
struct CUmemLocation {
    int type;
    int id;
};
struct CUlaunchConfig;
struct CUmemPoolProps;
struct CUDA_EXTERNAL_MEMORY_HANDLE_DESC;
struct CUDA_EXTERNAL_MEMORY_BUFFER_DESC;

#define EMU_API extern "C" __attribute__((visibility("default")))

namespace {

// CUresult values used here.
enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_UNSUPPORTED_LIMIT = 215,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_FILE_NOT_FOUND = 301,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

// CUfunction_attribute values.
enum : int {
    CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK = 0,
    CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1,
    CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES = 2,
    CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES = 3,
    CU_FUNC_ATTRIBUTE_NUM_REGS = 4,
    CU_FUNC_ATTRIBUTE_PTX_VERSION = 5,
    CU_FUNC_ATTRIBUTE_BINARY_VERSION = 6,
    CU_FUNC_ATTRIBUTE_CACHE_MODE_CA = 7,
    CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
    CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9,
    CU_FUNC_ATTRIBUTE_MAX = 18,
};

// The emulated device.
constexpr int kCcMajor = 9;
constexpr int kCcMinor = 0;
constexpr const char* kDeviceName = "moe-router CPU emulator";
constexpr size_t kTotalMem = size_t(16) << 30;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kSharedPerBlock = 49152;
constexpr int kSharedPerBlockOptin = 232448;
constexpr int kSharedPerSm = 233472;
constexpr int kMaxThreadsPerSm = 2048;
constexpr int kMaxBlocksPerSm = 32;
constexpr int kSmCount = 132;

// Memory checking. Under ASan there are no guards: its redzones replace them.
constexpr size_t kGuard = MOE_EMU_ASAN ? 0 : 4096;
constexpr size_t kAlign = 256;
constexpr unsigned char kCanary = 0xFD;
constexpr unsigned char kPoison = 0xCD;
// Freed allocations stay in quarantine (not returned to the host allocator) until
// either bound is passed, so that an access to one is a certain use after free rather
// than host memory the allocator has handed out again (a borrowed buffer).
constexpr size_t kQuarantineMaxCount = 4096;
constexpr size_t kQuarantineMaxBytes = size_t(256) << 20;

constexpr uint32_t kCtxMagic = 0x43545831u;
constexpr uint32_t kStreamMagic = 0x53545231u;
constexpr uint32_t kEventMagic = 0x45564e31u;
constexpr uint32_t kModuleMagic = 0x4d4f4431u;
constexpr uint32_t kFuncMagic = 0x46554e31u;

}  // namespace

struct EmuCtx {
    uint32_t magic = kCtxMagic;
    bool primary = false;
    unsigned flags = 0;
};
struct EmuStream {
    uint32_t magic = kStreamMagic;
    unsigned flags = 0;
    int priority = 0;
};
struct EmuEvent {
    uint32_t magic = kEventMagic;
    unsigned flags = 0;
    bool recorded = false;
    std::chrono::steady_clock::time_point when{};
};
struct EmuFunction;
struct EmuModule {
    uint32_t magic = kModuleMagic;
    std::string ptx;
    std::set<std::string> entries;
    int ptx_version = 0;  // e.g. 90 for ".version 9.0"
    std::map<std::string, EmuFunction*> functions;
};
struct EmuFunction {
    uint32_t magic = kFuncMagic;
    EmuModule* module = nullptr;
    std::string name;
    int max_dynamic_smem = kSharedPerBlock;
    // Threads per block the kernel may be launched with: its `.maxntid` (from
    // __launch_bounds__) when the PTX has one, else the device limit. A GPU refuses a
    // launch above it, so the emulator does too.
    int max_threads = kMaxThreadsPerBlock;
    int carveout = -1;
    int cache_config = 0;
};

namespace {

struct Alloc {
    size_t size;
    void* raw;
};

struct State {
    std::mutex mu;
    bool initialized = false;
    EmuCtx* primary = nullptr;
    int primary_refs = 0;
    unsigned primary_flags = 0;
    std::set<EmuCtx*> contexts;
    std::set<EmuStream*> streams;
    std::set<const void*> dead_streams;
    std::set<EmuEvent*> events;
    std::set<EmuModule*> modules;
    std::set<EmuFunction*> functions;
    // Live device allocations by user address.
    std::map<uintptr_t, Alloc> allocs;
    size_t bytes_in_use = 0;
    // Freed device allocations (user address -> size), to refuse use after free.
    std::map<uintptr_t, size_t> graveyard;
    size_t grave_max_span = 0;
    std::deque<std::pair<uintptr_t, void*>> quarantine;  // oldest first
    size_t quarantine_bytes = 0;
    std::set<void*> host_allocs;
    // Per-context settings (shared: one device).
    size_t limits[7] = {1024, 1 << 20, 8 << 20, 2, 2048, 64, 0};
    int cache_config = 0;
    bool warned_unknown_device_range = false;
    bool warned_unknown_stream = false;
};

State& st() {
    static State* s = new State;  // never destroyed: drivers outlive static destructors
    return *s;
}

std::mutex& launch_mutex() {
    static std::mutex* m = new std::mutex;
    return *m;
}

thread_local EmuCtx* t_current = nullptr;

void emu_msg(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void emu_msg(const char* fmt, ...) {
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "moe-router emu: %s\n", buf);
    fflush(stderr);
}

CUresult unsupported(const char* fn) {
    emu_msg("%s is not supported by the emulated CUDA driver", fn);
    return CUDA_ERROR_NOT_SUPPORTED;
}

const unsigned char* canary_block() {
    static unsigned char* b = [] {
        auto* p = new unsigned char[kGuard];
        memset(p, kCanary, kGuard);
        return p;
    }();
    return b;
}

// ---- memory registry (callers hold st().mu) --------------------------------------

// The live allocation that contains [p, p+n) (n may be 0), or allocs.end().
std::map<uintptr_t, Alloc>::iterator find_containing(State& s, uintptr_t p, size_t n) {
    auto it = s.allocs.upper_bound(p);
    if (it == s.allocs.begin()) return s.allocs.end();
    --it;
    if (p - it->first <= it->second.size && n <= it->second.size - (p - it->first)) return it;
    return s.allocs.end();
}

// A live allocation whose region including its guards intersects [p, p+n), or end().
std::map<uintptr_t, Alloc>::iterator find_overlapping(State& s, uintptr_t p, size_t n) {
    uintptr_t hi = p + n;
    auto it = s.allocs.lower_bound(hi + kGuard);
    while (it != s.allocs.begin()) {
        --it;
        uintptr_t lo_a = it->first - kGuard;
        uintptr_t hi_a = it->first + it->second.size + kGuard;
        if (hi_a <= p) break;  // regions are disjoint and sorted
        if (lo_a < hi) return it;
    }
    return s.allocs.end();
}

// Quarantined allocations are disjoint (none has gone back to the host allocator), but
// a search still walks every one that starts within the largest freed span.
template <class F>
void for_each_freed_overlapping(State& s, uintptr_t p, size_t n, F&& f) {
    uintptr_t lo = p > s.grave_max_span + 2 * kGuard ? p - s.grave_max_span - 2 * kGuard : 0;
    auto it = s.graveyard.lower_bound(lo);
    while (it != s.graveyard.end() && it->first < p + n + kGuard) {
        uintptr_t lo_a = it->first - kGuard, hi_a = it->first + it->second + kGuard;
        auto cur = it++;
        if (lo_a < p + n && p < hi_a && f(cur)) return;
    }
}

// A freed allocation (with guards) intersecting [p, p+n): its user address, or 0.
uintptr_t find_freed(State& s, uintptr_t p, size_t n, size_t* size_out) {
    uintptr_t found = 0;
    for_each_freed_overlapping(s, p, n, [&](std::map<uintptr_t, size_t>::iterator it) {
        found = it->first;
        *size_out = it->second;
        return true;
    });
    return found;
}

// Offset (relative to the allocation start) of the first damaged guard byte; returns
// false when both guards are intact. Repairs the guards.
bool check_and_repair_guards(uintptr_t user, const Alloc& a, long long* first_bad) {
    const unsigned char* want = canary_block();
    auto* front = reinterpret_cast<unsigned char*>(user - kGuard);
    auto* back = reinterpret_cast<unsigned char*>(user + a.size);
    bool bad = false;
    if (memcmp(front, want, kGuard) != 0) {
        for (size_t i = 0; i < kGuard; ++i)
            if (front[i] != kCanary) {
                *first_bad = static_cast<long long>(i) - static_cast<long long>(kGuard);
                break;
            }
        memset(front, kCanary, kGuard);
        bad = true;
    }
    if (memcmp(back, want, kGuard) != 0) {
        if (!bad)
            for (size_t i = 0; i < kGuard; ++i)
                if (back[i] != kCanary) {
                    *first_bad = static_cast<long long>(a.size + i);
                    break;
                }
        memset(back, kCanary, kGuard);
        bad = true;
    }
    return bad;
}

CUresult require_init() {
    return st().initialized ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}

bool ctx_live(State& s, EmuCtx* c) { return c != nullptr && s.contexts.count(c) != 0; }

CUresult require_ctx(State& s, const char* fn) {
    if (!ctx_live(s, t_current)) {
        emu_msg("%s: no current context on this thread", fn);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    return CUDA_SUCCESS;
}

CUresult check_stream(State& s, const char* fn, CUstream h) {
    uintptr_t v = reinterpret_cast<uintptr_t>(h);
    if (v == 0 || v == 1 || v == 2) return CUDA_SUCCESS;  // null, legacy, per-thread
    if (s.streams.count(h)) return CUDA_SUCCESS;
    if (s.dead_streams.count(h)) {
        emu_msg("%s: stream %p was already destroyed", fn, static_cast<void*>(h));
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (!s.warned_unknown_stream) {
        s.warned_unknown_stream = true;
        emu_msg("warning: %s: stream %p was not created by this driver (borrowed?); "
                "treating it as a valid stream (shown once)",
                fn, static_cast<void*>(h));
    }
    return CUDA_SUCCESS;
}

CUresult check_event(State& s, const char* fn, CUevent e) {
    if (e == nullptr || !s.events.count(e)) {
        emu_msg("%s: invalid event handle %p", fn, static_cast<void*>(e));
        return CUDA_ERROR_INVALID_HANDLE;
    }
    return CUDA_SUCCESS;
}

// [p, p+n) on the device side of a copy or memset.
CUresult check_device_range(State& s, const char* fn, const char* what, CUdeviceptr p,
                            size_t n) {
    if (n == 0) return CUDA_SUCCESS;
    uintptr_t a = static_cast<uintptr_t>(p);
    if (a == 0) {
        emu_msg("%s: %s is a null device pointer (%zu bytes)", fn, what, n);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (a + n < a) {
        emu_msg("%s: %s range 0x%llx + %zu bytes wraps around", fn, what, p, n);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (find_containing(s, a, n) != s.allocs.end()) return CUDA_SUCCESS;
    auto ov = find_overlapping(s, a, n);
    if (ov != s.allocs.end()) {
        long long off = static_cast<long long>(a) - static_cast<long long>(ov->first);
        emu_msg("%s: %s range [0x%llx, +%zu bytes) is not inside one allocation: it "
                "starts at offset %lld of the %zu-byte allocation at 0x%llx",
                fn, what, p, n, off, ov->second.size,
                static_cast<unsigned long long>(ov->first));
        return CUDA_ERROR_INVALID_VALUE;
    }
    size_t fsize = 0;
    uintptr_t freed = find_freed(s, a, n, &fsize);
    if (freed != 0) {
        emu_msg("%s: %s range [0x%llx, +%zu bytes) touches the %zu-byte allocation at "
                "0x%llx, which was freed (use after free)",
                fn, what, p, n, fsize, static_cast<unsigned long long>(freed));
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (!s.warned_unknown_device_range) {
        s.warned_unknown_device_range = true;
        emu_msg("warning: %s: %s range [0x%llx, +%zu bytes) was not allocated by this "
                "driver (a borrowed pointer?); accessing it unchecked (shown once)",
                fn, what, p, n);
    }
    return CUDA_SUCCESS;
}

// [p, p+n) on the host side of a copy: must not be (inside) device memory.
CUresult check_host_range(State& s, const char* fn, const char* what, const void* p,
                          size_t n) {
    if (n == 0) return CUDA_SUCCESS;
    uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a == 0) {
        emu_msg("%s: %s is a null host pointer (%zu bytes)", fn, what, n);
        return CUDA_ERROR_INVALID_VALUE;
    }
    auto ov = find_overlapping(s, a, n);
    if (ov != s.allocs.end()) {
        emu_msg("%s: %s [%p, +%zu bytes) lies in the %zu-byte device allocation at "
                "0x%llx, not in host memory",
                fn, what, p, n, ov->second.size,
                static_cast<unsigned long long>(ov->first));
        return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

CUresult do_alloc(State& s, const char* fn, CUdeviceptr* dptr, size_t size, bool allow_zero) {
    if (dptr == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (size == 0 && !allow_zero) {
        emu_msg("%s: bytesize is 0", fn);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (size > kTotalMem - s.bytes_in_use) {
        emu_msg("%s: out of memory: %zu bytes requested, %zu of %zu in use", fn, size,
                s.bytes_in_use, kTotalMem);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    void* raw = nullptr;
    if (posix_memalign(&raw, kAlign, kGuard + size + kGuard) != 0 || raw == nullptr) {
        emu_msg("%s: host allocation of %zu bytes failed", fn, size);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    auto* base = static_cast<unsigned char*>(raw);
    memset(base, kCanary, kGuard);
    memset(base + kGuard, kPoison, size);
    memset(base + kGuard + size, kCanary, kGuard);
    uintptr_t user = reinterpret_cast<uintptr_t>(base + kGuard);
    s.allocs[user] = Alloc{size, raw};
    s.bytes_in_use += size;
    *dptr = static_cast<CUdeviceptr>(user);
    return CUDA_SUCCESS;
}

CUresult do_free(State& s, const char* fn, CUdeviceptr p) {
    if (p == 0) return CUDA_SUCCESS;
    uintptr_t a = static_cast<uintptr_t>(p);
    auto it = s.allocs.find(a);
    if (it == s.allocs.end()) {
        auto in = find_containing(s, a, 0);
        size_t fsize = 0;
        if (in != s.allocs.end())
            emu_msg("%s: 0x%llx is offset %llu inside the %zu-byte allocation at 0x%llx, "
                    "not its start",
                    fn, p, static_cast<unsigned long long>(a - in->first), in->second.size,
                    static_cast<unsigned long long>(in->first));
        else if (s.graveyard.count(a))
            emu_msg("%s: 0x%llx was already freed (double free)", fn, p);
        else if (find_freed(s, a, 1, &fsize) != 0)
            emu_msg("%s: 0x%llx points into a freed allocation", fn, p);
        else
            emu_msg("%s: 0x%llx was not allocated by this driver", fn, p);
        return CUDA_ERROR_INVALID_VALUE;
    }
    Alloc al = it->second;
    long long bad = 0;
    bool damaged = check_and_repair_guards(a, al, &bad);
    if (damaged)
        emu_msg("%s: out-of-bounds write found when freeing the %zu-byte allocation at "
                "0x%llx: first damaged byte at offset %lld",
                fn, al.size, p, bad);
    s.allocs.erase(it);
    s.bytes_in_use -= al.size;
    // Poison the freed memory (catches stale views) and quarantine it.
    memset(al.raw, kPoison, kGuard + al.size + kGuard);
#if MOE_EMU_ASAN
    ASAN_POISON_MEMORY_REGION(al.raw, kGuard + al.size + kGuard);
#endif
    s.graveyard[a] = al.size;
    s.grave_max_span = std::max(s.grave_max_span, al.size);
    s.quarantine.emplace_back(a, al.raw);
    s.quarantine_bytes += al.size;
    while (!s.quarantine.empty() && (s.quarantine.size() > kQuarantineMaxCount ||
                                     s.quarantine_bytes > kQuarantineMaxBytes)) {
        auto [user, raw] = s.quarantine.front();
        s.quarantine.pop_front();
        auto g = s.graveyard.find(user);
        s.quarantine_bytes -= g->second;
#if MOE_EMU_ASAN
        ASAN_UNPOISON_MEMORY_REGION(raw, kGuard + g->second + kGuard);
#endif
        s.graveyard.erase(g);
        free(raw);
    }
    if (s.graveyard.empty()) s.grave_max_span = 0;
    return damaged ? CUDA_ERROR_ILLEGAL_ADDRESS : CUDA_SUCCESS;
}

// ---- PTX scanning -----------------------------------------------------------------

bool is_ident_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '$' || c == '.';
}

// Entry names: ".entry <name>(" (optionally after ".visible"/".weak").
// The product of the `.maxntid x, y, z` directive between `.entry name(` and the body's
// `{`, or the device limit when the entry has none.
int ptx_max_threads(const std::string& ptx, const std::string& name) {
    const std::string head = ".entry " + name + "(";
    const size_t at = ptx.find(head);
    if (at == std::string::npos) return kMaxThreadsPerBlock;
    const size_t body = ptx.find('{', at);
    const size_t m = ptx.find(".maxntid", at);
    if (m == std::string::npos || (body != std::string::npos && m > body)) return kMaxThreadsPerBlock;
    long long prod = 1;
    const char* p = ptx.c_str() + m + 8;
    for (int i = 0; i < 3; ++i) {
        char* end = nullptr;
        const long v = std::strtol(p, &end, 10);
        if (end == p) break;
        prod *= v > 0 ? v : 1;
        p = end;
        while (*p == ' ' || *p == ',') ++p;
    }
    return prod > 0 && prod < kMaxThreadsPerBlock ? (int)prod : kMaxThreadsPerBlock;
}

std::set<std::string> ptx_entries(const std::string& ptx) {
    std::set<std::string> out;
    size_t pos = 0;
    while ((pos = ptx.find(".entry", pos)) != std::string::npos) {
        size_t i = pos + 6;
        bool token_start = pos == 0 || !is_ident_char(ptx[pos - 1]);
        pos = i;
        if (!token_start || i >= ptx.size() || !(ptx[i] == ' ' || ptx[i] == '\t')) continue;
        while (i < ptx.size() && (ptx[i] == ' ' || ptx[i] == '\t')) ++i;
        size_t j = i;
        while (j < ptx.size() && is_ident_char(ptx[j])) ++j;
        size_t k = j;
        while (k < ptx.size() && (ptx[k] == ' ' || ptx[k] == '\t' || ptx[k] == '\n' ||
                                  ptx[k] == '\r'))
            ++k;
        if (j > i && k < ptx.size() && ptx[k] == '(') out.insert(ptx.substr(i, j - i));
    }
    return out;
}

// The number after "<directive> " at the start of a line ("9.0" -> 90, "sm_90a" -> 90).
int ptx_directive_number(const std::string& ptx, const char* directive) {
    std::istringstream in(ptx);
    std::string line;
    const size_t dl = strlen(directive);
    while (std::getline(in, line)) {
        size_t b = line.find_first_not_of(" \t");
        if (b == std::string::npos || line.compare(b, dl, directive) != 0) continue;
        size_t i = b + dl;
        while (i < line.size() && !(line[i] >= '0' && line[i] <= '9')) ++i;
        int v = 0;
        bool any = false;
        for (; i < line.size(); ++i) {
            if (line[i] >= '0' && line[i] <= '9') {
                v = v * 10 + (line[i] - '0');
                any = true;
            } else if (line[i] != '.') {
                break;
            }
        }
        return any ? v : -1;
    }
    return -1;
}

CUresult load_module_text(State& s, const char* fn, CUmodule* out, std::string text) {
    EmuModule m;
    m.entries = ptx_entries(text);
    m.ptx_version = ptx_directive_number(text, ".version");
    int target = ptx_directive_number(text, ".target");
    if (target < 0 || m.ptx_version < 0) {
        emu_msg("%s: the image is not PTX text (no .version/.target directive); the "
                "emulated driver loads PTX only",
                fn);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    if (target > kCcMajor * 10 + kCcMinor) {
        emu_msg("%s: the PTX targets sm_%d, newer than the emulated device (sm_%d%d)", fn,
                target, kCcMajor, kCcMinor);
        return CUDA_ERROR_INVALID_PTX;
    }
    auto* mod = new EmuModule(std::move(m));
    mod->ptx = std::move(text);
    s.modules.insert(mod);
    *out = mod;
    return CUDA_SUCCESS;
}

EmuFunction* live_function(State& s, CUfunction f) {
    if (f == nullptr || !s.functions.count(f)) return nullptr;
    return f;
}

// Canary check of every live allocation after a launch; returns true if any was bad.
bool check_all_guards_after(State& s, const char* kernel) {
    bool any = false;
    for (auto& kv : s.allocs) {
        long long off = 0;
        if (check_and_repair_guards(kv.first, kv.second, &off)) {
            emu_msg("kernel %s wrote out of bounds of a %zu-byte allocation at offset %lld",
                    kernel, kv.second.size, off);
            any = true;
        }
    }
    return any;
}

struct ErrInfo {
    int code;
    const char* name;
    const char* text;
};

const ErrInfo kErrors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {4, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {5, "CUDA_ERROR_PROFILER_DISABLED", "profiler disabled while using external profiling tool"},
    {6, "CUDA_ERROR_PROFILER_NOT_INITIALIZED", "profiler not initialized: call cudaProfilerInitialize()"},
    {7, "CUDA_ERROR_PROFILER_ALREADY_STARTED", "profiler already started"},
    {8, "CUDA_ERROR_PROFILER_ALREADY_STOPPED", "profiler already stopped"},
    {34, "CUDA_ERROR_STUB_LIBRARY", "CUDA driver is a stub library"},
    {46, "CUDA_ERROR_DEVICE_UNAVAILABLE", "CUDA-capable device(s) is/are busy or unavailable"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {102, "CUDA_ERROR_DEVICE_NOT_LICENSED", "device doesn't have valid Grid license"},
    {200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {202, "CUDA_ERROR_CONTEXT_ALREADY_CURRENT", "context already current"},
    {205, "CUDA_ERROR_MAP_FAILED", "mapping of buffer object failed"},
    {206, "CUDA_ERROR_UNMAP_FAILED", "unmapping of buffer object failed"},
    {207, "CUDA_ERROR_ARRAY_IS_MAPPED", "array is mapped"},
    {208, "CUDA_ERROR_ALREADY_MAPPED", "resource already mapped"},
    {209, "CUDA_ERROR_NO_BINARY_FOR_GPU", "no kernel image is available for execution on the device"},
    {210, "CUDA_ERROR_ALREADY_ACQUIRED", "resource already acquired"},
    {211, "CUDA_ERROR_NOT_MAPPED", "resource not mapped"},
    {212, "CUDA_ERROR_NOT_MAPPED_AS_ARRAY", "resource not mapped as array"},
    {213, "CUDA_ERROR_NOT_MAPPED_AS_POINTER", "resource not mapped as pointer"},
    {214, "CUDA_ERROR_ECC_UNCORRECTABLE", "uncorrectable ECC error encountered"},
    {215, "CUDA_ERROR_UNSUPPORTED_LIMIT", "limit is not supported on this architecture"},
    {216, "CUDA_ERROR_CONTEXT_ALREADY_IN_USE", "exclusive-thread device already in use by a different thread"},
    {217, "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED", "peer access is not supported between these two devices"},
    {218, "CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"},
    {219, "CUDA_ERROR_INVALID_GRAPHICS_CONTEXT", "invalid OpenGL or DirectX context"},
    {220, "CUDA_ERROR_NVLINK_UNCORRECTABLE", "uncorrectable NVLink error detected during the execution"},
    {221, "CUDA_ERROR_JIT_COMPILER_NOT_FOUND", "PTX JIT compiler library not found"},
    {222, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "the provided PTX was compiled with an unsupported toolchain."},
    {223, "CUDA_ERROR_JIT_COMPILATION_DISABLED", "PTX JIT compilation was disabled"},
    {224, "CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY", "the provided execution affinity is not supported"},
    {300, "CUDA_ERROR_INVALID_SOURCE", "device kernel image is invalid"},
    {301, "CUDA_ERROR_FILE_NOT_FOUND", "file not found"},
    {302, "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND", "shared object symbol not found"},
    {303, "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED", "shared object initialization failed"},
    {304, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {401, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {701, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {702, "CUDA_ERROR_LAUNCH_TIMEOUT", "the launch timed out and was terminated"},
    {703, "CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING", "launch uses incompatible texturing mode"},
    {704, "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED", "peer access is already enabled"},
    {705, "CUDA_ERROR_PEER_ACCESS_NOT_ENABLED", "peer access has not been enabled"},
    {708, "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE", "cannot set while device is active in this process"},
    {709, "CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed"},
    {710, "CUDA_ERROR_ASSERT", "device-side assert triggered"},
    {711, "CUDA_ERROR_TOO_MANY_PEERS", "peer mapping resources exhausted"},
    {712, "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED", "part or all of the requested memory range is already mapped"},
    {713, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED", "pointer does not correspond to a registered memory region"},
    {714, "CUDA_ERROR_HARDWARE_STACK_ERROR", "hardware stack error"},
    {715, "CUDA_ERROR_ILLEGAL_INSTRUCTION", "an illegal instruction was encountered"},
    {716, "CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"},
    {717, "CUDA_ERROR_INVALID_ADDRESS_SPACE", "operation not supported on global/shared address space"},
    {718, "CUDA_ERROR_INVALID_PC", "invalid program counter"},
    {719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {720, "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE", "too many blocks in cooperative launch"},
    {800, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {802, "CUDA_ERROR_SYSTEM_NOT_READY", "system not yet initialized"},
    {803, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH", "system has unsupported display driver / cuda driver combination"},
    {804, "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE", "forward compatibility was attempted on non supported HW"},
    {900, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED", "operation not permitted when stream is capturing"},
    {901, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED", "operation failed due to a previous error during capture"},
    {902, "CUDA_ERROR_STREAM_CAPTURE_MERGE", "operation would result in a merge of separate capture sequences"},
    {903, "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED", "capture was not ended in the same stream as it began"},
    {904, "CUDA_ERROR_STREAM_CAPTURE_UNJOINED", "capturing stream has unjoined work"},
    {905, "CUDA_ERROR_STREAM_CAPTURE_ISOLATION", "dependency created on uncaptured work in another stream"},
    {906, "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT", "operation would make the legacy stream depend on a capturing blocking stream"},
    {907, "CUDA_ERROR_CAPTURED_EVENT", "operation not permitted on an event last recorded in a capturing stream"},
    {908, "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD", "attempt to terminate a thread-local capture sequence from another thread"},
    {909, "CUDA_ERROR_TIMEOUT", "wait operation timed out"},
    {910, "CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE", "the graph update was not performed because it included changes which violated constraints specific to instantiated graph update"},
    {911, "CUDA_ERROR_EXTERNAL_DEVICE", "an async error has occured in external entity outside of CUDA"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

const ErrInfo* find_error(int code) {
    for (const auto& e : kErrors)
        if (e.code == code) return &e;
    return nullptr;
}

// Device attribute values (an H100-like sm_90 part). Unknown attributes in the valid
// range answer 0.
int device_attribute(int a) {
    switch (a) {
        case 1: return kMaxThreadsPerBlock;   // MAX_THREADS_PER_BLOCK
        case 2: return 1024;                  // MAX_BLOCK_DIM_X
        case 3: return 1024;                  // MAX_BLOCK_DIM_Y
        case 4: return 64;                    // MAX_BLOCK_DIM_Z
        case 5: return 2147483647;            // MAX_GRID_DIM_X
        case 6: return 65535;                 // MAX_GRID_DIM_Y
        case 7: return 65535;                 // MAX_GRID_DIM_Z
        case 8: return kSharedPerBlock;       // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: return 65536;                 // TOTAL_CONSTANT_MEMORY
        case 10: return 32;                   // WARP_SIZE
        case 11: return 2147483647;           // MAX_PITCH
        case 12: return 65536;                // MAX_REGISTERS_PER_BLOCK
        case 13: return 1980000;              // CLOCK_RATE (kHz)
        case 14: return 512;                  // TEXTURE_ALIGNMENT
        case 15: return 1;                    // GPU_OVERLAP
        case 16: return kSmCount;             // MULTIPROCESSOR_COUNT
        case 19: return 1;                    // CAN_MAP_HOST_MEMORY
        case 21: return 131072;               // MAXIMUM_TEXTURE1D_WIDTH
        case 22: return 131072;               // MAXIMUM_TEXTURE2D_WIDTH
        case 23: return 65536;                // MAXIMUM_TEXTURE2D_HEIGHT
        case 24: case 25: case 26: return 16384;  // MAXIMUM_TEXTURE3D_*
        case 30: return 512;                  // SURFACE_ALIGNMENT
        case 31: return 1;                    // CONCURRENT_KERNELS
        case 32: return 1;                    // ECC_ENABLED
        case 36: return 2619000;              // MEMORY_CLOCK_RATE (kHz)
        case 37: return 5120;                 // GLOBAL_MEMORY_BUS_WIDTH
        case 38: return 52428800;             // L2_CACHE_SIZE
        case 39: return kMaxThreadsPerSm;     // MAX_THREADS_PER_MULTIPROCESSOR
        case 40: return 3;                    // ASYNC_ENGINE_COUNT
        case 41: return 1;                    // UNIFIED_ADDRESSING
        case 51: return 32;                   // TEXTURE_PITCH_ALIGNMENT
        case 75: return kCcMajor;             // COMPUTE_CAPABILITY_MAJOR
        case 76: return kCcMinor;             // COMPUTE_CAPABILITY_MINOR
        case 78: return 1;                    // STREAM_PRIORITIES_SUPPORTED
        case 79: return 1;                    // GLOBAL_L1_CACHE_SUPPORTED
        case 80: return 1;                    // LOCAL_L1_CACHE_SUPPORTED
        case 81: return kSharedPerSm;         // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 82: return 65536;                // MAX_REGISTERS_PER_MULTIPROCESSOR
        case 83: return 1;                    // MANAGED_MEMORY
        case 87: return 2;                    // SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO
        case 89: return 1;                    // CONCURRENT_MANAGED_ACCESS
        case 90: return 1;                    // COMPUTE_PREEMPTION_SUPPORTED
        case 92: return 1;                    // CAN_USE_STREAM_MEM_OPS
        case 93: return 1;                    // CAN_USE_64_BIT_STREAM_MEM_OPS
        case 95: return 1;                    // COOPERATIVE_LAUNCH
        case 97: return kSharedPerBlockOptin; // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 99: return 1;                    // HOST_REGISTER_SUPPORTED
        case 102: return 1;                   // VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED
        case 103: return 1;                   // HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED
        case 106: return kMaxBlocksPerSm;     // MAX_BLOCKS_PER_MULTIPROCESSOR
        case 109: return 134213632;           // MAX_ACCESS_POLICY_WINDOW_SIZE
        case 111: return 1024;                // RESERVED_SHARED_MEMORY_PER_BLOCK
        case 115: return 1;                   // MEMORY_POOLS_SUPPORTED
        case 119: return 1;                   // MEMPOOL_SUPPORTED_HANDLE_TYPES (posix fd)
        case 120: return 1;                   // CLUSTER_LAUNCH
        case 126: return 4;                   // MEM_SYNC_DOMAIN_COUNT
        case 131: return -1;                  // NUMA_ID
        case 134: return -1;                  // HOST_NUMA_ID
        default: return 0;
    }
}

}  // namespace

// ---------------------------------------------------------------------------------
// Initialisation, errors, device.

EMU_API CUresult cuInit(unsigned int flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    s.initialized = true;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuDriverGetVersion(int* version) {
    if (version == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *version = 13000;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuGetErrorName(CUresult error, const char** pstr) {
    if (pstr == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const ErrInfo* e = find_error(error);
    *pstr = e ? e->name : nullptr;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

EMU_API CUresult cuGetErrorString(CUresult error, const char** pstr) {
    if (pstr == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const ErrInfo* e = find_error(error);
    *pstr = e ? e->text : nullptr;
    return e ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

EMU_API CUresult cuDeviceGetCount(int* count) {
    if (CUresult r = require_init()) return r;
    if (count == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *count = 1;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (CUresult r = require_init()) return r;
    if (device == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *device = 0;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
    if (CUresult r = require_init()) return r;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (name == nullptr || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, static_cast<size_t>(len), "%s", kDeviceName);
    return CUDA_SUCCESS;
}

static CUresult device_uuid(CUuuid* uuid, CUdevice dev) {
    if (CUresult r = require_init()) return r;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (uuid == nullptr) return CUDA_ERROR_INVALID_VALUE;
    static const char k[16] = {'m', 'o', 'e', '-', 'r', 'o', 'u', 't',
                               'e', 'r', '-', 'e', 'm', 'u', '-', '0'};
    memcpy(uuid->bytes, k, sizeof k);
    return CUDA_SUCCESS;
}

EMU_API CUresult cuDeviceGetUuid(CUuuid* uuid, CUdevice dev) { return device_uuid(uuid, dev); }
EMU_API CUresult cuDeviceGetUuid_v2(CUuuid* uuid, CUdevice dev) { return device_uuid(uuid, dev); }

EMU_API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice dev) {
    if (CUresult r = require_init()) return r;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *bytes = kTotalMem;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuDeviceGetAttribute(int* pi, int attrib, CUdevice dev) {
    if (CUresult r = require_init()) return r;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (pi == nullptr || attrib < 1 || attrib > 161) return CUDA_ERROR_INVALID_VALUE;
    *pi = device_attribute(attrib);
    return CUDA_SUCCESS;
}

EMU_API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool*, CUdevice) {
    return unsupported("cuDeviceGetDefaultMemPool");
}
EMU_API CUresult cuDeviceGetMemPool(CUmemoryPool*, CUdevice) {
    return unsupported("cuDeviceGetMemPool");
}
EMU_API CUresult cuDeviceSetMemPool(CUdevice, CUmemoryPool) {
    return unsupported("cuDeviceSetMemPool");
}

// ---------------------------------------------------------------------------------
// Contexts.

EMU_API CUresult cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice dev) {
    if (CUresult r = require_init()) return r;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (pctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (s.primary == nullptr) {
        s.primary = new EmuCtx;
        s.primary->primary = true;
        s.primary->flags = s.primary_flags;
    }
    s.contexts.insert(s.primary);  // the handle stays valid across release/retain
    ++s.primary_refs;
    *pctx = s.primary;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev) {
    if (CUresult r = require_init()) return r;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (s.primary_refs <= 0) {
        emu_msg("cuDevicePrimaryCtxRelease_v2: the primary context is not retained");
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    --s.primary_refs;
    return CUDA_SUCCESS;
}

static CUresult create_ctx(CUcontext* pctx, unsigned flags, CUdevice dev) {
    if (CUresult r = require_init()) return r;
    if (dev != 0) return CUDA_ERROR_INVALID_DEVICE;
    if (pctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    auto* c = new EmuCtx;
    c->flags = flags;
    s.contexts.insert(c);
    t_current = c;
    *pctx = c;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuCtxCreate_v3(CUcontext* pctx, CUexecAffinityParam* params, int num_params,
                                unsigned int flags, CUdevice dev) {
    if (params != nullptr && num_params > 0) return unsupported("cuCtxCreate_v3 (affinity)");
    return create_ctx(pctx, flags, dev);
}

EMU_API CUresult cuCtxCreate_v4(CUcontext* pctx, CUctxCreateParams* params, unsigned int flags,
                                CUdevice dev) {
    if (params != nullptr && (params->execAffinityParams != nullptr || params->cigParams != nullptr))
        return unsupported("cuCtxCreate_v4 (affinity / CiG parameters)");
    return create_ctx(pctx, flags, dev);
}

EMU_API CUresult cuCtxDestroy_v2(CUcontext ctx) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (!ctx_live(s, ctx) || ctx->primary) {
        emu_msg("cuCtxDestroy_v2: invalid (or primary) context %p", static_cast<void*>(ctx));
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    s.contexts.erase(ctx);
    if (t_current == ctx) t_current = nullptr;
    delete ctx;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuCtxGetCurrent(CUcontext* pctx) {
    if (CUresult r = require_init()) return r;
    if (pctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *pctx = t_current;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuCtxSetCurrent(CUcontext ctx) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (ctx != nullptr && !ctx_live(s, ctx)) {
        emu_msg("cuCtxSetCurrent: invalid context %p", static_cast<void*>(ctx));
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    t_current = ctx;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuCtxGetDevice(CUdevice* dev) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuCtxGetDevice")) return r;
    if (dev == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *dev = 0;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuCtxSetFlags(unsigned int flags) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuCtxSetFlags")) return r;
    t_current->flags = flags;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuCtxSynchronize() {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    return require_ctx(s, "cuCtxSynchronize");
}

EMU_API CUresult cuCtxGetLimit(size_t* pvalue, int limit) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuCtxGetLimit")) return r;
    if (pvalue == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (limit < 0 || limit > 6) return CUDA_ERROR_UNSUPPORTED_LIMIT;
    *pvalue = s.limits[limit];
    return CUDA_SUCCESS;
}

EMU_API CUresult cuCtxSetLimit(int limit, size_t value) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuCtxSetLimit")) return r;
    if (limit < 0 || limit > 6) return CUDA_ERROR_UNSUPPORTED_LIMIT;
    s.limits[limit] = value;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuCtxGetCacheConfig(int* pconfig) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuCtxGetCacheConfig")) return r;
    if (pconfig == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *pconfig = s.cache_config;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuCtxSetCacheConfig(int config) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuCtxSetCacheConfig")) return r;
    if (config < 0 || config > 3) return CUDA_ERROR_INVALID_VALUE;
    s.cache_config = config;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (CUresult r = require_init()) return r;
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------
// Streams.

static CUresult create_stream(CUstream* ph, unsigned flags, int priority, const char* fn) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, fn)) return r;
    if (ph == nullptr || (flags & ~1u) != 0) return CUDA_ERROR_INVALID_VALUE;
    auto* h = new EmuStream;
    h->flags = flags;
    h->priority = std::max(-5, std::min(0, priority));
    s.streams.insert(h);
    s.dead_streams.erase(h);
    *ph = h;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuStreamCreate(CUstream* ph, unsigned int flags) {
    return create_stream(ph, flags, 0, "cuStreamCreate");
}

EMU_API CUresult cuStreamCreateWithPriority(CUstream* ph, unsigned int flags, int priority) {
    return create_stream(ph, flags, priority, "cuStreamCreateWithPriority");
}

EMU_API CUresult cuStreamDestroy_v2(CUstream h) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (!s.streams.count(h)) {
        emu_msg("cuStreamDestroy_v2: invalid stream %p", static_cast<void*>(h));
        return CUDA_ERROR_INVALID_HANDLE;
    }
    s.streams.erase(h);
    s.dead_streams.insert(h);
    delete h;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuStreamSynchronize(CUstream h) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    return check_stream(s, "cuStreamSynchronize", h);
}

EMU_API CUresult cuStreamQuery(CUstream h) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    return check_stream(s, "cuStreamQuery", h);
}

EMU_API CUresult cuStreamWaitEvent(CUstream h, CUevent e, unsigned int flags) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = check_stream(s, "cuStreamWaitEvent", h)) return r;
    if (CUresult r = check_event(s, "cuStreamWaitEvent", e)) return r;
    if ((flags & ~1u) != 0) return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuLaunchHostFunc(CUstream h, CUhostFn fn, void* user_data) {
    if (CUresult r = require_init()) return r;
    {
        State& s = st();
        std::lock_guard<std::mutex> lk(s.mu);
        if (CUresult r = check_stream(s, "cuLaunchHostFunc", h)) return r;
    }
    if (fn == nullptr) return CUDA_ERROR_INVALID_VALUE;
    fn(user_data);  // all work is synchronous: everything before it has finished
    return CUDA_SUCCESS;
}

EMU_API CUresult cuStreamIsCapturing(CUstream h, int* status) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = check_stream(s, "cuStreamIsCapturing", h)) return r;
    if (status == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *status = 0;  // CU_STREAM_CAPTURE_STATUS_NONE
    return CUDA_SUCCESS;
}

EMU_API CUresult cuStreamBeginCapture_v2(CUstream, int) {
    return unsupported("cuStreamBeginCapture_v2");
}
EMU_API CUresult cuStreamEndCapture(CUstream, CUgraph*) {
    return unsupported("cuStreamEndCapture");
}
EMU_API CUresult cuStreamAttachMemAsync(CUstream, CUdeviceptr, size_t, unsigned int) {
    return unsupported("cuStreamAttachMemAsync");
}

// ---------------------------------------------------------------------------------
// Events.

EMU_API CUresult cuEventCreate(CUevent* ph, unsigned int flags) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuEventCreate")) return r;
    if (ph == nullptr || (flags & ~7u) != 0) return CUDA_ERROR_INVALID_VALUE;
    auto* e = new EmuEvent;
    e->flags = flags;
    s.events.insert(e);
    *ph = e;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuEventDestroy_v2(CUevent e) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = check_event(s, "cuEventDestroy_v2", e)) return r;
    s.events.erase(e);
    delete e;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuEventRecord(CUevent e, CUstream h) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = check_event(s, "cuEventRecord", e)) return r;
    if (CUresult r = check_stream(s, "cuEventRecord", h)) return r;
    e->recorded = true;
    e->when = std::chrono::steady_clock::now();
    return CUDA_SUCCESS;
}

EMU_API CUresult cuEventQuery(CUevent e) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    return check_event(s, "cuEventQuery", e);
}

EMU_API CUresult cuEventSynchronize(CUevent e) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    return check_event(s, "cuEventSynchronize", e);
}

static CUresult event_elapsed(float* ms, CUevent a, CUevent b, const char* fn) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (ms == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (CUresult r = check_event(s, fn, a)) return r;
    if (CUresult r = check_event(s, fn, b)) return r;
    if ((a->flags & 2u) || (b->flags & 2u)) {
        emu_msg("%s: an event was created with CU_EVENT_DISABLE_TIMING", fn);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    if (!a->recorded || !b->recorded) {
        emu_msg("%s: an event has not been recorded", fn);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    *ms = std::chrono::duration<float, std::milli>(b->when - a->when).count();
    return CUDA_SUCCESS;
}

EMU_API CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    return event_elapsed(ms, a, b, "cuEventElapsedTime");
}
EMU_API CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
    return event_elapsed(ms, a, b, "cuEventElapsedTime_v2");
}

// ---------------------------------------------------------------------------------
// Memory.

EMU_API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuMemGetInfo_v2")) return r;
    if (free_bytes == nullptr || total == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *free_bytes = kTotalMem - s.bytes_in_use;
    *total = kTotalMem;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytesize) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuMemAlloc_v2")) return r;
    return do_alloc(s, "cuMemAlloc_v2", dptr, bytesize, false);
}

EMU_API CUresult cuMemAllocAsync(CUdeviceptr* dptr, size_t bytesize, CUstream h) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuMemAllocAsync")) return r;
    if (CUresult r = check_stream(s, "cuMemAllocAsync", h)) return r;
    // Zero bytes is allowed here (cudarc's CudaStream::null and empty slices): a
    // unique, guarded, zero-length allocation.
    return do_alloc(s, "cuMemAllocAsync", dptr, bytesize, true);
}

EMU_API CUresult cuMemFree_v2(CUdeviceptr p) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    return do_free(s, "cuMemFree_v2", p);
}

EMU_API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream h) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = check_stream(s, "cuMemFreeAsync", h)) return r;
    return do_free(s, "cuMemFreeAsync", p);
}

EMU_API CUresult cuMemHostAlloc(void** pp, size_t bytesize, unsigned int flags) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuMemHostAlloc")) return r;
    if (pp == nullptr || (flags & ~7u) != 0) return CUDA_ERROR_INVALID_VALUE;
    void* p = nullptr;
    if (posix_memalign(&p, 4096, bytesize == 0 ? 1 : bytesize) != 0 || p == nullptr)
        return CUDA_ERROR_OUT_OF_MEMORY;
    memset(p, kPoison, bytesize);
    s.host_allocs.insert(p);
    *pp = p;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuMemFreeHost(void* p) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (!s.host_allocs.count(p)) {
        emu_msg("cuMemFreeHost: %p was not allocated by cuMemHostAlloc", p);
        return CUDA_ERROR_INVALID_VALUE;
    }
    s.host_allocs.erase(p);
    free(p);
    return CUDA_SUCCESS;
}

static CUresult memset_d8(CUdeviceptr dst, unsigned char v, size_t n, CUstream h, bool async,
                          const char* fn) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (async)
        if (CUresult r = check_stream(s, fn, h)) return r;
    if (CUresult r = check_device_range(s, fn, "dstDevice", dst, n)) return r;
    if (n) memset(reinterpret_cast<void*>(static_cast<uintptr_t>(dst)), v, n);
    return CUDA_SUCCESS;
}

EMU_API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    return memset_d8(dst, v, n, nullptr, false, "cuMemsetD8_v2");
}
EMU_API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream h) {
    return memset_d8(dst, v, n, h, true, "cuMemsetD8Async");
}

static CUresult copy_htod(CUdeviceptr dst, const void* src, size_t n, CUstream h, bool async,
                          const char* fn) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (async)
        if (CUresult r = check_stream(s, fn, h)) return r;
    if (CUresult r = check_device_range(s, fn, "dstDevice", dst, n)) return r;
    if (CUresult r = check_host_range(s, fn, "srcHost", src, n)) return r;
    if (n) memmove(reinterpret_cast<void*>(static_cast<uintptr_t>(dst)), src, n);
    return CUDA_SUCCESS;
}

static CUresult copy_dtoh(void* dst, CUdeviceptr src, size_t n, CUstream h, bool async,
                          const char* fn) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (async)
        if (CUresult r = check_stream(s, fn, h)) return r;
    if (CUresult r = check_device_range(s, fn, "srcDevice", src, n)) return r;
    if (CUresult r = check_host_range(s, fn, "dstHost", dst, n)) return r;
    if (n) memmove(dst, reinterpret_cast<const void*>(static_cast<uintptr_t>(src)), n);
    return CUDA_SUCCESS;
}

static CUresult copy_dtod(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream h, bool async,
                          const char* fn) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (async)
        if (CUresult r = check_stream(s, fn, h)) return r;
    if (CUresult r = check_device_range(s, fn, "dstDevice", dst, n)) return r;
    if (CUresult r = check_device_range(s, fn, "srcDevice", src, n)) return r;
    if (n)
        memmove(reinterpret_cast<void*>(static_cast<uintptr_t>(dst)),
                reinterpret_cast<const void*>(static_cast<uintptr_t>(src)), n);
    return CUDA_SUCCESS;
}

EMU_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return copy_htod(dst, src, n, nullptr, false, "cuMemcpyHtoD_v2");
}
EMU_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream h) {
    return copy_htod(dst, src, n, h, true, "cuMemcpyHtoDAsync_v2");
}
EMU_API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return copy_dtoh(dst, src, n, nullptr, false, "cuMemcpyDtoH_v2");
}
EMU_API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream h) {
    return copy_dtoh(dst, src, n, h, true, "cuMemcpyDtoHAsync_v2");
}
EMU_API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy_dtod(dst, src, n, nullptr, false, "cuMemcpyDtoD_v2");
}
EMU_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream h) {
    return copy_dtod(dst, src, n, h, true, "cuMemcpyDtoDAsync_v2");
}

EMU_API CUresult cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext dst_ctx, CUdeviceptr src,
                                   CUcontext src_ctx, size_t n, CUstream h) {
    {
        if (CUresult r = require_init()) return r;
        State& s = st();
        std::lock_guard<std::mutex> lk(s.mu);
        if (!ctx_live(s, dst_ctx) || !ctx_live(s, src_ctx)) {
            emu_msg("cuMemcpyPeerAsync: invalid context");
            return CUDA_ERROR_INVALID_CONTEXT;
        }
    }
    return copy_dtod(dst, src, n, h, true, "cuMemcpyPeerAsync");
}

EMU_API CUresult cuMemAllocManaged(CUdeviceptr*, size_t, unsigned int) {
    return unsupported("cuMemAllocManaged");
}
EMU_API CUresult cuMemAdvise_v2(CUdeviceptr, size_t, int, CUmemLocation) {
    return unsupported("cuMemAdvise_v2");
}
EMU_API CUresult cuMemPrefetchAsync_v2(CUdeviceptr, size_t, CUmemLocation, unsigned int,
                                       CUstream) {
    return unsupported("cuMemPrefetchAsync_v2");
}
EMU_API CUresult cuMemPoolCreate(CUmemoryPool*, const CUmemPoolProps*) {
    return unsupported("cuMemPoolCreate");
}
EMU_API CUresult cuMemPoolDestroy(CUmemoryPool) { return unsupported("cuMemPoolDestroy"); }
EMU_API CUresult cuMemPoolTrimTo(CUmemoryPool, size_t) { return unsupported("cuMemPoolTrimTo"); }
EMU_API CUresult cuMemPoolGetAttribute(CUmemoryPool, int, void*) {
    return unsupported("cuMemPoolGetAttribute");
}
EMU_API CUresult cuMemPoolSetAttribute(CUmemoryPool, int, void*) {
    return unsupported("cuMemPoolSetAttribute");
}
EMU_API CUresult cuMemAllocFromPoolAsync(CUdeviceptr*, size_t, CUmemoryPool, CUstream) {
    return unsupported("cuMemAllocFromPoolAsync");
}
EMU_API CUresult cuImportExternalMemory(CUexternalMemory*, const CUDA_EXTERNAL_MEMORY_HANDLE_DESC*) {
    return unsupported("cuImportExternalMemory");
}
EMU_API CUresult cuExternalMemoryGetMappedBuffer(CUdeviceptr*, CUexternalMemory,
                                                 const CUDA_EXTERNAL_MEMORY_BUFFER_DESC*) {
    return unsupported("cuExternalMemoryGetMappedBuffer");
}
EMU_API CUresult cuDestroyExternalMemory(CUexternalMemory) {
    return unsupported("cuDestroyExternalMemory");
}

// ---------------------------------------------------------------------------------
// Modules and functions.

EMU_API CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuModuleLoadData")) return r;
    if (module == nullptr || image == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const auto* b = static_cast<const unsigned char*>(image);
    if ((b[0] == 0x7f && b[1] == 'E' && b[2] == 'L' && b[3] == 'F') ||
        (b[0] == 0x50 && b[1] == 0xED && b[2] == 0x55 && b[3] == 0xBA)) {
        emu_msg("cuModuleLoadData: cubin/fatbin images are not supported by the emulated "
                "driver; load PTX text");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    return load_module_text(s, "cuModuleLoadData", module,
                            std::string(static_cast<const char*>(image)));
}

EMU_API CUresult cuModuleLoad(CUmodule* module, const char* fname) {
    if (CUresult r = require_init()) return r;
    if (module == nullptr || fname == nullptr) return CUDA_ERROR_INVALID_VALUE;
    std::ifstream f(fname, std::ios::binary);
    if (!f) {
        emu_msg("cuModuleLoad: cannot open %s", fname);
        return CUDA_ERROR_FILE_NOT_FOUND;
    }
    std::ostringstream buf;
    buf << f.rdbuf();
    std::string text = buf.str();
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (CUresult r = require_ctx(s, "cuModuleLoad")) return r;
    if (text.size() >= 4 && text.compare(0, 4, "\x7f" "ELF") == 0) {
        emu_msg("cuModuleLoad: %s is a cubin; the emulated driver loads PTX only", fname);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    return load_module_text(s, "cuModuleLoad", module, std::move(text));
}

EMU_API CUresult cuModuleUnload(CUmodule hmod) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (hmod == nullptr || !s.modules.count(hmod)) {
        emu_msg("cuModuleUnload: invalid module %p", static_cast<void*>(hmod));
        return CUDA_ERROR_INVALID_HANDLE;
    }
    for (auto& kv : hmod->functions) {
        s.functions.erase(kv.second);
        delete kv.second;
    }
    s.modules.erase(hmod);
    delete hmod;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuModuleGetFunction(CUfunction* hfunc, CUmodule hmod, const char* name) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    if (hfunc == nullptr || name == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (hmod == nullptr || !s.modules.count(hmod)) {
        emu_msg("cuModuleGetFunction: invalid module %p", static_cast<void*>(hmod));
        return CUDA_ERROR_INVALID_HANDLE;
    }
    auto found = hmod->functions.find(name);
    if (found != hmod->functions.end()) {
        *hfunc = found->second;
        return CUDA_SUCCESS;
    }
    if (!hmod->entries.count(name)) {
        emu_msg("cuModuleGetFunction: the module's PTX has no entry point `%s`", name);
        return CUDA_ERROR_NOT_FOUND;
    }
    if (!moe_emu_has_kernel(name)) {
        emu_msg("cuModuleGetFunction: kernel `%s` is in the PTX but the emulator has no "
                "CPU version of it",
                name);
        return CUDA_ERROR_NOT_FOUND;
    }
    auto* f = new EmuFunction;
    f->module = hmod;
    f->name = name;
    f->max_threads = ptx_max_threads(hmod->ptx, name);
    hmod->functions[name] = f;
    s.functions.insert(f);
    *hfunc = f;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuModuleGetGlobal_v2(CUdeviceptr*, size_t*, CUmodule, const char*) {
    return unsupported("cuModuleGetGlobal_v2");
}

EMU_API CUresult cuFuncGetAttribute(int* pi, int attrib, CUfunction hfunc) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    EmuFunction* f = live_function(s, hfunc);
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (pi == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attrib) {
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = f->max_threads; break;
        case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES: *pi = 0; break;
        case CU_FUNC_ATTRIBUTE_CONST_SIZE_BYTES: *pi = 0; break;
        case CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES: *pi = 0; break;
        case CU_FUNC_ATTRIBUTE_NUM_REGS: *pi = 32; break;
        case CU_FUNC_ATTRIBUTE_PTX_VERSION: *pi = f->module->ptx_version; break;
        case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *pi = kCcMajor * 10 + kCcMinor; break;
        case CU_FUNC_ATTRIBUTE_CACHE_MODE_CA: *pi = 0; break;
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *pi = f->max_dynamic_smem; break;
        case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: *pi = f->carveout; break;
        default:
            if (attrib < 0 || attrib >= CU_FUNC_ATTRIBUTE_MAX) return CUDA_ERROR_INVALID_VALUE;
            *pi = 0;  // cluster attributes etc.
    }
    return CUDA_SUCCESS;
}

EMU_API CUresult cuFuncSetAttribute(CUfunction hfunc, int attrib, int value) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    EmuFunction* f = live_function(s, hfunc);
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    switch (attrib) {
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES:
            if (value < 0 || value > kSharedPerBlockOptin) {
                emu_msg("cuFuncSetAttribute: MAX_DYNAMIC_SHARED_SIZE_BYTES = %d for `%s` is "
                        "above the device's %d",
                        value, f->name.c_str(), kSharedPerBlockOptin);
                return CUDA_ERROR_INVALID_VALUE;
            }
            f->max_dynamic_smem = value;
            return CUDA_SUCCESS;
        case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT:
            if (value < -1 || value > 100) return CUDA_ERROR_INVALID_VALUE;
            f->carveout = value;
            return CUDA_SUCCESS;
        default:
            if (attrib >= 10 && attrib < CU_FUNC_ATTRIBUTE_MAX) return CUDA_SUCCESS;  // cluster hints
            return CUDA_ERROR_INVALID_VALUE;  // read-only or unknown
    }
}

EMU_API CUresult cuFuncSetCacheConfig(CUfunction hfunc, int config) {
    if (CUresult r = require_init()) return r;
    State& s = st();
    std::lock_guard<std::mutex> lk(s.mu);
    EmuFunction* f = live_function(s, hfunc);
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (config < 0 || config > 3) return CUDA_ERROR_INVALID_VALUE;
    f->cache_config = config;
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------
// Occupancy (a simple model of an sm_90 multiprocessor; not on the crate's paths).

static int blocks_per_sm(int block_size, size_t smem) {
    if (block_size <= 0 || block_size > kMaxThreadsPerBlock) return 0;
    int by_threads = kMaxThreadsPerSm / block_size;
    int by_smem = smem == 0 ? kMaxBlocksPerSm : static_cast<int>(kSharedPerSm / (smem + 1024));
    return std::max(0, std::min({by_threads, by_smem, kMaxBlocksPerSm}));
}

EMU_API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, CUfunction f,
                                                             int block_size, size_t smem) {
    if (CUresult r = require_init()) return r;
    {
        State& s = st();
        std::lock_guard<std::mutex> lk(s.mu);
        if (!live_function(s, f)) return CUDA_ERROR_INVALID_HANDLE;
    }
    if (num_blocks == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *num_blocks = blocks_per_sm(block_size, smem);
    return CUDA_SUCCESS;
}

EMU_API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* num_blocks,
                                                                      CUfunction f,
                                                                      int block_size,
                                                                      size_t smem, unsigned int) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(num_blocks, f, block_size, smem);
}

EMU_API CUresult cuOccupancyMaxPotentialBlockSizeWithFlags(int* min_grid, int* block_size,
                                                           CUfunction f, CUoccupancyB2DSize b2d,
                                                           size_t smem, int limit, unsigned int) {
    if (CUresult r = require_init()) return r;
    {
        State& s = st();
        std::lock_guard<std::mutex> lk(s.mu);
        if (!live_function(s, f)) return CUDA_ERROR_INVALID_HANDLE;
    }
    if (min_grid == nullptr || block_size == nullptr) return CUDA_ERROR_INVALID_VALUE;
    int cap = limit > 0 ? std::min(limit, kMaxThreadsPerBlock) : kMaxThreadsPerBlock;
    int best = 0, best_threads = -1;
    for (int b = 32; b <= cap; b += 32) {
        size_t sm = b2d ? b2d(b) : smem;
        int t = blocks_per_sm(b, sm) * b;
        if (t > best_threads) {
            best_threads = t;
            best = b;
        }
    }
    if (best == 0) best = cap;
    *block_size = best;
    *min_grid = blocks_per_sm(best, b2d ? b2d(best) : smem) * kSmCount;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuOccupancyMaxPotentialBlockSize(int* min_grid, int* block_size, CUfunction f,
                                                  CUoccupancyB2DSize b2d, size_t smem,
                                                  int limit) {
    return cuOccupancyMaxPotentialBlockSizeWithFlags(min_grid, block_size, f, b2d, smem, limit, 0);
}

EMU_API CUresult cuOccupancyAvailableDynamicSMemPerBlock(size_t* smem, CUfunction f,
                                                         int num_blocks, int block_size) {
    if (CUresult r = require_init()) return r;
    {
        State& s = st();
        std::lock_guard<std::mutex> lk(s.mu);
        if (!live_function(s, f)) return CUDA_ERROR_INVALID_HANDLE;
    }
    if (smem == nullptr || num_blocks <= 0 || block_size <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (static_cast<long long>(num_blocks) * block_size > kMaxThreadsPerSm) {
        *smem = 0;
        return CUDA_SUCCESS;
    }
    size_t per = kSharedPerSm / static_cast<size_t>(num_blocks);
    per = per > 1024 ? per - 1024 : 0;
    *smem = std::min(per, static_cast<size_t>(kSharedPerBlockOptin));
    return CUDA_SUCCESS;
}

EMU_API CUresult cuOccupancyMaxActiveClusters(int*, CUfunction, const CUlaunchConfig*) {
    return unsupported("cuOccupancyMaxActiveClusters");
}
EMU_API CUresult cuOccupancyMaxPotentialClusterSize(int*, CUfunction, const CUlaunchConfig*) {
    return unsupported("cuOccupancyMaxPotentialClusterSize");
}

// ---------------------------------------------------------------------------------
// Launch.

EMU_API CUresult cuLaunchKernel(CUfunction hfunc, unsigned int gx, unsigned int gy,
                                unsigned int gz, unsigned int bx, unsigned int by,
                                unsigned int bz, unsigned int smem, CUstream h,
                                void** params, void** extra) {
    if (CUresult r = require_init()) return r;
    std::string name;
    {
        State& s = st();
        std::lock_guard<std::mutex> lk(s.mu);
        EmuFunction* f = live_function(s, hfunc);
        if (f == nullptr) {
            emu_msg("cuLaunchKernel: invalid function handle %p", static_cast<void*>(hfunc));
            return CUDA_ERROR_INVALID_HANDLE;
        }
        name = f->name;
        if (CUresult r = check_stream(s, "cuLaunchKernel", h)) return r;
        const char* why = nullptr;
        unsigned long long threads = 1ull * bx * by * bz;
        if (gx == 0 || gy == 0 || gz == 0)
            why = "a grid dimension is 0";
        else if (gx > 2147483647u || gy > 65535u || gz > 65535u)
            why = "the grid exceeds (2^31-1, 65535, 65535)";
        else if (bx == 0 || by == 0 || bz == 0)
            why = "a block dimension is 0";
        else if (bx > 1024u || by > 1024u || bz > 64u)
            why = "the block exceeds (1024, 1024, 64)";
        else if (threads > static_cast<unsigned long long>(kMaxThreadsPerBlock))
            why = "the block has more than 1024 threads";
        else if (threads > static_cast<unsigned long long>(f->max_threads))
            why = "the block has more threads than the kernel's __launch_bounds__ (.maxntid)";
        if (why != nullptr) {
            emu_msg("cuLaunchKernel: kernel %s: grid (%u, %u, %u), block (%u, %u, %u): %s",
                    name.c_str(), gx, gy, gz, bx, by, bz, why);
            return CUDA_ERROR_INVALID_VALUE;
        }
        if (smem > static_cast<unsigned>(f->max_dynamic_smem)) {
            emu_msg("cuLaunchKernel: kernel %s: %u bytes of dynamic shared memory, above its "
                    "limit of %d (raise it with cuFuncSetAttribute("
                    "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), at most %d)",
                    name.c_str(), smem, f->max_dynamic_smem, kSharedPerBlockOptin);
            return CUDA_ERROR_INVALID_VALUE;
        }
        if (extra != nullptr) {
            emu_msg("cuLaunchKernel: kernel %s: `extra` launch parameters are not supported",
                    name.c_str());
            return CUDA_ERROR_NOT_SUPPORTED;
        }
    }
    std::lock_guard<std::mutex> launch_lk(launch_mutex());
    char err[4096];
    err[0] = '\0';
    int rc = moe_emu_launch(name.c_str(), gx, gy, gz, bx, by, bz, smem, params, err, sizeof err);
    err[sizeof err - 1] = '\0';
    if (rc != 0)
        emu_msg("%s", err[0] ? err : (std::string("kernel ") + name + " failed").c_str());
    bool oob;
    {
        State& s = st();
        std::lock_guard<std::mutex> lk(s.mu);
        oob = check_all_guards_after(s, name.c_str());
    }
    if (rc != 0) return CUDA_ERROR_LAUNCH_FAILED;
    if (oob) return CUDA_ERROR_ILLEGAL_ADDRESS;
    return CUDA_SUCCESS;
}

EMU_API CUresult cuLaunchCooperativeKernel(CUfunction, unsigned int, unsigned int, unsigned int,
                                           unsigned int, unsigned int, unsigned int, unsigned int,
                                           CUstream, void**) {
    return unsupported("cuLaunchCooperativeKernel");
}

// ---------------------------------------------------------------------------------
// Graphs and profiler.

EMU_API CUresult cuGraphInstantiateWithFlags(CUgraphExec*, CUgraph, unsigned long long) {
    return unsupported("cuGraphInstantiateWithFlags");
}
EMU_API CUresult cuGraphExecDestroy(CUgraphExec) { return unsupported("cuGraphExecDestroy"); }
EMU_API CUresult cuGraphDestroy(CUgraph) { return unsupported("cuGraphDestroy"); }
EMU_API CUresult cuGraphLaunch(CUgraphExec, CUstream) { return unsupported("cuGraphLaunch"); }
EMU_API CUresult cuGraphUpload(CUgraphExec, CUstream) { return unsupported("cuGraphUpload"); }

// Private driver API. NVRTC 13 dlopens libcuda.so.1 and asks for an export table
// (without a GPU it finds none); answering "not supported", silently, lets NVRTC
// carry on compiling (a missing symbol makes it crash).
EMU_API CUresult cuGetExportTable(const void** table, const CUuuid* id) {
    (void)id;
    if (table != nullptr) *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;
}

EMU_API CUresult cuProfilerStart() { return CUDA_SUCCESS; }
EMU_API CUresult cuProfilerStop() { return CUDA_SUCCESS; }

#pragma GCC visibility pop
