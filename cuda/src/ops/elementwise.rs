//! Element-wise operations (kernels/elementwise.cu): GELU, bias add,
//! scaling, AdamW and the teacher EMA (sere-core `activation`, `optim`).

use crate::error::{CudaError, Result};
use crate::gpu::{check_len, launch, product, unit, Gpu, K};
use cudarc::driver::{DevicePtr, DevicePtrMut};
use sere_core::optim::AdamW;

impl Gpu {
    /// Element-wise GELU (erf form, sere-core `gelu_forward`):
    /// `out[i] = gelu(x[i])`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let x = gpu.upload(&[0.0, 10.0]).unwrap();
    /// let mut y = gpu.zeros(2).unwrap();
    /// gpu.gelu_forward(&x, &mut y).unwrap();
    /// assert_eq!(gpu.download(&y).unwrap(), vec![0.0, 10.0]);
    /// ```
    pub fn gelu_forward(
        &self,
        x: &impl DevicePtr<f32>,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = x.len();
        let (xp, _g1) = self.rd("x", x, n)?;
        let (yp, _g2) = self.wr("out", out, n)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        launch!(self, K::GeluFwd, self.elems_cfg(n), xp, yp, n_i)
    }

    /// Backward of [`Gpu::gelu_forward`]: adds `dy * gelu'(x)` to `dx`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let (x, dy) = (gpu.upload(&[0.0]).unwrap(), gpu.upload(&[2.0]).unwrap());
    /// let mut dx = gpu.upload(&[1.0]).unwrap();
    /// gpu.gelu_backward(&x, &dy, &mut dx).unwrap();
    /// assert!((gpu.download(&dx).unwrap()[0] - 2.0).abs() < 1e-6);
    /// ```
    pub fn gelu_backward(
        &self,
        x: &impl DevicePtr<f32>,
        dy: &impl DevicePtr<f32>,
        dx: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        let n = x.len();
        let (xp, _g1) = self.rd("x", x, n)?;
        let (dyp, _g2) = self.rd("dy", dy, n)?;
        let (dxp, _g3) = self.wr("dx", dx, n)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        launch!(self, K::GeluBwd, self.elems_cfg(n), xp, dyp, dxp, n_i)
    }

    /// Adds `bias` (length `cols`) to every row of `y` (`rows x cols`).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut y = gpu.zeros(4).unwrap();
    /// let b = gpu.upload(&[1.0, 2.0]).unwrap();
    /// gpu.bias_add(&mut y, &b, 2, 2).unwrap();
    /// assert_eq!(gpu.download(&y).unwrap(), vec![1.0, 2.0, 1.0, 2.0]);
    /// ```
    pub fn bias_add(
        &self,
        y: &mut impl DevicePtrMut<f32>,
        bias: &impl DevicePtr<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        let n = product("rows x cols", &[rows, cols])?;
        let cols_i = crate::gpu::dim("cols", cols)?;
        crate::gpu::dim("rows", rows)?;
        let (yp, _g1) = self.wr("y", y, n)?;
        let (bp, _g2) = self.rd("bias", bias, cols)?;
        let n_i = n as i64;
        launch!(self, K::BiasAdd, self.elems_cfg(n), yp, bp, n_i, cols_i)
    }

    /// `x *= alpha`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut x = gpu.upload(&[1.0, 2.0]).unwrap();
    /// gpu.scale(&mut x, 0.5).unwrap();
    /// assert_eq!(gpu.download(&x).unwrap(), vec![0.5, 1.0]);
    /// ```
    pub fn scale(&self, x: &mut impl DevicePtrMut<f32>, alpha: f32) -> Result<()> {
        let n = x.len();
        let (xp, _g) = self.wr("x", x, n)?;
        if n == 0 {
            return Ok(());
        }
        let (n_i, null) = (n as i64, 0u64);
        launch!(
            self,
            K::ScaleInplace,
            self.elems_cfg(n),
            xp,
            n_i,
            alpha,
            null
        )
    }

    /// `x *= factor[0]`, the factor read on the device (e.g. the clipping
    /// factor of [`Gpu::grad_clip_factor`]).
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut x = gpu.upload(&[1.0, 2.0]).unwrap();
    /// let f = gpu.upload(&[3.0]).unwrap();
    /// gpu.scale_by(&mut x, &f).unwrap();
    /// assert_eq!(gpu.download(&x).unwrap(), vec![3.0, 6.0]);
    /// ```
    pub fn scale_by(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        factor: &impl DevicePtr<f32>,
    ) -> Result<()> {
        let n = x.len();
        let (xp, _g1) = self.wr("x", x, n)?;
        let (fp, _g2) = self.rd("factor", factor, 1)?;
        if n == 0 {
            return Ok(());
        }
        let (n_i, one) = (n as i64, 1.0f32);
        launch!(self, K::ScaleInplace, self.elems_cfg(n), xp, n_i, one, fp)
    }

    /// `y += alpha * x`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut y = gpu.upload(&[1.0]).unwrap();
    /// let x = gpu.upload(&[2.0]).unwrap();
    /// gpu.axpy(&mut y, &x, 0.5).unwrap();
    /// assert_eq!(gpu.download(&y).unwrap(), vec![2.0]);
    /// ```
    pub fn axpy(
        &self,
        y: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<f32>,
        alpha: f32,
    ) -> Result<()> {
        let n = y.len();
        let (yp, _g1) = self.wr("y", y, n)?;
        let (xp, _g2) = self.rd("x", x, n)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        launch!(self, K::Axpy, self.elems_cfg(n), yp, xp, n_i, alpha)
    }

    /// One AdamW step (the `step`-th, from 1) exactly as sere-core
    /// `adamw_step` / `torch.optim.AdamW`.
    ///
    /// ```no_run
    /// use sere_core::optim::AdamW;
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let (mut p, g) = (gpu.upload(&[1.0]).unwrap(), gpu.upload(&[0.5]).unwrap());
    /// let (mut m, mut v) = (gpu.zeros(1).unwrap(), gpu.zeros(1).unwrap());
    /// let opt = AdamW { lr: 0.1, weight_decay: 0.0, ..AdamW::default() };
    /// gpu.adamw_step(&mut p, &g, &mut m, &mut v, &opt, 1).unwrap();
    /// assert!((gpu.download(&p).unwrap()[0] - 0.9).abs() < 1e-6);
    /// ```
    pub fn adamw_step(
        &self,
        params: &mut impl DevicePtrMut<f32>,
        grads: &impl DevicePtr<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        opt: &AdamW,
        step: u32,
    ) -> Result<()> {
        self.adamw_impl(
            params,
            grads,
            m,
            v,
            opt,
            step,
            None::<&cudarc::driver::CudaSlice<f32>>,
        )
    }

    /// [`Gpu::adamw_step`] with the gradient multiplied by `grad_factor[0]`
    /// (a device scalar, e.g. from [`Gpu::grad_clip_factor`]): clipping
    /// without a host round trip or an extra pass over the gradient.
    ///
    /// ```no_run
    /// use sere_core::optim::AdamW;
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let (mut p, g) = (gpu.upload(&[1.0]).unwrap(), gpu.upload(&[0.5]).unwrap());
    /// let (mut m, mut v) = (gpu.zeros(1).unwrap(), gpu.zeros(1).unwrap());
    /// let f = gpu.upload(&[0.5]).unwrap();
    /// gpu.adamw_step_scaled(&mut p, &g, &mut m, &mut v, &AdamW::default(), 1, &f).unwrap();
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step_scaled(
        &self,
        params: &mut impl DevicePtrMut<f32>,
        grads: &impl DevicePtr<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        opt: &AdamW,
        step: u32,
        grad_factor: &impl DevicePtr<f32>,
    ) -> Result<()> {
        self.adamw_impl(params, grads, m, v, opt, step, Some(grad_factor))
    }

    #[allow(clippy::too_many_arguments)]
    fn adamw_impl<F: DevicePtr<f32>>(
        &self,
        params: &mut impl DevicePtrMut<f32>,
        grads: &impl DevicePtr<f32>,
        m: &mut impl DevicePtrMut<f32>,
        v: &mut impl DevicePtrMut<f32>,
        opt: &AdamW,
        step: u32,
        factor: Option<&F>,
    ) -> Result<()> {
        let n = params.len();
        check_len("grads", grads.len(), n)?;
        check_len("m", m.len(), n)?;
        check_len("v", v.len(), n)?;
        if step == 0 {
            return Err(sere_core::Error::InvalidArgument {
                what: "step",
                requirement: "counts from 1",
            }
            .into());
        }
        let ok = |b: f32| (0.0..1.0).contains(&b);
        if !(ok(opt.beta1) && ok(opt.beta2)) {
            return Err(sere_core::Error::InvalidArgument {
                what: "betas",
                requirement: "must be in [0, 1)",
            }
            .into());
        }
        if !(opt.lr.is_finite() && opt.eps.is_finite() && opt.weight_decay.is_finite()) {
            return Err(CudaError::Shape(sere_core::Error::NonFinite {
                what: "AdamW hyper-parameters",
            }));
        }
        // The step's scalars, computed on the host as sere-core does.
        let t = step as f32;
        let bc1 = 1.0 - opt.beta1.powf(t);
        let bc2_sqrt = (1.0 - opt.beta2.powf(t)).sqrt();
        let step_size = opt.lr / bc1;
        let decay = 1.0 - opt.lr * opt.weight_decay;
        let (b1, b2, eps) = (opt.beta1, opt.beta2, opt.eps);
        let (omb1, omb2) = (1.0 - b1, 1.0 - b2);
        let (pp, _g1) = self.wr("params", params, n)?;
        let (gp, _g2) = self.rd("grads", grads, n)?;
        let (mp, _g3) = self.wr("m", m, n)?;
        let (vp, _g4) = self.wr("v", v, n)?;
        let (fp, _g5) = match factor {
            Some(f) => {
                let (p, g) = self.rd("grad_factor", f, 1)?;
                (p, Some(g))
            }
            None => (0u64, None),
        };
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        launch!(
            self,
            K::AdamW,
            self.elems_cfg(n),
            pp,
            gp,
            mp,
            vp,
            n_i,
            b1,
            b2,
            omb1,
            omb2,
            eps,
            step_size,
            decay,
            bc2_sqrt,
            fp
        )
    }

    /// Teacher EMA (sere-core `ema_update`):
    /// `teacher = momentum * teacher + (1 - momentum) * student`.
    ///
    /// ```no_run
    /// let gpu = sere_cuda::Gpu::new(0).unwrap();
    /// let mut t = gpu.upload(&[1.0, 0.0]).unwrap();
    /// let s = gpu.upload(&[0.0, 1.0]).unwrap();
    /// gpu.ema_update(&mut t, &s, 0.75).unwrap();
    /// assert_eq!(gpu.download(&t).unwrap(), vec![0.75, 0.25]);
    /// ```
    pub fn ema_update(
        &self,
        teacher: &mut impl DevicePtrMut<f32>,
        student: &impl DevicePtr<f32>,
        momentum: f32,
    ) -> Result<()> {
        let n = teacher.len();
        check_len("student", student.len(), n)?;
        unit("momentum", momentum)?;
        let (tp, _g1) = self.wr("teacher", teacher, n)?;
        let (sp, _g2) = self.rd("student", student, n)?;
        if n == 0 {
            return Ok(());
        }
        let (n_i, w) = (n as i64, 1.0 - momentum);
        launch!(self, K::Ema, self.elems_cfg(n), tp, sp, n_i, momentum, w)
    }
}
