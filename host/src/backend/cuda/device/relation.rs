//! The device side of [`Backend::relation_losses`]: the workspace keyed by
//! the batch's relation shape, the staging of the pair grids, and the
//! spatial and channel losses as sequences of `sere-cuda`'s batched
//! relation kernels.

use super::views::{lead, lead_mut, part, part_mut, short};
use super::{Buf, Cuda};
use crate::augment::BatchPairGrids;
use crate::backend::relation::{ViewShapes, GLOBAL_VIEWS};
#[cfg(doc)]
use crate::backend::Backend;
use crate::backend::{OpError, OpResult, StatSlot, StudentFeatureGrads, StudentFeatures};
use sere_core::bilinear::SampleShape;
use sere_cuda::{CudaError, CudaSlice, Gpu};

/// Sizes of the relation losses of one batch shape (the workspace's key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RelShape {
    batch: usize,
    locals: usize,
    c: usize,
    heads: usize,
    global_hw: (usize, usize),
    local_hw: (usize, usize),
    /// Largest number of grid points of a pair.
    pmax: usize,
}

impl RelShape {
    fn views(&self) -> usize {
        GLOBAL_VIEWS + self.locals
    }

    /// (teacher, student) pairs in the CPU's order.
    fn pairs(&self) -> Vec<(usize, usize)> {
        let v = self.views();
        (0..GLOBAL_VIEWS)
            .flat_map(|t| (0..v).filter(move |&s| s != t).map(move |s| (t, s)))
            .collect()
    }
}

/// Device buffers of the relation losses for one [`RelShape`].
pub(super) struct RelBuffers {
    shape: RelShape,
    /// Per pair, the overlapping images (`[pairs][B]`, compacted).
    idx: CudaSlice<i32>,
    /// Teacher grids then student grids, `[2][pairs][B][pmax][2]`, the
    /// images of a pair compacted (`2P` apart).
    grids: Buf,
    /// One call's mean loss (cross-entropies overwrite it; it is then added
    /// into `stats` with the call's weight).
    call_loss: Buf,
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
    host_grids: Vec<f32>,
    /// Per pair of the last staging: (overlapping images `m`, points `P`).
    per_pair: Vec<(usize, usize)>,
}

impl RelBuffers {
    fn new(gpu: &Gpu, sh: RelShape) -> OpResult<Self> {
        let (b, l, c, pmax) = (sh.batch, sh.locals, sh.c, sh.pmax);
        let np = sh.pairs().len();
        let z = |n: usize| gpu.zeros(n.max(1));
        Ok(RelBuffers {
            shape: sh,
            idx: gpu
                .stream()
                .alloc_zeros::<i32>((np * b).max(1))
                .map_err(CudaError::from)?,
            grids: z(2 * np * b * pmax * 2)?,
            call_loss: z(1)?,
            xt: z(b * pmax * c)?,
            xs: z(b * pmax * c)?,
            dxs: z(b * pmax * c)?,
            lt: z(b * sh.heads * pmax * pmax)?,
            ls: z(b * sh.heads * pmax * pmax)?,
            dls: z(b * sh.heads * pmax * pmax)?,
            tlog: z(GLOBAL_VIEWS * b * c * c)?,
            sg_log: z(GLOBAL_VIEWS * b * c * c)?,
            sl_log: z(l * b * c * c)?,
            dsg: z(GLOBAL_VIEWS * b * c * c)?,
            dsl: z(l * b * c * c)?,
            host_idx: Vec::with_capacity(np * b),
            host_grids: Vec::with_capacity(2 * np * b * pmax * 2),
            per_pair: Vec::with_capacity(np),
        })
    }

    /// Offset of the student grids in `grids`.
    fn student_grids(&self) -> usize {
        self.shape.pairs().len() * self.shape.batch * self.shape.pmax * 2
    }

    /// Compacts the overlapping images of every pair (pairs looked up as
    /// the CPU does: the first entry with that teacher and student) and
    /// uploads their indices and grids (two copies); returns the spatial
    /// terms.
    pub(super) fn stage(&mut self, gpu: &Gpu, grids: &[BatchPairGrids]) -> OpResult<usize> {
        let sh = self.shape;
        let (b, pmax) = (sh.batch, sh.pmax);
        let pairs = sh.pairs();
        let sg0 = self.student_grids();
        self.host_idx.clear();
        self.host_idx.resize(pairs.len() * b, -1);
        self.host_grids.clear();
        self.host_grids.resize(2 * sg0, 0.0);
        self.per_pair.clear();
        let mut terms = 0;
        for (pi, &(t, s)) in pairs.iter().enumerate() {
            let Some(g) = grids.iter().find(|g| g.teacher == t && g.student == s) else {
                self.per_pair.push((0, 0));
                continue;
            };
            let p = g.hs * g.ws;
            if g.valid.len() < b {
                return Err(short("pair grids: valid", b, g.valid.len()));
            }
            let mut m = 0;
            for img in (0..b).filter(|&i| g.valid[i]) {
                let src = img * p * 2..(img + 1) * p * 2;
                let (Some(tg), Some(sg)) = (
                    g.teacher_grid.get(src.clone()),
                    g.student_grid.get(src.clone()),
                ) else {
                    return Err(short("pair grids", src.end, g.teacher_grid.len()));
                };
                self.host_idx[pi * b + m] = img as i32;
                let dst = pi * b * pmax * 2 + m * p * 2;
                self.host_grids[dst..dst + 2 * p].copy_from_slice(tg);
                self.host_grids[sg0 + dst..sg0 + dst + 2 * p].copy_from_slice(sg);
                m += 1;
            }
            terms += m;
            self.per_pair.push((m, p));
        }
        let n_idx = self.host_idx.len();
        gpu.stream()
            .memcpy_htod(&self.host_idx, &mut self.idx.slice_mut(..n_idx))
            .map_err(CudaError::from)?;
        let n_grids = self.host_grids.len();
        gpu.upload_into(&self.host_grids, &mut self.grids.slice_mut(..n_grids))?;
        Ok(terms)
    }
}

/// Device workspace of [`Backend::relation_losses`]
/// ([`Backend::RelationWorkspace`]): shaped on first use and again only
/// when the batch shape or the grid sizes change.
#[derive(Default)]
pub struct RelationWorkspace {
    bufs: Option<RelBuffers>,
}

impl RelationWorkspace {
    /// The buffers for `sh`, (re)allocated if they were built for another.
    pub(super) fn shaped(&mut self, gpu: &Gpu, sh: RelShape) -> OpResult<&mut RelBuffers> {
        if self.bufs.as_ref().is_none_or(|w| w.shape != sh) {
            self.bufs = None; // free the old shape's buffers first
            self.bufs = Some(RelBuffers::new(gpu, sh)?);
        }
        self.bufs
            .as_mut()
            .ok_or_else(|| OpError::Device("relation workspace missing after allocation".into()))
    }
}

/// Temperatures and weights of the relation losses of one call.
#[derive(Clone, Copy)]
pub(super) struct RelParams {
    pub(super) tau_s: f32,
    pub(super) tau_t: f32,
    pub(super) weight: f32,
}

/// The spatial loss: per pair with overlapping images, one indexed sampling
/// per side, the relation GEMMs, the fused cross-entropy (its mean over the
/// pair's rows, weighted by `m / terms`, added into `stats[slot]`) and the
/// gradient scattered back into the student map.
pub(super) fn spatial_loss(
    gpu: &Gpu,
    w: &mut RelBuffers,
    terms: usize,
    (teacher, student): (&Buf, &StudentFeatures<'_, Cuda>),
    grads: &mut StudentFeatureGrads<'_, Cuda>,
    rp: RelParams,
    StatSlot { stats, slot }: StatSlot<'_, Buf>,
) -> OpResult {
    if terms == 0 {
        return Ok(());
    }
    let sh = w.shape;
    let (b, c, heads, pmax) = (sh.batch, sh.c, sh.heads, sh.pmax);
    let gmap = sh.global_hw.0 * sh.global_hw.1 * c;
    let lmap = sh.local_hw.0 * sh.local_hw.1 * c;
    let sg0 = w.student_grids();
    for (pi, (&(t, s), &(m, p))) in sh.pairs().iter().zip(&w.per_pair).enumerate() {
        if m == 0 {
            continue;
        }
        let idx = w.idx.slice(pi * b..pi * b + m);
        let g0 = pi * b * pmax * 2;
        let tg = w.grids.slice(g0..g0 + m * p * 2);
        let sg = w.grids.slice(sg0 + g0..sg0 + g0 + m * p * 2);
        let (th, tw) = sh.global_hw;
        let shape_t = SampleShape {
            channels: c,
            height: th,
            width: tw,
            points: p,
        };
        let tmap = part(
            teacher,
            t * b * gmap..(t + 1) * b * gmap,
            "teacher features",
        )?;
        let mut xt = w.xt.slice_mut(..m * p * c);
        gpu.grid_sample_forward_indexed(&tmap, b, &idx, &tg, m, shape_t, &mut xt)?;
        let mut lt = w.lt.slice_mut(..m * heads * p * p);
        gpu.spatial_relation_forward(&xt, m, p, c, heads, &mut lt)?;
        let ((sh_, sw), map_len, off) = if s < GLOBAL_VIEWS {
            (sh.global_hw, gmap, s * b * gmap)
        } else {
            (sh.local_hw, lmap, (s - GLOBAL_VIEWS) * b * lmap)
        };
        let shape_s = SampleShape {
            channels: c,
            height: sh_,
            width: sw,
            points: p,
        };
        let (maps, dmaps) = if s < GLOBAL_VIEWS {
            (student.globals, &mut *grads.globals)
        } else {
            (student.locals, &mut *grads.locals)
        };
        let smap = part(maps, off..off + b * map_len, "student features")?;
        let mut xs = w.xs.slice_mut(..m * p * c);
        gpu.grid_sample_forward_indexed(&smap, b, &idx, &sg, m, shape_s, &mut xs)?;
        let mut ls = w.ls.slice_mut(..m * heads * p * p);
        gpu.spatial_relation_forward(&xs, m, p, c, heads, &mut ls)?;
        let mut dls = w.dls.slice_mut(..m * heads * p * p);
        gpu.fill_zero(&mut dls)?;
        // The CPU scales each term by weight / terms / (heads P); the fused
        // kernel divides by all m heads P rows: undo the m.
        let share = m as f32 / terms as f32;
        gpu.relation_cross_entropy_backward(
            &ls,
            &lt,
            m * heads * p,
            p,
            rp.tau_s,
            rp.tau_t,
            rp.weight * share,
            &mut dls,
            &mut w.call_loss,
        )?;
        gpu.axpy(&mut stats.slice_mut(slot..slot + 1), &w.call_loss, share)?;
        let mut dxs = w.dxs.slice_mut(..m * p * c);
        gpu.fill_zero(&mut dxs)?;
        gpu.spatial_relation_backward(&xs, &dls, m, p, c, heads, &mut dxs)?;
        let mut dmap = part_mut(dmaps, off..off + b * map_len, "student feature gradients")?;
        gpu.grid_sample_backward_indexed(&idx, &sg, &dxs, m, shape_s, b, &mut dmap)?;
    }
    Ok(())
}

/// The channel loss: every student view against the teacher's global views
/// other than itself, three batched relation GEMMs, one fused
/// cross-entropy per (student view, teacher view) (each mean weighted by
/// `B / terms` into `stats[slot]`), two relation backwards.
pub(super) fn channel_loss(
    gpu: &Gpu,
    w: &mut RelBuffers,
    (teacher, student): (&Buf, &StudentFeatures<'_, Cuda>),
    grads: &mut StudentFeatureGrads<'_, Cuda>,
    rp: RelParams,
    StatSlot { stats, slot }: StatSlot<'_, Buf>,
) -> OpResult {
    let sh = w.shape;
    let (b, l, c) = (sh.batch, sh.locals, sh.c);
    let (ng, nl) = (
        sh.global_hw.0 * sh.global_hw.1,
        sh.local_hw.0 * sh.local_hw.1,
    );
    let (cc, g2) = (c * c, GLOBAL_VIEWS * b);
    let terms = b * GLOBAL_VIEWS * (sh.views() - 1);
    let tfeat = lead(teacher, g2 * ng * c, "teacher features")?;
    let sglob = lead(student.globals, g2 * ng * c, "student globals")?;
    gpu.channel_relation_forward(&tfeat, g2, ng, c, &mut w.tlog)?;
    gpu.channel_relation_forward(&sglob, g2, ng, c, &mut w.sg_log)?;
    gpu.fill_zero(&mut w.dsg)?;
    let sloc = if l > 0 {
        let v = lead(student.locals, l * b * nl * c, "student locals")?;
        gpu.channel_relation_forward(&v, l * b, nl, c, &mut w.sl_log)?;
        gpu.fill_zero(&mut w.dsl)?;
        Some(v)
    } else {
        None
    };
    // Per term the CPU scales by weight / terms / C; the kernel divides by
    // the call's B C rows: undo the B.
    let share = b as f32 / terms as f32;
    let view = |v: usize| v * b * cc..(v + 1) * b * cc;
    // (student view, teacher view): globals against the other global view,
    // each local view against both.
    let calls = (0..GLOBAL_VIEWS)
        .map(|s| (s, 1 - s))
        .chain((GLOBAL_VIEWS..sh.views()).flat_map(|s| (0..GLOBAL_VIEWS).map(move |t| (s, t))));
    for (s, t) in calls {
        let (logits, dlogits, v) = if s < GLOBAL_VIEWS {
            (&w.sg_log, &mut w.dsg, s)
        } else {
            (&w.sl_log, &mut w.dsl, s - GLOBAL_VIEWS)
        };
        gpu.relation_cross_entropy_backward(
            &logits.slice(view(v)),
            &w.tlog.slice(view(t)),
            b * c,
            c,
            rp.tau_s,
            rp.tau_t,
            rp.weight * share,
            &mut dlogits.slice_mut(view(v)),
            &mut w.call_loss,
        )?;
        gpu.axpy(&mut stats.slice_mut(slot..slot + 1), &w.call_loss, share)?;
    }
    let mut dglob = lead_mut(grads.globals, g2 * ng * c, "student global gradients")?;
    gpu.channel_relation_backward(&sglob, &w.dsg, g2, ng, c, &mut dglob)?;
    if let Some(sloc) = sloc {
        let mut dloc = lead_mut(grads.locals, l * b * nl * c, "student local gradients")?;
        gpu.channel_relation_backward(&sloc, &w.dsl, l * b, nl, c, &mut dloc)?;
    }
    Ok(())
}

/// The relation shape of one batch; `pmax` from its grids.
pub(super) fn rel_shape(shapes: &ViewShapes, heads: usize, grids: &[BatchPairGrids]) -> RelShape {
    RelShape {
        batch: shapes.batch,
        locals: shapes.locals,
        c: shapes.channels,
        heads,
        global_hw: shapes.global_hw,
        local_hw: shapes.local_hw,
        pmax: grids.iter().map(|g| g.hs * g.ws).max().unwrap_or(1).max(1),
    }
}
