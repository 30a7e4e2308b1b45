// The ResNet stem's 3×3 max-pooling with stride 2 and padding 1, forward and backward, NCHW;
// and the trunk's global average pooling (below).
//
// Why it exists: cuDNN's deterministic max-pooling backward took 1.2 ms per ResNet-50 step at
// batch 64 on an H100 (run 7 in docs/results), about 25 times what one pass over its data
// costs. Here the forward also records which of the nine window positions won (one byte per
// output), and the backward is a gather: each input sums the gradients of the (at most four)
// windows it won, so it is deterministic and writes every input once.
//
// Ties go to the first maximum in row-major window order and a NaN wins (PyTorch's rules);
// padding never wins. T is float or __nv_bfloat16; comparisons are in float. Indices are
// 32-bit where the tensor allows (I = int): with 64-bit divisions the backward of the ResNet-50
// stem at 100 images took 0.78 ms on an H100 (run 14), bound by the integer arithmetic.

#include <stdint.h>

#include "common.cuh"

namespace {

// One thread per output value of planes [planes, h, w] -> [planes, oh, ow].
template <typename T, typename I>
__device__ void pool_fwd(const T* x, T* y, uint8_t* arg, I planes, int h, int w, int oh, int ow) {
    const I k = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x;
    if (k >= planes * oh * ow) return;
    const I row = k / ow;
    const int ox = (int)(k - row * ow), oy = (int)(row % oh);
    const I plane = row / oh;
    const T* src = x + (long long)plane * h * w;
    float best = 0.f;
    int won = -1;
    for (int ky = 0; ky < 3; ++ky) {
        const int iy = 2 * oy - 1 + ky;
        if (iy < 0 || iy >= h) continue;
        for (int kx = 0; kx < 3; ++kx) {
            const int ix = 2 * ox - 1 + kx;
            if (ix < 0 || ix >= w) continue;
            const float v = to_f(src[iy * w + ix]);
            if (won < 0 || v > best || (v != v && best == best)) {
                best = v;
                won = ky * 3 + kx;
            }
        }
    }
    y[k] = from_f<T>(best);
    arg[k] = (uint8_t)won;
}

// One thread per input value: the sum of the output gradients of the windows it won.
template <typename T, typename I>
__device__ void pool_bwd(const T* dy, const uint8_t* arg, T* dx, I planes, int h, int w, int oh,
                         int ow) {
    const I k = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x;
    if (k >= planes * h * w) return;
    const I row = k / w;
    const int ix = (int)(k - row * w), iy = (int)(row % h);
    const I plane = row / h;
    const long long base = (long long)plane * oh * ow;
    float sum = 0.f;
    for (int ky = 0; ky < 3; ++ky) {
        const int t = iy + 1 - ky;
        if (t < 0 || (t & 1)) continue;
        const int oy = t >> 1;
        if (oy >= oh) continue;
        for (int kx = 0; kx < 3; ++kx) {
            const int u = ix + 1 - kx;
            if (u < 0 || (u & 1)) continue;
            const int ox = u >> 1;
            if (ox >= ow) continue;
            const long long o = base + (long long)oy * ow + ox;
            if (arg[o] == ky * 3 + kx) sum += to_f(dy[o]);
        }
    }
    dx[k] = from_f<T>(sum);
}

// Global average pooling: y[b, c] = mean over the hw positions of x[b, c, ·] (f32), one thread
// per (b, c), reading x at b·sb + c·sc + i·shw (the trunk's output is channels-last memory
// behind an NCHW view: sc = 1, shw = C, so neighbouring threads read neighbouring values).
// Why: as candle ops (a copy to NCHW, a cast, a sum) forward and their backward it cost about
// 0.85 ms of a SimNet step of 100 images on an H100 (run 14).
template <typename T>
__device__ void avg_pool_fwd(const T* x, float* y, int b, int c, int hw, long long sb,
                             long long sc, long long shw) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (long long)b * c) return;
    const long long n = k / c, ch = k - n * c;
    const T* p = x + n * sb + ch * sc;
    double s = 0.0;
    for (int i = 0; i < hw; ++i) s += to_f(p[i * shw]);
    y[k] = (float)(s / hw);
}

// Its backward into a contiguous [b, c, hw] gradient: dx[k] = dy[k / hw] / hw.
template <typename T>
__device__ void avg_pool_bwd(const float* dy, T* dx, long long total, int hw) {
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (long long)gridDim.x * blockDim.x)
        dx[k] = from_f<T>(dy[k / hw] / hw);
}

}  // namespace

#define AVG_POOL_KERNELS(NAME, T)                                                               \
    extern "C" __global__ void avg_pool_fwd_##NAME(const T* x, float* y, int b, int c, int hw,  \
                                                   long long sb, long long sc, long long shw) { \
        avg_pool_fwd<T>(x, y, b, c, hw, sb, sc, shw);                                           \
    }                                                                                           \
    extern "C" __global__ void avg_pool_bwd_##NAME(const float* dy, T* dx, long long total,      \
                                                   int hw) {                                    \
        avg_pool_bwd<T>(dy, dx, total, hw);                                                     \
    }

AVG_POOL_KERNELS(f32, float)
AVG_POOL_KERNELS(bf16, __nv_bfloat16)

#define POOL_KERNELS(NAME, T)                                                                   \
    extern "C" __global__ void max_pool_fwd_##NAME(const T* x, T* y, uint8_t* arg,              \
                                                    long long planes, int h, int w, int oh,     \
                                                    int ow) {                                   \
        if (planes * h * w < 0x7fff0000LL)                                                      \
            pool_fwd<T, int>(x, y, arg, (int)planes, h, w, oh, ow);                             \
        else                                                                                    \
            pool_fwd<T, long long>(x, y, arg, planes, h, w, oh, ow);                            \
    }                                                                                           \
    extern "C" __global__ void max_pool_bwd_##NAME(const T* dy, const uint8_t* arg, T* dx,      \
                                                    long long planes, int h, int w, int oh,     \
                                                    int ow) {                                   \
        if (planes * h * w < 0x7fff0000LL)                                                      \
            pool_bwd<T, int>(dy, arg, dx, (int)planes, h, w, oh, ow);                           \
        else                                                                                    \
            pool_bwd<T, long long>(dy, arg, dx, planes, h, w, oh, ow);                          \
    }

POOL_KERNELS(f32, float)
POOL_KERNELS(bf16, __nv_bfloat16)
