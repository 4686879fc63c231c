//! Data-parallel training: the collectives the step needs, over the
//! processes of one run.
//!
//! N processes with `B / N` images each compute the step of one process
//! with `B` images: the loader gives rank `r` the images `r B/N .. (r+1)
//! B/N` of every global batch, and the engine reduces what spans the batch
//! (gradients, the SERE heads' batch-norm statistics, the DINO and patch
//! centres, the logged losses and the spatial term count). With one
//! process every collective is skipped, so a single-process run is bit for
//! bit the run without this module.
//!
//! The interface ([`Collective`]) is the few collectives the step needs:
//! all-reduce sums of f32 and f64 buffers, a broadcast, a barrier, rank
//! and world size, and an abort that ends every process.
//!
//! Implementations: [`SingleProcess`] (always), MPI through the `mpi` crate
//! (rsmpi, feature `mpi`, for CPU processes on one or many nodes, started
//! by `mpirun`). NCCL for GPUs is not built yet: CUDA runs refuse a world
//! larger than one.

#[cfg(feature = "mpi")]
mod mpi;

use std::fmt;
use std::sync::Arc;

/// A collective failed (the transport, or a call from the wrong thread).
#[derive(Debug, thiserror::Error)]
#[error("data-parallel {op} failed on rank {rank}: {reason}")]
pub struct DistError {
    /// The collective.
    pub op: &'static str,
    /// The calling rank.
    pub rank: usize,
    /// What went wrong.
    pub reason: String,
}

/// The collectives of a data-parallel step over `world()` processes.
/// Every rank calls the same collectives in the same order with buffers of
/// the same length; the result is in every rank's buffer.
pub trait Collective: Send + Sync + fmt::Debug {
    /// This process's rank, `0 .. world()`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world(&self) -> usize;
    /// Element-wise sum over every rank, in place.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), DistError>;
    /// Element-wise sum over every rank, in place (statistics that need
    /// f64 partial sums, as the batch norm's).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError>;
    /// Every rank's `buf` becomes rank `root`'s (`MPI_Bcast`).
    fn broadcast_u64(&self, root: usize, buf: &mut [u64]) -> Result<(), DistError>;
    /// Waits until every rank has called it.
    fn barrier(&self) -> Result<(), DistError>;
    /// Ends every process of the run with `code` (a rank that failed: the
    /// others would otherwise wait in their next collective for ever).
    fn abort(&self, code: i32) -> !;
    /// What the transport is, for the run summary ("MPI (Open MPI 4.1)").
    fn describe(&self) -> String;

    /// Element-wise mean over every rank, in place.
    fn all_reduce_mean_f32(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce_sum_f32(buf)?;
        let inv = 1.0 / self.world() as f32;
        buf.iter_mut().for_each(|v| *v *= inv);
        Ok(())
    }
}

/// The processes of a run, shared by the engine and the batch norms it
/// synchronises (PyTorch's process group).
pub type ProcessGroup = Arc<dyn Collective>;

/// One process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<(), DistError> {
        Ok(())
    }
    fn broadcast_u64(&self, _root: usize, _buf: &mut [u64]) -> Result<(), DistError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), DistError> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        "one process".into()
    }
}

/// The one-process group.
pub fn single() -> ProcessGroup {
    Arc::new(SingleProcess)
}

/// The world size an MPI launcher announced in the environment, if any:
/// Open MPI's `mpirun` (`OMPI_COMM_WORLD_SIZE`) or a PMI one such as
/// MPICH's `mpiexec` or Slurm's `srun --mpi=pmi2` (`PMI_SIZE`).
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The group this process was started in: MPI's world when a launcher
/// started it (and the build has MPI), else one process. A launcher that
/// asks for several processes of a build without MPI is an error: each
/// would otherwise train alone, all into the same folder.
pub fn from_launcher() -> Result<ProcessGroup, String> {
    let Some(n) = launcher_world_size() else {
        return Ok(single());
    };
    #[cfg(feature = "mpi")]
    {
        let _ = n;
        mpi::MpiGroup::init().map(|g| Arc::new(g) as ProcessGroup)
    }
    #[cfg(not(feature = "mpi"))]
    {
        if n > 1 {
            return Err(format!(
                "this sere was started by an MPI launcher with {n} processes but was built \
                 without MPI; rebuild it with `cargo build --release -p sere-host --features mpi` \
                 (needs Open MPI's development files, e.g. Debian's libopenmpi-dev), or run one \
                 process"
            ));
        }
        Ok(single())
    }
}

/// Checks that every rank of `group` holds rank 0's `values` (the step a
/// run starts at, a hash of its state): every rank sees a disagreement and
/// gets the error, so none trains on alone with a state the others lack.
pub fn agree(group: &dyn Collective, what: &str, values: &[u64]) -> Result<(), DistError> {
    if group.world() == 1 {
        return Ok(());
    }
    let mut lead = values.to_vec();
    group.broadcast_u64(0, &mut lead)?;
    // Every rank learns how many differ, not only those that do.
    let mut differ = [f64::from(u8::from(lead != values))];
    group.all_reduce_sum_f64(&mut differ)?;
    if differ[0] == 0.0 {
        return Ok(());
    }
    Err(DistError {
        op: "start",
        rank: group.rank(),
        reason: format!(
            "{} of the {} processes do not start from rank 0's {what}; on several machines \
             --out must be a folder they all see (a shared file system), holding the same \
             checkpoint",
            differ[0],
            group.world()
        ),
    })
}

/// How many processes of this run the launcher started on this machine
/// (Open MPI's `OMPI_COMM_WORLD_LOCAL_SIZE`, MPICH's `MPI_LOCALNRANKS`);
/// 1 without a launcher.
pub fn local_size() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// Worker threads for one of the processes this launcher started on this
/// machine: the cores shared evenly; `None` when one process runs here (it
/// takes every core).
pub fn threads_per_local_rank() -> Option<usize> {
    let local = local_size();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (local > 1).then(|| (cores / local).max(1))
}

/// Which part of every global batch a rank trains on: images
/// `rank * B / world .. (rank + 1) * B / world` (PyTorch's
/// `DistributedSampler` over each batch, in order, no overlap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { rank: 0, world: 1 }
    }
}

impl Shard {
    /// The shard of `group`.
    pub fn of(group: &dyn Collective) -> Self {
        Shard {
            rank: group.rank(),
            world: group.world(),
        }
    }

    /// This rank's positions within a global batch of `global` images;
    /// `None` when the world does not divide it.
    pub fn range(&self, global: usize) -> Option<std::ops::Range<usize>> {
        if self.world == 0 || global % self.world != 0 || self.rank >= self.world {
            return None;
        }
        let per = global / self.world;
        Some(self.rank * per..(self.rank + 1) * per)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_tile_the_global_batch_in_order() {
        let got: Vec<_> = (0..4)
            .map(|rank| Shard { rank, world: 4 }.range(32).unwrap())
            .collect();
        assert_eq!(got, vec![0..8, 8..16, 16..24, 24..32]);
        assert_eq!(Shard { rank: 0, world: 3 }.range(32), None);
        assert_eq!(Shard::default().range(5), Some(0..5));
    }

    /// Rank 1 of a fake group of three: rank 0 holds `lead`, and
    /// `others_differ` of the other two ranks hold something else.
    #[derive(Debug)]
    struct Fake {
        lead: Vec<u64>,
        others_differ: f64,
    }

    impl Collective for Fake {
        fn rank(&self) -> usize {
            1
        }
        fn world(&self) -> usize {
            3
        }
        fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<(), DistError> {
            unimplemented!("not used")
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
            buf[0] += self.others_differ;
            Ok(())
        }
        fn broadcast_u64(&self, root: usize, buf: &mut [u64]) -> Result<(), DistError> {
            assert_eq!(root, 0);
            buf.copy_from_slice(&self.lead);
            Ok(())
        }
        fn barrier(&self) -> Result<(), DistError> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            std::process::exit(code)
        }
        fn describe(&self) -> String {
            "fake".into()
        }
    }

    #[test]
    fn agree_reports_any_disagreement_on_every_rank() {
        let mine = [7u64, 0xdead_beef_0123_4567];
        let group = |lead: [u64; 2], others_differ| Fake {
            lead: lead.to_vec(),
            others_differ,
        };
        agree(&group(mine, 0.0), "state", &mine).unwrap();
        // This rank differs from rank 0 in one bit of its hash.
        let e = agree(&group([7, 0xdead_beef_0123_4566], 0.0), "state", &mine).unwrap_err();
        assert!(e.to_string().contains("1 of the 3 processes"), "{e}");
        // This rank matches rank 0, but rank 2 does not: it fails too.
        let e = agree(&group(mine, 1.0), "state", &mine).unwrap_err();
        assert!(e.to_string().contains("rank 0's state"), "{e}");
    }

    #[test]
    fn a_single_process_reduces_to_the_identity() {
        let g = single();
        let mut v = [1.5f32, -2.0];
        g.all_reduce_mean_f32(&mut v).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!((g.rank(), g.world()), (0, 1));
    }
}
