// Element-wise kernels: GELU (erf form), bias add, scaling, AdamW (PyTorch
// semantics) and the teacher EMA (sere-core `activation`, `optim`).
// Launch: 1-D grid-stride loops, any grid size.

#define SERE_GRID_STRIDE(i, n)                                                          \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);      \
         i += (long long)gridDim.x * blockDim.x)

// y = gelu(x) = 0.5 x (1 + erf(x / sqrt 2)).
extern "C" __global__ void gelu_fwd(const float* x, float* y, long long n) {
    SERE_GRID_STRIDE(i, n) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.0f + erff(v * 0.70710677f));
    }
}

// dx += dy * gelu'(x), gelu'(x) = Phi(x) + x phi(x).
extern "C" __global__ void gelu_bwd(const float* x, const float* dy, float* dx, long long n) {
    SERE_GRID_STRIDE(i, n) {
        const float v = x[i];
        const float g = 0.5f * (1.0f + erff(v * 0.70710677f)) + v * 0.3989423f * expf(-0.5f * v * v);
        dx[i] += dy[i] * g;
    }
}

// y[r, c] += bias[c] over a rows x cols matrix (n = rows * cols).
extern "C" __global__ void bias_add(float* y, const float* bias, long long n, int cols) {
    SERE_GRID_STRIDE(i, n) { y[i] += bias[i % cols]; }
}

// x *= alpha, times factor[0] when `factor` is not null (a device scalar,
// e.g. the clipping factor of sum_finish mode 1: no host round trip).
extern "C" __global__ void scale_inplace(float* x, long long n, float alpha, const float* factor) {
    const float a = factor ? alpha * factor[0] : alpha;
    SERE_GRID_STRIDE(i, n) { x[i] *= a; }
}

// y += alpha * x.
extern "C" __global__ void axpy(float* y, const float* x, long long n, float alpha) {
    SERE_GRID_STRIDE(i, n) { y[i] += alpha * x[i]; }
}

// One AdamW step, as torch.optim.AdamW (and sere-core `adamw_step`):
// p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= step_size * m / (sqrt(v) / bc2_sqrt + eps), step_size = lr / (1 - b1^t).
// The gradient is multiplied by gscale[0] when `gscale` is not null (the
// device-side clipping factor).
extern "C" __global__ void adamw_step(float* p, const float* grad, float* m, float* v, long long n,
                                      float b1, float b2, float one_minus_b1, float one_minus_b2,
                                      float eps, float step_size, float decay, float bc2_sqrt,
                                      const float* gscale) {
    const float gs = gscale ? gscale[0] : 1.0f;
    SERE_GRID_STRIDE(i, n) {
        const float g = gscale ? grad[i] * gs : grad[i];
        const float mi = b1 * m[i] + one_minus_b1 * g;
        const float vi = b2 * v[i] + one_minus_b2 * g * g;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = p[i] * decay - step_size * mi / denom;
    }
}

// Teacher EMA: t = momentum t + (1 - momentum) s.
extern "C" __global__ void ema_update(float* t, const float* s, long long n, float momentum,
                                      float one_minus) {
    SERE_GRID_STRIDE(i, n) { t[i] = momentum * t[i] + one_minus * s[i]; }
}
