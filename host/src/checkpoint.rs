//! Checkpoints as safetensors files: named `f32` tensors plus a string map
//! of metadata (step, epoch, RNG state, the run's config, format version).
//!
//! Naming convention (see [`keys`] and [`meta`]):
//! - `student.<param name>` / `teacher.<param name>`: one tensor per
//!   [`ParamLayout`] entry, with its shape;
//! - `optim.m.<param name>` / `optim.v.<param name>`: AdamW moments, laid out
//!   like the student;
//! - `dino.center`: the DINO centre; BN running statistics and any other
//!   state under names of the caller's choosing.
//!
//! Writes are atomic: [`Checkpoint::save_atomic`] writes a hidden temporary
//! file next to the target, fsyncs it, renames it over the target and fsyncs
//! the directory. A failure at any point removes the temporary file and
//! leaves the previous checkpoint untouched.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};

use crate::config::TrainConfig;
use crate::model::params::ParamLayout;

/// The `format` metadata of each kind of file: the one authority for them.
pub mod formats {
    /// A training run's state, as `sere train` writes it
    /// (`train::state::snapshot_state`). Version 2: the SERE heads read the
    /// tokens before the final norm and the student's predictor is stacked
    /// on its projection; a version-1 run's head state meant something
    /// else, so it is not resumed (its backbone still evaluates and exports).
    pub const TRAINING: &str = "sere-train-2";
    /// The training format before the SERE heads' wiring was corrected.
    pub const TRAINING_V1: &str = "sere-train-1";
    /// A backbone alone under timm's names, as `sere export` writes it.
    pub const BACKBONE: &str = "sere-backbone";
    /// A bare container ([`super::Checkpoint::new`]) until its writer names
    /// what it holds.
    pub const CONTAINER: &str = "sere-checkpoint";
}

/// Value of the `format` metadata key of a new, bare [`Checkpoint`].
pub const FORMAT: &str = formats::CONTAINER;
/// The checkpoint layout version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Tensor name prefixes and names.
pub mod keys {
    /// Student parameters: `student.<param name>`.
    pub const STUDENT: &str = "student.";
    /// Teacher parameters: `teacher.<param name>`.
    pub const TEACHER: &str = "teacher.";
    /// AdamW first moments: `optim.m.<param name>`.
    pub const OPTIM_M: &str = "optim.m.";
    /// AdamW second moments: `optim.v.<param name>`.
    pub const OPTIM_V: &str = "optim.v.";
    /// The DINO centre, shape `[out_dim]`.
    pub const CENTRE: &str = "dino.centre";
    /// iBOT's patch centre (runs with masked image modelling only).
    pub const PATCH_CENTRE: &str = "ibot.patch_centre";

    /// Running statistic `stat` (`running_mean` or `running_var`) of the
    /// batch norm `bn` (`projection` or `predictor`) of SERE head `head` in
    /// network `net` (`student` or `teacher`).
    pub fn batch_norm(net: &str, head: &str, bn: &str, stat: &str) -> String {
        format!("bn.{net}.{head}.{bn}.{stat}")
    }
}

/// Metadata keys.
pub mod meta {
    /// Always [`super::FORMAT`].
    pub const FORMAT: &str = "format";
    /// [`super::FORMAT_VERSION`] as a decimal string.
    pub const VERSION: &str = "format_version";
    /// Optimizer steps completed.
    pub const STEP: &str = "step";
    /// Epoch in progress (0-based).
    pub const EPOCH: &str = "epoch";
    /// The run's seed.
    pub const SEED: &str = "seed";
    /// Serialized RNG / data-order state, format chosen by the trainer.
    pub const RNG: &str = "rng_state";
    /// The run's `TrainConfig` as TOML.
    pub const CONFIG: &str = "config";
}

/// Why a checkpoint could not be written, read or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file does not exist.
    #[error("checkpoint {} does not exist; check the path (or the run's --out directory)", path.display())]
    Missing {
        /// The path looked at.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("cannot read checkpoint {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing failed; the previous file at `path` (if any) is unchanged.
    #[error("cannot write checkpoint {}; the previous checkpoint there, if any, is unchanged", path.display())]
    Write {
        /// The target file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not in the safetensors format at all.
    #[error("{} is not a safetensors checkpoint: {detail}", path.display())]
    NotSafetensors {
        /// The file.
        path: PathBuf,
        /// What gave it away.
        detail: String,
    },
    /// The file is shorter than its header says: it was cut short.
    #[error(
        "checkpoint {} is truncated: it has {actual} bytes but needs {expected}; it was cut short \
         (disk full or an interrupted copy): use an earlier checkpoint",
        path.display()
    )]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Bytes the header requires (at least).
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The header is readable but inconsistent.
    #[error("checkpoint {} is corrupt: {detail}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Written by a newer (or unknown) version of this program.
    #[error("checkpoint format version {found} is not supported (this build reads version {supported}); use a matching `sere`")]
    UnsupportedVersion {
        /// The version in the file.
        found: String,
        /// The version this build reads.
        supported: u32,
    },
    /// A tensor is not stored as `f32`.
    #[error("tensor `{name}` is stored as {dtype}, but only F32 checkpoints are supported")]
    WrongDtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A tensor the model needs is absent.
    #[error("tensor `{name}` is missing from the checkpoint; it was written for a different model or is incomplete")]
    MissingTensor {
        /// The tensor.
        name: String,
    },
    /// A tensor under the model's prefix that the model does not have.
    #[error(
        "tensor `{name}` in the checkpoint is not part of this model; the checkpoint was written for a \
         different model configuration (depth, heads, ...)"
    )]
    UnexpectedTensor {
        /// The tensor.
        name: String,
    },
    /// A tensor's shape differs from the model's.
    #[error(
        "tensor `{name}` has shape {found:?} in the checkpoint but the model expects {expected:?}; the \
         checkpoint was written for a different model configuration"
    )]
    ShapeMismatch {
        /// The tensor.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The checkpoint's shape.
        found: Vec<usize>,
    },
    /// A tensor to save whose data length does not match its shape.
    #[error("tensor `{name}` has shape {shape:?} but {len} values; nothing was written")]
    InvalidTensor {
        /// The tensor.
        name: String,
        /// Its declared shape.
        shape: Vec<usize>,
        /// Its number of values.
        len: usize,
    },
    /// A backbone written by `sere export`, where a training checkpoint is
    /// needed.
    #[error(
        "this file is a backbone exported by `sere export` (timm names, no heads or training \
         state); pass the training checkpoint (checkpoint-*.safetensors) it was exported from"
    )]
    ExportedBackbone,
    /// A tensor holds a value no training run writes (NaN, an infinity, a
    /// negative variance): the file was damaged or edited.
    #[error(
        "tensor `{name}` holds {value} at index {index} ({why}); the checkpoint is damaged \
         or was edited: use an earlier checkpoint"
    )]
    BadValue {
        /// The tensor.
        name: String,
        /// The flat index of the first bad value.
        index: usize,
        /// The value.
        value: f32,
        /// Why it cannot be, e.g. "not finite".
        why: &'static str,
    },
    /// A required metadata entry is absent.
    #[error("checkpoint metadata `{key}` is missing; the file was not written by `sere train`")]
    MissingMeta {
        /// The key.
        key: String,
    },
    /// A metadata entry does not parse.
    #[error("checkpoint metadata `{key}` is invalid: {detail}")]
    BadMeta {
        /// The key.
        key: String,
        /// What is wrong.
        detail: String,
    },
}

/// A checkpoint in memory: tensors by name (shape, row-major data) and
/// string metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Tensors by name: `(shape, data)` with `data.len() == shape.product()`.
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// Metadata (step, epoch, config, ...), see [`meta`].
    pub meta: BTreeMap<String, String>,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Self::new()
    }
}

impl Checkpoint {
    /// An empty checkpoint carrying the format name and version.
    pub fn new() -> Self {
        let mut meta = BTreeMap::new();
        meta.insert(meta::FORMAT.to_string(), FORMAT.to_string());
        meta.insert(meta::VERSION.to_string(), FORMAT_VERSION.to_string());
        Checkpoint {
            tensors: BTreeMap::new(),
            meta,
        }
    }

    /// A 64-bit FNV-1a hash of every tensor's name, shape and value bits
    /// (not the metadata): equal states hash equal, so ranks of a
    /// data-parallel run can check they start from the same one.
    pub fn fingerprint(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for (name, (shape, data)) in &self.tensors {
            eat(name.as_bytes());
            shape.iter().for_each(|&d| eat(&(d as u64).to_le_bytes()));
            data.iter().for_each(|v| eat(&v.to_bits().to_le_bytes()));
        }
        h
    }

    /// Adds (or replaces) a tensor. Panics if `data.len()` does not match
    /// `shape` (a programming error).
    pub fn insert(&mut self, name: impl Into<String>, shape: &[usize], data: Vec<f32>) {
        let name = name.into();
        assert_eq!(
            data.len(),
            shape.iter().product::<usize>(),
            "tensor `{name}`: data length does not match shape {shape:?}"
        );
        self.tensors.insert(name, (shape.to_vec(), data));
    }

    /// Adds one tensor per layout entry, named `prefix + entry.name`, e.g.
    /// `insert_params(keys::STUDENT, &layout, &student)`.
    pub fn insert_params(&mut self, prefix: &str, layout: &ParamLayout, params: &[f32]) {
        assert_eq!(
            params.len(),
            layout.len(),
            "parameter buffer does not match its layout"
        );
        for e in layout.entries() {
            self.insert(
                format!("{prefix}{}", e.name),
                &e.shape,
                params[e.range.clone()].to_vec(),
            );
        }
    }

    /// The tensor `name` as `(shape, data)`.
    pub fn tensor(&self, name: &str) -> Result<(&[usize], &[f32]), CheckpointError> {
        self.tensors
            .get(name)
            .map(|(s, d)| (s.as_slice(), d.as_slice()))
            .ok_or_else(|| CheckpointError::MissingTensor {
                name: name.to_string(),
            })
    }

    /// Copies tensor `name` into `out`, checking its shape is `shape`.
    pub fn read_tensor(
        &self,
        name: &str,
        shape: &[usize],
        out: &mut [f32],
    ) -> Result<(), CheckpointError> {
        let (found, data) = self.tensor(name)?;
        if found != shape {
            return Err(CheckpointError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: found.to_vec(),
            });
        }
        assert_eq!(
            out.len(),
            data.len(),
            "output buffer for `{name}` has the wrong length"
        );
        out.copy_from_slice(data);
        Ok(())
    }

    /// Fills `out` (a flat buffer of `layout`) from the tensors
    /// `prefix + entry.name`, checking every shape, and rejects tensors under
    /// `prefix` that the layout does not have.
    pub fn read_params(
        &self,
        prefix: &str,
        layout: &ParamLayout,
        out: &mut [f32],
    ) -> Result<(), CheckpointError> {
        assert_eq!(
            out.len(),
            layout.len(),
            "parameter buffer does not match its layout"
        );
        let mut wanted = HashSet::with_capacity(layout.entries().len());
        for e in layout.entries() {
            let name = format!("{prefix}{}", e.name);
            self.read_tensor(&name, &e.shape, &mut out[e.range.clone()])?;
            wanted.insert(name);
        }
        if let Some(extra) = self
            .tensors
            .keys()
            .find(|k| k.starts_with(prefix) && !wanted.contains(k.as_str()))
        {
            return Err(CheckpointError::UnexpectedTensor {
                name: extra.clone(),
            });
        }
        Ok(())
    }

    /// Sets a metadata entry.
    pub fn set_meta(&mut self, key: impl Into<String>, value: impl ToString) {
        self.meta.insert(key.into(), value.to_string());
    }

    /// A metadata entry, if present.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.meta.get(key).map(String::as_str)
    }

    /// A required metadata entry parsed as `T` (e.g. `u64` for [`meta::STEP`]).
    pub fn meta_parse<T: FromStr>(&self, key: &str) -> Result<T, CheckpointError>
    where
        T::Err: std::fmt::Display,
    {
        let v = self.meta(key).ok_or_else(|| CheckpointError::MissingMeta {
            key: key.to_string(),
        })?;
        v.parse().map_err(|e: T::Err| CheckpointError::BadMeta {
            key: key.to_string(),
            detail: format!("{v:?}: {e}"),
        })
    }

    /// Stores the run's config as TOML under [`meta::CONFIG`].
    pub fn set_config(&mut self, cfg: &TrainConfig) {
        self.set_meta(meta::CONFIG, cfg.to_toml());
    }

    /// The run's config stored by [`Checkpoint::set_config`].
    pub fn config(&self) -> Result<TrainConfig, CheckpointError> {
        if self.meta(meta::FORMAT) == Some(formats::BACKBONE) {
            return Err(CheckpointError::ExportedBackbone);
        }
        let text = self
            .meta(meta::CONFIG)
            .ok_or_else(|| CheckpointError::MissingMeta {
                key: meta::CONFIG.to_string(),
            })?;
        let bad = |e: crate::config::ConfigError| CheckpointError::BadMeta {
            key: meta::CONFIG.to_string(),
            detail: e.to_string(),
        };
        // Validated on every load, not only on resume: a hand-edited config
        // (heads not dividing dim, patch 0) would otherwise build a model
        // that panics.
        let cfg = TrainConfig::from_toml(text).map_err(bad)?;
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }

    /// Checks every tensor for values no training run writes: NaN or an
    /// infinity anywhere, a negative AdamW second moment (`optim.v.*`) or
    /// batch-norm running variance (`*.running_var`). Call it on a training
    /// checkpoint before using it ([`Checkpoint::training_config`] does).
    pub fn check_values(&self) -> Result<(), CheckpointError> {
        for (name, (_, data)) in &self.tensors {
            let variance = name.starts_with(keys::OPTIM_V) || name.ends_with(".running_var");
            let bad = data.iter().enumerate().find_map(|(i, &v)| {
                if !v.is_finite() {
                    Some((i, v, "not finite"))
                } else if variance && v < 0.0 {
                    Some((i, v, "a variance cannot be negative"))
                } else {
                    None
                }
            });
            if let Some((index, value, why)) = bad {
                return Err(CheckpointError::BadValue {
                    name: name.clone(),
                    index,
                    value,
                    why,
                });
            }
        }
        Ok(())
    }

    /// The validated config of a training checkpoint whose values passed
    /// [`Checkpoint::check_values`]: what every command that uses a
    /// training checkpoint (train --resume, eval, visualize, export) reads.
    pub fn training_config(&self) -> Result<TrainConfig, CheckpointError> {
        let cfg = self.config()?;
        self.check_values()?;
        Ok(cfg)
    }

    /// Writes the checkpoint to `path` atomically (temporary file in the
    /// same directory, fsync, rename, directory fsync). On error nothing is
    /// left behind and an existing file at `path` is unchanged.
    pub fn save_atomic(&self, path: impl AsRef<Path>) -> Result<(), CheckpointError> {
        self.save_atomic_with(path.as_ref(), &mut || Ok(()))
    }

    /// [`Checkpoint::save_atomic`] with a hook run just before the rename
    /// (tests inject failures there).
    fn save_atomic_with(
        &self,
        path: &Path,
        before_rename: &mut dyn FnMut() -> io::Result<()>,
    ) -> Result<(), CheckpointError> {
        for (name, (shape, data)) in &self.tensors {
            if shape.iter().product::<usize>() != data.len() {
                return Err(CheckpointError::InvalidTensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    len: data.len(),
                });
            }
        }
        let write_err = |source| CheckpointError::Write {
            path: path.to_path_buf(),
            source,
        };
        let (header, data_len) = self.header().map_err(write_err)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = path.file_name().ok_or_else(|| {
            write_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "path has no file name",
            ))
        })?;
        let (tmp, file) = create_temp(&dir, &file_name.to_string_lossy()).map_err(write_err)?;

        let result = (|| -> io::Result<()> {
            let mut w = BufWriter::with_capacity(1 << 20, file);
            w.write_all(&(header.len() as u64).to_le_bytes())?;
            w.write_all(&header)?;
            let mut buf = Vec::with_capacity(1 << 16);
            for (_, data) in self.tensors.values() {
                for chunk in data.chunks(1 << 14) {
                    buf.clear();
                    buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                    w.write_all(&buf)?;
                }
            }
            let file = w.into_inner().map_err(|e| e.into_error())?;
            let written = file.metadata()?.len();
            let expected = 8 + header.len() as u64 + data_len as u64;
            if written != expected {
                return Err(io::Error::other(format!(
                    "wrote {written} bytes, expected {expected}"
                )));
            }
            file.sync_all()?;
            drop(file);
            before_rename()?;
            fs::rename(&tmp, path)?;
            // Make the rename itself durable; not every platform can open a
            // directory, so this is best effort.
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(write_err(e));
        }
        Ok(())
    }

    /// The safetensors JSON header (padded to 8 bytes) and the data length.
    fn header(&self) -> io::Result<(Vec<u8>, usize)> {
        let mut infos = Vec::with_capacity(self.tensors.len());
        let mut offset = 0usize;
        for (name, (shape, data)) in &self.tensors {
            let n = data.len() * 4;
            infos.push((
                name.clone(),
                TensorInfo {
                    dtype: Dtype::F32,
                    shape: shape.clone(),
                    data_offsets: (offset, offset + n),
                },
            ));
            offset += n;
        }
        let meta: HashMap<String, String> = self
            .meta
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let metadata =
            Metadata::new(Some(meta), infos).map_err(|e| io::Error::other(e.to_string()))?;
        let mut header = serde_json::to_vec(&metadata).map_err(io::Error::other)?;
        header.resize(header.len().next_multiple_of(8), b' ');
        Ok((header, offset))
    }

    /// Reads a checkpoint written by [`Checkpoint::save_atomic`] (or any
    /// safetensors file holding only F32 tensors).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                CheckpointError::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                CheckpointError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses the bytes of a checkpoint file; `path` is only used in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, CheckpointError> {
        let p = || path.to_path_buf();
        let not_st = |detail: &str| CheckpointError::NotSafetensors {
            path: p(),
            detail: detail.to_string(),
        };
        let len = bytes.len() as u64;
        if bytes.len() < 8 {
            return Err(CheckpointError::Truncated {
                path: p(),
                expected: 8,
                actual: len,
            });
        }
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        // safetensors caps the header at 100 MB.
        if !(2..=100_000_000).contains(&n) {
            return Err(not_st(
                "its first 8 bytes do not hold a plausible header length",
            ));
        }
        let header_end = 8 + n;
        // A file of the length field alone is cut short, not garbage.
        let opens_json = bytes.get(8).is_none_or(|&b| b == b'{');
        if !opens_json {
            return Err(not_st("it has no JSON header after the length field"));
        }
        if header_end > len {
            return Err(CheckpointError::Truncated {
                path: p(),
                expected: header_end,
                actual: len,
            });
        }
        let header = std::str::from_utf8(&bytes[8..header_end as usize])
            .map_err(|_| not_st("its header is not UTF-8 text"))?;
        let metadata: Metadata =
            serde_json::from_str(header).map_err(|e| CheckpointError::Corrupt {
                path: p(),
                detail: format!("unreadable header: {e}"),
            })?;
        let expected = header_end + metadata.data_len() as u64;
        if len < expected {
            return Err(CheckpointError::Truncated {
                path: p(),
                expected,
                actual: len,
            });
        }
        if len > expected {
            return Err(CheckpointError::Corrupt {
                path: p(),
                detail: format!("{} unexpected bytes after the last tensor", len - expected),
            });
        }
        let file_meta: BTreeMap<String, String> = metadata
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        if let Some(v) = file_meta.get(meta::VERSION) {
            if v.parse::<u32>().ok() != Some(FORMAT_VERSION) {
                return Err(CheckpointError::UnsupportedVersion {
                    found: v.clone(),
                    supported: FORMAT_VERSION,
                });
            }
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Corrupt {
            path: p(),
            detail: e.to_string(),
        })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            if view.dtype() != Dtype::F32 {
                return Err(CheckpointError::WrongDtype {
                    name: name.to_string(),
                    dtype: view.dtype().to_string(),
                });
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            tensors.insert(name.to_string(), (view.shape().to_vec(), data));
        }
        Ok(Checkpoint {
            tensors,
            meta: file_meta,
        })
    }
}

/// The `__metadata__` entry `key` of the safetensors file at `path`, read
/// from its header alone (not the tensors); `None` when the file is
/// unreadable, not safetensors or has no such entry.
fn header_meta(path: impl AsRef<Path>, key: &str) -> Option<String> {
    use std::io::Read;
    let mut f = File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if !(2..=100_000_000).contains(&n) {
        return None;
    }
    let mut header = Vec::new();
    f.take(n).read_to_end(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v.get("__metadata__")?.get(key)?.as_str().map(String::from)
}

/// The `format` metadata of the safetensors file at `path`, read from its
/// header alone (not the tensors); `None` when the file is unreadable, not
/// safetensors or has no such entry.
pub fn format_of(path: impl AsRef<Path>) -> Option<String> {
    header_meta(path, meta::FORMAT)
}

/// The training step stored in the checkpoint at `path`, read from its
/// header alone; `None` when the file is unreadable or holds no step.
pub fn step_of(path: impl AsRef<Path>) -> Option<u64> {
    header_meta(path, meta::STEP)?.parse().ok()
}

/// What the temporary files of [`Checkpoint::save_atomic`] are named:
/// `.<target name>` followed by this and a unique suffix.
const TEMP_MARK: &str = ".tmp-";

/// Creates a new temporary file for `name` in `dir`:
/// `.<name>.tmp-<pid>-<counter>-<nanoseconds>`. The name is unique even when
/// the PID repeats (PID 1 in every container) and a killed run left its
/// temporary file behind: the file is created with `create_new` and another
/// name is tried while one exists.
fn create_temp(dir: &Path, name: &str) -> io::Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut last = None;
    for _ in 0..64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let tmp = dir.join(format!(
            ".{name}{TEMP_MARK}{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary file name")))
}

/// Whether `name` is a temporary checkpoint file of
/// [`Checkpoint::save_atomic`] (`.checkpoint-<step>.safetensors.tmp-...`
/// or `.checkpoint.safetensors.tmp-...`).
pub fn is_temp_name(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.split_once(TEMP_MARK))
        .is_some_and(|(target, _)| is_checkpoint_name(target))
}

/// Removes the temporary checkpoint files a killed run left in `dir` (see
/// [`is_temp_name`]) and returns them. Only call it while holding the run
/// folder's lock: another run's file being written would go too.
pub fn remove_stale_temps(dir: impl AsRef<Path>) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_str().is_some_and(is_temp_name) && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    removed.sort();
    Ok(removed)
}

/// The conventional file name of the checkpoint after `step` steps:
/// `checkpoint-00001234.safetensors`.
pub fn file_name(step: u64) -> String {
    format!("checkpoint-{step:08}.safetensors")
}

/// The step part of a name shaped like [`file_name`]'s,
/// `checkpoint-<step>.safetensors`, unparsed; `None` for other names.
///
/// ```
/// use sere_host::checkpoint::{file_name, step_in_name};
/// assert_eq!(step_in_name(&file_name(12)), Some("00000012"));
/// assert_eq!(step_in_name("metrics.jsonl"), None);
/// ```
pub fn step_in_name(name: &str) -> Option<&str> {
    name.strip_prefix("checkpoint-")?
        .strip_suffix(".safetensors")
}

/// The rolling checkpoint of a run folder, rewritten at every save (as
/// DINO's `checkpoint.pth`); the numbered ones ([`file_name`]) are those
/// kept.
pub const ROLLING: &str = "checkpoint.safetensors";

/// Whether `name` is a run's checkpoint: numbered ([`file_name`]) or the
/// rolling one ([`ROLLING`]).
///
/// ```
/// use sere_host::checkpoint::{file_name, is_checkpoint_name, ROLLING};
/// assert!(is_checkpoint_name(&file_name(3)) && is_checkpoint_name(ROLLING));
/// assert!(!is_checkpoint_name("export.safetensors"));
/// ```
pub fn is_checkpoint_name(name: &str) -> bool {
    name == ROLLING || step_in_name(name).is_some()
}

/// The newest checkpoint in `dir`: the numbered one ([`file_name`]) with
/// the highest step, or the rolling one ([`ROLLING`]) when its stored step
/// is higher (a run saves the rolling file more often than it keeps a
/// numbered one). Temporary files are ignored.
pub fn latest_in(dir: impl AsRef<Path>) -> io::Result<Option<PathBuf>> {
    let dir = dir.as_ref();
    let mut best: Option<(u64, PathBuf)> = None;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(step) = step_in_name(name).and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, entry.path()));
        }
    }
    let rolling = dir.join(ROLLING);
    if let Some(step) = rolling.is_file().then(|| step_of(&rolling)).flatten() {
        if best.as_ref().is_none_or(|(b, _)| step > *b) {
            best = Some((step, rolling));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Keeps the finished file `from` under the name `to` too, replacing any
/// `to` atomically: a hard link where the file system has them (no second
/// copy on disk; `from` is later replaced by a rename, which leaves the
/// linked contents alone), else a copy. Either is made under a temporary
/// name first, so `to` is never seen half written.
pub fn keep_as(from: &Path, to: &Path) -> io::Result<()> {
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = to
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let (tmp, file) = create_temp(&dir, &name.to_string_lossy())?;
    drop(file);
    fs::remove_file(&tmp)?;
    let made = fs::hard_link(from, &tmp).or_else(|_| fs::copy(from, &tmp).map(drop));
    let result = made.and_then(|()| fs::rename(&tmp, to));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes all but the newest `keep` checkpoints named by [`file_name`]
/// in `dir` (`keep` of 0 keeps every one); returns the removed paths,
/// oldest first. Other files, temporary ones and sub-folders are left.
pub fn prune(dir: impl AsRef<Path>, keep: usize) -> io::Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(step) = step_in_name(name).and_then(|s| s.parse::<u64>().ok()) {
            if entry.file_type()?.is_file() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort();
    let excess = found.len().saturating_sub(keep);
    let mut removed = Vec::with_capacity(excess);
    for (_, path) in found.into_iter().take(excess) {
        fs::remove_file(&path)?;
        removed.push(path);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::Init;

    #[test]
    fn prune_keeps_the_newest_and_nothing_else_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        for step in [3u64, 10, 7, 12] {
            fs::write(dir.path().join(file_name(step)), b"x").unwrap();
        }
        for other in ["metrics.jsonl", ".checkpoint-00000013.safetensors.tmp-1-0"] {
            fs::write(dir.path().join(other), b"x").unwrap();
        }
        fs::create_dir(dir.path().join("checkpoint-00000001.safetensors")).unwrap();
        assert!(prune(dir.path(), 0).unwrap().is_empty());
        let removed = prune(dir.path(), 2).unwrap();
        let names: Vec<String> = removed
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [file_name(3), file_name(7)]);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".checkpoint-00000013.safetensors.tmp-1-0",
                "checkpoint-00000001.safetensors",
                &file_name(10),
                &file_name(12),
                "metrics.jsonl"
            ]
        );
    }

    #[test]
    fn the_rolling_checkpoint_counts_when_it_is_newest() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest_in(dir.path()).unwrap(), None);
        let (mut c, _, _) = sample();
        c.set_meta(meta::STEP, 5u64);
        c.save_atomic(dir.path().join(file_name(5))).unwrap();
        c.set_meta(meta::STEP, 7u64);
        c.save_atomic(dir.path().join(ROLLING)).unwrap();
        assert_eq!(step_of(dir.path().join(ROLLING)), Some(7));
        assert_eq!(
            latest_in(dir.path()).unwrap(),
            Some(dir.path().join(ROLLING))
        );
        keep_as(&dir.path().join(ROLLING), &dir.path().join(file_name(7))).unwrap();
        let numbered = dir.path().join(file_name(7));
        assert_eq!(Checkpoint::load(&numbered).unwrap(), c);
        // A tie goes to the numbered name, which says its step.
        assert_eq!(latest_in(dir.path()).unwrap(), Some(numbered.clone()));
        // Rewriting the rolling file leaves the kept one as it was.
        c.set_meta(meta::STEP, 9u64);
        c.save_atomic(dir.path().join(ROLLING)).unwrap();
        assert_eq!(step_of(&numbered), Some(7));
        assert_eq!(
            latest_in(dir.path()).unwrap(),
            Some(dir.path().join(ROLLING))
        );
        assert!(is_temp_name(".checkpoint.safetensors.tmp-1-2-3"));
        assert!(prune(dir.path(), 1).unwrap().len() == 1 && dir.path().join(ROLLING).exists());
    }

    fn layout() -> ParamLayout {
        let mut l = ParamLayout::new();
        l.add(
            "blocks.0.attn.qkv.weight",
            &[6, 2],
            Init::TruncNormal(0.02),
            true,
        );
        l.add("blocks.0.attn.qkv.bias", &[6], Init::Zeros, false);
        l.add("norm.weight", &[2], Init::Ones, false);
        l
    }

    fn sample() -> (Checkpoint, ParamLayout, Vec<f32>) {
        let l = layout();
        let student: Vec<f32> = (0..l.len()).map(|i| i as f32 * 0.5 - 3.0).collect();
        let teacher: Vec<f32> = student.iter().map(|v| -v).collect();
        let mut c = Checkpoint::new();
        c.insert_params(keys::STUDENT, &l, &student);
        c.insert_params(keys::TEACHER, &l, &teacher);
        c.insert_params(keys::OPTIM_M, &l, &vec![1e-3; l.len()]);
        c.insert_params(keys::OPTIM_V, &l, &vec![f32::MIN_POSITIVE; l.len()]);
        c.insert(keys::CENTRE, &[4], vec![0.25, -1.0, f32::INFINITY, 7.0]);
        c.insert("dino.head.bn.running_mean", &[3], vec![1.0, 2.0, 3.0]);
        c.set_meta(meta::STEP, 1234u64);
        c.set_meta(meta::EPOCH, 3);
        c.set_meta(meta::RNG, "deadbeef:17");
        c.set_config(&TrainConfig::default());
        (c, l, student)
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1234));
        let (c, l, student) = sample();
        c.save_atomic(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back, c);
        let mut out = vec![0.0; l.len()];
        back.read_params(keys::STUDENT, &l, &mut out).unwrap();
        assert_eq!(out, student);
        assert_eq!(
            back.tensor("student.blocks.0.attn.qkv.weight").unwrap().0,
            &[6, 2]
        );
        assert_eq!(back.meta_parse::<u64>(meta::STEP).unwrap(), 1234);
        assert_eq!(back.meta(meta::VERSION), Some("1"));
        assert_eq!(back.config().unwrap(), TrainConfig::default());
        // Readable by the reference reader too.
        let bytes = fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor(keys::CENTRE).unwrap().shape(), &[4]);
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // Overwriting works.
        let mut c2 = c.clone();
        c2.set_meta(meta::STEP, 2000u64);
        c2.save_atomic(&path).unwrap();
        assert_eq!(
            Checkpoint::load(&path).unwrap().meta(meta::STEP),
            Some("2000")
        );
    }

    #[test]
    fn empty_checkpoint_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.safetensors");
        Checkpoint::new().save_atomic(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), Checkpoint::new());
    }

    #[test]
    fn read_params_checks_names_and_shapes() {
        let (c, l, _) = sample();
        let mut out = vec![0.0; l.len()];

        let mut missing = c.clone();
        missing.tensors.remove("teacher.norm.weight");
        match missing.read_params(keys::TEACHER, &l, &mut out) {
            Err(CheckpointError::MissingTensor { name }) => assert_eq!(name, "teacher.norm.weight"),
            r => panic!("{r:?}"),
        }

        let mut other = layout();
        other.add("blocks.1.attn.qkv.bias", &[6], Init::Zeros, false);
        let mut out2 = vec![0.0; other.len()];
        let err = c.read_params(keys::STUDENT, &other, &mut out2).unwrap_err();
        assert!(
            err.to_string()
                .contains("`student.blocks.1.attn.qkv.bias` is missing"),
            "{err}"
        );

        let mut wider = ParamLayout::new();
        wider.add("blocks.0.attn.qkv.weight", &[6, 3], Init::Zeros, true);
        wider.add("blocks.0.attn.qkv.bias", &[6], Init::Zeros, false);
        wider.add("norm.weight", &[2], Init::Ones, false);
        let mut out3 = vec![0.0; wider.len()];
        match c.read_params(keys::STUDENT, &wider, &mut out3) {
            Err(CheckpointError::ShapeMismatch {
                name,
                expected,
                found,
            }) => {
                assert_eq!(name, "student.blocks.0.attn.qkv.weight");
                assert_eq!((expected, found), (vec![6, 3], vec![6, 2]));
            }
            r => panic!("{r:?}"),
        }

        let mut fewer = ParamLayout::new();
        fewer.add("blocks.0.attn.qkv.weight", &[6, 2], Init::Zeros, true);
        fewer.add("blocks.0.attn.qkv.bias", &[6], Init::Zeros, false);
        let mut out4 = vec![0.0; fewer.len()];
        match c.read_params(keys::STUDENT, &fewer, &mut out4) {
            Err(CheckpointError::UnexpectedTensor { name }) => {
                assert_eq!(name, "student.norm.weight")
            }
            r => panic!("{r:?}"),
        }

        assert!(matches!(
            c.meta_parse::<u64>("nope"),
            Err(CheckpointError::MissingMeta { .. })
        ));
        assert!(matches!(
            c.meta_parse::<u64>(meta::RNG),
            Err(CheckpointError::BadMeta { .. })
        ));
    }

    #[test]
    fn missing_truncated_and_garbage_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        assert!(matches!(
            Checkpoint::load(&path),
            Err(CheckpointError::Missing { .. })
        ));

        let (c, _, _) = sample();
        c.save_atomic(&path).unwrap();
        let bytes = fs::read(&path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

        // Cut in the data section, in the header, right after the length
        // field (it used to index past the end), and in the length field.
        for cut in [bytes.len() - 1, 8 + n + 4, 8 + n / 2, 9, 8, 5, 0] {
            let bad = dir.path().join("cut.safetensors");
            fs::write(&bad, &bytes[..cut]).unwrap();
            match Checkpoint::load(&bad) {
                Err(CheckpointError::Truncated {
                    actual, expected, ..
                }) => {
                    assert_eq!(actual, cut as u64);
                    assert!(expected > actual);
                }
                r => panic!("cut at {cut}: {r:?}"),
            }
        }
        let msg = Checkpoint::from_bytes(&bytes[..bytes.len() - 4], &path)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("truncated"), "{msg}");

        // Extra bytes at the end.
        let mut long = bytes.clone();
        long.extend_from_slice(&[0; 4]);
        assert!(matches!(
            Checkpoint::from_bytes(&long, &path),
            Err(CheckpointError::Corrupt { .. })
        ));

        // Garbage: text, random bytes, a PNG-like signature.
        let garbage = dir.path().join("garbage.safetensors");
        fs::write(
            &garbage,
            "this is not a checkpoint, just some text that is long enough",
        )
        .unwrap();
        assert!(matches!(
            Checkpoint::load(&garbage),
            Err(CheckpointError::NotSafetensors { .. })
        ));
        let mut noise = vec![0u8; 4096];
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert!(matches!(
            Checkpoint::from_bytes(&noise, &path),
            Err(CheckpointError::NotSafetensors { .. })
        ));
        let mut fake = 16u64.to_le_bytes().to_vec();
        fake.extend_from_slice(b"\x89PNG\r\n\x1a\n........");
        assert!(matches!(
            Checkpoint::from_bytes(&fake, &path),
            Err(CheckpointError::NotSafetensors { .. })
        ));
        // A JSON header with nonsense in it.
        let mut fake = 16u64.to_le_bytes().to_vec();
        fake.extend_from_slice(b"{\"a\": 1}        ");
        assert!(matches!(
            Checkpoint::from_bytes(&fake, &path),
            Err(CheckpointError::Corrupt { .. })
        ));
    }

    #[test]
    fn wrong_dtype_and_version() {
        let path = Path::new("x.safetensors");
        let data = [1u8, 0, 0, 0];
        let view = safetensors::tensor::TensorView::new(Dtype::I32, vec![1], &data).unwrap();
        let bytes = safetensors::serialize([("ints", view)], None).unwrap();
        match Checkpoint::from_bytes(&bytes, path) {
            Err(CheckpointError::WrongDtype { name, dtype }) => {
                assert_eq!((name.as_str(), dtype.as_str()), ("ints", "I32"))
            }
            r => panic!("{r:?}"),
        }
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![1], &data).unwrap();
        let meta = HashMap::from([(meta::VERSION.to_string(), "99".to_string())]);
        let bytes = safetensors::serialize([("x", view)], Some(meta)).unwrap();
        assert!(matches!(
            Checkpoint::from_bytes(&bytes, path),
            Err(CheckpointError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn failed_save_keeps_previous_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let (c, _, _) = sample();
        c.save_atomic(&path).unwrap();
        let before = fs::read(&path).unwrap();

        let mut newer = c.clone();
        newer.set_meta(meta::STEP, 9999u64);
        newer.insert("big", &[1000], vec![1.0; 1000]);

        // A failure after the data is written, just before the rename.
        let err = newer
            .save_atomic_with(&path, &mut || Err(io::Error::other("injected failure")))
            .unwrap_err();
        assert!(matches!(err, CheckpointError::Write { .. }));
        assert!(err.to_string().contains("unchanged"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), before);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("c.safetensors")]);

        // An inconsistent tensor is refused before anything is written.
        let mut broken = c.clone();
        broken.tensors.insert("bad".into(), (vec![3], vec![1.0; 2]));
        assert!(matches!(
            broken.save_atomic(&path),
            Err(CheckpointError::InvalidTensor { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), before);

        // The target directory cannot be written into (its "parent" is a file).
        let blocker = dir.path().join("not_a_dir");
        fs::write(&blocker, b"x").unwrap();
        assert!(matches!(
            newer.save_atomic(blocker.join("c.safetensors")),
            Err(CheckpointError::Write { .. })
        ));

        // A read-only directory (skipped when running as root, which can
        // write there anyway).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let ro = dir.path().join("ro");
            fs::create_dir(&ro).unwrap();
            let target = ro.join("c.safetensors");
            c.save_atomic(&target).unwrap();
            fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
            let probe = ro.join("probe");
            if fs::write(&probe, b"").is_err() {
                assert!(matches!(
                    newer.save_atomic(&target),
                    Err(CheckpointError::Write { .. })
                ));
                assert_eq!(fs::read(&target).unwrap(), before);
            } else {
                let _ = fs::remove_file(&probe);
            }
            fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
        }

        // And the previous checkpoint still loads.
        assert_eq!(Checkpoint::load(&path).unwrap(), c);
    }

    #[test]
    fn latest_checkpoint_in_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(latest_in(dir.path()).unwrap(), None);
        for step in [5u64, 120, 40] {
            fs::write(dir.path().join(file_name(step)), b"").unwrap();
        }
        fs::write(
            dir.path().join(".checkpoint-00000999.safetensors.tmp-1-0"),
            b"",
        )
        .unwrap();
        fs::write(dir.path().join("notes.txt"), b"").unwrap();
        assert_eq!(
            latest_in(dir.path()).unwrap(),
            Some(dir.path().join(file_name(120)))
        );
    }

    #[test]
    fn a_temporary_name_left_by_a_killed_run_does_not_block_the_next_save() {
        // A run killed with `kill -9` under the same PID (PID 1 in a
        // container) left temporary files: saving must still work.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(3));
        let pid = std::process::id();
        for i in 0..2000 {
            let name = format!(".{}.tmp-{pid}-{i}", file_name(3));
            fs::write(dir.path().join(name), b"stale").unwrap();
        }
        let (c, _, _) = sample();
        c.save_atomic(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap(), c);

        // The stale ones are recognised and removed; nothing else is.
        fs::write(dir.path().join("notes.tmp-1"), b"").unwrap();
        fs::write(dir.path().join(".other.tmp-1-2"), b"").unwrap();
        let removed = remove_stale_temps(dir.path()).unwrap();
        assert_eq!(removed.len(), 2000);
        let mut left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [".other.tmp-1-2", file_name(3).as_str(), "notes.tmp-1"]
        );
        assert!(is_temp_name(".checkpoint-00000003.safetensors.tmp-1-0-5"));
        assert!(!is_temp_name("checkpoint-00000003.safetensors"));
    }

    #[test]
    fn non_finite_values_and_negative_variances_are_refused() {
        let (mut c, _, _) = sample();
        c.tensors.get_mut(keys::CENTRE).unwrap().1[2] = 1.0;
        assert_eq!(c.training_config().unwrap(), TrainConfig::default());
        for (name, i, v, why) in [
            ("teacher.norm.weight", 1, f32::NAN, "not finite"),
            (
                "student.blocks.0.attn.qkv.bias",
                0,
                f32::INFINITY,
                "not finite",
            ),
            ("optim.v.norm.weight", 0, -1.0, "negative"),
            (
                "dino.head.bn.running_mean",
                2,
                f32::NEG_INFINITY,
                "not finite",
            ),
        ] {
            let mut bad = c.clone();
            bad.tensors.get_mut(name).unwrap().1[i] = v;
            let e = bad.training_config().unwrap_err().to_string();
            assert!(e.contains(&format!("`{name}`")) && e.contains(why), "{e}");
        }
        let mut bad = c.clone();
        bad.insert("bn.teacher.x.projection.running_var", &[2], vec![1.0, -0.5]);
        let e = bad.check_values().unwrap_err().to_string();
        assert!(e.contains("running_var") && e.contains("negative"), "{e}");
        // A negative mean or weight is fine.
        bad.insert("bn.teacher.x.projection.running_var", &[2], vec![1.0, 0.0]);
        bad.insert("bn.teacher.x.projection.running_mean", &[1], vec![-3.0]);
        assert!(bad.check_values().is_ok());
    }

    #[test]
    fn a_stored_config_that_cannot_work_is_refused_on_load() {
        let (mut c, _, _) = sample();
        for edit in [("heads = 4", "heads = 3"), ("patch = 4", "patch = 0")] {
            let toml = TrainConfig::default().to_toml();
            assert!(toml.contains(edit.0), "{toml}");
            c.set_meta(meta::CONFIG, toml.replace(edit.0, edit.1));
            let e = c.config().unwrap_err().to_string();
            let key = edit.1.split(' ').next().unwrap();
            assert!(
                e.contains("metadata `config` is invalid") && e.contains(&format!("{key}:")),
                "{e}"
            );
        }
    }
}
