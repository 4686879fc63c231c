//! A branch-free `exp` for the softmax-shaped kernels, written so that LLVM
//! vectorises the loops that call it (libm's `expf` is a scalar call and took
//! about 6% of a CPU training step).
//!
//! Cody-Waite range reduction `x = n ln2 + r`, `|r| <= ln2 / 2`, and Cephes'
//! degree-6 polynomial for `exp(r)`: relative error below 2e-7 over the
//! whole range. Inputs below -87.3 give 0 (libm gives a subnormal there);
//! inputs are clamped at 88.3, just below `f32` overflow. Callers check for
//! NaN before calling.

/// `e^x` for finite `x` (see the module docs for accuracy).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let under = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    // Round to nearest without a libm call: the magic-number trick. Adding
    // 1.5 * 2^23 leaves `n` in the low mantissa bits of `shifted`.
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // `2^n` from those bits with integer lane ops: `n as i32` would be a
    // saturating conversion, which LLVM scalarises lane by lane.
    let n_int = shifted.to_bits().wrapping_sub(MAGIC.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    if under {
        0.0
    } else {
        e * scale
    }
}

/// `erf(x)` with absolute error below 1e-6 (Abramowitz & Stegun 7.1.26 on
/// `|x|`, odd extension), branch-free apart from the sign so GELU loops
/// vectorise. The absolute error bound is what GELU needs: its error is
/// `|x| / 2` times this, i.e. relative 1e-6 of `gelu(x)` (measured 6.6e-7).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    erf_and_gauss(x).0
}

/// `(erf(x), e^(-x^2))`: the Gaussian factor is part of the erf formula, and
/// GELU's derivative needs it too (`e^(-x^2/2)` at `x / sqrt 2`), so callers
/// that need both pay for one `exp`.
#[inline(always)]
pub(crate) fn erf_and_gauss(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let gauss = exp(-ax * ax);
    let y = 1.0 - poly * gauss;
    (y.copysign(x), gauss)
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_libm_to_2e7_relative() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        assert_eq!(super::exp(-100.0), 0.0);
        assert!(super::exp(88.3).is_finite());
        assert_eq!(super::exp(0.0), 1.0);
    }

    #[test]
    fn erf_matches_libm_to_1e6_absolute() {
        let mut worst = 0.0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let (a, b) = (super::erf(x) as f64, libm::erf(x as f64));
            worst = worst.max((a - b).abs());
            x += 0.000_71;
        }
        assert!(worst < 1e-6, "worst absolute error {worst:e}");
        assert!(super::erf(0.0).abs() < 1e-6);
        assert_eq!(super::erf(10.0), 1.0);
    }
}
