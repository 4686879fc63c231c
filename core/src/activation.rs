//! GELU in its exact erf form (PyTorch's default `approximate="none"`):
//! `gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`. `erf` is evaluated
//! to 1e-6 absolute (relative 1e-6 of `gelu`) by a vectorisable rational
//! approximation, not PyTorch's `tanh` approximation.

use crate::error::{check_len, Result};
use crate::fastmath::{erf as erff, erf_and_gauss};
use core::f32::consts::FRAC_1_SQRT_2;

/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// GELU of one value.
///
/// ```
/// use sere_core::activation::gelu;
/// assert_eq!(gelu(0.0), 0.0);
/// assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
/// ```
#[inline]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erff(x * FRAC_1_SQRT_2))
}

/// Derivative of GELU: `Phi(x) + x * phi(x)`.
///
/// ```
/// use sere_core::activation::gelu_grad;
/// assert!((gelu_grad(0.0) - 0.5).abs() < 1e-6);
/// ```
#[inline]
pub fn gelu_grad(x: f32) -> f32 {
    // One exp: erf's Gaussian factor at x / sqrt 2 is exp(-x^2 / 2).
    let (erf, gauss) = erf_and_gauss(x * FRAC_1_SQRT_2);
    0.5 * (1.0 + erf) + x * INV_SQRT_2PI * gauss
}

/// Element-wise GELU: `out[i] = gelu(x[i])`.
///
/// ```
/// use sere_core::activation::gelu_forward;
/// let mut y = [0.0f32; 2];
/// gelu_forward(&[0.0, 10.0], &mut y).unwrap();
/// assert_eq!(y, [0.0, 10.0]);
/// ```
pub fn gelu_forward(x: &[f32], out: &mut [f32]) -> Result<()> {
    check_len("out", out.len(), x.len())?;
    gelu_slice(x, out);
    Ok(())
}

/// Backward of [`gelu_forward`]: adds `dy * gelu'(x)` to `dx`.
///
/// ```
/// use sere_core::activation::gelu_backward;
/// let mut dx = [1.0f32];
/// gelu_backward(&[0.0], &[2.0], &mut dx).unwrap();
/// assert!((dx[0] - 2.0).abs() < 1e-6); // 1 + 2 * 0.5
/// ```
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
    check_len("dy", dy.len(), x.len())?;
    check_len("dx", dx.len(), x.len())?;
    gelu_grad_slice(x, dy, dx);
    Ok(())
}

/// In-place chain rule through GELU: `d *= gelu'(x)` element-wise (the MLP
/// backward when `d` holds the gradient of the GELU output and is not
/// needed afterwards).
///
/// ```
/// use sere_core::activation::gelu_grad_in_place;
/// let mut d = [2.0f32];
/// gelu_grad_in_place(&[0.0], &mut d).unwrap();
/// assert!((d[0] - 1.0).abs() < 1e-6); // gelu'(0) = 1/2
/// ```
pub fn gelu_grad_in_place(x: &[f32], d: &mut [f32]) -> Result<()> {
    check_len("d", d.len(), x.len())?;
    gelu_grad_scale(x, d);
    Ok(())
}

crate::simd::multiversion! {
    fn gelu_grad_scale(x: &[f32], d: &mut [f32]) {
        for (g, &v) in d.iter_mut().zip(x) {
            *g *= gelu_grad(v);
        }
    }
}

crate::simd::multiversion! {
    fn gelu_slice(x: &[f32], out: &mut [f32]) {
        for (y, &v) in out.iter_mut().zip(x) {
            *y = gelu(v);
        }
    }
}

crate::simd::multiversion! {
    fn gelu_grad_slice(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            *d += g * gelu_grad(v);
        }
    }
}
