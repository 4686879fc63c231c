//! Element-wise tolerance checks. Each returns `Ok(())` or an `Err` naming
//! the check, how many elements failed and the worst one (index, got, want,
//! its error and its bound). NaN, in the result or in the bound, fails.

/// The worst failing element seen so far.
struct Worst {
    bad: usize,
    /// `(ratio of the error to its bound, message)`.
    worst: Option<(f64, String)>,
}

impl Worst {
    fn new() -> Self {
        Worst {
            bad: 0,
            worst: None,
        }
    }

    /// Records element `i` that failed, its values widened to f64.
    fn fail(&mut self, i: usize, got: f64, want: f64, err: f64, bound: f64) {
        self.bad += 1;
        let ratio = if err.is_nan() || bound.is_nan() {
            f64::INFINITY
        } else {
            err / bound.max(f64::MIN_POSITIVE)
        };
        if self.worst.as_ref().is_none_or(|(r, _)| ratio > *r) {
            self.worst = Some((
                ratio,
                format!("[{i}]: got {got:e}, want {want:e}, |got - want| {err:.3e} > {bound:.3e}"),
            ));
        }
    }

    fn finish(self, what: &str, len: usize) -> Result<(), String> {
        match self.worst {
            None => Ok(()),
            Some((_, at)) => Err(format!(
                "{what}: {} of {len} elements out of tolerance; worst {at}",
                self.bad
            )),
        }
    }
}

fn lengths(what: &str, got: usize, want: usize) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: length {got} != reference length {want}"))
    }
}

/// Element-wise `|got - want| <= bound(want)` in f64.
///
/// ```
/// use sere_testkit::check_bound;
///
/// let err = check_bound("x", &[1.0, 2.5], &[1.0, 2.0], |w| 0.1 * w.abs()).unwrap_err();
/// assert!(err.contains("1 of 2 elements") && err.contains("[1]"), "{err}");
/// ```
pub fn check_bound(
    what: &str,
    got: &[f64],
    want: &[f64],
    bound: impl Fn(f64) -> f64,
) -> Result<(), String> {
    lengths(what, got.len(), want.len())?;
    let mut worst = Worst::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (err, lim) = ((g - w).abs(), bound(w));
        if err.is_nan() || lim.is_nan() || err > lim {
            worst.fail(i, g, w, err, lim);
        }
    }
    worst.finish(what, got.len())
}

/// Element-wise `|got - want| <= bound(want)`, computed in f32.
///
/// ```
/// use sere_testkit::check_bound_f32;
///
/// check_bound_f32("x", &[1.0, 2.0], &[1.0, 2.001], |w| 1e-3 * (1.0 + w.abs())).unwrap();
/// assert!(check_bound_f32("x", &[f32::NAN], &[0.0], |_| 1.0).is_err());
/// ```
pub fn check_bound_f32(
    what: &str,
    got: &[f32],
    want: &[f32],
    bound: impl Fn(f32) -> f32,
) -> Result<(), String> {
    lengths(what, got.len(), want.len())?;
    let mut worst = Worst::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (err, lim) = ((g - w).abs(), bound(w));
        if err.is_nan() || lim.is_nan() || err > lim {
            worst.fail(i, g as f64, w as f64, err as f64, lim as f64);
        }
    }
    worst.finish(what, got.len())
}

/// f32 results against an f64 reference: `|got - want| <= atol + rtol |want|`
/// element-wise, in f64. For an `atol` on the array's scale pass
/// `frac * max_abs(want)`.
///
/// ```
/// use sere_testkit::{check_close, max_abs};
///
/// let want = [100.0, 1e-9];
/// check_close("y", &[100.001, 0.0], &want, 1e-4, 1e-6 * max_abs(&want)).unwrap();
/// ```
pub fn check_close(
    what: &str,
    got: &[f32],
    want: &[f64],
    rtol: f64,
    atol: f64,
) -> Result<(), String> {
    let got: Vec<f64> = got.iter().map(|&g| g as f64).collect();
    check_bound(what, &got, want, |w| atol + rtol * w.abs())
}

/// f32 against f32: `|got - want| <= atol + rtol |want|` element-wise, in f32.
///
/// ```
/// use sere_testkit::check_close_f32;
///
/// check_close_f32("z", &[1.0001], &[1.0], 1e-3, 0.0).unwrap();
/// let err = check_close_f32("z", &[1.1], &[1.0], 1e-3, 0.0).unwrap_err();
/// assert!(err.starts_with("z: 1 of 1 elements"), "{err}");
/// ```
pub fn check_close_f32(
    what: &str,
    got: &[f32],
    want: &[f32],
    rtol: f32,
    atol: f32,
) -> Result<(), String> {
    check_bound_f32(what, got, want, |w| atol + rtol * w.abs())
}

/// [`check_close`], panicking with its message.
///
/// ```
/// sere_testkit::assert_close("y", &[0.5], &[0.5], 0.0, 0.0);
/// ```
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    if let Err(e) = check_close(what, got, want, rtol, atol) {
        panic!("{e}");
    }
}

/// [`check_close_f32`], panicking with its message.
///
/// ```should_panic
/// sere_testkit::assert_close_f32("z", &[1.1], &[1.0], 1e-3, 0.0);
/// ```
#[track_caller]
pub fn assert_close_f32(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    if let Err(e) = check_close_f32(what, got, want, rtol, atol) {
        panic!("{e}");
    }
}

/// Largest absolute value (0 for an empty slice; NaN is ignored).
///
/// ```
/// assert_eq!(sere_testkit::max_abs(&[1.0, -3.0]), 3.0);
/// ```
pub fn max_abs(xs: &[f64]) -> f64 {
    xs.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// [`max_abs`] of f32 values, in f32.
///
/// ```
/// assert_eq!(sere_testkit::max_abs_f32(&[-2.0, 1.0]), 2.0);
/// ```
pub fn max_abs_f32(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0, |m, v| m.max(v.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_worst_element_and_the_count() {
        let e = check_close("g", &[1.0, 5.0, 2.0], &[1.0, 4.0, 1.5], 0.0, 0.1).unwrap_err();
        assert_eq!(
            e,
            "g: 2 of 3 elements out of tolerance; worst [1]: got 5e0, want 4e0, |got - want| 1.000e0 > 1.000e-1"
        );
    }

    #[test]
    fn nan_fails_in_either_place() {
        assert!(check_close("n", &[f32::NAN], &[0.0], 1.0, 1.0).is_err());
        assert!(check_bound("n", &[0.0], &[0.0], |_| f64::NAN).is_err());
        assert!(check_close_f32("n", &[0.0], &[f32::NAN], 1.0, 1.0).is_err());
        assert!(check_close("inf", &[f32::INFINITY], &[0.0], 1.0, 1.0).is_err());
    }

    #[test]
    fn lengths_must_match_and_the_bound_is_inclusive() {
        assert!(check_close_f32("l", &[1.0], &[1.0, 2.0], 0.0, 0.0)
            .unwrap_err()
            .contains("length 1 != reference length 2"));
        check_close("eq", &[1.5], &[1.0], 0.0, 0.5).unwrap();
        check_close_f32("eq", &[1.5], &[1.0], 0.0, 0.5).unwrap();
    }
}
