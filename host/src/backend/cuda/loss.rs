//! SERE's relation losses on the GPU, the same terms, scales and means as
//! [`crate::model::sere_loss::SereLoss`], batched over images:
//!
//! - spatial: per (teacher view `t`, student view `s != t`) pair, the
//!   images whose crops overlap are compacted on the host (an index list and
//!   their grids, uploaded once per step); one indexed grid-sampling launch
//!   per side, strided-batched relation GEMMs, the fused relation
//!   cross-entropy (loss and gradient), the relation backward and an
//!   indexed scatter of the gradient into the student map;
//! - channel: all views' relation logits in three batched GEMMs, one fused
//!   cross-entropy per (teacher view, student view group), two relation
//!   backwards.
//!
//! Each call's loss goes to its own slot of the step's statistics buffer;
//! the host combines the slots after the step's one download
//! ([`LossPlan::combine`]).

use super::heads::SereActs;
use super::{Buf, Gpu, R};
use crate::augment::BatchPairGrids;
use sere_core::bilinear::SampleShape;
use sere_cuda::CudaSlice;

/// Shapes of the relation losses of one batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct LossShape {
    pub batch: usize,
    pub locals: usize,
    pub c: usize,
    pub heads: usize,
    /// Global / local patch grid sides.
    pub gg: usize,
    pub gl: usize,
    /// Largest number of grid points of a pair.
    pub pmax: usize,
}

impl LossShape {
    fn views(&self) -> usize {
        2 + self.locals
    }
    /// (teacher, student) pairs in the CPU's order per image.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        for t in 0..2 {
            for s in (0..self.views()).filter(|&s| s != t) {
                v.push((t, s));
            }
        }
        v
    }
    /// Channel cross-entropy calls: (student view, teacher view).
    pub fn channel_calls(&self) -> usize {
        2 + 2 * self.locals
    }
}

/// What the host learned while staging one step's grids: per pair its
/// valid images and points; and how to turn the loss slots into
/// `L_spatial` and `L_channel`.
#[derive(Debug, Default)]
pub(super) struct LossPlan {
    /// Per pair: (valid images `m`, points `P`).
    pub per_pair: Vec<(usize, usize)>,
    /// Overlapping (image, pair) terms.
    pub spatial_terms: usize,
    /// `B * 2 * (V - 1)`.
    pub channel_terms: usize,
}

impl LossPlan {
    /// `(L_spatial, L_channel)` from the per-call means in `spatial` (one per
    /// pair) and `channel` (one per cross-entropy call): each call's mean is
    /// over its images, so weight by the images and divide by the terms.
    pub fn combine(&self, batch: usize, spatial: &[f32], channel: &[f32]) -> (f32, f32) {
        let mut ls = 0.0f64;
        if self.spatial_terms > 0 {
            for (&(m, _), &v) in self.per_pair.iter().zip(spatial) {
                if m > 0 {
                    ls += v as f64 * m as f64;
                }
            }
            ls /= self.spatial_terms as f64;
        }
        let lc = channel
            .iter()
            .map(|&v| v as f64 * batch as f64)
            .sum::<f64>()
            / self.channel_terms.max(1) as f64;
        (ls as f32, lc as f32)
    }
}

/// Device workspace of the relation losses (shaped once per batch shape).
pub(super) struct LossWs {
    shape: LossShape,
    idx: CudaSlice<i32>,
    tgrid: Buf,
    sgrid: Buf,
    xt: Buf,
    xs: Buf,
    dxs: Buf,
    lt: Buf,
    ls: Buf,
    dls: Buf,
    tlog: Buf,
    sg_log: Buf,
    sl_log: Buf,
    dsg: Buf,
    dsl: Buf,
    host_idx: Vec<i32>,
    host_tgrid: Vec<f32>,
    host_sgrid: Vec<f32>,
}

impl LossWs {
    /// Allocates every buffer for `shape`.
    pub fn new(gpu: &Gpu, shape: LossShape) -> R<Self> {
        let LossShape {
            batch: b,
            locals: l,
            c,
            heads,
            pmax,
            ..
        } = shape;
        let np = shape.pairs().len();
        let z = |n: usize| gpu.zeros(n.max(1));
        Ok(LossWs {
            shape,
            idx: gpu.stream().alloc_zeros::<i32>((np * b).max(1))?,
            tgrid: z(np * b * pmax * 2)?,
            sgrid: z(np * b * pmax * 2)?,
            xt: z(b * pmax * c)?,
            xs: z(b * pmax * c)?,
            dxs: z(b * pmax * c)?,
            lt: z(b * heads * pmax * pmax)?,
            ls: z(b * heads * pmax * pmax)?,
            dls: z(b * heads * pmax * pmax)?,
            tlog: z(2 * b * c * c)?,
            sg_log: z(2 * b * c * c)?,
            sl_log: z(l * b * c * c)?,
            dsg: z(2 * b * c * c)?,
            dsl: z(l * b * c * c)?,
            host_idx: Vec::with_capacity(np * b),
            host_tgrid: Vec::with_capacity(np * b * pmax * 2),
            host_sgrid: Vec::with_capacity(np * b * pmax * 2),
        })
    }

    /// The shape this workspace was built for.
    pub fn shape(&self) -> LossShape {
        self.shape
    }

    /// Compacts the overlapping images of every pair and uploads their
    /// indices and grids (three copies per step). Pairs are looked up in
    /// `grids` as the CPU does (first entry with that teacher and student).
    pub fn stage(&mut self, gpu: &Gpu, grids: &[BatchPairGrids]) -> R<LossPlan> {
        let sh = self.shape;
        let (b, pmax) = (sh.batch, sh.pmax);
        let pairs = sh.pairs();
        self.host_idx.clear();
        self.host_idx.resize(pairs.len() * b, -1);
        self.host_tgrid.clear();
        self.host_tgrid.resize(pairs.len() * b * pmax * 2, 0.0);
        self.host_sgrid.clear();
        self.host_sgrid.resize(pairs.len() * b * pmax * 2, 0.0);
        let mut plan = LossPlan {
            channel_terms: b * 2 * (sh.views() - 1),
            ..LossPlan::default()
        };
        for (pi, &(t, s)) in pairs.iter().enumerate() {
            let Some(g) = grids.iter().find(|g| g.teacher == t && g.student == s) else {
                plan.per_pair.push((0, 0));
                continue;
            };
            let p = g.hs * g.ws;
            assert!(
                p > 0 && p <= pmax,
                "pair grid of {p} points outside 1..={pmax}"
            );
            let mut m = 0;
            for img in 0..b {
                if !g.valid[img] {
                    continue;
                }
                self.host_idx[pi * b + m] = img as i32;
                // Slots of a pair are 2P apart (the kernels' layout);
                // pairs are `B * pmax * 2` apart.
                let dst = pi * b * pmax * 2 + m * p * 2;
                let src = img * p * 2..(img + 1) * p * 2;
                self.host_tgrid[dst..dst + 2 * p].copy_from_slice(&g.teacher_grid[src.clone()]);
                self.host_sgrid[dst..dst + 2 * p].copy_from_slice(&g.student_grid[src]);
                m += 1;
            }
            plan.spatial_terms += m;
            plan.per_pair.push((m, p));
        }
        gpu.stream().memcpy_htod(
            &self.host_idx,
            &mut self.idx.slice_mut(..self.host_idx.len()),
        )?;
        gpu.upload_into(
            &self.host_tgrid,
            &mut self.tgrid.slice_mut(..self.host_tgrid.len()),
        )?;
        gpu.upload_into(
            &self.host_sgrid,
            &mut self.sgrid.slice_mut(..self.host_sgrid.len()),
        )?;
        Ok(plan)
    }
}

/// The student's relation-head outputs and their gradient buffers.
pub(super) struct StudentHeads<'a> {
    pub global: &'a SereActs,
    pub local: Option<&'a SereActs>,
    pub dglobal: &'a mut Buf,
    pub dlocal: &'a mut Buf,
}

/// The spatial loss: for every pair with overlapping images, samples,
/// relates, takes the cross-entropy (its mean over the pair's rows into
/// `slots[pair]`) and adds `alpha * dL/dstudent` into the student's
/// gradient maps.
#[allow(clippy::too_many_arguments)]
pub(super) fn spatial(
    gpu: &Gpu,
    ws: &mut LossWs,
    plan: &LossPlan,
    teacher: &SereActs,
    student: StudentHeads,
    alpha: f32,
    tau_t: f32,
    stats: &mut Buf,
    slot0: usize,
) -> R<()> {
    if plan.spatial_terms == 0 {
        return Ok(());
    }
    let sh = ws.shape;
    let (b, c, heads, pmax) = (sh.batch, sh.c, sh.heads, sh.pmax);
    let (ng, nl) = (sh.gg * sh.gg, sh.gl * sh.gl);
    let StudentHeads {
        global,
        local,
        dglobal,
        dlocal,
    } = student;
    for (pi, (&(t, s), &(m, p))) in sh.pairs().iter().zip(&plan.per_pair).enumerate() {
        if m == 0 {
            continue;
        }
        let idx = ws.idx.slice(pi * b..pi * b + m);
        let g0 = pi * b * pmax * 2;
        let tg = ws.tgrid.slice(g0..g0 + m * p * 2);
        let sg = ws.sgrid.slice(g0..g0 + m * p * 2);
        let gmap = ng * c;
        let tmap = teacher.out.slice(t * b * gmap..(t + 1) * b * gmap);
        let shape_t = SampleShape {
            channels: c,
            height: sh.gg,
            width: sh.gg,
            points: p,
        };
        let mut xt = ws.xt.slice_mut(..m * p * c);
        gpu.grid_sample_forward_indexed(&tmap, b, &idx, &tg, m, shape_t, &mut xt)?;
        let mut lt = ws.lt.slice_mut(..m * heads * p * p);
        gpu.spatial_relation_forward(&xt, m, p, c, heads, &mut lt)?;
        let (side, map_len) = if s < 2 {
            (sh.gg, gmap)
        } else {
            (sh.gl, nl * c)
        };
        let shape_s = SampleShape {
            channels: c,
            height: side,
            width: side,
            points: p,
        };
        let (smaps, off) = if s < 2 {
            (&global.out, s * b * map_len)
        } else {
            (
                &local.expect("local views have a local head").out,
                (s - 2) * b * map_len,
            )
        };
        let smap = smaps.slice(off..off + b * map_len);
        let mut xs = ws.xs.slice_mut(..m * p * c);
        gpu.grid_sample_forward_indexed(&smap, b, &idx, &sg, m, shape_s, &mut xs)?;
        let mut ls = ws.ls.slice_mut(..m * heads * p * p);
        gpu.spatial_relation_forward(&xs, m, p, c, heads, &mut ls)?;
        let mut dls = ws.dls.slice_mut(..m * heads * p * p);
        gpu.fill_zero(&mut dls)?;
        // The CPU scales each term by alpha / terms / (heads P tau_s); the
        // fused kernel divides by all m * heads * P rows: undo the m.
        let scale = alpha * m as f32 / plan.spatial_terms as f32;
        gpu.relation_cross_entropy_backward(
            &ls,
            &lt,
            m * heads * p,
            p,
            1.0,
            tau_t,
            scale,
            &mut dls,
            &mut stats.slice_mut(slot0 + pi..slot0 + pi + 1),
        )?;
        let mut dxs = ws.dxs.slice_mut(..m * p * c);
        gpu.fill_zero(&mut dxs)?;
        gpu.spatial_relation_backward(&xs, &dls, m, p, c, heads, &mut dxs)?;
        let dmaps: &mut Buf = if s < 2 { dglobal } else { dlocal };
        let mut dmap = dmaps.slice_mut(off..off + b * map_len);
        gpu.grid_sample_backward_indexed(&idx, &sg, &dxs, m, shape_s, b, &mut dmap)?;
    }
    Ok(())
}

/// The channel loss: every student view against the teacher's global views
/// other than itself; each call's mean into `slots[call]`, `beta *
/// dL/dstudent` added into the student's gradient maps.
#[allow(clippy::too_many_arguments)]
pub(super) fn channel(
    gpu: &Gpu,
    ws: &mut LossWs,
    plan: &LossPlan,
    teacher: &SereActs,
    student: StudentHeads,
    beta: f32,
    tau_t: f32,
    stats: &mut Buf,
    slot0: usize,
) -> R<()> {
    let sh = ws.shape;
    let (b, l, c) = (sh.batch, sh.locals, sh.c);
    let (ng, nl) = (sh.gg * sh.gg, sh.gl * sh.gl);
    let cc = c * c;
    let StudentHeads {
        global,
        local,
        dglobal,
        dlocal,
    } = student;
    gpu.channel_relation_forward(&teacher.out, 2 * b, ng, c, &mut ws.tlog)?;
    gpu.channel_relation_forward(&global.out, 2 * b, ng, c, &mut ws.sg_log)?;
    gpu.fill_zero(&mut ws.dsg)?;
    if l > 0 {
        let lo = local.expect("local views have a local head");
        gpu.channel_relation_forward(&lo.out, l * b, nl, c, &mut ws.sl_log)?;
        gpu.fill_zero(&mut ws.dsl)?;
    }
    // Per term the CPU scales by beta / terms / (C tau_s); the kernel
    // divides by the call's B * C rows: undo the B.
    let scale = beta * b as f32 / plan.channel_terms as f32;
    let view = |v: usize| v * b * cc..(v + 1) * b * cc;
    let mut call = 0;
    for s in 0..2 {
        let t = 1 - s;
        gpu.relation_cross_entropy_backward(
            &ws.sg_log.slice(view(s)),
            &ws.tlog.slice(view(t)),
            b * c,
            c,
            1.0,
            tau_t,
            scale,
            &mut ws.dsg.slice_mut(view(s)),
            &mut stats.slice_mut(slot0 + call..slot0 + call + 1),
        )?;
        call += 1;
    }
    for v in 0..l {
        for t in 0..2 {
            gpu.relation_cross_entropy_backward(
                &ws.sl_log.slice(view(v)),
                &ws.tlog.slice(view(t)),
                b * c,
                c,
                1.0,
                tau_t,
                scale,
                &mut ws.dsl.slice_mut(view(v)),
                &mut stats.slice_mut(slot0 + call..slot0 + call + 1),
            )?;
            call += 1;
        }
    }
    gpu.channel_relation_backward(&global.out, &ws.dsg, 2 * b, ng, c, dglobal)?;
    if let Some(lo) = local {
        gpu.channel_relation_backward(&lo.out, &ws.dsl, l * b, nl, c, dlocal)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per-call means weighted back into per-term sums: the CPU's mean over
    /// terms.
    #[test]
    fn combine_weights_call_means_by_their_images() {
        let plan = LossPlan {
            per_pair: vec![(2, 9), (0, 4), (1, 4)],
            spatial_terms: 3,
            channel_terms: 4 * 2 * 2,
        };
        // Pair 0: two terms of mean 1.5 (sum 3); pair 2: one term of 6.
        let (s, c) = plan.combine(4, &[1.5, 123.0, 6.0], &[1.0, 2.0, 3.0, 4.0]);
        assert!((s - 3.0).abs() < 1e-6, "{s}");
        // Each channel call averages over the batch of 4: sum 4 * 10 / 16.
        assert!((c - 2.5).abs() < 1e-6, "{c}");
        let shape = LossShape {
            batch: 4,
            locals: 2,
            c: 8,
            heads: 2,
            gg: 4,
            gl: 2,
            pmax: 9,
        };
        assert_eq!(shape.pairs().len(), 2 * 3);
        assert_eq!(shape.pairs()[..3], [(0, 1), (0, 2), (0, 3)]);
        assert_eq!(shape.channel_calls(), 6);
    }
}
