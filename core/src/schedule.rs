//! Schedules over training iterations, as DINO/iBOT define them: a linear
//! warm-up followed by a half-cosine from `base` to `final_value`.

use libm::cos;

/// Cosine schedule with linear warm-up (DINO's `cosine_scheduler`, one value
/// per iteration). For `step < warmup_steps` the value goes linearly from
/// `start_warmup` to `base` (reaching `base` at `warmup_steps - 1`, like
/// `np.linspace`, so a single warm-up step is `start_warmup`); afterwards
/// `final + (base - final) * (1 + cos(pi * i / (total - warmup))) / 2` with
/// `i = step - warmup_steps`. Steps past the end keep the final value.
///
/// ```
/// use sere_core::schedule::cosine_schedule;
/// assert_eq!(cosine_schedule(0, 100, 0, 1.0, 0.0, 0.0), 1.0);
/// assert!((cosine_schedule(50, 100, 0, 1.0, 0.0, 0.0) - 0.5).abs() < 1e-6);
/// assert_eq!(cosine_schedule(5, 100, 10, 1.0, 0.0, 0.0), 5.0 / 9.0);
/// ```
pub fn cosine_schedule(
    step: usize,
    total_steps: usize,
    warmup_steps: usize,
    base: f32,
    final_value: f32,
    start_warmup: f32,
) -> f32 {
    let warmup = warmup_steps.min(total_steps);
    if step < warmup {
        return linear_warmup(step, warmup, start_warmup, base);
    }
    let span = total_steps - warmup;
    if span == 0 {
        return final_value;
    }
    let i = (step - warmup).min(span - 1) as f64;
    let c = 0.5 * (1.0 + cos(core::f64::consts::PI * i / span as f64));
    (final_value as f64 + (base as f64 - final_value as f64) * c) as f32
}

/// Linear ramp from `start` at step 0 to `end` at `steps - 1` (like
/// `np.linspace(start, end, steps)`), then constant `end`. DINO warms its
/// teacher temperature up this way.
///
/// ```
/// use sere_core::schedule::linear_warmup;
/// assert_eq!(linear_warmup(0, 3, 0.04, 0.07), 0.04);
/// assert_eq!(linear_warmup(2, 3, 0.04, 0.07), 0.07);
/// assert_eq!(linear_warmup(9, 3, 0.04, 0.07), 0.07);
/// // One warm-up step is `np.linspace(start, end, 1) == [start]`.
/// assert_eq!(linear_warmup(0, 1, 0.04, 0.07), 0.04);
/// ```
pub fn linear_warmup(step: usize, steps: usize, start: f32, end: f32) -> f32 {
    if step >= steps {
        return end;
    }
    if steps == 1 {
        // `np.linspace(start, end, 1)` is `[start]`.
        return start;
    }
    if step + 1 == steps {
        return end;
    }
    let f = step as f64 / (steps - 1) as f64;
    (start as f64 + (end as f64 - start as f64) * f) as f32
}
