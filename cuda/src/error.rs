//! The one error type of the crate: every failure (a missing library, no
//! device, a kernel that did not compile, a bad shape) is a [`CudaError`]
//! whose `Display` is one line saying what is wrong.

use cudarc::cublas::result::CublasError;
use cudarc::driver::DriverError;
use cudarc::nvrtc::result::NvrtcError;

/// Why a CUDA operation could not run.
///
/// ```
/// use sere_cuda::CudaError;
/// let e = CudaError::NoDevice { ordinal: 1, count: 1 };
/// assert!(e.to_string().contains("device 1"));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The CUDA driver library (`libcuda.so`) could not be loaded.
    #[error("no NVIDIA driver: libcuda.so could not be loaded (no GPU driver on this machine)")]
    DriverMissing,
    /// The driver loaded but has no device with this ordinal.
    #[error("no CUDA device {ordinal}: the driver reports {count} device(s)")]
    NoDevice {
        /// The requested device ordinal.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// NVRTC (`libnvrtc.so.13`) could not be loaded.
    #[error(
        "NVRTC not found: libnvrtc.so.13 could not be loaded (install the CUDA 13.0 NVRTC, e.g. \
         `pip install nvidia-cuda-nvrtc==13.0.88`, and add its lib/ folder to LD_LIBRARY_PATH)"
    )]
    NvrtcMissing,
    /// cuBLAS (`libcublas.so`) could not be loaded.
    #[error(
        "cuBLAS not found: libcublas.so could not be loaded (install the CUDA cuBLAS library and \
         add its folder to LD_LIBRARY_PATH)"
    )]
    CublasMissing,
    /// A CUDA library loaded but panicked on first use (typically a missing
    /// symbol: a library older than CUDA 13.0).
    #[error("{library} is unusable: {reason}")]
    LibraryUnusable {
        /// Which library.
        library: &'static str,
        /// The loader's message.
        reason: String,
    },
    /// A driver call failed (out of memory, launch failure, ...).
    #[error("CUDA driver error: {0}")]
    Driver(#[from] DriverError),
    /// An NVRTC call failed outside compilation.
    #[error("NVRTC error: {0}")]
    Nvrtc(#[from] NvrtcError),
    /// A kernel source did not compile; `log` is NVRTC's log.
    #[error("NVRTC could not compile {file} for {arch}: {log}")]
    Compile {
        /// The kernel source file (e.g. `softmax.cu`).
        file: &'static str,
        /// The virtual architecture (e.g. `compute_90`).
        arch: String,
        /// NVRTC's compilation log, on one line.
        log: String,
    },
    /// The driver refused a compiled kernel module (e.g. PTX newer than the
    /// driver: CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
    #[error(
        "the driver (CUDA {}.{}) could not load {file} compiled as {format} by NVRTC {}.{}: {source} \
         (set SERE_CUDA_KERNEL_FORMAT=cubin, or use NVRTC 13.0)",
        driver / 1000, (driver % 1000) / 10, nvrtc.0, nvrtc.1
    )]
    ModuleLoad {
        /// The kernel source file.
        file: &'static str,
        /// The format that was loaded.
        format: crate::compile::KernelFormat,
        /// NVRTC's version.
        nvrtc: (i32, i32),
        /// The driver's CUDA version (`1000 * major + 10 * minor`).
        driver: i32,
        /// The driver's error.
        source: DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error: {0}")]
    Cublas(#[from] CublasError),
    /// A buffer length, size or scalar argument is wrong (the same checks as
    /// sere-core, with its error).
    #[error(transparent)]
    Shape(#[from] sere_core::Error),
    /// A buffer belongs to another CUDA context than this [`crate::Gpu`]'s.
    #[error("`{what}` was allocated on another CUDA context than this Gpu's")]
    WrongContext {
        /// Which argument.
        what: &'static str,
    },
    /// A size does not fit the kernels' 32-bit dimensions.
    #[error("`{what}` is too large for the CUDA kernels (each dimension must be below 2^31)")]
    TooLarge {
        /// Which size.
        what: &'static str,
    },
}

/// Result of a sere-cuda operation.
pub type Result<T> = core::result::Result<T, CudaError>;
