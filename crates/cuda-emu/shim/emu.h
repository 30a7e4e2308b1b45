// CPU stand-ins for the CUDA built-ins that cuda/*.cu use, so that emu.cpp can compile those
// files unchanged as C++.
//
// A block's threads are fibers on one OS thread (emu.cpp schedules them); `__syncthreads` and
// each half of a warp shuffle are points where a fiber yields. The scheduler checks that the
// whole block (or the whole warp) reaches each such point together, so a kernel that would
// deadlock or race on a GPU fails here with a message instead. Blocks run one after another,
// which makes `__shared__` variables plain statics.

#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

using std::sqrt;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

extern dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__

namespace emu {
enum class Sync { None, Block, Warp };
// Suspends the calling fiber at a synchronisation point of kind `s`.
void yield(Sync s);
// The 32 exchange slots of the calling thread's warp.
uint64_t* warp_slots();
// Ends the launch with `why` as its error; the calling fiber never resumes.
[[noreturn]] void fail(const char* why);
}  // namespace emu

inline void __syncthreads() { emu::yield(emu::Sync::Block); }

namespace emu {
// The value of `v` in lane `src` of the calling warp (all 32 lanes call it together); a
// lane outside the warp gives the caller's own value, as on the GPU.
template <typename T> T shuffle(unsigned mask, T v, unsigned src) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
    if (mask != 0xffffffffu) fail("the emulator only knows full-warp shuffles");
    const unsigned lane = threadIdx.x & 31u;
    uint64_t* slots = warp_slots();
    std::memcpy(&slots[lane], &v, sizeof(T));
    yield(Sync::Warp);
    T r = v;
    if (src < 32u) std::memcpy(&r, &slots[src], sizeof(T));
    yield(Sync::Warp);
    return r;
}
}  // namespace emu

template <typename T> T __shfl_down_sync(unsigned mask, T v, int delta) {
    return emu::shuffle(mask, v, (threadIdx.x & 31u) + (unsigned)delta);
}

template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return emu::shuffle(mask, v, (threadIdx.x & 31u) ^ (unsigned)lane_mask);
}

// Single-rounding arithmetic: the emulator is compiled without contraction, so these are the
// plain operations.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
