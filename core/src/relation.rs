//! Feature self-relations: the logits whose row softmax is SERE's spatial
//! relation (per head, over tokens) and channel relation (over channels).
//!
//! Tokens `x` are `n x c`, row-major (one row per token / sampled point).
//! Both products are SGEMMs on strided views of `x`, so heads are read in
//! place. Backward uses the symmetry `d(X Y^T)` with `Y = X`: the gradient
//! of `X X^T` w.r.t. `X` is `(G + G^T) X`.

use crate::error::{check_len, check_nonzero, shape_product, Error, Result};
use crate::linalg::{gemm, MatRef};
use libm::sqrtf;

fn check_heads(n: usize, c: usize, heads: usize) -> Result<usize> {
    check_nonzero("n", n)?;
    check_nonzero("c", c)?;
    check_nonzero("heads", heads)?;
    if c % heads != 0 {
        return Err(Error::InvalidArgument {
            what: "heads",
            requirement: "must divide the channel count c",
        });
    }
    Ok(c / heads)
}

/// Spatial self-relation logits: for each head `h` with `d = c / heads`
/// channels, `logits[h] = X_h X_h^T / sqrt(d)` (`heads x n x n`).
///
/// ```
/// use sere_core::relation::spatial_relation_forward;
/// let x = [1.0f32, 0.0, 0.0, 1.0]; // 2 tokens, 2 channels
/// let mut logits = [0.0f32; 4];
/// spatial_relation_forward(&x, 2, 2, 1, &mut logits).unwrap();
/// let r = 1.0 / 2f32.sqrt();
/// assert_eq!(logits, [r, 0.0, 0.0, r]);
/// ```
pub fn spatial_relation_forward(
    x: &[f32],
    n: usize,
    c: usize,
    heads: usize,
    logits: &mut [f32],
) -> Result<()> {
    let d = check_heads(n, c, heads)?;
    check_len("x", x.len(), shape_product("n x c", &[n, c])?)?;
    check_len(
        "logits",
        logits.len(),
        shape_product("heads x n x n", &[heads, n, n])?,
    )?;
    let alpha = 1.0 / sqrtf(d as f32);
    let xm = MatRef::row_major(n, c);
    for h in 0..heads {
        let xh = MatRef { cols: d, ..xm }.at(h * d);
        gemm(
            alpha,
            x,
            xh,
            x,
            xh.transposed(),
            0.0,
            logits,
            MatRef::row_major(n, n).at(h * n * n),
        )?;
    }
    Ok(())
}

/// Backward of [`spatial_relation_forward`]: given `grad_logits`
/// (`heads x n x n`), adds `(G_h + G_h^T) X_h / sqrt(d)` to each head's
/// columns of `grad_x` (`n x c`).
///
/// ```
/// use sere_core::relation::spatial_relation_backward;
/// let x = [1.0f32, 2.0]; // 1 token, 2 channels, 2 heads
/// let mut gx = [0.0f32; 2];
/// spatial_relation_backward(&x, &[1.0, 1.0], 1, 2, 2, &mut gx).unwrap();
/// assert_eq!(gx, [2.0, 4.0]); // d(x^2)/dx = 2x, d = 1
/// ```
pub fn spatial_relation_backward(
    x: &[f32],
    grad_logits: &[f32],
    n: usize,
    c: usize,
    heads: usize,
    grad_x: &mut [f32],
) -> Result<()> {
    let d = check_heads(n, c, heads)?;
    let nc = shape_product("n x c", &[n, c])?;
    check_len("x", x.len(), nc)?;
    check_len("grad_x", grad_x.len(), nc)?;
    check_len(
        "grad_logits",
        grad_logits.len(),
        shape_product("heads x n x n", &[heads, n, n])?,
    )?;
    let alpha = 1.0 / sqrtf(d as f32);
    let xm = MatRef::row_major(n, c);
    for h in 0..heads {
        let xh = MatRef { cols: d, ..xm }.at(h * d);
        let g = MatRef::row_major(n, n).at(h * n * n);
        gemm(alpha, grad_logits, g, x, xh, 1.0, grad_x, xh)?;
        gemm(alpha, grad_logits, g.transposed(), x, xh, 1.0, grad_x, xh)?;
    }
    Ok(())
}

/// Channel self-relation logits: `logits = X^T X / n` (`c x c`, symmetric).
///
/// ```
/// use sere_core::relation::channel_relation_forward;
/// let x = [1.0f32, 2.0, 3.0, 4.0]; // 2 tokens, 2 channels
/// let mut logits = [0.0f32; 4];
/// channel_relation_forward(&x, 2, 2, &mut logits).unwrap();
/// assert_eq!(logits, [5.0, 7.0, 7.0, 10.0]);
/// ```
pub fn channel_relation_forward(x: &[f32], n: usize, c: usize, logits: &mut [f32]) -> Result<()> {
    check_nonzero("n", n)?;
    check_nonzero("c", c)?;
    check_len("x", x.len(), shape_product("n x c", &[n, c])?)?;
    check_len("logits", logits.len(), shape_product("c x c", &[c, c])?)?;
    let xm = MatRef::row_major(n, c);
    gemm(
        1.0 / n as f32,
        x,
        xm.transposed(),
        x,
        xm,
        0.0,
        logits,
        MatRef::row_major(c, c),
    )
}

/// Backward of [`channel_relation_forward`]: adds `X (G + G^T) / n` to
/// `grad_x`.
///
/// ```
/// use sere_core::relation::channel_relation_backward;
/// let x = [1.0f32, 2.0]; // 1 token, 2 channels
/// let mut gx = [0.0f32; 2];
/// channel_relation_backward(&x, &[1.0, 0.0, 0.0, 0.0], 1, 2, &mut gx).unwrap();
/// assert_eq!(gx, [2.0, 0.0]); // d(x0^2)/dx0 = 2 x0
/// ```
pub fn channel_relation_backward(
    x: &[f32],
    grad_logits: &[f32],
    n: usize,
    c: usize,
    grad_x: &mut [f32],
) -> Result<()> {
    check_nonzero("n", n)?;
    check_nonzero("c", c)?;
    let nc = shape_product("n x c", &[n, c])?;
    check_len("x", x.len(), nc)?;
    check_len("grad_x", grad_x.len(), nc)?;
    check_len(
        "grad_logits",
        grad_logits.len(),
        shape_product("c x c", &[c, c])?,
    )?;
    let alpha = 1.0 / n as f32;
    let xm = MatRef::row_major(n, c);
    let g = MatRef::row_major(c, c);
    gemm(alpha, x, xm, grad_logits, g, 1.0, grad_x, xm)?;
    gemm(alpha, x, xm, grad_logits, g.transposed(), 1.0, grad_x, xm)
}
