// Row softmax / log-softmax (sere-core `softmax`) and the attention softmax
// (a softmax of `scale * logits`), forward and backward.
//
// Launch: block (tpr, rows_per_block), grid ceil(rows / rows_per_block);
// see common.cuh. The forward is one online (max, sum) pass plus one write
// pass, so every element is read twice and written once.

// y = softmax(scale * x) per row, or log-softmax when `log_out` is non-zero.
// `y` may be `x` (in place).
extern "C" __global__ void softmax_rows_fwd(const float* x, float* y, int rows, int cols,
                                            float scale, int log_out) {
    __shared__ float sh_m[32], sh_s[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * cols;
    float m = SERE_NEG_INF, s = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) ms_push(m, s, x[base + j] * scale);
    row_ms(m, s, sh_m, sh_s);
    if (!active) return;
    if (log_out) {
        const float lse = logf(s);
        for (int j = threadIdx.x; j < cols; j += blockDim.x)
            y[base + j] = (x[base + j] * scale - m) - lse;
    } else {
        const float inv = 1.0f / s;
        for (int j = threadIdx.x; j < cols; j += blockDim.x)
            y[base + j] = expf(x[base + j] * scale - m) * inv;
    }
}

// Softmax backward from the output y: dx += scale * y * (dy - <dy, y>).
extern "C" __global__ void softmax_rows_bwd(const float* y, const float* dy, float* dx, int rows,
                                            int cols, float scale) {
    __shared__ float sh[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * cols;
    float dot = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) dot += y[base + j] * dy[base + j];
    dot = row_sum(dot, sh);
    if (!active) return;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        dx[base + j] += scale * (y[base + j] * (dy[base + j] - dot));
}

// Log-softmax backward from the output l: dx += dl - exp(l) * sum(dl).
extern "C" __global__ void log_softmax_rows_bwd(const float* l, const float* dl, float* dx,
                                                int rows, int cols) {
    __shared__ float sh[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * cols;
    float s = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) s += dl[base + j];
    s = row_sum(s, sh);
    if (!active) return;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        dx[base + j] += dl[base + j] - expf(l[base + j]) * s;
}
