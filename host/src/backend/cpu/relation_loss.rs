//! SERE's relation losses over a batch on the CPU, and the glue of the
//! DINO loss.
//!
//! Views are numbered as the loader lays them out: `0` and `1` are the two
//! global views (the teacher's), `2 .. 2 + L` the local ones. The teacher's
//! features are `[2][B][Ng][C]` (projection outputs of the global views),
//! the student's `[2][B][Ng][C]` (globals) and `[L][B][Nl][C]` (locals),
//! predictor outputs; tokens of a view are in row-major patch order (`HWC`
//! maps). Every (teacher view `t`, student view `s != t`) pair of an image
//! contributes:
//!
//! - a **spatial** term when the two crops overlap: both maps are sampled
//!   bilinearly at the pair's grid points (`P` points each), the per-head
//!   spatial relation logits (`heads x P x P`) are formed for both, and the
//!   term is the relation cross-entropy over the `heads * P` rows,
//!   `tau_t = 0.5`, `tau_s = 1`;
//! - a **channel** term always: channel relation logits (`C x C`) of the
//!   teacher's and of the student's full token sets, `tau_t = 0.1`,
//!   `tau_s = 1`.
//!
//! `L_spatial` and `L_channel` are the means of their terms over the batch.
//! The teacher is detached; gradients flow to the student features only and
//! are *added* into the caller's buffers (scaled by the caller's weight).
//!
//! Work is split over images with rayon, one scratch per task kept in
//! [`SereLoss`], so a warm step allocates no scratch (only a small vector of
//! per-(image, view) slice references per call). The cross-entropies are
//! evaluated from precomputed probabilities: the teacher's channel
//! distributions once per (image, teacher view), the student's channel
//! log-probabilities once per (image, student view), whose gradient
//! accumulates both teachers before one relation backward. The spatial
//! logits depend on the pair's overlap grid, so they are formed per pair.

use crate::backend::DinoLossArgs;
use rayon::prelude::*;
use sere_core::bilinear::{grid_sample_backward, grid_sample_forward, MapLayout, SampleShape};
use sere_core::loss::{
    dino_centre_update, dino_loss_backward, soft_target_cross_entropy, DinoShape,
};
use sere_core::relation::{
    channel_relation_backward, channel_relation_forward, spatial_relation_backward,
    spatial_relation_forward,
};
use sere_core::{Error, Result};

pub use crate::backend::relation::{SereLossConfig, ViewShapes, GLOBAL_VIEWS};

/// The student's features (or their gradients): globals `[2][B][Ng][C]`,
/// locals `[L][B][Nl][C]` (empty when `L = 0`).
#[derive(Debug, Clone, Copy)]
pub struct StudentViews<'a> {
    /// Global views.
    pub globals: &'a [f32],
    /// Local views.
    pub locals: &'a [f32],
}

impl<'a> StudentViews<'a> {
    fn map(&self, s: &ViewShapes, v: usize, b: usize) -> &'a [f32] {
        let r = s.map_range(v, b);
        if v < GLOBAL_VIEWS {
            &self.globals[r]
        } else {
            &self.locals[r]
        }
    }
}

/// Gradient buffers of the student's features (same layout as
/// [`StudentViews`]); the losses *add* into them.
#[derive(Debug)]
pub struct StudentGrads<'a> {
    /// Global views.
    pub globals: &'a mut [f32],
    /// Local views.
    pub locals: &'a mut [f32],
}

/// Inputs of [`SereLoss::forward_backward`]: the spatial and the channel
/// relations use different heads, hence different features.
#[derive(Debug, Clone, Copy)]
pub struct SereInputs<'a> {
    /// Teacher projections of the spatial head, `[2][B][Ng][C]`.
    pub teacher_spatial: &'a [f32],
    /// Teacher projections of the channel head, `[2][B][Ng][C]`.
    pub teacher_channel: &'a [f32],
    /// Student predictions of the spatial heads.
    pub student_spatial: StudentViews<'a>,
    /// Student predictions of the channel heads.
    pub student_channel: StudentViews<'a>,
}

/// Gradient buffers of [`SereLoss::forward_backward`].
#[derive(Debug)]
pub struct SereGrads<'a> {
    /// Into the student's spatial-head outputs.
    pub spatial: StudentGrads<'a>,
    /// Into the student's channel-head outputs.
    pub channel: StudentGrads<'a>,
}

/// The relation losses of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SereLossOutput {
    /// `L_spatial`: mean over the overlapping (image, pair) terms (0 if none).
    pub spatial: f32,
    /// `L_channel`: mean over all (image, pair) terms.
    pub channel: f32,
    /// Number of spatial terms.
    pub spatial_terms: usize,
    /// Number of channel terms (`B * 2 * (V - 1)`).
    pub channel_terms: usize,
}

/// Per-task scratch.
#[derive(Debug, Default)]
struct Scratch {
    /// Teacher channel relation probabilities, `[2][C][C]`.
    qc: Vec<f32>,
    /// Student channel relation logits, `C x C`.
    lc: Vec<f32>,
    /// Sampled teacher / student features, `P x C`.
    xt: Vec<f32>,
    xs: Vec<f32>,
    /// Gradient of the sampled student features, `P x C`.
    dxs: Vec<f32>,
    /// Teacher probabilities / student logits of the spatial relation,
    /// `heads x P x P`.
    lt: Vec<f32>,
    ls: Vec<f32>,
    /// Gradient of the student relation logits (spatial or channel).
    gl: Vec<f32>,
    /// Sum of this task's terms.
    loss: f64,
    /// First error met by this task.
    err: Option<Error>,
}

/// Reusable workspace of the relation losses (one scratch per parallel
/// task, grown on first use).
#[derive(Debug, Default)]
pub struct SereLoss {
    scratch: Vec<Scratch>,
}

fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.resize(n, 0.0);
    &mut v[..]
}

/// In place: `x <- softmax(x / tau)` per row (the sharpened teacher,
/// computed once per teacher view and shared by its students).
fn softmax_t(x: &mut [f32], cols: usize, tau: f32) -> Result<()> {
    let inv = 1.0 / tau;
    x.iter_mut().for_each(|v| *v *= inv);
    sere_core::softmax::softmax_rows_in_place(x, x.len() / cols, cols)
}

/// A non-finite gradient scale would silently poison the gradients.
fn check_scale(scale: f32, grads: &Option<StudentGrads>) -> Result<f32> {
    if grads.is_some() && !scale.is_finite() {
        return Err(Error::NonFinite {
            what: "relation-loss weight",
        });
    }
    Ok(scale)
}

/// One image's gradient maps, indexed by view (`None` without gradients).
type ImageGrads<'g> = [Option<&'g mut [f32]>];

/// Splits the student gradient buffers into per-(image, view) maps ordered
/// `[b][v]` (all `None` without gradients).
fn per_image_grads<'g>(
    s: &ViewShapes,
    grads: Option<StudentGrads<'g>>,
) -> Vec<Option<&'g mut [f32]>> {
    let (b, v) = (s.batch, s.views());
    let mut out: Vec<Option<&'g mut [f32]>> = Vec::with_capacity(b * v);
    match grads {
        None => out.resize_with(b * v, || None),
        Some(g) => {
            let ng = s.global_tokens() * s.channels;
            let nl = s.local_tokens() * s.channels;
            let mut maps: Vec<Option<&'g mut [f32]>> = g
                .globals
                .chunks_exact_mut(ng)
                .chain(g.locals.chunks_exact_mut(nl.max(1)))
                .map(Some)
                .collect();
            // maps is [v][b]; transpose to [b][v].
            for bi in 0..b {
                for vi in 0..v {
                    out.push(maps[vi * b + bi].take());
                }
            }
        }
    }
    out
}

impl SereLoss {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    fn check(
        shapes: &ViewShapes,
        teacher: &[f32],
        student: &StudentViews,
        grads: &Option<StudentGrads>,
    ) {
        assert!(
            shapes.batch > 0 && shapes.channels > 0,
            "SereLoss: empty batch or no channels"
        );
        assert!(shapes.global_tokens() > 0, "SereLoss: empty global map");
        assert!(
            shapes.locals == 0 || shapes.local_tokens() > 0,
            "SereLoss: empty local map"
        );
        assert_eq!(
            teacher.len(),
            shapes.globals_len(),
            "SereLoss: teacher features have the wrong length"
        );
        assert_eq!(
            student.globals.len(),
            shapes.globals_len(),
            "SereLoss: student globals have the wrong length"
        );
        assert_eq!(
            student.locals.len(),
            shapes.locals_len(),
            "SereLoss: student locals have the wrong length"
        );
        if let Some(g) = grads {
            assert_eq!(
                g.globals.len(),
                shapes.globals_len(),
                "SereLoss: global gradients have the wrong length"
            );
            assert_eq!(
                g.locals.len(),
                shapes.locals_len(),
                "SereLoss: local gradients have the wrong length"
            );
        }
    }

    /// Runs `f(image, scratch, grads_of_image)` over all images in parallel,
    /// one scratch per task, and returns the sum of the tasks' losses.
    fn run<F>(&mut self, shapes: &ViewShapes, grads: Option<StudentGrads>, f: F) -> Result<f64>
    where
        F: Fn(usize, &mut Scratch, &mut ImageGrads) -> Result<f64> + Sync,
    {
        let (b, v) = (shapes.batch, shapes.views());
        let tasks = rayon::current_num_threads().clamp(1, b);
        let per = b.div_ceil(tasks);
        let tasks = b.div_ceil(per);
        if self.scratch.len() < tasks {
            self.scratch.resize_with(tasks, Scratch::default);
        }
        let mut img_grads = per_image_grads(shapes, grads);
        img_grads
            .par_chunks_mut(per * v)
            .zip(self.scratch[..tasks].par_iter_mut())
            .enumerate()
            .for_each(|(task, (gchunk, sc))| {
                sc.loss = 0.0;
                sc.err = None;
                for (j, gimg) in gchunk.chunks_mut(v).enumerate() {
                    match f(task * per + j, sc, gimg) {
                        Ok(l) => sc.loss += l,
                        Err(e) => {
                            sc.err = Some(e);
                            return;
                        }
                    }
                }
            });
        let mut total = 0.0;
        for sc in &self.scratch[..tasks] {
            if let Some(e) = sc.err {
                return Err(e);
            }
            total += sc.loss;
        }
        Ok(total)
    }

    /// The spatial relation loss between the (teacher, student) features:
    /// returns `(L_spatial, terms)` and adds `weight * dL_spatial /
    /// dstudent` into `grads` (if given).
    ///
    /// `grids(b, t, s)` gives the (teacher grid, student grid) of image `b`
    /// and the pair (teacher view `t` in `0..2`, student view `s != t` in
    /// `0..2+L`), each `P` `(x, y)` points in the views' normalized
    /// coordinates, or `None` when the crops do not overlap. `P` may differ
    /// between pairs (13 x 13 global-global, 6 x 6 global-local).
    pub fn spatial<'g, G>(
        &mut self,
        cfg: &SereLossConfig,
        shapes: &ViewShapes,
        (teacher, student): (&[f32], StudentViews),
        grids: G,
        weight: f32,
        grads: Option<StudentGrads>,
    ) -> Result<(f32, usize)>
    where
        G: Fn(usize, usize, usize) -> Option<(&'g [f32], &'g [f32])> + Sync,
    {
        Self::check(shapes, teacher, &student, &grads);
        let (c, heads, v) = (shapes.channels, cfg.heads, shapes.views());
        if heads == 0 || c % heads != 0 {
            return Err(Error::InvalidArgument {
                what: "heads",
                requirement: "must divide the channel count",
            });
        }
        let mut terms = 0usize;
        for b in 0..shapes.batch {
            for t in 0..GLOBAL_VIEWS {
                for s in (0..v).filter(|&s| s != t) {
                    if let Some((gt, gs)) = grids(b, t, s) {
                        assert_eq!(
                            gt.len(),
                            gs.len(),
                            "teacher and student grids differ in size"
                        );
                        assert!(
                            !gt.is_empty() && gt.len() % 2 == 0,
                            "a grid holds (x, y) pairs"
                        );
                        terms += 1;
                    }
                }
            }
        }
        if terms == 0 {
            return Ok((0.0, 0));
        }
        let (tau_t, tau_s) = (cfg.tau_teacher_spatial, cfg.tau_student);
        let scale = check_scale(weight / terms as f32, &grads)?;
        let (hg, wg) = shapes.global_hw;
        let shapes_c = *shapes;
        let total = self.run(shapes, grads, |b, sc, gimg| {
            let mut acc = 0.0f64;
            for t in 0..GLOBAL_VIEWS {
                let tmap = &teacher[shapes_c.map_range(t, b)];
                for s in (0..v).filter(|&s| s != t) {
                    let Some((gt, gs)) = grids(b, t, s) else {
                        continue;
                    };
                    let p = gt.len() / 2;
                    let rows = heads * p;
                    // Teacher: sample, relate, sharpen.
                    let xt = fit(&mut sc.xt, p * c);
                    let shape_t = SampleShape {
                        channels: c,
                        height: hg,
                        width: wg,
                        points: p,
                    };
                    grid_sample_forward(tmap, gt, shape_t, MapLayout::Hwc, xt)?;
                    let q = fit(&mut sc.lt, rows * p);
                    spatial_relation_forward(xt, p, c, heads, q)?;
                    softmax_t(q, p, tau_t)?;
                    // Student.
                    let (hs, ws) = shapes_c.hw(s);
                    let smap = student.map(&shapes_c, s, b);
                    let shape_s = SampleShape {
                        channels: c,
                        height: hs,
                        width: ws,
                        points: p,
                    };
                    let xs = fit(&mut sc.xs, p * c);
                    grid_sample_forward(smap, gs, shape_s, MapLayout::Hwc, xs)?;
                    let lp = fit(&mut sc.ls, rows * p);
                    spatial_relation_forward(xs, p, c, heads, lp)?;
                    // Cross-entropy of the sharpened teacher and the student
                    // (sere-core's vectorised rows); its logit gradient is
                    // scale / rows * (softmax(S / tau_s) - q) / tau_s.
                    let Some(gmap) = gimg[s].as_deref_mut() else {
                        acc += soft_target_cross_entropy(lp, q, rows, p, tau_s, None)? as f64;
                        continue;
                    };
                    let gl = fit(&mut sc.gl, rows * p);
                    gl.fill(0.0);
                    acc +=
                        soft_target_cross_entropy(lp, q, rows, p, tau_s, Some((gl, scale)))? as f64;
                    let dxs = fit(&mut sc.dxs, p * c);
                    dxs.fill(0.0);
                    spatial_relation_backward(&sc.xs, gl, p, c, heads, dxs)?;
                    grid_sample_backward(smap, gs, dxs, shape_s, MapLayout::Hwc, gmap, None)?;
                }
            }
            Ok(acc)
        })?;
        Ok(((total / terms as f64) as f32, terms))
    }

    /// The channel relation loss between the (teacher, student) features:
    /// returns `(L_channel, terms)` and adds `weight * dL_channel /
    /// dstudent` into `grads` (if given).
    pub fn channel(
        &mut self,
        cfg: &SereLossConfig,
        shapes: &ViewShapes,
        (teacher, student): (&[f32], StudentViews),
        weight: f32,
        grads: Option<StudentGrads>,
    ) -> Result<(f32, usize)> {
        Self::check(shapes, teacher, &student, &grads);
        let c = shapes.channels;
        let terms = shapes.batch * shapes.pairs_per_image();
        let (tau_t, tau_s) = (cfg.tau_teacher_channel, cfg.tau_student);
        let scale = check_scale(weight / terms as f32, &grads)?;
        let cc = c * c;
        let shapes_c = *shapes;
        let total = self.run(shapes, grads, |b, sc, gimg| {
            let mut acc = 0.0f64;
            let ng = shapes_c.global_tokens();
            let qc = fit(&mut sc.qc, GLOBAL_VIEWS * cc);
            for (t, q) in qc.chunks_exact_mut(cc).enumerate() {
                channel_relation_forward(&teacher[shapes_c.map_range(t, b)], ng, c, q)?;
                softmax_t(q, c, tau_t)?;
            }
            let (q0, q1) = qc.split_at(cc);
            for (s, gmap) in gimg.iter_mut().enumerate() {
                let n = if s < GLOBAL_VIEWS {
                    ng
                } else {
                    shapes_c.local_tokens()
                };
                let xs = student.map(&shapes_c, s, b);
                let lp = fit(&mut sc.lc, cc);
                channel_relation_forward(xs, n, c, lp)?;
                // The teachers of student view s: the global views other than
                // s (both for a local view). Each term's logit gradient is
                // scale / C * (softmax(S / tau_s) - q) / tau_s.
                let teachers: &[&[f32]] = match s {
                    0 => &[q1],
                    1 => &[q0],
                    _ => &[q0, q1],
                };
                let Some(gmap) = gmap.as_deref_mut() else {
                    for q in teachers {
                        acc += soft_target_cross_entropy(lp, q, c, c, tau_s, None)? as f64;
                    }
                    continue;
                };
                let gl = fit(&mut sc.gl, cc);
                gl.fill(0.0);
                for q in teachers {
                    acc += soft_target_cross_entropy(lp, q, c, c, tau_s, Some((&mut *gl, scale)))?
                        as f64;
                }
                channel_relation_backward(xs, gl, n, c, gmap)?;
            }
            Ok(acc)
        })?;
        Ok(((total / terms as f64) as f32, terms))
    }

    /// Both relation losses: returns them with their term counts and adds
    /// `weights.0 * dL_spatial` and `weights.1 * dL_channel` into `grads`
    /// (if given). See [`SereLoss::spatial`] for `grids`.
    pub fn forward_backward<'g, G>(
        &mut self,
        cfg: &SereLossConfig,
        shapes: &ViewShapes,
        inputs: &SereInputs,
        grids: G,
        weights: (f32, f32),
        grads: Option<SereGrads>,
    ) -> Result<SereLossOutput>
    where
        G: Fn(usize, usize, usize) -> Option<(&'g [f32], &'g [f32])> + Sync,
    {
        let (gs, gc) = match grads {
            Some(g) => (Some(g.spatial), Some(g.channel)),
            None => (None, None),
        };
        let (spatial, spatial_terms) = self.spatial(
            cfg,
            shapes,
            (inputs.teacher_spatial, inputs.student_spatial),
            grids,
            weights.0,
            gs,
        )?;
        let (channel, channel_terms) = self.channel(
            cfg,
            shapes,
            (inputs.teacher_channel, inputs.student_channel),
            weights.1,
            gc,
        )?;
        Ok(SereLossOutput {
            spatial,
            channel,
            spatial_terms,
            channel_terms,
        })
    }
}

/// DINO centre momentum.
pub const DINO_CENTRE_MOMENTUM: f32 = 0.9;

/// The DINO loss of one step: student logits `[V][B][K]`, teacher logits
/// `[2][B][K]` (the global views), shaped by `a`. Adds `a.weight *
/// dL/dstudent` into `grad_student`, then updates `centre` (`K`) with the
/// teacher outputs (`c = m c + (1 - m) mean(teacher)`, `m =
/// a.centre_momentum`, 0.9 in DINO). The loss uses the centre from before
/// the update, as DINO does. Returns the loss.
pub fn dino_loss_step(
    (student, teacher): (&[f32], &[f32]),
    centre: &mut [f32],
    a: DinoLossArgs,
    grad_student: &mut [f32],
) -> Result<f32> {
    if centre.len() != a.dim {
        return Err(Error::ShapeMismatch {
            what: "DINO centre",
            expected: a.dim,
            got: centre.len(),
        });
    }
    let (batch, dim) = (a.batch, a.dim);
    let shape = DinoShape {
        student_views: a.views,
        teacher_views: GLOBAL_VIEWS,
        batch,
        dim,
    };
    let loss = dino_loss_backward(
        student,
        teacher,
        centre,
        shape,
        a.tau_student,
        a.tau_teacher,
        a.weight,
        grad_student,
    )?;
    dino_centre_update(
        teacher,
        GLOBAL_VIEWS * batch,
        dim,
        a.centre_momentum,
        centre,
    )?;
    Ok(loss)
}
