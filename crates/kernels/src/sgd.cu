// The momentum SGD update of parameter tensors in one pass each (crate::kernels::sgd_update_many).
//
// Why it exists: with three cuDNN calls per tensor (cudnnAddTensor each) the optimiser step of
// ResNet-50, 161 tensors, cost about 3 ms on an H100 (BENCHMARKS.md), almost all of it launch
// and call overhead; one kernel per tensor reads p, g and the momentum buffer once. With one
// launch per tensor the SimNet optimiser (about 170 tensors) was still bound by the host's
// launches (1.1 of its 1.4 ms issuing, run 14); sgd_step8 takes eight tensors per launch.
// sgd_step, one tensor per launch, stays as the plain form (the emulator's tests use it).
//
// Arithmetic in the order and rounding of the CPU path (crate::optim::Sgd::step), every
// product and sum rounded separately (no fused multiply-add): d = g + λ·p; with momentum
// buf = d on the first step (`fresh`), else buf = μ·buf + d, and d = buf; then p = p − lr·d.

namespace {

// The update of one tensor by the threads `start, start + stride, ...` of a launch.
__device__ __forceinline__ void sgd_one(float* p, const float* g, float* buf, long long n,
                                        float lr, float momentum, float weight_decay, int fresh,
                                        long long start, long long stride) {
    for (long long i = start; i < n; i += stride) {
        const float pi = p[i];
        float d = __fadd_rn(g[i], __fmul_rn(pi, weight_decay));
        if (buf) {
            if (!fresh) d = __fadd_rn(__fmul_rn(buf[i], momentum), d);
            buf[i] = d;
        }
        p[i] = __fsub_rn(pi, __fmul_rn(d, lr));
    }
}

}  // namespace

extern "C" __global__ void sgd_step(float* p, const float* g, float* buf, long long n, float lr,
                                    float momentum, float weight_decay, int fresh) {
    sgd_one(p, g, buf, n, lr, momentum, weight_decay, fresh,
            (long long)blockIdx.x * blockDim.x + threadIdx.x, (long long)gridDim.x * blockDim.x);
}

// Up to eight tensors in one launch (a model has a hundred or more, most of them small, and a
// launch each cost more than their arithmetic): blocks (·, t) of grid (X, count) update tensor
// t; unused slots have n = 0.
#define SGD_SLOT(I) float *p##I, const float *g##I, float *b##I, long long n##I
extern "C" __global__ void sgd_step8(SGD_SLOT(0), SGD_SLOT(1), SGD_SLOT(2), SGD_SLOT(3),
                                     SGD_SLOT(4), SGD_SLOT(5), SGD_SLOT(6), SGD_SLOT(7),
                                     float lr, float momentum, float weight_decay, int fresh) {
    float* p;
    const float* g;
    float* b;
    long long n;
    switch (blockIdx.y) {
#define SGD_PICK(I)                                                                             \
    case I:                                                                                     \
        p = p##I;                                                                               \
        g = g##I;                                                                               \
        b = b##I;                                                                               \
        n = n##I;                                                                               \
        break;
        SGD_PICK(0) SGD_PICK(1) SGD_PICK(2) SGD_PICK(3) SGD_PICK(4) SGD_PICK(5) SGD_PICK(6)
        SGD_PICK(7)
#undef SGD_PICK
        default:
            return;
    }
    sgd_one(p, g, b, n, lr, momentum, weight_decay, fresh,
            (long long)blockIdx.x * blockDim.x + threadIdx.x, (long long)gridDim.x * blockDim.x);
}
#undef SGD_SLOT
