//! Shared input helpers for the SERE fuzz targets.

use arbitrary::Arbitrary;

/// An `f32` drawn so that the interesting regions are hit often: small
/// exact values, moderate decimals, large magnitudes, special values and,
/// through `Bits`, every bit pattern (NaN payloads, subnormals, infinities).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Num {
    /// `i / 8` in `[-16, 16)`.
    Small(i8),
    /// `i / 1000` in about `[-32.8, 32.8]`.
    Milli(i16),
    /// A whole number up to `2^31` in magnitude.
    Int(i32),
    /// Any bit pattern.
    Bits(u32),
    /// One of a table of edge values.
    Special(u8),
}

const SPECIAL: [f32; 24] = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    -0.5,
    2.0,
    1e-6,
    1e6,
    -1e6,
    1e30,
    -1e30,
    f32::MAX,
    f32::MIN,
    f32::MIN_POSITIVE,
    -f32::MIN_POSITIVE,
    1e-45, // smallest subnormal
    f32::EPSILON,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::NAN,
    -f32::NAN,
    1e20,
    3e38,
];

impl Num {
    pub fn get(self) -> f32 {
        match self {
            Num::Small(i) => i as f32 / 8.0,
            Num::Milli(i) => i as f32 / 1000.0,
            Num::Int(i) => i as f32,
            Num::Bits(b) => f32::from_bits(b),
            Num::Special(i) => SPECIAL[i as usize % SPECIAL.len()],
        }
    }
}

/// A slice length: usually the one the shape needs, sometimes off by a
/// little (including to zero) so that every length check is exercised.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Len(pub u8);

impl Len {
    /// `expected`, or (about one time in 16) `expected` shifted by -8..=7.
    pub fn get(self, expected: usize) -> usize {
        if self.0 & 0xF0 == 0xF0 {
            let d = (self.0 & 0x0F) as isize - 8;
            (expected as isize + d).max(0) as usize
        } else {
            expected
        }
    }
}

/// `len` values taken cyclically from `vals` (zeros if `vals` is empty).
pub fn fill(vals: &[Num], len: usize) -> Vec<f32> {
    if vals.is_empty() {
        return vec![0.0; len];
    }
    (0..len).map(|i| vals[i % vals.len()].get()).collect()
}

/// Whether every value is finite and at most `bound` in magnitude.
pub fn bounded(xs: &[f32], bound: f32) -> bool {
    xs.iter().all(|x| x.is_finite() && x.abs() <= bound)
}

/// Whether every value is finite.
pub fn finite(xs: &[f32]) -> bool {
    xs.iter().all(|x| x.is_finite())
}

/// A size in `0..=max` (0 exercises the zero-size checks).
pub fn dim(raw: u8, max: usize) -> usize {
    raw as usize % (max + 1)
}
