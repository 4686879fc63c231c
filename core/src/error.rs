//! The one error type of the core: every kernel validates its slices and
//! arguments up front and reports what is wrong instead of panicking.

use core::fmt;

/// What a core kernel refused, and why.
///
/// `#[non_exhaustive]`: a later release may add a kind of error, so a
/// `match` outside this crate needs a wildcard arm.
///
/// ```
/// use sere_core::{softmax::softmax_rows, Error};
/// let mut out = [0.0f32; 3];
/// let err = softmax_rows(&[1.0, 2.0], 1, 3, &mut out).unwrap_err();
/// assert!(matches!(err, Error::ShapeMismatch { .. }));
/// assert!(err.to_string().contains("input"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A slice does not have the length its shape arguments imply.
    ShapeMismatch {
        /// Which argument (e.g. `"input"`, `"grad_grid"`).
        what: &'static str,
        /// The length the shape arguments require.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },
    /// A scalar argument is outside its valid range (zero size, non-positive
    /// temperature, heads not dividing channels, ...).
    InvalidArgument {
        /// Which argument.
        what: &'static str,
        /// What it must satisfy.
        requirement: &'static str,
    },
    /// An input contained NaN or infinity where a finite value is required,
    /// or a computed result was not finite.
    NonFinite {
        /// Which input or result.
        what: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ShapeMismatch {
                what,
                expected,
                got,
            } => write!(
                f,
                "shape mismatch: `{what}` has {got} elements but its shape needs {expected}"
            ),
            Error::InvalidArgument { what, requirement } => {
                write!(f, "invalid argument `{what}`: {requirement}")
            }
            Error::NonFinite { what } => write!(
                f,
                "`{what}` is not finite (NaN or infinity): check the inputs and the learning rate"
            ),
        }
    }
}

impl core::error::Error for Error {}

/// Result of a core kernel.
///
/// ```
/// fn checked(x: &[f32]) -> sere_core::Result<f32> {
///     let mut y = [0.0f32; 2];
///     sere_core::softmax::softmax_rows(x, 1, 2, &mut y)?;
///     Ok(y[0])
/// }
/// assert_eq!(checked(&[0.0, 0.0]), Ok(0.5));
/// assert!(checked(&[f32::NAN, 0.0]).is_err());
/// ```
pub type Result<T> = core::result::Result<T, Error>;

/// Checks that `slice_len == expected`.
#[inline]
pub(crate) fn check_len(what: &'static str, slice_len: usize, expected: usize) -> Result<()> {
    if slice_len == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what,
            expected,
            got: slice_len,
        })
    }
}

/// Checks that a size argument is non-zero.
#[inline]
pub(crate) fn check_nonzero(what: &'static str, n: usize) -> Result<()> {
    if n == 0 {
        Err(Error::InvalidArgument {
            what,
            requirement: "must be at least 1",
        })
    } else {
        Ok(())
    }
}

/// Checks that a temperature (or other scale) is finite and positive.
#[inline]
pub(crate) fn check_positive(what: &'static str, v: f32) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            what,
            requirement: "must be finite and > 0",
        })
    }
}

/// Multiplies shape factors, reporting overflow as an invalid argument
/// rather than wrapping (a wrapped size would pass the length checks).
#[inline]
pub(crate) fn shape_product(what: &'static str, dims: &[usize]) -> Result<usize> {
    let mut n: usize = 1;
    for &d in dims {
        n = n.checked_mul(d).ok_or(Error::InvalidArgument {
            what,
            requirement: "shape product overflows usize",
        })?;
    }
    Ok(n)
}

/// Returns an error if any element is NaN or infinite.
#[inline]
pub(crate) fn check_finite(what: &'static str, xs: &[f32]) -> Result<()> {
    if xs.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(Error::NonFinite { what })
    }
}
