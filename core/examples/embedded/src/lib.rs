//! How a `no_std`, no-alloc project uses `sere-core`: one SERE relation step
//! on buffers whose sizes are fixed at compile time.
//!
//! A student and a teacher view of the same scene each have a `6 x 6` map of
//! 8-channel tokens (token-major, `H x W x C`). The step
//!
//! 1. computes the two views' overlap and a `4 x 4` sampling grid in each
//!    view ([`sere_core::geometry::overlap_grids`]);
//! 2. bilinearly samples both maps on their grids
//!    ([`sere_core::bilinear::grid_sample_forward`]);
//! 3. builds the spatial (2 heads, `16 x 16` per head) and channel (`8 x 8`)
//!    self-relations of the sampled tokens ([`sere_core::relation`]);
//! 4. evaluates the relation cross-entropy of student against teacher and
//!    its gradient ([`sere_core::loss::relation_cross_entropy_backward`]);
//! 5. back-propagates that gradient through the relations and the sampling
//!    into the student's map.
//!
//! Every buffer lives in a caller-owned [`Workspace`] (about 10 KB: put it in
//! a `static`, or on a stack that can hold it); the inputs are `static`
//! arrays built at compile time. Nothing allocates and nothing panics: each
//! kernel checks its slices and returns a `sere_core::Error`.
//!
//! [`sere_relation_step`] is the C entry point (`#[no_mangle] extern "C"`)
//! a firmware's `main` or a C caller would call. `scripts/test.sh` builds
//! this crate as a staticlib for `thumbv7em-none-eabihf` (Cortex-M4F); the
//! host tests below check that the loss is finite and that the gradient is
//! the loss's derivative (central finite differences).
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]

use sere_core::bilinear::{grid_sample_backward, grid_sample_forward, MapLayout, SampleShape};
use sere_core::geometry::{overlap_grids, CropBox, GridPlacement};
use sere_core::loss::relation_cross_entropy_backward;
use sere_core::optim::l2_norm;
use sere_core::relation::{
    channel_relation_backward, channel_relation_forward, spatial_relation_backward,
    spatial_relation_forward,
};
use sere_core::Error;

/// Token rows of each view's feature map.
pub const H: usize = 6;
/// Token columns of each view's feature map.
pub const W: usize = 6;
/// Channels per token.
pub const C: usize = 8;
/// Attention heads of the spatial relation (`C / HEADS = 4` channels each).
pub const HEADS: usize = 2;
/// Grid points along each side of the overlap.
pub const S: usize = 4;
/// Sampled points: `S x S`.
pub const P: usize = S * S;
/// Elements of one feature map: `H x W x C`.
pub const MAP_LEN: usize = H * W * C;

/// Student temperature of the relation cross-entropy (SERE's default).
pub const TAU_S: f32 = 0.1;
/// Teacher temperature of the relation cross-entropy (SERE's default).
pub const TAU_T: f32 = 0.04;
/// Weight of the spatial relation loss in the total.
pub const SPATIAL_WEIGHT: f32 = 0.5;
/// Weight of the channel relation loss in the total.
pub const CHANNEL_WEIGHT: f32 = 0.5;

/// A deterministic feature map in `[-1, 1)`, computed at compile time (a
/// linear congruential generator: no floating-point library needed).
const fn feature_map(seed: u32) -> [f32; MAP_LEN] {
    let mut map = [0.0f32; MAP_LEN];
    let mut state = seed;
    let mut i = 0;
    while i < MAP_LEN {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        map[i] = (state >> 8) as f32 / 8_388_608.0 - 1.0;
        i += 1;
    }
    map
}

/// The student view's patch tokens (in flash on a microcontroller).
pub static STUDENT_MAP: [f32; MAP_LEN] = feature_map(0x5e5e);
/// The teacher view's patch tokens.
pub static TEACHER_MAP: [f32; MAP_LEN] = feature_map(0x7ea0);

/// Where the student view was cropped from the source image (pixels).
pub const STUDENT_VIEW: CropBox = CropBox {
    x: 0.0,
    y: 0.0,
    w: 32.0,
    h: 32.0,
    flipped: false,
};
/// Where the teacher view was cropped from, mirrored left-right afterwards.
pub const TEACHER_VIEW: CropBox = CropBox {
    x: 12.0,
    y: 8.0,
    w: 30.0,
    h: 30.0,
    flipped: true,
};

/// Every intermediate buffer of [`relation_step`], sized at compile time.
/// The kernels overwrite their outputs and add into gradient buffers;
/// [`relation_step`] zeroes the gradient buffers itself, so a workspace can
/// be reused step after step without clearing it.
#[repr(C)]
pub struct Workspace {
    /// Student sampling grid, `P x 2` normalized `(x, y)` pairs.
    pub grid_s: [f32; 2 * P],
    /// Teacher sampling grid.
    pub grid_t: [f32; 2 * P],
    /// Sampled student tokens, `P x C`.
    pub feat_s: [f32; P * C],
    /// Sampled teacher tokens.
    pub feat_t: [f32; P * C],
    /// Student spatial relation logits, `HEADS x P x P`.
    pub spatial_s: [f32; HEADS * P * P],
    /// Teacher spatial relation logits.
    pub spatial_t: [f32; HEADS * P * P],
    /// Student channel relation logits, `C x C`.
    pub channel_s: [f32; C * C],
    /// Teacher channel relation logits.
    pub channel_t: [f32; C * C],
    /// Gradient of the total loss w.r.t. the student spatial logits.
    pub grad_spatial: [f32; HEADS * P * P],
    /// Gradient w.r.t. the student channel logits.
    pub grad_channel: [f32; C * C],
    /// Gradient w.r.t. the sampled student tokens.
    pub grad_feat: [f32; P * C],
    /// Gradient w.r.t. the student map: the step's result.
    pub grad_map: [f32; MAP_LEN],
}

impl Workspace {
    /// An all-zero workspace; `const`, so it can initialise a `static`.
    pub const fn new() -> Self {
        Workspace {
            grid_s: [0.0; 2 * P],
            grid_t: [0.0; 2 * P],
            feat_s: [0.0; P * C],
            feat_t: [0.0; P * C],
            spatial_s: [0.0; HEADS * P * P],
            spatial_t: [0.0; HEADS * P * P],
            channel_s: [0.0; C * C],
            channel_t: [0.0; C * C],
            grad_spatial: [0.0; HEADS * P * P],
            grad_channel: [0.0; C * C],
            grad_feat: [0.0; P * C],
            grad_map: [0.0; MAP_LEN],
        }
    }
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new()
    }
}

/// The relation losses of one step.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Losses {
    /// Spatial relation cross-entropy (mean over heads and rows).
    pub spatial: f32,
    /// Channel relation cross-entropy (mean over rows).
    pub channel: f32,
    /// `SPATIAL_WEIGHT * spatial + CHANNEL_WEIGHT * channel`, whose gradient
    /// w.r.t. the student map ends up in [`Workspace::grad_map`].
    pub total: f32,
}

/// One relation step: the views' overlap grids, both maps sampled on them,
/// spatial and channel relations, the student-vs-teacher relation loss and
/// its gradient w.r.t. `student` (left in `ws.grad_map`; the teacher gets
/// none).
///
/// Returns `Ok(None)` when the views do not overlap (no relation term then),
/// and the first kernel error otherwise (a non-finite input, for instance).
pub fn relation_step(
    student: &[f32; MAP_LEN],
    teacher: &[f32; MAP_LEN],
    view_s: &CropBox,
    view_t: &CropBox,
    ws: &mut Workspace,
) -> Result<Option<Losses>, Error> {
    let placement = GridPlacement::CellCentres;
    if overlap_grids(
        view_s,
        view_t,
        S,
        S,
        placement,
        &mut ws.grid_s,
        &mut ws.grid_t,
    )?
    .is_none()
    {
        return Ok(None);
    }
    let shape = SampleShape {
        channels: C,
        height: H,
        width: W,
        points: P,
    };
    // Forward: sample, relate (outputs are overwritten).
    grid_sample_forward(student, &ws.grid_s, shape, MapLayout::Hwc, &mut ws.feat_s)?;
    grid_sample_forward(teacher, &ws.grid_t, shape, MapLayout::Hwc, &mut ws.feat_t)?;
    spatial_relation_forward(&ws.feat_s, P, C, HEADS, &mut ws.spatial_s)?;
    spatial_relation_forward(&ws.feat_t, P, C, HEADS, &mut ws.spatial_t)?;
    channel_relation_forward(&ws.feat_s, P, C, &mut ws.channel_s)?;
    channel_relation_forward(&ws.feat_t, P, C, &mut ws.channel_t)?;

    // Losses and backward: every gradient is accumulated, so start from 0.
    ws.grad_spatial.fill(0.0);
    ws.grad_channel.fill(0.0);
    ws.grad_feat.fill(0.0);
    ws.grad_map.fill(0.0);
    let spatial = relation_cross_entropy_backward(
        &ws.spatial_s,
        &ws.spatial_t,
        HEADS * P,
        P,
        TAU_S,
        TAU_T,
        SPATIAL_WEIGHT,
        &mut ws.grad_spatial,
    )?;
    let channel = relation_cross_entropy_backward(
        &ws.channel_s,
        &ws.channel_t,
        C,
        C,
        TAU_S,
        TAU_T,
        CHANNEL_WEIGHT,
        &mut ws.grad_channel,
    )?;
    // Both relations read the same sampled tokens: one shared gradient.
    spatial_relation_backward(&ws.feat_s, &ws.grad_spatial, P, C, HEADS, &mut ws.grad_feat)?;
    channel_relation_backward(&ws.feat_s, &ws.grad_channel, P, C, &mut ws.grad_feat)?;
    grid_sample_backward(
        student,
        &ws.grid_s,
        &ws.grad_feat,
        shape,
        MapLayout::Hwc,
        &mut ws.grad_map,
        None,
    )?;
    Ok(Some(Losses {
        spatial,
        channel,
        total: SPATIAL_WEIGHT * spatial + CHANNEL_WEIGHT * channel,
    }))
}

/// What [`sere_relation_step`] reports to a C caller.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutput {
    /// 0: done; 1: the views do not overlap; 2: a shape mismatch; 3: an
    /// invalid argument; 4: a non-finite value; 5: another kernel error.
    pub status: i32,
    /// The total relation loss (0 unless `status == 0`).
    pub loss: f32,
    /// Euclidean norm of the gradient w.r.t. the student map (0 unless
    /// `status == 0`).
    pub grad_norm: f32,
}

/// C entry point: one [`relation_step`] on [`STUDENT_MAP`], [`TEACHER_MAP`],
/// [`STUDENT_VIEW`] and [`TEACHER_VIEW`], using the caller's workspace (its
/// `grad_map` holds the gradient afterwards).
#[no_mangle]
pub extern "C" fn sere_relation_step(ws: &mut Workspace) -> StepOutput {
    let done = |status, loss, grad_norm| StepOutput {
        status,
        loss,
        grad_norm,
    };
    match relation_step(&STUDENT_MAP, &TEACHER_MAP, &STUDENT_VIEW, &TEACHER_VIEW, ws) {
        Ok(Some(l)) => done(0, l.total, l2_norm(&ws.grad_map)),
        Ok(None) => done(1, 0.0, 0.0),
        Err(Error::ShapeMismatch { .. }) => done(2, 0.0, 0.0),
        Err(Error::InvalidArgument { .. }) => done(3, 0.0, 0.0),
        Err(Error::NonFinite { .. }) => done(4, 0.0, 0.0),
        // `Error` is `#[non_exhaustive]`: a later kind of error lands here.
        Err(_) => done(5, 0.0, 0.0),
    }
}

/// A `no_std` staticlib or binary must define a panic handler, so the
/// staticlib built for the microcontroller has this one. sere-core reports
/// every problem as an `Error` instead of panicking, so it is not expected
/// to run. A firmware that has its own handler (`panic-halt`, a reset, ...)
/// and copies this crate drops this function.
#[cfg(all(target_os = "none", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The total loss at `student`, forward only in spirit (the gradient
    /// buffers are recomputed and ignored).
    fn loss_at(student: &[f32; MAP_LEN]) -> f64 {
        let mut ws = Workspace::new();
        relation_step(student, &TEACHER_MAP, &STUDENT_VIEW, &TEACHER_VIEW, &mut ws)
            .unwrap()
            .unwrap()
            .total as f64
    }

    /// Central difference of the loss along `dir` (any length).
    fn directional_fd(dir: &[f32; MAP_LEN], h: f32) -> f64 {
        let (mut plus, mut minus) = (STUDENT_MAP, STUDENT_MAP);
        for ((p, m), d) in plus.iter_mut().zip(minus.iter_mut()).zip(dir) {
            *p += h * d;
            *m -= h * d;
        }
        (loss_at(&plus) - loss_at(&minus)) / (2.0 * h as f64)
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn entry_point_gives_a_finite_loss_and_gradient() {
        let mut ws = Workspace::new();
        let out = sere_relation_step(&mut ws);
        assert_eq!(out.status, 0, "{out:?}");
        assert!(out.loss.is_finite() && out.loss > 0.0, "{out:?}");
        assert!(out.grad_norm.is_finite() && out.grad_norm > 0.0, "{out:?}");
        assert!(ws.grad_map.iter().all(|g| g.is_finite()));
        // Every grid point lies inside both views (cell centres of the overlap).
        assert!(ws.grid_s.iter().chain(&ws.grid_t).all(|g| g.abs() < 1.0));
    }

    #[test]
    fn a_reused_workspace_gives_the_same_step() {
        let mut ws = Workspace::new();
        let first = sere_relation_step(&mut ws);
        let grad = ws.grad_map;
        let second = sere_relation_step(&mut ws);
        assert_eq!(first, second);
        assert_eq!(grad, ws.grad_map, "gradients must not pile up across steps");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let mut ws = Workspace::new();
        relation_step(
            &STUDENT_MAP,
            &TEACHER_MAP,
            &STUDENT_VIEW,
            &TEACHER_VIEW,
            &mut ws,
        )
        .unwrap()
        .unwrap();
        let g = ws.grad_map;
        let norm = dot(&g, &g).sqrt();
        assert!(norm > 1e-3, "gradient too small to test: {norm}");
        // Along the gradient itself the slope is |g|.
        let unit = g.map(|v| (v as f64 / norm) as f32);
        let slope = directional_fd(&unit, 1e-3);
        assert!(
            (slope - norm).abs() <= 2e-2 * norm,
            "slope along g: finite differences {slope}, analytic {norm}"
        );
        // Along a fixed pseudo-random direction, the slope is g . r.
        let r = feature_map(0x1234);
        let (fd, an) = (directional_fd(&r, 1e-3), dot(&g, &r));
        assert!(
            (fd - an).abs() <= 2e-2 * norm * dot(&r, &r).sqrt(),
            "slope along r: finite differences {fd}, analytic {an}"
        );
        // The three largest single entries.
        let mut idx: [usize; MAP_LEN] = core::array::from_fn(|i| i);
        idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &i in &idx[..3] {
            let mut e = [0.0f32; MAP_LEN];
            e[i] = 1.0;
            let fd = directional_fd(&e, 1e-3);
            assert!(
                (fd - g[i] as f64).abs() <= 2e-2 * g[i].abs() as f64,
                "d loss / d map[{i}]: finite differences {fd}, analytic {}",
                g[i]
            );
        }
    }

    #[test]
    fn disjoint_views_have_no_relation_term() {
        let far = CropBox {
            x: 100.0,
            ..TEACHER_VIEW
        };
        let mut ws = Workspace::new();
        let r = relation_step(&STUDENT_MAP, &TEACHER_MAP, &STUDENT_VIEW, &far, &mut ws);
        assert_eq!(r, Ok(None));
    }

    #[test]
    fn a_non_finite_input_is_an_error_not_a_panic() {
        let mut bad = STUDENT_MAP;
        // Token (row 3, column 4) lies in the overlap, so it is sampled.
        bad[(3 * W + 4) * C + 1] = f32::NAN;
        let mut ws = Workspace::new();
        let r = relation_step(&bad, &TEACHER_MAP, &STUDENT_VIEW, &TEACHER_VIEW, &mut ws);
        assert!(matches!(r, Err(Error::NonFinite { .. })), "{r:?}");
    }
}
