//! Seeded generators: identical streams on every platform, no crates.

/// SplitMix64 (Steele, Lea and Flood 2014): the tests' seeded generator.
/// The state is the seed; each draw adds the golden-ratio increment and
/// mixes it.
///
/// ```
/// use sere_testkit::Rng;
///
/// let mut a = Rng::new(7);
/// let mut b = Rng::new(7);
/// assert_eq!(a.next_u64(), b.next_u64());
/// let x = a.uniform();
/// assert!((0.0..1.0).contains(&x));
/// ```
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose state is `seed`.
    ///
    /// ```
    /// let mut rng = sere_testkit::Rng::new(0);
    /// assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
    /// ```
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    ///
    /// ```
    /// let mut rng = sere_testkit::Rng::new(1);
    /// assert_ne!(rng.next_u64(), rng.next_u64());
    /// ```
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`: the top 53 bits of a draw.
    ///
    /// ```
    /// let mut rng = sere_testkit::Rng::new(2);
    /// assert!((0..1000).map(|_| rng.uniform()).all(|u| (0.0..1.0).contains(&u)));
    /// ```
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, 1)` as f32: the top 24 bits of a draw (exact).
    ///
    /// ```
    /// let mut rng = sere_testkit::Rng::new(3);
    /// assert!((0..1000).map(|_| rng.uniform_f32()).all(|u| (0.0..1.0).contains(&u)));
    /// ```
    pub fn uniform_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[lo, hi)`: `lo + (hi - lo) * uniform()`.
    ///
    /// ```
    /// let x = sere_testkit::Rng::new(4).range(-2.0, 3.0);
    /// assert!((-2.0..3.0).contains(&x));
    /// ```
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform in `[lo, hi)` in f32: `lo + (hi - lo) * uniform_f32()`.
    ///
    /// ```
    /// let x = sere_testkit::Rng::new(5).range_f32(-1.0, 1.0);
    /// assert!((-1.0..1.0).contains(&x));
    /// ```
    pub fn range_f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform_f32()
    }

    /// Standard normal (Box-Muller on two [`uniform`](Self::uniform) draws).
    ///
    /// ```
    /// let mut rng = sere_testkit::Rng::new(6);
    /// let mean = (0..10_000).map(|_| rng.normal()).sum::<f64>() / 10_000.0;
    /// assert!(mean.abs() < 0.05);
    /// ```
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` values of [`range_f32`](Self::range_f32)`(lo, hi)`.
    ///
    /// ```
    /// let v = sere_testkit::Rng::new(7).uniforms(5, 0.5, 1.5);
    /// assert!(v.len() == 5 && v.iter().all(|x| (0.5..1.5).contains(x)));
    /// ```
    pub fn uniforms(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.range_f32(lo, hi)).collect()
    }

    /// `n` normal values times `scale` (multiplied in f64, then rounded to f32).
    ///
    /// ```
    /// let v = sere_testkit::Rng::new(8).normals(3, 0.5);
    /// assert_eq!(v.len(), 3);
    /// ```
    pub fn normals(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n).map(|_| (self.normal() * scale) as f32).collect()
    }
}

/// Maps the top 24 bits of `bits` to `[-1, 1)`, exactly as the older tests did.
fn signed24(bits: u64) -> f32 {
    ((bits >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Knuth's MMIX linear congruential generator, `s = s * 6364136223846793005
/// + 1442695040888963407`: the stream of the CPU-step and GEMM tests, kept
/// so their inputs stay bit-for-bit. Prefer [`Rng`] for new tests.
///
/// ```
/// use sere_testkit::Lcg;
///
/// let mut lcg = Lcg::new(0);
/// assert_eq!(lcg.next_u64(), 1442695040888963407);
/// assert!((-1.0..1.0).contains(&lcg.signed_f32()));
/// ```
#[derive(Debug, Clone)]
pub struct Lcg(u64);

impl Lcg {
    /// A generator whose state is `state` (the first draw steps it).
    ///
    /// ```
    /// let mut a = sere_testkit::Lcg::new(5);
    /// let mut b = sere_testkit::Lcg::new(5);
    /// assert_eq!(a.signed_f32(), b.signed_f32());
    /// ```
    pub fn new(state: u64) -> Self {
        Lcg(state)
    }

    /// Steps the state and returns it.
    ///
    /// ```
    /// let mut lcg = sere_testkit::Lcg::new(1);
    /// assert_eq!(lcg.next_u64(), 6364136223846793005u64.wrapping_add(1442695040888963407));
    /// ```
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// Uniform in `[-1, 1)` from the top 24 bits of the next state.
    ///
    /// ```
    /// let mut lcg = sere_testkit::Lcg::new(9);
    /// assert!((0..1000).map(|_| lcg.signed_f32()).all(|x| (-1.0..1.0).contains(&x)));
    /// ```
    pub fn signed_f32(&mut self) -> f32 {
        signed24(self.next_u64())
    }

    /// `n` values of [`signed_f32`](Self::signed_f32).
    ///
    /// ```
    /// assert_eq!(sere_testkit::Lcg::new(3).signeds(4).len(), 4);
    /// ```
    pub fn signeds(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.signed_f32()).collect()
    }
}

/// Marsaglia's xorshift64 (13, 7, 17) seeded with `seed * 0x9e3779b97f4a7c15
/// | 1`: the stream of the CUDA backend's unit tests (and of the kernel
/// benchmarks), kept so their inputs stay bit-for-bit. Prefer [`Rng`] for
/// new tests.
///
/// ```
/// use sere_testkit::XorShift;
///
/// let v = XorShift::new(1).signeds(3);
/// assert_eq!(v, XorShift::new(1).signeds(3));
/// ```
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// The generator of `seed` (never the all-zero state).
    ///
    /// ```
    /// assert_ne!(sere_testkit::XorShift::new(0).next_u64(), 0);
    /// ```
    pub fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Steps the state and returns it.
    ///
    /// ```
    /// let mut x = sere_testkit::XorShift::new(2);
    /// assert_ne!(x.next_u64(), x.next_u64());
    /// ```
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `[-1, 1)` from the top 24 bits of the next state.
    ///
    /// ```
    /// let x = sere_testkit::XorShift::new(4).signed_f32();
    /// assert!((-1.0..1.0).contains(&x));
    /// ```
    pub fn signed_f32(&mut self) -> f32 {
        signed24(self.next_u64())
    }

    /// `n` values of [`signed_f32`](Self::signed_f32).
    ///
    /// ```
    /// assert_eq!(sere_testkit::XorShift::new(5).signeds(6).len(), 6);
    /// ```
    pub fn signeds(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.signed_f32()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streams the callers relied on before the kit, re-derived here
    /// from the removed copies' formulas.
    #[test]
    fn streams_match_the_formulas_they_replace() {
        // cuda/tests/parity.rs: `lo + (hi - lo) * ((next >> 40) / 2^24)`.
        let (mut a, mut b) = (Rng::new(11), Rng::new(11));
        for _ in 0..1000 {
            let u = (b.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            assert_eq!(a.range_f32(-1.2, 1.2).to_bits(), (-1.2 + 2.4 * u).to_bits());
        }
        // tests/tests/step_gradient.rs's lcg.
        let (mut l, mut s) = (Lcg::new(42), 42u64);
        for _ in 0..1000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let want = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            assert_eq!(l.signed_f32().to_bits(), want.to_bits());
        }
        // host/src/backend/cuda/device/tests.rs's xorshift `data(n, seed)`.
        let mut x = XorShift::new(3);
        let mut s = 3u64.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for _ in 0..1000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let want = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            assert_eq!(x.signed_f32().to_bits(), want.to_bits());
        }
    }
}
