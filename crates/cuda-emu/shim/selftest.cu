// Kernels that break CUDA's synchronisation rules on purpose, so that the emulator's own
// tests can check that it reports them (tests/kernels.rs). Not part of the project's kernels.

namespace {
__device__ double selftest_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}
}  // namespace

// Only the block's first half reaches __syncthreads.
extern "C" __global__ void selftest_divergent_sync(float* out) {
    if (threadIdx.x < blockDim.x / 2) {
        __syncthreads();
    }
    out[threadIdx.x] = 1.f;
}

// Only the first 16 lanes of each warp take part in the shuffle.
extern "C" __global__ void selftest_partial_shuffle(double* out) {
    double v = 1.0;
    if ((threadIdx.x & 31) < 16) v = selftest_sum(v);
    out[threadIdx.x] = v;
}

// A correct warp sum of the lane numbers: lane 0 of each warp ends with 0 + 1 + ... + 31.
extern "C" __global__ void selftest_warp_sum(double* out) {
    out[threadIdx.x] = selftest_sum((double)(threadIdx.x & 31));
}
