//! Shared helpers of the reference and finite-difference tests: reading the
//! PyTorch fixtures (`tests/fixtures/*.txt`, written by `gen_fixtures.py`),
//! comparing f32 kernel results with float64 references (on
//! `sere_testkit`'s checks), its seeded RNG and a central finite-difference
//! gradient checker.
//!
//! Set `SERE_TOL_REPORT=1` (with `-- --nocapture --test-threads 1`) to print
//! how much of its tolerance every comparison used.
#![allow(dead_code)]

use std::fmt::Write as _;

/// One named case of a fixture file: `key dims...: values...` entries.
pub struct Case {
    pub name: String,
    items: Vec<(String, Vec<usize>, Vec<f64>)>,
}

impl Case {
    fn entry(&self, key: &str) -> &(String, Vec<usize>, Vec<f64>) {
        self.items
            .iter()
            .find(|(k, _, _)| k == key)
            .unwrap_or_else(|| panic!("case `{}` has no entry `{key}`", self.name))
    }

    /// Whether the case has an entry `key`.
    pub fn has(&self, key: &str) -> bool {
        self.items.iter().any(|(k, _, _)| k == key)
    }

    /// The float64 values of `key` (row-major).
    pub fn f64s(&self, key: &str) -> &[f64] {
        &self.entry(key).2
    }

    /// The shape of `key` (empty for a scalar).
    pub fn shape(&self, key: &str) -> &[usize] {
        &self.entry(key).1
    }

    /// The values of `key` as f32. Inputs were rounded to f32 by the
    /// generator, so this conversion is exact for them.
    pub fn f32s(&self, key: &str) -> Vec<f32> {
        self.f64s(key).iter().map(|&v| v as f32).collect()
    }

    /// A scalar entry.
    pub fn scalar(&self, key: &str) -> f64 {
        let (_, dims, v) = self.entry(key);
        assert!(
            dims.is_empty() && v.len() == 1,
            "`{key}` of case `{}` is not a scalar",
            self.name
        );
        v[0]
    }

    /// A scalar entry as f32 (exact for generator inputs).
    pub fn f32(&self, key: &str) -> f32 {
        self.scalar(key) as f32
    }

    /// A non-negative integer scalar entry.
    pub fn usize(&self, key: &str) -> usize {
        let v = self.scalar(key);
        assert!(
            v >= 0.0 && v.fract() == 0.0,
            "`{key}` of case `{}` is not an integer: {v}",
            self.name
        );
        v as usize
    }

    /// A 0/1 flag.
    pub fn flag(&self, key: &str) -> bool {
        self.usize(key) != 0
    }
}

/// Reads `tests/fixtures/<file>.txt`.
pub fn load(file: &str) -> Vec<Case> {
    let path = format!("{}/tests/fixtures/{file}.txt", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"));
    parse(&text, &path)
}

fn parse(text: &str, path: &str) -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix("case ") {
            cases.push(Case {
                name: name.trim().to_string(),
                items: Vec::new(),
            });
            continue;
        }
        let at = || format!("{path}:{}", no + 1);
        let (head, vals) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("{}: expected `key dims: values`", at()));
        let mut head = head.split_whitespace();
        let key = head
            .next()
            .unwrap_or_else(|| panic!("{}: missing key", at()))
            .to_string();
        let dims: Vec<usize> = head
            .map(|d| {
                d.parse()
                    .unwrap_or_else(|_| panic!("{}: bad dim {d}", at()))
            })
            .collect();
        let vals: Vec<f64> = vals
            .split_whitespace()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{}: bad value {v}", at()))
            })
            .collect();
        assert_eq!(
            vals.len(),
            dims.iter().product::<usize>(),
            "{}: value count does not match the shape",
            at()
        );
        cases
            .last_mut()
            .unwrap_or_else(|| panic!("{}: entry before the first `case`", at()))
            .items
            .push((key, dims, vals));
    }
    assert!(!cases.is_empty(), "{path}: no cases");
    cases
}

#[allow(unused_imports)] // reference.rs uses it, finite_diff.rs does not
pub use sere_testkit::max_abs;

/// Default relative tolerance of the reference comparisons: an f32 kernel
/// (24-bit mantissa, ~6e-8 per rounding) over the short reductions of these
/// fixtures stays well inside 1e-5.
pub const RTOL: f64 = 1e-5;

/// Checks `|got - want| <= atol + rtol |want|` element-wise, with
/// `atol = atol_scale * max|want|` (so near-zero elements of an array are
/// judged on the array's scale, not their own).
pub fn check_close(
    what: &str,
    got: &[f32],
    want: &[f64],
    rtol: f64,
    atol_scale: f64,
) -> Result<(), String> {
    check_close_abs(what, got, want, rtol, atol_scale * max_abs(want))
}

/// `|got - want| <= atol + rtol |want|` element-wise, `atol` absolute.
pub fn check_close_abs(
    what: &str,
    got: &[f32],
    want: &[f64],
    rtol: f64,
    atol: f64,
) -> Result<(), String> {
    let got: Vec<f64> = got.iter().map(|&g| g as f64).collect();
    check_close_f64(what, &got, want, |w| atol + rtol * w.abs())
}

/// Element-wise `|got - want| <= bound(want)` (`sere_testkit::check_bound`,
/// which names the worst offender), with the `SERE_TOL_REPORT` line.
pub fn check_close_f64(
    what: &str,
    got: &[f64],
    want: &[f64],
    bound: impl Fn(f64) -> f64,
) -> Result<(), String> {
    if std::env::var_os("SERE_TOL_REPORT").is_some() {
        let used = got
            .iter()
            .zip(want)
            .map(|(&g, &w)| (g - w).abs() / bound(w).max(f64::MIN_POSITIVE))
            .fold(0.0, f64::max);
        println!("tolerance used {used:9.3e}  {what}");
    }
    sere_testkit::check_bound(what, got, want, bound)
}

/// [`check_close`] with the default tolerances (rtol 1e-5, atol 1e-5 max|want|).
pub fn close(what: &str, got: &[f32], want: &[f64]) -> Result<(), String> {
    check_close(what, got, want, RTOL, RTOL)
}

/// Scalar version of [`check_close`] (`atol = atol_scale * |want|`).
pub fn close_scalar(what: &str, got: f32, want: f64, rtol: f64) -> Result<(), String> {
    check_close(what, &[got], &[want], rtol, rtol)
}

/// Collects failures of many checks and panics once with all of them, so a
/// failing run reports every broken case instead of the first.
#[derive(Default)]
pub struct Report {
    failures: Vec<String>,
    checks: usize,
}

impl Report {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the outcome of one check, prefixed with its case name.
    pub fn check(&mut self, case: &str, r: Result<(), String>) {
        if std::env::var_os("SERE_TOL_REPORT").is_some() {
            println!("  ^ case {case}");
        }
        self.checks += 1;
        if let Err(e) = r {
            self.failures.push(format!("[{case}] {e}"));
        }
    }

    /// Records a kernel error as a failure.
    pub fn ok<T, E: std::fmt::Debug>(&mut self, case: &str, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.checks += 1;
                self.failures
                    .push(format!("[{case}] kernel returned an error: {e:?}"));
                None
            }
        }
    }

    /// Panics with every recorded failure, or if nothing was checked.
    pub fn finish(self, what: &str) {
        assert!(self.checks > 0, "{what}: no checks ran");
        if !self.failures.is_empty() {
            panic!(
                "{what}: {} of {} checks failed:\n{}",
                self.failures.len(),
                self.checks,
                self.failures.join("\n")
            );
        }
    }
}

/// A deterministic, gradient-buffer prefill: exact multiples of 1/8 in
/// [-0.5, 0.5]. Backward kernels *add* into their buffers, so the tests start
/// from this instead of zeros and expect `prefill + gradient`.
pub fn prefill(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 % 9) as f32 - 4.0) * 0.125).collect()
}

/// Compares an accumulated gradient buffer (that started as [`prefill`])
/// with `want`: the buffer minus the prefill (exact in f64) must match
/// `want` to the default tolerance, plus the one f32 rounding that adding to
/// the prefill cost (half an f32 epsilon of the sum, <= 3e-8 + eps |want|).
pub fn close_accumulated(what: &str, got: &[f32], want: &[f64]) -> Result<(), String> {
    let pre = prefill(got.len());
    let recovered: Vec<f64> = got
        .iter()
        .zip(&pre)
        .map(|(&g, &p)| g as f64 - p as f64)
        .collect();
    let atol = RTOL * max_abs(want);
    let half_eps = 0.5 * f32::EPSILON as f64;
    check_close_f64(what, &recovered, want, |w| {
        atol + RTOL * w.abs() + half_eps * (w.abs() + 0.5)
    })
}

/// The seeded SplitMix64 generator of the finite-difference inputs
/// (`uniform`, `range`, `normal`, `normals`).
#[allow(unused_imports)] // finite_diff.rs uses it, reference.rs does not
pub use sere_testkit::Rng;

/// `sum_i w_i y_i` accumulated in f64: the scalar objective whose gradient
/// the backward kernels compute for upstream gradient `w`.
pub fn dot(w: &[f32], y: &[f32]) -> f64 {
    assert_eq!(w.len(), y.len());
    w.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Tolerances of a finite-difference check.
#[derive(Debug, Clone, Copy)]
pub struct FdTol {
    /// Step `h` of the central difference `(f(x + h) - f(x - h)) / 2h`.
    pub step: f64,
    /// Bound on `|fd - analytic| / |analytic|` over the whole vector.
    pub rel_norm: f64,
    /// Per element: `|fd - an| <= abs_floor * max|an| + rel_elem * |an|`.
    pub rel_elem: f64,
    pub abs_floor: f64,
}

impl Default for FdTol {
    /// Step 1e-2 in f32 inputs of order 1: the objective is evaluated from
    /// f32 outputs (relative noise ~1e-7 of its terms), so the difference
    /// quotient carries ~1e-7 * sum|terms| / h ~ 1e-5 relative noise, and the
    /// truncation error of the central difference is O(h^2 f''') ~ 1e-4.
    /// 1e-2 on the vector and 2e-2 per element (with a floor of 1e-2 of the
    /// largest component for elements near zero) leave headroom while a
    /// sign error (relative error 2) or a factor of two (relative error 0.5
    /// or 1) still fails by a wide margin.
    fn default() -> Self {
        FdTol {
            step: 1e-2,
            rel_norm: 1e-2,
            rel_elem: 2e-2,
            abs_floor: 1e-2,
        }
    }
}

/// Central finite differences of `f` at `x`, one coordinate at a time.
pub fn finite_diff(x: &[f32], step: f64, mut f: impl FnMut(&[f32]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    let mut fd = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        let x0 = x[i];
        // Use the steps actually representable in f32 for the quotient.
        let up = (x0 as f64 + step) as f32;
        let down = (x0 as f64 - step) as f32;
        xp[i] = up;
        let fu = f(&xp);
        xp[i] = down;
        let fdn = f(&xp);
        xp[i] = x0;
        fd.push((fu - fdn) / (up as f64 - down as f64));
    }
    fd
}

/// Compares an analytic gradient with the finite differences of `f`
/// (see [`FdTol`]); `Err` describes the mismatch.
pub fn check_grad(
    what: &str,
    x: &[f32],
    analytic: &[f32],
    tol: FdTol,
    f: impl FnMut(&[f32]) -> f64,
) -> Result<(), String> {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let fd = finite_diff(x, tol.step, f);
    compare_grad(what, analytic, &fd, tol)
}

/// The comparison part of [`check_grad`], for precomputed differences.
pub fn compare_grad(what: &str, analytic: &[f32], fd: &[f64], tol: FdTol) -> Result<(), String> {
    let an: Vec<f64> = analytic.iter().map(|&v| v as f64).collect();
    let norm = an.iter().map(|v| v * v).sum::<f64>().sqrt();
    let diff = an
        .iter()
        .zip(fd)
        .map(|(a, f)| (a - f) * (a - f))
        .sum::<f64>()
        .sqrt();
    let fd_norm = fd.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !(norm > 0.0 && fd_norm > 0.0) {
        return Err(format!(
            "{what}: degenerate gradient (|analytic| = {norm:e}, |fd| = {fd_norm:e}); the test would be vacuous"
        ));
    }
    let mut msg = String::new();
    let mut ok = true;
    if diff.is_nan() || diff > tol.rel_norm * norm {
        ok = false;
        let _ = writeln!(
            msg,
            "  |fd - analytic| / |analytic| = {:.3e} > {:.1e}",
            diff / norm,
            tol.rel_norm
        );
    }
    let floor = tol.abs_floor * max_abs(&an);
    if std::env::var_os("SERE_TOL_REPORT").is_some() {
        let elem = an
            .iter()
            .zip(fd)
            .map(|(a, f)| (a - f).abs() / (floor + tol.rel_elem * a.abs()))
            .fold(0.0, f64::max);
        println!(
            "fd {what}: norm {:.3e} of bound, element {elem:.3e} of bound",
            diff / norm / tol.rel_norm
        );
    }
    let mut bad = 0;
    for (i, (a, f)) in an.iter().zip(fd).enumerate() {
        let err = (a - f).abs();
        if err.is_nan() || err > floor + tol.rel_elem * a.abs() {
            ok = false;
            bad += 1;
            if bad <= 5 {
                let _ = writeln!(msg, "  [{i}] analytic {a:e} fd {f:e}");
            }
        }
    }
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what}: finite differences disagree ({bad} elements out of tolerance)\n{msg}"
        ))
    }
}
