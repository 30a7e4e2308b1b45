// Training-mode BatchNorm kernels with the ReLU and the residual addition folded in.
//
// Why they exist: cuDNN's BatchNorm (NCHW) writes its output, then a ReLU reads and writes it
// again, and a residual block's tail adds the shortcut in a third pass; backward, the ReLU's
// mask is one more pass before cuDNN's own two. On ResNet-50 at batch 64 (H100) those passes
// and cuDNN's generic elementwise kernel took 40 % of the GPU time of a training step
// (BENCHMARKS.md). Here the forward is one statistics pass over x and one pass writing
// y = relu(BN(x) + residual); the backward is one reduction pass and one pass writing dx
// (and the residual's gradient), each reading the ReLU's mask from y.
//
// Layouts: contiguous NCHW, viewed per launch as N rows of C channels of HW values, or
// channels-last (NHWC, the `_cl` kernels), viewed as M = N·HW rows of C channels; either way a
// split batch is two launches on offset pointers. Data are f32 or bf16 (`T`); statistics,
// parameters and their gradients are f32, and every reduction accumulates in f64, so the
// variance is exact to f32 rounding whatever the mean. VEC consecutive values (one channel
// with HW % VEC == 0 in NCHW; VEC channels with C % VEC == 0 in NHWC) move as one load.
//
// Compiled to PTX by crates/kernels/build.rs with `--features cuda`; launched from
// crates/ops/src/kernels.rs, which documents each kernel's contract.

#include <stdint.h>

#include "common.cuh"

namespace {

// What a backward pass reads at `at`: x, dy and, when given, the ReLU's output y (else 0).
template <typename T, int VEC>
__device__ __forceinline__ void load_grad(const T* x, const T* dy, const T* y, long long at,
                                          float (&xv)[VEC], float (&gv)[VEC],
                                          float (&yv)[VEC]) {
    load<T, VEC>(x + at, xv);
    load<T, VEC>(dy + at, gv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) yv[e] = 0.f;
    if (y) load<T, VEC>(y + at, yv);
}

// BN(x) of one value, with `scale` = inv_std·w: the forward's expression, which the backward
// repeats to recompute a ReLU's mask (so both round alike).
__device__ __forceinline__ float bn_out(float v, float mean, float scale, float shift) {
    return (v - mean) * scale + shift;
}

// Whether the gradient passes the ReLU after the BatchNorm at one value: by its output y
// (`y` given: y > 0), else, when `from_x`, by recomputing BN(x) > 0 (units without a
// residual), else always (no ReLU).
__device__ __forceinline__ bool passes(bool have_y, float y, int from_x, float x, float mean,
                                       float scale, float shift) {
    if (have_y) return y > 0.f;
    if (from_x) return bn_out(x, mean, scale, shift) > 0.f;
    return true;
}

// The reductions run on a grid (C, S): block (c, s) covers channel c over its share s of the
// rows, and leaves its two sums in partial[(c * S + s) * 2 + {0, 1}].
struct Share {
    long long n0, groups;  // first row, and groups of VEC values in the share
    int hwv, c, c_count, hw;
    // The index of the k-th group's first value in the [N, C, HW] tensor.
    __device__ long long at(long long k, int vec) const {
        return ((n0 + k / hwv) * c_count + c) * hw + (k % hwv) * vec;
    }
};

__device__ __forceinline__ Share block_share(int n, int c_count, int hw, int vec) {
    const int s = blockIdx.y, shares = gridDim.y;
    const long long n0 = (long long)n * s / shares, n1 = (long long)n * (s + 1) / shares;
    const int hwv = hw / vec;
    return Share{n0, (n1 - n0) * hwv, hwv, (int)blockIdx.x, c_count, hw};
}

// Sums (a, b) over the block and stores them as this block's partial sums.
__device__ __forceinline__ void store_share(double* partial, double a, double b) {
    block_sum2(a, b);
    if (threadIdx.x == 0) {
        const long long at = ((long long)blockIdx.x * gridDim.y + blockIdx.y) * 2;
        partial[at] = a;
        partial[at + 1] = b;
    }
}

// The finish kernels give each channel one warp: the channel of the calling warp, or -1
// past the last.
__device__ __forceinline__ int warp_channel(int c_count) {
    const int c = (int)(blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32);
    return c < c_count ? c : -1;
}

// The two sums of channel c over all its shares, by the calling warp (the lanes take every
// 32nd share, then add up in a fixed order); every lane ends with them. A channels-last
// reduction has up to a few thousand shares per channel, which one thread alone would read
// one after another.
__device__ __forceinline__ void sum_shares(const double* partial, int c, int shares, double& a,
                                           double& b) {
    a = 0.0;
    b = 0.0;
    for (int s = (int)(threadIdx.x & 31); s < shares; s += 32) {
        a += partial[((long long)c * shares + s) * 2];
        b += partial[((long long)c * shares + s) * 2 + 1];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
}

// The sums of x and x² of a channel's share.
template <typename T, int VEC>
__device__ void stats(const T* x, int n, int c_count, int hw, double* partial) {
    const Share sh = block_share(n, c_count, hw, VEC);
    double sum = 0.0, sq = 0.0;
    for (long long k = threadIdx.x; k < sh.groups; k += blockDim.x) {
        float v[VEC];
        load<T, VEC>(x + sh.at(k, VEC), v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            sum += v[e];
            sq += (double)v[e] * v[e];
        }
    }
    store_share(partial, sum, sq);
}

// The sums of g and g·x̂ of a channel's share, where g is dy through the ReLU (`passes`) and
// x̂ = (x − mean)·inv_std.
template <typename T, int VEC>
__device__ void grad_stats(const T* x, const T* dy, const T* y, const float* mean,
                           const float* inv_std, const float* w, const float* b, int from_x,
                           int n, int c_count, int hw, double* partial) {
    const Share sh = block_share(n, c_count, hw, VEC);
    const float m = mean[sh.c], is = inv_std[sh.c];
    const float scale = from_x ? is * w[sh.c] : 0.f, shift = from_x ? b[sh.c] : 0.f;
    double sg = 0.0, sgx = 0.0;
    for (long long k = threadIdx.x; k < sh.groups; k += blockDim.x) {
        const long long at = sh.at(k, VEC);
        float xv[VEC], gv[VEC], yv[VEC];
        load_grad<T, VEC>(x, dy, y, at, xv, gv, yv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const bool pass = passes(y != nullptr, yv[e], from_x, xv[e], m, scale, shift);
            const float g = pass ? gv[e] : 0.f;
            sg += g;
            sgx += (double)g * ((xv[e] - m) * is);
        }
    }
    store_share(partial, sg, sgx);
}

// Channels-last reductions run on a grid (tiles, S): block (t, s) covers VEC·ct consecutive
// channels from t·VEC·ct over its share s of the M rows. Its threads form ct columns (each
// VEC channels wide) by rows = blockDim.x / ct; blockDim.x is at most CL_THREADS and a
// multiple of ct. Partial sums go to the same places as the NCHW reductions', so the
// `*_finish` kernels serve both.
constexpr int CL_THREADS = 256;

struct Cols {
    long long r0, r1;  // the share's rows
    int ct, rows, tx, ty;
    int c0;  // this thread's first channel
};

__device__ __forceinline__ Cols block_cols(long long m, int ct, int vec) {
    const int s = blockIdx.y, shares = gridDim.y;
    const int tx = (int)threadIdx.x % ct, ty = (int)threadIdx.x / ct;
    return Cols{m * s / shares,  m * (s + 1) / shares, ct, (int)blockDim.x / ct, tx, ty,
                ((int)blockIdx.x * ct + tx) * vec};
}

// Sums each column's (a, b) over the block's rows of threads and stores them as the block's
// partial sums of channels c0 .. c0 + VEC.
template <int VEC>
__device__ void store_cols(double* partial, const Cols& k, int c_count, const double (&a)[VEC],
                           const double (&b)[VEC]) {
    __shared__ double sa[VEC][CL_THREADS], sb[VEC][CL_THREADS];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        sa[e][threadIdx.x] = a[e];
        sb[e][threadIdx.x] = b[e];
    }
    __syncthreads();
    if (k.ty != 0 || k.c0 >= c_count) return;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        double ta = 0.0, tb = 0.0;
        for (int j = 0; j < k.rows; ++j) {
            ta += sa[e][j * k.ct + k.tx];
            tb += sb[e][j * k.ct + k.tx];
        }
        const long long at = ((long long)(k.c0 + e) * gridDim.y + blockIdx.y) * 2;
        partial[at] = ta;
        partial[at + 1] = tb;
    }
}

// The sums of x and x² of each channel over a share of the rows, channels-last.
template <typename T, int VEC>
__device__ void stats_cl(const T* x, long long m, int c_count, int ct, double* partial) {
    const Cols k = block_cols(m, ct, VEC);
    double sum[VEC] = {}, sq[VEC] = {};
    if (k.c0 < c_count) {
        for (long long r = k.r0 + k.ty; r < k.r1; r += k.rows) {
            float v[VEC];
            load<T, VEC>(x + r * c_count + k.c0, v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                sum[e] += v[e];
                sq[e] += (double)v[e] * v[e];
            }
        }
    }
    store_cols<VEC>(partial, k, c_count, sum, sq);
}

// `grad_stats`, channels-last.
template <typename T, int VEC>
__device__ void grad_stats_cl(const T* x, const T* dy, const T* y, const float* mean,
                              const float* inv_std, const float* w, const float* b, int from_x,
                              long long m, int c_count, int ct, double* partial) {
    const Cols k = block_cols(m, ct, VEC);
    double sg[VEC] = {}, sgx[VEC] = {};
    if (k.c0 < c_count) {
        float mu[VEC], is[VEC], scale[VEC], shift[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            mu[e] = mean[k.c0 + e];
            is[e] = inv_std[k.c0 + e];
            scale[e] = from_x ? is[e] * w[k.c0 + e] : 0.f;
            shift[e] = from_x ? b[k.c0 + e] : 0.f;
        }
        for (long long r = k.r0 + k.ty; r < k.r1; r += k.rows) {
            const long long at = r * c_count + k.c0;
            float xv[VEC], gv[VEC], yv[VEC];
            load_grad<T, VEC>(x, dy, y, at, xv, gv, yv);
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const bool pass =
                    passes(y != nullptr, yv[e], from_x, xv[e], mu[e], scale[e], shift[e]);
                const float g = pass ? gv[e] : 0.f;
                sg[e] += g;
                sgx[e] += (double)g * ((xv[e] - mu[e]) * is[e]);
            }
        }
    }
    store_cols<VEC>(partial, k, c_count, sg, sgx);
}

// The channel of the first of the VEC values at `at`: in NCHW (CL false) all VEC share it;
// channels-last (CL), value e is in channel first + e.
template <bool CL>
__device__ __forceinline__ int first_channel(long long at, int c_count, int hw) {
    return CL ? (int)(at % c_count) : (int)((at / hw) % c_count);
}

// y = BN(x) (+ residual) (then ReLU), elementwise; one thread per VEC values.
template <typename T, int VEC, bool CL>
__device__ void apply(const T* x, const T* residual, T* y, const float* mean,
                      const float* inv_std, const float* w, const float* b, long long total,
                      int c_count, int hw, int do_relu) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k * VEC >= total) return;
    const long long at = k * VEC;
    const int c0 = first_channel<CL>(at, c_count, hw);
    float v[VEC], r[VEC];
    load<T, VEC>(x + at, v);
    if (residual) load<T, VEC>(residual + at, r);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        const int c = CL ? c0 + e : c0;
        float o = bn_out(v[e], mean[c], inv_std[c] * w[c], b[c]);
        if (residual) o += r[e];
        v[e] = do_relu ? relu(o) : o;
    }
    store<T, VEC>(y + at, v);
}

// dx = w·inv_std·(g − mean(g) − x̂·mean(g·x̂)) with g = dy through the ReLU (`passes`);
// `coef[c] = (mean(g), mean(g·x̂))`. Also writes g itself to `dres` when given (the residual
// branch's gradient).
template <typename T, int VEC, bool CL>
__device__ void grad_apply(const T* x, const T* dy, const T* y, const float* mean,
                           const float* inv_std, const float* w, const float* b, int from_x,
                           const float* coef, T* dx, T* dres, long long total, int c_count,
                           int hw) {
    const long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k * VEC >= total) return;
    const long long at = k * VEC;
    const int c0 = first_channel<CL>(at, c_count, hw);
    float xv[VEC], gv[VEC], yv[VEC], out[VEC];
    load_grad<T, VEC>(x, dy, y, at, xv, gv, yv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
        const int c = CL ? c0 + e : c0;
        const float is = inv_std[c];
        const float shift = from_x ? b[c] : 0.f;
        if (!passes(y != nullptr, yv[e], from_x, xv[e], mean[c], is * w[c], shift)) gv[e] = 0.f;
        out[e] = (w[c] * is) * (gv[e] - coef[2 * c] - (xv[e] - mean[c]) * is * coef[2 * c + 1]);
    }
    store<T, VEC>(dx + at, out);
    if (dres) store<T, VEC>(dres + at, gv);
}

}  // namespace

// One warp per channel: the batch mean and 1/sqrt(var + eps) (biased variance) from the
// partial sums of `count` values, and, when `running_mean` is given, the running statistics
// moved by momentum with the unbiased variance (PyTorch's rule).
extern "C" __global__ void bn_stats_finish(const double* partial, int c_count, int shares,
                                           double count, float eps, float momentum,
                                           float* running_mean, float* running_var,
                                           float* mean, float* inv_std) {
    const int c = warp_channel(c_count);
    if (c < 0) return;
    double sum, sq;
    sum_shares(partial, c, shares, sum, sq);
    if ((threadIdx.x & 31) != 0) return;
    const double mu = sum / count;
    double var = sq / count - mu * mu;
    if (var < 0.0) var = 0.0;
    mean[c] = (float)mu;
    inv_std[c] = (float)(1.0 / sqrt(var + (double)eps));
    if (running_mean) {
        running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mu);
        running_var[c] =
            (float)((1.0 - momentum) * running_var[c] + momentum * var * count / (count - 1.0));
    }
}

// Evaluation mode, one thread per channel: the running statistics as the `mean` and
// `inv_std` that `apply` and `grad_apply` read.
extern "C" __global__ void bn_eval_stats(int c_count, float eps, const float* running_mean,
                                         const float* running_var, float* mean,
                                         float* inv_std) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= c_count) return;
    mean[c] = running_mean[c];
    inv_std[c] = (float)(1.0 / sqrt((double)running_var[c] + (double)eps));
}

// One warp per channel: dw[c] (+)= Σ g·x̂, db[c] (+)= Σ g, and coef[c] = the two means that
// the batch statistics' own gradient subtracts (zero in evaluation mode, `fixed`, where the
// statistics are constants and dx = w·inv_std·g).
extern "C" __global__ void bn_grad_finish(const double* partial, int c_count, int shares,
                                          double count, int accumulate, int fixed, float* dw,
                                          float* db, float* coef) {
    const int c = warp_channel(c_count);
    if (c < 0) return;
    double sg, sgx;
    sum_shares(partial, c, shares, sg, sgx);
    if ((threadIdx.x & 31) != 0) return;
    dw[c] = (float)(accumulate ? dw[c] + sgx : sgx);
    db[c] = (float)(accumulate ? db[c] + sg : sg);
    coef[2 * c] = fixed ? 0.f : (float)(sg / count);
    coef[2 * c + 1] = fixed ? 0.f : (float)(sgx / count);
}

#define BN_KERNELS(NAME, T, VEC)                                                              \
    extern "C" __global__ void bn_stats_##NAME(const T* x, int n, int c, int hw,              \
                                               double* partial) {                             \
        stats<T, VEC>(x, n, c, hw, partial);                                                  \
    }                                                                                         \
    extern "C" __global__ void bn_grad_stats_##NAME(                                          \
        const T* x, const T* dy, const T* y, const float* mean, const float* inv_std,         \
        const float* w, const float* b, int from_x, int n, int c, int hw, double* partial) {  \
        grad_stats<T, VEC>(x, dy, y, mean, inv_std, w, b, from_x, n, c, hw, partial);         \
    }                                                                                         \
    extern "C" __global__ void bn_stats_cl_##NAME(const T* x, long long m, int c, int ct,     \
                                                  double* partial) {                          \
        stats_cl<T, VEC>(x, m, c, ct, partial);                                               \
    }                                                                                         \
    extern "C" __global__ void bn_grad_stats_cl_##NAME(                                       \
        const T* x, const T* dy, const T* y, const float* mean, const float* inv_std,         \
        const float* w, const float* b, int from_x, long long m, int c, int ct,               \
        double* partial) {                                                                    \
        grad_stats_cl<T, VEC>(x, dy, y, mean, inv_std, w, b, from_x, m, c, ct, partial);      \
    }                                                                                         \
    BN_ELEMENTWISE(NAME, T, VEC, false)                                                       \
    BN_ELEMENTWISE(cl_##NAME, T, VEC, true)

#define BN_ELEMENTWISE(NAME, T, VEC, CL)                                                      \
    extern "C" __global__ void bn_apply_##NAME(const T* x, const T* residual, T* y,           \
                                               const float* mean, const float* inv_std,       \
                                               const float* w, const float* b,                \
                                               long long total, int c, int hw, int relu) {    \
        apply<T, VEC, CL>(x, residual, y, mean, inv_std, w, b, total, c, hw, relu);           \
    }                                                                                         \
    extern "C" __global__ void bn_grad_apply_##NAME(                                          \
        const T* x, const T* dy, const T* y, const float* mean, const float* inv_std,         \
        const float* w, const float* b, int from_x, const float* coef, T* dx, T* dres,        \
        long long total, int c, int hw) {                                                     \
        grad_apply<T, VEC, CL>(x, dy, y, mean, inv_std, w, b, from_x, coef, dx, dres, total,  \
                               c, hw);                                                        \
    }

BN_KERNELS(f32, float, 1)
BN_KERNELS(f32x4, float, 4)
BN_KERNELS(bf16, __nv_bfloat16, 1)
BN_KERNELS(bf16x4, __nv_bfloat16, 4)
