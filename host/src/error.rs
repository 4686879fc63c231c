//! The top-level error of the `sere` command and its one reporting point.
//!
//! Errors are typed where they arise (config, checkpoint, data, core
//! kernels); [`SereError`] wraps them unchanged so their own words reach the
//! user, and [`report`] prints them once, with their causes, at the command.

use std::error::Error as StdError;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::checkpoint::CheckpointError;
use crate::config::ConfigError;

/// Anything that stops a `sere` command.
#[derive(Debug, thiserror::Error)]
pub enum SereError {
    /// The configuration could not be read or cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The data could not be read or augmented (the data module's error,
    /// boxed so this module does not depend on its type).
    #[error(transparent)]
    Data(Box<dyn StdError + Send + Sync + 'static>),
    /// A numerical kernel refused its inputs (a bug, or a diverged run).
    #[error("a numerical kernel failed: {0}")]
    Core(#[from] sere_core::Error),
    /// A file or directory of the run could not be written or read.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done, e.g. "cannot create output directory".
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The requested device cannot be used (no CUDA build, no GPU, ...).
    #[error("device unavailable: {0}")]
    Device(String),
    /// Training produced a non-finite loss or gradient.
    #[error("training diverged at step {step}: {what} is not finite; lower the learning rate (--lr) or clip gradients harder (--set clip_grad=1)")]
    Diverged {
        /// The step at which it happened.
        step: u64,
        /// Which quantity (e.g. "loss", "gradient norm").
        what: &'static str,
    },
    /// A fresh run was pointed at a directory that already holds a run;
    /// training into it would truncate its metrics and mix its checkpoints
    /// with the new run's (a later `--resume` or `eval` of the directory
    /// would then pick the wrong one).
    #[error(
        "{} already holds a training run ({found}); continue it with `sere train --resume {}` \
         (or its own command), start a new run there with --no-resume (the old one is moved \
         into previous-run/), or train into another --out",
        dir.display(),
        dir.display()
    )]
    RunExists {
        /// The output directory.
        dir: PathBuf,
        /// What was found there, e.g. "metrics.jsonl, 2 checkpoints".
        found: String,
    },
    /// The run's estimated memory exceeds what the machine has available.
    #[error(
        "the run needs about {needed} of memory ({parts}) but only {available} is available; \
         make it smaller (--batch, --dim, --depth, --heads, --out-dim, --overlap, a larger \
         --patch or smaller --img, smaller data) or use a machine with more memory"
    )]
    OutOfMemory {
        /// The estimate.
        needed: String,
        /// `MemAvailable`.
        available: String,
        /// The estimate's parts.
        parts: String,
    },
    /// Another `sere train` holds the run folder's lock.
    #[error(
        "{} is in use by another `sere train` (it holds {}); wait for that run to finish, or \
         train into another --out",
        dir.display(),
        dir.join(crate::train::LOCK_FILE).display()
    )]
    RunLocked {
        /// The run folder.
        dir: PathBuf,
    },
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Other(String),
}

impl SereError {
    /// Wraps a data-side error (e.g. `data::DataError`).
    pub fn data(err: impl StdError + Send + Sync + 'static) -> Self {
        SereError::Data(Box::new(err))
    }

    /// Wraps an I/O error with what was being done and where.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SereError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// Refuses to write a new file over an existing one (a link counts as
/// existing, even a dangling one): `flag` names the option that chose
/// `path`, so the message says what to change. Output files that must not
/// replace anything call this before any work and again when they write.
pub fn refuse_existing(flag: &str, path: &std::path::Path) -> Result<(), SereError> {
    if path.symlink_metadata().is_ok() {
        return Err(SereError::Other(format!(
            "{flag} {} already exists; name a new file (nothing was replaced)",
            path.display()
        )));
    }
    Ok(())
}

/// The message of `err` followed by its causes, one per line as
/// `  caused by: ...`. A cause whose text the message before it already
/// contains is skipped, so errors that print their source inline are not
/// repeated.
pub fn render(err: &(dyn StdError + 'static)) -> String {
    let mut out = format!("error: {err}");
    let mut last = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !last.contains(&text) {
            out.push_str("\n  caused by: ");
            out.push_str(&text);
        }
        last = text;
        cause = c.source();
    }
    out
}

/// Prints `error: ...` and its causes to stderr and returns the failing
/// exit code (1). Use at the end of `main`:
/// `match run() { Ok(()) => ExitCode::SUCCESS, Err(e) => report(&e) }`.
pub fn report(err: &(dyn StdError + 'static)) -> ExitCode {
    let text = render(err);
    let _ = writeln!(std::io::stderr().lock(), "{text}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_causes_once() {
        let e = SereError::io(
            "cannot create output directory",
            "/x/y",
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied"),
        );
        assert_eq!(
            render(&e),
            "error: cannot create output directory /x/y\n  caused by: permission denied"
        );

        // An error that already prints its source inline is not repeated.
        #[derive(Debug, thiserror::Error)]
        #[error("cannot read data: {0}")]
        struct Inline(#[source] std::io::Error);
        let e = SereError::data(Inline(std::io::Error::other("disk on fire")));
        assert_eq!(render(&e), "error: cannot read data: disk on fire");
    }

    #[test]
    fn wrapped_errors_keep_their_words() {
        let cfg_err = crate::config::TrainConfig {
            batch: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        let e: SereError = cfg_err.into();
        let text = render(&e);
        assert!(
            text.starts_with("error: the configuration cannot be used:"),
            "{text}"
        );
        assert!(text.contains("batch: must be at least 1 image"), "{text}");

        let e: SereError = crate::checkpoint::CheckpointError::ExportedBackbone.into();
        assert!(
            render(&e).starts_with("error: this file is a backbone exported by `sere export`"),
            "{}",
            render(&e)
        );
        assert_eq!(report(&e), ExitCode::FAILURE);
    }
}
