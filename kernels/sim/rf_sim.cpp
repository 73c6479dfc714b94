// recforge SIMT simulator runtime: runs CUDA kernels compiled as host C++ (-DRF_SIM), every CUDA
// thread as a fiber.
//
// Execution model
//   - A launch hands blocks out (atomic counter) to RF_SIM_THREADS OS threads ("workers"; the
//     calling thread is one of them). A block runs start to end on one worker; blocks never
//     interleave on a worker, which is what makes `__shared__` = `static thread_local` correct.
//   - The threads of a block are fibers, each with its own stack (RF_SIM_STACK_KB, default 64
//     KiB, plus a PROT_NONE guard page), reused across blocks and launches (a pool of workers'
//     resources). Fibers run cooperatively: a fiber runs until it blocks in __syncthreads or in a
//     warp collective, or exits; it then switches DIRECTLY to the next runnable fiber (FIFO run
//     queue), or back to the worker's scheduler context when none is runnable. The order fibers
//     enter the queue, at a block's start and when a barrier or a collective completes, is the
//     schedule (forward, reverse, or by default a seeded shuffle; see `Schedule` below): it
//     decides which side of an unsynchronized shared-memory access runs first, so the default
//     shuffle shows races in both directions. The schedule is deterministic for a given launch.
//   - Context switch: 14 instructions of x86_64 asm (callee-saved registers + rsp); ucontext
//     elsewhere (or with -DRF_SIM_USE_UCONTEXT). ASan fiber annotations when built with ASan.
//   - Errors (rf_sim::fail, deadlocks, broken barriers) record the first message of the launch,
//     mark the block aborted and switch from the failing fiber back to the scheduler; the other
//     fibers are abandoned (their stacks are simply reused), remaining blocks are skipped, and
//     rf_sim_launch returns the message. No C++ exception ever crosses a fiber boundary.
#include "rf_sim_rt.h"

#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define RF_SIM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define RF_SIM_ASAN 1
#endif
#endif
#ifdef RF_SIM_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__x86_64__) && !defined(RF_SIM_USE_UCONTEXT)
#define RF_SIM_ASM_SWITCH 1
// void rf_sim_ctx_switch_x86(void** save_sp, void* new_sp): push the SysV callee-saved registers,
// save rsp, load the other rsp, pop, return into the other context.
asm(R"(
    .text
    .globl rf_sim_ctx_switch_x86
    .hidden rf_sim_ctx_switch_x86
    .type rf_sim_ctx_switch_x86, @function
    .p2align 4
rf_sim_ctx_switch_x86:
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
    .size rf_sim_ctx_switch_x86, .-rf_sim_ctx_switch_x86
)");
extern "C" void rf_sim_ctx_switch_x86(void** save_sp, void* new_sp);
#else
#include <ucontext.h>
#endif

namespace rf_sim {
namespace {

struct Ctx {
#ifdef RF_SIM_ASM_SWITCH
    void* sp = nullptr;
#else
    ucontext_t uc;
#endif
};

void fiber_main();

// Prepare `c` so that switching to it calls fiber_main() on the given stack.
void ctx_init(Ctx* c, unsigned char* lo, size_t size) {
#ifdef RF_SIM_ASM_SWITCH
    uintptr_t top = ((uintptr_t)lo + size) & ~(uintptr_t)15;
    void** a = reinterpret_cast<void**>(top - 16);  // return address slot; top-8: fake return of fiber_main
    a[1] = nullptr;
    a[0] = reinterpret_cast<void*>(&fiber_main);
    for (int i = 1; i <= 6; i++) a[-i] = nullptr;  // rbp rbx r12 r13 r14 r15
    c->sp = a - 6;
#else
    getcontext(&c->uc);
    c->uc.uc_stack.ss_sp = lo;
    c->uc.uc_stack.ss_size = size;
    c->uc.uc_link = nullptr;
    makecontext(&c->uc, &fiber_main, 0);
#endif
}

inline void ctx_switch_raw(Ctx* from, Ctx* to) {
#ifdef RF_SIM_ASM_SWITCH
    rf_sim_ctx_switch_x86(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
}

enum State : unsigned char { READY, RUNNING, AT_BARRIER, AT_WARP, EXITED };

// One cp.async of this thread not yet complete (deferred mode): the 16 source bytes, read at
// issue, and where they land when a wait covers `group`.
struct PendingCopy {
    unsigned char* dst;
    unsigned group;  // index of the commit group it belongs to (== cp_committed while uncommitted)
    unsigned char data[16];
};

// One wgmma.mma_async of this thread not yet complete: computed when a wgmma.wait_group covers
// `group` (see wgmma_s8).
enum MmaKind { MMA_S8 = 0, MMA_BF16_TB = 1 };
struct PendingMma {
    void* d;  // this thread's accumulators (n / 2 of them): int32 for MMA_S8, f32 for MMA_BF16_TB
    int n, kind;
    uint64_t da, db;
    int accumulate;
    unsigned group;
    uint64_t operands;  // hash of the shared-memory bytes this thread's part reads, at issue
};

struct Fiber : FiberPub {
    Ctx ctx;
    State state = READY;
    std::vector<PendingCopy> cp;  // issue order
    unsigned cp_committed = 0;    // cp.async.commit_group calls so far in this block
    std::vector<PendingMma> wg;   // issue order
    unsigned wg_committed = 0;    // wgmma.commit_group calls so far in this block
    std::vector<uint32_t> unfenced;  // async-proxy tracking: dynamic smem bytes this thread wrote, not yet fenced
};

struct Lane {
    unsigned mask;
    int op, b, width;
    uint64_t val, res;
    warp_fn fn;  // W_CALL
    const char* name;
};
constexpr int W_CALL = 100;
struct Warp {
    unsigned exited;   // lanes that exited (or do not exist in a partial last warp)
    unsigned pending;  // lanes waiting in a collective
    unsigned gmask;    // fast path: while `uniform`, every pending lane waits with (gmask, gop)
    int gop;
    warp_fn gfn;
    bool uniform;
    uint64_t collectives;  // completed in this block (varies the shuffle)
    Lane lane[32];
};

struct Launch {
    const rf_sim_kernel* k;
    void** args;
    dim3 grid, block;
    size_t dyn;
    uint64_t nblocks;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> abort{false};
    int schedule = 0;
    int cp_async = 0;
    std::mutex mu;
    std::string err;
    void set_error(const std::string& m) {
        std::lock_guard<std::mutex> g(mu);
        if (err.empty()) err = m;
        abort.store(true, std::memory_order_relaxed);
    }
};

size_t stack_bytes() {
    static const size_t v = [] {
        const char* e = getenv("RF_SIM_STACK_KB");
        long kb = e ? atol(e) : 64;
        if (kb < 16) kb = 16;
        return (size_t)kb * 1024;
    }();
    return v;
}

// The order in which runnable fibers are queued (RF_SIM_SCHEDULE, rf_sim_set_schedule):
//   forward  linear thread order at the start of a block; at a barrier the last arriving thread
//            runs on, then the others in arrival order; at a warp collective the last lane runs on.
//   reverse  descending linear order at the start and at every barrier and warp collective (the
//            last arriving thread queues too), so a thread runs before the lower-numbered ones.
//   shuffle  (the default) a pseudo-random order at each of those points, drawn from the kernel's
//            name, the block, the barrier count and the warp: the same launch on the same data
//            schedules the same way, but different blocks and points see different orders. In
//            half the barrier phases one drawn warp also runs ahead (see draw_greedy_warp).
// Fibers run until they block, so a shared-memory access that no barrier separates from another
// thread's sees that thread's whole phase or none of it; which one depends on this order. forward
// alone hides every race in which the reader runs after the writer in linear order; shuffle
// exposes both directions across blocks, and the tests compare against the CPU reference.
enum Schedule { SCHED_FORWARD = 0, SCHED_REVERSE = 1, SCHED_SHUFFLE = 2 };
std::atomic<int> g_schedule{-1};

int default_schedule() {
    static const int v = [] {
        const char* e = getenv("RF_SIM_SCHEDULE");
        if (!e || !*e || !strcmp(e, "shuffle")) return (int)SCHED_SHUFFLE;
        if (!strcmp(e, "forward")) return (int)SCHED_FORWARD;
        if (!strcmp(e, "reverse")) return (int)SCHED_REVERSE;
        fprintf(stderr, "rf_sim: RF_SIM_SCHEDULE=%s is not forward, reverse or shuffle; using shuffle\n", e);
        return (int)SCHED_SHUFFLE;
    }();
    return v;
}
int current_schedule() {
    const int s = g_schedule.load(std::memory_order_relaxed);
    return s < 0 ? default_schedule() : s;
}

// When a cp.async lands (RF_SIM_CP_ASYNC, rf_sim_set_cp_async):
//   wait   (the default) the destination's 16 bytes become 0xFF at issue and receive the data only
//          when a cp.async.wait_group / wait_all of the issuing thread covers the copy's group
//          (or when the thread exits). The source is read at issue. A read of the destination
//          before that wait sees NaN / -1 instead of the data, so a wait_group count one too
//          high, a missing wait or a read of a stage still in flight fails the kernel tests; and
//          a refill issued into a stage other warps still read (a missing barrier) poisons
//          their reads at once.
//   issue  the copy completes at issue, commit and wait do nothing (the model before 2026-12-06;
//          also a valid schedule on hardware, kept for comparison).
// Hardware shows old or new bytes before the wait, never 0xFF; the poison is stricter on purpose,
// since such a read is a bug either way.
enum CpAsync { CP_WAIT = 0, CP_ISSUE = 1 };
std::atomic<int> g_cp_async{-1};

int default_cp_async() {
    static const int v = [] {
        const char* e = getenv("RF_SIM_CP_ASYNC");
        if (!e || !*e || !strcmp(e, "wait")) return (int)CP_WAIT;
        if (!strcmp(e, "issue")) return (int)CP_ISSUE;
        fprintf(stderr, "rf_sim: RF_SIM_CP_ASYNC=%s is not wait or issue; using wait\n", e);
        return (int)CP_WAIT;
    }();
    return v;
}
int current_cp_async() {
    const int s = g_cp_async.load(std::memory_order_relaxed);
    return s < 0 ? default_cp_async() : s;
}

inline uint64_t mix64(uint64_t x) {  // splitmix64's finalizer
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
uint64_t name_hash(const char* s) {  // FNV-1a
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return h;
}

// One worker's resources: fibers, their stacks, dynamic smem, the scheduler context and the
// state of the block it is running. Pooled and reused by later launches.
struct Worker : BlockPub {
    Ctx sched;
    const void* sched_lo = nullptr;  // scheduler (OS thread) stack, for ASan
    size_t sched_size = 0;
    std::vector<Fiber> fibers;
    std::vector<unsigned char*> stacks;
    size_t stack_size = 0;
    std::vector<Warp> warps;
    std::vector<Fiber*> runq;
    size_t rq_head = 0, rq_tail = 0;  // ring buffer, capacity = fibers.size()
    std::vector<Fiber*> bar_waiters;
    unsigned char* smem_buf = nullptr;
    Launch* L = nullptr;
    Fiber* cur = nullptr;
    // block state
    unsigned nthreads = 0, live = 0;
    unsigned bar_arrived = 0, bar_gen = 0, bar_count = 0, bar_res_count = 0, bar_res_n = 0;
    unsigned exited_min_gen = ~0u;  // smallest barrier generation at which a thread exited
    uint3 first_exited{0, 0, 0};
    bool aborted = false;
    bool asan_dirty = false;
    int schedule = SCHED_FORWARD;  // of the current launch
    int cp_async = CP_WAIT;        // of the current launch
    uint64_t sched_seed = 0;       // of the current block (shuffle)
    int greedy_warp = -1;          // shuffle: the warp that runs ahead in this barrier phase
    std::vector<Fiber*> order;     // scratch of push_ordered
    std::vector<void*> shared_poisoned;  // RF_SHARED variables this block has filled
    // Generic -> async proxy tracking (see track_async_proxy), on for kernels registered with
    // RF_SIM_KERNEL_ASYNC_PROXY: dynamic smem as of the last attribution, and per byte 1 + the
    // thread whose generic write of it no fence.proxy.async has covered yet (0: none).
    bool proxy = false;
    std::vector<unsigned char> proxy_snap;
    std::vector<uint16_t> proxy_owner;

    void push(Fiber* f) {
        f->state = READY;
        runq[rq_tail] = f;
        rq_tail = rq_tail + 1 == runq.size() ? 0 : rq_tail + 1;
    }
    Fiber* pop() {
        if (rq_head == rq_tail) return nullptr;
        Fiber* f = runq[rq_head];
        rq_head = rq_head + 1 == runq.size() ? 0 : rq_head + 1;
        return f;
    }
    void push_front(Fiber* f) {
        f->state = READY;
        rq_head = rq_head == 0 ? runq.size() - 1 : rq_head - 1;
        runq[rq_head] = f;
    }
    // shuffle: at the start of the block and of every barrier phase, half the time one warp is
    // drawn to run ahead: it is queued first, and its lanes go to the FRONT of the queue after
    // each of its collectives, so it reaches the next barrier (or its end) before the others go
    // on. Without it the queue's round-robin keeps the warps in step, which hides races between
    // one warp's late reads and another's early writes of the next use of a buffer.
    void draw_greedy_warp() {
        const uint64_t r = mix64(sched_seed ^ mix64(0x6772656564ull + bar_gen));
        const unsigned nw = (nthreads + 31) / 32;
        greedy_warp = schedule == SCHED_SHUFFLE && nw > 1 && (r & 1) ? (int)((r >> 8) % nw) : -1;
    }
    // Put `fs` in the launch's schedule order (reverse, or shuffle; `salt` varies the draw).
    void arrange(std::vector<Fiber*>& fs, uint64_t salt) {
        if (schedule == SCHED_REVERSE) {
            std::sort(fs.begin(), fs.end(), [](const Fiber* a, const Fiber* b) { return a->linear > b->linear; });
        } else if (schedule == SCHED_SHUFFLE) {
            uint64_t r = mix64(sched_seed ^ mix64(salt)) | 1;
            for (size_t i = fs.size(); i > 1; i--) {  // Fisher-Yates, xorshift64* draws
                r ^= r >> 12;
                r ^= r << 25;
                r ^= r >> 27;
                const uint64_t x = (r * 0x2545f4914f6cdd1dull) >> 32;
                std::swap(fs[i - 1], fs[(size_t)((x * i) >> 32)]);
            }
        }
    }
    // Queue `fs` in schedule order, the warp that runs ahead (if any) first.
    void push_ordered(std::vector<Fiber*>& fs, uint64_t salt) {
        arrange(fs, salt);
        if (greedy_warp >= 0)  // two passes: no temporary buffer at every barrier
            for (Fiber* f : fs)
                if ((int)f->warp == greedy_warp) push(f);
        for (Fiber* f : fs)
            if ((int)f->warp != greedy_warp) push(f);
    }
    void ensure(unsigned n) {
        if (!smem_buf) {
            smem_buf = static_cast<unsigned char*>(aligned_alloc(128, RF_SIM_MAX_DYN_SMEM + 128));
            if (!smem_buf) { perror("rf_sim: dynamic smem allocation"); abort(); }
        }
        if (stack_size == 0) stack_size = stack_bytes();
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        while (stacks.size() < n) {
            void* m = mmap(nullptr, stack_size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) { perror("rf_sim: fiber stack mmap"); abort(); }
            mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
            stacks.push_back(static_cast<unsigned char*>(m) + page);
        }
        if (fibers.size() < n) fibers.resize(n);
        if (runq.size() < n + 1) runq.assign(n + 1, nullptr);
        if (warps.size() < (n + 31) / 32) warps.resize((n + 31) / 32);
        bar_waiters.reserve(n + 1);
        order.reserve(n);
    }
};

inline thread_local Worker* tls_worker = nullptr;

std::mutex g_pool_mu;
std::vector<Worker*> g_pool;
std::atomic<int> g_threads{0};

int default_threads() {
    static const int v = [] {
        const char* e = getenv("RF_SIM_THREADS");
        int n = e ? atoi(e) : 2;
        return n < 1 ? 1 : (n > 256 ? 256 : n);
    }();
    return v;
}

Worker* acquire_worker() {
    {
        std::lock_guard<std::mutex> g(g_pool_mu);
        if (!g_pool.empty()) {
            Worker* w = g_pool.back();
            g_pool.pop_back();
            return w;
        }
    }
    return new Worker();
}
void release_worker(Worker* w) {
    std::lock_guard<std::mutex> g(g_pool_mu);
    g_pool.push_back(w);
}

// ---- generic -> async proxy tracking ---------------------------------------------------------------
// The tensor cores read wgmma operands through the async proxy; a thread's ordinary stores and
// cp.async copies (the generic proxy) become visible to it only after that thread executes
// fence.proxy.async (PTX ISA, "Proxies"; the fence must come before the barrier that orders the
// write before the wgmma). Kernel code has no hook on ordinary stores, but a fiber runs alone
// until it switches away, so every byte of dynamic smem that changed since the last attribution
// was written by the running fiber: it is attributed at each switch, at the fiber's fences and
// at its wgmma issues. A write that leaves a byte's value unchanged is invisible here, and
// harmless (the async proxy sees the same value either way).
void proxy_note_writes(Worker* w, Fiber* me) {
    const unsigned char* s = w->smem;
    unsigned char* snap = w->proxy_snap.data();
    const size_t n = w->smem_size;
    const uint16_t id = (uint16_t)(me->linear + 1);
    for (size_t i = 0; i < n; i += 64) {
        const size_t len = n - i < 64 ? n - i : 64;
        if (memcmp(s + i, snap + i, len) == 0) continue;
        for (size_t j = i; j < i + len; j++) {
            if (s[j] == snap[j]) continue;
            snap[j] = s[j];
            if (w->proxy_owner[j] != id) {
                w->proxy_owner[j] = id;
                me->unfenced.push_back((uint32_t)j);
            }
        }
    }
}

// ---- switching (with ASan annotations) --------------------------------------------------------
inline void switch_to(Ctx* from, Worker* w, Fiber* to, bool from_dies) {
#ifdef RF_SIM_ASAN
    void* fake = nullptr;
    const void* lo = to ? (const void*)w->stacks[to->linear] : w->sched_lo;
    const size_t sz = to ? w->stack_size : w->sched_size;
    __sanitizer_start_switch_fiber(from_dies ? nullptr : &fake, lo, sz);
#else
    (void)from_dies;
#endif
    w->cur = to;
    tls_fiber = to;
    if (to) to->state = RUNNING;
    ctx_switch_raw(from, to ? &to->ctx : &w->sched);
#ifdef RF_SIM_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// The current fiber blocks (or died): run the next runnable fiber, or go back to the scheduler.
inline void switch_away(Worker* w, Fiber* me, bool dies) {
    if (w->proxy) proxy_note_writes(w, me);
    Fiber* next = w->L->abort.load(std::memory_order_relaxed) ? nullptr : w->pop();
    switch_to(&me->ctx, w, next, dies);
}

// The current fiber, already queued, lets the queue's head run (which may be itself).
inline void yield_queued(Worker* w, Fiber* me) {
    Fiber* next = w->L->abort.load(std::memory_order_relaxed) ? nullptr : w->pop();
    if (next == me) {
        me->state = RUNNING;
        return;
    }
    if (w->proxy) proxy_note_writes(w, me);
    switch_to(&me->ctx, w, next, false);
}

std::string where(Worker* w, const Fiber* f) {
    char b[256];
    snprintf(b, sizeof b, "kernel '%s', block (%u,%u,%u), thread (%u,%u,%u): ", w->kname, w->bid.x, w->bid.y, w->bid.z,
             f ? f->tid.x : 0, f ? f->tid.y : 0, f ? f->tid.z : 0);
    return b;
}

const char* op_name(int op) {
    switch (op) {
        case W_SYNC: return "__syncwarp";
        case W_SHFL_IDX: return "__shfl_sync";
        case W_SHFL_UP: return "__shfl_up_sync";
        case W_SHFL_DOWN: return "__shfl_down_sync";
        case W_SHFL_XOR: return "__shfl_xor_sync";
        case W_BALLOT: return "__ballot_sync";
        case W_ANY: return "__any_sync";
        case W_ALL: return "__all_sync";
        case W_CALL: return "warp-wide instruction";
    }
    return "?";
}

// Land, in issue order, this thread's copies whose group index is below `limit` (~0u: all,
// including uncommitted ones).
void cp_complete(Fiber* me, unsigned limit) {
    size_t keep = 0;
    for (size_t i = 0; i < me->cp.size(); i++) {
        PendingCopy& c = me->cp[i];
        if (limit == ~0u || c.group < limit) memcpy(c.dst, c.data, 16);
        else me->cp[keep++] = c;
    }
    me->cp.resize(keep);
}

[[noreturn]] void fiber_exit(Worker* w, Fiber* me) {
    const unsigned bit = 1u << me->lane;
    Warp& wp = w->warps[me->warp];
    if (w->bar_arrived > 0)
        fail("barrier not reached by every thread of block (%u,%u,%u) in kernel %s: this thread exited while %u "
             "thread(s) wait at __syncthreads",
             w->bid.x, w->bid.y, w->bid.z, w->kname, w->bar_arrived);
    for (unsigned m = wp.pending; m; m &= m - 1) {
        const unsigned j = __builtin_ctz(m);
        if (wp.lane[j].mask & bit)
            fail("lane %u of warp %u exited while lane %u waits for it in %s (mask 0x%08x)", me->lane, me->warp, j,
                 wp.lane[j].name ? wp.lane[j].name : op_name(wp.lane[j].op), wp.lane[j].mask);
    }
    if (!me->wg.empty())
        fail("exited with %zu wgmma.mma_async operation(s) not yet waited for (wgmma.wait_group): their "
             "accumulators and shared memory still belong to the tensor cores",
             me->wg.size());
    cp_complete(me, ~0u);  // copies still in flight land (nothing can wait for them any more)
    me->state = EXITED;
    wp.exited |= bit;
    w->live--;
    if (w->exited_min_gen > w->bar_gen) {
        w->exited_min_gen = w->bar_gen;
        w->first_exited = me->tid;
    }
    switch_away(w, me, true);
    __builtin_trap();  // an exited fiber is never resumed
}

void fiber_main() {
#ifdef RF_SIM_ASAN
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    Worker* w = tls_worker;
    w->L->k->invoke(w->L->args);
    fiber_exit(w, w->cur);
}

void run_block(Worker* w, uint64_t b) {
    Launch* L = w->L;
    const unsigned bx = L->block.x, by = L->block.y, bz = L->block.z, n = bx * by * bz;
    w->bid = uint3{(unsigned)(b % L->grid.x), (unsigned)((b / L->grid.x) % L->grid.y),
                   (unsigned)(b / ((uint64_t)L->grid.x * L->grid.y))};
    w->nthreads = w->live = n;
    w->bar_arrived = w->bar_gen = w->bar_count = 0;
    w->exited_min_gen = ~0u;
    w->aborted = false;
    w->rq_head = w->rq_tail = 0;
    w->bar_waiters.clear();
    w->shared_poisoned.clear();
    w->proxy = false;
#ifdef RF_SIM_ASAN
    if (w->asan_dirty) {  // abandoned fibers left poisoned frames on their stacks
        for (unsigned i = 0; i < n; i++) __asan_unpoison_memory_region(w->stacks[i], w->stack_size);
        w->asan_dirty = false;
    }
#endif
    unsigned i = 0;
    for (unsigned z = 0; z < bz; z++)
        for (unsigned y = 0; y < by; y++)
            for (unsigned x = 0; x < bx; x++, i++) {
                Fiber& f = w->fibers[i];
                f.tid = uint3{x, y, z};
                f.linear = i;
                f.warp = i >> 5;
                f.lane = i & 31;
                f.cp.clear();
                f.cp_committed = 0;
                f.wg.clear();
                f.wg_committed = 0;
                f.unfenced.clear();
                ctx_init(&f.ctx, w->stacks[i], w->stack_size);
                if (w->schedule == SCHED_FORWARD) w->push(&f);
            }
    if (w->schedule != SCHED_FORWARD) {
        w->sched_seed = mix64(name_hash(w->kname) ^ mix64(b));
        w->draw_greedy_warp();
        w->order.clear();
        for (unsigned k = 0; k < n; k++) w->order.push_back(&w->fibers[k]);
        w->push_ordered(w->order, ~0ull);
    }
    const unsigned nw = (n + 31) / 32;
    for (unsigned k = 0; k < nw; k++) {
        w->warps[k].pending = 0;
        w->warps[k].collectives = 0;
        const unsigned lanes = n - k * 32 >= 32 ? 32 : n - k * 32;
        w->warps[k].exited = lanes == 32 ? 0u : ~((1u << lanes) - 1);
    }
    if (w->smem_size) memset(w->smem, 0xff, w->smem_size);  // poison: NaN as f32/bf16, -1 as int

    while (!w->aborted && !L->abort.load(std::memory_order_relaxed)) {
        Fiber* f = w->pop();
        if (!f) break;
        switch_to(&w->sched, w, f, false);
    }
    w->cur = nullptr;
    tls_fiber = nullptr;
    if (w->aborted || L->abort.load(std::memory_order_relaxed)) {
        w->asan_dirty = true;
        return;
    }
    if (w->live > 0) {  // nobody runnable but threads left: deadlock
        unsigned at_bar = 0, at_warp = 0;
        const Fiber* ex = nullptr;
        for (unsigned k = 0; k < n; k++) {
            const Fiber& f = w->fibers[k];
            if (f.state == AT_BARRIER) at_bar++;
            if (f.state == AT_WARP) {
                at_warp++;
                if (!ex) ex = &f;
            }
        }
        std::string m = where(w, ex);
        char buf[512];
        if (ex) {
            const Lane& ln = w->warps[ex->warp].lane[ex->lane];
            const unsigned missing = ln.mask & ~w->warps[ex->warp].pending;
            snprintf(buf, sizeof buf,
                     "deadlock: %u thread(s) wait at __syncthreads and %u in warp collectives that cannot complete "
                     "(this thread waits in %s with mask 0x%08x; lanes 0x%08x of warp %u never arrived)",
                     at_bar, at_warp, op_name(ln.op), ln.mask, missing, ex->warp);
        } else {
            snprintf(buf, sizeof buf, "barrier not reached by every thread of block (%u,%u,%u) in kernel %s: %u thread(s) wait",
                     w->bid.x, w->bid.y, w->bid.z, w->kname, at_bar);
        }
        L->set_error("rf_sim: " + m + buf);
        w->asan_dirty = true;
    }
}

void worker_main(Launch* L) {
    Worker* w = acquire_worker();
    Worker* prev_w = tls_worker;
    BlockPub* prev_b = tls_block;
    FiberPub* prev_f = tls_fiber;
    tls_worker = w;
    tls_block = w;
    w->L = L;
    w->gdim = L->grid;
    w->bdim = L->block;
    w->kname = L->k->name ? L->k->name : "?";
    w->schedule = L->schedule;
    w->cp_async = L->cp_async;
    const unsigned n = L->block.x * L->block.y * L->block.z;
    w->ensure(n);
    w->smem = w->smem_buf;
    w->smem_size = L->dyn;
#ifdef RF_SIM_ASAN
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        void* lo;
        size_t sz;
        pthread_attr_getstack(&attr, &lo, &sz);
        w->sched_lo = lo;
        w->sched_size = sz;
        pthread_attr_destroy(&attr);
    }
#endif
    while (!L->abort.load(std::memory_order_relaxed)) {
        const uint64_t b = L->next.fetch_add(1, std::memory_order_relaxed);
        if (b >= L->nblocks) break;
        run_block(w, b);
    }
    w->L = nullptr;
    tls_worker = prev_w;
    tls_block = prev_b;
    tls_fiber = prev_f;
    release_worker(w);
}

// ---- faults inside kernels -------------------------------------------------------------------------
// Simulator buffers end at a guard page (src/backend/gpu/sim.rs), so a kernel that runs past the
// end of one faults at the access. The handler says which kernel, block and thread did it, then
// restores the previous disposition and returns: the access faults again and that handler (Rust's
// stack-overflow check, or the default: terminate) takes over. Not installed under ASan, which
// reports faults itself.
#ifndef RF_SIM_ASAN
struct sigaction g_prev_segv, g_prev_bus;

void on_fault(int sig, siginfo_t* si, void*) {
    Worker* w = tls_worker;
    if (w && w->cur) {
        const Fiber* f = w->cur;
        char b[512];
        const int n = snprintf(b, sizeof b,
                               "rf_sim: %s at address %p in kernel '%s', block (%u,%u,%u), thread (%u,%u,%u): an access "
                               "to unmapped memory (every simulator buffer ends at a guard page: past the end of one, "
                               "or a wild pointer)\n",
                               sig == SIGBUS ? "SIGBUS" : "SIGSEGV", si ? si->si_addr : nullptr, w->kname, w->bid.x,
                               w->bid.y, w->bid.z, f->tid.x, f->tid.y, f->tid.z);
        if (n > 0) {
            ssize_t ignored = write(2, b, (size_t)(n < (int)sizeof b ? n : (int)sizeof b - 1));
            (void)ignored;
        }
    }
    sigaction(sig, sig == SIGBUS ? &g_prev_bus : &g_prev_segv, nullptr);
}

#endif

void install_fault_handler() {
#ifndef RF_SIM_ASAN
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_prev_segv);
        sigaction(SIGBUS, &sa, &g_prev_bus);
    });
#endif
}

}  // namespace

// ---- called from kernel code --------------------------------------------------------------------
void fail(const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    Worker* w = tls_worker;
    if (!w || !w->cur) {
        fprintf(stderr, "rf_sim: error outside of a simulated kernel: %s\n", msg);
        abort();
    }
    Fiber* me = w->cur;
    w->L->set_error("rf_sim: " + where(w, me) + msg);
    w->aborted = true;
    me->state = EXITED;
    switch_to(&me->ctx, w, nullptr, true);
    __builtin_trap();  // never resumed
}

void shared_poison_once(void* p, size_t bytes) {
    Worker* w = tls_worker;
    for (void* q : w->shared_poisoned)
        if (q == p) return;
    w->shared_poisoned.push_back(p);
    memset(p, 0xff, bytes);
}

void cp_async16(unsigned char* dst, const unsigned char* src) {
    Worker* w = tls_worker;
    if (w->cp_async == CP_ISSUE) {
        memcpy(dst, src, 16);
        return;
    }
    Fiber* me = w->cur;
    PendingCopy c;
    c.dst = dst;
    c.group = me->cp_committed;
    memcpy(c.data, src, 16);
    me->cp.push_back(c);
    memset(dst, 0xff, 16);
}

void cp_async_commit() { tls_worker->cur->cp_committed++; }

void cp_async_wait(int n) {
    Fiber* me = tls_worker->cur;
    if (me->cp.empty()) return;
    if (n < 0) {
        cp_complete(me, ~0u);
        return;
    }
    // wait_group n: every committed group but the newest n is complete; uncommitted copies are not
    // waited for (PTX ISA, cp.async.wait_group).
    if (me->cp_committed > (unsigned)n) cp_complete(me, me->cp_committed - (unsigned)n);
}

// ---- wgmma (kernels/common/rf_wgmma.cuh) ----
// A decoded shared-memory matrix descriptor (no swizzle, base offset 0: anything else fails).
struct MmaDesc {
    unsigned start, lbo, sbo;
    const char* which;
};
static MmaDesc wgmma_desc(uint64_t desc, const char* which) {
    const unsigned mode = (unsigned)(desc >> 62), base_off = (unsigned)((desc >> 49) & 7);
    if (mode != 0 || base_off != 0)
        fail("wgmma: descriptor of %s has swizzle mode %u, base offset %u; the simulator models only mode 0 (no "
             "swizzle) with base offset 0",
             which, mode, base_off);
    return MmaDesc{(unsigned)(desc & 0x3FFF) << 4, (unsigned)((desc >> 16) & 0x3FFF) << 4,
                   (unsigned)((desc >> 32) & 0x3FFF) << 4, which};
}
static const unsigned char* wgmma_at(Worker* w, const MmaDesc& d, size_t off, size_t bytes) {
    if (off + bytes > w->smem_size)
        fail("wgmma: %s reaches byte %zu of dynamic shared memory, but the launch has %zu (start %u, LBO %u, SBO %u)",
             d.which, off + bytes, w->smem_size, d.start, d.lbo, d.sbo);
    return w->smem + off;
}
// K-major: byte kb (0..31) of row r. MN-major 16-bit: element (n, k) (2 bytes).
static const unsigned char* kmajor(Worker* w, const MmaDesc& d, int r, int kb) {
    return wgmma_at(w, d, (size_t)d.start + (r % 8) * 16 + (size_t)(r / 8) * d.sbo + (size_t)(kb / 16) * d.lbo + kb % 16, 1);
}
static const unsigned char* mnmajor16(Worker* w, const MmaDesc& d, int n, int k) {
    return wgmma_at(w, d, (size_t)d.start + 2 * (n % 8) + (size_t)(n / 8) * d.sbo + (k % 8) * 16 + (size_t)(k / 8) * d.lbo, 2);
}

// The operand bytes this thread's part of `op` reads, in a fixed order, to f(address, "A" or
// "B"): A rows 16wq + g (+8), B rows (s8) or columns (bf16, MN-major) 8j + 2t (+1).
template <class F> static void wgmma_operands(Worker* w, const Fiber* me, const PendingMma& op, F&& f) {
    const unsigned wq = (me->linear % 128) / 32, g = me->lane >> 2, t = me->lane & 3;
    const MmaDesc a = wgmma_desc(op.da, "A"), b = wgmma_desc(op.db, "B");
    for (int h = 0; h < 2; h++)
        for (int kb = 0; kb < 32; kb++) f(kmajor(w, a, (int)(16 * wq + g + 8 * h), kb), "A");
    for (int j = 0; j < op.n / 8; j++)
        for (int c = 0; c < 2; c++) {
            const int col = (int)(8 * j + 2 * t + c);
            for (int kb = 0; kb < 32; kb++)
                f(op.kind == MMA_S8 ? kmajor(w, b, col, kb) : mnmajor16(w, b, col, kb / 2) + kb % 2, "B");
        }
}

static uint64_t wgmma_operand_hash(Worker* w, const Fiber* me, const PendingMma& op) {
    uint64_t h = 0xcbf29ce484222325ull;
    wgmma_operands(w, me, op, [&](const unsigned char* p, const char*) { h = (h ^ *p) * 0x100000001b3ull; });
    return h;
}

static float bf16_bits(const unsigned char* p) {
    const uint32_t u = (uint32_t)(p[0] | (p[1] << 8)) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void wgmma_complete(Fiber* me, unsigned limit) {
    Worker* w = tls_worker;
    const unsigned wq = (me->linear % 128) / 32, g = me->lane >> 2, t = me->lane & 3;
    size_t keep = 0;
    for (size_t i = 0; i < me->wg.size(); i++) {
        PendingMma& op = me->wg[i];
        if (op.group >= limit) {
            me->wg[keep++] = op;
            continue;
        }
        // The hardware may read the operands at any time from issue to completion: a write in
        // between (a stage refilled early) is a race, whatever the bytes read at the wait give.
        if (wgmma_operand_hash(w, me, op) != op.operands)
            fail("wgmma: shared memory read by a wgmma.mma_async (batch %u) changed between its issue and the "
                 "wgmma.wait_group that completes it",
                 op.group);
        const MmaDesc a = wgmma_desc(op.da, "A"), b = wgmma_desc(op.db, "B");
        for (int j = 0; j < op.n / 8; j++)
            for (int v = 0; v < 4; v++) {
                const int row = (int)(16 * wq + g + 8 * (v >> 1)), col = (int)(8 * j + 2 * t + (v & 1));
                if (op.kind == MMA_S8) {
                    int* d = static_cast<int*>(op.d);
                    unsigned acc = op.accumulate ? (unsigned)d[4 * j + v] : 0u;
                    for (int kb = 0; kb < 32; kb++)
                        acc += (unsigned)((int8_t)*kmajor(w, a, row, kb) * (int8_t)*kmajor(w, b, col, kb));
                    d[4 * j + v] = (int)acc;  // int32 wrap-around, as the hardware's s32
                } else {
                    // bf16 products are exact in f32; their sum is rounded in k order, then added.
                    float* d = static_cast<float*>(op.d);
                    float sum = 0.0f;
                    for (int k = 0; k < 16; k++) sum += bf16_bits(kmajor(w, a, row, 2 * k)) * bf16_bits(mnmajor16(w, b, col, k));
                    d[4 * j + v] = (op.accumulate ? d[4 * j + v] : 0.0f) + sum;
                }
            }
    }
    me->wg.resize(keep);
}

void wgmma_fence() {}

void track_async_proxy() {
    Worker* w = tls_worker;
    if (w->proxy) return;  // another thread of this block started it (before any kernel code ran)
    w->proxy = true;
    w->proxy_snap.assign(w->smem, w->smem + w->smem_size);
    w->proxy_owner.assign(w->smem_size, 0);
}

void fence_proxy_async() {
    Worker* w = tls_worker;
    if (!w->proxy) return;
    Fiber* me = w->cur;
    proxy_note_writes(w, me);
    const uint16_t id = (uint16_t)(me->linear + 1);
    for (uint32_t j : me->unfenced)
        if (w->proxy_owner[j] == id) w->proxy_owner[j] = 0;
    me->unfenced.clear();
}

static void wgmma_issue(void* d, int n, int kind, uint64_t da, uint64_t db, int accumulate) {
    Worker* w = tls_worker;
    Fiber* me = w->cur;
    if (w->nthreads % 128 != 0)
        fail("wgmma.mma_async: the block has %u threads, not a whole number of warpgroups (128)", w->nthreads);
    if (!w->proxy)
        fail("wgmma.mma_async in a kernel the simulator does not track proxies for: register it with "
             "RF_SIM_KERNEL_ASYNC_PROXY (build.rs does so for files that start with `// recforge-arch: sm_90a`)");
    PendingMma op{d, n, kind, da, db, accumulate, me->wg_committed, 0};
    proxy_note_writes(w, me);
    wgmma_operands(w, me, op, [&](const unsigned char* p, const char* which) {
        const size_t off = (size_t)(p - w->smem);
        const uint16_t o = w->proxy_owner[off];
        if (o == 0) return;
        const uint3 t = w->fibers[o - 1u].tid;
        fail("wgmma.mma_async reads byte %zu of dynamic shared memory (operand %s), which thread (%u,%u,%u) wrote "
             "through the generic proxy (an ordinary store or a cp.async) with no fence.proxy.async after the write: "
             "the tensor cores (async proxy) may not see it; the writer needs rf_fence_proxy_async() after its "
             "writes and before the barrier that precedes the wgmma",
             off, which, t.x, t.y, t.z);
    });
    op.operands = wgmma_operand_hash(w, me, op);
    me->wg.push_back(op);
}

void wgmma_s8(int* d, int n, uint64_t da, uint64_t db, int accumulate) { wgmma_issue(d, n, MMA_S8, da, db, accumulate); }

void wgmma_bf16_tb(float* d, int n, uint64_t da, uint64_t db, int accumulate) {
    wgmma_issue(d, n, MMA_BF16_TB, da, db, accumulate);
}

void wgmma_commit() { tls_worker->cur->wg_committed++; }

void wgmma_wait(int n) {
    Fiber* me = tls_worker->cur;
    if (me->wg.empty()) return;
    if (me->wg_committed > (unsigned)n) wgmma_complete(me, me->wg_committed - (unsigned)n);
}

int syncthreads_op(int op, int pred) {
    Worker* w = tls_worker;
    Fiber* me = w->cur;
    if (w->exited_min_gen <= w->bar_gen)
        fail("barrier not reached by every thread of block (%u,%u,%u) in kernel %s: thread (%u,%u,%u) exited "
             "before __syncthreads #%u, which this thread reached",
             w->bid.x, w->bid.y, w->bid.z, w->kname, w->first_exited.x, w->first_exited.y, w->first_exited.z,
             w->bar_gen + 1);
    w->bar_count += pred != 0;
    if (++w->bar_arrived == w->live) {  // last one: release everybody
        w->bar_res_count = w->bar_count;
        w->bar_res_n = w->bar_arrived;
        w->bar_count = 0;
        w->bar_arrived = 0;
        w->bar_gen++;
        if (w->schedule == SCHED_FORWARD) {
            for (Fiber* f : w->bar_waiters) w->push(f);
            w->bar_waiters.clear();
        } else {
            w->bar_waiters.push_back(me);
            w->draw_greedy_warp();
            w->push_ordered(w->bar_waiters, w->bar_gen);
            w->bar_waiters.clear();
            yield_queued(w, me);
        }
    } else {
        me->state = AT_BARRIER;
        w->bar_waiters.push_back(me);
        switch_away(w, me, false);
    }
    switch (op) {
        case 1: return (int)w->bar_res_count;
        case 2: return w->bar_res_count == w->bar_res_n;
        case 3: return w->bar_res_count != 0;
    }
    return 0;
}

namespace {
uint64_t warp_collective(int op, unsigned mask, uint64_t value, int b, int width, warp_fn fn, const char* name);
}
uint64_t warp_op(int op, unsigned mask, uint64_t value, int b, int width) {
    return warp_collective(op, mask, value, b, width, nullptr, nullptr);
}
void warp_call(unsigned mask, void* io, warp_fn fn, const char* name) {
    (void)warp_collective(W_CALL, mask, (uint64_t)(uintptr_t)io, 0, 32, fn, name);
}
namespace {
uint64_t warp_collective(int op, unsigned mask, uint64_t value, int b, int width, warp_fn fn, const char* name) {
    Worker* w = tls_worker;
    Fiber* me = w->cur;
    Warp& wp = w->warps[me->warp];
    const unsigned L = me->lane, bit = 1u << L;
    const char* nm = name ? name : op_name(op);
    if (!(mask & bit)) fail("%s: mask 0x%08x does not include the calling lane %u", nm, mask, L);
    if (mask & wp.exited)
        fail("%s: mask 0x%08x names lane(s) 0x%08x of warp %u that exited (or do not exist in this block)", nm,
             mask, mask & wp.exited, me->warp);
    if (op >= W_SHFL_IDX && op <= W_SHFL_XOR && (width < 1 || width > 32 || (width & (width - 1))))
        fail("%s: width %d is not a power of two in [1, 32]", op_name(op), width);
    // Every lane named in the mask must execute the same collective with the same mask.
    if (wp.pending == 0) {
        wp.gmask = mask;
        wp.gop = op;
        wp.gfn = fn;
        wp.uniform = true;
    } else if (!(wp.uniform && mask == wp.gmask && op == wp.gop && fn == wp.gfn)) {
        for (unsigned m = wp.pending; m; m &= m - 1) {
            const unsigned j = __builtin_ctz(m);
            const Lane& o = wp.lane[j];
            if (((mask >> j) & 1 || (o.mask & bit)) && (o.mask != mask || o.op != op || o.fn != fn))
                fail("warp %u: lane %u is in %s with mask 0x%08x while lane %u waits in %s with mask 0x%08x", me->warp, L,
                     nm, mask, j, o.name ? o.name : op_name(o.op), o.mask);
        }
        wp.uniform = false;  // disjoint groups in flight
    }
    Lane& me_l = wp.lane[L];
    me_l.mask = mask;
    me_l.op = op;
    me_l.b = b;
    me_l.width = width;
    me_l.val = value;
    me_l.fn = fn;
    me_l.name = name;
    wp.pending |= bit;
    if ((wp.pending & mask) != mask) {
        me->state = AT_WARP;
        switch_away(w, me, false);
        return me_l.res;
    }
    // Last lane of the group: compute every lane's result.
    switch (op) {
        case W_SYNC: break;
        case W_CALL: {
            void* io[32];
            for (int j = 0; j < 32; j++) io[j] = (mask >> j) & 1 ? (void*)(uintptr_t)wp.lane[j].val : nullptr;
            fn(io, mask);
            break;
        }
        case W_BALLOT:
        case W_ANY:
        case W_ALL: {
            unsigned ballot = 0;
            for (unsigned m = mask; m; m &= m - 1) {
                const unsigned j = __builtin_ctz(m);
                if (wp.lane[j].val) ballot |= 1u << j;
            }
            const uint64_t r = op == W_BALLOT ? ballot : op == W_ANY ? ballot != 0 : ballot == mask;
            for (unsigned m = mask; m; m &= m - 1) wp.lane[__builtin_ctz(m)].res = r;
            break;
        }
        default: {
            // PTX ISA, "shfl.sync": c = ((32 - width) << 8) | clamp, clamp = 0 for .up, 0x1f otherwise
            // (as the CUDA intrinsics encode it); segmask = c[12:8].
            for (unsigned m = mask; m; m &= m - 1) {
                const int l = (int)__builtin_ctz(m);
                const Lane& ln = wp.lane[l];
                const int segmask = (32 - ln.width) & 31, cval = op == W_SHFL_UP ? 0 : 31;
                const int bval = ln.b & 31;
                const int maxLane = (l & segmask) | (cval & ~segmask), minLane = l & segmask;
                int j;
                bool pval;
                switch (op) {
                    case W_SHFL_UP: j = l - bval; pval = j >= maxLane; break;
                    case W_SHFL_DOWN: j = l + bval; pval = j <= maxLane; break;
                    case W_SHFL_XOR: j = l ^ bval; pval = j <= maxLane; break;
                    default: j = minLane | (bval & ~segmask); pval = j <= maxLane; break;
                }
                if (!pval) j = l;
                if (!((mask >> j) & 1))
                    fail("%s: lane %d reads lane %d, which is not in the mask 0x%08x (undefined in CUDA)", op_name(op), l,
                         j, mask);
                wp.lane[l].res = wp.lane[j].val;
            }
        }
    }
    wp.pending &= ~mask;
    if (w->schedule == SCHED_FORWARD) {
        for (unsigned m = mask & ~bit; m; m &= m - 1) w->push(&w->fibers[me->warp * 32 + __builtin_ctz(m)]);
        return me_l.res;
    }
    std::vector<Fiber*>& lanes = w->order;
    lanes.clear();
    for (unsigned m = mask; m; m &= m - 1) lanes.push_back(&w->fibers[me->warp * 32 + __builtin_ctz(m)]);
    w->arrange(lanes, ((uint64_t)me->warp << 32) ^ ++wp.collectives);
    if ((int)me->warp == w->greedy_warp) {  // runs on ahead of the queued warps
        for (size_t i = lanes.size(); i-- > 0;) w->push_front(lanes[i]);
    } else {
        for (Fiber* f : lanes) w->push(f);
    }
    yield_queued(w, me);
    return me_l.res;
}
}  // namespace

}  // namespace rf_sim

// ---- C ABI ----------------------------------------------------------------------------------------
extern "C" int rf_sim_set_threads(int n) {
    int prev = rf_sim::g_threads.exchange(n > 0 ? n : 0);
    return prev > 0 ? prev : rf_sim::default_threads();
}

extern "C" int rf_sim_set_schedule(int mode) {
    const int prev = rf_sim::g_schedule.exchange(mode >= 0 && mode <= 2 ? mode : -1);
    return prev >= 0 ? prev : rf_sim::default_schedule();
}

extern "C" int rf_sim_set_cp_async(int mode) {
    const int prev = rf_sim::g_cp_async.exchange(mode >= 0 && mode <= 1 ? mode : -1);
    return prev >= 0 ? prev : rf_sim::default_cp_async();
}

extern "C" int rf_sim_launch(const rf_sim_kernel* k, rf_sim_dim3 grid, rf_sim_dim3 block, size_t dyn_smem_bytes,
                             void** args, char* err, size_t err_cap) {
    using namespace rf_sim;
    auto report = [&](const std::string& m) {
        if (err && err_cap) {
            size_t n = m.size() < err_cap - 1 ? m.size() : err_cap - 1;
            memcpy(err, m.data(), n);
            err[n] = 0;
        }
        return 1;
    };
    if (err && err_cap) err[0] = 0;
    if (!k || !k->invoke) return report("rf_sim: launch of a null kernel");
    const char* name = k->name ? k->name : "?";
    char b[512];
    const uint64_t nthreads = (uint64_t)block.x * block.y * block.z;
    if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z) {
        snprintf(b, sizeof b, "rf_sim: kernel '%s': invalid launch: grid (%u,%u,%u), block (%u,%u,%u) has a zero dimension",
                 name, grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return report(b);
    }
    if (nthreads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64) {
        snprintf(b, sizeof b,
                 "rf_sim: kernel '%s': invalid launch: block (%u,%u,%u) = %llu threads (limits: 1024 threads, x,y <= 1024, "
                 "z <= 64)",
                 name, block.x, block.y, block.z, (unsigned long long)nthreads);
        return report(b);
    }
    if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        snprintf(b, sizeof b, "rf_sim: kernel '%s': invalid launch: grid (%u,%u,%u) exceeds (2^31-1, 65535, 65535)", name,
                 grid.x, grid.y, grid.z);
        return report(b);
    }
    if (dyn_smem_bytes > RF_SIM_MAX_DYN_SMEM) {
        snprintf(b, sizeof b,
                 "rf_sim: kernel '%s': invalid launch: %zu bytes of dynamic shared memory requested, more than the "
                 "%u (227 KiB) an H100 (sm_90) block can have",
                 name, dyn_smem_bytes, (unsigned)RF_SIM_MAX_DYN_SMEM);
        return report(b);
    }
    Launch L;
    L.k = k;
    L.args = args;
    L.grid = dim3(grid.x, grid.y, grid.z);
    L.block = dim3(block.x, block.y, block.z);
    L.dyn = dyn_smem_bytes;
    L.nblocks = (uint64_t)grid.x * grid.y * grid.z;
    L.schedule = current_schedule();
    L.cp_async = current_cp_async();
    install_fault_handler();
    int nt = g_threads.load();
    if (nt <= 0) nt = default_threads();
    if ((uint64_t)nt > L.nblocks) nt = (int)L.nblocks;
    std::vector<std::thread> ts;
    for (int i = 1; i < nt; i++) ts.emplace_back(worker_main, &L);
    worker_main(&L);
    for (auto& t : ts) t.join();
    if (!L.err.empty()) return report(L.err);
    return 0;
}
