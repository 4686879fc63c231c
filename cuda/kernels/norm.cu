// Layer norm (per row) and batch norm (per column, train and eval mode),
// sere-core `norm`: biased variance, rstd = 1 / sqrt(var + eps).
// Column statistics and parameter gradients use col_partial / col_finish
// (reduce.cu); the kernels here are the row and element-wise passes.

// Layer norm forward, fused: mean, variance and the normalised output of a
// row in one launch (the row is read from memory once, then from cache).
// Saves mean and rstd per row. Launch: row layout of common.cuh.
extern "C" __global__ void layer_norm_fwd(const float* x, const float* gamma, const float* beta,
                                          float* y, float* mean, float* rstd, int rows, int cols,
                                          float eps) {
    __shared__ float sh[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * cols;
    const float inv = 1.0f / (float)cols;
    float s = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) s += x[base + j];
    const float mu = row_sum(s, sh) * inv;
    float q = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            const float d = x[base + j] - mu;
            q += d * d;
        }
    const float var = row_sum(q, sh) * inv;
    if (!active) return;
    const float rs = 1.0f / sqrtf(var + eps);
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        y[base + j] = (x[base + j] - mu) * rs * gamma[j] + beta[j];
    if (threadIdx.x == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

// Layer norm backward to the input:
// dx += rstd * (dy gamma - mean(dy gamma) - xhat * mean(dy gamma xhat)).
// (dgamma, dbeta: col_partial mode 3 + col_finish mode 4.)
extern "C" __global__ void layer_norm_bwd_dx(const float* x, const float* gamma, const float* mean,
                                             const float* rstd, const float* dy, float* dx,
                                             int rows, int cols) {
    __shared__ float sh[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * cols;
    const float mu = active ? mean[row] : 0.0f;
    const float rs = active ? rstd[row] : 0.0f;
    float sd = 0.0f, sdx = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) {
            const float xhat = (x[base + j] - mu) * rs;
            const float d = dy[base + j] * gamma[j];
            sd += d;
            sdx += d * xhat;
        }
    const float inv = 1.0f / (float)cols;
    const float mean_d = row_sum(sd, sh) * inv;
    const float mean_dx = row_sum(sdx, sh) * inv;
    if (!active) return;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float xhat = (x[base + j] - mu) * rs;
        dx[base + j] += rs * (dy[base + j] * gamma[j] - mean_d - xhat * mean_dx);
    }
}

// Batch norm, normalisation with given per-column mean and rstd:
// y = (x - mean[c]) * rstd[c] * gamma[c] + beta[c]. Train mode passes the
// batch statistics; eval mode (`running` non-zero) takes rstd from the
// running variance: rstd = 1 / sqrt(var[c] + eps).
// Launch: 1-D grid-stride over rows * cols.
extern "C" __global__ void batch_norm_apply(const float* x, const float* mean, const float* rstd_or_var,
                                            const float* gamma, const float* beta, float* y,
                                            long long n, int cols, int running, float eps) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int c = (int)(i % cols);
        const float rs = running ? 1.0f / sqrtf(rstd_or_var[c] + eps) : rstd_or_var[c];
        y[i] = (x[i] - mean[c]) * rs * gamma[c] + beta[c];
    }
}

// Batch norm backward to the input, given sums = [sum dy | sum dy xhat]
// per column (col_finish mode 4):
// dx += gamma rstd (dy - (sum_dy + xhat sum_dyx) / rows).
extern "C" __global__ void batch_norm_bwd_dx(const float* x, const float* dy, const float* gamma,
                                             const float* mean, const float* rstd,
                                             const float* sums, float* dx, long long n, int cols,
                                             float inv_rows) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int c = (int)(i % cols);
        const float xhat = (x[i] - mean[c]) * rstd[c];
        dx[i] += gamma[c] * rstd[c] * (dy[i] - (sums[c] + xhat * sums[cols + c]) * inv_rows);
    }
}

// PyTorch's running-statistics update: running = (1 - m) running + m batch,
// with the unbiased variance (var * unbias) for running_var.
extern "C" __global__ void batch_norm_running(const float* mean, const float* var, float* rmean,
                                              float* rvar, int cols, float momentum,
                                              float one_minus, float unbias) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    rmean[c] = one_minus * rmean[c] + momentum * mean[c];
    rvar[c] = one_minus * rvar[c] + momentum * var[c] * unbias;
}
