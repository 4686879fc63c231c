//! sere-core on its own, outside the sere-rs trainer: SERE's relation loss
//! between two augmented views of one scene, and gradient steps that use it.
//!
//! ```sh
//! cargo run -p sere-core --example two_views              # no_std core, from a std program
//! cargo run -p sere-core --example two_views --features std   # + run-time SIMD dispatch
//! ```
//!
//! 1. Two crops of a 128 x 128 source image (the second one flipped), each
//!    "encoded" into an 8 x 8 map of 16-channel patch tokens. Here a token
//!    is a smooth function of where its patch centre lies in the source
//!    image (a stand-in for a ViT), so both views agree where they overlap;
//!    the student's tokens are perturbed.
//! 2. `geometry::overlap_grids`: the views' overlap as a 6 x 6 grid in each
//!    view's normalized coordinates.
//! 3. `bilinear::grid_sample_forward`: both token maps sampled on their
//!    grids (token-major `Hwc` layout, as ViT patch tokens are stored).
//! 4. `relation`: spatial (4 heads, 36 x 36 each) and channel (16 x 16)
//!    self-relation logits of the sampled tokens.
//! 5. `loss::relation_cross_entropy_backward`: the student-vs-teacher
//!    relation losses and their gradient, then back through the relations
//!    and the sampling to the student's token map.
//! 6. `optim::adamw_step` on the student's tokens with that gradient: the
//!    relation loss falls as the student's relations approach the teacher's.

use sere_core::bilinear::{grid_sample_backward, grid_sample_forward, MapLayout, SampleShape};
use sere_core::geometry::{overlap_grids, CropBox, GridPlacement};
use sere_core::loss::relation_cross_entropy_backward;
use sere_core::optim::{adamw_step, l2_norm, AdamW};
use sere_core::relation::{
    channel_relation_backward, channel_relation_forward, spatial_relation_backward,
    spatial_relation_forward,
};

const H: usize = 8; // token rows per view
const W: usize = 8; // token columns per view
const C: usize = 16; // channels per token
const HEADS: usize = 4;
const S: usize = 6; // overlap grid points per side
const P: usize = S * S;
const TAU_S: f32 = 0.1; // SERE's student and teacher temperatures
const TAU_T: f32 = 0.04;

/// A token for the patch centred at source pixel `(x, y)`: 16 smooth waves.
fn token(x: f32, y: f32, out: &mut [f32]) {
    for (k, v) in out.iter_mut().enumerate() {
        let k = k as f32;
        let (fx, fy) = (0.02 + 0.011 * k, 0.035 - 0.004 * k);
        *v = (fx * x + fy * y + 0.7 * k).sin();
    }
}

/// A view's `H x W x C` token map: token `(i, j)` describes the source point
/// under its patch centre (the crop's normalized coordinates undo the flip).
fn encode(view: &CropBox, wobble: f32) -> Vec<f32> {
    let mut map = vec![0.0f32; H * W * C];
    for i in 0..H {
        for j in 0..W {
            let u = (j as f32 + 0.5) / W as f32 * 2.0 - 1.0;
            let v = (i as f32 + 0.5) / H as f32 * 2.0 - 1.0;
            let (x, y) = view.from_normalized(u, v);
            let t = &mut map[(i * W + j) * C..][..C];
            token(x, y, t);
            for (k, e) in t.iter_mut().enumerate() {
                *e += wobble * ((i * 7 + j * 3 + k * 5) as f32).sin();
            }
        }
    }
    map
}

/// Every buffer of one step, allocated once.
struct Step {
    grid_s: Vec<f32>,
    grid_t: Vec<f32>,
    feat_s: Vec<f32>,
    feat_t: Vec<f32>,
    spatial_s: Vec<f32>,
    spatial_t: Vec<f32>,
    channel_s: Vec<f32>,
    channel_t: Vec<f32>,
    grad_spatial: Vec<f32>,
    grad_channel: Vec<f32>,
    grad_feat: Vec<f32>,
}

impl Step {
    fn new() -> Self {
        let z = |n| vec![0.0f32; n];
        Step {
            grid_s: z(2 * P),
            grid_t: z(2 * P),
            feat_s: z(P * C),
            feat_t: z(P * C),
            spatial_s: z(HEADS * P * P),
            spatial_t: z(HEADS * P * P),
            channel_s: z(C * C),
            channel_t: z(C * C),
            grad_spatial: z(HEADS * P * P),
            grad_channel: z(C * C),
            grad_feat: z(P * C),
        }
    }

    /// The (spatial, channel) relation losses of the student map against the
    /// teacher map on the grids already computed, with the gradient of their
    /// mean w.r.t. `student` written to `grad_map`.
    fn losses(
        &mut self,
        student: &[f32],
        teacher: &[f32],
        grad_map: &mut [f32],
    ) -> sere_core::Result<(f32, f32)> {
        let shape = SampleShape {
            channels: C,
            height: H,
            width: W,
            points: P,
        };
        grid_sample_forward(
            student,
            &self.grid_s,
            shape,
            MapLayout::Hwc,
            &mut self.feat_s,
        )?;
        grid_sample_forward(
            teacher,
            &self.grid_t,
            shape,
            MapLayout::Hwc,
            &mut self.feat_t,
        )?;
        spatial_relation_forward(&self.feat_s, P, C, HEADS, &mut self.spatial_s)?;
        spatial_relation_forward(&self.feat_t, P, C, HEADS, &mut self.spatial_t)?;
        channel_relation_forward(&self.feat_s, P, C, &mut self.channel_s)?;
        channel_relation_forward(&self.feat_t, P, C, &mut self.channel_t)?;
        // Backward kernels add into their buffers: clear them first.
        for g in [
            &mut self.grad_spatial,
            &mut self.grad_channel,
            &mut self.grad_feat,
        ] {
            g.fill(0.0);
        }
        grad_map.fill(0.0);
        let (sp, ch) = (&mut self.grad_spatial, &mut self.grad_channel);
        let spatial = relation_cross_entropy_backward(
            &self.spatial_s,
            &self.spatial_t,
            HEADS * P,
            P,
            TAU_S,
            TAU_T,
            0.5,
            sp,
        )?;
        let channel = relation_cross_entropy_backward(
            &self.channel_s,
            &self.channel_t,
            C,
            C,
            TAU_S,
            TAU_T,
            0.5,
            ch,
        )?;
        spatial_relation_backward(&self.feat_s, sp, P, C, HEADS, &mut self.grad_feat)?;
        channel_relation_backward(&self.feat_s, ch, P, C, &mut self.grad_feat)?;
        grid_sample_backward(
            student,
            &self.grid_s,
            &self.grad_feat,
            shape,
            MapLayout::Hwc,
            grad_map,
            None,
        )?;
        Ok((spatial, channel))
    }
}

fn main() -> Result<(), sere_core::Error> {
    // Two augmented views: crop boxes in source pixels, the teacher's flipped.
    let view_s = CropBox::new(8.0, 20.0, 72.0, 72.0, false)?;
    let view_t = CropBox::new(30.0, 4.0, 90.0, 90.0, true)?;
    let teacher = encode(&view_t, 0.0); // gets no gradient
    let mut student = encode(&view_s, 0.3);

    let mut step = Step::new();
    let Some(r) = overlap_grids(
        &view_s,
        &view_t,
        S,
        S,
        GridPlacement::CellCentres,
        &mut step.grid_s,
        &mut step.grid_t,
    )?
    else {
        println!("the views do not overlap: no relation loss");
        return Ok(());
    };
    println!(
        "overlap in source pixels: x {:.1}..{:.1}, y {:.1}..{:.1}",
        r.x0, r.x1, r.y0, r.y1
    );
    println!(
        "first grid point: student view ({:+.3}, {:+.3}), teacher view ({:+.3}, {:+.3}) (mirrored)",
        step.grid_s[0], step.grid_s[1], step.grid_t[0], step.grid_t[1]
    );

    let mut grad = vec![0.0f32; student.len()];
    let (sp, ch) = step.losses(&student, &teacher, &mut grad)?;
    println!(
        "step 0: spatial loss {sp:.4}, channel loss {ch:.4}, |dL/d student tokens| {:.4}",
        l2_norm(&grad)
    );

    // Gradient steps on the student's tokens (as if they were parameters).
    let opt = AdamW {
        lr: 2e-2,
        weight_decay: 0.0,
        ..AdamW::default()
    };
    let (mut m, mut v) = (vec![0.0f32; student.len()], vec![0.0f32; student.len()]);
    let first = 0.5 * (sp + ch);
    let mut last = first;
    for t in 1..=100u32 {
        adamw_step(&mut student, &grad, &mut m, &mut v, &opt, t)?;
        let (sp, ch) = step.losses(&student, &teacher, &mut grad)?;
        last = 0.5 * (sp + ch);
        if t % 25 == 0 {
            println!(
                "step {t}: spatial loss {sp:.4}, channel loss {ch:.4}, |grad| {:.4}",
                l2_norm(&grad)
            );
        }
    }
    assert!(last < first, "AdamW on the relation loss must lower it");
    println!("relation loss {first:.4} -> {last:.4} after 100 AdamW steps");
    Ok(())
}
