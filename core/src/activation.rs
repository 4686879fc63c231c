//! GELU in its exact erf form (PyTorch's default `approximate="none"`):
//! `gelu(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`. `erf` is evaluated
//! to 1e-6 absolute (relative 1e-6 of `gelu`) by a vectorisable rational
//! approximation, not PyTorch's `tanh` approximation.

use crate::error::{check_len, Result};
use crate::fastmath::{erf as erff, exp as expf};
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
    0.5 * (1.0 + erff(x * FRAC_1_SQRT_2)) + x * INV_SQRT_2PI * expf(-0.5 * x * x)
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
    for (y, &v) in out.iter_mut().zip(x) {
        *y = gelu(v);
    }
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
    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
        *d += g * gelu_grad(v);
    }
    Ok(())
}
