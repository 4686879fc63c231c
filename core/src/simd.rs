//! Wider SIMD for the element-wise and row-reduction kernels.
//!
//! The library is compiled for the target's baseline (SSE2 on x86-64), so
//! LLVM vectorises our loops 4 wide at most. With the `std` feature on
//! x86-64, [`multiversion!`] runs a kernel's body inside a function compiled with
//! AVX2 + FMA when the CPU has them (checked once, cached by std), so the
//! same loops run 8 wide, and, built with rustc 1.89 or newer, inside one
//! compiled with AVX-512 (AVX512F) where the CPU has it, so the element-wise
//! loops run 16 wide. Results do not change with the path taken: Rust
//! never contracts `a * b + c` into an FMA on its own, and the reductions'
//! order is fixed by [`sum`] / [`dot`], not by the vector width.
//!
//! The reductions keep 8 partial sums (lane `i` takes elements `i mod 8`) and
//! add them in a fixed tree: a strict left-to-right `f32` sum cannot be
//! vectorised, and 8 partial sums are also a little more accurate.

/// Whether the AVX2 + FMA copies of the kernels may run (std builds on
/// x86-64 only; std caches the CPUID answer).
#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Whether the AVX-512 copies of the kernels may run (std builds with
/// rustc 1.89 or newer on x86-64; see build.rs).
#[cfg(all(feature = "std", target_arch = "x86_64", sere_avx512))]
#[inline]
pub(crate) fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f") && has_avx2_fma()
}

/// Defines a kernel function whose body is compiled three times: as is,
/// inside an `avx2,fma` function chosen at run time by [`has_avx2_fma`],
/// and inside an `avx512f` one where the build and the CPU have it.
/// The body is an `#[inline(always)]` function so it is really compiled into
/// the AVX2 copy (a closure would be called, not inlined, and keep the
/// baseline features). Helpers the body calls should be `#[inline]`.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($a: $t),*) $(-> $r)? $body
            #[cfg(all(feature = "std", target_arch = "x86_64", sere_avx512))]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn body_avx512($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                if $crate::simd::has_avx512() {
                    // SAFETY: the CPU has the features body_avx512 is compiled for.
                    return unsafe { body_avx512($($a),*) };
                }
            }
            #[cfg(all(feature = "std", target_arch = "x86_64"))]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn body_avx2($($a: $t),*) $(-> $r)? {
                    body($($a),*)
                }
                if $crate::simd::has_avx2_fma() {
                    // SAFETY: the CPU has the features body_avx2 is compiled for.
                    return unsafe { body_avx2($($a),*) };
                }
            }
            body($($a),*)
        }
    };
}
pub(crate) use multiversion;

/// Fixed-order sum of 8 partial sums.
#[inline(always)]
fn fold(acc: [f32; 8]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Sum of `f(x)` over `xs`, in 8 lanes (vectorisable).
#[inline(always)]
pub(crate) fn sum_map(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a += f(v);
    }
    fold(acc)
}

/// Sum of `xs`, in 8 lanes.
#[inline(always)]
pub(crate) fn sum(xs: &[f32]) -> f32 {
    sum_map(xs, |v| v)
}

/// Sum of `f(a, b)` over pairs of `a` and `b` (same length), in 8 lanes.
#[inline(always)]
pub(crate) fn sum_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            *s += f(u, v);
        }
    }
    for ((s, &u), &v) in acc.iter_mut().zip(ta).zip(tb) {
        *s += f(u, v);
    }
    fold(acc)
}

/// Sum of `f(a, b, c)` over triples of `a`, `b`, `c` (same length), in 8 lanes.
#[inline(always)]
pub(crate) fn sum_zip3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let (ta, tb, tc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for (((s, &u), &v), &w) in acc.iter_mut().zip(x).zip(y).zip(z) {
            *s += f(u, v, w);
        }
    }
    for (((s, &u), &v), &w) in acc.iter_mut().zip(ta).zip(tb).zip(tc) {
        *s += f(u, v, w);
    }
    fold(acc)
}

/// Sum of `f(a, b, c)` over triples, for bodies too heavy for the 8-lane
/// form to vectorise (`exp` inside): `f` fills a 64-element stack block in a
/// plain loop, which LLVM's loop vectoriser handles, then the block is summed
/// in 8 lanes. Fixed order, so the result does not depend on the SIMD path.
#[inline(always)]
pub(crate) fn sum_zip3_blocked(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    f: impl Fn(f32, f32, f32) -> f32,
) -> f32 {
    const BLOCK: usize = 64;
    let mut buf = [0.0f32; BLOCK];
    let mut total = 0.0f32;
    for ((x, y), z) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).zip(c.chunks(BLOCK)) {
        let out = &mut buf[..x.len()];
        for (((o, &u), &v), &w) in out.iter_mut().zip(x).zip(y).zip(z) {
            *o = f(u, v, w);
        }
        total += sum(out);
    }
    total
}

/// Maximum of `f(a, b)` over pairs, in 8 lanes (vectorisable; NaN-free
/// inputs, as checked by the callers).
#[inline(always)]
pub(crate) fn max_zip(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((m, &u), &v) in acc.iter_mut().zip(x).zip(y) {
            let w = f(u, v);
            *m = if w > *m { w } else { *m };
        }
    }
    for ((m, &u), &v) in acc.iter_mut().zip(ta).zip(tb) {
        let w = f(u, v);
        *m = if w > *m { w } else { *m };
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Dot product of `a` and `b` (same length), in 8 lanes.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum_zip(a, b, |u, v| u * v)
}

/// Square roots of 8 values: `sqrtps` on x86-64 (SSE2 is baseline there;
/// libm's `sqrtf` is an inline-asm `sqrtss` that stops vectorisation),
/// libm elsewhere.
#[inline(always)]
pub(crate) fn sqrt8(v: [f32; 8]) -> [f32; 8] {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_loadu_ps, _mm_sqrt_ps, _mm_storeu_ps};
        let mut out = [0.0f32; 8];
        // SAFETY: SSE2 is part of the x86-64 baseline; the pointers cover
        // 4 floats each inside the 8-float arrays.
        unsafe {
            _mm_storeu_ps(out.as_mut_ptr(), _mm_sqrt_ps(_mm_loadu_ps(v.as_ptr())));
            _mm_storeu_ps(
                out.as_mut_ptr().add(4),
                _mm_sqrt_ps(_mm_loadu_ps(v.as_ptr().add(4))),
            );
        }
        out
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        v.map(libm::sqrtf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sums_match_naive_sums() {
        for n in [0usize, 1, 7, 8, 9, 17, 100] {
            let a: [f32; 100] = core::array::from_fn(|i| libm::sinf(i as f32 * 0.37));
            let b: [f32; 100] = core::array::from_fn(|i| libm::cosf(i as f32 * 0.11));
            let (a, b) = (&a[..n], &b[..n]);
            let naive: f32 = a.iter().sum();
            assert!((sum(a) - naive).abs() < 1e-5, "n {n}");
            let nd: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            assert!((dot(a, b) - nd).abs() < 1e-5, "n {n}");
            let ns: f32 = a.iter().map(|x| x * x).sum();
            assert!(
                (sum_map(a, |x| x * x) - ns).abs() < 1e-5 * (1.0 + ns),
                "n {n}"
            );
        }
        for n in [0usize, 1, 63, 64, 65, 130, 200] {
            let a: [f32; 200] = core::array::from_fn(|i| libm::sinf(i as f32 * 0.3));
            let a = &a[..n];
            let naive: f32 = a.iter().map(|x| x * x + 1.0).sum();
            let blocked = sum_zip3_blocked(a, a, a, |x, y, _| x * y + 1.0);
            assert!((blocked - naive).abs() < 1e-5 * (1.0 + naive), "n {n}");
        }
        let s = sqrt8([0.0, 1.0, 4.0, 9.0, 2.0, 0.25, 100.0, 1e-8]);
        assert_eq!(s[..4], [0.0, 1.0, 2.0, 3.0]);
        assert!((s[4] - core::f32::consts::SQRT_2).abs() < 1e-7);
        assert_eq!(s[5], 0.5);
    }
}
