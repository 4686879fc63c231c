// Kernels of the host's training step that sere-core has no single function
// for (the host's ViT and heads do them inline on the CPU): patch
// extraction, strided row copies, drop-path residuals, ReLU, and row-wise
// L2 normalisation (DINO head). Element-wise ones use 1-D grid-stride
// loops (any grid size); the row ones use the row layout of common.cuh.

#define SERE_GRID_STRIDE(i, n)                                                          \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);      \
         i += (long long)gridDim.x * blockDim.x)

// im2col of non-overlapping p x p patches: images B x C x S x S to rows of
// C*p*p values in (c, ky, kx) order (a conv weight's order), one row per
// patch, patches row-major per image (the host's `im2col`).
extern "C" __global__ void im2col_patches(const float* img, float* out, int B, int C, int S,
                                          int p) {
    const int g = S / p;
    const long long row = (long long)C * p * p;
    const long long n = (long long)B * g * g * row;
    SERE_GRID_STRIDE(i, n) {
        const long long r = i / row;
        const int k = (int)(i % row);
        const int b = (int)(r / (g * g));
        const int pi = (int)(r % (g * g));
        const int py = pi / g, px = pi % g;
        const int c = k / (p * p), ky = (k / p) % p, kx = k % p;
        out[i] = img[(((long long)b * C + c) * S + py * p + ky) * S + px * p + kx];
    }
}

// dst[r * dst_stride + j] (+)= src[r * src_stride + j] for r < rows,
// j < cols: gathering patch or CLS rows out of token buffers and
// scattering their gradients back.
extern "C" __global__ void copy_rows(const float* src, long long src_stride, float* dst,
                                     long long dst_stride, long long rows, long long cols,
                                     int accumulate) {
    const long long n = rows * cols;
    SERE_GRID_STRIDE(i, n) {
        const long long r = i / cols, j = i % cols;
        const float v = src[r * src_stride + j];
        if (accumulate)
            dst[r * dst_stride + j] += v;
        else
            dst[r * dst_stride + j] = v;
    }
}

// out[i] = (x ? x[i] : 0) + keep[i / per] * (y ? y[i] : out[i]): the
// drop-path residual `out = x + keep_b * out` (forward, y null) and the
// branch gradient `out = keep_b * y` (backward, x null). Written as a
// separate multiply and add (no FMA) so it rounds like the CPU.
extern "C" __global__ void keep_scale_add(const float* x, const float* y, const float* keep,
                                          float* out, long long n, long long per) {
    SERE_GRID_STRIDE(i, n) {
        const float v = __fmul_rn(keep[i / per], y ? y[i] : out[i]);
        out[i] = x ? __fadd_rn(x[i], v) : v;
    }
}

// x = max(x, 0) in place.
extern "C" __global__ void relu_inplace(float* x, long long n) {
    SERE_GRID_STRIDE(i, n) { x[i] = fmaxf(x[i], 0.0f); }
}

// dx = out > 0 ? dy : 0 (overwrites; `out` is the ReLU's output).
extern "C" __global__ void relu_bwd_mask(const float* out, const float* dy, float* dx,
                                         long long n) {
    SERE_GRID_STRIDE(i, n) { dx[i] = out[i] > 0.0f ? dy[i] : 0.0f; }
}

// dst = src / max(||src_row||, eps) per row, norms = max(||src_row||, eps)
// (F.normalize for the DINO bottleneck; eps = 0 for the weight-normalised
// last layer). Launch: row layout of common.cuh.
extern "C" __global__ void l2_normalize_rows(const float* src, float* dst, float* norms, int rows,
                                             int cols, float eps) {
    __shared__ float sh[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * cols;
    float s = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) s += src[base + j] * src[base + j];
    const float ss = row_sum(s, sh);
    if (!active) return;
    const float nr = fmaxf(sqrtf(ss), eps);
    const float inv = 1.0f / nr;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) dst[base + j] = src[base + j] * inv;
    if (threadIdx.x == 0) norms[row] = nr;
}

// Per-row dot products, added: out[r] += a_r . b_r (the gradient of a
// per-row gain, e.g. the DINO head's learned weight-norm gain).
// Launch: row layout of common.cuh.
extern "C" __global__ void row_dot_add(const float* a, const float* b, float* out, int rows,
                                       int cols) {
    __shared__ float sh[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * cols;
    float s = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) s += a[base + j] * b[base + j];
    const float dot = row_sum(s, sh);
    if (active && threadIdx.x == 0) out[row] += dot;
}

// Backward of l2_normalize_rows: dst (+)= (du - u (u . du)) / norm, with
// the dot product dropped where the norm was clamped (norm <= eps: the
// divisor was a constant). Launch: row layout of common.cuh.
extern "C" __global__ void l2_normalize_rows_bwd(const float* du, const float* u,
                                                 const float* norms, float* dst, int rows,
                                                 int cols, float eps, int accumulate) {
    __shared__ float sh[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;
    const long long base = (long long)row * cols;
    float s = 0.0f;
    if (active)
        for (int j = threadIdx.x; j < cols; j += blockDim.x) s += du[base + j] * u[base + j];
    const float dot_all = row_sum(s, sh);
    if (!active) return;
    const float nr = norms[row];
    const float dot = nr > eps ? dot_all : 0.0f;
    const float inv = 1.0f / nr;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        const float v = (du[base + j] - u[base + j] * dot) * inv;
        if (accumulate)
            dst[base + j] += v;
        else
            dst[base + j] = v;
    }
}
