//! Random streams keyed by *what* they are for, never by *who* draws them.
//!
//! Every sample's augmentation draws from its own generator, derived from
//! `(seed, epoch, sample index)`, and the epoch's shuffle from
//! `(seed, epoch)`. Nothing depends on thread scheduling, batch size or how
//! many batches were drawn before, which is what makes the loader's output
//! bit-identical across thread counts and lets a resumed run reproduce its
//! batches. ChaCha8 is portable and fixed: the same seed gives the same
//! stream on every platform.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The generator used for all data randomness.
pub type DataRng = ChaCha8Rng;

/// What a stream is for; keeps streams of different purposes independent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Purpose {
    /// Per-sample augmentation.
    Augment = 0x6175_676d,
    /// Per-epoch shuffle.
    Shuffle = 0x7368_7566,
    /// Per-image synthetic rendering.
    Synthetic = 0x7379_6e74,
    /// Per-sample iBOT masks of the global crops (a stream of its own, so
    /// turning masking on or off leaves every crop as it was).
    Mask = 0x6d61_736b,
}

/// SplitMix64 step: a fast, well-mixing bijection on `u64`.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The stream for `purpose` at `(seed, a, b)` (e.g. `a` = epoch, `b` =
/// sample index). Distinct keys give independent-looking streams.
pub fn stream(seed: u64, purpose: Purpose, a: u64, b: u64) -> DataRng {
    let mut h = splitmix(seed ^ splitmix(purpose as u64));
    h = splitmix(h ^ a);
    h = splitmix(h ^ b.rotate_left(17));
    let mut key = [0u8; 32];
    for (i, chunk) in key.chunks_mut(8).enumerate() {
        h = splitmix(h.wrapping_add(i as u64));
        chunk.copy_from_slice(&h.to_le_bytes());
    }
    DataRng::from_seed(key)
}

/// The permutation of `0..n` for one epoch (Fisher-Yates on the epoch's
/// shuffle stream), or the identity when `shuffle` is false.
pub fn epoch_order(seed: u64, epoch: u64, n: usize, shuffle: bool) -> Vec<usize> {
    use rand::RngExt;
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = stream(seed, Purpose::Shuffle, epoch, 0);
        for i in (1..n).rev() {
            let j = rng.random_range(0..=i as u64) as usize;
            order.swap(i, j);
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a = stream(1, Purpose::Augment, 2, 3).next_u64();
        assert_eq!(a, stream(1, Purpose::Augment, 2, 3).next_u64());
        assert_ne!(a, stream(1, Purpose::Augment, 2, 4).next_u64());
        assert_ne!(a, stream(1, Purpose::Augment, 3, 3).next_u64());
        assert_ne!(a, stream(2, Purpose::Augment, 2, 3).next_u64());
        assert_ne!(a, stream(1, Purpose::Shuffle, 2, 3).next_u64());
    }

    #[test]
    fn epoch_order_is_a_permutation_that_changes_per_epoch() {
        let o = epoch_order(7, 0, 100, true);
        let mut s = o.clone();
        s.sort_unstable();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(o, epoch_order(7, 0, 100, true));
        assert_ne!(o, epoch_order(7, 1, 100, true));
        assert_eq!(epoch_order(7, 0, 5, false), vec![0, 1, 2, 3, 4]);
    }
}
