// runtime.cpp: runs the kernels of cuda/*.cu (compiled by g++ with cuda_emu.h) on
// the CPU. See cuda_emu.h for the model: one fiber per CUDA thread, blocks one after
// another, fibers switched only at barriers and warp collectives.
//
// Fibers switch with a few lines of x86-64 assembly (callee-saved registers and the
// stack pointer); other architectures use ucontext. Each fiber has its own stack with
// a guard page below it. The runtime is not reentrant: emu/driver.cpp serialises
// launches.
//
// Under AddressSanitizer (MOE_EMU_SANITIZE=1 bash scripts/build_emu.sh) every switch is
// announced with __sanitizer_start_switch_fiber / __sanitizer_finish_switch_fiber, so
// that ASan knows which stack is running, and a fiber stack's shadow is cleared before
// the stack is reused (a fiber abandoned by a failed launch leaves its frames poisoned).
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "cuda_emu.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define MOE_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define MOE_EMU_ASAN 0
#endif

namespace emu {

uint3* tid = nullptr;
uint3 bid = {0, 0, 0};
dim3 bdim;
dim3 gdim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per fiber, plus one guard page

enum State { READY, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
    char* stack = nullptr;  // lowest usable address (the guard page is below)
    void* asan_fake = nullptr;  // ASan's fake stack while switched out (MOE_EMU_ASAN)
    uint3 idx = {0, 0, 0};
    unsigned lane = 0;
    State state = READY;
    // The pending warp collective.
    int op = 0;
    unsigned mask = 0;
    uint64_t value = 0;
    int arg = 0, width = 32;
    uint64_t result = 0;
};

struct Launch {
    void (*invoke)(void**) = nullptr;
    void** params = nullptr;
    std::vector<Fiber> fibers;  // the block's threads, linear order
    unsigned nthreads = 0;
    void* sched_sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t sched_uc;
#endif
    Fiber* cur = nullptr;
    // Scheduler side of the ASan fiber annotations: its fake stack while a fiber
    // runs, and its stack's bounds (reported to the first fiber that starts).
    void* sched_asan_fake = nullptr;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
    // Dynamic shared memory: exactly the launch's size (a fresh allocation per
    // launch), so that under ASan a read or write past its end is caught.
    std::vector<unsigned char> smem;
    bool failed = false;
    std::string error;
};

Launch g;

std::map<std::string, void (*)(void**)>& registry() {
    static std::map<std::string, void (*)(void**)> r;
    return r;
}

void fail(const char* fmt, ...) {
    if (g.failed) return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g.failed = true;
    g.error = buf;
}

}  // namespace
}  // namespace emu

#if defined(__x86_64__)
// void moe_emu_switch(void** save_sp, void* new_sp): saves the callee-saved
// registers on the current stack, stores the stack pointer in *save_sp, switches to
// new_sp and restores the registers saved there.
asm(R"(
    .text
    .p2align 4
    .globl moe_emu_switch
    .hidden moe_emu_switch
    .type moe_emu_switch,@function
moe_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size moe_emu_switch, .-moe_emu_switch
)");
extern "C" void moe_emu_switch(void** save_sp, void* new_sp);
#endif

namespace emu {
namespace {

// ASan's fiber annotations (no-ops without ASan). Before a switch, the stack being
// switched to; `save` receives the current stack's fake stack, and null means the
// current stack is finished. After it, `restore` is the fake stack saved when this
// stack was left (null on its first entry) and *bottom / *size receive the bounds of
// the stack switched from.
inline void asan_start_switch(void** save, const void* bottom, size_t size) {
#if MOE_EMU_ASAN
    __sanitizer_start_switch_fiber(save, bottom, size);
#else
    (void)save, (void)bottom, (void)size;
#endif
}
inline void asan_finish_switch(void* restore, const void** bottom, size_t* size) {
#if MOE_EMU_ASAN
    __sanitizer_finish_switch_fiber(restore, bottom, size);
#else
    (void)restore, (void)bottom, (void)size;
#endif
}

// Switch from the running fiber back to the scheduler (the fiber resumes later).
void yield_to_scheduler() {
    Fiber* f = g.cur;
    asan_start_switch(&f->asan_fake, g.sched_stack_bottom, g.sched_stack_size);
#if defined(__x86_64__)
    moe_emu_switch(&f->sp, g.sched_sp);
#else
    swapcontext(&f->uc, &g.sched_uc);
#endif
    asan_finish_switch(f->asan_fake, &g.sched_stack_bottom, &g.sched_stack_size);
}

[[noreturn]] void fiber_main() {
    // First entry (from resume()): this stack is new to ASan, which reports the
    // scheduler's stack bounds for the switches back.
    asan_finish_switch(nullptr, &g.sched_stack_bottom, &g.sched_stack_size);
    g.invoke(g.params);
    Fiber* f = g.cur;
    f->state = DONE;
    // Final exit: a null save slot tells ASan this stack is finished.
    asan_start_switch(nullptr, g.sched_stack_bottom, g.sched_stack_size);
#if defined(__x86_64__)
    moe_emu_switch(&f->sp, g.sched_sp);
#else
    swapcontext(&f->uc, &g.sched_uc);
#endif
    std::abort();  // a finished fiber is never resumed
}

#if !defined(__x86_64__)
void fiber_main_uc() { fiber_main(); }
#endif

// One arena of fiber stacks, grown on demand, each stack with a PROT_NONE guard page
// below it so that an overflow faults instead of corrupting a neighbour.
struct Stacks {
    char* base = nullptr;
    size_t count = 0;
    size_t page = 4096;
    size_t stride() const { return kStackBytes + page; }
    bool ensure(size_t n) {
        if (n <= count) return true;
        unpoison();
        if (base) munmap(base, count * stride());
        base = nullptr;
        count = 0;
        page = (size_t)sysconf(_SC_PAGESIZE);
        void* p = mmap(nullptr, n * stride(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (p == MAP_FAILED) return false;
        base = static_cast<char*>(p);
        count = n;
        for (size_t i = 0; i < n; ++i) mprotect(base + i * stride(), page, PROT_NONE);
        return true;
    }
    char* stack(size_t i) const { return base + i * stride() + page; }
    // Clears the ASan shadow of the whole arena (no-op without ASan).
    void unpoison() const {
#if MOE_EMU_ASAN
        if (base) ASAN_UNPOISON_MEMORY_REGION(base, count * stride());
#endif
    }
};
Stacks g_stacks;

void start_fiber(Fiber& f, size_t i) {
    f.stack = g_stacks.stack(i);
    f.state = READY;
    f.asan_fake = nullptr;
#if MOE_EMU_ASAN
    // The initial frame below is written from here; instrumented frames set their own
    // shadow, so the rest of the stack needs clearing only after a failed launch.
    ASAN_UNPOISON_MEMORY_REGION(f.stack + kStackBytes - 4096, 4096);
#endif
#if defined(__x86_64__)
    // Initial frame, from the top: a fake return address for fiber_main (so that its
    // entry sees rsp = 8 mod 16, as after a call), fiber_main as the address
    // moe_emu_switch returns to, and six zeroed callee-saved registers.
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);
    for (int r = 0; r < 6; ++r) *--sp = 0;
    f.sp = sp;
#else
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main_uc, 0);
#endif
}

volatile sig_atomic_t g_in_fiber = 0;  // a kernel (not the runtime) is running

void resume(Fiber& f) {
    g.cur = &f;
    tid = &f.idx;
    asan_start_switch(&g.sched_asan_fake, f.stack, kStackBytes);
    g_in_fiber = 1;
#if defined(__x86_64__)
    moe_emu_switch(&g.sched_sp, f.sp);
#else
    swapcontext(&g.sched_uc, &f.uc);
#endif
    g_in_fiber = 0;
    asan_finish_switch(g.sched_asan_fake, nullptr, nullptr);
}

#if !defined(__SANITIZE_ADDRESS__)
// A kernel that touches an unmapped address (a null or wild pointer, or a fiber stack
// overflow into its guard page) fails its launch with a message, as a GPU reports an
// illegal address, instead of killing the process. The handler runs on its own stack,
// marks the thread finished and switches back to the scheduler; it never returns.
// Installed for the duration of a launch only (Rust keeps its own SIGSEGV handler for
// stack overflows); a fault outside a kernel gets the previous handler back and faults
// again.
const int kFaultSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
struct sigaction g_old_actions[4];
std::vector<char> g_altstack;
stack_t g_old_altstack;

void on_fault(int sig, siginfo_t* si, void*) {
    if (!g_in_fiber || g.cur == nullptr) {
        for (int i = 0; i < 4; ++i) sigaction(kFaultSignals[i], &g_old_actions[i], nullptr);
        return;
    }
    g_in_fiber = 0;
    const uint3 t = g.cur->idx;
    const char* what = sig == SIGFPE ? "integer division by zero or overflow (undefined on a GPU too)"
                       : sig == SIGILL ? "a trap (g++ compiles a provable null dereference to one)"
                                       : "invalid memory access (a null or wild pointer, or a thread stack overflow)";
    fail("signal %d at address %p in thread (%u,%u,%u) of block (%u,%u,%u): %s", sig, si->si_addr,
         t.x, t.y, t.z, bid.x, bid.y, bid.z, what);
    g.cur->state = DONE;
    yield_to_scheduler();
    std::abort();
}

void install_fault_handler() {
    if (g_altstack.empty()) g_altstack.resize(64 * 1024);
    stack_t ss = {};
    ss.ss_sp = g_altstack.data();
    ss.ss_size = g_altstack.size();
    sigaltstack(&ss, &g_old_altstack);
    struct sigaction sa = {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < 4; ++i) sigaction(kFaultSignals[i], &sa, &g_old_actions[i]);
}

void remove_fault_handler() {
    for (int i = 0; i < 4; ++i) sigaction(kFaultSignals[i], &g_old_actions[i], nullptr);
    sigaltstack(&g_old_altstack, nullptr);
}
#else
void install_fault_handler() {}  // ASan reports faults itself
void remove_fault_handler() {}
#endif

const char* op_name(int op) {
    switch (op) {
        case OP_SYNCWARP: return "__syncwarp";
        case OP_SHFL: return "__shfl_sync";
        case OP_SHFL_UP: return "__shfl_up_sync";
        case OP_SHFL_DOWN: return "__shfl_down_sync";
        case OP_SHFL_XOR: return "__shfl_xor_sync";
        case OP_BALLOT: return "__ballot_sync";
        case OP_MATCH_ANY: return "__match_any_sync";
        case OP_ANY: return "__any_sync";
        case OP_ALL: return "__all_sync";
        default: return "?";
    }
}

// Source lane of a shuffle, or -1 for "keep your own value".
int shfl_source(const Fiber& f) {
    const int w = f.width;
    const int lane = (int)f.lane;
    const int seg = lane & ~(w - 1);
    switch (f.op) {
        case OP_SHFL: return seg + (f.arg & (w - 1));
        case OP_SHFL_UP: return (lane - seg) < f.arg ? -1 : lane - f.arg;
        case OP_SHFL_DOWN: return (lane - seg) + f.arg >= w ? -1 : lane + f.arg;
        case OP_SHFL_XOR: {
            const int s = lane ^ f.arg;
            return s >= seg + w ? -1 : s;
        }
        default: return -1;
    }
}

// Completes every warp collective whose participants have all arrived. Returns
// whether any fiber was released; sets the launch error on undefined behaviour.
bool complete_warp_collectives(unsigned warp_count) {
    bool released = false;
    for (unsigned w = 0; w < warp_count && !g.failed; ++w) {
        const unsigned first = w * 32;
        const unsigned nlanes = std::min(32u, g.nthreads - first);
        Fiber* lanes = &g.fibers[first];
        for (unsigned l = 0; l < nlanes && !g.failed; ++l) {
            Fiber& a = lanes[l];
            if (a.state != AT_WARP) continue;
            const unsigned mask = a.mask;
            // Every lane the mask names must exist and wait in the same collective.
            bool ready = true;
            for (unsigned m = 0; m < 32; ++m) {
                if (!(mask >> m & 1u)) continue;
                if (m >= nlanes) {
                    fail("%s with mask 0x%08x in block (%u,%u,%u) names lane %u, but the warp "
                         "has only %u threads",
                         op_name(a.op), mask, bid.x, bid.y, bid.z, m, nlanes);
                    return false;
                }
                const Fiber& b = lanes[m];
                if (b.state == AT_WARP) {
                    if (b.mask != mask || b.op != a.op) {
                        fail("warp %u of block (%u,%u,%u): lane %u waits in %s (mask 0x%08x) "
                             "while lane %u waits in %s (mask 0x%08x)",
                             w, bid.x, bid.y, bid.z, l, op_name(a.op), mask, m, op_name(b.op),
                             b.mask);
                        return false;
                    }
                } else if (b.state == DONE || b.state == AT_BARRIER) {
                    fail("%s with mask 0x%08x in warp %u of block (%u,%u,%u): lane %u %s",
                         op_name(a.op), mask, w, bid.x, bid.y, bid.z, m,
                         b.state == DONE ? "has exited" : "waits at __syncthreads instead");
                    return false;
                } else {
                    ready = false;  // still running this round
                }
            }
            if (!ready) continue;
            if (!(mask >> l & 1u)) {
                fail("%s in warp %u of block (%u,%u,%u): the calling lane %u is not in its "
                     "mask 0x%08x",
                     op_name(a.op), w, bid.x, bid.y, bid.z, l, mask);
                return false;
            }
            // Compute every participant's result, then release them.
            uint64_t ballot = 0;
            for (unsigned m = 0; m < 32; ++m)
                if (mask >> m & 1u) ballot |= (uint64_t)(lanes[m].value != 0) << m;
            for (unsigned m = 0; m < 32; ++m) {
                if (!(mask >> m & 1u)) continue;
                Fiber& f = lanes[m];
                switch (f.op) {
                    case OP_SYNCWARP: f.result = 0; break;
                    case OP_BALLOT: f.result = ballot; break;
                    case OP_ANY: f.result = ballot != 0; break;
                    case OP_ALL: f.result = ballot == mask; break;
                    case OP_MATCH_ANY: {
                        uint64_t r = 0;
                        for (unsigned o = 0; o < 32; ++o)
                            if ((mask >> o & 1u) && lanes[o].value == f.value) r |= 1ull << o;
                        f.result = r;
                        break;
                    }
                    default: {
                        if (f.width <= 0 || f.width > 32 || (f.width & (f.width - 1)) != 0) {
                            fail("%s with width %d: width must be a power of two <= 32",
                                 op_name(f.op), f.width);
                            return false;
                        }
                        const int s = shfl_source(f);
                        if (s < 0) {
                            f.result = f.value;
                        } else if (s >= (int)nlanes || !(mask >> s & 1u)) {
                            fail("%s in warp %u of block (%u,%u,%u): lane %u reads lane %d, "
                                 "which is not in the mask 0x%08x (undefined value)",
                                 op_name(f.op), w, bid.x, bid.y, bid.z, m, s, mask);
                            return false;
                        } else {
                            f.result = lanes[s].value;
                        }
                    }
                }
            }
            for (unsigned m = 0; m < 32; ++m)
                if (mask >> m & 1u) lanes[m].state = READY;
            released = true;
        }
    }
    return released;
}

void describe_deadlock() {
    unsigned at_barrier = 0, at_warp = 0, done = 0;
    const Fiber* w = nullptr;
    for (unsigned i = 0; i < g.nthreads; ++i) {
        const Fiber& f = g.fibers[i];
        if (f.state == AT_BARRIER) ++at_barrier;
        if (f.state == AT_WARP) {
            ++at_warp;
            if (!w) w = &f;
        }
        if (f.state == DONE) ++done;
    }
    fail("deadlock in block (%u,%u,%u): %u threads wait at __syncthreads, %u in warp "
         "collectives (first: thread %u in %s, mask 0x%08x), %u have exited",
         bid.x, bid.y, bid.z, at_barrier, at_warp, w ? w->idx.x : 0u, w ? op_name(w->op) : "-",
         w ? w->mask : 0u, done);
}

// Runs one block to completion (or to the first error).
void run_block(bool reverse) {
    const unsigned n = g.nthreads;
    const unsigned warps = (n + 31) / 32;
    for (unsigned i = 0; i < n; ++i) start_fiber(g.fibers[i], i);
    if (!g.smem.empty()) std::memset(g.smem.data(), 0xCD, g.smem.size());
    for (;;) {
        for (unsigned j = 0; j < n && !g.failed; ++j) {
            Fiber& f = g.fibers[reverse ? n - 1 - j : j];
            if (f.state == READY) resume(f);
        }
        if (g.failed) return;
        unsigned done = 0, at_barrier = 0;
        for (unsigned i = 0; i < n; ++i) {
            done += g.fibers[i].state == DONE;
            at_barrier += g.fibers[i].state == AT_BARRIER;
        }
        if (done == n) return;
        if (complete_warp_collectives(warps)) continue;
        if (g.failed) return;
        if (at_barrier + done == n) {
            for (unsigned i = 0; i < n; ++i)
                if (g.fibers[i].state == AT_BARRIER) g.fibers[i].state = READY;
            continue;
        }
        describe_deadlock();
        return;
    }
}

std::map<std::string, unsigned long long> g_launches;

}  // namespace

void syncthreads() {
    g.cur->state = AT_BARRIER;
    yield_to_scheduler();
}

uint64_t warp_collective(int op, unsigned mask, uint64_t value, int arg, int width) {
    Fiber* f = g.cur;
    f->state = AT_WARP;
    f->op = op;
    f->mask = mask;
    f->value = value;
    f->arg = arg;
    f->width = width;
    yield_to_scheduler();
    return f->result;
}

void* dynamic_smem() { return g.smem.empty() ? nullptr : g.smem.data(); }

Registrar::Registrar(const char* name, void (*invoke)(void**)) { registry()[name] = invoke; }

}  // namespace emu

extern "C" int moe_emu_has_kernel(const char* name) {
    return name && emu::registry().count(name) ? 1 : 0;
}

extern "C" int moe_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                              unsigned by, unsigned bz, unsigned dyn_smem, void** params, char* err,
                              size_t errlen) {
    using namespace emu;
    auto report = [&](const std::string& msg) {
        if (err && errlen) std::snprintf(err, errlen, "kernel %s: %s", name ? name : "?", msg.c_str());
        return 1;
    };
    auto it = name ? registry().find(name) : registry().end();
    if (it == registry().end()) return report("no such emulated kernel");
    const unsigned long long nthreads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || nthreads == 0 || nthreads > 1024)
        return report("invalid launch shape");
    if (!g_stacks.ensure(nthreads)) return report("cannot map fiber stacks");
    g = Launch();
    g.invoke = it->second;
    g.params = params;
    g.nthreads = (unsigned)nthreads;
    g.fibers.assign(g.nthreads, Fiber());
    for (unsigned i = 0; i < g.nthreads; ++i) {
        Fiber& f = g.fibers[i];
        f.idx = {i % bx, (i / bx) % by, i / (bx * by)};
        f.lane = i % 32;
    }
    g.smem.assign(dyn_smem, 0xCD);  // g.smem was empty: capacity is exactly dyn_smem
    bdim = dim3(bx, by, bz);
    gdim = dim3(gx, gy, gz);
    // Alternate the order of blocks and of threads between launches of each kernel: a
    // kernel whose result depends on that order (a race) then differs between runs.
    // MOE_EMU_ORDER=forward|reverse pins the order (for debugging a failure).
    static const char* order = std::getenv("MOE_EMU_ORDER");
    // Counted per kernel: a global count would give a kernel the same order on every
    // launch whenever the launches between two of its own are even in number.
    bool reverse = (g_launches[it->first]++ & 1ull) != 0;
    if (order && std::strcmp(order, "forward") == 0) reverse = false;
    if (order && std::strcmp(order, "reverse") == 0) reverse = true;
    const unsigned long long nblocks = (unsigned long long)gx * gy * gz;
    install_fault_handler();
    for (unsigned long long b = 0; b < nblocks && !g.failed; ++b) {
        const unsigned long long lin = reverse ? nblocks - 1 - b : b;
        bid = {(unsigned)(lin % gx), (unsigned)((lin / gx) % gy), (unsigned)(lin / ((unsigned long long)gx * gy))};
        run_block(reverse);
    }
    remove_fault_handler();
    tid = nullptr;
    // A failed launch abandons its fibers mid-kernel, their frames' redzones still
    // poisoned in the shadow of stacks that later launches reuse.
    if (g.failed) g_stacks.unpoison();
    if (g.failed) return report(g.error);
    return 0;
}
