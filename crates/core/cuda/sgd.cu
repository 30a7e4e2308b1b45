// The momentum SGD update of one parameter tensor in one pass (crate::cudnn::sgd_update).
//
// Why it exists: with three cuDNN calls per tensor (cudnnAddTensor each) the optimiser step of
// ResNet-50, 161 tensors, cost about 3 ms on an H100 (BENCHMARKS.md), almost all of it launch
// and call overhead; one kernel per tensor reads p, g and the momentum buffer once.
//
// Arithmetic in the order and rounding of the CPU path (crate::optim::Sgd::step), every
// product and sum rounded separately (no fused multiply-add): d = g + λ·p; with momentum
// buf = d on the first step (`fresh`), else buf = μ·buf + d, and d = buf; then p = p − lr·d.

extern "C" __global__ void sgd_step(float* p, const float* g, float* buf, long long n, float lr,
                                    float momentum, float weight_decay, int fresh) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float pi = p[i];
        float d = __fadd_rn(g[i], __fmul_rn(pi, weight_decay));
        if (buf) {
            if (!fresh) d = __fadd_rn(__fmul_rn(buf[i], momentum), d);
            buf[i] = d;
        }
        p[i] = __fsub_rn(pi, __fmul_rn(d, lr));
    }
}
