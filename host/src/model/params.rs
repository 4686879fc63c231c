//! Parameters live in one flat `f32` buffer per network with named views:
//! the optimizer, EMA, clipping and checkpointing each become one loop over
//! one buffer, and the student and teacher share one [`ParamLayout`].

use rand::RngExt;
use std::ops::Range;

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros (biases, norm shifts).
    Zeros,
    /// All ones (norm scales).
    Ones,
    /// Truncated normal with this standard deviation, cut at +-2 std
    /// (timm's `trunc_normal_(std=0.02)` for ViT weights).
    TruncNormal(f32),
}

/// One named parameter tensor inside the flat buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamEntry {
    /// Dotted name, e.g. `blocks.0.attn.qkv.weight` (checkpoint key).
    pub name: String,
    /// Shape in PyTorch order (`out x in` for linear weights).
    pub shape: Vec<usize>,
    /// Where it lives in the flat buffer.
    pub range: Range<usize>,
    /// Whether AdamW weight decay applies (not to biases, norms, tokens).
    pub decay: bool,
    /// Initialisation.
    pub init: Init,
}

/// The layout of one network's parameters (shared by student and teacher).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParamLayout {
    entries: Vec<ParamEntry>,
    total: usize,
}

impl ParamLayout {
    /// An empty layout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a parameter and returns its range in the flat buffer.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        init: Init,
        decay: bool,
    ) -> Range<usize> {
        let n: usize = shape.iter().product();
        let range = self.total..self.total + n;
        self.total += n;
        self.entries.push(ParamEntry {
            name: name.into(),
            shape: shape.to_vec(),
            range: range.clone(),
            decay,
            init,
        });
        range
    }

    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.total
    }

    /// Whether the layout holds no parameter.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// All entries in buffer order.
    pub fn entries(&self) -> &[ParamEntry] {
        &self.entries
    }

    /// The entry with this name.
    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Fills `params` (length [`ParamLayout::len`]) by each entry's [`Init`],
    /// drawing from `rng` in buffer order (deterministic for a seed).
    pub fn init(&self, params: &mut [f32], rng: &mut impl rand::Rng) {
        assert_eq!(
            params.len(),
            self.total,
            "parameter buffer has the wrong length"
        );
        for e in &self.entries {
            let p = &mut params[e.range.clone()];
            match e.init {
                Init::Zeros => p.fill(0.0),
                Init::Ones => p.fill(1.0),
                Init::TruncNormal(std) => {
                    for v in p.iter_mut() {
                        *v = trunc_normal(rng) * std;
                    }
                }
            }
        }
    }
}

/// A standard normal sample rejected outside [-2, 2].
fn trunc_normal(rng: &mut impl rand::Rng) -> f32 {
    loop {
        // Box-Muller; one value per pair is enough here.
        let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.random::<f64>();
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        if z.abs() <= 2.0 {
            return z as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ranges_are_contiguous_and_named() {
        let mut l = ParamLayout::new();
        let a = l.add("a.weight", &[3, 4], Init::TruncNormal(0.02), true);
        let b = l.add("a.bias", &[3], Init::Zeros, false);
        assert_eq!((a, b.clone()), (0..12, 12..15));
        assert_eq!(l.len(), 15);
        assert_eq!(l.get("a.bias").unwrap().range, b);
        let mut p = vec![1.0; 15];
        l.init(&mut p, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
        assert!(p[..12].iter().all(|v| v.abs() <= 0.04) && p[12..].iter().all(|&v| v == 0.0));
        assert!(p[..12].iter().any(|&v| v != 0.0));
    }
}
