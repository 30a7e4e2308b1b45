// Runs the kernels of crates/kernels/src/*.cu on the CPU, for tests (crates/cuda-emu).
//
// The .cu files are included unchanged after emu.h, which stands in for the CUDA built-ins.
// `emu_launch` runs one launch: every block in turn, each block's threads as fibers
// (ucontext) on the calling OS thread, switched at `__syncthreads` and warp shuffles. After
// each round (every live fiber run to its next synchronisation point or its end) the
// scheduler checks that the block met at `__syncthreads` as a whole and each warp at its
// shuffle as a whole; otherwise the launch fails with a message.

#include "emu.h"

#include <signal.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "bn.cu"
#include "head.cu"
#include "pool.cu"
#include "sgd.cu"
#include "selftest.cu"

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
namespace {

constexpr size_t STACK = 64 * 1024;

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    bool done = false;
    Sync at = Sync::None;
};

ucontext_t scheduler;
std::vector<Fiber> fibers;
std::vector<uint64_t> slots;  // 32 per warp
unsigned current = 0;
void (*body)(void**) = nullptr;
void** params = nullptr;
std::string failure;
// The kernel running (null between launches), for the crash report.
const char* volatile running = nullptr;
struct sigaction before_segv, before_bus;

// A kernel that touches memory it may not (out of bounds, or a misaligned vector access, which
// the GPU also refuses) crashes the process; this says which kernel and block did it first.
// The previous handler (Rust's stack-overflow report, say) is put back and the faulting access
// runs again: outside a launch it is that handler's fault; inside, the process then ends.
void on_crash(int sig) {
    if (running) {
        char line[256];
        const int n = std::snprintf(line, sizeof line,
                                    "emulator: kernel %s crashed (signal %d) in block (%u, %u), "
                                    "thread %u: an access out of bounds or misaligned\n",
                                    running, sig, blockIdx.x, blockIdx.y, threadIdx.x);
        if (n > 0) (void)!write(2, line, (size_t)n);
        signal(sig, SIG_DFL);
        return;
    }
    sigaction(sig, sig == SIGSEGV ? &before_segv : &before_bus, nullptr);
}

void entry() {
    body(params);
    fibers[current].done = true;
    // uc_link returns to the scheduler.
}

// Runs one block; returns false (with `failure` set) when its threads did not meet at a
// synchronisation point together.
bool run_block(unsigned threads) {
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.get();
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, entry, 0);
        f.done = false;
        f.at = Sync::None;
    }
    // A thread that reaches __syncthreads waits there (other warps may still shuffle) until
    // every live thread has; one that ends while others wait means they never all meet.
    unsigned ended_while_waiting = 0;
    for (;;) {
        unsigned live = 0, waiting = 0, ended = 0;
        for (unsigned t = 0; t < threads; ++t) {
            Fiber& f = fibers[t];
            if (f.done) continue;
            if (f.at != Sync::Block) {
                current = t;
                threadIdx = dim3{t, 0, 0};
                f.at = Sync::None;
                swapcontext(&scheduler, &f.ctx);
                if (!failure.empty()) return false;
                if (f.done) {
                    ++ended;
                    continue;
                }
            }
            ++live;
            if (f.at == Sync::Block) ++waiting;
        }
        if (waiting > 0) ended_while_waiting += ended;
        if (live == 0) return true;
        if (waiting > 0 && (waiting == live || ended_while_waiting > 0)) {
            if (ended_while_waiting > 0) {
                failure = "__syncthreads reached by " + std::to_string(waiting) + " of " +
                          std::to_string(waiting + ended_while_waiting) + " live threads";
                return false;
            }
            for (unsigned t = 0; t < threads; ++t) fibers[t].at = Sync::None;
            continue;
        }
        for (unsigned w = 0; w * 32 < threads; ++w) {
            unsigned shuffling = 0;
            for (unsigned t = w * 32; t < threads && t < w * 32 + 32; ++t)
                shuffling += fibers[t].at == Sync::Warp;
            if (shuffling > 0 && shuffling != 32) {
                failure = "a shuffle reached by " + std::to_string(shuffling) +
                          " of the 32 lanes of warp " + std::to_string(w);
                return false;
            }
        }
    }
}

template <typename F> struct Signature;
template <typename... P> struct Signature<void (*)(P...)> {
    static constexpr size_t arity = sizeof...(P);
    static constexpr size_t sizes[sizeof...(P)] = {sizeof(P)...};
    template <size_t... I>
    static void call(void (*k)(P...), void** a, std::index_sequence<I...>) {
        k(*static_cast<P*>(a[I])...);
    }
};

struct Kernel {
    const char* module;
    const char* name;
    void (*invoke)(void**);
    size_t arity;
    const size_t* sizes;
};

#define KERNEL(M, K)                                                                      \
    Kernel {                                                                              \
        M, #K,                                                                            \
            [](void** a) {                                                                \
                using S = Signature<decltype(&K)>;                                        \
                S::call(&K, a, std::make_index_sequence<S::arity>{});                     \
            },                                                                            \
            Signature<decltype(&K)>::arity, Signature<decltype(&K)>::sizes                \
    }

#define BN_SET(NAME)                                                                      \
    KERNEL("bn", bn_stats_##NAME), KERNEL("bn", bn_grad_stats_##NAME),                    \
        KERNEL("bn", bn_apply_##NAME), KERNEL("bn", bn_grad_apply_##NAME),                \
        KERNEL("bn", bn_stats_cl_##NAME), KERNEL("bn", bn_grad_stats_cl_##NAME),          \
        KERNEL("bn", bn_apply_cl_##NAME), KERNEL("bn", bn_grad_apply_cl_##NAME)

#define HEAD_SET(NAME)                                                                    \
    KERNEL("head", pair_grid_##NAME), KERNEL("head", pair_grid_##NAME##v),               \
        KERNEL("head", pair_grid_rows_##NAME), KERNEL("head", pair_grid_cols_##NAME),     \
        KERNEL("head", ln_relu_fwd_##NAME), KERNEL("head", ln_relu_bwd_##NAME),           \
        KERNEL("head", ln_param_grad_##NAME), KERNEL("head", add_bias_##NAME),            \
        KERNEL("head", add_bias_##NAME##x4), KERNEL("head", col_sum_##NAME)

// Every kernel of the .cu files, with its file's name.
const Kernel KERNELS[] = {
    KERNEL("bn", bn_stats_finish),
    KERNEL("bn", bn_eval_stats),
    KERNEL("bn", bn_grad_finish),
    BN_SET(f32),
    BN_SET(f32x4),
    BN_SET(bf16),
    BN_SET(bf16x4),
    HEAD_SET(f32),
    HEAD_SET(bf16),
    KERNEL("head", ln_param_finish),
    KERNEL("head", col_sum_finish),
    KERNEL("head", cross_entropy_fwd),
    KERNEL("head", transpose_f32_f32),
    KERNEL("head", transpose_f32_bf16),
    KERNEL("head", transpose_bf16_f32),
    KERNEL("head", transpose_bf16_bf16),
    KERNEL("head", cross_entropy_bwd),
    KERNEL("pool", avg_pool_fwd_f32),
    KERNEL("pool", avg_pool_bwd_f32),
    KERNEL("pool", avg_pool_fwd_bf16),
    KERNEL("pool", avg_pool_bwd_bf16),
    KERNEL("pool", max_pool_fwd_f32),
    KERNEL("pool", max_pool_bwd_f32),
    KERNEL("pool", max_pool_fwd_bf16),
    KERNEL("pool", max_pool_bwd_bf16),
    KERNEL("sgd", sgd_step),
    KERNEL("sgd", sgd_step8),
    KERNEL("selftest", selftest_divergent_sync),
    KERNEL("selftest", selftest_partial_shuffle),
    KERNEL("selftest", selftest_warp_sum),
};

}  // namespace

void yield(Sync s) {
    fibers[current].at = s;
    swapcontext(&fibers[current].ctx, &scheduler);
}

uint64_t* warp_slots() { return &slots[(threadIdx.x / 32) * 32]; }

void fail(const char* why) {
    failure = why;
    swapcontext(&fibers[current].ctx, &scheduler);
    __builtin_unreachable();
}

}  // namespace emu

// Runs kernel `name` of file `module` (bn, head, pool, sgd; selftest for the emulator's own tests)
// on grid (gx, gy) of blocks of `bx` threads with the `n` arguments `args[i]` (each pointing
// at a value of `sizes[i]` bytes). Returns 0, or 1 with a message in `err` (at most `err_len`
// bytes, NUL-terminated).
extern "C" int emu_launch(const char* module, const char* name, unsigned gx, unsigned gy,
                          unsigned bx, void** args, const size_t* sizes, size_t n, char* err,
                          size_t err_len) {
    using namespace emu;
    // One launch at a time in the process: the scheduler, the built-in variables and the
    // kernels' __shared__ statics are global (test harnesses call from several threads).
    static std::mutex one_at_a_time;
    const std::lock_guard<std::mutex> hold(one_at_a_time);
    auto fail_with = [&](const std::string& why) {
        std::snprintf(err, err_len, "%s: %s", name, why.c_str());
        return 1;
    };
    const Kernel* k = nullptr;
    for (const Kernel& c : KERNELS)
        if (std::string(c.name) == name) k = &c;
    if (!k) return fail_with("no such kernel in the emulator");
    if (std::string(k->module) != module)
        return fail_with(std::string("lives in ") + k->module + ".cu, launched from " + module);
    if (n != k->arity)
        return fail_with("takes " + std::to_string(k->arity) + " arguments, given " +
                         std::to_string(n));
    for (size_t i = 0; i < n; ++i)
        if (sizes[i] != k->sizes[i])
            return fail_with("argument " + std::to_string(i) + " has " +
                             std::to_string(k->sizes[i]) + " bytes, given " +
                             std::to_string(sizes[i]));
    if (bx == 0 || bx > 1024 || gx == 0 || gy == 0) return fail_with("empty or oversized launch");
    static const bool handlers = [] {
        struct sigaction a = {};
        a.sa_handler = on_crash;
        sigemptyset(&a.sa_mask);
        sigaction(SIGSEGV, &a, &before_segv);
        sigaction(SIGBUS, &a, &before_bus);
        return true;
    }();
    (void)handlers;
    fibers.resize(bx);
    for (Fiber& f : fibers)
        if (!f.stack) f.stack.reset(new char[STACK]);
    slots.assign((bx + 31) / 32 * 32, 0);
    body = k->invoke;
    params = args;
    failure.clear();
    blockDim = dim3{bx, 1, 1};
    gridDim = dim3{gx, gy, 1};
    running = k->name;
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            blockIdx = dim3{x, y, 0};
            if (!run_block(bx)) {
                running = nullptr;
                return fail_with(failure);
            }
        }
    running = nullptr;
    return 0;
}
