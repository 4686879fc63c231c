//! [`Cuda`]: the [`Backend`] on one CUDA GPU, every operation a short
//! sequence of `sere-cuda` calls (NVRTC kernels, cuBLAS SGEMM) enqueued on
//! the device's one stream.
//!
//! - Buffers are [`CudaSlice<f32>`]; an operation reads and writes the
//!   leading elements its shape names through exactly-sized views
//!   (`lead`, `part`), since `sere-cuda` takes lengths from its views.
//!   A range outside its buffer is an [`OpError::Kernel`] shape error, not
//!   a panic.
//! - Nothing waits for the device except [`Backend::download`] and
//!   [`Backend::synchronize`]. Non-finite values are not detected per call
//!   (that would cost a round trip per kernel): they propagate into the
//!   losses and the gradient norm in the step's `stats`, which the engine
//!   downloads and checks once per step.
//! - Scratch: `sere-cuda` allocates its small reduction partials itself
//!   (stream-ordered). The batch-norm backward uses the caller's
//!   [`CudaScratch`]; the two operations whose signature has no scratch
//!   (attention backward with a short `dscores`, GELU gradient in place) and
//!   the per-tensor clipping use one device buffer owned by [`Cuda`], grown
//!   to the largest request and reused (safe: all work is on one stream).

use std::ops::Range;
use std::sync::Mutex;

use crate::augment::BatchPairGrids;
use crate::backend::relation::{ViewShapes, GLOBAL_VIEWS};
use crate::backend::{
    AttentionShape, Backend, Blocks, BnMode, BnStats, DinoLossArgs, LinearShape, MimLossArgs,
    OpError, OpResult, RelationArgs, StudentFeatureGrads, StudentFeatures,
};
use crate::backend::{BN_EPS, BN_MOMENTUM, LN_EPS};
use sere_core::bilinear::SampleShape;
use sere_core::linalg::MatRef;
use sere_core::loss::DinoShape;
use sere_core::optim::AdamW;
use sere_cuda::{CudaError, CudaSlice, CudaView, CudaViewMut, Gpu, MatView};

/// A device buffer of `f32`.
type Buf = CudaSlice<f32>;

impl From<CudaError> for OpError {
    /// sere-cuda's argument checks are sere-core's errors
    /// ([`OpError::Kernel`]); everything else is the device's
    /// ([`OpError::Device`], one line).
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Shape(e) => OpError::Kernel(e),
            e => OpError::Device(e.to_string()),
        }
    }
}

/// A shape error: `what` needs `expected` values and has `got`.
fn short(what: &'static str, expected: usize, got: usize) -> OpError {
    OpError::Kernel(sere_core::Error::ShapeMismatch {
        what,
        expected,
        got,
    })
}

/// An argument error.
fn invalid(what: &'static str, requirement: &'static str) -> OpError {
    OpError::Kernel(sere_core::Error::InvalidArgument { what, requirement })
}

/// `b[r]` as a view, or a shape error.
fn part<'a>(b: &'a Buf, r: Range<usize>, what: &'static str) -> OpResult<CudaView<'a, f32>> {
    let end = r.end;
    b.try_slice(r).ok_or_else(|| short(what, end, b.len()))
}

/// `b[r]` as a mutable view, or a shape error.
fn part_mut<'a>(
    b: &'a mut Buf,
    r: Range<usize>,
    what: &'static str,
) -> OpResult<CudaViewMut<'a, f32>> {
    let (end, len) = (r.end, b.len());
    b.try_slice_mut(r).ok_or_else(|| short(what, end, len))
}

/// SyncBN across processes needs a device collective (NCCL), which this
/// backend does not have yet; one process's statistics pass.
fn refuse_sync_bn(group: &Option<crate::dist::ProcessGroup>) -> OpResult {
    match group {
        Some(g) if g.world() > 1 => Err(OpError::Device(
            "batch norm synchronised across processes needs NCCL, which the CUDA backend \
             does not have yet; train on CUDA with one process"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// The first `n` values of `b`.
fn lead<'a>(b: &'a Buf, n: usize, what: &'static str) -> OpResult<CudaView<'a, f32>> {
    part(b, 0..n, what)
}

/// The first `n` values of `b`, mutable.
fn lead_mut<'a>(b: &'a mut Buf, n: usize, what: &'static str) -> OpResult<CudaViewMut<'a, f32>> {
    part_mut(b, 0..n, what)
}

/// Runs `f` on two disjoint mutable ranges of one buffer (a weight's and a
/// bias's gradient), in the order given.
fn two_mut<R>(
    g: &mut Buf,
    a: Range<usize>,
    b: Range<usize>,
    f: impl FnOnce(&mut CudaViewMut<'_, f32>, &mut CudaViewMut<'_, f32>) -> OpResult<R>,
) -> OpResult<R> {
    let swapped = a.start > b.start;
    let (lo, hi) = if swapped { (b, a) } else { (a, b) };
    if lo.start > lo.end || hi.start > hi.end || lo.end > hi.start || hi.end > g.len() {
        return Err(invalid(
            "parameter ranges",
            "must be disjoint and inside the gradient buffer",
        ));
    }
    let mut whole = g.slice_mut(lo.start..hi.end);
    let (mut first, mut second) = whole.split_at_mut(hi.start - lo.start);
    let mut x = first.slice_mut(..lo.len());
    let mut y = second.slice_mut(..hi.len());
    if swapped {
        f(&mut y, &mut x)
    } else {
        f(&mut x, &mut y)
    }
}

/// A sere-core strided view as a cuBLAS row-major view: unit column stride
/// is row-major with `ld = row_stride`; unit row stride is the transpose of
/// a row-major matrix with `ld = col_stride` (a single row or column takes
/// either). Anything else cuBLAS cannot read.
fn mat_view(m: MatRef) -> OpResult<MatView> {
    let (rows, cols) = (m.rows, m.cols);
    if m.col_stride == 1 || cols == 1 {
        let ld = if rows <= 1 {
            m.row_stride.max(cols)
        } else {
            m.row_stride
        };
        Ok(MatView {
            offset: m.offset,
            rows,
            cols,
            ld,
            batch_stride: 0,
            transposed: false,
        })
    } else if m.row_stride == 1 || rows == 1 {
        let ld = if cols <= 1 {
            m.col_stride.max(rows)
        } else {
            m.col_stride
        };
        Ok(MatView {
            offset: m.offset,
            rows: cols,
            cols: rows,
            ld,
            batch_stride: 0,
            transposed: true,
        })
    } else {
        Err(invalid(
            "gemm view",
            "needs a unit stride along its rows or its columns",
        ))
    }
}

/// Rows of one head of `q`, `k` or `v` in a `qkv` buffer (`[T][3][H][d]`
/// per image), batched over images; `.at(offset)` picks the head.
fn qkv_view(t: usize, hd: usize, d: usize) -> MatView {
    MatView {
        offset: 0,
        rows: t,
        cols: hd,
        ld: 3 * d,
        batch_stride: t * 3 * d,
        transposed: false,
    }
}

/// Rows of one head of the attention output (`[T][H][d]` per image).
fn out_view(t: usize, hd: usize, d: usize) -> MatView {
    MatView {
        offset: 0,
        rows: t,
        cols: hd,
        ld: d,
        batch_stride: t * d,
        transposed: false,
    }
}

/// Checked per-head width and score scale of an attention shape.
fn head_dim(s: &AttentionShape) -> OpResult<(usize, f32)> {
    if s.heads == 0 || s.dim % s.heads != 0 {
        return Err(invalid("heads", "must divide the embedding width"));
    }
    let hd = s.dim / s.heads;
    Ok((hd, 1.0 / (hd as f32).sqrt()))
}

/// Scratch of the operations that take one ([`Backend::Scratch`]): a device
/// buffer grown to the largest request.
#[derive(Debug, Default)]
pub struct CudaScratch {
    buf: Option<Buf>,
}

/// Makes `slot` hold at least `n` values (freeing a smaller buffer first).
fn grow<'s>(gpu: &Gpu, slot: &'s mut Option<Buf>, n: usize) -> OpResult<&'s mut Buf> {
    if !matches!(slot, Some(b) if b.len() >= n) {
        *slot = None;
        *slot = Some(gpu.zeros(n.max(1))?);
    }
    slot.as_mut()
        .ok_or_else(|| OpError::Device("scratch buffer missing after allocation".into()))
}

/// One CUDA device as a [`Backend`].
pub struct Cuda {
    gpu: Gpu,
    /// Device temporary of the operations without a scratch argument.
    temp: Mutex<Option<Buf>>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cuda")
            .field("device", self.gpu.info())
            .finish()
    }
}

impl Cuda {
    /// Opens device `ordinal` (context, stream, cuBLAS, kernels compiled
    /// once per process); the error is one line saying what is missing.
    /// GEMMs are full FP32 until [`Gpu::set_tf32`] on [`Cuda::gpu`].
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        Ok(Cuda {
            gpu: Gpu::new(ordinal)?,
            temp: Mutex::new(None),
        })
    }

    /// The device and its sere-cuda operations.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Runs `f` with the device temporary grown to at least `n` values.
    /// Not reentrant: `f` must not call `with_temp`.
    fn with_temp<R>(&self, n: usize, f: impl FnOnce(&mut Buf) -> OpResult<R>) -> OpResult<R> {
        let mut guard = self.temp.lock().unwrap_or_else(|e| e.into_inner());
        f(grow(&self.gpu, &mut guard, n)?)
    }

    /// The attention backward with `dp` (`dO V^T`) and `ds` (softmax
    /// backward) scratch of `batch x heads x T x T` each.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward_in(
        &self,
        qkv: &CudaView<'_, f32>,
        probs: &CudaView<'_, f32>,
        dattn: &CudaView<'_, f32>,
        s: AttentionShape,
        dp: &mut CudaViewMut<'_, f32>,
        ds: &mut CudaViewMut<'_, f32>,
        dqkv: &mut CudaViewMut<'_, f32>,
    ) -> OpResult {
        let g = &self.gpu;
        let (hd, scale) = head_dim(&s)?;
        let (b, t, d, heads) = (s.batch, s.tokens, s.dim, s.heads);
        let (tok, outv) = (qkv_view(t, hd, d), out_view(t, hd, d));
        let pm = MatView::row_major(t, t).batched(heads * t * t);
        for h in 0..heads {
            let (v, p) = (tok.at(2 * d + h * hd), pm.at(h * t * t));
            // dP = dO V^T ; dV += P^T dO
            g.gemm(b, 1.0, dattn, outv.at(h * hd), qkv, v.t(), 0.0, dp, p)?;
            g.gemm(b, 1.0, probs, p.t(), dattn, outv.at(h * hd), 1.0, dqkv, v)?;
        }
        // dS = P (dP - rowsum(P dP)), every head at once.
        g.fill_zero(ds)?;
        g.softmax_backward_rows(probs, &*dp, b * heads * t, t, ds)?;
        for h in 0..heads {
            let (q, k, p) = (tok.at(h * hd), tok.at(d + h * hd), pm.at(h * t * t));
            // dQ += scale dS K ; dK += scale dS^T Q
            g.gemm(b, scale, &*ds, p, qkv, k, 1.0, dqkv, q)?;
            g.gemm(b, scale, &*ds, p.t(), qkv, q, 1.0, dqkv, k)?;
        }
        Ok(())
    }
}

/// Sizes of the relation losses of one batch shape (the workspace's key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RelShape {
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
struct RelBuffers {
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
    fn stage(&mut self, gpu: &Gpu, grids: &[BatchPairGrids]) -> OpResult<usize> {
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
    fn shaped(&mut self, gpu: &Gpu, sh: RelShape) -> OpResult<&mut RelBuffers> {
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
struct RelParams {
    tau_s: f32,
    tau_t: f32,
    weight: f32,
}

/// The spatial loss: per pair with overlapping images, one indexed sampling
/// per side, the relation GEMMs, the fused cross-entropy (its mean over the
/// pair's rows, weighted by `m / terms`, added into `stats[slot]`) and the
/// gradient scattered back into the student map.
#[allow(clippy::too_many_arguments)]
fn spatial_loss(
    gpu: &Gpu,
    w: &mut RelBuffers,
    terms: usize,
    teacher: &Buf,
    student: &StudentFeatures<'_, Cuda>,
    grads: &mut StudentFeatureGrads<'_, Cuda>,
    rp: RelParams,
    stats: &mut Buf,
    slot: usize,
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
#[allow(clippy::too_many_arguments)]
fn channel_loss(
    gpu: &Gpu,
    w: &mut RelBuffers,
    teacher: &Buf,
    student: &StudentFeatures<'_, Cuda>,
    grads: &mut StudentFeatureGrads<'_, Cuda>,
    rp: RelParams,
    stats: &mut Buf,
    slot: usize,
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
fn rel_shape(shapes: &ViewShapes, heads: usize, grids: &[BatchPairGrids]) -> RelShape {
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

impl Backend for Cuda {
    type Buf = Buf;
    type Scratch = CudaScratch;
    type RelationWorkspace = RelationWorkspace;

    fn name(&self) -> &'static str {
        "cuda"
    }

    // ----- memory -------------------------------------------------------

    /// CUDA allocations are never empty: a request for 0 values gets one.
    fn zeros(&self, len: usize) -> OpResult<Buf> {
        Ok(self.gpu.zeros(len.max(1))?)
    }

    fn upload(&self, host: &[f32]) -> OpResult<Buf> {
        if host.is_empty() {
            return self.zeros(0);
        }
        Ok(self.gpu.upload(host)?)
    }

    fn upload_into(&self, host: &[f32], dst: &mut Buf) -> OpResult {
        if host.is_empty() {
            return Ok(());
        }
        let mut d = lead_mut(dst, host.len(), "upload destination")?;
        Ok(self.gpu.upload_into(host, &mut d)?)
    }

    fn download(&self, src: &Buf) -> OpResult<Vec<f32>> {
        Ok(self.gpu.download(src)?)
    }

    fn len(&self, buf: &Buf) -> usize {
        buf.len()
    }

    fn zero(&self, dst: &mut Buf) -> OpResult {
        Ok(self.gpu.fill_zero(dst)?)
    }

    fn duplicate(&self, src: &Buf) -> OpResult<Buf> {
        Ok(self.gpu.stream().clone_dtod(src).map_err(CudaError::from)?)
    }

    fn synchronize(&self) -> OpResult {
        Ok(self.gpu.synchronize()?)
    }

    // ----- dense algebra --------------------------------------------------

    fn linear_forward(
        &self,
        x: &Buf,
        p: &Buf,
        w: Range<usize>,
        b: Option<Range<usize>>,
        s: LinearShape,
        y: &mut Buf,
    ) -> OpResult {
        let g = &self.gpu;
        let x = lead(x, s.rows * s.inp, "x")?;
        let mut y = lead_mut(y, s.rows * s.out, "y")?;
        g.linear_forward(&x, &part(p, w, "weight")?, s.rows, s.inp, s.out, &mut y)?;
        if let Some(b) = b {
            g.bias_add(&mut y, &part(p, b, "bias")?, s.rows, s.out)?;
        }
        Ok(())
    }

    fn linear_backward(
        &self,
        x: &Buf,
        p: &Buf,
        w: Range<usize>,
        b: Option<Range<usize>>,
        dy: &Buf,
        s: LinearShape,
        dx: Option<&mut Buf>,
        grads: &mut Buf,
    ) -> OpResult {
        let g = &self.gpu;
        let (rows, inp, out) = (s.rows, s.inp, s.out);
        let x = lead(x, rows * inp, "x")?;
        let dy = lead(dy, rows * out, "dy")?;
        if let Some(dx) = dx {
            let mut dx = lead_mut(dx, rows * inp, "dx")?;
            let wv = part(p, w.clone(), "weight")?;
            g.linear_backward_input(&dy, &wv, rows, inp, out, &mut dx)?;
        }
        let mut gw = part_mut(grads, w, "weight gradient")?;
        g.linear_backward_weight(&x, &dy, rows, inp, out, &mut gw)?;
        if let Some(b) = b {
            g.bias_grad(&dy, rows, out, &mut part_mut(grads, b, "bias gradient")?)?;
        }
        Ok(())
    }

    /// Views with a unit stride in one dimension (cuBLAS's); a column-major
    /// `c` is computed as `c^T = op(b)^T op(a)^T`.
    fn gemm(
        &self,
        alpha: f32,
        a: &Buf,
        la: MatRef,
        b: &Buf,
        lb: MatRef,
        beta: f32,
        c: &mut Buf,
        lc: MatRef,
    ) -> OpResult {
        if lc.rows == 0 || lc.cols == 0 {
            return Ok(());
        }
        let (a, la, b, lb, lc) = if mat_view(lc)?.transposed {
            (b, lb.transposed(), a, la.transposed(), lc.transposed())
        } else {
            (a, la, b, lb, lc)
        };
        let (va, vb, vc) = (mat_view(la)?, mat_view(lb)?, mat_view(lc)?);
        Ok(self.gpu.gemm(1, alpha, a, va, b, vb, beta, c, vc)?)
    }

    // ----- rows and element-wise -------------------------------------------

    fn layer_norm_forward(
        &self,
        x: &Buf,
        p: &Buf,
        gamma: Range<usize>,
        beta: Range<usize>,
        rows: usize,
        cols: usize,
        y: &mut Buf,
        mean: &mut Buf,
        rstd: &mut Buf,
    ) -> OpResult {
        let n = rows * cols;
        Ok(self.gpu.layer_norm_forward(
            &lead(x, n, "x")?,
            &part(p, gamma, "gamma")?,
            &part(p, beta, "beta")?,
            rows,
            cols,
            LN_EPS,
            &mut lead_mut(y, n, "y")?,
            &mut lead_mut(mean, rows, "mean")?,
            &mut lead_mut(rstd, rows, "rstd")?,
        )?)
    }

    fn layer_norm_backward(
        &self,
        x: &Buf,
        p: &Buf,
        (gamma, beta): (Range<usize>, Range<usize>),
        (mean, rstd): (&Buf, &Buf),
        dy: &Buf,
        (rows, cols): (usize, usize),
        dx: &mut Buf,
        g: &mut Buf,
        _scratch: &mut CudaScratch,
    ) -> OpResult {
        let n = rows * cols;
        let (x, dy) = (lead(x, n, "x")?, lead(dy, n, "dy")?);
        let (mean, rstd) = (lead(mean, rows, "mean")?, lead(rstd, rows, "rstd")?);
        let gv = part(p, gamma.clone(), "gamma")?;
        let mut dx = lead_mut(dx, n, "dx")?;
        two_mut(g, gamma, beta, |gg, gb| {
            Ok(self
                .gpu
                .layer_norm_backward(&x, &gv, &mean, &rstd, &dy, rows, cols, &mut dx, gg, gb)?)
        })
    }

    fn gelu_forward(&self, x: &Buf, n: usize, y: &mut Buf) -> OpResult {
        Ok(self
            .gpu
            .gelu_forward(&lead(x, n, "x")?, &mut lead_mut(y, n, "y")?)?)
    }

    fn gelu_backward(&self, x: &Buf, dy: &Buf, n: usize, dx: &mut Buf) -> OpResult {
        Ok(self.gpu.gelu_backward(
            &lead(x, n, "x")?,
            &lead(dy, n, "dy")?,
            &mut lead_mut(dx, n, "dx")?,
        )?)
    }

    /// Through the device temporary: `tmp = d`, `d = 0`, `d += tmp gelu'(x)`.
    fn gelu_grad_in_place(&self, x: &Buf, n: usize, d: &mut Buf) -> OpResult {
        if n == 0 {
            return Ok(());
        }
        let x = lead(x, n, "x")?;
        let mut d = lead_mut(d, n, "d")?;
        self.with_temp(n, |tmp| {
            let mut tmp = tmp.slice_mut(..n);
            self.gpu
                .stream()
                .memcpy_dtod(&d, &mut tmp)
                .map_err(CudaError::from)?;
            self.gpu.fill_zero(&mut d)?;
            Ok(self.gpu.gelu_backward(&x, &tmp, &mut d)?)
        })
    }

    fn im2col(
        &self,
        images: &Buf,
        (batch, chans, img, patch): (usize, usize, usize, usize),
        out: &mut Buf,
    ) -> OpResult {
        let n = batch * chans * img * img;
        Ok(self.gpu.im2col(
            &lead(images, n, "images")?,
            batch,
            chans,
            img,
            patch,
            &mut lead_mut(out, n, "patches")?,
        )?)
    }

    fn copy_blocks(&self, src: &Buf, dst: &mut Buf, k: Blocks, accumulate: bool) -> OpResult {
        if k.count == 0 || k.len == 0 {
            return Ok(());
        }
        let (sl, dl) = (src.len(), dst.len());
        let s = part(src, k.src_start..sl, "source blocks")?;
        let mut d = part_mut(dst, k.dst_start..dl, "destination blocks")?;
        Ok(self.gpu.copy_rows(
            &s,
            k.src_stride,
            &mut d,
            k.dst_stride,
            k.count,
            k.len,
            accumulate,
        )?)
    }

    /// Four row copies (the sums in the CPU's order): patch rows `= emb`,
    /// `+= pos_patch`; CLS rows `= cls`, `+= pos_0` (sources broadcast with
    /// stride 0).
    fn embed_tokens(
        &self,
        emb: &Buf,
        p: &Buf,
        (cls, pos): (Range<usize>, Range<usize>),
        pos_patch: &Buf,
        (batch, n, d): (usize, usize, usize),
        x0: &mut Buf,
    ) -> OpResult {
        if batch == 0 || d == 0 {
            return Ok(());
        }
        let g = &self.gpu;
        let t = n + 1;
        if cls.len() != d || pos.len() < d {
            return Err(short("cls / pos", d, cls.len().min(pos.len())));
        }
        let cls = part(p, cls, "cls")?;
        let pos0 = part(p, pos.start..pos.start + d, "pos")?;
        let mut x0 = lead_mut(x0, batch * t * d, "tokens")?;
        if n > 0 {
            let mut rows = x0.slice_mut(d..);
            g.copy_rows(
                &lead(emb, batch * n * d, "emb")?,
                n * d,
                &mut rows,
                t * d,
                batch,
                n * d,
                false,
            )?;
            let pp = lead(pos_patch, n * d, "pos_patch")?;
            g.copy_rows(&pp, 0, &mut rows, t * d, batch, n * d, true)?;
        }
        g.copy_rows(&cls, 0, &mut x0, t * d, batch, d, false)?;
        Ok(g.copy_rows(&pos0, 0, &mut x0, t * d, batch, d, true)?)
    }

    /// The CLS rows are gathered into the head of `demb` (scratch until the
    /// patch rows overwrite it) and column-summed into `g[cls]` and
    /// `g[pos][0..d]`; the patch rows into `demb`, then summed over images.
    fn embed_tokens_backward(
        &self,
        dx: &Buf,
        (batch, n, d): (usize, usize, usize),
        (cls, pos): (Range<usize>, Range<usize>),
        grads: &mut Buf,
        dpos_patch: &mut Buf,
        demb: &mut Buf,
    ) -> OpResult {
        if batch == 0 || d == 0 {
            return Ok(());
        }
        let g = &self.gpu;
        let t = n + 1;
        let dx = lead(dx, batch * t * d, "token gradient")?;
        {
            let mut rows = lead_mut(demb, batch * d, "demb")?;
            g.copy_rows(&dx, t * d, &mut rows, d, batch, d, false)?;
            g.bias_grad(&rows, batch, d, &mut part_mut(grads, cls, "cls gradient")?)?;
            let gpos0 = pos.start..pos.start + d;
            g.bias_grad(
                &rows,
                batch,
                d,
                &mut part_mut(grads, gpos0, "pos gradient")?,
            )?;
        }
        if n == 0 {
            return Ok(());
        }
        let mut demb = lead_mut(demb, batch * n * d, "demb")?;
        g.copy_rows(&dx.slice(d..), t * d, &mut demb, n * d, batch, n * d, false)?;
        let mut dpp = lead_mut(dpos_patch, n * d, "dpos_patch")?;
        g.fill_zero(&mut dpp)?;
        Ok(g.bias_grad(&demb, batch, n * d, &mut dpp)?)
    }

    fn add_into(&self, src: &Buf, len: usize, dst: &mut Buf, dst_start: usize) -> OpResult {
        let s = lead(src, len, "src")?;
        let mut d = part_mut(dst, dst_start..dst_start + len, "dst")?;
        Ok(self.gpu.axpy(&mut d, &s, 1.0)?)
    }

    fn residual_keep_add(
        &self,
        out: &mut Buf,
        x: &Buf,
        keep: &Buf,
        (images, per): (usize, usize),
    ) -> OpResult {
        let n = images * per;
        Ok(self.gpu.residual_keep_add(
            &mut lead_mut(out, n, "out")?,
            &lead(x, n, "x")?,
            &lead(keep, images, "keep")?,
            per,
        )?)
    }

    fn keep_scale(
        &self,
        dx: &Buf,
        keep: &Buf,
        (images, per): (usize, usize),
        out: &mut Buf,
    ) -> OpResult {
        let n = images * per;
        Ok(self.gpu.keep_scale(
            &lead(dx, n, "dx")?,
            &lead(keep, images, "keep")?,
            per,
            &mut lead_mut(out, n, "out")?,
        )?)
    }

    fn l2_normalize_rows(
        &self,
        src: &Buf,
        src_start: usize,
        (rows, dim): (usize, usize),
        eps: f32,
        dst: &mut Buf,
        norms: &mut Buf,
    ) -> OpResult {
        let n = rows * dim;
        Ok(self.gpu.l2_normalize_rows(
            &part(src, src_start..src_start + n, "src")?,
            rows,
            dim,
            eps,
            &mut lead_mut(dst, n, "dst")?,
            &mut lead_mut(norms, rows, "norms")?,
        )?)
    }

    fn row_dots_add(
        &self,
        a: &Buf,
        b: &Buf,
        (rows, dim): (usize, usize),
        out: &mut Buf,
        out_start: usize,
    ) -> OpResult {
        let n = rows * dim;
        Ok(self.gpu.row_dot_add(
            &lead(a, n, "a")?,
            &lead(b, n, "b")?,
            rows,
            dim,
            &mut part_mut(out, out_start..out_start + rows, "out")?,
        )?)
    }

    fn l2_normalize_rows_backward(
        &self,
        dy: &Buf,
        y: &Buf,
        norms: &Buf,
        (rows, dim): (usize, usize),
        eps: f32,
        dx: &mut Buf,
        (dx_start, accumulate): (usize, bool),
    ) -> OpResult {
        let n = rows * dim;
        Ok(self.gpu.l2_normalize_rows_backward(
            &lead(dy, n, "dy")?,
            &lead(y, n, "y")?,
            &lead(norms, rows, "norms")?,
            rows,
            dim,
            eps,
            accumulate,
            &mut part_mut(dx, dx_start..dx_start + n, "dx")?,
        )?)
    }

    // ----- fused ---------------------------------------------------------

    /// Scores by one strided-batched GEMM per head (scaled in the GEMM, as
    /// the CPU), one softmax over every head's rows, one GEMM per head for
    /// the output. Non-finite scores are not reported here (that needs a
    /// device round trip): they reach the step's losses, which the engine
    /// checks once per step.
    fn attention_forward(
        &self,
        qkv: &Buf,
        s: AttentionShape,
        probs: &mut Buf,
        attn: &mut Buf,
    ) -> OpResult {
        let g = &self.gpu;
        let (hd, scale) = head_dim(&s)?;
        let (b, t, d, heads) = (s.batch, s.tokens, s.dim, s.heads);
        let qkv = lead(qkv, b * t * 3 * d, "qkv")?;
        let mut probs = lead_mut(probs, b * heads * t * t, "probs")?;
        let mut attn = lead_mut(attn, b * t * d, "attn")?;
        let (tok, outv) = (qkv_view(t, hd, d), out_view(t, hd, d));
        let pm = MatView::row_major(t, t).batched(heads * t * t);
        for h in 0..heads {
            let (q, k) = (tok.at(h * hd), tok.at(d + h * hd));
            g.gemm(
                b,
                scale,
                &qkv,
                q,
                &qkv,
                k.t(),
                0.0,
                &mut probs,
                pm.at(h * t * t),
            )?;
        }
        g.softmax_rows_in_place(&mut probs, b * heads * t, t)?;
        for h in 0..heads {
            let v = tok.at(2 * d + h * hd);
            g.gemm(
                b,
                1.0,
                &probs,
                pm.at(h * t * t),
                &qkv,
                v,
                0.0,
                &mut attn,
                outv.at(h * hd),
            )?;
        }
        Ok(())
    }

    /// `dP` and `dS` of every head.
    fn attention_scratch_len(&self, s: AttentionShape) -> usize {
        2 * s.batch * s.heads * s.tokens * s.tokens
    }

    /// Needs `dP` and `dS` for every head, `2 x batch x heads x T x T`:
    /// taken from `dscores` when it is that long, else from the device
    /// temporary (the CPU's `batch x T x T` is not enough).
    fn attention_backward(
        &self,
        qkv: &Buf,
        probs: &Buf,
        dattn: &Buf,
        s: AttentionShape,
        dscores: &mut Buf,
        dqkv: &mut Buf,
    ) -> OpResult {
        let (b, t, d) = (s.batch, s.tokens, s.dim);
        let need = b * s.heads * t * t;
        let qkv = lead(qkv, b * t * 3 * d, "qkv")?;
        let probs = lead(probs, need, "probs")?;
        let dattn = lead(dattn, b * t * d, "dattn")?;
        let mut dqkv = lead_mut(dqkv, b * t * 3 * d, "dqkv")?;
        let mut run = |buf: &mut Buf| {
            let mut both = buf.slice_mut(..2 * need);
            let (mut dp, mut ds) = both.split_at_mut(need);
            self.attention_backward_in(&qkv, &probs, &dattn, s, &mut dp, &mut ds, &mut dqkv)
        };
        if dscores.len() >= 2 * need {
            run(dscores)
        } else {
            self.with_temp(2 * need, run)
        }
    }

    fn batch_norm_relu(
        &self,
        y: &Buf,
        p: &Buf,
        (gamma, beta): (Range<usize>, Range<usize>),
        (running_mean, running_var): (&mut Buf, &mut Buf),
        mode: BnMode,
        (rows, c): (usize, usize),
        stats: &mut BnStats<Self>,
        _scratch: &mut CudaScratch,
        out: &mut Buf,
    ) -> OpResult {
        refuse_sync_bn(&stats.group)?;
        let g = &self.gpu;
        let n = rows * c;
        let y = lead(y, n, "y")?;
        let (gv, bv) = (part(p, gamma, "gamma")?, part(p, beta, "beta")?);
        let mut out = lead_mut(out, n, "out")?;
        let mut rm = lead_mut(running_mean, c, "running mean")?;
        let mut rv = lead_mut(running_var, c, "running var")?;
        match mode {
            BnMode::Train => {
                let mut mean = lead_mut(&mut stats.mean, c, "mean")?;
                let mut var = lead_mut(&mut stats.var, c, "var")?;
                let mut rstd = lead_mut(&mut stats.rstd, c, "rstd")?;
                g.batch_norm_forward(
                    &y, &gv, &bv, rows, c, BN_EPS, &mut out, &mut mean, &mut var, &mut rstd,
                )?;
                g.batch_norm_update_running(&mean, &var, rows, BN_MOMENTUM, &mut rm, &mut rv)?;
            }
            // `stats` is left as it is: only a train-mode pass has a backward.
            BnMode::Eval => g.batch_norm_eval(&y, &gv, &bv, &rm, &rv, rows, c, BN_EPS, &mut out)?,
        }
        Ok(g.relu_in_place(&mut out)?)
    }

    /// `scratch = dout [out > 0]`, `dy = 0`, then the batch-norm backward.
    fn batch_norm_relu_backward(
        &self,
        y: &Buf,
        out: &Buf,
        dout: &Buf,
        p: &Buf,
        (gamma, beta): (Range<usize>, Range<usize>),
        stats: &BnStats<Self>,
        (rows, c): (usize, usize),
        grads: &mut Buf,
        scratch: &mut CudaScratch,
        dy: &mut Buf,
    ) -> OpResult {
        refuse_sync_bn(&stats.group)?;
        let g = &self.gpu;
        let n = rows * c;
        let (y, out, dout) = (
            lead(y, n, "y")?,
            lead(out, n, "out")?,
            lead(dout, n, "dout")?,
        );
        let gv = part(p, gamma.clone(), "gamma")?;
        let mean = lead(&stats.mean, c, "mean")?;
        let rstd = lead(&stats.rstd, c, "rstd")?;
        let mut masked = grow(g, &mut scratch.buf, n)?.slice_mut(..n);
        g.relu_backward(&out, &dout, &mut masked)?;
        let mut dy = lead_mut(dy, n, "dy")?;
        g.fill_zero(&mut dy)?;
        two_mut(grads, gamma, beta, |gg, gb| {
            Ok(g.batch_norm_backward(&y, &gv, &mean, &rstd, &masked, rows, c, &mut dy, gg, gb)?)
        })
    }

    fn dino_loss(
        &self,
        student: &Buf,
        teacher: &Buf,
        centre: &mut Buf,
        a: DinoLossArgs,
        dstudent: &mut Buf,
        stats: &mut Buf,
        slot: usize,
    ) -> OpResult {
        let g = &self.gpu;
        let (sn, tn) = (a.views * a.batch * a.dim, GLOBAL_VIEWS * a.batch * a.dim);
        let shape = DinoShape {
            student_views: a.views,
            teacher_views: GLOBAL_VIEWS,
            batch: a.batch,
            dim: a.dim,
        };
        let (s, t) = (lead(student, sn, "student")?, lead(teacher, tn, "teacher")?);
        g.teacher_entropy(
            &t,
            &lead(centre, a.dim, "centre")?,
            GLOBAL_VIEWS * a.batch,
            a.dim,
            a.tau_teacher,
            &mut part_mut(stats, slot + 1..slot + 2, "stats")?,
        )?;
        g.dino_loss_backward(
            &s,
            &t,
            &lead(centre, a.dim, "centre")?,
            shape,
            a.tau_student,
            a.tau_teacher,
            a.weight,
            &mut lead_mut(dstudent, sn, "dstudent")?,
            &mut part_mut(stats, slot..slot + 1, "stats")?,
        )?;
        // The loss used the centre from before this update, as DINO does.
        Ok(g.dino_centre_update(
            &t,
            GLOBAL_VIEWS * a.batch,
            a.dim,
            a.centre_momentum,
            &mut lead_mut(centre, a.dim, "centre")?,
        )?)
    }

    fn mim_loss(
        &self,
        student: &Buf,
        teacher: &Buf,
        weights: &Buf,
        centre: &mut Buf,
        a: MimLossArgs,
        dstudent: &mut Buf,
        stats: &mut Buf,
        slot: usize,
    ) -> OpResult {
        let g = &self.gpu;
        let n = a.rows * a.dim;
        let t = lead(teacher, n, "teacher")?;
        g.weighted_cross_entropy_backward(
            &lead(student, n, "student")?,
            &t,
            &lead(centre, a.dim, "centre")?,
            &lead(weights, a.rows, "weights")?,
            a.rows,
            a.dim,
            a.tau_student,
            a.tau_teacher,
            a.weight,
            &mut lead_mut(dstudent, n, "dstudent")?,
            &mut part_mut(stats, slot..slot + 1, "stats")?,
        )?;
        // The loss used the centre from before this update, as iBOT does.
        Ok(g.dino_centre_update(
            &t,
            a.rows,
            a.dim,
            a.centre_momentum,
            &mut lead_mut(centre, a.dim, "centre")?,
        )?)
    }

    /// The mirror's batched kernels over compacted pair grids (two uploads
    /// per call); each cross-entropy's mean is added into its slot with the
    /// weight that makes the slot the mean over terms.
    fn relation_losses(
        &self,
        ws: &mut RelationWorkspace,
        args: RelationArgs<'_, Self>,
        stats: &mut Buf,
        slot: usize,
    ) -> OpResult<usize> {
        let RelationArgs {
            cfg,
            shapes,
            grids,
            teacher_spatial,
            teacher_channel,
            student_spatial,
            student_channel,
            weights: (alpha, beta),
            mut dspatial,
            mut dchannel,
        } = args;
        if shapes.batch == 0 || shapes.channels == 0 {
            return Err(invalid("relation losses", "need images and channels"));
        }
        let g = &self.gpu;
        let w = ws.shaped(g, rel_shape(shapes, cfg.heads, grids))?;
        let terms = w.stage(g, grids)?;
        g.fill_zero(&mut part_mut(stats, slot..slot + 2, "stats")?)?;
        let sp = RelParams {
            tau_s: cfg.tau_student,
            tau_t: cfg.tau_teacher_spatial,
            weight: alpha,
        };
        spatial_loss(
            g,
            w,
            terms,
            teacher_spatial,
            &student_spatial,
            &mut dspatial,
            sp,
            stats,
            slot,
        )?;
        let cp = RelParams {
            tau_s: cfg.tau_student,
            tau_t: cfg.tau_teacher_channel,
            weight: beta,
        };
        channel_loss(
            g,
            w,
            teacher_channel,
            &student_channel,
            &mut dchannel,
            cp,
            stats,
            slot + 1,
        )?;
        Ok(terms)
    }

    fn l2_norm(&self, g: &Buf, stats: &mut Buf, slot: usize) -> OpResult {
        Ok(self
            .gpu
            .l2_norm(g, &mut part_mut(stats, slot..slot + 1, "stats")?)?)
    }

    /// One norm-and-scale per range (the norm goes to the device temporary).
    fn clip_per_tensor(&self, g: &mut Buf, ranges: &[Range<usize>], max_norm: f32) -> OpResult {
        self.with_temp(1, |norm| {
            let mut norm = norm.slice_mut(..1);
            for r in ranges.iter().filter(|r| !r.is_empty()) {
                let mut v = part_mut(g, r.clone(), "gradient range")?;
                self.gpu.clip_grad_norm(&mut v, max_norm, &mut norm)?;
            }
            Ok(())
        })
    }

    fn adamw(
        &self,
        p: &mut Buf,
        g: &Buf,
        (m, v): (&mut Buf, &mut Buf),
        range: Range<usize>,
        opt: &AdamW,
        t: u32,
    ) -> OpResult {
        Ok(self.gpu.adamw_step(
            &mut part_mut(p, range.clone(), "params")?,
            &part(g, range.clone(), "grads")?,
            &mut part_mut(m, range.clone(), "adam m")?,
            &mut part_mut(v, range, "adam v")?,
            opt,
            t,
        )?)
    }

    fn ema(&self, teacher: &mut Buf, student: &Buf, momentum: f32) -> OpResult {
        Ok(self.gpu.ema_update(teacher, student, momentum)?)
    }
}

#[cfg(test)]
mod tests {
    //! Each operation against the CPU reference (`backend::cpu`,
    //! `backend::cpu::relation_loss`, or a direct loop where the CPU's is private).
    //! They need a GPU: without one each prints `skipped: <reason>`.

    use super::*;
    use crate::backend::cpu;
    use crate::backend::cpu::relation_loss::{
        dino_loss_step, SereGrads, SereInputs, SereLoss, SereLossConfig, StudentGrads, StudentViews,
    };

    /// The device, or `None` (with the reason printed) without one.
    fn device() -> Option<Cuda> {
        sere_testkit::device_or_skip("CUDA", sere_cuda::probe)
            .map(|_| Cuda::new(0).expect("probe found a device, so it must open"))
    }

    /// `n` values in [-1, 1) from the kit's xorshift stream.
    fn data(n: usize, seed: u64) -> Vec<f32> {
        sere_testkit::XorShift::new(seed).signeds(n)
    }

    /// Every element within `tol (1 + |want|)`, in f32.
    #[track_caller]
    fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        let bound = |w: f32| tol * (1.0 + w.abs());
        if let Err(e) = sere_testkit::check_bound_f32(what, got, want, bound) {
            panic!("{e}");
        }
    }

    fn up(dev: &Cuda, v: &[f32]) -> Buf {
        dev.upload(v).expect("upload")
    }

    fn down(dev: &Cuda, b: &Buf) -> Vec<f32> {
        dev.download(b).expect("download")
    }

    #[test]
    fn linear_forward_and_backward_match_the_cpu() {
        let Some(dev) = device() else { return };
        let (rows, inp, out) = (7, 5, 3);
        let s = LinearShape { rows, inp, out };
        let w = 3..3 + out * inp;
        let b = w.end..w.end + out;
        let p = data(b.end + 2, 1);
        // Buffers longer than the shape: only the leading values are used.
        let x = data(rows * inp + 4, 2);
        let dy = data(rows * out + 1, 3);
        let dx0 = data(rows * inp + 2, 4);
        let g0 = data(p.len(), 5);

        let mut y_cpu = vec![0.0; rows * out];
        let xs = &x[..rows * inp];
        cpu::linear_fwd(
            xs,
            &p[w.clone()],
            Some(&p[b.clone()]),
            rows,
            inp,
            out,
            &mut y_cpu,
        );
        let (mut dx_cpu, mut g_cpu) = (dx0.clone(), g0.clone());
        {
            let (lo, hi) = g_cpu.split_at_mut(b.start);
            cpu::linear_bwd(
                xs,
                &p[w.clone()],
                &dy[..rows * out],
                rows,
                inp,
                out,
                Some(&mut dx_cpu[..rows * inp]),
                &mut lo[w.clone()],
                Some(&mut hi[..out]),
            );
        }

        let (xd, pd, dyd) = (up(&dev, &x), up(&dev, &p), up(&dev, &dy));
        let mut yd = dev.zeros(rows * out + 5).unwrap();
        dev.linear_forward(&xd, &pd, w.clone(), Some(b.clone()), s, &mut yd)
            .unwrap();
        let y = down(&dev, &yd);
        close("y", &y[..rows * out], &y_cpu, 1e-5);
        assert!(y[rows * out..].iter().all(|&v| v == 0.0), "tail untouched");
        let (mut dxd, mut gd) = (up(&dev, &dx0), up(&dev, &g0));
        dev.linear_backward(&xd, &pd, w, Some(b), &dyd, s, Some(&mut dxd), &mut gd)
            .unwrap();
        close("dx", &down(&dev, &dxd), &dx_cpu, 1e-5);
        close("g", &down(&dev, &gd), &g_cpu, 1e-5);
    }

    #[test]
    fn gemm_with_strided_and_column_major_views_matches_the_cpu() {
        let Some(dev) = device() else { return };
        let (m, k, n) = (4, 3, 5);
        // op(a) = stored k x m transposed, at an offset; c column-major.
        let la = MatRef::row_major(k, m).at(2).transposed();
        let lb = MatRef {
            offset: 1,
            rows: k,
            cols: n,
            row_stride: n + 2,
            col_stride: 1,
        };
        let lc = MatRef::row_major(n, m).transposed();
        let (a, b, c0) = (data(2 + k * m, 6), data(1 + k * (n + 2), 7), data(n * m, 8));
        let mut c_cpu = c0.clone();
        cpu::gemm(0.5, &a, la, &b, lb, 2.0, &mut c_cpu, lc).unwrap();
        let (ad, bd, mut cd) = (up(&dev, &a), up(&dev, &b), up(&dev, &c0));
        dev.gemm(0.5, &ad, la, &bd, lb, 2.0, &mut cd, lc).unwrap();
        close("c", &down(&dev, &cd), &c_cpu, 1e-5);
    }

    #[test]
    fn layer_norm_forward_and_backward_match_the_cpu() {
        let Some(dev) = device() else { return };
        let (rows, cols) = (6, 8);
        let (gamma, beta) = (2..2 + cols, 2 + cols..2 + 2 * cols);
        let p = data(beta.end + 1, 9);
        let (x, dy) = (data(rows * cols, 10), data(rows * cols, 11));
        let (dx0, g0) = (data(rows * cols, 12), data(p.len(), 13));

        let (mut y_cpu, mut m_cpu, mut r_cpu) =
            (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
        let (pg, pb) = (&p[gamma.clone()], &p[beta.clone()]);
        cpu::layer_norm_fwd(&x, pg, pb, rows, cols, &mut y_cpu, &mut m_cpu, &mut r_cpu);
        let (mut dx_cpu, mut g_cpu) = (dx0.clone(), g0.clone());
        {
            let (lo, hi) = g_cpu.split_at_mut(beta.start);
            cpu::layer_norm_bwd(
                &x,
                pg,
                &m_cpu,
                &r_cpu,
                &dy,
                rows,
                cols,
                &mut dx_cpu,
                &mut lo[gamma.clone()],
                &mut hi[..cols],
                &mut Vec::new(),
            );
        }

        let (xd, pd, dyd) = (up(&dev, &x), up(&dev, &p), up(&dev, &dy));
        let mut yd = dev.zeros(rows * cols).unwrap();
        let (mut md, mut rd) = (dev.zeros(rows + 1).unwrap(), dev.zeros(rows).unwrap());
        dev.layer_norm_forward(
            &xd,
            &pd,
            gamma.clone(),
            beta.clone(),
            rows,
            cols,
            &mut yd,
            &mut md,
            &mut rd,
        )
        .unwrap();
        close("y", &down(&dev, &yd), &y_cpu, 1e-5);
        close("mean", &down(&dev, &md)[..rows], &m_cpu, 1e-5);
        close("rstd", &down(&dev, &rd), &r_cpu, 1e-5);
        let (mut dxd, mut gd) = (up(&dev, &dx0), up(&dev, &g0));
        dev.layer_norm_backward(
            &xd,
            &pd,
            (gamma, beta),
            (&md, &rd),
            &dyd,
            (rows, cols),
            &mut dxd,
            &mut gd,
            &mut CudaScratch::default(),
        )
        .unwrap();
        close("dx", &down(&dev, &dxd), &dx_cpu, 1e-4);
        close("g", &down(&dev, &gd), &g_cpu, 1e-4);
    }

    /// Attention of `qkv` (`[B][T][3][H][d]`) in f64: `(probs, attn)`.
    fn attention_reference(qkv: &[f32], s: AttentionShape) -> (Vec<f32>, Vec<f32>) {
        let (b, t, d, h) = (s.batch, s.tokens, s.dim, s.heads);
        let hd = d / h;
        let at = |img: usize, i: usize, part: usize, head: usize, k: usize| {
            qkv[(img * t + i) * 3 * d + part * d + head * hd + k] as f64
        };
        let (mut probs, mut attn) = (vec![0.0; b * h * t * t], vec![0.0; b * t * d]);
        for img in 0..b {
            for head in 0..h {
                for i in 0..t {
                    let sc: Vec<f64> = (0..t)
                        .map(|j| {
                            (0..hd)
                                .map(|k| at(img, i, 0, head, k) * at(img, j, 1, head, k))
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = sc.iter().map(|v| (v - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..t {
                        probs[((img * h + head) * t + i) * t + j] = (e[j] / z) as f32;
                    }
                    for k in 0..hd {
                        let o: f64 = (0..t).map(|j| e[j] / z * at(img, j, 2, head, k)).sum();
                        attn[(img * t + i) * d + head * hd + k] = o as f32;
                    }
                }
            }
        }
        (probs, attn)
    }

    /// `dqkv` of [`attention_reference`] for `dattn`, in f64.
    fn attention_backward_reference(
        qkv: &[f32],
        probs: &[f32],
        dattn: &[f32],
        s: AttentionShape,
    ) -> Vec<f32> {
        let (b, t, d, h) = (s.batch, s.tokens, s.dim, s.heads);
        let hd = d / h;
        let scale = 1.0 / (hd as f64).sqrt();
        let ix = |img: usize, i: usize, part: usize, head: usize, k: usize| {
            (img * t + i) * 3 * d + part * d + head * hd + k
        };
        let mut dqkv = vec![0.0f64; qkv.len()];
        for img in 0..b {
            for head in 0..h {
                let p = |i: usize, j: usize| probs[((img * h + head) * t + i) * t + j] as f64;
                let dout = |i: usize, k: usize| dattn[(img * t + i) * d + head * hd + k] as f64;
                for i in 0..t {
                    let dp: Vec<f64> = (0..t)
                        .map(|j| {
                            (0..hd)
                                .map(|k| dout(i, k) * qkv[ix(img, j, 2, head, k)] as f64)
                                .sum()
                        })
                        .collect();
                    let dot: f64 = (0..t).map(|j| p(i, j) * dp[j]).sum();
                    for j in 0..t {
                        let ds = p(i, j) * (dp[j] - dot) * scale;
                        for k in 0..hd {
                            dqkv[ix(img, j, 2, head, k)] += p(i, j) * dout(i, k);
                            dqkv[ix(img, i, 0, head, k)] += ds * qkv[ix(img, j, 1, head, k)] as f64;
                            dqkv[ix(img, j, 1, head, k)] += ds * qkv[ix(img, i, 0, head, k)] as f64;
                        }
                    }
                }
            }
        }
        dqkv.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn attention_forward_and_backward_match_the_reference() {
        let Some(dev) = device() else { return };
        let s = AttentionShape {
            batch: 2,
            tokens: 5,
            dim: 8,
            heads: 2,
        };
        let (b, t, d, h) = (s.batch, s.tokens, s.dim, s.heads);
        let (qkv, dattn) = (data(b * t * 3 * d, 14), data(b * t * d, 15));
        let (probs_ref, attn_ref) = attention_reference(&qkv, s);
        let qd = up(&dev, &qkv);
        let mut pd = dev.zeros(b * h * t * t).unwrap();
        let mut ad = dev.zeros(b * t * d).unwrap();
        dev.attention_forward(&qd, s, &mut pd, &mut ad).unwrap();
        let probs = down(&dev, &pd);
        close("probs", &probs, &probs_ref, 1e-5);
        close("attn", &down(&dev, &ad), &attn_ref, 1e-5);

        let dq_ref = attention_backward_reference(&qkv, &probs_ref, &dattn, s);
        let dq0 = data(qkv.len(), 16);
        let want: Vec<f32> = dq0.iter().zip(&dq_ref).map(|(a, b)| a + b).collect();
        let dad = up(&dev, &dattn);
        // The CPU's dscores size (device temporary) and one big enough.
        for scratch in [b * t * t, 2 * b * h * t * t] {
            let mut ds = dev.zeros(scratch).unwrap();
            let mut dqd = up(&dev, &dq0);
            dev.attention_backward(&qd, &pd, &dad, s, &mut ds, &mut dqd)
                .unwrap();
            close("dqkv", &down(&dev, &dqd), &want, 1e-4);
        }
    }

    #[test]
    fn l2_normalize_rows_and_backward_match_the_reference() {
        let Some(dev) = device() else { return };
        let (rows, dim, eps) = (4, 5, 0.5);
        let mut x = data(rows * dim, 17);
        x[dim..2 * dim].iter_mut().for_each(|v| *v *= 0.05); // row 1 floored
        let dy = data(rows * dim, 18);
        let (mut y_ref, mut n_ref, mut dx_ref) = (
            vec![0.0; rows * dim],
            vec![0.0; rows],
            vec![0.0; rows * dim],
        );
        for r in 0..rows {
            let row = &x[r * dim..(r + 1) * dim];
            let raw = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            let nr = raw.max(eps);
            n_ref[r] = nr;
            for j in 0..dim {
                y_ref[r * dim + j] = row[j] / nr;
            }
            let y = &y_ref[r * dim..(r + 1) * dim];
            let g = &dy[r * dim..(r + 1) * dim];
            let dot: f32 = if raw > eps {
                y.iter().zip(g).map(|(a, b)| a * b).sum()
            } else {
                0.0
            };
            for j in 0..dim {
                dx_ref[r * dim + j] = (g[j] - y[j] * dot) / nr;
            }
        }
        let (xd, dyd) = (up(&dev, &x), up(&dev, &dy));
        let (mut yd, mut nd) = (dev.zeros(rows * dim).unwrap(), dev.zeros(rows).unwrap());
        dev.l2_normalize_rows(&xd, 0, (rows, dim), eps, &mut yd, &mut nd)
            .unwrap();
        close("y", &down(&dev, &yd), &y_ref, 1e-5);
        close("norms", &down(&dev, &nd), &n_ref, 1e-5);
        // Written at an offset, then added.
        let start = 3;
        let base = data(start + rows * dim + 2, 19);
        let mut dxd = up(&dev, &base);
        dev.l2_normalize_rows_backward(&dyd, &yd, &nd, (rows, dim), eps, &mut dxd, (start, false))
            .unwrap();
        let mut want = base.clone();
        want[start..start + rows * dim].copy_from_slice(&dx_ref);
        close("dx (written)", &down(&dev, &dxd), &want, 1e-5);
        dev.l2_normalize_rows_backward(&dyd, &yd, &nd, (rows, dim), eps, &mut dxd, (start, true))
            .unwrap();
        for (w, &r) in want[start..start + rows * dim].iter_mut().zip(&dx_ref) {
            *w += r;
        }
        close("dx (added)", &down(&dev, &dxd), &want, 1e-5);
    }

    #[test]
    fn row_dots_add_at_an_offset_matches_the_cpu() {
        let Some(dev) = device() else { return };
        let (rows, dim, start) = (5, 7, 2);
        let (a, b) = (data(rows * dim, 41), data(rows * dim, 42));
        let base = data(start + rows + 3, 43);
        let mut want = base.clone();
        crate::backend::Cpu
            .row_dots_add(&a, &b, (rows, dim), &mut want, start)
            .unwrap();
        let mut out = up(&dev, &base);
        dev.row_dots_add(&up(&dev, &a), &up(&dev, &b), (rows, dim), &mut out, start)
            .unwrap();
        close("out", &down(&dev, &out), &want, 1e-5);
    }

    #[test]
    fn embed_tokens_and_backward_match_the_reference() {
        let Some(dev) = device() else { return };
        let (batch, n, d) = (3, 4, 2);
        let t = n + 1;
        let (cls, pos) = (1..1 + d, 1 + d..1 + d + t * d);
        let p = data(pos.end, 20);
        let (emb, pos_patch, dx) = (
            data(batch * n * d, 21),
            data(n * d, 22),
            data(batch * t * d, 23),
        );
        let mut x0_ref = vec![0.0; batch * t * d];
        for b in 0..batch {
            for j in 0..d {
                x0_ref[b * t * d + j] = p[cls.start + j] + p[pos.start + j];
            }
            for i in 0..n * d {
                x0_ref[b * t * d + d + i] = emb[b * n * d + i] + pos_patch[i];
            }
        }
        let pd = up(&dev, &p);
        let mut x0 = dev.zeros(batch * t * d).unwrap();
        dev.embed_tokens(
            &up(&dev, &emb),
            &pd,
            (cls.clone(), pos.clone()),
            &up(&dev, &pos_patch),
            (batch, n, d),
            &mut x0,
        )
        .unwrap();
        close("x0", &down(&dev, &x0), &x0_ref, 1e-6);

        let g0 = data(p.len(), 24);
        let (mut g_ref, mut dpp_ref, mut demb_ref) =
            (g0.clone(), vec![0.0; n * d], vec![0.0; batch * n * d]);
        for b in 0..batch {
            for j in 0..d {
                g_ref[cls.start + j] += dx[b * t * d + j];
                g_ref[pos.start + j] += dx[b * t * d + j];
            }
            for i in 0..n * d {
                dpp_ref[i] += dx[b * t * d + d + i];
                demb_ref[b * n * d + i] = dx[b * t * d + d + i];
            }
        }
        let mut gd = up(&dev, &g0);
        let (mut dpp, mut demb) = (
            up(&dev, &data(n * d, 25)),
            up(&dev, &data(batch * n * d, 26)),
        );
        dev.embed_tokens_backward(
            &up(&dev, &dx),
            (batch, n, d),
            (cls, pos),
            &mut gd,
            &mut dpp,
            &mut demb,
        )
        .unwrap();
        close("g", &down(&dev, &gd), &g_ref, 1e-5);
        close("dpos_patch", &down(&dev, &dpp), &dpp_ref, 1e-5);
        close("demb", &down(&dev, &demb), &demb_ref, 1e-6);
    }

    #[test]
    fn dino_loss_matches_the_cpu() {
        let Some(dev) = device() else { return };
        let (views, batch, dim) = (3, 2, 6);
        let a = DinoLossArgs {
            views,
            batch,
            dim,
            tau_student: 0.1,
            tau_teacher: 0.04,
            weight: 0.7,
            centre_momentum: 0.9,
        };
        let (s, t) = (data(views * batch * dim, 27), data(2 * batch * dim, 28));
        let (c0, g0) = (data(dim, 29), data(views * batch * dim, 30));
        let (mut c_cpu, mut g_cpu) = (c0.clone(), g0.clone());
        let entropy = sere_core::loss::teacher_entropy(&t, &c0, 2 * batch, dim, 0.04).unwrap();
        let loss = dino_loss_step(
            &s, &t, &mut c_cpu, views, batch, 0.1, 0.04, 0.7, 0.9, &mut g_cpu,
        )
        .unwrap();
        let (mut cd, mut gd) = (up(&dev, &c0), up(&dev, &g0));
        let mut stats = up(&dev, &[5.0; 4]);
        dev.dino_loss(
            &up(&dev, &s),
            &up(&dev, &t),
            &mut cd,
            a,
            &mut gd,
            &mut stats,
            1,
        )
        .unwrap();
        close(
            "stats",
            &down(&dev, &stats),
            &[5.0, loss, entropy, 5.0],
            1e-5,
        );
        close("dstudent", &down(&dev, &gd), &g_cpu, 1e-5);
        close("centre", &down(&dev, &cd), &c_cpu, 1e-6);
    }

    #[test]
    fn mim_loss_matches_the_cpu() {
        let Some(dev) = device() else { return };
        let (images, patches, dim) = (4, 9, 6);
        let rows = images * patches;
        let a = MimLossArgs {
            rows,
            dim,
            tau_student: 0.1,
            tau_teacher: 0.04,
            weight: 0.7,
            centre_momentum: 0.9,
        };
        let masks: Vec<bool> = (0..rows).map(|r| r % 4 == 1 && r >= patches).collect();
        let mut w = vec![0.0; rows];
        sere_core::loss::masked_patch_weights(&masks, patches, &mut w).unwrap();
        let (s, t) = (data(rows * dim, 31), data(rows * dim, 32));
        let (c0, g0) = (data(dim, 33), data(rows * dim, 34));
        let run = |be_c: &mut Vec<f32>, be_g: &mut Vec<f32>, stats: &mut Vec<f32>| {
            crate::backend::Cpu
                .mim_loss(&s, &t, &w, be_c, a, be_g, stats, 1)
                .unwrap()
        };
        let (mut c_cpu, mut g_cpu, mut st_cpu) = (c0.clone(), g0.clone(), vec![5.0; 3]);
        run(&mut c_cpu, &mut g_cpu, &mut st_cpu);
        let (mut cd, mut gd) = (up(&dev, &c0), up(&dev, &g0));
        let mut stats = up(&dev, &[5.0; 4]);
        dev.mim_loss(
            &up(&dev, &s),
            &up(&dev, &t),
            &up(&dev, &w),
            &mut cd,
            a,
            &mut gd,
            &mut stats,
            1,
        )
        .unwrap();
        close("stats", &down(&dev, &stats), &st_cpu, 1e-5);
        close("dstudent", &down(&dev, &gd), &g_cpu, 1e-5);
        close("centre", &down(&dev, &cd), &c_cpu, 1e-6);
    }

    /// Grids of one pair: `p = hs * ws` points per image in `[-0.9, 0.9]`.
    fn pair(
        teacher: usize,
        student: usize,
        (hs, ws): (usize, usize),
        valid: &[bool],
        seed: u64,
    ) -> BatchPairGrids {
        let n = valid.len() * hs * ws * 2;
        BatchPairGrids {
            teacher,
            student,
            hs,
            ws,
            teacher_grid: data(n, seed).iter().map(|v| v * 0.9).collect(),
            student_grid: data(n, seed + 1).iter().map(|v| v * 0.9).collect(),
            valid: valid.to_vec(),
        }
    }

    #[test]
    fn relation_losses_match_the_cpu() {
        let Some(dev) = device() else { return };
        let shapes = ViewShapes {
            batch: 3,
            channels: 4,
            global_hw: (3, 3),
            local_hw: (2, 2),
            locals: 1,
        };
        let cfg = SereLossConfig::new(2);
        let (alpha, beta) = (0.6, 1.3);
        // Pair sizes differ (global / local students); one pair has no
        // overlapping image.
        let grids = vec![
            pair(0, 1, (2, 2), &[true, false, true], 31),
            pair(0, 2, (1, 2), &[true, true, true], 33),
            pair(1, 0, (2, 2), &[false, false, false], 35),
            pair(1, 2, (1, 2), &[false, true, false], 37),
        ];
        let (ng, nl) = (shapes.globals_len(), shapes.locals_len());
        let (ts, tc) = (data(ng, 40), data(ng, 41));
        let (ssg, ssl, scg, scl) = (data(ng, 42), data(nl, 43), data(ng, 44), data(nl, 45));
        let (dsg0, dsl0, dcg0, dcl0) = (data(ng, 46), data(nl, 47), data(ng, 48), data(nl, 49));

        let (mut dsg, mut dsl, mut dcg, mut dcl) =
            (dsg0.clone(), dsl0.clone(), dcg0.clone(), dcl0.clone());
        let grid_of = |img: usize, t: usize, s: usize| -> Option<(&[f32], &[f32])> {
            let g = grids.iter().find(|g| g.teacher == t && g.student == s)?;
            if !g.valid[img] {
                return None;
            }
            let p = g.hs * g.ws * 2;
            Some((
                &g.teacher_grid[img * p..(img + 1) * p],
                &g.student_grid[img * p..(img + 1) * p],
            ))
        };
        let out = SereLoss::new()
            .forward_backward(
                &cfg,
                &shapes,
                &SereInputs {
                    teacher_spatial: &ts,
                    teacher_channel: &tc,
                    student_spatial: StudentViews {
                        globals: &ssg,
                        locals: &ssl,
                    },
                    student_channel: StudentViews {
                        globals: &scg,
                        locals: &scl,
                    },
                },
                grid_of,
                (alpha, beta),
                Some(SereGrads {
                    spatial: StudentGrads {
                        globals: &mut dsg,
                        locals: &mut dsl,
                    },
                    channel: StudentGrads {
                        globals: &mut dcg,
                        locals: &mut dcl,
                    },
                }),
            )
            .unwrap();
        assert_eq!(out.spatial_terms, 4);

        let (tsd, tcd) = (up(&dev, &ts), up(&dev, &tc));
        let (ssgd, ssld, scgd, scld) = (
            up(&dev, &ssg),
            up(&dev, &ssl),
            up(&dev, &scg),
            up(&dev, &scl),
        );
        let (mut dsgd, mut dsld) = (up(&dev, &dsg0), up(&dev, &dsl0));
        let (mut dcgd, mut dcld) = (up(&dev, &dcg0), up(&dev, &dcl0));
        let mut stats = up(&dev, &[9.0; 5]);
        let mut ws = RelationWorkspace::default();
        // Twice: the second call reuses the workspace and overwrites the
        // slots (the gradients are compared after the first).
        for call in 0..2 {
            let terms = dev
                .relation_losses(
                    &mut ws,
                    RelationArgs {
                        cfg: &cfg,
                        shapes: &shapes,
                        grids: &grids,
                        teacher_spatial: &tsd,
                        teacher_channel: &tcd,
                        student_spatial: StudentFeatures {
                            globals: &ssgd,
                            locals: &ssld,
                        },
                        student_channel: StudentFeatures {
                            globals: &scgd,
                            locals: &scld,
                        },
                        weights: (alpha, beta),
                        dspatial: StudentFeatureGrads {
                            globals: &mut dsgd,
                            locals: &mut dsld,
                        },
                        dchannel: StudentFeatureGrads {
                            globals: &mut dcgd,
                            locals: &mut dcld,
                        },
                    },
                    &mut stats,
                    2,
                )
                .unwrap();
            assert_eq!(terms, out.spatial_terms);
            let want = [9.0, 9.0, out.spatial, out.channel, 9.0];
            close("stats", &down(&dev, &stats), &want, 1e-4);
            if call == 0 {
                close("dspatial globals", &down(&dev, &dsgd), &dsg, 1e-4);
                close("dspatial locals", &down(&dev, &dsld), &dsl, 1e-4);
                close("dchannel globals", &down(&dev, &dcgd), &dcg, 1e-4);
                close("dchannel locals", &down(&dev, &dcld), &dcl, 1e-4);
            }
        }
    }
}
