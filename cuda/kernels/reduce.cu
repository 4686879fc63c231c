// Deterministic reductions: scalar sums (losses, squared norms) and column
// sums (bias gradients, batch-norm statistics, layer-/batch-norm parameter
// gradients, the DINO centre). Each is two launches with a fixed split, so
// the result does not depend on scheduling: partial sums per block, then one
// finishing pass in a fixed order.

// Scalar sum, step 1: block i writes the f64 sum of its grid-stride share of
// x (or of x^2 when `square` is non-zero) to partial[i].
// Launch: 1-D, blockDim 256, any grid size.
extern "C" __global__ void sum_partial(const float* x, long long n, int square, double* partial) {
    __shared__ double sh[32];
    double acc = 0.0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const double v = (double)x[i];
        acc += square ? v * v : v;
    }
    acc = block_sum_d(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// Scalar sum, step 2 (one block of 1024 threads): total = sum(partial).
// mode 0: out0[0] = total * mul                             (mean loss)
// mode 1: norm = sqrt(total); out0[0] = norm; if out1, out1[0] is the
//         clipping factor max_norm / (norm + 1e-6) when that is < 1 and the
//         norm is finite, else 1 (sere-core `clip_grad_norm`).
extern "C" __global__ void sum_finish(const double* partial, int nparts, int mode, double mul,
                                      float max_norm, float* out0, float* out1) {
    __shared__ double sh[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) acc += partial[i];
    acc = block_sum_d(acc, sh);
    if (threadIdx.x != 0) return;
    if (mode == 0) {
        out0[0] = (float)(acc * mul);
    } else {
        const float norm = (float)sqrt(acc);
        out0[0] = norm;
        if (out1) {
            const float c = max_norm / (norm + 1e-6f);
            out1[0] = (isfinite(norm) && c < 1.0f) ? c : 1.0f;
        }
    }
}

// Column sums, step 1: block (32, 8) sums columns [32 bx, 32 bx + 32) over
// rows [by * rows_per_chunk, (by + 1) * rows_per_chunk) into
// pa[by * cols + c] (and pb for the modes with two sums).
// mode 0: a = sum x
// mode 1: a = sum (x - cmean[c])^2
// mode 2: a = sum y, b = sum y (x - cmean[c]) crstd[c]      (batch norm: y = dy)
// mode 3: a = sum y, b = sum y (x - rmean[r]) rrstd[r]      (layer norm: y = dy)
extern "C" __global__ void col_partial(const float* x, const float* y, const float* mean,
                                       const float* rstd, int rows, int cols, int rows_per_chunk,
                                       int mode, float* pa, float* pb) {
    __shared__ float sa[8][33], sb[8][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(rows, r0 + rows_per_chunk);
    float a = 0.0f, b = 0.0f;
    if (c < cols) {
        const float cm = (mode == 1 || mode == 2) ? mean[c] : 0.0f;
        const float cr = mode == 2 ? rstd[c] : 0.0f;
        for (int r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            const long long i = (long long)r * cols + c;
            if (mode == 0) {
                a += x[i];
            } else if (mode == 1) {
                const float d = x[i] - cm;
                a += d * d;
            } else if (mode == 2) {
                const float g = y[i];
                a += g;
                b += g * ((x[i] - cm) * cr);
            } else {
                const float g = y[i];
                a += g;
                b += g * ((x[i] - mean[r]) * rstd[r]);
            }
        }
    }
    sa[threadIdx.y][threadIdx.x] = a;
    sb[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y != 0 || c >= cols) return;
    float A = 0.0f, B = 0.0f;
    for (int k = 0; k < blockDim.y; ++k) {
        A += sa[k][threadIdx.x];
        B += sb[k][threadIdx.x];
    }
    const long long o = (long long)blockIdx.y * cols + c;
    pa[o] = A;
    if (mode >= 2) pb[o] = B;
}

// Column sums, step 2: one thread per column, A = sum over chunks of pa
// (B of pb), then
// mode 0: o0[c] += A                                  (bias gradient)
// mode 1: o0[c] = A * p0                              (batch mean, p0 = 1 / rows)
// mode 2: var = A * p0; o0[c] = var;                  (biased batch variance)
//         if o1: o1[c] = 1 / sqrt(var + p1)           (rstd, p1 = eps)
// mode 3: o0[c] = p0 * o0[c] + p1 * A                 (DINO centre: p0 = momentum,
//                                                      p1 = (1 - momentum) / rows)
// mode 4: o0[c] += B; o1[c] += A;                     (dgamma, dbeta)
//         if o2: o2[c] = A, o2[cols + c] = B          (sums for the dx pass)
// Launch: 1-D, blockDim 256, grid ceil(cols / 256).
extern "C" __global__ void col_finish(const float* pa, const float* pb, int chunks, int cols,
                                      int mode, float p0, float p1, float* o0, float* o1,
                                      float* o2) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float A = 0.0f, B = 0.0f;
    for (int k = 0; k < chunks; ++k) A += pa[(long long)k * cols + c];
    if (mode == 4)
        for (int k = 0; k < chunks; ++k) B += pb[(long long)k * cols + c];
    if (mode == 0) {
        o0[c] += A;
    } else if (mode == 1) {
        o0[c] = A * p0;
    } else if (mode == 2) {
        const float var = A * p0;
        o0[c] = var;
        if (o1) o1[c] = 1.0f / sqrtf(var + p1);
    } else if (mode == 3) {
        o0[c] = p0 * o0[c] + p1 * A;
    } else {
        o0[c] += B;
        o1[c] += A;
        if (o2) {
            o2[c] = A;
            o2[cols + c] = B;
        }
    }
}
