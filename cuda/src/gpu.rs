//! [`Gpu`]: one CUDA device ready to run the kernels (context, stream,
//! cuBLAS handle, loaded modules), [`probe`] and [`DeviceInfo`].

use crate::compile::{self, guard, KernelFormat, KERNEL_FILES};
use crate::error::{CudaError, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig,
    SyncOnDrop,
};
use std::ffi::c_int;
use std::sync::Arc;

/// What [`probe`] found: the device and the libraries the kernels need.
///
/// ```
/// // Without a GPU, probe() says why instead of returning a DeviceInfo.
/// match sere_cuda::probe() {
///     Ok(info) => assert!(info.compute_capability.0 >= 5),
///     Err(e) => assert!(!e.to_string().is_empty()),
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Device name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability `(major, minor)`, e.g. `(9, 0)`.
    pub compute_capability: (i32, i32),
    /// Device memory in bytes.
    pub total_memory: usize,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Driver's CUDA version as `1000 * major + 10 * minor` (13000 = 13.0).
    pub driver_version: i32,
    /// NVRTC's version `(major, minor)`.
    pub nvrtc_version: (i32, i32),
    /// The architecture the kernels are compiled for (`90`: `compute_90`
    /// PTX or `sm_90` CUBIN).
    pub arch: u32,
    /// What NVRTC produces for the driver: PTX, or CUBIN when NVRTC is newer
    /// than the driver ([`compile::pick_format`]); the environment variable
    /// `SERE_CUDA_KERNEL_FORMAT=ptx|cubin` overrides the choice.
    pub kernel_format: KernelFormat,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} {} (sm_{}{}, {} SMs, {:.1} GiB), driver CUDA {}.{}, NVRTC {}.{}, kernels {} for {}_{}",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10,
            self.nvrtc_version.0,
            self.nvrtc_version.1,
            self.kernel_format,
            match self.kernel_format {
                KernelFormat::Ptx => "compute",
                KernelFormat::Cubin => "sm",
            },
            self.arch
        )
    }
}

/// Checks, without creating a context or compiling anything, that device 0
/// and every library the kernels need (driver, NVRTC, cuBLAS) are there.
/// The error is one line saying what is missing; this is what the host
/// calls before offering `--device cuda`.
///
/// ```
/// if let Err(e) = sere_cuda::probe() {
///     println!("CUDA unavailable: {e}");
/// }
/// ```
pub fn probe() -> Result<DeviceInfo> {
    probe_device(0)
}

/// [`probe`] for device `ordinal`.
///
/// ```
/// let _ = sere_cuda::probe_device(0);
/// ```
pub fn probe_device(ordinal: usize) -> Result<DeviceInfo> {
    use cudarc::driver::{result, sys};
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { sys::is_culib_present() } {
        return Err(CudaError::DriverMissing);
    }
    let (name, cc, total_memory, sms, driver_version) = guard("the CUDA driver", || {
        match result::init() {
            Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => {
                return Err(CudaError::NoDevice { ordinal, count: 0 })
            }
            r => r?,
        }
        let count = result::device::get_count()?.max(0) as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let dev = result::device::get(ordinal as c_int)?;
        let name = result::device::get_name(dev)?;
        use sys::CUdevice_attribute_enum as A;
        // SAFETY: `dev` is a valid device handle from cuDeviceGet.
        let (major, minor, sms, mem) = unsafe {
            (
                result::device::get_attribute(
                    dev,
                    A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                )?,
                result::device::get_attribute(
                    dev,
                    A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                )?,
                result::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
                result::device::total_mem(dev)?,
            )
        };
        let mut version: c_int = 0;
        // SAFETY: valid out-pointer.
        unsafe { sys::cuDriverGetVersion(&mut version) }.result()?;
        Ok((name, (major, minor), mem, sms.max(0) as u32, version))
    })?;
    let nvrtc_version = compile::nvrtc_version()?;
    let archs = compile::supported_archs()?;
    let arch = compile::pick_arch(cc, &archs).ok_or_else(|| CudaError::Compile {
        file: "(all)",
        arch: format!("sm_{}{}", cc.0, cc.1),
        log: format!(
            "NVRTC {}.{} supports compute_{:?}, none at or below this device",
            nvrtc_version.0, nvrtc_version.1, archs
        ),
    })?;
    // SAFETY: only tries to dlopen the candidate library names.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(CudaError::CublasMissing);
    }
    let kernel_format = match std::env::var("SERE_CUDA_KERNEL_FORMAT").as_deref() {
        Ok("ptx") => KernelFormat::Ptx,
        Ok("cubin") => KernelFormat::Cubin,
        _ => compile::pick_format(nvrtc_version, driver_version),
    };
    Ok(DeviceInfo {
        ordinal,
        name,
        compute_capability: cc,
        total_memory,
        multiprocessors: sms,
        driver_version,
        nvrtc_version,
        arch,
        kernel_format,
    })
}

/// The kernels the crate launches; `K::ALL[i] as usize == i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum K {
    GridSampleFwd,
    GridSampleBwd,
    GridSampleFwdIdx,
    GridSampleBwdIdx,
    SoftmaxFwd,
    SoftmaxBwd,
    LogSoftmaxBwd,
    RelationCe,
    DinoTeacherStats,
    DinoStudentRows,
    LayerNormFwd,
    LayerNormBwdDx,
    BatchNormApply,
    BatchNormBwdDx,
    BatchNormRunning,
    SumPartial,
    SumFinish,
    ColPartial,
    ColFinish,
    GeluFwd,
    GeluBwd,
    BiasAdd,
    ScaleInplace,
    Axpy,
    AdamW,
    Ema,
    Im2col,
    CopyRows,
    KeepScaleAdd,
    ReluInplace,
    ReluBwdMask,
    L2NormalizeRows,
    L2NormalizeRowsBwd,
    WeightedCeRows,
    TeacherEntropyRows,
    RowDotAdd,
}

impl K {
    pub(crate) const ALL: [K; 36] = [
        K::GridSampleFwd,
        K::GridSampleBwd,
        K::GridSampleFwdIdx,
        K::GridSampleBwdIdx,
        K::SoftmaxFwd,
        K::SoftmaxBwd,
        K::LogSoftmaxBwd,
        K::RelationCe,
        K::DinoTeacherStats,
        K::DinoStudentRows,
        K::LayerNormFwd,
        K::LayerNormBwdDx,
        K::BatchNormApply,
        K::BatchNormBwdDx,
        K::BatchNormRunning,
        K::SumPartial,
        K::SumFinish,
        K::ColPartial,
        K::ColFinish,
        K::GeluFwd,
        K::GeluBwd,
        K::BiasAdd,
        K::ScaleInplace,
        K::Axpy,
        K::AdamW,
        K::Ema,
        K::Im2col,
        K::CopyRows,
        K::KeepScaleAdd,
        K::ReluInplace,
        K::ReluBwdMask,
        K::L2NormalizeRows,
        K::L2NormalizeRowsBwd,
        K::WeightedCeRows,
        K::TeacherEntropyRows,
        K::RowDotAdd,
    ];

    /// The `extern "C"` name in the kernel sources.
    pub(crate) fn entry(self) -> &'static str {
        match self {
            K::GridSampleFwd => "grid_sample_fwd",
            K::GridSampleBwd => "grid_sample_bwd",
            K::GridSampleFwdIdx => "grid_sample_fwd_idx",
            K::GridSampleBwdIdx => "grid_sample_bwd_idx",
            K::SoftmaxFwd => "softmax_rows_fwd",
            K::SoftmaxBwd => "softmax_rows_bwd",
            K::LogSoftmaxBwd => "log_softmax_rows_bwd",
            K::RelationCe => "relation_ce_rows",
            K::DinoTeacherStats => "dino_teacher_stats",
            K::DinoStudentRows => "dino_student_rows",
            K::LayerNormFwd => "layer_norm_fwd",
            K::LayerNormBwdDx => "layer_norm_bwd_dx",
            K::BatchNormApply => "batch_norm_apply",
            K::BatchNormBwdDx => "batch_norm_bwd_dx",
            K::BatchNormRunning => "batch_norm_running",
            K::SumPartial => "sum_partial",
            K::SumFinish => "sum_finish",
            K::ColPartial => "col_partial",
            K::ColFinish => "col_finish",
            K::GeluFwd => "gelu_fwd",
            K::GeluBwd => "gelu_bwd",
            K::BiasAdd => "bias_add",
            K::ScaleInplace => "scale_inplace",
            K::Axpy => "axpy",
            K::AdamW => "adamw_step",
            K::Ema => "ema_update",
            K::Im2col => "im2col_patches",
            K::CopyRows => "copy_rows",
            K::KeepScaleAdd => "keep_scale_add",
            K::ReluInplace => "relu_inplace",
            K::ReluBwdMask => "relu_bwd_mask",
            K::L2NormalizeRows => "l2_normalize_rows",
            K::L2NormalizeRowsBwd => "l2_normalize_rows_bwd",
            K::WeightedCeRows => "weighted_ce_rows",
            K::TeacherEntropyRows => "teacher_entropy_rows",
            K::RowDotAdd => "row_dot_add",
        }
    }
}

/// One CUDA device with everything the kernels need: the (primary) context,
/// its default stream (every method enqueues on it, in order), a cuBLAS
/// handle on that stream in full-FP32 math mode, and the kernel modules
/// (NVRTC-compiled once per process, loaded once per `Gpu`).
///
/// A `Gpu` is `Send + Sync`; its cuBLAS handle sits behind a mutex (cuBLAS
/// handles are not for simultaneous use), and all work goes to one stream,
/// so calls from several threads are serialised on the device.
///
/// Methods take device buffers as `&impl DevicePtr<f32>` (inputs) and
/// `&mut impl DevicePtrMut<f32>` (outputs): a [`CudaSlice<f32>`] or a view
/// of one (`slice(..)`, `slice_mut(..)`). They check every length (a
/// mismatch is [`CudaError::Shape`], as in sere-core), enqueue the work and
/// return without waiting; [`Gpu::download`] and [`Gpu::synchronize`] wait.
/// As in sere-core, forward methods overwrite their outputs and backward
/// methods add into their gradient buffers.
///
/// Non-finite inputs are not reported per call (that would cost a
/// device-to-host round trip per kernel): NaN propagates to the losses and
/// norms, which the caller reads and checks.
///
/// ```no_run
/// use sere_cuda::Gpu;
/// let gpu = Gpu::new(0).unwrap_or_else(|e| panic!("{e}"));
/// let x = gpu.upload(&[1.0, 2.0, 3.0]).unwrap();
/// let mut y = gpu.zeros(3).unwrap();
/// gpu.softmax_rows(&x, 1, 3, &mut y).unwrap();
/// let p = gpu.download(&y).unwrap();
/// assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
/// ```
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: std::sync::Mutex<CudaBlas>,
    funcs: Vec<CudaFunction>,
    info: DeviceInfo,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`: checks the driver, the device, NVRTC and
    /// cuBLAS ([`probe_device`]), creates the context, stream and cuBLAS
    /// handle, and compiles (once per process) and loads the kernels. The
    /// error is one line saying what is missing.
    ///
    /// ```
    /// match sere_cuda::Gpu::new(0) {
    ///     Ok(gpu) => println!("{}", gpu.info()),
    ///     Err(e) => println!("skipped: {e}"),
    /// }
    /// ```
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let info = probe_device(ordinal)?;
        let ctx = guard("the CUDA driver", || Ok(CudaContext::new(ordinal)?))?;
        let stream = ctx.default_stream();
        let blas = guard("cuBLAS", || {
            let blas = CudaBlas::new(stream.clone())?;
            // Full FP32 (no TF32): the relation GEMMs match sere-core to 1e-5.
            // SAFETY: a live handle and a valid math mode.
            unsafe {
                cudarc::cublas::sys::cublasSetMathMode(
                    *blas.handle(),
                    cudarc::cublas::sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
                )
            }
            .result()?;
            Ok(blas)
        })?;
        let mut modules = Vec::with_capacity(KERNEL_FILES.len());
        for file in KERNEL_FILES {
            let image = compile::cached_image(file, info.arch, info.kernel_format)?;
            let image = match info.kernel_format {
                KernelFormat::Ptx => {
                    cudarc::nvrtc::Ptx::from_src(String::from_utf8_lossy(&image).into_owned())
                }
                KernelFormat::Cubin => cudarc::nvrtc::Ptx::from_binary(image.to_vec()),
            };
            let module = ctx.load_module(image).map_err(|e| CudaError::ModuleLoad {
                file: file.name,
                format: info.kernel_format,
                nvrtc: info.nvrtc_version,
                driver: info.driver_version,
                source: e,
            })?;
            modules.push((file, module));
        }
        let mut funcs = Vec::with_capacity(K::ALL.len());
        for k in K::ALL {
            let (_, module) = modules
                .iter()
                .find(|(f, _)| f.entries.contains(&k.entry()))
                .expect("every kernel is listed in KERNEL_FILES (unit-tested)");
            funcs.push(module.load_function(k.entry())?);
        }
        Ok(Gpu {
            ctx,
            stream,
            blas: std::sync::Mutex::new(blas),
            funcs,
            info,
        })
    }

    /// The device and libraries in use.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// assert_eq!(gpu.info().ordinal, 0);
    /// ```
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The CUDA context (for allocations or streams of the caller's own).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let _ctx = gpu.context().clone();
    /// ```
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every method enqueues on.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let buf = gpu.stream().alloc_zeros::<f32>(4).unwrap();
    /// assert_eq!(buf.len(), 4);
    /// ```
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Lets cuBLAS use TF32 tensor cores for the f32 GEMMs (about 1e-3
    /// relative error instead of 1e-6; faster on Ampere and later). Off by
    /// default, and off for the parity tests.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// gpu.set_tf32(false).unwrap();
    /// ```
    pub fn set_tf32(&self, on: bool) -> Result<()> {
        use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode};
        let mode = if on {
            cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        let blas = self.blas.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: a live handle and a valid math mode.
        unsafe { cublasSetMathMode(*blas.handle(), mode) }.result()?;
        Ok(())
    }

    /// Waits until every enqueued operation has finished; reports a kernel
    /// fault that happened in between.
    ///
    /// ```no_run
    /// sere_cuda::Gpu::new(0).unwrap().synchronize().unwrap();
    /// ```
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// Copies `host` into a new device buffer.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// assert_eq!(gpu.upload(&[1.0, 2.0]).unwrap().len(), 2);
    /// ```
    pub fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        Ok(self.stream.clone_htod(host)?)
    }

    /// Copies `host` into an existing device buffer of the same length.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut d = gpu.zeros(2).unwrap();
    /// gpu.upload_into(&[1.0, 2.0], &mut d).unwrap();
    /// ```
    pub fn upload_into(&self, host: &[f32], dst: &mut impl DevicePtrMut<f32>) -> Result<()> {
        self.same_ctx("dst", dst.stream())?;
        check_len("dst", dst.len(), host.len())?;
        self.stream.memcpy_htod(host, dst)?;
        Ok(())
    }

    /// Waits for the stream and copies a device buffer (or view) to the host.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let d = gpu.upload(&[1.0, 2.0]).unwrap();
    /// assert_eq!(gpu.download(&d).unwrap(), vec![1.0, 2.0]);
    /// ```
    pub fn download(&self, src: &impl DevicePtr<f32>) -> Result<Vec<f32>> {
        self.same_ctx("src", src.stream())?;
        let v = self.stream.clone_dtoh(src)?;
        self.stream.synchronize()?;
        Ok(v)
    }

    /// A new zero-filled device buffer of `len` elements.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// assert_eq!(gpu.download(&gpu.zeros(3).unwrap()).unwrap(), vec![0.0; 3]);
    /// ```
    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        Ok(self.stream.alloc_zeros::<f32>(len)?)
    }

    /// Sets every element of a device buffer (or view) to zero.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut d = gpu.upload(&[1.0]).unwrap();
    /// gpu.fill_zero(&mut d).unwrap();
    /// ```
    pub fn fill_zero(&self, dst: &mut impl DevicePtrMut<f32>) -> Result<()> {
        self.same_ctx("dst", dst.stream())?;
        self.stream.memset_zeros(dst)?;
        Ok(())
    }

    // ---- internal helpers -------------------------------------------------

    pub(crate) fn func(&self, k: K) -> &CudaFunction {
        &self.funcs[k as usize]
    }

    pub(crate) fn same_ctx(&self, what: &'static str, s: &Arc<CudaStream>) -> Result<()> {
        if s.context().cu_ctx() == self.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(CudaError::WrongContext { what })
        }
    }

    /// Device pointer of an input of `len` elements (checked), with the
    /// guard that records the read when dropped after the launch.
    pub(crate) fn rd<'a, B: DevicePtr<T>, T>(
        &'a self,
        what: &'static str,
        b: &'a B,
        len: usize,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        self.same_ctx(what, b.stream())?;
        check_len(what, b.len(), len)?;
        Ok(b.device_ptr(&self.stream))
    }

    /// Device pointer of an output of `len` elements (checked).
    pub(crate) fn wr<'a, B: DevicePtrMut<T>, T>(
        &'a self,
        what: &'static str,
        b: &'a mut B,
        len: usize,
    ) -> Result<(u64, SyncOnDrop<'a>)> {
        self.same_ctx(what, b.stream())?;
        check_len(what, b.len(), len)?;
        Ok(b.device_ptr_mut(&self.stream))
    }

    pub(crate) fn sm_count(&self) -> usize {
        self.info.multiprocessors.max(1) as usize
    }

    /// Launch configuration of the element-wise (grid-stride) kernels.
    pub(crate) fn elems_cfg(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.sm_count() * 16);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Launch configuration of the row kernels (see kernels/common.cuh):
/// `tpr` threads per row, a power of two in 32..=1024 with about 4 elements
/// per thread, and `256 / tpr` rows per block.
///
/// ```
/// let c = sere_cuda::row_launch_config(10, 197);
/// assert_eq!(c.block_dim, (64, 4, 1));
/// assert_eq!(c.grid_dim.0, 3);
/// let c = sere_cuda::row_launch_config(3, 65536);
/// assert_eq!((c.block_dim, c.grid_dim.0), ((1024, 1, 1), 3));
/// ```
pub fn row_launch_config(rows: usize, cols: usize) -> LaunchConfig {
    let tpr = cols.div_ceil(4).next_power_of_two().clamp(32, 1024);
    let rpb = (256 / tpr).max(1);
    LaunchConfig {
        grid_dim: (rows.div_ceil(rpb).max(1) as u32, 1, 1),
        block_dim: (tpr as u32, rpb as u32, 1),
        shared_mem_bytes: 0,
    }
}

/// A length check with sere-core's error.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(sere_core::Error::ShapeMismatch {
            what,
            expected,
            got,
        }
        .into())
    }
}

/// A size that must be at least 1, as a kernel `int`.
pub(crate) fn dim(what: &'static str, n: usize) -> Result<i32> {
    if n == 0 {
        return Err(sere_core::Error::InvalidArgument {
            what,
            requirement: "must be at least 1",
        }
        .into());
    }
    i32::try_from(n).map_err(|_| CudaError::TooLarge { what })
}

/// Product of sizes, overflow-checked (an overflow is a shape error).
pub(crate) fn product(what: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d).ok_or(CudaError::TooLarge { what })
    })
}

/// A temperature or scale that must be finite and > 0.
pub(crate) fn positive(what: &'static str, v: f32) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(sere_core::Error::InvalidArgument {
            what,
            requirement: "must be finite and > 0",
        }
        .into())
    }
}

/// A momentum that must lie in [0, 1].
pub(crate) fn unit(what: &'static str, v: f32) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(sere_core::Error::InvalidArgument {
            what,
            requirement: "must be in [0, 1]",
        }
        .into())
    }
}

/// Enqueues kernel `$k` with the given launch configuration and arguments
/// (local variables: device pointers as `u64`, sizes as `i32`/`i64`,
/// scalars as `f32`/`f64`), in the order of the CUDA signature.
macro_rules! launch {
    ($gpu:expr, $k:expr, $cfg:expr, $($arg:ident),* $(,)?) => {{
        use cudarc::driver::PushKernelArg;
        let mut builder = $gpu.stream.launch_builder($gpu.func($k));
        $( builder.arg(&$arg); )*
        // SAFETY: the arguments match the kernel's C signature in type and
        // order (see the kernel sources), every pointer comes from a buffer
        // whose length was checked against the sizes passed, and the guards
        // of those pointers outlive the launch.
        unsafe { builder.launch($cfg) }
            .map(|_| ())
            .map_err($crate::error::CudaError::from)
    }};
}
pub(crate) use launch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_table_is_complete_and_ordered() {
        for (i, k) in K::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "K::ALL out of order at {k:?}");
            assert!(
                KERNEL_FILES.iter().any(|f| f.entries.contains(&k.entry())),
                "{} is not in KERNEL_FILES",
                k.entry()
            );
        }
        let listed: usize = KERNEL_FILES.iter().map(|f| f.entries.len()).sum();
        assert_eq!(
            listed,
            K::ALL.len(),
            "KERNEL_FILES lists kernels K does not"
        );
        for f in KERNEL_FILES {
            for e in f.entries {
                let decl = format!("void {e}(");
                assert!(f.source.contains(&decl), "{} does not define {e}", f.name);
            }
        }
    }

    #[test]
    fn gpu_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Gpu>();
    }

    #[test]
    fn row_config_covers_every_row() {
        for rows in [1usize, 7, 8, 9, 1000] {
            for cols in [1usize, 31, 32, 33, 128, 129, 197, 1000, 4097, 70000] {
                let c = row_launch_config(rows, cols);
                let (tx, ty, _) = c.block_dim;
                assert!(tx.is_power_of_two() && (32..=1024).contains(&tx));
                assert!(tx * ty <= 1024 && tx * ty >= 32);
                assert!(c.grid_dim.0 as usize * ty as usize >= rows);
            }
        }
    }
}
