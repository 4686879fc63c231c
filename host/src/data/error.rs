//! The one error type of the data side. Each variant names the file or
//! setting at fault and says what to do, because these messages reach the
//! user unchanged through the `sere` command.

use std::path::PathBuf;

/// Everything that can go wrong while reading, parsing or augmenting data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read at all.
    #[error("cannot read {path}: {source}; check that it exists and is readable")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An image file exists but does not decode.
    #[error(
        "cannot decode image {path}: {source}; the file is unreadable or corrupt, \
         remove or replace it"
    )]
    Decode {
        /// The image file.
        path: PathBuf,
        /// What the decoder said.
        #[source]
        source: image::ImageError,
    },
    /// A dataset file has the wrong layout (bad magic number, truncated, ...).
    #[error("{path} is not a valid {format} file: {detail}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The expected format, e.g. "IDX images".
        format: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// An entry of an image folder that cannot be read as a file or a
    /// class name.
    #[error("{path} {detail}")]
    BadEntry {
        /// The entry.
        path: PathBuf,
        /// What is wrong and what to do.
        detail: &'static str,
    },
    /// A required file or directory is missing.
    #[error("{what} not found at {path}; {hint}")]
    Missing {
        /// What was looked for.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// How to fix it.
        hint: &'static str,
    },
    /// A dataset directory holds no usable images.
    #[error("no images found in {path}; {hint}")]
    Empty {
        /// The directory.
        path: PathBuf,
        /// The layouts that are understood.
        hint: &'static str,
    },
    /// Two parts of a dataset disagree (label count, image size, class set).
    #[error("inconsistent dataset at {path}: {detail}")]
    Inconsistent {
        /// The file or directory.
        path: PathBuf,
        /// What disagrees.
        detail: String,
    },
    /// The data spec string could not be understood.
    #[error(
        "bad data spec '{spec}': {detail}. Expected one of: synthetic, \
         synthetic:size=32,train=5000,test=1000,seed=0, folder:PATH, idx:PATH, \
         cifar10:PATH, or a plain PATH (detected by its contents)"
    )]
    Spec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A setting of the augmentation, loader or evaluation view is invalid.
    #[error("invalid {what}: {detail}")]
    Config {
        /// The setting.
        what: &'static str,
        /// Why it is invalid and what is allowed.
        detail: String,
    },
    /// The loader's worker thread failed or stopped unexpectedly.
    #[error("data loader stopped: {0}")]
    Loader(String),
    /// An array that should be one contiguous, row-major block is not (the
    /// data side only builds such arrays; this is a bug, please report it).
    #[error(
        "{0} are not in standard (row-major, contiguous) layout; this is a bug, please report it"
    )]
    Layout(&'static str),
}

impl DataError {
    /// Shorthand for [`DataError::Io`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`DataError::Config`].
    pub(crate) fn config(what: &'static str, detail: impl Into<String>) -> Self {
        DataError::Config {
            what,
            detail: detail.into(),
        }
    }
}

/// Result alias of the data side.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
