//! SGEMM for the CPU backend, chosen at run time by CPU features
//! ([`GemmPath::fastest`]): on AVX-512 the `gemm` crate (candle's CPU
//! SGEMM, which dispatches its own kernels); otherwise our BLIS-style cache
//! blocking, written once around a register tile per instruction set: 6 x
//! 16 with AVX2 + FMA, and `sere-core`'s matrixmultiply path as the fallback
//! on other CPUs. A 12 x 32 AVX-512 tile of ours stays selectable.
//! `SERE_GEMM=gemm-crate|avx512|avx2|portable` forces a path the CPU has
//! (for benchmarks and tests).
//!
//! Why the crate on AVX-512: on the Ice Lake Xeon (model 106) it beat our
//! 12 x 32 tile at every shape of the step, by 10-37% alone and 10-18% on
//! the whole step; on the model-207 Xeon at ten of twelve shapes (2-72%;
//! 2% and 7% behind at fc1 dW and the DINO head; BENCHMARKS.md). A
//! maintained library is preferred to ours where it is as fast. It allocates its packing buffer
//! on every call (malloc reuses the memory; the benchmarks include it).
//! Why not on AVX2 alone: not measured there yet against our 6 x 16 tile,
//! which was 0.86x PyTorch's step on an AMD EPYC.
//!
//! Why AVX-512 gets its own tile: on an Intel Xeon with two 512-bit FMA
//! ports the 6 x 16 AVX2 tile reaches 62-76 GFLOP/s per core at the step's
//! shapes, against 139 for `torch.mm`. The 12 x 32 tile (BLIS's shape for
//! Skylake-X, transposed for row-major C) keeps 24 zmm accumulators and does
//! 24 FMAs per 2 loads of B and 12 broadcasts of A.
//!
//! Why not matrixmultiply alone: its FMA kernel is an 8 x 8 tile, which
//! needs 9 loads (one row of B, eight broadcasts of A) per 8 FMAs. Two load
//! ports then saturate before the two FMA pipes do, and the training step's
//! products ran at 74-83 GFLOP/s on one Zen 4 core whose `torch.mm` peak is
//! 102. The 6 x 16 tile (BLIS's choice for Haswell and Zen) does 12 FMAs per
//! 8 loads and is FMA-bound. The blocking keeps a packed `KC x 16` sliver of
//! B in L1 while it meets every `6 x KC` sliver of the packed A block in L2.
//!
//! Our paths' packing buffers live in a thread-local arena that only
//! grows, so after the first training step none of their calls allocates.
//! Each call (the crate's too) is single-threaded: callers split rows (or
//! output features) over rayon's pool.

use std::cell::RefCell;

use sere_core::error::{Error, Result};
use sere_core::linalg::{check_gemm_views, MatRef};

/// Depth of one packed block: a `KC x 16` sliver of B is 16 KiB, a
/// `KC x 32` one 32 KiB (L1 holds it beside a streamed sliver of A).
const KC: usize = 256;
/// Columns of one packed B block (L3 at most; our products rarely exceed it).
const NC: usize = 4096;

/// A register tile's shape and the rows of A packed per L2 block.
trait Tiling {
    /// Rows of the register tile.
    const MR: usize;
    /// Columns of the register tile.
    const NR: usize;
    /// Rows of one A block (`MC x KC` floats stay in L2).
    const MC: usize;
    /// Whether row-major A is packed into slivers too. Unpacked, the
    /// kernel broadcasts A's elements straight from the caller's rows (only
    /// a ragged last sliver is packed, zero-padded): packing costs `m k`
    /// transposing copies per call, about 14% of a 192-column product's
    /// time. A stored any other way (`dy^T` of a weight gradient, whose
    /// depth steps lie a row of `dy` apart) is always packed: read in
    /// place, every depth step would touch a new cache line and page.
    const PACK_A: bool;
}

/// The AVX2 + FMA tile: 6 rows of two 8-lane vectors.
struct Avx2;
impl Tiling for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;
    const MC: usize = 144;
    const PACK_A: bool = true;
}

/// The AVX-512 tile: 12 rows of two 16-lane vectors.
struct Avx512;
impl Tiling for Avx512 {
    const MR: usize = 12;
    const NR: usize = 32;
    const MC: usize = 240;
    const PACK_A: bool = false;
}

/// Which SGEMM runs: the best this CPU has unless `SERE_GEMM` forces one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmPath {
    /// The `gemm` crate (candle's CPU SGEMM), which picks its own kernel
    /// for the CPU (AVX-512, AVX2 + FMA, NEON, scalar).
    Crate,
    /// The 12 x 32 AVX-512 tile.
    Avx512,
    /// The 6 x 16 AVX2 + FMA tile.
    Avx2,
    /// matrixmultiply through `sere-core` (any CPU).
    Portable,
}

impl GemmPath {
    /// Every path.
    pub const ALL: [GemmPath; 4] = [
        GemmPath::Crate,
        GemmPath::Avx512,
        GemmPath::Avx2,
        GemmPath::Portable,
    ];

    /// The name `SERE_GEMM` takes.
    pub fn name(self) -> &'static str {
        match self {
            GemmPath::Crate => "gemm-crate",
            GemmPath::Avx512 => "avx512",
            GemmPath::Avx2 => "avx2",
            GemmPath::Portable => "portable",
        }
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                GemmPath::Avx512 => avx512_available(),
                GemmPath::Avx2 => fma_available(),
                GemmPath::Crate | GemmPath::Portable => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            matches!(self, GemmPath::Crate | GemmPath::Portable)
        }
    }

    /// The path this CPU runs fastest, as measured (BENCHMARKS.md, "the
    /// `gemm` crate in the step"): on AVX-512 the `gemm` crate, which made
    /// the whole step 10-18% faster than our 12 x 32 tile on an Ice Lake
    /// Xeon (an AMD Zen 4 with AVX-512 takes it too, unmeasured there);
    /// on AVX2 + FMA alone our 6 x 16 tile (the crate was not measured on
    /// such a CPU); else matrixmultiply.
    pub fn fastest() -> GemmPath {
        if GemmPath::Avx512.supported() {
            GemmPath::Crate
        } else if GemmPath::Avx2.supported() {
            GemmPath::Avx2
        } else {
            GemmPath::Portable
        }
    }

    /// The path [`gemm`] takes: `SERE_GEMM` when it names a path this CPU
    /// has (a warning on stderr otherwise), else the fastest supported.
    /// Chosen once per process.
    pub fn active() -> GemmPath {
        static ACTIVE: std::sync::OnceLock<GemmPath> = std::sync::OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = GemmPath::fastest();
            match std::env::var("SERE_GEMM") {
                Ok(v) if !v.is_empty() => match GemmPath::ALL.into_iter().find(|p| p.name() == v) {
                    Some(p) if p.supported() => p,
                    Some(p) => {
                        eprintln!("warning: SERE_GEMM={v}: this CPU lacks {}; using {}", p.name(), best.name());
                        best
                    }
                    None => {
                        eprintln!("warning: SERE_GEMM={v} is not one of gemm-crate, avx512, avx2, portable; using {}", best.name());
                        best
                    }
                },
                _ => best,
            }
        })
    }
}

thread_local! {
    /// Packed A block and packed B block of this thread, grown on demand.
    static PACK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `C = alpha A B + beta C` over strided views, like
/// [`sere_core::linalg::gemm`] (same arguments, same checks:
/// [`check_gemm_views`]), with `beta = 0`
/// overwriting `C` without reading it.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    alpha: f32,
    a: &[f32],
    am: MatRef,
    b: &[f32],
    bm: MatRef,
    beta: f32,
    c: &mut [f32],
    cm: MatRef,
) -> Result<()> {
    gemm_bias(alpha, a, am, b, bm, beta, None, c, cm)
}

/// [`gemm`] plus a bias row added to every row of `C` (`bias.len()` must be
/// the number of columns): the linear layer's `x W^T + b` in one pass.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bias(
    alpha: f32,
    a: &[f32],
    am: MatRef,
    b: &[f32],
    bm: MatRef,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    cm: MatRef,
) -> Result<()> {
    check_operands((am, a.len()), (bm, b.len()), bias, (cm, c.len()))?;
    gemm_checked(GemmPath::active(), alpha, a, am, b, bm, beta, bias, c, cm);
    Ok(())
}

/// [`gemm_bias`] on a given path (tests and benchmarks compare paths).
///
/// # Errors
/// As [`gemm_bias`], plus [`Error::InvalidArgument`] when this CPU cannot
/// run `path`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bias_on(
    path: GemmPath,
    alpha: f32,
    a: &[f32],
    am: MatRef,
    b: &[f32],
    bm: MatRef,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    cm: MatRef,
) -> Result<()> {
    if !path.supported() {
        return Err(Error::InvalidArgument {
            what: "GEMM path",
            requirement: "one this CPU supports (GemmPath::supported)",
        });
    }
    check_operands((am, a.len()), (bm, b.len()), bias, (cm, c.len()))?;
    gemm_checked(path, alpha, a, am, b, bm, beta, bias, c, cm);
    Ok(())
}

/// The views' checks ([`check_gemm_views`]) plus the bias length.
fn check_operands(
    a: (MatRef, usize),
    b: (MatRef, usize),
    bias: Option<&[f32]>,
    c: (MatRef, usize),
) -> Result<()> {
    check_gemm_views(a, b, c)?;
    match bias {
        Some(bias) if bias.len() != c.0.cols => Err(Error::ShapeMismatch {
            what: "bias",
            expected: c.0.cols,
            got: bias.len(),
        }),
        _ => Ok(()),
    }
}

/// The product on `path` (supported), views already checked.
#[allow(clippy::too_many_arguments)]
fn gemm_checked(
    path: GemmPath,
    alpha: f32,
    a: &[f32],
    am: MatRef,
    b: &[f32],
    bm: MatRef,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    cm: MatRef,
) {
    if cm.rows == 0 || cm.cols == 0 {
        return;
    }
    if path == GemmPath::Portable || am.cols == 0 {
        fallback(alpha, a, am, b, bm, beta, bias, c, cm).expect("views checked by the caller");
        return;
    }
    let args = Operands {
        alpha,
        a,
        am,
        b,
        bm,
        beta,
        bias,
        cm,
    };
    if path == GemmPath::Crate {
        // SAFETY: every view was checked to lie inside its slice.
        unsafe { crate_gemm(&args, c) };
        return;
    }
    PACK.with(|p| {
        let mut p = p.borrow_mut();
        let (pa, pb) = &mut *p;
        // SAFETY: the path was checked to be supported (AVX2 + FMA, and
        // AVX512F for its tile); every view was checked to lie inside its
        // slice, so the kernels' reads and writes stay in bounds.
        unsafe {
            match path {
                GemmPath::Avx512 => {
                    blocked::<Avx512>(&args, c, pa, pb, [kernel_12x32::<2>, kernel_12x32::<1>])
                }
                _ => blocked::<Avx2>(&args, c, pa, pb, [kernel_6x16, kernel_6x16]),
            }
        }
    });
}

/// `C = alpha A B + beta C (+ bias)` through the `gemm` crate, one thread
/// (the caller's rayon task). The crate reads `C` only when told to, so
/// `beta = 0` overwrites it unread, as on the other paths; a bias is first
/// folded into `C` ([`fold_bias`]), which the product then accumulates on.
///
/// # Safety
/// The views lie inside their slices (checked by the caller).
unsafe fn crate_gemm(o: &Operands<'_>, c: &mut [f32]) {
    let (am, bm, cm) = (o.am, o.bm, o.cm);
    let keep = fold_bias(o.beta, o.bias, c, cm);
    let read_c = keep != 0.0;
    let s = |v: usize| v as isize;
    // The crate's `alpha` scales the old C and its `beta` the product.
    gemm::gemm(
        cm.rows,
        cm.cols,
        am.cols,
        c.as_mut_ptr().add(cm.offset),
        s(cm.col_stride),
        s(cm.row_stride),
        read_c,
        o.a.as_ptr().add(am.offset),
        s(am.col_stride),
        s(am.row_stride),
        o.b.as_ptr().add(bm.offset),
        s(bm.col_stride),
        s(bm.row_stride),
        keep,
        o.alpha,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// The read-only operands of one product.
struct Operands<'a> {
    alpha: f32,
    a: &'a [f32],
    am: MatRef,
    b: &'a [f32],
    bm: MatRef,
    beta: f32,
    bias: Option<&'a [f32]>,
    cm: MatRef,
}

/// Where a tile's `MR x kc` sliver of A is: element `(i, p)` at
/// `ptr + i * rs + p * cs` (a packed sliver has `rs = 1`, `cs = MR`).
#[derive(Clone, Copy)]
struct APanel {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

/// A register-tile kernel: depth, A sliver, packed B sliver, alpha, beta,
/// the tile's bias columns, where the tile lands.
type TileKernel = unsafe fn(usize, APanel, *const f32, f32, f32, Option<&[f32]>, Tile);

/// Whether this build has the AVX-512 tile (rustc 1.89 or newer, see
/// build.rs) and this CPU runs it.
fn avx512_available() -> bool {
    #[cfg(all(target_arch = "x86_64", sere_avx512))]
    {
        std::arch::is_x86_feature_detected!("avx512f") && fma_available()
    }
    #[cfg(not(all(target_arch = "x86_64", sere_avx512)))]
    {
        false
    }
}

/// Whether this CPU runs the AVX2 + FMA kernel (detected once, cached by std).
fn fma_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Other CPUs (and `k = 0`): matrixmultiply through sere-core, with the
/// bias folded in as a pre-filled `C`.
#[allow(clippy::too_many_arguments)]
fn fallback(
    alpha: f32,
    a: &[f32],
    am: MatRef,
    b: &[f32],
    bm: MatRef,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    cm: MatRef,
) -> Result<()> {
    let beta = fold_bias(beta, bias, c, cm);
    sere_core::linalg::gemm(alpha, a, am, b, bm, beta, c, cm)
}

/// For the GEMMs that take no bias: writes `beta C + bias` into `C` (the
/// bias alone when `beta = 0`, so that `C` is not read) and returns the
/// `beta` the product is then to accumulate with (1 after a bias,
/// otherwise `beta` unchanged).
///
/// A pass over all of `C`, so it must run at memory speed: row-major `C`
/// (the linear layers' outputs) goes row by row over slices, which the
/// compiler turns into a copy or a vector loop; any other layout goes
/// element by element.
fn fold_bias(beta: f32, bias: Option<&[f32]>, c: &mut [f32], cm: MatRef) -> f32 {
    let Some(bias) = bias else { return beta };
    let bias = &bias[..cm.cols];
    if cm.col_stride == 1 {
        for i in 0..cm.rows {
            let start = cm.offset + i * cm.row_stride;
            let row = &mut c[start..start + cm.cols];
            if beta == 0.0 {
                row.copy_from_slice(bias);
            } else {
                for (x, &v) in row.iter_mut().zip(bias) {
                    *x = beta * *x + v;
                }
            }
        }
        return 1.0;
    }
    for i in 0..cm.rows {
        for (j, &v) in bias.iter().enumerate() {
            let x = &mut c[cm.offset + i * cm.row_stride + j * cm.col_stride];
            *x = if beta == 0.0 { v } else { beta * *x + v };
        }
    }
    1.0
}

/// The BLIS loop nest, once for every tile: column blocks of B (NC), depth
/// blocks (KC), row blocks of A (`T::MC`), then `T::NR x T::MR` register
/// tiles computed by `kernels[0]`, or by `kernels[1]` (which computes only
/// the first `T::NR / 2` columns) for a ragged last sliver that narrow.
///
/// # Safety
/// The CPU must support AVX2 and FMA and whatever `kernel` needs, and the
/// views must lie inside their slices (checked by [`gemm_bias`]).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn blocked<T: Tiling>(
    o: &Operands<'_>,
    c: &mut [f32],
    pa: &mut Vec<f32>,
    pb: &mut Vec<f32>,
    kernels: [TileKernel; 2],
) {
    let (mr_, nr_) = (T::MR, T::NR);
    let (m, k, n) = (o.am.rows, o.am.cols, o.bm.cols);
    let need_b = KC * NC.min(n.div_ceil(nr_) * nr_);
    // Eight floats of slack: the vector packing of A stores 8 lanes where a
    // sliver row may hold fewer.
    let need_a = KC * T::MC.min(m.div_ceil(mr_) * mr_) + 8;
    if pb.len() < need_b {
        pb.resize(need_b, 0.0);
    }
    if pa.len() < need_a {
        pa.resize(need_a, 0.0);
    }
    let cm = o.cm;
    let cp = c.as_mut_ptr();
    let pack_all = T::PACK_A || o.am.col_stride != 1;
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            // The first depth block applies beta and the bias; later ones
            // accumulate onto it.
            let (beta_blk, bias_blk) = if pc == 0 {
                (o.beta, o.bias.map(|v| &v[jc..jc + nc]))
            } else {
                (1.0, None)
            };
            pack_b::<T>(o.b, o.bm, pc, kc, jc, nc, pb);
            for ic in (0..m).step_by(T::MC) {
                let mc = T::MC.min(m - ic);
                // Unpacked, only the ragged last sliver is packed (at the
                // start of the buffer) so that the kernel never reads past A.
                let ragged = mc % mr_;
                if pack_all {
                    pack_a::<T>(o.a, o.am, ic, mc, pc, kc, pa);
                } else if ragged != 0 {
                    pack_a::<T>(o.a, o.am, ic + mc - ragged, ragged, pc, kc, pa);
                }
                for jr in (0..nc).step_by(nr_) {
                    let nr = nr_.min(nc - jr);
                    let bpan = pb.as_ptr().add(jr * kc);
                    let bias_t = bias_blk.map(|v| &v[jr..jr + nr]);
                    for ir in (0..mc).step_by(mr_) {
                        let mr = mr_.min(mc - ir);
                        let apan = if pack_all {
                            APanel {
                                ptr: pa.as_ptr().add(ir * kc),
                                rs: 1,
                                cs: mr_,
                            }
                        } else if mr < mr_ {
                            APanel {
                                ptr: pa.as_ptr(),
                                rs: 1,
                                cs: mr_,
                            }
                        } else {
                            let at =
                                o.am.offset + (ic + ir) * o.am.row_stride + pc * o.am.col_stride;
                            APanel {
                                ptr: o.a.as_ptr().add(at),
                                rs: o.am.row_stride,
                                cs: o.am.col_stride,
                            }
                        };
                        let c0 = cm.offset + (ic + ir) * cm.row_stride + (jc + jr) * cm.col_stride;
                        let tile = Tile {
                            c: cp.add(c0),
                            rs: cm.row_stride,
                            cs: cm.col_stride,
                            mr,
                            nr,
                        };
                        let kernel = kernels[usize::from(nr <= nr_ / 2)];
                        kernel(kc, apan, bpan, o.alpha, beta_blk, bias_t, tile);
                    }
                }
            }
        }
    }
}

/// A `kc x nc` block of B at (`pc`, `jc`) as `T::NR`-wide slivers, each
/// `kc x T::NR` row-major, the last one padded with zeros.
///
/// # Safety
/// AVX2 (the transposed path uses 8 x 8 register transposes); the view lies
/// inside `b` and `out` holds the block.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn pack_b<T: Tiling>(
    b: &[f32],
    bm: MatRef,
    pc: usize,
    kc: usize,
    jc: usize,
    nc: usize,
    out: &mut [f32],
) {
    let nr_ = T::NR;
    let (rs, cs) = (bm.row_stride, bm.col_stride);
    for (s, j0) in (0..nc).step_by(nr_).enumerate() {
        let w = nr_.min(nc - j0);
        let dst = &mut out[s * kc * nr_..(s + 1) * kc * nr_];
        let base = bm.offset + pc * rs + (jc + j0) * cs;
        if cs == 1 && w == nr_ {
            for (p, row) in dst.chunks_exact_mut(nr_).enumerate() {
                let src = base + p * rs;
                row.copy_from_slice(&b[src..src + nr_]);
            }
        } else if rs == 1 {
            // B is a transposed row-major matrix (a weight `W^T`): each column
            // is contiguous in memory. Full slivers go 8 x 8 through registers.
            let mut p0 = 0;
            #[cfg(target_arch = "x86_64")]
            if w == nr_ {
                use std::arch::x86_64::*;
                let src = b.as_ptr().add(base);
                while p0 + 8 <= kc {
                    for group in 0..nr_ / 8 {
                        let col = |j: usize| _mm256_loadu_ps(src.add((group * 8 + j) * cs + p0));
                        let cols = [
                            col(0),
                            col(1),
                            col(2),
                            col(3),
                            col(4),
                            col(5),
                            col(6),
                            col(7),
                        ];
                        for (q, v) in transpose8(cols).into_iter().enumerate() {
                            _mm256_storeu_ps(dst.as_mut_ptr().add((p0 + q) * nr_ + group * 8), v);
                        }
                    }
                    p0 += 8;
                }
            }
            for j in 0..nr_ {
                if j < w {
                    let col = &b[base + j * cs..base + j * cs + kc];
                    for (p, &v) in col.iter().enumerate().skip(p0) {
                        dst[p * nr_ + j] = v;
                    }
                } else {
                    for p in p0..kc {
                        dst[p * nr_ + j] = 0.0;
                    }
                }
            }
        } else {
            for (p, row) in dst.chunks_exact_mut(nr_).enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = if j < w {
                        b[base + p * rs + j * cs]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// An `mc x kc` block of A at (`ic`, `pc`) as `T::MR`-tall slivers, each
/// `kc x T::MR` (column of the sliver contiguous), the last padded with
/// zeros.
///
/// # Safety
/// AVX2; the view lies inside `a`, and `out` holds the block plus 8 floats.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn pack_a<T: Tiling>(
    a: &[f32],
    am: MatRef,
    ic: usize,
    mc: usize,
    pc: usize,
    kc: usize,
    out: &mut [f32],
) {
    let mr_ = T::MR;
    let (rs, cs) = (am.row_stride, am.col_stride);
    for (s, i0) in (0..mc).step_by(mr_).enumerate() {
        let h = mr_.min(mc - i0);
        let base = am.offset + (ic + i0) * rs + pc * cs;
        if cs == 1 {
            // Row-major A: each row of the sliver is contiguous. Full slivers
            // go 8 columns at a time through 8 x 8 register transposes of 8
            // rows each (zero rows past the sliver). Column by column, each
            // group's 8-lane store may overlap the next column's first
            // floats, which the next column's stores rewrite (hence the
            // slack).
            let mut p0 = 0;
            #[cfg(target_arch = "x86_64")]
            if h == mr_ && mr_ <= 16 {
                use std::arch::x86_64::*;
                let src = a.as_ptr().add(base);
                let out_p = out.as_mut_ptr().add(s * kc * mr_);
                let groups = mr_.div_ceil(8);
                while p0 + 8 <= kc {
                    let z = _mm256_setzero_ps();
                    let mut t = [[z; 8]; 2];
                    for (g, tg) in t.iter_mut().enumerate().take(groups) {
                        let row = |i: usize| {
                            let r = g * 8 + i;
                            if r < mr_ {
                                _mm256_loadu_ps(src.add(r * rs + p0))
                            } else {
                                z
                            }
                        };
                        let rows = [
                            row(0),
                            row(1),
                            row(2),
                            row(3),
                            row(4),
                            row(5),
                            row(6),
                            row(7),
                        ];
                        *tg = transpose8(rows);
                    }
                    for q in 0..8 {
                        for (g, tg) in t.iter().enumerate().take(groups) {
                            _mm256_storeu_ps(out_p.add((p0 + q) * mr_ + g * 8), tg[q]);
                        }
                    }
                    p0 += 8;
                }
            }
            let dst = &mut out[s * kc * mr_..(s + 1) * kc * mr_];
            for i in 0..mr_ {
                if i < h {
                    let row = &a[base + i * rs..base + i * rs + kc];
                    for (p, &v) in row.iter().enumerate().skip(p0) {
                        dst[p * mr_ + i] = v;
                    }
                } else {
                    for p in p0..kc {
                        dst[p * mr_ + i] = 0.0;
                    }
                }
            }
        } else if rs == 1 && h == mr_ {
            // A is a transposed row-major matrix (`dy^T` of a weight
            // gradient): each column of the sliver is contiguous.
            let dst = &mut out[s * kc * mr_..(s + 1) * kc * mr_];
            for (p, col) in dst.chunks_exact_mut(mr_).enumerate() {
                col.copy_from_slice(&a[base + p * cs..base + p * cs + mr_]);
            }
        } else {
            let dst = &mut out[s * kc * mr_..(s + 1) * kc * mr_];
            for (p, col) in dst.chunks_exact_mut(mr_).enumerate() {
                for (i, x) in col.iter_mut().enumerate() {
                    *x = if i < h {
                        a[base + i * rs + p * cs]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// Transposes 8 rows of 8 lanes: output `q` holds lane `q` of every row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn transpose8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// Where one register tile lands in C: `mr x nr` valid elements.
struct Tile {
    c: *mut f32,
    rs: usize,
    cs: usize,
    mr: usize,
    nr: usize,
}

/// A tile's `alpha`-scaled products, `tmp` rows `ld` apart, stored element
/// by element: `C = tmp + bias` (`beta = 0`, C not read) or `beta C + tmp +
/// bias`. The kernels' path for edges and strided C.
///
/// # Safety
/// The tile's `mr x nr` elements are in bounds of C; `tmp` holds `mr` rows
/// of `ld >= nr`, `bias` (when given) `nr` values.
#[cfg(target_arch = "x86_64")]
unsafe fn store_scalar(tmp: &[f32], ld: usize, bias: Option<&[f32]>, beta: f32, t: &Tile) {
    for i in 0..t.mr {
        for j in 0..t.nr {
            let y = tmp[i * ld + j] + bias.map_or(0.0, |v| v[j]);
            let cij = t.c.add(i * t.rs + j * t.cs);
            *cij = if beta == 0.0 { y } else { beta * *cij + y };
        }
    }
}

/// The 6 x 16 register tile: 12 accumulators, per depth step two loads of
/// B and six broadcasts of A. Full tiles with unit column stride are stored
/// straight from registers; edges and strided C go through a stack tile.
///
/// # Safety
/// AVX2 + FMA; `a` holds `kc * MR` and `b` `kc * NR` floats; the tile's
/// `mr x nr` elements are in bounds of C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_6x16(
    kc: usize,
    a: APanel,
    b: *const f32,
    alpha: f32,
    beta: f32,
    bias: Option<&[f32]>,
    t: Tile,
) {
    use std::arch::x86_64::*;
    // C is usually cold (written once per depth block): start its cache
    // lines on their way while the depth loop runs.
    for i in 0..t.mr {
        let row = t.c.add(i * t.rs);
        _mm_prefetch::<_MM_HINT_T0>(row as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(row.add((t.nr - 1) * t.cs) as *const i8);
    }
    debug_assert!(
        a.rs == 1 && a.cs == Avx2::MR,
        "the AVX2 tile reads packed A"
    );
    let a = a.ptr;
    let mut acc = [[_mm256_setzero_ps(); 2]; Avx2::MR];
    for p in 0..kc {
        let b0 = _mm256_loadu_ps(b.add(p * Avx2::NR));
        let b1 = _mm256_loadu_ps(b.add(p * Avx2::NR + 8));
        let ap = a.add(p * Avx2::MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_broadcast_ss(&*ap.add(i));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
    }
    let va = _mm256_set1_ps(alpha);
    let (bias0, bias1) = match bias {
        Some(v) if v.len() == Avx2::NR => (
            _mm256_loadu_ps(v.as_ptr()),
            _mm256_loadu_ps(v.as_ptr().add(8)),
        ),
        _ => (_mm256_setzero_ps(), _mm256_setzero_ps()),
    };
    if t.mr == Avx2::MR && t.nr == Avx2::NR && t.cs == 1 {
        let vb = _mm256_set1_ps(beta);
        for (i, row) in acc.iter().enumerate() {
            let cr = t.c.add(i * t.rs);
            let mut y0 = _mm256_fmadd_ps(row[0], va, bias0);
            let mut y1 = _mm256_fmadd_ps(row[1], va, bias1);
            if beta != 0.0 {
                y0 = _mm256_fmadd_ps(_mm256_loadu_ps(cr), vb, y0);
                y1 = _mm256_fmadd_ps(_mm256_loadu_ps(cr.add(8)), vb, y1);
            }
            _mm256_storeu_ps(cr, y0);
            _mm256_storeu_ps(cr.add(8), y1);
        }
        return;
    }
    let mut tmp = [0.0f32; Avx2::MR * Avx2::NR];
    for (i, row) in acc.iter().enumerate() {
        _mm256_storeu_ps(
            tmp.as_mut_ptr().add(i * Avx2::NR),
            _mm256_mul_ps(row[0], va),
        );
        _mm256_storeu_ps(
            tmp.as_mut_ptr().add(i * Avx2::NR + 8),
            _mm256_mul_ps(row[1], va),
        );
    }
    store_scalar(&tmp, Avx2::NR, bias, beta, &t);
}

/// The 12 x 32 AVX-512 tile: 24 accumulators, per depth step two loads of
/// B and twelve broadcasts of A, read packed or in place ([`APanel`]).
/// `NV` is the number of 16-lane column vectors computed: 2 for the full
/// tile, 1 for a ragged last sliver of at most 16 columns (half the FMAs).
/// Columns with unit stride are stored through lane masks; strided C goes
/// through a stack tile.
///
/// # Safety
/// AVX512F + FMA; `a` holds the sliver's `12 x kc` elements and `b` `kc *
/// 32` floats; the tile's `mr x nr` elements (`nr <= 16 NV`) are in bounds
/// of C.
#[cfg(all(target_arch = "x86_64", sere_avx512))]
#[target_feature(enable = "avx512f,avx2,fma")]
// Compiled only by rustc 1.89 or newer (build.rs sets `sere_avx512`).
#[clippy::msrv = "1.89"]
unsafe fn kernel_12x32<const NV: usize>(
    kc: usize,
    a: APanel,
    b: *const f32,
    alpha: f32,
    beta: f32,
    bias: Option<&[f32]>,
    t: Tile,
) {
    use std::arch::x86_64::*;
    const MR: usize = Avx512::MR;
    const NR: usize = Avx512::NR;
    debug_assert!(t.nr <= 16 * NV);
    for i in 0..t.mr {
        let row = t.c.add(i * t.rs);
        _mm_prefetch::<_MM_HINT_T0>(row as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(row.add((t.nr - 1) * t.cs) as *const i8);
    }
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    // Row pointers of A in three groups of four (base + 0..3 row strides),
    // so the depth loop needs few registers for any layout of A.
    let r3 = 3 * a.rs;
    let g = [a.ptr, a.ptr.add(4 * a.rs), a.ptr.add(8 * a.rs)];
    for p in 0..kc {
        let mut bv = [_mm512_setzero_ps(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(b.add(p * NR + 16 * v));
        }
        let off = p * a.cs;
        for (i, row) in acc.iter_mut().enumerate() {
            let base = g[i / 4].add(off);
            let elem = match i % 4 {
                0 => base,
                1 => base.add(a.rs),
                2 => base.add(2 * a.rs),
                _ => base.add(r3),
            };
            let ai = _mm512_set1_ps(*elem);
            for (x, &bx) in row.iter_mut().zip(&bv) {
                *x = _mm512_fmadd_ps(ai, bx, *x);
            }
        }
    }
    let va = _mm512_set1_ps(alpha);
    if t.cs == 1 {
        // Lane masks of the tile's column vectors.
        let mut mask = [0u16; NV];
        for (v, m) in mask.iter_mut().enumerate() {
            let n = t.nr.saturating_sub(16 * v);
            *m = if n >= 16 { 0xFFFF } else { (1u16 << n) - 1 };
        }
        let mut bias_v = [_mm512_setzero_ps(); NV];
        if let Some(bias) = bias {
            for (v, x) in bias_v.iter_mut().enumerate() {
                *x = _mm512_maskz_loadu_ps(mask[v], bias.as_ptr().add(16 * v));
            }
        }
        let vb = _mm512_set1_ps(beta);
        for (i, row) in acc.iter().enumerate().take(t.mr) {
            let cr = t.c.add(i * t.rs);
            for (v, &x) in row.iter().enumerate() {
                let cv = cr.add(16 * v);
                let mut y = _mm512_fmadd_ps(x, va, bias_v[v]);
                if beta != 0.0 {
                    y = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask[v], cv), vb, y);
                }
                _mm512_mask_storeu_ps(cv, mask[v], y);
            }
        }
        return;
    }
    let mut tmp = [0.0f32; MR * NR];
    for (i, row) in acc.iter().enumerate() {
        for (v, &x) in row.iter().enumerate() {
            _mm512_storeu_ps(tmp.as_mut_ptr().add(i * NR + 16 * v), _mm512_mul_ps(x, va));
        }
    }
    store_scalar(&tmp, NR, bias, beta, &t);
}

#[cfg(not(all(target_arch = "x86_64", sere_avx512)))]
unsafe fn kernel_12x32<const NV: usize>(
    _kc: usize,
    _a: APanel,
    _b: *const f32,
    _alpha: f32,
    _beta: f32,
    _bias: Option<&[f32]>,
    _t: Tile,
) {
    unreachable!("the AVX-512 SGEMM runs only where it was built and AVX512F was detected")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel_6x16(
    _kc: usize,
    _a: APanel,
    _b: *const f32,
    _alpha: f32,
    _beta: f32,
    _bias: Option<&[f32]>,
    _t: Tile,
) {
    unreachable!("the blocked SGEMM runs only where AVX2 + FMA were detected")
}

#[cfg(test)]
mod tests;
