//! The one step from shaped arrays to the flat buffers backend uploads take.

use ndarray::{ArrayView, Dimension};

use super::error::{DataError, Result};

/// The elements of a standard-layout view as one slice (no copy), or
/// [`DataError::Layout`] naming `what` if the view is strided or permuted.
/// The loader and evaluation batches are built standard, so for them this
/// only checks what construction guarantees.
///
/// ```rust
/// use ndarray::Array3;
/// use sere_host::data::layout::contiguous;
/// let a = Array3::from_shape_vec((2, 1, 2), vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
/// assert_eq!(contiguous(a.view(), "pixels").unwrap(), &[1.0, 2.0, 3.0, 4.0]);
/// assert!(contiguous(a.t(), "pixels").is_err());
/// ```
pub fn contiguous<'a, T, D: Dimension>(
    view: ArrayView<'a, T, D>,
    what: &'static str,
) -> Result<&'a [T]> {
    view.to_slice().ok_or(DataError::Layout(what))
}
