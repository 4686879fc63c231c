//! The CUDA C sources of the kernels and their run-time compilation with
//! NVRTC.
//!
//! Each `kernels/*.cu` file is embedded with `include_str!`, prefixed with
//! `kernels/common.cuh` (warp and block reductions), and compiled by NVRTC
//! to PTX for a *virtual* architecture (`compute_XX`): the driver finishes
//! the PTX for the exact GPU when it loads the module. Only when NVRTC is
//! newer than the driver (whose PTX JIT would reject the newer PTX ISA) does
//! NVRTC compile to a CUBIN for the real architecture `sm_XX` instead
//! ([`pick_format`]). Each (file, architecture, format) is compiled once per
//! process and cached ([`cached_image`]).

use crate::error::{CudaError, Result};
use std::collections::HashMap;
use std::ffi::{c_int, CString};
use std::sync::{Arc, Mutex, OnceLock};

/// One kernel source file and the `extern "C"` entry points it defines.
///
/// ```
/// let f = &sere_cuda::compile::KERNEL_FILES[0];
/// assert!(f.name.ends_with(".cu") && !f.entries.is_empty());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct KernelFile {
    /// File name under `cuda/kernels/`.
    pub name: &'static str,
    /// The file's text (without the common prelude).
    pub source: &'static str,
    /// The `extern "C" __global__` functions the file defines.
    pub entries: &'static [&'static str],
}

/// `kernels/common.cuh`, prepended to every source.
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// Every kernel source of the crate.
pub const KERNEL_FILES: &[KernelFile] = &[
    KernelFile {
        name: "bilinear.cu",
        source: include_str!("../kernels/bilinear.cu"),
        entries: &[
            "grid_sample_fwd",
            "grid_sample_bwd",
            "grid_sample_fwd_idx",
            "grid_sample_bwd_idx",
        ],
    },
    KernelFile {
        name: "softmax.cu",
        source: include_str!("../kernels/softmax.cu"),
        entries: &[
            "softmax_rows_fwd",
            "softmax_rows_bwd",
            "log_softmax_rows_bwd",
        ],
    },
    KernelFile {
        name: "loss.cu",
        source: include_str!("../kernels/loss.cu"),
        entries: &[
            "relation_ce_rows",
            "dino_teacher_stats",
            "dino_student_rows",
            "weighted_ce_rows",
            "teacher_entropy_rows",
        ],
    },
    KernelFile {
        name: "norm.cu",
        source: include_str!("../kernels/norm.cu"),
        entries: &[
            "layer_norm_fwd",
            "layer_norm_bwd_dx",
            "batch_norm_apply",
            "batch_norm_bwd_dx",
            "batch_norm_running",
        ],
    },
    KernelFile {
        name: "reduce.cu",
        source: include_str!("../kernels/reduce.cu"),
        entries: &["sum_partial", "sum_finish", "col_partial", "col_finish"],
    },
    KernelFile {
        name: "elementwise.cu",
        source: include_str!("../kernels/elementwise.cu"),
        entries: &[
            "gelu_fwd",
            "gelu_bwd",
            "bias_add",
            "scale_inplace",
            "axpy",
            "adamw_step",
            "ema_update",
        ],
    },
    KernelFile {
        name: "train.cu",
        source: include_str!("../kernels/train.cu"),
        entries: &[
            "im2col_patches",
            "copy_rows",
            "keep_scale_add",
            "relu_inplace",
            "relu_bwd_mask",
            "l2_normalize_rows",
            "l2_normalize_rows_bwd",
            "row_dot_add",
        ],
    },
];

impl KernelFile {
    /// The text NVRTC compiles: the common prelude, then the file, with
    /// `#line` markers so compiler messages name the right file and line.
    ///
    /// ```
    /// let full = sere_cuda::compile::KERNEL_FILES[1].full_source();
    /// assert!(full.contains("warp_sum") && full.contains("#line 1 \"softmax.cu\""));
    /// ```
    pub fn full_source(&self) -> String {
        format!(
            "#line 1 \"common.cuh\"\n{COMMON}\n#line 1 \"{}\"\n{}",
            self.name, self.source
        )
    }
}

/// Whether NVRTC can be loaded (without panicking when it cannot).
///
/// ```
/// // On a machine without NVRTC this is an error, never a panic.
/// let _ = sere_cuda::compile::nvrtc_available();
/// ```
pub fn nvrtc_available() -> Result<()> {
    // SAFETY: only tries to dlopen the candidate library names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NvrtcMissing)
    }
}

/// Runs `f`, turning a panic of cudarc's lazy symbol loader into an error.
pub(crate) fn guard<T>(library: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let reason = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked while loading".into());
        Err(CudaError::LibraryUnusable { library, reason })
    })
}

/// The loaded NVRTC's version, e.g. `(13, 0)`.
///
/// ```
/// if let Ok((major, _minor)) = sere_cuda::compile::nvrtc_version() {
///     assert!(major >= 11);
/// }
/// ```
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_available()?;
    guard("NVRTC", || {
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: two valid out-pointers.
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result()?;
        Ok((major, minor))
    })
}

/// The virtual architectures this NVRTC can target, as numbers
/// (`90` for `compute_90`), ascending.
///
/// ```
/// if let Ok(archs) = sere_cuda::compile::supported_archs() {
///     assert!(archs.windows(2).all(|w| w[0] <= w[1]));
/// }
/// ```
pub fn supported_archs() -> Result<Vec<u32>> {
    nvrtc_available()?;
    guard("NVRTC", || {
        let mut n: c_int = 0;
        // SAFETY: valid out-pointer; then a buffer of exactly `n` ints.
        unsafe { cudarc::nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n) }.result()?;
        let mut archs = vec![0 as c_int; n.max(0) as usize];
        if n > 0 {
            unsafe { cudarc::nvrtc::sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }.result()?;
        }
        let mut v: Vec<u32> = archs.into_iter().map(|a| a as u32).collect();
        v.sort_unstable();
        Ok(v)
    })
}

/// The `compute_XX` architecture to compile for on a device of compute
/// capability `major.minor`: the device's own when NVRTC supports it, else
/// the newest older one NVRTC knows (PTX runs on newer GPUs through the
/// driver's JIT).
///
/// ```
/// assert_eq!(sere_cuda::compile::pick_arch((9, 0), &[75, 80, 90, 100]), Some(90));
/// assert_eq!(sere_cuda::compile::pick_arch((12, 1), &[75, 90, 120]), Some(120));
/// assert_eq!(sere_cuda::compile::pick_arch((7, 0), &[75, 90]), None);
/// ```
pub fn pick_arch(cc: (i32, i32), supported: &[u32]) -> Option<u32> {
    let want = (cc.0.max(0) as u32) * 10 + cc.1.max(0) as u32;
    supported.iter().copied().filter(|&a| a <= want).max()
}

/// What NVRTC hands to the driver.
///
/// ```
/// use sere_cuda::compile::KernelFormat;
/// assert_ne!(KernelFormat::Ptx, KernelFormat::Cubin);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelFormat {
    /// PTX for the virtual architecture `compute_XX`; the driver JIT-compiles
    /// it for the GPU. The default: needs a driver at least as new as NVRTC
    /// (a 13.0 driver rejects the PTX ISA 9.2 of NVRTC 13.2).
    Ptx,
    /// SASS for the real architecture `sm_XX`, compiled by NVRTC itself. Used
    /// when NVRTC is newer than the driver (CUDA minor-version compatibility
    /// covers binaries, not PTX).
    Cubin,
}

impl std::fmt::Display for KernelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelFormat::Ptx => "ptx",
            KernelFormat::Cubin => "cubin",
        })
    }
}

/// The format to compile to: PTX unless NVRTC is newer than the driver
/// (`driver_version` as the driver reports it, `1000 * major + 10 * minor`),
/// then CUBIN.
///
/// ```
/// use sere_cuda::compile::{pick_format, KernelFormat};
/// assert_eq!(pick_format((13, 0), 13000), KernelFormat::Ptx);
/// assert_eq!(pick_format((13, 0), 13020), KernelFormat::Ptx);
/// assert_eq!(pick_format((13, 2), 13000), KernelFormat::Cubin);
/// ```
pub fn pick_format(nvrtc: (i32, i32), driver_version: i32) -> KernelFormat {
    let driver = (driver_version / 1000, (driver_version % 1000) / 10);
    if nvrtc > driver {
        KernelFormat::Cubin
    } else {
        KernelFormat::Ptx
    }
}

/// Compiles one kernel file to PTX for `compute_{arch}` (e.g. `arch = 90`),
/// without the cache. Options: `--gpu-architecture=compute_XX`, IEEE
/// division and square root, denormals kept, FMA contraction allowed (the
/// default of nvcc and PyTorch's kernels).
///
/// ```no_run
/// let f = &sere_cuda::compile::KERNEL_FILES[0];
/// let ptx = sere_cuda::compile::compile_ptx(f, 90).unwrap();
/// assert!(ptx.contains(".target sm_90"));
/// ```
pub fn compile_ptx(file: &KernelFile, arch: u32) -> Result<String> {
    compile_ptx_logged(file, arch).map(|(ptx, _log)| ptx)
}

/// [`compile_ptx`], also returning NVRTC's log (its warnings; empty when
/// the source compiled cleanly).
///
/// ```no_run
/// let f = &sere_cuda::compile::KERNEL_FILES[0];
/// let (_ptx, log) = sere_cuda::compile::compile_ptx_logged(f, 90).unwrap();
/// assert!(log.trim().is_empty());
/// ```
pub fn compile_ptx_logged(file: &KernelFile, arch: u32) -> Result<(String, String)> {
    let (image, log) = compile_image(file, arch, KernelFormat::Ptx)?;
    Ok((String::from_utf8_lossy(&image).into_owned(), log))
}

/// Compiles one kernel file with NVRTC to `format` for architecture `arch`
/// (`compute_{arch}` for PTX, `sm_{arch}` for CUBIN); returns the image
/// (PTX text without its NUL, or the CUBIN bytes) and NVRTC's log.
///
/// ```no_run
/// use sere_cuda::compile::{compile_image, KernelFormat, KERNEL_FILES};
/// let (cubin, _log) = compile_image(&KERNEL_FILES[0], 90, KernelFormat::Cubin).unwrap();
/// assert_eq!(&cubin[..4], b"\x7fELF");
/// ```
pub fn compile_image(
    file: &KernelFile,
    arch: u32,
    format: KernelFormat,
) -> Result<(Vec<u8>, String)> {
    nvrtc_available()?;
    let arch_name = match format {
        KernelFormat::Ptx => format!("compute_{arch}"),
        KernelFormat::Cubin => format!("sm_{arch}"),
    };
    guard("NVRTC", || {
        let src = CString::new(file.full_source()).map_err(|_| CudaError::Compile {
            file: file.name,
            arch: arch_name.clone(),
            log: "source contains a NUL byte".into(),
        })?;
        let name = CString::new(file.name).expect("file names have no NUL");
        let prog = cudarc::nvrtc::result::create_program(&src, Some(&name))?;
        let opts = [
            format!("--gpu-architecture={arch_name}"),
            "--std=c++17".to_string(),
            "--ftz=false".to_string(),
            "--prec-div=true".to_string(),
            "--prec-sqrt=true".to_string(),
            "--fmad=true".to_string(),
        ];
        // SAFETY: `prog` is a live program; options are valid C strings.
        let compiled = unsafe { cudarc::nvrtc::result::compile_program(prog, &opts) };
        let log = unsafe { cudarc::nvrtc::result::get_program_log(prog) }
            .map(|raw| c_chars_to_string(&raw))
            .unwrap_or_default();
        let out = match compiled {
            Ok(()) => match format {
                KernelFormat::Ptx => unsafe { cudarc::nvrtc::result::get_ptx(prog) }
                    .map(|raw| c_chars_to_string(&raw).into_bytes())
                    .map_err(CudaError::from),
                KernelFormat::Cubin => get_cubin(prog),
            }
            .map(|image| (image, log)),
            Err(_) => Err(CudaError::Compile {
                file: file.name,
                arch: arch_name.clone(),
                log: log.split_whitespace().collect::<Vec<_>>().join(" "),
            }),
        };
        // SAFETY: destroyed once, after its last use.
        unsafe { cudarc::nvrtc::result::destroy_program(prog) }?;
        out
    })
}

fn get_cubin(prog: cudarc::nvrtc::sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    // SAFETY: a compiled program; a buffer of exactly the reported size.
    unsafe { cudarc::nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size) }.result()?;
    let mut buf = vec![0u8; size];
    unsafe { cudarc::nvrtc::sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }.result()?;
    Ok(buf)
}

fn c_chars_to_string(raw: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

type ImageCache = Mutex<HashMap<(&'static str, u32, KernelFormat), Arc<[u8]>>>;

/// [`compile_image`] through the process-wide cache: each (file,
/// architecture, format) is compiled at most once per process.
///
/// ```no_run
/// use sere_cuda::compile::{cached_image, KernelFormat, KERNEL_FILES};
/// let a = cached_image(&KERNEL_FILES[0], 90, KernelFormat::Ptx).unwrap();
/// let b = cached_image(&KERNEL_FILES[0], 90, KernelFormat::Ptx).unwrap();
/// assert!(std::sync::Arc::ptr_eq(&a, &b));
/// ```
pub fn cached_image(file: &KernelFile, arch: u32, format: KernelFormat) -> Result<Arc<[u8]>> {
    static CACHE: OnceLock<ImageCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (file.name, arch, format);
    if let Some(p) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(p.clone());
    }
    // Compile outside the lock; a concurrent duplicate compile is harmless.
    let (image, _log) = compile_image(file, arch, format)?;
    let image: Arc<[u8]> = image.into();
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    Ok(map.entry(key).or_insert(image).clone())
}
