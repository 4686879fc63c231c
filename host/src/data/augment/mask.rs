//! iBOT's masks for masked image modelling: BEiT-style blocks on the patch
//! grid of each *student global* crop (SERE.md, "iBOT masked image
//! modelling"). Local crops are never masked and the teacher never is.
//!
//! Per crop: with probability `1 - probability` no mask at all; otherwise a
//! budget of `ratio ~ U(ratio.0, ratio.1)` of the grid's patches, filled by
//! rectangles placed one after another. Each rectangle draws an area
//! `U(min(H, W) / 3 squared, remaining budget)` and an aspect ratio
//! `exp(U(ln aspect.0, ln aspect.1))`, lies strictly inside the grid (never
//! spanning a whole side) at a uniform position, and is kept only if it adds
//! at least one new patch without overshooting the budget; up to 10 tries
//! per rectangle, and the mask stops short of the budget when no try fits.
//! All randomness comes from the generator passed in, consumed in a fixed
//! order, so a crop's mask depends only on its stream.

use rand::{Rng, RngExt};

use crate::data::error::{DataError, Result};

/// Tries per rectangle before the mask stops short of its budget (BEiT).
const TRIES_PER_BLOCK: usize = 10;

/// How the student's global crops are masked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskConfig {
    /// Patch grid of a global crop: (rows, columns).
    pub grid: (usize, usize),
    /// Probability that a crop is masked at all (iBOT: 0.5).
    pub probability: f32,
    /// Range of the masked fraction of the grid, drawn uniformly
    /// (iBOT: `pred_ratio 0.3 ± pred_ratio_var 0.2`, i.e. 0.1 ..= 0.5).
    pub ratio: (f32, f32),
    /// Aspect-ratio range (height / width) of each rectangle, drawn
    /// log-uniformly (iBOT: 0.3 ..= 1 / 0.3).
    pub aspect: (f32, f32),
}

impl MaskConfig {
    /// iBOT's settings for a `grid` of patches.
    ///
    /// ```
    /// use sere_host::augment::mask::MaskConfig;
    /// let m = MaskConfig::ibot((14, 14));
    /// assert_eq!((m.probability, m.ratio), (0.5, (0.1, 0.5)));
    /// m.validate().unwrap();
    /// ```
    pub fn ibot(grid: (usize, usize)) -> Self {
        MaskConfig {
            grid,
            probability: 0.5,
            ratio: (0.1, 0.5),
            aspect: (0.3, 1.0 / 0.3),
        }
    }

    /// Patches per crop.
    pub fn patches(&self) -> usize {
        self.grid.0 * self.grid.1
    }

    /// Refuses settings that cannot describe a mask.
    pub fn validate(&self) -> Result<()> {
        let (h, w) = self.grid;
        if h == 0 || w == 0 {
            return Err(DataError::config(
                "mask grid",
                format!("{h} x {w} patches; the global crops need at least one patch"),
            ));
        }
        let p = self.probability;
        if !(0.0..=1.0).contains(&p) {
            return Err(DataError::config(
                "mask probability",
                format!("{p}; use a probability in [0, 1]"),
            ));
        }
        let (lo, hi) = self.ratio;
        if !(0.0 <= lo && lo <= hi && hi < 1.0) {
            return Err(DataError::config(
                "mask ratio",
                format!("({lo}, {hi}); use 0 <= min <= max < 1 (fractions of the patch grid)"),
            ));
        }
        let (a, b) = self.aspect;
        if !(a > 0.0 && a <= b && b.is_finite()) {
            return Err(DataError::config(
                "mask aspect ratio",
                format!("({a}, {b}); use 0 < min <= max"),
            ));
        }
        Ok(())
    }
}

/// One rectangle of a mask, in patches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// Draws one crop's mask into `out` (`rows x columns`, row-major, `true` =
/// masked) and returns the number of masked patches.
///
/// ```
/// use sere_host::augment::mask::{draw_mask, MaskConfig};
/// use rand::SeedableRng;
/// let cfg = MaskConfig { probability: 1.0, ..MaskConfig::ibot((8, 8)) };
/// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
/// let mut mask = [false; 64];
/// let n = draw_mask(&cfg, &mut rng, &mut mask);
/// assert_eq!(n, mask.iter().filter(|&&m| m).count());
/// assert!(n as f32 <= 0.5 * 64.0);
/// ```
pub fn draw_mask(cfg: &MaskConfig, rng: &mut impl Rng, out: &mut [bool]) -> usize {
    draw_mask_blocks(cfg, rng, out, |_| {})
}

/// [`draw_mask`], reporting each rectangle that added patches to
/// `on_block` (in placement order; later ones may overlap earlier ones).
pub fn draw_mask_blocks(
    cfg: &MaskConfig,
    rng: &mut impl Rng,
    out: &mut [bool],
    mut on_block: impl FnMut(Block),
) -> usize {
    assert_eq!(out.len(), cfg.patches(), "mask buffer has the wrong size");
    out.fill(false);
    if rng.random::<f32>() >= cfg.probability {
        return 0;
    }
    let budget = uniform(rng, cfg.ratio.0, cfg.ratio.1) * cfg.patches() as f32;
    let mut count = 0usize;
    while (count as f32) < budget {
        let added = place_block(cfg, rng, out, budget - count as f32, &mut on_block);
        if added == 0 {
            break;
        }
        count += added;
    }
    count
}

/// Up to [`TRIES_PER_BLOCK`] tries at one rectangle adding between 1 and
/// `room` new patches; returns how many it added (0: none fitted).
fn place_block(
    cfg: &MaskConfig,
    rng: &mut impl Rng,
    out: &mut [bool],
    room: f32,
    on_block: &mut impl FnMut(Block),
) -> usize {
    let (rows, cols) = cfg.grid;
    let min_area = ((rows.min(cols) / 3).pow(2)) as f32;
    let (ln_a, ln_b) = (cfg.aspect.0.ln(), cfg.aspect.1.ln());
    for _ in 0..TRIES_PER_BLOCK {
        let area = uniform(rng, min_area, room);
        let aspect = uniform(rng, ln_a, ln_b).exp();
        let height = (area * aspect).sqrt().round() as usize;
        let width = (area / aspect).sqrt().round() as usize;
        if height == 0 || width == 0 || height >= rows || width >= cols {
            continue;
        }
        let top = rng.random_range(0..=rows - height);
        let left = rng.random_range(0..=cols - width);
        let cells =
            || (top..top + height).flat_map(|r| (left..left + width).map(move |c| r * cols + c));
        let new = cells().filter(|&i| !out[i]).count();
        if new > 0 && new as f32 <= room {
            cells().for_each(|i| out[i] = true);
            on_block(Block {
                top,
                left,
                height,
                width,
            });
            return new;
        }
    }
    0
}

/// `U(a, b)` for either order of the bounds (the area's lower bound may
/// exceed a small remaining budget, as in BEiT).
fn uniform(rng: &mut impl Rng, a: f32, b: f32) -> f32 {
    a + (b - a) * rng.random::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(seed)
    }

    fn always(grid: (usize, usize), ratio: (f32, f32)) -> MaskConfig {
        MaskConfig {
            probability: 1.0,
            ratio,
            ..MaskConfig::ibot(grid)
        }
    }

    proptest! {
        #[test]
        fn masks_are_unions_of_inner_rectangles_within_budget(
            seed in any::<u64>(),
            rows in 1usize..16,
            cols in 1usize..16,
            lo in 0.0f32..0.6,
            span in 0.0f32..0.39,
        ) {
            let cfg = always((rows, cols), (lo, lo + span));
            let mut mask = vec![false; rows * cols];
            let mut union = vec![false; rows * cols];
            let mut r = rng(seed);
            let n = draw_mask_blocks(&cfg, &mut r, &mut mask, |b| {
                assert!(b.height >= 1 && b.width >= 1);
                assert!(b.height < rows && b.width < cols, "never a whole side: {b:?}");
                assert!(b.top + b.height <= rows && b.left + b.width <= cols);
                for y in b.top..b.top + b.height {
                    for x in b.left..b.left + b.width {
                        union[y * cols + x] = true;
                    }
                }
            });
            prop_assert_eq!(&mask, &union);
            prop_assert_eq!(n, mask.iter().filter(|&&m| m).count());
            prop_assert!(n as f32 <= (lo + span) * (rows * cols) as f32);
            // The same stream gives the same mask.
            let mut again = vec![true; rows * cols];
            prop_assert_eq!(draw_mask(&cfg, &mut rng(seed), &mut again), n);
            prop_assert_eq!(&again, &mask);
        }
    }

    #[test]
    fn masked_fraction_follows_the_ratio_and_probability() {
        // iBOT's settings on a 14 x 14 grid (ViT-S/16 at 224 px).
        let cfg = MaskConfig::ibot((14, 14));
        let (trials, mut masked, mut fraction) = (4000, 0, 0.0f64);
        let mut mask = vec![false; cfg.patches()];
        let mut r = rng(5);
        for _ in 0..trials {
            let n = draw_mask(&cfg, &mut r, &mut mask);
            if n > 0 {
                masked += 1;
                fraction += n as f64 / cfg.patches() as f64;
            }
        }
        let p = masked as f64 / trials as f64;
        assert!((p - 0.5).abs() < 0.03, "masked crops {p}");
        // The budget is U(0.1, 0.5), filled nearly to the end.
        let mean = fraction / masked as f64;
        assert!((0.25..=0.30).contains(&mean), "mean masked fraction {mean}");
    }

    #[test]
    fn invalid_settings_are_refused_with_the_setting_named() {
        let ok = MaskConfig::ibot((8, 8));
        for (bad, needle) in [
            (MaskConfig { grid: (0, 8), ..ok }, "mask grid"),
            (
                MaskConfig {
                    probability: 1.5,
                    ..ok
                },
                "mask probability",
            ),
            (
                MaskConfig {
                    probability: f32::NAN,
                    ..ok
                },
                "mask probability",
            ),
            (
                MaskConfig {
                    ratio: (0.5, 0.1),
                    ..ok
                },
                "mask ratio",
            ),
            (
                MaskConfig {
                    ratio: (0.1, 1.0),
                    ..ok
                },
                "mask ratio",
            ),
            (
                MaskConfig {
                    aspect: (0.0, 2.0),
                    ..ok
                },
                "mask aspect",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
