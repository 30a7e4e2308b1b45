// What several of our kernel files share: conversions between the data types they take (f32,
// bf16) and the f32 they compute in, vector loads and stores, ReLU, and a block-wide sum.

#pragma once
#include <cuda_bf16.h>

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// VEC values of T as one aligned memory access.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack {
    T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
    Pack<T, VEC> k = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = to_f(k.v[e]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
    Pack<T, VEC> k;
#pragma unroll
    for (int e = 0; e < VEC; ++e) k.v[e] = from_f<T>(in[e]);
    *reinterpret_cast<Pack<T, VEC>*>(p) = k;
}

// ReLU that keeps NaN (PyTorch's and cuDNN's PROPAGATE_NAN rule).
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

// The sums (a, b) of every thread of the block, in thread 0. blockDim.x is a multiple of 32,
// at most 1024.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
    __shared__ double sa[32], sb[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, o);
        b += __shfl_down_sync(0xffffffffu, b, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sa[warp] = a;
        sb[warp] = b;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x >> 5;
        a = lane < warps ? sa[lane] : 0.0;
        b = lane < warps ? sb[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            a += __shfl_down_sync(0xffffffffu, a, o);
            b += __shfl_down_sync(0xffffffffu, b, o);
        }
    }
}

}  // namespace
