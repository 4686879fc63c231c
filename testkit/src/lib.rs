//! Dev-only helpers shared by the SERE workspace's tests (a
//! `[dev-dependencies]` path dependency; never published).
//!
//! - [`Rng`]: a seeded SplitMix64 generator with f32/f64 uniform and normal
//!   draws; [`Lcg`] and [`XorShift`]: the exact streams older tests draw
//!   from, so their inputs stay bit-for-bit.
//! - [`check_close`], [`check_close_f32`], [`check_bound`],
//!   [`check_bound_f32`]: element-wise tolerance checks returning
//!   `Result<(), String>` that name the worst element; [`assert_close`] and
//!   [`assert_close_f32`] panic with that message.
//! - [`device_or_skip`]: the `SERE_REQUIRE_GPU` convention of the GPU tests.
//!
//! ```
//! use sere_testkit::{check_close, Rng};
//!
//! let mut rng = Rng::new(1);
//! let x = rng.uniforms(4, -1.0, 1.0);
//! let want: Vec<f64> = x.iter().map(|&v| 2.0 * v as f64).collect();
//! let got: Vec<f32> = x.iter().map(|&v| 2.0 * v).collect();
//! check_close("2x", &got, &want, 1e-6, 0.0).unwrap();
//! ```

mod device;
mod rng;
mod tol;

pub use device::{device_or_skip, required, REQUIRE_GPU};
pub use rng::{Lcg, Rng, XorShift};
pub use tol::{
    assert_close, assert_close_f32, check_bound, check_bound_f32, check_close, check_close_f32,
    max_abs, max_abs_f32,
};
