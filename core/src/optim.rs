//! Parameter updates over flat buffers: AdamW (PyTorch semantics, decoupled
//! weight decay), the teacher's exponential moving average, and gradient-norm
//! clipping.

use crate::error::{check_len, Error, Result};
use crate::simd::sqrt8;
use libm::{powf, sqrtf};

/// AdamW hyper-parameters for one step.
///
/// ```
/// use sere_core::optim::AdamW;
/// let opt = AdamW { lr: 5e-4, weight_decay: 0.04, ..AdamW::default() };
/// assert_eq!(opt.beta2, 0.999);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator term added after the bias-corrected square root.
    pub eps: f32,
    /// Decoupled weight decay (`p -= lr * wd * p`); 0 for biases and norms.
    pub weight_decay: f32,
}

impl Default for AdamW {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, wd 0.01.
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One AdamW step (the `step`-th, counting from 1) on `params` with `grads`
/// and moment buffers `m`, `v`, exactly as `torch.optim.AdamW`:
/// `p *= 1 - lr wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;`
/// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
///
/// ```
/// use sere_core::optim::{adamw_step, AdamW};
/// let (mut p, mut m, mut v) = ([1.0f32], [0.0f32], [0.0f32]);
/// let opt = AdamW { lr: 0.1, weight_decay: 0.0, ..AdamW::default() };
/// adamw_step(&mut p, &[0.5], &mut m, &mut v, &opt, 1).unwrap();
/// assert!((p[0] - 0.9).abs() < 1e-6); // the first step moves by lr * sign(g)
/// ```
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    opt: &AdamW,
    step: u32,
) -> Result<()> {
    let n = params.len();
    check_len("grads", grads.len(), n)?;
    check_len("m", m.len(), n)?;
    check_len("v", v.len(), n)?;
    if step == 0 {
        return Err(Error::InvalidArgument {
            what: "step",
            requirement: "counts from 1",
        });
    }
    let ok = |b: f32| (0.0..1.0).contains(&b);
    if !(ok(opt.beta1) && ok(opt.beta2)) {
        return Err(Error::InvalidArgument {
            what: "betas",
            requirement: "must be in [0, 1)",
        });
    }
    if !(opt.lr.is_finite() && opt.eps.is_finite() && opt.weight_decay.is_finite()) {
        return Err(Error::NonFinite {
            what: "AdamW hyper-parameters",
        });
    }
    let t = step as f32;
    let bc1 = 1.0 - powf(opt.beta1, t);
    let bc2_sqrt = sqrtf(1.0 - powf(opt.beta2, t));
    let step_size = opt.lr / bc1;
    let decay = 1.0 - opt.lr * opt.weight_decay;
    let (b1, b2, eps) = (opt.beta1, opt.beta2, opt.eps);
    adamw_elements(params, grads, m, v, b1, b2, eps, decay, step_size, bc2_sqrt);
    Ok(())
}

/// Teacher EMA: `teacher = momentum * teacher + (1 - momentum) * student`.
///
/// ```
/// use sere_core::optim::ema_update;
/// let mut t = [1.0f32, 0.0];
/// ema_update(&mut t, &[0.0, 1.0], 0.75).unwrap();
/// assert_eq!(t, [0.75, 0.25]);
/// ```
pub fn ema_update(teacher: &mut [f32], student: &[f32], momentum: f32) -> Result<()> {
    check_len("student", student.len(), teacher.len())?;
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::InvalidArgument {
            what: "momentum",
            requirement: "must be in [0, 1]",
        });
    }
    let w = 1.0 - momentum;
    ema_elements(teacher, student, momentum, w);
    Ok(())
}

/// Euclidean norm of a buffer, accumulated in f64.
///
/// ```
/// use sere_core::optim::l2_norm;
/// assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
/// ```
pub fn l2_norm(xs: &[f32]) -> f32 {
    let s: f64 = xs.iter().map(|&x| (x as f64) * (x as f64)).sum();
    libm::sqrt(s) as f32
}

/// Clips a gradient to norm `max_norm` as DINO does: if
/// `c = max_norm / (norm + 1e-6) < 1`, scales the gradient by `c`.
/// Returns the norm before clipping; a non-finite norm is an error (the
/// gradient is left as it was so the caller can report it).
///
/// ```
/// use sere_core::optim::clip_grad_norm;
/// let mut g = [3.0f32, 4.0];
/// assert_eq!(clip_grad_norm(&mut g, 1.0).unwrap(), 5.0);
/// assert!((g[0] - 0.6).abs() < 1e-6);
/// ```
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f32) -> Result<f32> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::InvalidArgument {
            what: "max_norm",
            requirement: "must be finite and > 0",
        });
    }
    let norm = l2_norm(grads);
    if !norm.is_finite() {
        return Err(Error::NonFinite {
            what: "gradient norm",
        });
    }
    let c = max_norm / (norm + 1e-6);
    if c < 1.0 {
        grads.iter_mut().for_each(|g| *g *= c);
    }
    Ok(norm)
}

crate::simd::multiversion! {
    fn adamw_elements(
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        b1: f32,
        b2: f32,
        eps: f32,
        decay: f32,
        step_size: f32,
        bc2_sqrt: f32,
    ) {
        // The moments of one element, then its update given sqrt(v).
        let moments = |g: f32, m: &mut f32, v: &mut f32| {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
        };
        let update = |p: &mut f32, m: f32, sqrt_v: f32| {
            *p = *p * decay - step_size * m / (sqrt_v / bc2_sqrt + eps);
        };

        // 8 elements at a time so the square roots vectorise (`sqrt8`).
        let mut pc = params.chunks_exact_mut(8);
        let mut gc = grads.chunks_exact(8);
        let mut mc = m.chunks_exact_mut(8);
        let mut vc = v.chunks_exact_mut(8);
        for (((p, g), m), v) in (&mut pc).zip(&mut gc).zip(&mut mc).zip(&mut vc) {
            let mut vv = [0.0f32; 8];
            for i in 0..8 {
                moments(g[i], &mut m[i], &mut v[i]);
                vv[i] = v[i];
            }
            let sv = sqrt8(vv);
            for i in 0..8 {
                update(&mut p[i], m[i], sv[i]);
            }
        }
        let (p, g) = (pc.into_remainder(), gc.remainder());
        let (m, v) = (mc.into_remainder(), vc.into_remainder());
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
            moments(g, m, v);
            update(p, *m, sqrtf(*v));
        }
    }
}

crate::simd::multiversion! {
    fn ema_elements(teacher: &mut [f32], student: &[f32], momentum: f32, w: f32) {
        for (t, &s) in teacher.iter_mut().zip(student) {
            *t = momentum * *t + w * s;
        }
    }
}
