//! Cross-entropy between a sharpened teacher distribution and a student
//! distribution, row by row: the relation loss of SERE and the image-level
//! DINO loss are both built on one row kernel.
//!
//! For one row with teacher logits `t`, student logits `s`, an optional
//! teacher centre `c` and temperatures `tau_t`, `tau_s`:
//! `q = softmax((t - c) / tau_t)`, `p = softmax(s / tau_s)`,
//! `loss = -sum_k q_k log p_k` and `dloss/ds = (p - q) / tau_s`.
//! The teacher is detached: no gradient flows to it.
//!
//! The loss is evaluated as `ln Z_s + sum_k q_k (m_s - s_k / tau_s)` with
//! `m_s` the row maximum of `s / tau_s`: every term is non-negative, so there
//! is no cancellation even for logits of magnitude 1e4.

use crate::error::{check_len, check_nonzero, check_positive, shape_product, Error, Result};
use crate::fastmath::exp as expf;
use crate::simd::{max_zip, sum, sum_zip, sum_zip3_blocked};
use crate::softmax::row_max;
use libm::logf;

/// Cross-entropy of one row; adds `scale * dloss/ds` to `grad` if given.
///
/// All slices must have equal length (checked by the callers). Returns the
/// row's loss. Without a centre the teacher row stands in for it and is
/// ignored (`tc` picks the plain or centred teacher logit), so one
/// vectorisable body serves both the relation and the DINO loss.
fn ce_row(
    s: &[f32],
    t: &[f32],
    centre: Option<&[f32]>,
    tau_s: f32,
    tau_t: f32,
    grad: Option<(&mut [f32], f32)>,
) -> Result<f64> {
    match centre {
        Some(c) => ce_row_centred(s, t, c, true, tau_s, tau_t, grad),
        None => ce_row_centred(s, t, t, false, tau_s, tau_t, grad),
    }
}

crate::simd::multiversion! {
    /// [`ce_row`] with the centre `c` subtracted from `t` when `centred`.
    fn ce_row_centred(
        s: &[f32],
        t: &[f32],
        c: &[f32],
        centred: bool,
        tau_s: f32,
        tau_t: f32,
        grad: Option<(&mut [f32], f32)>,
    ) -> Result<f64> {
        let inv_ts = 1.0 / tau_s;
        let inv_tt = 1.0 / tau_t;
        let ms = row_max(s, "student logits")? * inv_ts;
        row_max(t, "teacher logits")?;
        if !ms.is_finite() {
            return Err(Error::NonFinite {
                what: "student logits / tau_s (overflow)",
            });
        }
        // Centred, sharpened teacher logit; `centred` is loop-invariant, so
        // LLVM unswitches the loops on it.
        let tc = |tv: f32, cv: f32| {
            if centred {
                (tv - cv) * inv_tt
            } else {
                tv * inv_tt
            }
        };
        let mt = max_zip(t, c, tc);
        if !mt.is_finite() {
            return Err(Error::NonFinite {
                what: "centred teacher logits",
            });
        }
        let zs = sum_zip3_blocked(s, s, s, |v, _, _| expf(v * inv_ts - ms));
        let zt = sum_zip3_blocked(t, c, c, |tv, cv, _| expf(tc(tv, cv) - mt));
        let inv_zt = 1.0 / zt;
        let cross = sum_zip3_blocked(s, t, c, |sv, tv, cv| {
            let q = expf(tc(tv, cv) - mt) * inv_zt;
            // q = 0 terms contribute nothing (and stay 0 for any s).
            if q > 0.0 {
                q * (ms - sv * inv_ts)
            } else {
                0.0
            }
        });
        if let Some((g, scale)) = grad {
            let inv_zs = 1.0 / zs;
            let f = scale * inv_ts;
            // A NaN/infinite scale, or `scale / tau_s` overflowing, would silently
            // poison the gradient while the loss itself is fine.
            if !f.is_finite() {
                return Err(Error::NonFinite {
                    what: "gradient scale / tau_s",
                });
            }
            for (((gk, &sv), &tv), &cv) in g.iter_mut().zip(s).zip(t).zip(c) {
                let p = expf(sv * inv_ts - ms) * inv_zs;
                let q = expf(tc(tv, cv) - mt) * inv_zt;
                *gk += f * (p - q);
            }
        }
        let loss = logf(zs) as f64 + cross as f64;
        if loss.is_finite() {
            Ok(loss)
        } else {
            Err(Error::NonFinite {
                what: "cross-entropy (logits too large for the temperatures)",
            })
        }
    }
}

/// The accumulated student gradient must be finite: `scale / tau_s` near the
/// top of the `f32` range, summed over several terms, can overflow even when
/// each term is finite. On this error the buffer's contents are unspecified.
fn check_grad(grad: &[f32]) -> Result<()> {
    row_max(
        grad,
        "accumulated student gradient (overflow: scale / tau_s too large, or a non-finite input buffer)",
    )
    .map(|_| ())
}

fn check_ce(
    student: &[f32],
    teacher: &[f32],
    rows: usize,
    cols: usize,
    tau_s: f32,
    tau_t: f32,
) -> Result<()> {
    check_nonzero("rows", rows)?;
    check_nonzero("cols", cols)?;
    check_positive("tau_s", tau_s)?;
    check_positive("tau_t", tau_t)?;
    let n = shape_product("rows x cols", &[rows, cols])?;
    check_len("student", student.len(), n)?;
    check_len("teacher", teacher.len(), n)
}

/// Relation cross-entropy: mean over the `rows` rows of
/// `-sum_k softmax(T_k / tau_t) log softmax(S_k / tau_s)`.
///
/// ```
/// use sere_core::loss::relation_cross_entropy;
/// let s = [0.0f32, 0.0];
/// let loss = relation_cross_entropy(&s, &[5.0, -5.0], 1, 2, 1.0, 0.1).unwrap();
/// assert!((loss - core::f32::consts::LN_2).abs() < 1e-6);
/// ```
pub fn relation_cross_entropy(
    student: &[f32],
    teacher: &[f32],
    rows: usize,
    cols: usize,
    tau_s: f32,
    tau_t: f32,
) -> Result<f32> {
    check_ce(student, teacher, rows, cols, tau_s, tau_t)?;
    let mut total = 0.0f64;
    for (s, t) in student.chunks_exact(cols).zip(teacher.chunks_exact(cols)) {
        total += ce_row(s, t, None, tau_s, tau_t, None)?;
    }
    Ok((total / rows as f64) as f32)
}

/// [`relation_cross_entropy`] and its gradient: adds `scale * dL/dS` to
/// `grad_student` (so several loss terms can accumulate into one buffer) and
/// returns the loss. The teacher gets no gradient.
///
/// Fails with [`Error::NonFinite`] if the accumulated gradient is not
/// finite (`scale / tau_s` near the top of the `f32` range, or a non-finite
/// value already in the buffer); the buffer's contents are then unspecified.
///
/// ```
/// use sere_core::loss::relation_cross_entropy_backward;
/// let logits = [1.0f32, -2.0, 0.5];
/// let mut g = [0.0f32; 3];
/// // Student equal to teacher at equal temperatures: the gradient vanishes.
/// relation_cross_entropy_backward(&logits, &logits, 1, 3, 0.5, 0.5, 1.0, &mut g).unwrap();
/// assert!(g.iter().all(|v| v.abs() < 1e-6));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn relation_cross_entropy_backward(
    student: &[f32],
    teacher: &[f32],
    rows: usize,
    cols: usize,
    tau_s: f32,
    tau_t: f32,
    scale: f32,
    grad_student: &mut [f32],
) -> Result<f32> {
    check_ce(student, teacher, rows, cols, tau_s, tau_t)?;
    check_len("grad_student", grad_student.len(), student.len())?;
    let row_scale = scale / rows as f32;
    let mut total = 0.0f64;
    for ((s, t), g) in student
        .chunks_exact(cols)
        .zip(teacher.chunks_exact(cols))
        .zip(grad_student.chunks_exact_mut(cols))
    {
        total += ce_row(s, t, None, tau_s, tau_t, Some((g, row_scale)))?;
    }
    check_grad(grad_student)?;
    Ok((total / rows as f64) as f32)
}

crate::simd::multiversion! {
    /// One row of [`soft_target_cross_entropy`]: `s` logits, `q` target.
    fn soft_target_row(
        s: &[f32],
        q: &[f32],
        tau_s: f32,
        grad: Option<(&mut [f32], f32)>,
    ) -> Result<f64> {
        let inv_ts = 1.0 / tau_s;
        let ms = row_max(s, "student logits")? * inv_ts;
        row_max(q, "target probabilities")?;
        if !ms.is_finite() {
            return Err(Error::NonFinite {
                what: "student logits / tau_s (overflow)",
            });
        }
        let zs = sum_zip3_blocked(s, s, s, |v, _, _| expf(v * inv_ts - ms));
        let mass = sum(q);
        // -sum q log p = sum q (ms - s / tau_s) + mass ln zs; every term of
        // the first sum is non-negative.
        let cross = sum_zip(q, s, |qv, sv| qv * (ms - sv * inv_ts));
        if let Some((g, scale)) = grad {
            let f = scale * inv_ts;
            if !f.is_finite() {
                return Err(Error::NonFinite {
                    what: "gradient scale / tau_s",
                });
            }
            // d/ds_k = (mass p_k - q_k) / tau_s (mass = 1 for a distribution).
            let fp = f * mass / zs;
            for ((gk, &sv), &qv) in g.iter_mut().zip(s).zip(q) {
                *gk += fp * expf(sv * inv_ts - ms) - f * qv;
            }
        }
        let loss = mass as f64 * logf(zs) as f64 + cross as f64;
        if loss.is_finite() {
            Ok(loss)
        } else {
            Err(Error::NonFinite {
                what: "cross-entropy (logits too large for the temperature)",
            })
        }
    }
}

/// Cross-entropy of the student against a given target distribution per row
/// (for instance a sharpened teacher softmax computed once and shared by
/// several students): mean over the `rows` rows of
/// `-sum_k q_k log softmax(S / tau_s)_k`. With `grad` = `Some((g, scale))`
/// it adds `scale * dL/dS` to `g`. Same loss and gradient as
/// [`relation_cross_entropy_backward`] given `q = softmax(T / tau_t)`, at two
/// exponentials per element instead of five.
///
/// Fails with [`Error::NonFinite`] if the accumulated gradient is not
/// finite (`scale / tau_s` near the top of the `f32` range, or a non-finite
/// value already in the buffer); the buffer's contents are then unspecified.
///
/// ```
/// use sere_core::loss::soft_target_cross_entropy;
/// let s = [0.0f32, 0.0];
/// let mut g = [0.0f32; 2];
/// let loss = soft_target_cross_entropy(&s, &[1.0, 0.0], 1, 2, 1.0, Some((&mut g, 1.0))).unwrap();
/// assert!((loss - core::f32::consts::LN_2).abs() < 1e-6);
/// assert!((g[0] + 0.5).abs() < 1e-6 && (g[1] - 0.5).abs() < 1e-6);
/// ```
pub fn soft_target_cross_entropy(
    student: &[f32],
    target: &[f32],
    rows: usize,
    cols: usize,
    tau_s: f32,
    grad: Option<(&mut [f32], f32)>,
) -> Result<f32> {
    check_ce(student, target, rows, cols, tau_s, 1.0)?;
    let mut total = 0.0f64;
    match grad {
        Some((g, scale)) => {
            check_len("grad_student", g.len(), student.len())?;
            let row_scale = scale / rows as f32;
            for ((s, q), gr) in student
                .chunks_exact(cols)
                .zip(target.chunks_exact(cols))
                .zip(g.chunks_exact_mut(cols))
            {
                total += soft_target_row(s, q, tau_s, Some((gr, row_scale)))?;
            }
            check_grad(g)?;
        }
        None => {
            for (s, q) in student.chunks_exact(cols).zip(target.chunks_exact(cols)) {
                total += soft_target_row(s, q, tau_s, None)?;
            }
        }
    }
    Ok((total / rows as f64) as f32)
}

/// Shapes of the DINO loss: `student` is `[student_views][batch][dim]`,
/// `teacher` is `[teacher_views][batch][dim]`; the teacher's views are the
/// first `teacher_views` of the student's (the global crops), and a view is
/// never compared with itself.
///
/// ```
/// use sere_core::loss::DinoShape;
/// let shape = DinoShape { student_views: 4, teacher_views: 2, batch: 8, dim: 16 };
/// assert_eq!(shape.pairs(), 6);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DinoShape {
    /// Number of student views (global then local crops).
    pub student_views: usize,
    /// Number of teacher views (the global crops).
    pub teacher_views: usize,
    /// Images per batch.
    pub batch: usize,
    /// Output dimension `K` of the DINO head.
    pub dim: usize,
}

impl DinoShape {
    /// Number of (teacher view, student view) pairs averaged by the loss.
    ///
    /// ```
    /// use sere_core::loss::DinoShape;
    /// let s = DinoShape { student_views: 12, teacher_views: 2, batch: 1, dim: 1 };
    /// assert_eq!(s.pairs(), 22);
    /// ```
    pub fn pairs(&self) -> usize {
        self.teacher_views * self.student_views - self.teacher_views.min(self.student_views)
    }

    fn validate(&self, student: &[f32], teacher: &[f32], centre: &[f32]) -> Result<()> {
        check_nonzero("student_views", self.student_views)?;
        check_nonzero("teacher_views", self.teacher_views)?;
        check_nonzero("batch", self.batch)?;
        check_nonzero("dim", self.dim)?;
        if self.pairs() == 0 {
            return Err(Error::InvalidArgument {
                what: "views",
                requirement: "need at least one teacher/student pair of different views",
            });
        }
        let row = shape_product("batch x dim", &[self.batch, self.dim])?;
        check_len(
            "student",
            student.len(),
            shape_product("student shape", &[self.student_views, row])?,
        )?;
        check_len(
            "teacher",
            teacher.len(),
            shape_product("teacher shape", &[self.teacher_views, row])?,
        )?;
        check_len("centre", centre.len(), self.dim)?;
        // The teacher logits are checked row by row, the centre is not: a NaN
        // in it would drop that class from the loss and make the gradient NaN.
        crate::error::check_finite("centre", centre)
    }
}

fn dino_impl(
    student: &[f32],
    teacher: &[f32],
    centre: &[f32],
    shape: DinoShape,
    tau_s: f32,
    tau_t: f32,
    mut grad: Option<(&mut [f32], f32)>,
) -> Result<f32> {
    check_positive("tau_s", tau_s)?;
    check_positive("tau_t", tau_t)?;
    shape.validate(student, teacher, centre)?;
    let DinoShape {
        student_views,
        teacher_views,
        batch,
        dim,
    } = shape;
    let view = batch * dim;
    let pair_scale = 1.0 / (shape.pairs() * batch) as f64;
    let mut total = 0.0f64;
    for iq in 0..teacher_views {
        let tv = &teacher[iq * view..(iq + 1) * view];
        for v in (0..student_views).filter(|&v| v != iq) {
            let sv = &student[v * view..(v + 1) * view];
            for b in 0..batch {
                let r = b * dim..(b + 1) * dim;
                let g = grad.as_mut().map(|(g, scale)| {
                    (
                        &mut g[v * view + r.start..v * view + r.end],
                        *scale * pair_scale as f32,
                    )
                });
                total += ce_row(&sv[r.clone()], &tv[r], Some(centre), tau_s, tau_t, g)?;
            }
        }
    }
    Ok((total * pair_scale) as f32)
}

/// The DINO image-level loss: for every teacher view `iq` and every other
/// student view `v`, the batch mean of
/// `-sum_k softmax((t_k - c_k) / tau_t) log softmax(s_k / tau_s)`, averaged
/// over the pairs.
///
/// ```
/// use sere_core::loss::{dino_loss, DinoShape};
/// let shape = DinoShape { student_views: 2, teacher_views: 2, batch: 1, dim: 2 };
/// let (s, t, c) = ([0.0f32; 4], [1.0f32, 0.0, 0.0, 1.0], [0.0f32; 2]);
/// let loss = dino_loss(&s, &t, &c, shape, 0.1, 0.04).unwrap();
/// assert!((loss - core::f32::consts::LN_2).abs() < 1e-6);
/// ```
pub fn dino_loss(
    student: &[f32],
    teacher: &[f32],
    centre: &[f32],
    shape: DinoShape,
    tau_s: f32,
    tau_t: f32,
) -> Result<f32> {
    dino_impl(student, teacher, centre, shape, tau_s, tau_t, None)
}

/// [`dino_loss`] and its gradient: adds `scale * dL/dstudent` to
/// `grad_student` (same layout as `student`) and returns the loss.
///
/// Fails with [`Error::NonFinite`] if the accumulated gradient is not
/// finite (`scale / tau_s` near the top of the `f32` range, or a non-finite
/// value already in the buffer); the buffer's contents are then unspecified.
///
/// ```
/// use sere_core::loss::{dino_loss_backward, DinoShape};
/// let shape = DinoShape { student_views: 3, teacher_views: 2, batch: 2, dim: 4 };
/// let s = [0.1f32; 24];
/// let t = [0.2f32; 16];
/// let mut g = [0.0f32; 24];
/// dino_loss_backward(&s, &t, &[0.0; 4], shape, 0.1, 0.04, 1.0, &mut g).unwrap();
/// // Uniform student and teacher: already matched, nothing to push.
/// assert!(g.iter().all(|v| v.abs() < 1e-6));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn dino_loss_backward(
    student: &[f32],
    teacher: &[f32],
    centre: &[f32],
    shape: DinoShape,
    tau_s: f32,
    tau_t: f32,
    scale: f32,
    grad_student: &mut [f32],
) -> Result<f32> {
    check_len("grad_student", grad_student.len(), student.len())?;
    let loss = dino_impl(
        student,
        teacher,
        centre,
        shape,
        tau_s,
        tau_t,
        Some((&mut *grad_student, scale)),
    )?;
    check_grad(grad_student)?;
    Ok(loss)
}

/// EMA update of the DINO centre from this step's teacher outputs
/// (`rows x dim`, all teacher views of the batch):
/// `c = momentum * c + (1 - momentum) * mean_rows(teacher)`.
///
/// ```
/// use sere_core::loss::dino_centre_update;
/// let mut c = [1.0f32, 1.0];
/// dino_centre_update(&[0.0, 2.0, 2.0, 4.0], 2, 2, 0.9, &mut c).unwrap();
/// assert!((c[0] - 1.0).abs() < 1e-6 && (c[1] - 1.2).abs() < 1e-6);
/// ```
pub fn dino_centre_update(
    teacher: &[f32],
    rows: usize,
    dim: usize,
    momentum: f32,
    centre: &mut [f32],
) -> Result<()> {
    check_nonzero("rows", rows)?;
    check_nonzero("dim", dim)?;
    check_len(
        "teacher",
        teacher.len(),
        shape_product("rows x dim", &[rows, dim])?,
    )?;
    check_len("centre", centre.len(), dim)?;
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::InvalidArgument {
            what: "momentum",
            requirement: "must be in [0, 1]",
        });
    }
    crate::error::check_finite("teacher outputs", teacher)?;
    let w = (1.0 - momentum) / rows as f32;
    centre.iter_mut().for_each(|c| *c *= momentum);
    for row in teacher.chunks_exact(dim) {
        for (c, &t) in centre.iter_mut().zip(row) {
            *c += w * t;
        }
    }
    Ok(())
}

/// Mean entropy, in nats, of the centred and sharpened teacher distribution
/// `q = softmax((t - c) / tau_t)` over the `rows` rows of `teacher`
/// (`rows x dim`): DINO's collapse monitor. A uniform collapse drives it to
/// `ln dim`, a collapse onto one prototype to 0; the DINO loss (the
/// cross-entropy `H(q, p)`, averaged over the same teacher rows) minus this
/// entropy is the mean `KL(q || p)`, which goes to 0 in both collapses
/// (Caron et al., 2021, section 5.3).
///
/// Evaluated per row as `ln Z + sum_k q_k (m - z_k)` with `z = (t - c) /
/// tau_t` and `m = max z`: every term is non-negative, so there is no
/// cancellation.
///
/// ```
/// use sere_core::loss::teacher_entropy;
/// // A flat row: ln 4. A row with one dominant logit: about 0.
/// let t = [1.0f32, 1.0, 1.0, 1.0, 9.0, 0.0, 0.0, 0.0];
/// let h = teacher_entropy(&t[..4], &[0.0; 4], 1, 4, 0.04).unwrap();
/// assert!((h - 4.0f32.ln()).abs() < 1e-6);
/// let h = teacher_entropy(&t, &[0.0; 4], 2, 4, 0.04).unwrap();
/// assert!((h - 4.0f32.ln() / 2.0).abs() < 1e-6);
/// ```
pub fn teacher_entropy(
    teacher: &[f32],
    centre: &[f32],
    rows: usize,
    dim: usize,
    tau_t: f32,
) -> Result<f32> {
    check_nonzero("rows", rows)?;
    check_nonzero("dim", dim)?;
    check_positive("tau_t", tau_t)?;
    let n = shape_product("rows x dim", &[rows, dim])?;
    check_len("teacher", teacher.len(), n)?;
    check_len("centre", centre.len(), dim)?;
    crate::error::check_finite("centre", centre)?;
    let mut total = 0.0f64;
    for row in teacher[..n].chunks_exact(dim) {
        total += entropy_row(row, centre, 1.0 / tau_t)?;
    }
    Ok((total / rows as f64) as f32)
}

crate::simd::multiversion! {
    /// Entropy of `softmax((t - c) * inv_tau)` for one row.
    fn entropy_row(t: &[f32], c: &[f32], inv_tau: f32) -> Result<f64> {
        row_max(t, "teacher logits")?;
        let z = |tv: f32, cv: f32| (tv - cv) * inv_tau;
        let m = max_zip(t, c, z);
        if !m.is_finite() {
            return Err(Error::NonFinite {
                what: "centred teacher logits",
            });
        }
        let zsum = sum_zip3_blocked(t, c, c, |tv, cv, _| expf(z(tv, cv) - m));
        let inv_z = 1.0 / zsum;
        let cross = sum_zip3_blocked(t, c, c, |tv, cv, _| {
            let q = expf(z(tv, cv) - m) * inv_z;
            if q > 0.0 {
                q * (m - z(tv, cv))
            } else {
                0.0
            }
        });
        Ok(logf(zsum) as f64 + cross as f64)
    }
}

/// iBOT's weights of its masked-patch loss: for `masks` laid out as
/// `[images][patches]` (`true` = masked), each masked position of image `i`
/// gets `1 / (max(1, masked_i) * images)` and every other position 0, so
/// that [`weighted_cross_entropy`] with these weights is the mean over
/// images of the mean over each image's masked positions (an image without
/// a masked patch adds 0 but still counts, as in iBOT).
///
/// ```
/// use sere_core::loss::masked_patch_weights;
/// let masks = [true, false, true, false, false, false];
/// let mut w = [9.0f32; 6];
/// masked_patch_weights(&masks, 3, &mut w).unwrap();
/// assert_eq!(w, [0.25, 0.0, 0.25, 0.0, 0.0, 0.0]);
/// ```
pub fn masked_patch_weights(masks: &[bool], patches: usize, out: &mut [f32]) -> Result<()> {
    check_nonzero("patches", patches)?;
    check_len("weights", out.len(), masks.len())?;
    if masks.len() % patches != 0 || masks.is_empty() {
        return Err(Error::InvalidArgument {
            what: "masks",
            requirement: "must hold a whole, non-zero number of images of `patches` entries",
        });
    }
    let images = (masks.len() / patches) as f32;
    for (m, w) in masks
        .chunks_exact(patches)
        .zip(out.chunks_exact_mut(patches))
    {
        let count = m.iter().filter(|&&v| v).count().max(1) as f32;
        let on = 1.0 / (count * images);
        for (&mv, wv) in m.iter().zip(w) {
            *wv = if mv { on } else { 0.0 };
        }
    }
    Ok(())
}

/// Weighted sum over rows of the centred cross-entropy
/// `-sum_k softmax((t_k - c_k) / tau_t) log softmax(s_k / tau_s)` of the
/// DINO loss: `sum_r weights[r] * CE_r` over `rows x dim` student and
/// teacher logits, with the centre `c` (`dim`). Rows of weight 0 are not
/// evaluated at all (iBOT's masked-patch loss reads only masked rows). With
/// `grad = Some((g, scale))` it adds `scale * dL/dstudent` to `g`.
///
/// Weights must be finite and non-negative. Fails with [`Error::NonFinite`]
/// if the accumulated gradient is not finite; the buffer's contents are
/// then unspecified.
///
/// ```
/// use sere_core::loss::weighted_cross_entropy;
/// let (s, t, c) = ([0.0f32; 4], [9.0f32, 0.0, 0.0, 9.0], [0.0f32; 2]);
/// // Only the first row counts: a uniform student against any teacher.
/// let loss = weighted_cross_entropy(&s, &t, &c, &[0.5, 0.0], 2, 2, 0.1, 0.04, None).unwrap();
/// assert!((loss - 0.5 * core::f32::consts::LN_2).abs() < 1e-6);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn weighted_cross_entropy(
    student: &[f32],
    teacher: &[f32],
    centre: &[f32],
    weights: &[f32],
    rows: usize,
    dim: usize,
    tau_s: f32,
    tau_t: f32,
    mut grad: Option<(&mut [f32], f32)>,
) -> Result<f32> {
    check_ce(student, teacher, rows, dim, tau_s, tau_t)?;
    check_len("centre", centre.len(), dim)?;
    check_len("weights", weights.len(), rows)?;
    crate::error::check_finite("centre", centre)?;
    if weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
        return Err(Error::InvalidArgument {
            what: "weights",
            requirement: "must be finite and non-negative",
        });
    }
    if let Some((g, _)) = &grad {
        check_len("grad_student", g.len(), student.len())?;
    }
    let mut total = 0.0f64;
    for (r, &w) in weights.iter().enumerate().filter(|(_, w)| **w > 0.0) {
        let span = r * dim..(r + 1) * dim;
        let g = grad
            .as_mut()
            .map(|(g, scale)| (&mut g[span.clone()], *scale * w));
        let ce = ce_row(
            &student[span.clone()],
            &teacher[span],
            Some(centre),
            tau_s,
            tau_t,
            g,
        )?;
        total += w as f64 * ce;
    }
    if let Some((g, _)) = grad {
        check_grad(g)?;
    }
    Ok(total as f32)
}
