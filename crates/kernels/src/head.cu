// Kernels of the SimNet head and its discriminator: the first layer's pair grid and the
// discriminator's LayerNorm with its ReLU, forward and backward.
//
// Why they exist: on an H100 at bf16 (run 13 in docs/results), candle's broadcasting binary
// ops ran at about 150 GB/s and the discriminator's LayerNorm, written as eight candle ops,
// cost about 1 ms forward and 2.5 ms backward on 5,000 pairs, twice per SimNet step. Together
// with the casts around them that was most of the 18 ms the head, the discriminator and their
// backward took beside the backbone's 25 ms.
//
// Pair grid. The first Linear of the head acts on the concatenation [f_a ; f_b] of two
// features: W·[f_a ; f_b] = W_a·f_a + W_b·f_b. The caller computes q = f·Wᵀ with W viewed as
// [2H, D] (a free reshape of the [H, 2D] weight), so q[n, 2k + s] is half s of unit k's
// projection of image n. A grid of rows × cols pairs is then
//   out[r·cols + c, k] = q_rows[r, 2k + row_slot] + (q_cols[c, 2k + col_slot] + bias[k]),
// summed in f32 and rounded once. Its backward sums the output gradient over the grid's
// columns (for the rows' slot) and over its rows (for the columns' slot), into an f32 dq
// that several grids may add to (one launch after another, so the sums are deterministic).
// The `v` variants move 16 bytes of q per load (8 / sizeof(T) units per thread).
//
// LayerNorm + ReLU over the last dimension (h) of contiguous [n, h] rows, one block per row:
// y = relu((x − mean)·rstd·w + b) with the biased variance, PyTorch's definition. Row sums
// accumulate in f64; mean and rstd are kept (f32) for the backward, which reads the ReLU's
// mask from y (y > 0), as PyTorch's ReLU backward does from its output. The parameters'
// gradients are column sums over the rows: partial sums per share of rows, then a finish.
//
// Bias: y = x + b over rows of h (a Linear's bias, which candle adds with a broadcasting op
// at about 150 GB/s); its backward passes dy through and sums it over the rows for db.
//
// Transposed weights: y = xᵀ for x [rows, cols] (any of f32 → bf16, bf16 → f32, f32 → f32), in
// 32 × 32 tiles through shared memory. A Linear computes x·Wᵀ; candle differentiates the view
// Wᵀ by adding its gradient, transposed and strided, into zeros (about 150 GB/s), then casts it
// and adds it again: about 1.4 ms per SimNet step for the head's and discriminator's weights
// (run 14). With Wᵀ made contiguous here, its gradient comes back contiguous and this kernel
// transposes and casts it once.
//
// Cross-entropy: the mean over n rows of −log softmax(logits[r])[target[r]] (f32 logits of c
// classes), computed by one block with the log-sum-exp of each row taken from its maximum,
// instead of candle's dozen ops each way; the backward writes (softmax − onehot)·g/n.
//
// Data are f32 or bf16 (T); w, b, statistics and every gradient of a parameter are f32.

#include <stdint.h>

#include "common.cuh"

namespace {

template <typename T, int VEC>
__device__ void pair_grid(const T* qr, const T* qc, const float* bias, T* out, int h, int rows,
                          int cols, int row_slot, int col_slot) {
    const int hv = h / VEC;
    const long long total = (long long)rows * cols * hv;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int kv = (int)(t % hv);
        const long long p = t / hv;
        const int c = (int)(p % cols), r = (int)(p / cols);
        float a[2 * VEC], b[2 * VEC], o[VEC];
        load<T, 2 * VEC>(qr + (long long)r * 2 * h + 2 * kv * VEC, a);
        load<T, 2 * VEC>(qc + (long long)c * 2 * h + 2 * kv * VEC, b);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            const float c = b[2 * e + col_slot];
            o[e] = __fadd_rn(a[2 * e + row_slot], bias ? __fadd_rn(c, bias[kv * VEC + e]) : c);
        }
        store<T, VEC>(out + p * h + kv * VEC, o);
    }
}

// dq[r, 2k + slot] += Σ_c g[r·cols + c, k] (by_rows), or dq[c, 2k + slot] += Σ_r g[...]
// (columns); one thread per (image, unit).
template <typename T>
__device__ void pair_grid_sum(const T* g, float* dq, int h, int rows, int cols, int slot,
                              bool by_rows) {
    const int images = by_rows ? rows : cols;
    const long long total = (long long)images * h;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int k = (int)(t % h), i = (int)(t / h);
        float s = 0.f;
        if (by_rows) {
            const T* p = g + (long long)i * cols * h + k;
            for (int c = 0; c < cols; ++c) s = __fadd_rn(s, to_f(p[(long long)c * h]));
        } else {
            const T* p = g + (long long)i * h + k;
            for (int r = 0; r < rows; ++r) s = __fadd_rn(s, to_f(p[(long long)r * cols * h]));
        }
        float* d = dq + (long long)i * 2 * h + 2 * k + slot;
        *d = __fadd_rn(*d, s);
    }
}

// The row's mean and rstd into the block's shared `stats` (and into mean/rstd when given).
template <typename T>
__device__ void ln_row_stats(const T* xr, int h, float eps, float* stats) {
    double s = 0.0, unused = 0.0;
    for (int k = threadIdx.x; k < h; k += blockDim.x) s += to_f(xr[k]);
    block_sum2(s, unused);
    if (threadIdx.x == 0) stats[0] = (float)(s / h);
    __syncthreads();
    const float mean = stats[0];
    double q = 0.0;
    unused = 0.0;
    for (int k = threadIdx.x; k < h; k += blockDim.x) {
        const float d = __fsub_rn(to_f(xr[k]), mean);
        q += (double)d * d;
    }
    block_sum2(q, unused);
    if (threadIdx.x == 0) stats[1] = (float)(1.0 / sqrt(q / h + (double)eps));
    __syncthreads();
}

// The normalised, scaled and shifted value before the ReLU: the forward's expression, which
// the parameters' gradients repeat.
__device__ __forceinline__ float ln_hat(float x, float mean, float rstd) {
    return __fmul_rn(__fsub_rn(x, mean), rstd);
}

template <typename T>
__device__ void ln_relu_fwd(const T* x, const float* w, const float* b, T* y, float* mean,
                            float* rstd, int h, float eps) {
    __shared__ float stats[2];
    const long long row = blockIdx.x;
    const T* xr = x + row * h;
    ln_row_stats<T>(xr, h, eps, stats);
    const float m = stats[0], rs = stats[1];
    if (threadIdx.x == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
    for (int k = threadIdx.x; k < h; k += blockDim.x)
        y[row * h + k] = from_f<T>(relu(__fadd_rn(__fmul_rn(ln_hat(to_f(xr[k]), m, rs), w[k]), b[k])));
}

// dx = rstd·(g·w − mean(g·w) − x̂·mean(g·w·x̂)), g = dy where y > 0, else 0.
template <typename T>
__device__ void ln_relu_bwd(const T* x, const T* y, const T* dy, const float* w,
                            const float* mean, const float* rstd, T* dx, int h) {
    __shared__ float sums[2];
    const long long row = blockIdx.x;
    const long long o = row * h;
    const float m = mean[row], rs = rstd[row];
    double a = 0.0, b = 0.0;
    for (int k = threadIdx.x; k < h; k += blockDim.x) {
        const float g = to_f(y[o + k]) > 0.f ? to_f(dy[o + k]) : 0.f;
        const float gw = __fmul_rn(g, w[k]);
        a += gw;
        b += (double)gw * ln_hat(to_f(x[o + k]), m, rs);
    }
    block_sum2(a, b);
    if (threadIdx.x == 0) {
        sums[0] = (float)(a / h);
        sums[1] = (float)(b / h);
    }
    __syncthreads();
    const float ma = sums[0], mb = sums[1];
    for (int k = threadIdx.x; k < h; k += blockDim.x) {
        const float g = to_f(y[o + k]) > 0.f ? to_f(dy[o + k]) : 0.f;
        const float gw = __fmul_rn(g, w[k]);
        const float xh = ln_hat(to_f(x[o + k]), m, rs);
        dx[o + k] = from_f<T>(__fmul_rn(rs, __fsub_rn(__fsub_rn(gw, ma), __fmul_rn(xh, mb))));
    }
}

// Block (kx, s) of grid (⌈h / blockDim⌉, S): for its columns k, the sums over share s of the
// rows of g·x̂ and g, into partial[(s·2 + {0, 1})·h + k].
template <typename T>
__device__ void ln_param_grad(const T* x, const T* y, const T* dy, const float* mean,
                              const float* rstd, float* partial, int n, int h) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= h) return;
    const int s = blockIdx.y, shares = gridDim.y;
    const long long r0 = (long long)n * s / shares, r1 = (long long)n * (s + 1) / shares;
    double dw = 0.0, db = 0.0;
    for (long long r = r0; r < r1; ++r) {
        const long long at = r * h + k;
        const float g = to_f(y[at]) > 0.f ? to_f(dy[at]) : 0.f;
        dw += (double)g * ln_hat(to_f(x[at]), mean[r], rstd[r]);
        db += g;
    }
    partial[((long long)s * 2) * h + k] = (float)dw;
    partial[((long long)s * 2 + 1) * h + k] = (float)db;
}

template <typename T, int VEC>
__device__ void add_bias(const T* x, const float* b, T* y, long long n, int h) {
    const int hv = h / VEC;
    const long long total = n * hv;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        const int kv = (int)(t % hv);
        float v[VEC];
        load<T, VEC>(x + t * VEC, v);
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = __fadd_rn(v[e], b[kv * VEC + e]);
        store<T, VEC>(y + t * VEC, v);
    }
}

// Block (kx, s) of grid (⌈h / blockDim⌉, S): for its columns k, the sum over share s of the
// rows of g, into partial[s·h + k].
template <typename T>
__device__ void col_sum(const T* g, float* partial, int n, int h) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= h) return;
    const int s = blockIdx.y, shares = gridDim.y;
    const long long r0 = (long long)n * s / shares, r1 = (long long)n * (s + 1) / shares;
    double sum = 0.0;
    for (long long r = r0; r < r1; ++r) sum += to_f(g[r * h + k]);
    partial[(long long)s * h + k] = (float)sum;
}

// log Σ_j exp(row[j]) from the row's maximum.
__device__ __forceinline__ float log_sum_exp(const float* row, int c) {
    float m = row[0];
    for (int j = 1; j < c; ++j) m = fmaxf(m, row[j]);
    float s = 0.f;
    for (int j = 0; j < c; ++j) s += expf(row[j] - m);
    return m + logf(s);
}

template <typename A, typename B>
__device__ void transpose(const A* x, B* y, int rows, int cols) {
    __shared__ float tile[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5, step = blockDim.x >> 5;
    const int r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
    for (int i = ty; i < 32; i += step) {
        const int r = r0 + i, c = c0 + tx;
        if (r < rows && c < cols) tile[i][tx] = to_f(x[(long long)r * cols + c]);
    }
    __syncthreads();
    for (int i = ty; i < 32; i += step) {
        const int c = c0 + i, r = r0 + tx;
        if (c < cols && r < rows) y[(long long)c * rows + r] = from_f<B>(tile[tx][i]);
    }
}

}  // namespace

#define TRANSPOSE_KERNEL(NAME, A, B)                                                            \
    extern "C" __global__ void transpose_##NAME(const A* x, B* y, int rows, int cols) {         \
        transpose<A, B>(x, y, rows, cols);                                                      \
    }
TRANSPOSE_KERNEL(f32_f32, float, float)
TRANSPOSE_KERNEL(f32_bf16, float, __nv_bfloat16)
TRANSPOSE_KERNEL(bf16_f32, __nv_bfloat16, float)
TRANSPOSE_KERNEL(bf16_bf16, __nv_bfloat16, __nv_bfloat16)

// loss[0] = mean_r (lse(logits[r]) − logits[r, target[r]]); one block.
extern "C" __global__ void cross_entropy_fwd(const float* logits, const unsigned* target,
                                             float* loss, int n, int c) {
    double s = 0.0, unused = 0.0;
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        const float* row = logits + (long long)r * c;
        s += log_sum_exp(row, c) - row[target[r]];
    }
    block_sum2(s, unused);
    if (threadIdx.x == 0) loss[0] = (float)(s / n);
}

// dlogits[r, j] = (softmax(logits[r])[j] − [j = target[r]]) · g[0] / n, one thread per row.
extern "C" __global__ void cross_entropy_bwd(const float* logits, const unsigned* target,
                                             const float* g, float* dlogits, int n, int c) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    const float* row = logits + (long long)r * c;
    const float lse = log_sum_exp(row, c), scale = g[0] / n;
    for (int j = 0; j < c; ++j) {
        const float p = expf(row[j] - lse);
        dlogits[(long long)r * c + j] = (p - (j == (int)target[r] ? 1.f : 0.f)) * scale;
    }
}

// out[k] = Σ_s partial[s·h + k] over the S shares of col_sum.
extern "C" __global__ void col_sum_finish(const float* partial, float* out, int shares, int h) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= h) return;
    double a = 0.0;
    for (int s = 0; s < shares; ++s) a += partial[(long long)s * h + k];
    out[k] = (float)a;
}

// Sums the S partial sums of ln_param_grad: dw[k], db[k].
extern "C" __global__ void ln_param_finish(const float* partial, float* dw, float* db, int shares,
                                           int h) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= h) return;
    double a = 0.0, b = 0.0;
    for (int s = 0; s < shares; ++s) {
        a += partial[((long long)s * 2) * h + k];
        b += partial[((long long)s * 2 + 1) * h + k];
    }
    dw[k] = (float)a;
    db[k] = (float)b;
}

#define HEAD_KERNELS(NAME, T)                                                                   \
    extern "C" __global__ void pair_grid_##NAME(const T* qr, const T* qc, const float* bias,    \
                                                T* out, int h, int rows, int cols, int row_slot, \
                                                int col_slot) {                                 \
        pair_grid<T, 1>(qr, qc, bias, out, h, rows, cols, row_slot, col_slot);                  \
    }                                                                                           \
    extern "C" __global__ void pair_grid_##NAME##v(const T* qr, const T* qc, const float* bias,  \
                                                   T* out, int h, int rows, int cols,            \
                                                   int row_slot, int col_slot) {                 \
        pair_grid<T, 8 / sizeof(T)>(qr, qc, bias, out, h, rows, cols, row_slot, col_slot);      \
    }                                                                                           \
    extern "C" __global__ void pair_grid_rows_##NAME(const T* g, float* dq, int h, int rows,     \
                                                     int cols, int slot) {                      \
        pair_grid_sum<T>(g, dq, h, rows, cols, slot, true);                                     \
    }                                                                                           \
    extern "C" __global__ void pair_grid_cols_##NAME(const T* g, float* dq, int h, int rows,     \
                                                     int cols, int slot) {                      \
        pair_grid_sum<T>(g, dq, h, rows, cols, slot, false);                                    \
    }                                                                                           \
    extern "C" __global__ void ln_relu_fwd_##NAME(const T* x, const float* w, const float* b,    \
                                                  T* y, float* mean, float* rstd, int h,         \
                                                  float eps) {                                  \
        ln_relu_fwd<T>(x, w, b, y, mean, rstd, h, eps);                                         \
    }                                                                                           \
    extern "C" __global__ void ln_relu_bwd_##NAME(const T* x, const T* y, const T* dy,           \
                                                  const float* w, const float* mean,             \
                                                  const float* rstd, T* dx, int h) {             \
        ln_relu_bwd<T>(x, y, dy, w, mean, rstd, dx, h);                                         \
    }                                                                                           \
    extern "C" __global__ void ln_param_grad_##NAME(const T* x, const T* y, const T* dy,         \
                                                    const float* mean, const float* rstd,        \
                                                    float* partial, int n, int h) {              \
        ln_param_grad<T>(x, y, dy, mean, rstd, partial, n, h);                                  \
    }

#define BIAS_KERNELS(NAME, T)                                                                   \
    extern "C" __global__ void add_bias_##NAME(const T* x, const float* b, T* y, long long n,    \
                                               int h) {                                         \
        add_bias<T, 1>(x, b, y, n, h);                                                          \
    }                                                                                           \
    extern "C" __global__ void add_bias_##NAME##x4(const T* x, const float* b, T* y,             \
                                                   long long n, int h) {                        \
        add_bias<T, 4>(x, b, y, n, h);                                                          \
    }                                                                                           \
    extern "C" __global__ void col_sum_##NAME(const T* g, float* partial, int n, int h) {        \
        col_sum<T>(g, partial, n, h);                                                           \
    }

BIAS_KERNELS(f32, float)
BIAS_KERNELS(bf16, __nv_bfloat16)
HEAD_KERNELS(f32, float)
HEAD_KERNELS(bf16, __nv_bfloat16)
