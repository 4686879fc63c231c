//! MPI through rsmpi (the `mpi` crate): one process per rank of
//! `MPI_COMM_WORLD`, started by `mpirun`.

use super::{Collective, DistError};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use std::fmt;
use std::sync::Mutex;
use std::thread::ThreadId;

/// `MPI_COMM_WORLD`, initialised with `MPI_THREAD_FUNNELED`: rayon's
/// workers never call MPI, only the thread that initialised it does, and
/// every collective checks that it is that thread.
pub(super) struct MpiGroup {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    owner: ThreadId,
    library: String,
    // The send sides of the all-reduces, kept from step to step.
    send_f32: Mutex<Vec<f32>>,
    send_f64: Mutex<Vec<f64>>,
    // Finalises MPI when the group is dropped (after the world above).
    _universe: Universe,
}

// SAFETY: MPI is initialised FUNNELED and every method that calls MPI first
// checks (`on_owner`) that it runs on the initialising thread, so sharing
// the handle between threads never makes two threads call MPI.
unsafe impl Send for MpiGroup {}
// SAFETY: as above.
unsafe impl Sync for MpiGroup {}

impl fmt::Debug for MpiGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MpiGroup(rank {} of {})", self.rank, self.size)
    }
}

impl MpiGroup {
    pub(super) fn init() -> Result<Self, String> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or("MPI was already initialised in this process")?;
        if level < Threading::Funneled {
            return Err(format!(
                "this MPI library offers only {level:?} threading; sere needs FUNNELED"
            ));
        }
        let world = universe.world();
        // "Open MPI v4.1.4, package: ..., repo rev: ...": the name and
        // version only.
        let library = mpi::environment::library_version()
            .unwrap_or_else(|_| "MPI".into())
            .split([',', '\n'])
            .next()
            .unwrap_or("MPI")
            .trim()
            .to_string();
        Ok(MpiGroup {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            owner: std::thread::current().id(),
            library,
            send_f32: Mutex::default(),
            send_f64: Mutex::default(),
            _universe: universe,
        })
    }

    /// `MPI_Allreduce(SUM)` of `buf` into itself, through `send`.
    fn sum_in_place<T: Equivalence + Copy>(
        &self,
        buf: &mut [T],
        send: &Mutex<Vec<T>>,
    ) -> Result<(), DistError> {
        self.on_owner("all-reduce")?;
        // MPI_IN_PLACE is not in rsmpi's safe API; one copy of the send
        // side is small next to the transfer itself, and its buffer is
        // reused (only the owner thread gets here, so the lock is free).
        let mut send = send.lock().unwrap_or_else(|e| e.into_inner());
        send.clear();
        send.extend_from_slice(buf);
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }

    fn on_owner(&self, op: &'static str) -> Result<(), DistError> {
        if std::thread::current().id() == self.owner {
            Ok(())
        } else {
            Err(DistError {
                op,
                rank: self.rank,
                reason: "called from a thread other than the one that initialised MPI".into(),
            })
        }
    }
}

impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<(), DistError> {
        self.sum_in_place(buf, &self.send_f32)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), DistError> {
        self.sum_in_place(buf, &self.send_f64)
    }
    fn broadcast_u64(&self, root: usize, buf: &mut [u64]) -> Result<(), DistError> {
        self.on_owner("broadcast")?;
        if root >= self.size {
            return Err(DistError {
                op: "broadcast",
                rank: self.rank,
                reason: format!("root {root} is not a rank of {}", self.size),
            });
        }
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<(), DistError> {
        self.on_owner("barrier")?;
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn describe(&self) -> String {
        format!("MPI, {} processes ({})", self.size, self.library)
    }
}
