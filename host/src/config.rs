//! Training configuration: every knob of a run in one [`TrainConfig`].
//!
//! Values are merged in this order, later layers winning:
//! **built-in defaults < preset < config file < command-line flags**.
//! [`TrainConfig::load`] does the first three (the preset may come from the
//! command line even though the file's keys still win over it), and
//! `cli::TrainArgs::apply` does the last.
//!
//! The defaults describe the run `sere train` makes with no arguments (the
//! `nano` preset: a 4-block ViT of width 64 on the 32 px synthetic images,
//! with a recipe found by measurement for a run of a few CPU minutes, see
//! [`TrainConfig::default`]): about 3-4 minutes on two CPU cores, evaluation
//! included. The `micro`, `tiny` and `small` presets change only the
//! encoder's width, depth and heads (micro: width 128; ViT-Ti and ViT-S);
//! crop sizes, patch size and the rest stay as configured.
//!
//! A config file is TOML with the same keys as the fields below, e.g.
//!
//! ```toml
//! preset = "small"
//! img = 64
//! patch = 8
//! epochs = 30
//! global_scale = [0.4, 1.0]
//! ```
//!
//! Unknown keys are errors that name the key, so a typo never silently falls
//! back to a default.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A named encoder size. Presets set `dim`, `depth` and `heads` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The default, for a run of a few CPU minutes: dim 64, depth 4,
    /// heads 4.
    #[default]
    Nano,
    /// Small CPU model: dim 128, depth 4, heads 4 (the default before the
    /// nano preset; the Fashion-MNIST ablations in BENCHMARKS.md use it).
    Micro,
    /// ViT-Ti: dim 192, depth 12, heads 3.
    #[value(alias = "vit_tiny")]
    Tiny,
    /// ViT-S: dim 384, depth 12, heads 6 (the paper's main model).
    #[value(alias = "vit_small")]
    Small,
    /// ViT-B: dim 768, depth 12, heads 12.
    #[value(alias = "vit_base")]
    Base,
    /// No preset: `dim`, `depth` and `heads` are taken as given (defaults
    /// are the nano sizes).
    Custom,
}

impl Preset {
    /// `(dim, depth, heads)` of this preset, `None` for [`Preset::Custom`].
    pub fn dims(self) -> Option<(usize, usize, usize)> {
        match self {
            Preset::Nano => Some((64, 4, 4)),
            Preset::Micro => Some((128, 4, 4)),
            Preset::Tiny => Some((192, 12, 3)),
            Preset::Small => Some((384, 12, 6)),
            Preset::Base => Some((768, 12, 12)),
            Preset::Custom => None,
        }
    }

    /// The lowercase name used in config files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Nano => "nano",
            Preset::Micro => "micro",
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Base => "base",
            Preset::Custom => "custom",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the points of an overlap grid sit (sere-core's `GridPlacement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OverlapGrid {
    /// At the centres of `S x S` cells of the overlap (the method's
    /// statement; the default).
    #[default]
    Centres,
    /// From edge to edge of the overlap, `i / (S - 1)` (the authors' code).
    EdgeToEdge,
}

impl OverlapGrid {
    /// The core's placement.
    pub fn placement(self) -> sere_core::geometry::GridPlacement {
        match self {
            OverlapGrid::Centres => sere_core::geometry::GridPlacement::CellCentres,
            OverlapGrid::EdgeToEdge => sere_core::geometry::GridPlacement::EdgeToEdge,
        }
    }
}

/// Which parameters AdamW's weight decay applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DecayRule {
    /// DINO's and iBOT's: every tensor but biases and 1-D tensors (the
    /// default).
    #[default]
    Dino,
    /// The SERE authors' code: every tensor but the 1-D weights of the
    /// layer and batch norms (biases are decayed too).
    Authors,
}

impl DecayRule {
    /// Whether the parameter `name` (registered with DINO's flag
    /// `dino_decays`, shape `shape`) is decayed under this rule.
    ///
    /// ```
    /// use sere_host::config::DecayRule;
    /// let bias = ("backbone.blocks.0.attn.qkv.bias", &[24][..], false);
    /// let norm = ("spatial_global.projector.bn.weight", &[8][..], false);
    /// assert!(!DecayRule::Dino.decays(bias.0, bias.1, bias.2));
    /// assert!(DecayRule::Authors.decays(bias.0, bias.1, bias.2));
    /// assert!(!DecayRule::Authors.decays(norm.0, norm.1, norm.2));
    /// ```
    pub fn decays(self, name: &str, shape: &[usize], dino_decays: bool) -> bool {
        match self {
            DecayRule::Dino => dino_decays,
            DecayRule::Authors => {
                let norm_weight = shape.len() == 1
                    && ["norm1.weight", "norm2.weight", "norm.weight", "bn.weight"]
                        .iter()
                        .any(|n| name.ends_with(n));
                !norm_weight
            }
        }
    }
}

/// What a (teacher, student) pair of crops that do not overlap adds to the
/// spatial relation loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum NonOverlapping {
    /// Nothing: the spatial loss is the mean over overlapping pairs (the
    /// default; the method sheet's statement).
    #[default]
    Drop,
    /// Uniform relation rows, as in the authors' code: the pair counts in
    /// the mean with the constant `ln P` and no gradient.
    Uniform,
}

/// Where the step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The host CPU (always available).
    #[default]
    Cpu,
    /// An NVIDIA GPU through the CUDA backend.
    Cuda,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// Every setting of a training run. See the module docs for the merge
/// order; each field's doc gives its default and meaning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    // ---- data ----
    /// Data source spec (default `"synthetic"`): `synthetic`, or a path /
    /// spec understood by the data module (image folder, MNIST IDX, CIFAR).
    pub data: String,

    // ---- encoder ----
    /// Encoder size preset (default `nano`); sets `dim`, `depth`, `heads`.
    pub preset: Preset,
    /// Global crop size in pixels (default 32).
    pub img: usize,
    /// Local crop size in pixels (default 16).
    pub local_img: usize,
    /// Patch size in pixels (default 4); must divide `img` and `local_img`.
    pub patch: usize,
    /// Token width C (default 64, from the preset).
    pub dim: usize,
    /// Number of transformer blocks (default 4, from the preset).
    pub depth: usize,
    /// Attention heads (default 4, from the preset); must divide `dim`.
    pub heads: usize,
    /// MLP hidden width as a multiple of `dim` (default 4).
    pub mlp_ratio: f64,
    /// Stochastic depth rate of the last block, linear from 0 (default 0.1).
    pub drop_path: f64,

    // ---- schedule & batch ----
    /// Images per step (default 16: in a run of minutes, more steps of
    /// fewer images learn more than fewer, larger ones).
    pub batch: usize,
    /// Local crops per image (default 4; the paper uses 10). 0 disables them.
    pub locals: usize,
    /// Training length in epochs (default 3: 936 steps of the defaults on
    /// the synthetic data, about 3 minutes on 2 CPU cores).
    pub epochs: usize,
    /// Training length in optimizer steps; when set it overrides `epochs`
    /// (schedules then treat `steps` as the whole run).
    pub steps: Option<u64>,

    // ---- loss weights ----
    /// Weight of the spatial self-relation loss (default 0.5; the paper's
    /// 0.2 learns less in a run of minutes, see BENCHMARKS.md).
    pub alpha: f64,
    /// Weight of the channel self-relation loss (default 3.0; the paper's
    /// 0.5 learns less in a run of minutes). The image-level loss is
    /// weighted `(4 - alpha - beta) / 2` (0.25 with the defaults).
    pub beta: f64,

    // ---- optimizer ----
    /// Base learning rate for a batch of 256 (default 2e-2: a peak of
    /// 1.25e-3 at batch 16; the paper's base rate is 5e-4). The peak rate
    /// actually used is `lr * batch / 256` (the authors' linear scaling
    /// rule), see [`TrainConfig::peak_lr`].
    pub lr: f64,
    /// Final learning rate of the cosine schedule (default 1e-6; not scaled).
    pub min_lr: f64,
    /// Linear learning-rate warm-up, in epochs (default 1; 10 in the paper).
    pub warmup_epochs: usize,
    /// Weight decay at the start of the cosine schedule (default 0.04).
    pub weight_decay: f64,
    /// Weight decay at the end of the cosine schedule (default 0.4).
    pub weight_decay_end: f64,
    /// Which tensors are decayed: `dino` (biases and 1-D tensors exempt;
    /// default) or `authors` (only the norms' 1-D weights exempt).
    pub weight_decay_rule: DecayRule,
    /// Teacher EMA momentum at the start, cosine to 1 (default 0.95; the
    /// paper's 0.996 leaves the teacher at its initialisation in a run of a
    /// few hundred steps).
    pub momentum_teacher: f64,
    /// Clip each parameter tensor's gradient to this L2 norm, as DINO does
    /// (default 3.0; 0 disables).
    pub clip_grad: f64,
    /// Keep the DINO head's last layer frozen for this many epochs (default
    /// 0; 1 in the paper).
    pub freeze_last_layer: usize,

    // ---- DINO head ----
    /// Prototypes K of the DINO head (default 1024; 8192 in the paper).
    pub out_dim: usize,
    /// Hidden width of the DINO head MLP (default 512; 2048 in the paper).
    pub head_hidden: usize,
    /// Bottleneck width before the weight-normalised last layer (default
    /// 128; 256 in the paper).
    pub bottleneck: usize,
    /// Fix the gain of the weight-normalised last layer to 1 (default true,
    /// DINO's default; the authors' SERE and iBOT ViT-S/16 recipes learn
    /// it: false).
    pub norm_last_layer: bool,
    /// Teacher temperature at the start of its warm-up (default 0.04).
    pub warmup_teacher_temp: f64,
    /// Teacher temperature after the warm-up (default 0.04).
    pub teacher_temp: f64,
    /// Length of the linear teacher-temperature warm-up, in epochs (default 3).
    pub warmup_teacher_temp_epochs: usize,
    /// Student temperature of the DINO loss (default 0.1).
    pub student_temp: f64,
    /// EMA momentum of the DINO centre (default 0.9).
    pub center_momentum: f64,

    // ---- iBOT masked image modelling ----
    /// iBOT's masked image modelling (default off; the authors' default
    /// objective): block masks on the student's global crops, a learned mask
    /// token, a patch head and the masked-patch loss added to the image
    /// loss (`L_I = L_cls + L_mim`). Off, the image loss is DINO's alone.
    pub mim: bool,
    /// Probability that a student global crop is masked at all (default
    /// 0.5, iBOT's).
    pub mask_probability: f64,
    /// Range of the masked fraction of a masked crop's patches, drawn
    /// uniformly (default [0.1, 0.5]: iBOT's pred_ratio 0.3 +- 0.2).
    pub mask_ratio: (f64, f64),
    /// The patch head is the CLS head itself (default true, as the authors'
    /// recipes); false gives it its own parameters and `patch_out_dim`.
    pub shared_head: bool,
    /// Prototypes of a separate patch head (default 4096; unused with
    /// `shared_head`, where the CLS head's `out_dim` serves both).
    pub patch_out_dim: usize,
    /// Patch teacher temperature at the start of its warm-up (default 0.04),
    /// warmed up linearly over `warmup_teacher_temp_epochs`.
    pub warmup_patch_teacher_temp: f64,
    /// Patch teacher temperature after the warm-up (default 0.07, iBOT's).
    pub patch_teacher_temp: f64,

    // ---- self-relations ----
    /// Teacher temperature of the spatial relation (default 0.5).
    pub spatial_tau_t: f64,
    /// Teacher temperature of the channel relation (default 0.1).
    pub channel_tau_t: f64,
    /// Side of the sampling grid in the overlap of two global crops
    /// (default 7 = tokens per side - 1 for img 32 / patch 4; 13 in the paper).
    pub overlap: usize,
    /// Side of the sampling grid in a global/local overlap (default 4; 6 in
    /// the paper).
    pub local_overlap: usize,
    /// Where the grid points sit in the overlap: `centres` of its cells
    /// (default) or `edge-to-edge` (the authors' code).
    pub overlap_grid: OverlapGrid,
    /// Pairs of crops without overlap: `drop` them from the spatial mean
    /// (default) or count them as `uniform` rows (the authors' code).
    pub non_overlapping: NonOverlapping,

    // ---- augmentation ----
    /// Area fraction range of the global crops (default [0.4, 1.0]).
    pub global_scale: (f64, f64),
    /// Area fraction range of the local crops (default [0.05, 0.4]).
    pub local_scale: (f64, f64),

    // ---- run ----
    /// Seed of every random stream (default 0).
    pub seed: u64,
    /// Worker threads (default: all cores).
    pub threads: Option<usize>,
    /// Backend (default `cpu`).
    pub device: Device,
    /// Output directory for checkpoints and metrics (default:
    /// `runs/<UTC date-time>`, see [`TrainConfig::out_dir`]).
    pub out: Option<PathBuf>,
    /// Start the student and the teacher from this backbone (timm's names:
    /// a `sere export` file, a timm/Hugging Face safetensors `state_dict`,
    /// or a training checkpoint's teacher), matched strictly; the heads keep
    /// their initialisation. Read at step 0 only (default: none).
    pub init_from: Option<PathBuf>,
    /// Train on this many images of the training split, spread evenly over
    /// it (default 0: all). An epoch is then shorter, so every schedule
    /// counted in epochs keeps its shape in a short run: what a recipe
    /// sweep needs.
    pub train_images: usize,
    /// Rewrite the rolling checkpoint (`checkpoint.safetensors`, DINO's
    /// `checkpoint.pth`) every this many steps (default 200; 0: only at the
    /// end of each epoch and of the run). It is what a rerun resumes from.
    pub checkpoint_every: u64,
    /// Also keep a numbered checkpoint (`checkpoint-<step>.safetensors`)
    /// every this many steps (default 0: only by `keep_every_epochs` and at
    /// the end of the run).
    pub keep_every: u64,
    /// Keep a numbered checkpoint at the end of every this many epochs
    /// (default 20, DINO's `saveckp_freq`; 0: none but the last). The run's
    /// final checkpoint is always kept.
    pub keep_every_epochs: usize,
    /// Log metrics every this many steps (default 10).
    pub log_every: u64,
    /// Keep only the newest this many numbered checkpoints of the run
    /// folder, removing older ones after each save (default 0: keep every
    /// one; the rolling checkpoint is not counted).
    pub keep_last: usize,
    /// When the run ends, evaluate its final checkpoint on the test split
    /// of `data` (default true): weighted 20-NN of the trained teacher, of
    /// the random initialisation and of raw pixels, and the teacher's
    /// linear probe, printed and written to `eval.json` in the run folder.
    /// Data without a test split skips it; `--no-eval` switches it off.
    pub final_eval: bool,
    /// Score the teacher every this many steps (and at the last) with a
    /// weighted 20-NN on a fixed subset of the data, logged as `knn_top1`
    /// in `metrics.jsonl` (default 0: off; needs a test split). See
    /// [`crate::eval::monitor`].
    pub eval_every: u64,
    /// Training images of that k-NN's memory, spread evenly over the
    /// training split (default 5000).
    pub eval_train_images: usize,
    /// Test images it scores, spread evenly over the test split (default
    /// 1000).
    pub eval_test_images: usize,
}

/// The defaults are the recipe of `sere train` with no arguments: the nano
/// ViT, batch 16, 3 epochs of the synthetic data, a fast teacher (momentum
/// 0.95 -> 1), a small DINO head and the relation losses weighted up
/// (alpha 0.5, beta 3.0). They were chosen by short measured runs
/// (BENCHMARKS.md, "The default run") so that the run shows learning in a
/// few CPU minutes; the paper's values are named in each field's doc.
impl Default for TrainConfig {
    fn default() -> Self {
        let (dim, depth, heads) = Preset::Nano.dims().expect("nano has dims");
        TrainConfig {
            data: "synthetic".to_string(),
            preset: Preset::Nano,
            img: 32,
            local_img: 16,
            patch: 4,
            dim,
            depth,
            heads,
            mlp_ratio: 4.0,
            drop_path: 0.1,
            batch: 16,
            locals: 4,
            epochs: 3,
            steps: None,
            alpha: 0.5,
            beta: 3.0,
            lr: 2e-2,
            min_lr: 1e-6,
            warmup_epochs: 1,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            weight_decay_rule: DecayRule::Dino,
            momentum_teacher: 0.95,
            clip_grad: 3.0,
            freeze_last_layer: 0,
            out_dim: 1024,
            head_hidden: 512,
            bottleneck: 128,
            norm_last_layer: true,
            warmup_teacher_temp: 0.04,
            teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 3,
            student_temp: 0.1,
            center_momentum: 0.9,
            mim: false,
            mask_probability: 0.5,
            mask_ratio: (0.1, 0.5),
            shared_head: true,
            patch_out_dim: 4096,
            warmup_patch_teacher_temp: 0.04,
            patch_teacher_temp: 0.07,
            spatial_tau_t: 0.5,
            channel_tau_t: 0.1,
            overlap: 7,
            local_overlap: 4,
            overlap_grid: OverlapGrid::Centres,
            non_overlapping: NonOverlapping::Drop,
            global_scale: (0.4, 1.0),
            local_scale: (0.05, 0.4),
            seed: 0,
            threads: None,
            device: Device::Cpu,
            out: None,
            init_from: None,
            train_images: 0,
            checkpoint_every: 200,
            keep_every: 0,
            keep_every_epochs: 20,
            log_every: 10,
            keep_last: 0,
            final_eval: true,
            eval_every: 0,
            eval_train_images: 5000,
            eval_test_images: 1000,
        }
    }
}

/// A rough estimate of a training run's peak memory, in bytes (as `f64`,
/// so absurd sizes do not overflow), from [`TrainConfig::memory_estimate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryEstimate {
    /// Parameters: student, teacher, gradients and the two AdamW moments.
    pub weights: f64,
    /// What one step keeps for its backward pass: the ViT's activations
    /// and attention maps of every crop, the heads' outputs and the spatial
    /// and channel relation matrices.
    pub activations: f64,
}

impl MemoryEstimate {
    /// The whole estimate.
    pub fn total(&self) -> f64 {
        self.weights + self.activations
    }
}

/// `bytes` in words: `1.5 GiB`, `12.0 MiB`.
pub fn format_bytes(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} bytes")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// One thing wrong with a configuration: the key at fault and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The config key (also the flag name with `_` -> `-`).
    pub key: &'static str,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a configuration could not be read or used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys / wrong types.
    /// The message carries TOML's line and column and names the key.
    #[error("invalid config file {}:\n{message}", path.display())]
    Parse {
        /// The file (or `<string>` for text parsed directly).
        path: PathBuf,
        /// The parser's message (line, column, key).
        message: String,
    },
    /// A `KEY=VALUE` override could not be applied.
    #[error("invalid setting `{setting}`: {message}")]
    Override {
        /// The override as written.
        setting: String,
        /// What is wrong.
        message: String,
    },
    /// The values are readable but cannot work together.
    #[error("{}", format_problems(.0))]
    Invalid(Vec<ConfigProblem>),
}

fn format_problems(problems: &[ConfigProblem]) -> String {
    let mut s = String::from("the configuration cannot be used:");
    for p in problems {
        s.push_str("\n  - ");
        s.push_str(&p.to_string());
    }
    s
}

impl TrainConfig {
    /// The built-in defaults with `preset`'s encoder sizes applied.
    pub fn with_preset(preset: Preset) -> Self {
        let mut cfg = TrainConfig::default();
        cfg.set_preset(preset);
        cfg
    }

    /// Sets `preset` and, unless it is `custom`, its `dim`, `depth`, `heads`.
    pub fn set_preset(&mut self, preset: Preset) {
        self.preset = preset;
        if let Some((dim, depth, heads)) = preset.dims() {
            self.dim = dim;
            self.depth = depth;
            self.heads = heads;
        }
    }

    /// Defaults < preset < `file`: reads the TOML file (if any) and layers it
    /// over the preset. The preset is `preset` when given (the command line),
    /// else the file's `preset` key, else `nano`; keys set in the file win
    /// over the preset's sizes either way. Does not validate.
    pub fn load(file: Option<&Path>, preset: Option<Preset>) -> Result<Self, ConfigError> {
        match file {
            None => Ok(Self::with_preset(preset.unwrap_or_default())),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::from_toml_layered(&text, preset).map_err(|e| match e {
                    ConfigError::Parse { message, .. } => ConfigError::Parse {
                        path: path.to_path_buf(),
                        message,
                    },
                    other => other,
                })
            }
        }
    }

    /// Like [`TrainConfig::load`] for TOML text already in memory.
    pub fn from_toml_layered(text: &str, preset: Option<Preset>) -> Result<Self, ConfigError> {
        let base = Self::with_preset(preset.unwrap_or_default());
        Ok(Self::layer_toml(text, base, preset.is_some())?.0)
    }

    /// TOML text layered over `base`: the text's `preset` key (unless a
    /// preset was given on the command line, `preset_given`) sets its
    /// sizes first, then every key of the text wins. Returns the config
    /// and the keys the text set (the preset's sizes among them when it
    /// applied). Does not validate.
    pub fn layer_toml(
        text: &str,
        mut base: TrainConfig,
        preset_given: bool,
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            message: e.to_string().trim_end().to_string(),
        };
        // Parsing straight into the struct first gives errors with line,
        // column and the offending key (unknown key, wrong type).
        let direct: TrainConfig = toml::from_str(text).map_err(parse_err)?;
        let table: toml::Table = toml::from_str(text).map_err(parse_err)?;
        let mut keys: Vec<String> = table.keys().cloned().collect();
        let preset = if preset_given || !table.contains_key("preset") {
            base.preset
        } else {
            keys.extend(["dim", "depth", "heads"].map(String::from));
            direct.preset
        };
        base.set_preset(preset);
        let mut merged =
            toml::Table::try_from(base).expect("TrainConfig always serialises to a TOML table");
        for (k, v) in table {
            merged.insert(k, v);
        }
        let mut cfg: TrainConfig = merged.try_into().map_err(parse_err)?;
        cfg.preset = preset;
        keys.sort();
        keys.dedup();
        Ok((cfg, keys))
    }

    /// Parses a complete config (as written by [`TrainConfig::to_toml`]);
    /// missing keys take the built-in defaults, the preset is not re-applied.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<string>"),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// The whole config as TOML (stored in checkpoints and run directories).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("TrainConfig always serialises to TOML")
    }

    /// Applies one `key=value` override, the value written as in TOML
    /// (`lr=1e-3`, `data="folder:/x"`, bare words are taken as strings:
    /// `device=cuda`, `global_scale=[0.3,1.0]`).
    pub fn set(&mut self, setting: &str) -> Result<(), ConfigError> {
        let err = |message: String| ConfigError::Override {
            setting: setting.to_string(),
            message,
        };
        let (key, value) = setting
            .split_once('=')
            .ok_or_else(|| err("expected KEY=VALUE, e.g. lr=1e-3".to_string()))?;
        let key = key.trim().replace('-', "_");
        let value = value.trim();
        let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
            Ok(mut t) => t.remove("v").expect("key v was just written"),
            Err(_) => toml::Value::String(value.to_string()),
        };
        if key == "preset" {
            // Through set_preset, so the preset's sizes come with it.
            let p: Preset = parsed
                .try_into()
                .map_err(|e: toml::de::Error| err(e.message().to_string()))?;
            self.set_preset(p);
            return Ok(());
        }
        let mut table =
            toml::Table::try_from(&*self).expect("TrainConfig always serialises to a TOML table");
        table.insert(key, parsed);
        *self = table
            .try_into()
            .map_err(|e: toml::de::Error| err(e.message().to_string()))?;
        Ok(())
    }

    /// The peak learning rate after linear scaling: `lr * batch / 256`.
    pub fn peak_lr(&self) -> f64 {
        self.lr * self.batch as f64 / 256.0
    }

    /// Patch tokens per side of a global crop (`img / patch`).
    pub fn grid(&self) -> usize {
        self.img / self.patch.max(1)
    }

    /// Patch tokens per side of a local crop (`local_img / patch`).
    pub fn local_grid(&self) -> usize {
        self.local_img / self.patch.max(1)
    }

    /// Hidden width of the encoder MLP, `round(dim * mlp_ratio)`.
    pub fn mlp_hidden(&self) -> usize {
        (self.dim as f64 * self.mlp_ratio).round() as usize
    }

    /// Outputs of the patch head: the CLS head's `out_dim` when shared,
    /// else `patch_out_dim`.
    pub fn patch_head_dim(&self) -> usize {
        if self.shared_head {
            self.out_dim
        } else {
            self.patch_out_dim
        }
    }

    /// iBOT's masks of the student's global crops, when `mim` is on.
    pub fn mask_config(&self) -> Option<crate::augment::mask::MaskConfig> {
        let g = self.grid();
        self.mim.then(|| crate::augment::mask::MaskConfig {
            grid: (g, g),
            probability: self.mask_probability as f32,
            ratio: (self.mask_ratio.0 as f32, self.mask_ratio.1 as f32),
            ..crate::augment::mask::MaskConfig::ibot((g, g))
        })
    }

    /// Weight `(4 - alpha - beta) / 2` of the image-level loss (DINO's, plus
    /// iBOT's masked-patch term with `mim`) in the total.
    pub fn image_loss_weight(&self) -> f64 {
        (4.0 - self.alpha - self.beta) / 2.0
    }

    /// Total optimizer steps: `steps` if set, else `epochs * steps_per_epoch`.
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        self.steps.unwrap_or(self.epochs as u64 * steps_per_epoch)
    }

    /// The output directory: `out` if set, else `runs/<UTC yyyymmdd-hhmmss>`.
    pub fn out_dir(&self) -> PathBuf {
        match &self.out {
            Some(p) => p.clone(),
            None => {
                let secs = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                PathBuf::from("runs").join(utc_stamp(secs))
            }
        }
    }

    /// The run's peak memory, estimated from the configuration alone
    /// (nothing is allocated): parameters x 5 (student, teacher, gradients,
    /// AdamW m and v) plus the activations of one step.
    pub fn memory_estimate(&self) -> MemoryEstimate {
        let f = |v: usize| v as f64;
        let (d, l, h, heads) = (
            f(self.dim),
            f(self.depth),
            f(self.mlp_hidden()),
            f(self.heads),
        );
        let (hidden, bottleneck, k) = (f(self.head_hidden), f(self.bottleneck), f(self.out_dim));
        let p = f(self.patch);
        let tokens = |side: usize| f(side) * f(side) + 1.0;
        let (t, tl) = (tokens(self.grid()), tokens(self.local_grid()));
        let block = 4.0 * d + 4.0 * d * d + 4.0 * d + 2.0 * h * d + h + d;
        let vit = d * 3.0 * p * p + 2.0 * d + t * d + l * block + 2.0 * d;
        let dino = d * hidden
            + hidden * hidden
            + hidden * bottleneck
            + bottleneck * k
            + 2.0 * hidden
            + bottleneck
            + k;
        let sere = 4.0 * (d * d + 4.0 * d);
        let kp = f(self.separate_patch_dim());
        let patch_head = if kp > 0.0 {
            dino - bottleneck * k - k + bottleneck * kp + kp
        } else {
            0.0
        };
        let mask_token = if self.mim { d } else { 0.0 };
        let params = vit + dino + sere + patch_head + mask_token;

        // Per crop of `t` tokens: each block keeps about 10 token-wide and 2
        // hidden-wide vectors per token and the attention maps.
        let crop = |t: f64| {
            l * (t * (10.0 * d + 2.0 * h) + heads * t * t)
                + 3.0 * (4.0 * hidden + bottleneck + 3.0 * k)
        };
        let (b, locals) = (f(self.batch), f(self.locals));
        // Student on every crop, teacher on the two global ones.
        let vit_acts = b * (4.0 * crop(t) + locals * crop(tl));
        // Relations of each global/global and global/local pair of views,
        // spatial (heads x N x N on the overlap grid) and channel (C x C),
        // teacher and student and the gradient.
        let (n, nl) = (
            f(self.overlap) * f(self.overlap),
            f(self.local_overlap) * f(self.local_overlap),
        );
        let relations =
            3.0 * b * (2.0 * (heads * n * n + d * d) + 2.0 * locals * (heads * nl * nl + d * d));
        // iBOT: every patch of the global crops through the patch head, in
        // both networks, and the student's gradient.
        let mim = if self.mim {
            let rows = 2.0 * b * (t - 1.0);
            let kp = f(self.patch_head_dim());
            rows * 3.0 * (4.0 * hidden + bottleneck + 3.0 * kp + 2.0 * d)
        } else {
            0.0
        };
        MemoryEstimate {
            weights: 4.0 * 5.0 * params,
            activations: 4.0 * (vit_acts + relations + mim),
        }
    }

    /// The settings that fix the model's parameter shapes (a resumed run
    /// cannot change them), as `(key, value)`.
    fn architecture(&self) -> [(&'static str, String); 13] {
        [
            ("img", self.img.to_string()),
            ("patch", self.patch.to_string()),
            ("dim", self.dim.to_string()),
            ("depth", self.depth.to_string()),
            ("heads", self.heads.to_string()),
            ("mlp_ratio", self.mlp_ratio.to_string()),
            ("out_dim", self.out_dim.to_string()),
            ("head_hidden", self.head_hidden.to_string()),
            ("bottleneck", self.bottleneck.to_string()),
            // A learned gain is a parameter.
            ("norm_last_layer", self.norm_last_layer.to_string()),
            // The mask token and a separate patch head are parameters.
            ("mim", self.mim.to_string()),
            ("shared_head", (self.shared_head || !self.mim).to_string()),
            ("patch_out_dim", self.separate_patch_dim().to_string()),
        ]
    }

    /// Whether the step computes SERE's relations at all: with `alpha =
    /// beta = 0` (DINO or iBOT alone) the SERE heads and the relation
    /// losses are skipped (they would add exactly nothing to the
    /// gradient), and their loss terms are reported as 0.
    pub fn relations(&self) -> bool {
        self.alpha != 0.0 || self.beta != 0.0
    }

    /// Outputs of a separate patch head, 0 when there is none.
    fn separate_patch_dim(&self) -> usize {
        if self.mim && !self.shared_head {
            self.patch_out_dim
        } else {
            0
        }
    }

    /// The architecture settings in which `requested` differs from `self`
    /// (a checkpoint's config), as `key: checkpoint -> requested`.
    pub fn architecture_changes(&self, requested: &TrainConfig) -> Vec<String> {
        self.architecture()
            .into_iter()
            .zip(requested.architecture())
            .filter(|(a, b)| a.1 != b.1)
            .map(|((key, a), (_, b))| format!("{key}: {a} -> {b}"))
            .collect()
    }

    /// Every setting of `requested` that differs from `self`, as
    /// `key: old -> new` in key order (the output folder is not a
    /// setting). What a rerun of a changed command prints before it
    /// continues the run with the new values.
    ///
    /// ```
    /// use sere_host::config::TrainConfig;
    /// let a = TrainConfig::default();
    /// let b = TrainConfig { lr: 0.04, ..a.clone() };
    /// assert_eq!(a.setting_changes(&b), ["lr: 0.02 -> 0.04"]);
    /// ```
    pub fn setting_changes(&self, requested: &TrainConfig) -> Vec<String> {
        let table = |c: &TrainConfig| toml::Table::try_from(c).unwrap_or_default();
        let (a, b) = (table(self), table(requested));
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        let shown = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
        keys.into_iter()
            .filter(|k| k.as_str() != "out" && a.get(*k) != b.get(*k))
            .map(|k| format!("{k}: {} -> {}", shown(a.get(k)), shown(b.get(k))))
            .collect()
    }

    /// Checks that the values can work together; lists every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        let mut bad = |key: &'static str, message: String| p.push(ConfigProblem { key, message });

        if self.data.trim().is_empty() {
            bad(
                "data",
                "is empty; use \"synthetic\" or a dataset path".into(),
            );
        }
        // Geometry.
        if self.patch == 0 {
            bad("patch", "must be at least 1 pixel".into());
        } else {
            if self.img < self.patch || self.img % self.patch != 0 {
                bad(
                    "img",
                    format!(
                        "{} px is not a positive multiple of patch ({} px); try img = {}",
                        self.img,
                        self.patch,
                        nearest_multiple(self.img, self.patch)
                    ),
                );
            }
            if self.locals > 0 && (self.local_img < self.patch || self.local_img % self.patch != 0)
            {
                bad(
                    "local_img",
                    format!(
                        "{} px is not a positive multiple of patch ({} px); try local_img = {} or locals = 0",
                        self.local_img,
                        self.patch,
                        nearest_multiple(self.local_img, self.patch)
                    ),
                );
            }
        }
        if self.locals > 0 && self.local_img > self.img {
            bad(
                "local_img",
                format!(
                    "local crops ({} px) must not be larger than global crops (img = {} px)",
                    self.local_img, self.img
                ),
            );
        }
        // Encoder.
        if self.dim == 0 {
            bad("dim", "must be at least 1".into());
        }
        if self.depth == 0 {
            bad("depth", "must be at least 1 block".into());
        }
        if self.heads == 0 {
            bad("heads", "must be at least 1".into());
        } else if self.dim % self.heads != 0 {
            bad(
                "heads",
                format!(
                    "{} heads do not divide dim = {}; pick heads among {}",
                    self.heads,
                    self.dim,
                    divisors_hint(self.dim)
                ),
            );
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.mlp_hidden() == 0 {
            bad(
                "mlp_ratio",
                format!("{} must be positive (4 is usual)", self.mlp_ratio),
            );
        }
        if !(self.drop_path.is_finite() && (0.0..1.0).contains(&self.drop_path)) {
            bad("drop_path", format!("{} must be in [0, 1)", self.drop_path));
        }
        // Schedule.
        if self.batch == 0 {
            bad("batch", "must be at least 1 image".into());
        }
        match self.steps {
            Some(0) => bad(
                "steps",
                "must be at least 1 (or leave it unset to train by epochs)".into(),
            ),
            Some(_) => {}
            None => {
                if self.epochs == 0 {
                    bad("epochs", "must be at least 1 (or set steps)".into());
                } else if self.warmup_epochs > self.epochs {
                    bad(
                        "warmup_epochs",
                        format!(
                            "{} is longer than the run ({} epochs); lower it or raise epochs",
                            self.warmup_epochs, self.epochs
                        ),
                    );
                }
            }
        }
        // Loss weights.
        for (key, v) in [("alpha", self.alpha), ("beta", self.beta)] {
            if !(v.is_finite() && v >= 0.0) {
                bad(key, format!("{v} must be a non-negative number"));
            }
        }
        if self.alpha + self.beta > 4.0 {
            bad(
                "beta",
                format!(
                    "alpha + beta = {} exceeds 4, which would make the image-loss weight (4 - alpha - beta) / 2 negative",
                    self.alpha + self.beta
                ),
            );
        }
        // Optimizer.
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bad(
                "lr",
                format!(
                    "{} must be positive (5e-4 is the paper's base rate)",
                    self.lr
                ),
            );
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0) {
            bad("min_lr", format!("{} must be non-negative", self.min_lr));
        }
        for (key, v) in [
            ("weight_decay", self.weight_decay),
            ("weight_decay_end", self.weight_decay_end),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bad(key, format!("{v} must be non-negative"));
            }
        }
        for (key, v) in [
            ("momentum_teacher", self.momentum_teacher),
            ("center_momentum", self.center_momentum),
        ] {
            if !(v.is_finite() && (0.0..=1.0).contains(&v)) {
                bad(key, format!("{v} must be in [0, 1]"));
            }
        }
        if !(self.clip_grad.is_finite() && self.clip_grad >= 0.0) {
            bad(
                "clip_grad",
                format!(
                    "{} must be non-negative (0 disables clipping)",
                    self.clip_grad
                ),
            );
        }
        // Head.
        for (key, v) in [
            ("out_dim", self.out_dim),
            ("head_hidden", self.head_hidden),
            ("bottleneck", self.bottleneck),
        ] {
            if v == 0 {
                bad(key, "must be at least 1".into());
            }
        }
        for (key, v) in [
            ("warmup_teacher_temp", self.warmup_teacher_temp),
            ("teacher_temp", self.teacher_temp),
            ("student_temp", self.student_temp),
            ("spatial_tau_t", self.spatial_tau_t),
            ("channel_tau_t", self.channel_tau_t),
            ("warmup_patch_teacher_temp", self.warmup_patch_teacher_temp),
            ("patch_teacher_temp", self.patch_teacher_temp),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bad(key, format!("{v} must be a positive temperature"));
            }
        }
        // Masked image modelling.
        if !(self.mask_probability.is_finite() && (0.0..=1.0).contains(&self.mask_probability)) {
            bad(
                "mask_probability",
                format!("{} must be in [0, 1]", self.mask_probability),
            );
        }
        let (lo, hi) = self.mask_ratio;
        if !(lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo <= hi && hi < 1.0) {
            bad(
                "mask_ratio",
                format!("[{lo}, {hi}] must satisfy 0 <= min <= max < 1 (fractions of the patches)"),
            );
        }
        if self.patch_out_dim == 0 {
            bad("patch_out_dim", "must be at least 1".into());
        }
        // Relations.
        if self.overlap == 0 {
            bad(
                "overlap",
                "must be at least 1 (the overlap is sampled on an overlap x overlap grid)".into(),
            );
        }
        if self.locals > 0 && self.local_overlap == 0 {
            bad(
                "local_overlap",
                "must be at least 1 when local crops are used".into(),
            );
        }
        // Augmentation.
        for (key, (lo, hi)) in [
            ("global_scale", self.global_scale),
            ("local_scale", self.local_scale),
        ] {
            if !(lo.is_finite() && hi.is_finite() && 0.0 < lo && lo <= hi && hi <= 1.0) {
                bad(
                    key,
                    format!("[{lo}, {hi}] must satisfy 0 < min <= max <= 1 (area fractions)"),
                );
            }
        }
        // Run.
        if self.threads == Some(0) {
            bad(
                "threads",
                "must be at least 1 (or leave it unset to use all cores)".into(),
            );
        }
        if self.log_every == 0 {
            bad("log_every", "must be at least 1 step".into());
        }
        if self.eval_every > 0 {
            for (key, n) in [
                ("eval_train_images", self.eval_train_images),
                ("eval_test_images", self.eval_test_images),
            ] {
                if n == 0 {
                    bad(
                        key,
                        "must be at least 1 image when eval_every is set".into(),
                    );
                }
            }
        }
        if self.out.as_ref().is_some_and(|o| o.as_os_str().is_empty()) {
            bad(
                "out",
                "is empty; name an output folder (or leave it unset for runs/<date-time>)".into(),
            );
        }

        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }
}

/// The positive multiple of `m` nearest to `v` (ties go up).
fn nearest_multiple(v: usize, m: usize) -> usize {
    let down = v / m * m;
    if down == 0 || v - down >= m - (v - down) {
        down + m
    } else {
        down
    }
}

/// "1, 2, 4, 8" style list of the divisors of `n` (at most 8 shown).
fn divisors_hint(n: usize) -> String {
    let d: Vec<String> = (1..=n)
        .filter(|k| n % k == 0)
        .take(8)
        .map(|k| k.to_string())
        .collect();
    d.join(", ")
}

/// `yyyymmdd-hhmmss` in UTC for seconds since the Unix epoch.
fn utc_stamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(cfg: &TrainConfig) -> Vec<&'static str> {
        match cfg.validate() {
            Ok(()) => vec![],
            Err(ConfigError::Invalid(p)) => p.iter().map(|p| p.key).collect(),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn defaults_and_presets_are_valid() {
        for p in [
            Preset::Nano,
            Preset::Micro,
            Preset::Tiny,
            Preset::Small,
            Preset::Base,
            Preset::Custom,
        ] {
            let cfg = TrainConfig::with_preset(p);
            cfg.validate().unwrap();
            assert_eq!(cfg.preset, p);
        }
        let s = TrainConfig::with_preset(Preset::Small);
        assert_eq!((s.dim, s.depth, s.heads), (384, 12, 6));
        let c = TrainConfig::with_preset(Preset::Custom);
        assert_eq!((c.dim, c.depth, c.heads), (64, 4, 4));
        let m = TrainConfig::with_preset(Preset::Micro);
        assert_eq!((m.dim, m.depth, m.heads), (128, 4, 4));
        let d = TrainConfig::default();
        assert_eq!(d.preset, Preset::Nano);
        assert_eq!((d.grid(), d.local_grid(), d.mlp_hidden()), (8, 4, 256));
        assert!((d.peak_lr() - 2e-2 * 16.0 / 256.0).abs() < 1e-15);
        assert!((d.image_loss_weight() - 0.25).abs() < 1e-12);
        assert_eq!(d.total_steps(312), 936);
    }

    #[test]
    fn toml_round_trip() {
        let mut cfg = TrainConfig::with_preset(Preset::Tiny);
        cfg.steps = Some(77);
        cfg.threads = Some(2);
        cfg.out = Some(PathBuf::from("runs/x"));
        cfg.device = Device::Cuda;
        cfg.global_scale = (0.3, 0.9);
        let text = cfg.to_toml();
        assert!(text.contains("preset = \"tiny\""), "{text}");
        assert!(text.contains("global_scale = [0.3, 0.9]"), "{text}");
        assert_eq!(TrainConfig::from_toml(&text).unwrap(), cfg);
        // Defaults round-trip too (None fields are omitted).
        let d = TrainConfig::default();
        assert_eq!(TrainConfig::from_toml(&d.to_toml()).unwrap(), d);
    }

    #[test]
    fn merge_order_defaults_preset_file() {
        // File preset applies, file keys win over it.
        let cfg =
            TrainConfig::from_toml_layered("preset = \"small\"\ndim = 192\nlr = 1e-3\n", None)
                .unwrap();
        assert_eq!(
            (cfg.preset, cfg.dim, cfg.depth, cfg.heads),
            (Preset::Small, 192, 12, 6)
        );
        assert_eq!(cfg.lr, 1e-3);
        assert_eq!(cfg.batch, 16);
        // A preset from the command line replaces the file's preset, but the
        // file's explicit keys still win over the preset's sizes.
        let cfg =
            TrainConfig::from_toml_layered("preset = \"small\"\nheads = 4\n", Some(Preset::Tiny))
                .unwrap();
        assert_eq!(
            (cfg.preset, cfg.dim, cfg.depth, cfg.heads),
            (Preset::Tiny, 192, 12, 4)
        );
        // No file.
        let cfg = TrainConfig::load(None, Some(Preset::Small)).unwrap();
        assert_eq!(cfg.dim, 384);
    }

    #[test]
    fn unknown_key_is_named() {
        let err =
            TrainConfig::from_toml_layered("batch = 8\nlearning_rate = 0.1\n", None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::Parse { .. }));
        assert!(msg.contains("learning_rate"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        let err = TrainConfig::from_toml_layered("batch = \"many\"\n", None).unwrap_err();
        assert!(err.to_string().contains("batch"), "{err}");
        let err = TrainConfig::from_toml_layered("preset = \"huge\"\n", None).unwrap_err();
        assert!(err.to_string().contains("huge"), "{err}");
    }

    #[test]
    fn load_reads_file_and_names_it_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        std::fs::write(&path, "epochs = 3\nglobal_scale = [0.5, 1.0]\n").unwrap();
        let cfg = TrainConfig::load(Some(&path), None).unwrap();
        assert_eq!((cfg.epochs, cfg.global_scale), (3, (0.5, 1.0)));
        std::fs::write(&path, "epochz = 3\n").unwrap();
        let err = TrainConfig::load(Some(&path), None).unwrap_err();
        assert!(
            err.to_string().contains("run.toml") && err.to_string().contains("epochz"),
            "{err}"
        );
        let err = TrainConfig::load(Some(&dir.path().join("nope.toml")), None).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }));
    }

    #[test]
    fn set_overrides() {
        let mut cfg = TrainConfig::default();
        cfg.set("lr=1e-3").unwrap();
        cfg.set("device=cuda").unwrap();
        cfg.set("data=folder:/tmp/x").unwrap();
        cfg.set("global-scale=[0.3, 1.0]").unwrap();
        cfg.set("steps=5").unwrap();
        cfg.set("preset=small").unwrap();
        assert_eq!(cfg.lr, 1e-3);
        assert_eq!(cfg.device, Device::Cuda);
        assert_eq!(cfg.data, "folder:/tmp/x");
        assert_eq!(cfg.global_scale, (0.3, 1.0));
        assert_eq!(cfg.steps, Some(5));
        assert_eq!(cfg.dim, 384);
        assert!(cfg
            .set("nosuchkey=1")
            .unwrap_err()
            .to_string()
            .contains("nosuchkey"));
        assert!(cfg.set("batch=many").is_err());
        assert!(cfg.set("batch").is_err());
    }

    #[test]
    fn validate_catches_impossible_configs() {
        let base = TrainConfig::default();
        let check = |f: &dyn Fn(&mut TrainConfig), key: &str| {
            let mut c = base.clone();
            f(&mut c);
            let keys = problems(&c);
            assert!(
                keys.contains(&key),
                "expected a problem with {key}, got {keys:?}"
            );
        };
        check(&|c| c.img = 30, "img");
        check(&|c| c.patch = 0, "patch");
        check(&|c| c.local_img = 18, "local_img");
        check(&|c| c.local_img = 64, "local_img");
        check(&|c| c.heads = 3, "heads");
        check(&|c| c.heads = 0, "heads");
        check(&|c| c.dim = 0, "dim");
        check(&|c| c.depth = 0, "depth");
        check(&|c| c.batch = 0, "batch");
        check(&|c| c.alpha = -0.1, "alpha");
        check(&|c| c.beta = f64::NAN, "beta");
        check(
            &|c| {
                c.alpha = 2.5;
                c.beta = 2.0
            },
            "beta",
        );
        check(&|c| c.overlap = 0, "overlap");
        check(&|c| c.local_overlap = 0, "local_overlap");
        check(&|c| c.epochs = 0, "epochs");
        check(&|c| c.steps = Some(0), "steps");
        check(&|c| c.warmup_epochs = 11, "warmup_epochs");
        check(&|c| c.lr = 0.0, "lr");
        check(&|c| c.teacher_temp = 0.0, "teacher_temp");
        check(&|c| c.momentum_teacher = 1.5, "momentum_teacher");
        check(&|c| c.local_scale = (0.5, 0.4), "local_scale");
        check(&|c| c.global_scale = (0.0, 1.0), "global_scale");
        check(&|c| c.threads = Some(0), "threads");
        check(&|c| c.out_dim = 0, "out_dim");
        check(&|c| c.drop_path = 1.0, "drop_path");
        check(&|c| c.log_every = 0, "log_every");
        check(
            &|c| {
                c.eval_every = 10;
                c.eval_test_images = 0
            },
            "eval_test_images",
        );

        // Fine: overlap grid larger than the token grid; no locals with odd
        // local_img; steps set with epochs 0.
        let mut c = base.clone();
        c.overlap = 20;
        c.locals = 0;
        c.local_img = 18;
        c.local_overlap = 0;
        c.epochs = 0;
        c.steps = Some(10);
        c.validate().unwrap();

        // Several problems are all reported, with actionable text.
        let mut c = base.clone();
        c.img = 30;
        c.heads = 3;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("try img = 32"), "{msg}");
        assert!(msg.contains("pick heads among 1, 2, 4, 8"), "{msg}");
    }

    #[test]
    fn helpers() {
        assert_eq!(nearest_multiple(30, 4), 32);
        assert_eq!(nearest_multiple(33, 4), 32);
        assert_eq!(nearest_multiple(2, 4), 4);
        assert_eq!(utc_stamp(0), "19700101-000000");
        assert_eq!(utc_stamp(1_709_251_199), "20240229-235959");
        let cfg = TrainConfig::default();
        assert!(cfg.out_dir().starts_with("runs"));
    }

    #[test]
    fn architecture_changes_and_empty_out() {
        let a = TrainConfig::default();
        assert!(a.architecture_changes(&a.clone()).is_empty());
        let b = TrainConfig {
            heads: 8,
            out_dim: 100,
            lr: 0.1,
            ..a.clone()
        };
        assert_eq!(
            a.architecture_changes(&b),
            ["heads: 4 -> 8", "out_dim: 1024 -> 100"]
        );
        let mim = TrainConfig {
            mim: true,
            ..a.clone()
        };
        assert_eq!(a.architecture_changes(&mim), ["mim: false -> true"]);
        // The patch head's size counts only when it has its own parameters.
        let separate = TrainConfig {
            shared_head: false,
            ..mim.clone()
        };
        assert_eq!(
            mim.architecture_changes(&separate),
            ["shared_head: true -> false", "patch_out_dim: 0 -> 4096"]
        );
        assert!(mim.memory_estimate().activations > a.memory_estimate().activations);
        assert!(separate.memory_estimate().weights > mim.memory_estimate().weights);
        let mut c = a.clone();
        c.set("out=").unwrap();
        assert_eq!(problems(&c), ["out"]);
    }

    #[test]
    fn memory_estimate_grows_with_the_model() {
        let small = TrainConfig::default().memory_estimate();
        assert!(small.total() > 1e6 && small.total() < 8e9, "{small:?}");
        let wide = TrainConfig {
            dim: 100_000,
            heads: 4,
            ..Default::default()
        }
        .memory_estimate();
        assert!(wide.weights > 1e12, "{wide:?}");
        assert_eq!(format_bytes(1536.0), "1.5 KiB");
        assert_eq!(format_bytes(3.0 * (1u64 << 30) as f64), "3.0 GiB");
    }
}
