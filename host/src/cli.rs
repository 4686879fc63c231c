//! Command-line interface of `sere`: argument definitions (clap derive) and
//! their merge into a [`TrainConfig`]. The commands' bodies live elsewhere.
//!
//! Merge order: built-in defaults < `--preset` < `--config FILE` <
//! `--set KEY=VALUE` < the explicit flags. Every config key can be set with
//! `--set`, the common ones also have their own flag.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    ConfigError, DecayRule, Device, NonOverlapping, OverlapGrid, Preset, TrainConfig,
};
use crate::eval::features::FeatureSpec;
use crate::eval::linear::{Optimizer, ProbeConfig};
use crate::export::Network;
use crate::plot::XAxis;
use crate::recipe::{Provenance, Recipe, Source};

/// `sere`: self-supervised ViT pre-training with feature self-relations.
#[derive(Debug, Parser)]
#[command(name = "sere", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pre-train a ViT with SERE (DINO + spatial and channel self-relations).
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint's features.
    #[command(subcommand)]
    Eval(EvalCommand),
    /// Time full training steps on random data (throughput benchmark).
    BenchStep(Box<BenchStepArgs>),
    /// Draw attention maps (per head, overlaid on the image, optionally
    /// thresholded as DINO's) and spatial self-relations of a checkpoint.
    Visualize(VisualizeArgs),
    /// Draw the learning curves of one or more runs (their metrics.jsonl)
    /// as one PNG, the runs overlaid.
    Plot(PlotArgs),
    /// Write a checkpoint's backbone as a standalone safetensors file under
    /// timm's parameter names (for PyTorch / timm / DINO code).
    Export(ExportArgs),
}

impl Command {
    /// The command's name as typed, e.g. `"eval linear"`.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Train(_) => "train",
            Command::Eval(EvalCommand::Knn(_)) => "eval knn",
            Command::Eval(EvalCommand::Linear(_)) => "eval linear",
            Command::BenchStep(_) => "bench-step",
            Command::Visualize(_) => "visualize",
            Command::Plot(_) => "plot",
            Command::Export(_) => "export",
        }
    }
}

/// `cfg.f = v` for every field `f` whose flag `args.f` was given
/// (`Some(v)`): how the flag structs write into a [`TrainConfig`].
macro_rules! set_given {
    ($args:expr, $cfg:expr, $($f:ident),* $(,)?) => {
        $( if let Some(v) = $args.$f { $cfg.$f = v; } )*
    };
}

/// Encoder, batch and run flags shared by `train` and `bench-step`. Every
/// flag is optional; an absent flag leaves the config value alone.
#[derive(Debug, Clone, Default, Args)]
pub struct ModelArgs {
    /// Encoder size preset (sets dim, depth, heads; config-file keys still
    /// win). DINO's `--arch vit_tiny|vit_small|vit_base` is accepted.
    #[arg(long, value_enum, alias = "arch")]
    pub preset: Option<Preset>,
    /// Global crop size in pixels (DINO: 224; small, so that the default
    /// run trains in minutes on a CPU).
    #[arg(long, value_name = "PX")]
    pub img: Option<usize>,
    /// Local crop size in pixels (DINO: 96).
    #[arg(long, value_name = "PX")]
    pub local_img: Option<usize>,
    /// Patch size in pixels (DINO: 16; 4 keeps an 8 x 8 grid on 32 px crops).
    #[arg(long, value_name = "PX")]
    pub patch: Option<usize>,
    /// Token width.
    #[arg(long)]
    pub dim: Option<usize>,
    /// Transformer blocks.
    #[arg(long)]
    pub depth: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Images per step (DINO: 64 per GPU x 8; alias --batch_size_per_gpu,
    /// the whole batch here).
    #[arg(long, alias = "batch_size_per_gpu")]
    pub batch: Option<usize>,
    /// Local crops per image, 0 disables them (DINO: 8, the authors: 10;
    /// alias --local_crops_number).
    #[arg(long, alias = "local_crops_number")]
    pub locals: Option<usize>,
    /// Prototypes K of the DINO head (DINO: 65536, sized for ImageNet;
    /// 1024 for the embedded data's 10 classes and a run of minutes).
    #[arg(long, value_name = "K")]
    pub out_dim: Option<usize>,
    /// Overlap grid side for two global crops.
    #[arg(long)]
    pub overlap: Option<usize>,
    /// Overlap grid side for a global and a local crop.
    #[arg(long)]
    pub local_overlap: Option<usize>,
    /// Where overlap grid points sit: cell centres, or edge to edge as the
    /// authors' code.
    #[arg(long, value_enum, value_name = "PLACEMENT")]
    pub overlap_grid: Option<OverlapGrid>,
    /// Which tensors AdamW decays: DINO's rule, or the SERE authors' (biases
    /// too; only the norms' weights exempt).
    #[arg(long, value_enum, value_name = "RULE")]
    pub weight_decay_rule: Option<DecayRule>,
    /// Crop pairs without overlap in the spatial loss: dropped, or uniform
    /// rows as the authors' code.
    #[arg(long, value_enum, value_name = "RULE")]
    pub non_overlapping: Option<NonOverlapping>,
    /// Weight of the spatial self-relation loss.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Weight of the channel self-relation loss.
    #[arg(long)]
    pub beta: Option<f64>,
    /// iBOT's masked image modelling: block masks on the student's global
    /// crops, a mask token, a patch head and the masked-patch loss added to
    /// the image loss (the authors' default objective; off by default).
    #[arg(long, overrides_with = "no_mim")]
    pub mim: bool,
    /// DINO's image loss alone (the default; iBOT's ablation baseline).
    #[arg(long, overrides_with = "mim")]
    pub no_mim: bool,
    /// With --mim: probability that a global crop is masked at all.
    #[arg(long, value_name = "P")]
    pub mask_probability: Option<f64>,
    /// With --mim: range of a masked crop's masked fraction, drawn uniformly.
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"])]
    pub mask_ratio: Option<Vec<f64>>,
    /// With --mim: the patch head is the CLS head itself (the default, as
    /// the authors' recipes).
    #[arg(long, overrides_with = "no_shared_head")]
    pub shared_head: bool,
    /// With --mim: the patch head has its own parameters (`patch_out_dim`
    /// outputs).
    #[arg(long, overrides_with = "shared_head")]
    pub no_shared_head: bool,
    /// Fix the DINO head's last-layer weight-norm gain to 1 (the default,
    /// DINO's).
    #[arg(long, overrides_with = "no_norm_last_layer")]
    pub norm_last_layer: bool,
    /// Learn that gain (`norm_last_layer = false`, the authors' ViT-S/16
    /// recipes).
    #[arg(long, overrides_with = "norm_last_layer")]
    pub no_norm_last_layer: bool,
    /// Random seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Backend.
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// Writes the flags that were given into `cfg` (all but `--preset`,
    /// which [`TrainConfig::load`] layers in below the config file).
    pub fn apply(&self, cfg: &mut TrainConfig) {
        set_given!(
            self,
            cfg,
            img,
            local_img,
            patch,
            dim,
            depth,
            heads,
            batch,
            locals,
            out_dim,
            overlap,
            local_overlap,
            overlap_grid,
            weight_decay_rule,
            non_overlapping,
            alpha,
            beta,
            seed,
            device
        );
        if let Some(t) = self.threads {
            cfg.threads = Some(t);
        }
        if let Some(p) = self.mask_probability {
            cfg.mask_probability = p;
        }
        if let Some([lo, hi]) = self.mask_ratio.as_deref() {
            cfg.mask_ratio = (*lo, *hi);
        }
        for (on, off, field) in [
            (self.mim, self.no_mim, &mut cfg.mim),
            (self.shared_head, self.no_shared_head, &mut cfg.shared_head),
            (
                self.norm_last_layer,
                self.no_norm_last_layer,
                &mut cfg.norm_last_layer,
            ),
        ] {
            if on || off {
                *field = on;
            }
        }
    }
}

/// Flags of `sere train`.
#[derive(Debug, Clone, Default, Args)]
pub struct TrainArgs {
    /// A named recipe as the base of the configuration: the authors'
    /// published ones (every value of their command line) or cpu-small,
    /// measured here for 30 minutes of 2 CPU cores on Fashion-MNIST; below
    /// --preset, --config, --set and the flags. See --print-config.
    #[arg(long, value_enum, value_name = "NAME")]
    pub recipe: Option<Recipe>,
    /// Print the resolved configuration as TOML, each value with where it
    /// came from (default, recipe, preset, file, --set, flag), and exit
    /// without training.
    #[arg(long)]
    pub print_config: bool,
    /// TOML config file (keys as in `TrainConfig`; unknown keys are errors).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data source: "synthetic" or a dataset path/spec (alias --data_path).
    #[arg(long, value_name = "SPEC", alias = "data_path")]
    pub data: Option<String>,
    /// Encoder, batch and run flags.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Optimiser, teacher, head and crop hyperparameters.
    #[command(flatten)]
    pub hyper: HyperArgs,
    /// Training length in epochs (DINO: 100).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Training length in steps (overrides --epochs).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Base learning rate for batch 256; the peak rate is lr * batch / 256
    /// (DINO: 0.0005; the small default model and a run of minutes take a
    /// larger one, measured in BENCHMARKS.md "The default run").
    #[arg(long)]
    pub lr: Option<f64>,
    /// Output directory for checkpoints and metrics (default
    /// `runs/<date-time>`; alias --output_dir).
    #[arg(long, value_name = "DIR", alias = "output_dir")]
    pub out: Option<PathBuf>,
    /// Resume from a checkpoint FILE, or the latest checkpoint in DIR; with
    /// no value, the latest checkpoint in --out. Without this flag, a run
    /// whose --out already holds a checkpoint continues from its newest
    /// (DINO's behaviour: rerun the same command after an interruption).
    #[arg(long, value_name = "FILE|DIR", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Start the student and teacher from this backbone: a `sere export`
    /// file, a timm / Hugging Face ViT saved with safetensors, or a training
    /// checkpoint (its teacher); every tensor must match the model.
    #[arg(long, value_name = "FILE")]
    pub init_from: Option<PathBuf>,
    /// Start a new run even when --out holds one: the old run's files
    /// (checkpoints, metrics, config, eval.json) are moved into
    /// `--out/previous-run/` first, nothing is deleted.
    #[arg(long, conflicts_with = "resume")]
    pub no_resume: bool,
    /// Set any config key, value in TOML syntax (repeatable): --set lr=1e-3.
    #[arg(long = "set", short = 's', value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Skip the evaluation on the data's test split at the end of the run
    /// (the `final_eval` key; k-NN of the teacher, the random
    /// initialisation and raw pixels, and the teacher's linear probe).
    #[arg(long)]
    pub no_eval: bool,
    /// Score the teacher every N steps during training (weighted 20-NN on
    /// `eval_train_images` / `eval_test_images` images of the data, logged
    /// as `knn_top1` in metrics.jsonl; the `eval_every` key). Needs a test
    /// split.
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
}

/// The hyperparameters of `sere train` beyond the model's shape, each the
/// config key of the same name (`--help` shows each default, read from
/// [`TrainConfig::default`], see [`command`]). DINO's flag names are
/// accepted as aliases where they mean the same thing.
#[derive(Debug, Clone, Default, Args)]
pub struct HyperArgs {
    /// Learning rate at the end of the cosine schedule.
    #[arg(long, value_name = "LR")]
    pub min_lr: Option<f64>,
    /// Epochs of linear learning-rate warm-up (DINO: 10).
    #[arg(long, value_name = "EPOCHS")]
    pub warmup_epochs: Option<usize>,
    /// Weight decay at the start of its cosine schedule.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Weight decay at the end of its cosine schedule.
    #[arg(long)]
    pub weight_decay_end: Option<f64>,
    /// Teacher EMA momentum at the start, cosine to 1 (DINO: 0.996, which
    /// leaves the teacher at its initialisation in a run of minutes).
    #[arg(long, value_name = "M")]
    pub momentum_teacher: Option<f64>,
    /// Clip each parameter tensor's gradient to this L2 norm (0: off;
    /// DINO: 3.0, the authors' ViT-S: 0.3).
    #[arg(long, value_name = "NORM")]
    pub clip_grad: Option<f64>,
    /// Epochs the DINO head's last layer stays frozen (DINO: 1; a run of
    /// minutes is shorter than an epoch's worth of warm-up).
    #[arg(long, value_name = "EPOCHS")]
    pub freeze_last_layer: Option<usize>,
    /// Stochastic depth rate of the student (alias --drop_path_rate).
    #[arg(long, value_name = "RATE", alias = "drop_path_rate")]
    pub drop_path: Option<f64>,
    /// Hidden width of the DINO head's MLP (DINO: 2048).
    #[arg(long, value_name = "WIDTH")]
    pub head_hidden: Option<usize>,
    /// Bottleneck width before the weight-normalised last layer (DINO: 256).
    #[arg(long, value_name = "WIDTH")]
    pub bottleneck: Option<usize>,
    /// Teacher temperature at the start of its warm-up.
    #[arg(long, value_name = "T")]
    pub warmup_teacher_temp: Option<f64>,
    /// Teacher temperature after the warm-up.
    #[arg(long, value_name = "T")]
    pub teacher_temp: Option<f64>,
    /// Epochs of the teacher temperature's linear warm-up (DINO's default:
    /// 0, its ViT-S recipe: 30).
    #[arg(long, value_name = "EPOCHS")]
    pub warmup_teacher_temp_epochs: Option<usize>,
    /// Student temperature of the DINO and iBOT losses.
    #[arg(long, value_name = "T")]
    pub student_temp: Option<f64>,
    /// Momentum of the DINO (and iBOT patch) centre's EMA.
    #[arg(long, value_name = "M")]
    pub center_momentum: Option<f64>,
    /// Scale range of the global crops, as fractions of the image area
    /// (alias --global_crops_scale).
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], alias = "global_crops_scale")]
    pub global_scale: Option<Vec<f64>>,
    /// Scale range of the local crops (alias --local_crops_scale).
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], alias = "local_crops_scale")]
    pub local_scale: Option<Vec<f64>>,
    /// Train on N images spread evenly over the training split (0: all);
    /// epochs shrink with it, so a short sweep keeps the schedules' shape.
    #[arg(long, value_name = "N")]
    pub train_images: Option<usize>,
    /// Rewrite the rolling checkpoint.safetensors every N steps (0: at
    /// epoch ends and the end only); a rerun of the command resumes from it.
    #[arg(long, value_name = "STEPS")]
    pub checkpoint_every: Option<u64>,
    /// Also keep a numbered `checkpoint-<step>.safetensors` every N steps
    /// (0: none but by --keep-every-epochs and the final one).
    #[arg(long, value_name = "STEPS")]
    pub keep_every: Option<u64>,
    /// Keep a numbered checkpoint at the end of every N epochs (alias
    /// --saveckp_freq, DINO's default 20); the final one is always kept.
    #[arg(long, value_name = "EPOCHS", alias = "saveckp_freq")]
    pub keep_every_epochs: Option<usize>,
    /// Log metrics every N steps.
    #[arg(long, value_name = "STEPS")]
    pub log_every: Option<u64>,
    /// Keep only the newest K numbered checkpoints in the run folder (0:
    /// all; the rolling checkpoint.safetensors is not counted).
    #[arg(long, value_name = "K")]
    pub keep_last: Option<usize>,
}

impl HyperArgs {
    /// Writes the flags that were given into `cfg`.
    pub fn apply(&self, cfg: &mut TrainConfig) {
        set_given!(
            self,
            cfg,
            min_lr,
            warmup_epochs,
            weight_decay,
            weight_decay_end,
            momentum_teacher,
            clip_grad,
            freeze_last_layer,
            drop_path,
            head_hidden,
            bottleneck,
            warmup_teacher_temp,
            teacher_temp,
            warmup_teacher_temp_epochs,
            student_temp,
            center_momentum,
            train_images,
            checkpoint_every,
            keep_every,
            keep_every_epochs,
            log_every,
            keep_last
        );
        if let Some([lo, hi]) = self.global_scale.as_deref() {
            cfg.global_scale = (*lo, *hi);
        }
        if let Some([lo, hi]) = self.local_scale.as_deref() {
            cfg.local_scale = (*lo, *hi);
        }
    }
}

/// The `sere` command line with every `train` and `bench-step` flag that
/// is a config key showing its default, read from [`TrainConfig::default`]
/// (one source of truth: the help cannot drift from the defaults).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let defaults = toml::Table::try_from(TrainConfig::default()).expect("a TOML table");
    let mut cmd = Cli::command();
    for sub in ["train", "bench-step"] {
        cmd = cmd.mut_subcommand(sub, |mut c| {
            let ids: Vec<String> = c.get_arguments().map(|a| a.get_id().to_string()).collect();
            for id in ids {
                let Some(value) = defaults.get(&id) else {
                    continue;
                };
                let shown = match value {
                    toml::Value::String(s) => s.clone(),
                    v => v.to_string().replace(['[', ']'], "").replace(", ", " "),
                };
                c = c.mut_arg(id.as_str(), |a| {
                    let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                    a.help(format!("{help} [default: {shown}]"))
                });
            }
            c
        });
    }
    cmd
}

/// Parses the process arguments with [`command`]'s help.
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit())
}

/// Where `--resume` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// `--resume` with no value: the latest checkpoint in the output directory.
    LatestInOut,
    /// `--resume PATH`: a checkpoint file, or a directory to take the latest from.
    Path(PathBuf),
}

impl TrainArgs {
    /// Writes the explicit flags into `cfg` (everything but `--config`,
    /// `--preset`, `--set` and `--resume`, see [`TrainArgs::to_config`]).
    pub fn apply(&self, cfg: &mut TrainConfig) {
        self.model.apply(cfg);
        self.hyper.apply(cfg);
        if let Some(d) = &self.data {
            cfg.data = d.clone();
        }
        if let Some(e) = self.epochs {
            cfg.epochs = e;
        }
        if let Some(s) = self.steps {
            cfg.steps = Some(s);
        }
        if let Some(lr) = self.lr {
            cfg.lr = lr;
        }
        if let Some(o) = &self.out {
            cfg.out = Some(o.clone());
        }
        if let Some(f) = &self.init_from {
            cfg.init_from = Some(f.clone());
        }
        if self.no_eval {
            cfg.final_eval = false;
        }
        if let Some(n) = self.eval_every {
            cfg.eval_every = n;
        }
    }

    /// The full merge: defaults < `--preset` < `--config` < `--set` < flags,
    /// then [`TrainConfig::validate`].
    pub fn to_config(&self) -> Result<TrainConfig, ConfigError> {
        let cfg = self.merged()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`TrainArgs::to_config`] without the validation (a resumed run
    /// validates its checkpoint's config with these flags over it instead).
    pub fn merged(&self) -> Result<TrainConfig, ConfigError> {
        Ok(self.merged_with_provenance()?.0)
    }

    /// [`TrainArgs::merged`] with the source of every value: defaults <
    /// `--recipe` < `--preset` < `--config` < `--set` < flags.
    pub fn merged_with_provenance(&self) -> Result<(TrainConfig, Provenance), ConfigError> {
        let mut prov = Provenance::default();
        let sizes = ["preset", "dim", "depth", "heads"];
        let mut cfg = match self.recipe {
            Some(r) => {
                let keys = r.table().keys().cloned().collect::<Vec<_>>();
                for k in keys.iter().map(String::as_str).chain(sizes) {
                    prov.set(k, Source::Recipe(r.name()));
                }
                r.config()
            }
            None => TrainConfig::default(),
        };
        if let Some(p) = self.model.preset {
            cfg.set_preset(p);
            for k in sizes {
                prov.set(k, Source::Preset(p.name()));
            }
        }
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let (layered, keys) = TrainConfig::layer_toml(&text, cfg, self.model.preset.is_some())
                .map_err(|e| match e {
                    ConfigError::Parse { message, .. } => ConfigError::Parse {
                        path: path.to_path_buf(),
                        message,
                    },
                    other => other,
                })?;
            cfg = layered;
            for k in &keys {
                prov.set(k, Source::File(path.display().to_string()));
            }
        }
        for s in &self.set {
            cfg.set(s)?;
            if let Some((key, _)) = s.split_once('=') {
                prov.set(&key.trim().replace('-', "_"), Source::Set);
            }
        }
        let before = cfg.clone();
        self.apply(&mut cfg);
        prov.changed(&before, &cfg, Source::Flag);
        Ok((cfg, prov))
    }

    /// What `--resume` asks for, if given.
    pub fn resume(&self) -> Option<Resume> {
        self.resume.as_ref().map(|r| match r {
            None => Resume::LatestInOut,
            Some(p) => Resume::Path(p.clone()),
        })
    }
}

/// Flags of `sere bench-step`.
#[derive(Debug, Clone, Args)]
pub struct BenchStepArgs {
    /// TOML config file to start from.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Encoder, batch and run flags.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed warm-up steps before timing.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Set any config key (repeatable): --set head_hidden=512.
    #[arg(long = "set", short = 's', value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl BenchStepArgs {
    /// The config to benchmark: defaults < `--preset` < `--config` < `--set`
    /// < flags, validated. `--steps`/`--warmup` stay in `self`.
    pub fn to_config(&self) -> Result<TrainConfig, ConfigError> {
        let mut cfg = TrainConfig::load(self.config.as_deref(), self.model.preset)?;
        for s in &self.set {
            cfg.set(s)?;
        }
        self.model.apply(&mut cfg);
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `sere eval ...`.
#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Weighted k-nearest-neighbour classification on frozen features.
    Knn(KnnArgs),
    /// Linear probe (logistic regression) on frozen features.
    Linear(LinearArgs),
}

/// Flags of `sere eval knn`.
#[derive(Debug, Clone, Args)]
pub struct KnnArgs {
    /// Checkpoint file (or run directory) to evaluate; its teacher backbone
    /// is used, as DINO evaluates. Also a backbone file (`sere export`'s or
    /// a timm ViT's safetensors).
    #[arg(long, value_name = "FILE", required_unless_present = "load_features")]
    pub checkpoint: Option<PathBuf>,
    /// Labelled dataset (train and test splits) or "synthetic" (default:
    /// the data the checkpoint was trained on).
    #[arg(long, value_name = "PATH")]
    pub data: Option<String>,
    /// Which network's backbone to evaluate: the EMA teacher (what DINO
    /// and SERE evaluate) or the student (DINO's `--checkpoint_key`).
    #[arg(long, value_enum, default_value_t = Network::Teacher, alias = "checkpoint_key")]
    pub network: Network,
    /// Evaluate the network the checkpoint's run started from instead (its
    /// random initialisation, drawn from the run's seed): the baseline that
    /// says what training added to these features.
    #[arg(long, conflicts_with = "network")]
    pub random_init: bool,
    /// Save the extracted features and labels (train and test) to FILE, a
    /// new safetensors file (DINO's `--dump_features`).
    #[arg(long, value_name = "FILE", alias = "dump_features")]
    pub dump_features: Option<PathBuf>,
    /// Score features saved by --dump-features instead of extracting them:
    /// no checkpoint, data or model needed (DINO's `--load_features`).
    #[arg(long, value_name = "FILE", alias = "load_features", conflicts_with_all = ["checkpoint", "dump_features", "pixels", "random_init"])]
    pub load_features: Option<PathBuf>,
    /// Neighbours voting per test image; several values give one line each
    /// from one pass (DINO reports `--k 10 20 100 200`).
    #[arg(long, num_args = 1.., default_values_t = [20])]
    pub k: Vec<usize>,
    /// Temperature of the vote weights exp(sim / T).
    #[arg(long, default_value_t = 0.07)]
    pub temperature: f64,
    /// Images per forward pass (default: the checkpoint's batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Backend.
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// Worker threads.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Also report the baseline: k-NN on raw, mean-centred, L2-normalised
    /// pixels at the checkpoint's image size.
    #[arg(long)]
    pub pixels: bool,
    /// Which frozen features.
    #[command(flatten)]
    pub features: FeatureSpec,
}

/// Flags of `sere eval linear`.
#[derive(Debug, Clone, Args)]
pub struct LinearArgs {
    /// Checkpoint file (or run directory: its newest checkpoint); its
    /// teacher backbone is used.
    #[arg(long, value_name = "FILE|DIR")]
    pub checkpoint: PathBuf,
    /// Labelled dataset (train and test splits) or "synthetic" (default:
    /// the data the checkpoint was trained on).
    #[arg(long, value_name = "PATH")]
    pub data: Option<String>,
    /// Which network's backbone to evaluate: the EMA teacher or the
    /// student (DINO's `--checkpoint_key`).
    #[arg(long, value_enum, default_value_t = Network::Teacher, alias = "checkpoint_key")]
    pub network: Network,
    /// Evaluate the network the checkpoint's run started from instead (its
    /// random initialisation, drawn from the run's seed): the baseline that
    /// says what training added to these features.
    #[arg(long, conflicts_with = "network")]
    pub random_init: bool,
    /// Optimiser of the probe.
    #[arg(long, value_enum, default_value_t = Optimizer::Lbfgs)]
    pub optimizer: Optimizer,
    /// Budget in passes over the training features: loss evaluations for
    /// L-BFGS, epochs for SGD.
    #[arg(long, default_value_t = 500)]
    pub epochs: usize,
    /// L2 penalty wd/2 ||W||^2 on the probe's weights (features are
    /// standardised first).
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Peak learning rate of SGD (cosine to zero, momentum 0.9).
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Mini-batch size of SGD.
    #[arg(long, default_value_t = 256)]
    pub probe_batch: usize,
    /// Seed of the SGD shuffle.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per forward pass (default: the checkpoint's batch).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Backend (the probe runs on the CPU).
    #[arg(long, value_enum)]
    pub device: Option<Device>,
    /// Worker threads (default: the checkpoint's setting, else all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Also report the baseline: the same probe on raw, mean-centred,
    /// L2-normalised pixels at the checkpoint's image size.
    #[arg(long)]
    pub pixels: bool,
    /// Also report weighted k-NN (k = 20, T = 0.07, as `eval knn`) on the
    /// same features, saving a second pass of the backbone over the data.
    #[arg(long)]
    pub knn: bool,
    /// DINO's eval_linear.py probe: SGD (--optimizer sgd) on features of
    /// augmented training views (RandomResizedCrop + flip) drawn anew each
    /// batch, instead of fixed centre views; slower, one forward pass per
    /// image and epoch.
    #[arg(long)]
    pub augment: bool,
    /// Save the fitted probe (`linear.weight`, `linear.bias` as DINO's
    /// LinearClassifier, and the features' standardisation) to FILE, a new
    /// safetensors file.
    #[arg(long, value_name = "FILE")]
    pub save_probe: Option<PathBuf>,
    /// Score a probe saved by --save-probe on the test split instead of
    /// fitting one (the features must be those it was fitted on).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["save_probe", "pixels"])]
    pub load_probe: Option<PathBuf>,
    /// Which frozen features.
    #[command(flatten)]
    pub features: FeatureSpec,
}

impl LinearArgs {
    /// The probe settings these flags ask for.
    pub fn probe_config(&self) -> ProbeConfig {
        ProbeConfig {
            optimizer: self.optimizer,
            weight_decay: self.weight_decay as f32,
            epochs: self.epochs,
            lr: self.lr as f32,
            batch: self.probe_batch,
            seed: self.seed,
        }
    }
}

/// Flags of `sere visualize`.
#[derive(Debug, Clone, Args)]
pub struct VisualizeArgs {
    /// Checkpoint file (or run directory: its newest checkpoint); its
    /// teacher backbone is drawn.
    #[arg(long, value_name = "FILE|DIR")]
    pub checkpoint: PathBuf,
    /// Image file (JPEG or PNG) to visualise (repeatable); without it, the
    /// first --count test images of --data.
    #[arg(long, value_name = "FILE")]
    pub image: Vec<PathBuf>,
    /// Dataset whose first test images are drawn when no --image is given.
    #[arg(long, value_name = "SPEC", default_value = "synthetic")]
    pub data: String,
    /// Number of dataset images to draw.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub count: usize,
    /// Output directory for the PNGs (created if missing). Files are named
    /// after the input (`dog_attn.png` for --image dog.jpg, `test00003_attn.png`
    /// for the dataset's fourth test image).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace files of the same names already in --out (without it the
    /// command refuses before drawing anything).
    #[arg(long)]
    pub force: bool,
    /// Run the backbone at this input side instead of the checkpoint's
    /// (a multiple of its patch size; the position embedding is
    /// interpolated), for maps of more patches, e.g. 480 for a ViT/16.
    #[arg(long, value_name = "PX")]
    pub image_size: Option<usize>,
    /// DINO's --threshold: also draw, per head, the patches holding this
    /// fraction of the CLS attention mass (0 < T <= 1; DINO uses 0.6) as a
    /// mask over the image.
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    pub threshold: Option<f64>,
    /// Integer magnification of every panel (default: panels of at least
    /// 128 px).
    #[arg(long, value_name = "N")]
    pub zoom: Option<usize>,
    /// Worker threads (default: the checkpoint's setting, else all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Device that runs the backbone (default: cpu).
    #[arg(long, value_enum, value_name = "DEVICE")]
    pub device: Option<Device>,
}

/// Flags of `sere plot`.
#[derive(Debug, Clone, Args)]
pub struct PlotArgs {
    /// Run folders (their metrics.jsonl) or metrics.jsonl files; several
    /// are overlaid, one colour each, named after their folders.
    #[arg(value_name = "RUN", required = true, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// Output PNG file (written atomically; its folder must exist).
    #[arg(long, value_name = "FILE.png")]
    pub out: PathBuf,
    /// Replace --out if it exists (without it an existing file is kept and
    /// the command fails).
    #[arg(long)]
    pub force: bool,
    /// Picture size in pixels, WIDTHxHEIGHT (each 200 to 8000).
    #[arg(long, value_name = "WxH", default_value = "1600x1000", value_parser = crate::plot::parse_size)]
    pub size: (u32, u32),
    /// X axis of every chart: optimizer steps, or elapsed wall-clock
    /// minutes.
    #[arg(long, value_enum, value_name = "AXIS", default_value_t = XAxis::Step)]
    pub x: XAxis,
}

/// Flags of `sere export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Training checkpoint file (or run directory: its newest checkpoint).
    #[arg(long, value_name = "FILE|DIR")]
    pub checkpoint: PathBuf,
    /// Output safetensors file (written atomically; must not be the
    /// checkpoint itself).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Which network's backbone: the EMA teacher (what DINO and SERE
    /// evaluate and release) or the student.
    #[arg(long, value_enum, default_value_t = Network::Teacher)]
    pub network: Network,
    /// Replace an existing --out file even if it is not a backbone written
    /// by `sere export` (a previous export is always replaced).
    #[arg(long)]
    pub force: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("sere").chain(args.iter().copied())).unwrap()
    }

    fn train(args: &[&str]) -> TrainArgs {
        match parse(&[&["train"], args].concat()).command {
            Command::Train(t) => *t,
            c => panic!("parsed {c:?}"),
        }
    }

    /// Every hyperparameter is a flag, and every flag that is a config key
    /// shows the default `TrainConfig::default()` has.
    #[test]
    fn every_hyperparameter_is_a_flag_with_its_default_in_the_help() {
        let mut cmd = command();
        let train = cmd.find_subcommand_mut("train").unwrap();
        let defaults = toml::Table::try_from(TrainConfig::default()).unwrap();
        let ids: Vec<String> = train
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        for key in [
            "momentum_teacher",
            "teacher_temp",
            "warmup_teacher_temp",
            "warmup_teacher_temp_epochs",
            "weight_decay",
            "weight_decay_end",
            "clip_grad",
            "freeze_last_layer",
            "min_lr",
            "warmup_epochs",
            "drop_path",
            "global_scale",
            "local_scale",
            "train_images",
            "checkpoint_every",
            "keep_every",
            "keep_every_epochs",
            "log_every",
            "head_hidden",
            "bottleneck",
            "student_temp",
            "center_momentum",
            "out_dim",
            "alpha",
            "beta",
            "lr",
        ] {
            assert!(ids.iter().any(|i| i == key), "{key} is not a flag");
        }
        let mut shown = 0;
        for arg in train.get_arguments() {
            let id = arg.get_id().to_string();
            if let Some(v) = defaults.get(&id) {
                let help = arg.get_help().unwrap().to_string();
                let want = match v {
                    toml::Value::String(s) => s.clone(),
                    v => v.to_string().replace(['[', ']'], "").replace(", ", " "),
                };
                assert!(
                    help.ends_with(&format!("[default: {want}]")),
                    "{id}: {help}"
                );
                shown += 1;
            }
        }
        assert!(shown >= 40, "{shown} flags with defaults");
    }

    /// DINO's names for the same settings parse to the same config.
    #[test]
    fn dino_flag_names_are_aliases() {
        use clap::FromArgMatches;
        let args = [
            "sere",
            "train",
            "--arch",
            "vit_small",
            "--local_crops_number",
            "10",
            "--batch_size_per_gpu",
            "64",
            "--drop_path_rate",
            "0.2",
            "--global_crops_scale",
            "0.25",
            "1.0",
            "--local_crops_scale",
            "0.05",
            "0.25",
            "--output_dir",
            "o",
            "--data_path",
            "synthetic",
        ];
        let m = command().try_get_matches_from(args).unwrap();
        let Command::Train(t) = Cli::from_arg_matches(&m).unwrap().command else {
            panic!("not train")
        };
        let cfg = t.to_config().unwrap();
        assert_eq!(
            (cfg.preset, cfg.dim, cfg.locals, cfg.batch),
            (Preset::Small, 384, 10, 64)
        );
        assert_eq!(
            (cfg.drop_path, cfg.global_scale, cfg.local_scale),
            (0.2, (0.25, 1.0), (0.05, 0.25))
        );
        assert_eq!(cfg.out.as_deref(), Some(std::path::Path::new("o")));
        let ours = train(&[
            "--preset",
            "small",
            "--locals",
            "10",
            "--batch",
            "64",
            "--drop-path",
            "0.2",
            "--global-scale",
            "0.25",
            "1.0",
            "--local-scale",
            "0.05",
            "0.25",
            "--out",
            "o",
        ])
        .to_config()
        .unwrap();
        assert_eq!(cfg, ours);
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn train_flags_merge_over_file_and_preset() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "preset = \"small\"\nbatch = 64\nlr = 1e-3\ndepth = 6\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let t = train(&[
            "--config",
            f,
            "--batch",
            "8",
            "--heads",
            "4",
            "--device",
            "cpu",
            "--set",
            "clip_grad=0",
        ]);
        let cfg = t.to_config().unwrap();
        assert_eq!(
            (cfg.preset, cfg.dim, cfg.depth, cfg.heads),
            (Preset::Small, 384, 6, 4)
        );
        assert_eq!((cfg.batch, cfg.lr, cfg.clip_grad), (8, 1e-3, 0.0));

        // --preset on the command line replaces the file's preset but not
        // the file's explicit depth.
        let cfg = train(&["--config", f, "--preset", "tiny"])
            .to_config()
            .unwrap();
        assert_eq!((cfg.dim, cfg.depth, cfg.heads), (192, 6, 3));

        // Flags beat --set.
        let cfg = train(&["--set", "lr=0.1", "--lr", "0.2"])
            .to_config()
            .unwrap();
        assert_eq!(cfg.lr, 0.2);
    }

    #[test]
    fn all_train_flags_parse() {
        let t = train(&[
            "--data",
            "synthetic",
            "--preset",
            "custom",
            "--img",
            "64",
            "--local-img",
            "32",
            "--patch",
            "8",
            "--dim",
            "96",
            "--depth",
            "2",
            "--heads",
            "3",
            "--batch",
            "4",
            "--locals",
            "2",
            "--epochs",
            "3",
            "--steps",
            "9",
            "--alpha",
            "0.1",
            "--beta",
            "0.3",
            "--lr",
            "1e-4",
            "--seed",
            "7",
            "--device",
            "cuda",
            "--out",
            "o",
            "--threads",
            "2",
            "--out-dim",
            "256",
            "--overlap",
            "5",
            "--local-overlap",
            "3",
        ]);
        let cfg = t.to_config().unwrap();
        assert_eq!(
            (
                cfg.img,
                cfg.local_img,
                cfg.patch,
                cfg.dim,
                cfg.depth,
                cfg.heads
            ),
            (64, 32, 8, 96, 2, 3)
        );
        assert_eq!(
            (cfg.batch, cfg.locals, cfg.epochs, cfg.steps),
            (4, 2, 3, Some(9))
        );
        assert_eq!((cfg.alpha, cfg.beta, cfg.lr, cfg.seed), (0.1, 0.3, 1e-4, 7));
        assert_eq!(
            (cfg.device, cfg.threads, cfg.out_dim),
            (Device::Cuda, Some(2), 256)
        );
        assert_eq!((cfg.overlap, cfg.local_overlap), (5, 3));
        assert_eq!(cfg.out, Some(PathBuf::from("o")));
        assert_eq!(t.resume(), None);
    }

    #[test]
    fn masked_image_modelling_flags() {
        let off = train(&[]).to_config().unwrap();
        assert!(!off.mim && off.shared_head && off.mask_config().is_none());
        let cfg = train(&[
            "--mim",
            "--mask-probability",
            "0.75",
            "--mask-ratio",
            "0.2",
            "0.4",
            "--no-shared-head",
        ])
        .to_config()
        .unwrap();
        assert!(cfg.mim && !cfg.shared_head);
        assert_eq!((cfg.mask_probability, cfg.mask_ratio), (0.75, (0.2, 0.4)));
        let m = cfg.mask_config().unwrap();
        assert_eq!((m.grid, m.probability, m.ratio), ((8, 8), 0.75, (0.2, 0.4)));
        // The last of a flag pair wins; a bad ratio names its key.
        let cfg = train(&["--mim", "--no-mim"]).to_config().unwrap();
        assert!(!cfg.mim);
        let err = train(&["--mim", "--mask-ratio", "0.5", "0.1"])
            .to_config()
            .unwrap_err();
        assert!(err.to_string().contains("mask_ratio"), "{err}");
    }

    #[test]
    fn overlap_grid_placement() {
        use crate::train::grid_sizes;
        use sere_core::geometry::GridPlacement;
        let cfg = train(&[]).to_config().unwrap();
        assert_eq!(grid_sizes(&cfg).placement, GridPlacement::CellCentres);
        let cfg = train(&["--overlap-grid", "edge-to-edge"])
            .to_config()
            .unwrap();
        assert_eq!(cfg.overlap_grid, OverlapGrid::EdgeToEdge);
        assert_eq!(grid_sizes(&cfg).placement, GridPlacement::EdgeToEdge);
        assert!(cfg.to_toml().contains("overlap_grid = \"edge-to-edge\""));
        // Edge to edge: a pair's first and last points lie on the overlap's
        // edges, so in a view covering exactly the overlap they are at -1, 1.
        let crop = sere_core::geometry::CropBox::new(0.0, 0.0, 8.0, 8.0, false).unwrap();
        let g = crate::augment::batch_pair_grids(&[crop, crop], 2, grid_sizes(&cfg));
        let t = &g[0].teacher_grid;
        assert_eq!((t[0], t[1]), (-1.0, -1.0));
        assert_eq!((t[t.len() - 2], t[t.len() - 1]), (1.0, 1.0));
    }

    #[test]
    fn resume_forms() {
        assert_eq!(train(&["--resume"]).resume(), Some(Resume::LatestInOut));
        assert_eq!(
            train(&["--resume", "runs/a/ckpt.safetensors", "--steps", "3"]).resume(),
            Some(Resume::Path(PathBuf::from("runs/a/ckpt.safetensors")))
        );
        assert_eq!(
            train(&["--resume", "--steps", "3"]).resume(),
            Some(Resume::LatestInOut)
        );
    }

    #[test]
    fn invalid_merged_config_is_an_error() {
        let err = train(&["--img", "30"]).to_config().unwrap_err();
        assert!(err.to_string().contains("img"), "{err}");
        assert!(Cli::try_parse_from(["sere", "train", "--device", "tpu"]).is_err());
        assert!(Cli::try_parse_from(["sere", "train", "--bogus"]).is_err());
    }

    #[test]
    fn other_commands_parse() {
        match parse(&[
            "eval",
            "knn",
            "--checkpoint",
            "c.safetensors",
            "--data",
            "d",
        ])
        .command
        {
            Command::Eval(EvalCommand::Knn(k)) => {
                assert_eq!(
                    (k.k, k.temperature, k.data.as_deref()),
                    (vec![20], 0.07, Some("d"))
                );
            }
            c => panic!("{c:?}"),
        }
        match parse(&[
            "eval",
            "knn",
            "--checkpoint",
            "c",
            "--k",
            "10",
            "20",
            "100",
            "200",
        ])
        .command
        {
            Command::Eval(EvalCommand::Knn(k)) => assert_eq!(k.k, [10, 20, 100, 200]),
            c => panic!("{c:?}"),
        }
        let b = match parse(&[
            "bench-step",
            "--dim",
            "64",
            "--heads",
            "2",
            "--steps",
            "3",
            "--out-dim",
            "128",
        ])
        .command
        {
            Command::BenchStep(b) => b,
            c => panic!("{c:?}"),
        };
        assert_eq!((b.steps, b.warmup), (3, 2));
        let cfg = b.to_config().unwrap();
        assert_eq!((cfg.dim, cfg.heads, cfg.out_dim), (64, 2, 128));
        assert!(Cli::try_parse_from(["sere", "eval", "knn", "--data", "d"]).is_err());
        // Without --data, eval uses the checkpoint's own data.
        match parse(&["eval", "knn", "--checkpoint", "c"]).command {
            Command::Eval(EvalCommand::Knn(k)) => assert_eq!(k.data, None),
            c => panic!("{c:?}"),
        }
        match parse(&["eval", "linear", "--checkpoint", "c"]).command {
            Command::Eval(EvalCommand::Linear(l)) => assert_eq!(l.data, None),
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn export_defaults_to_the_teacher() {
        let export = |args: &[&str]| match parse(&[&["export"], args].concat()).command {
            Command::Export(e) => e,
            c => panic!("parsed {c:?}"),
        };
        let e = export(&["--checkpoint", "c", "--out", "o"]);
        assert_eq!(e.network, Network::Teacher);
        let e = export(&["--checkpoint", "c", "--out", "o", "--network", "student"]);
        assert_eq!(e.network, Network::Student);
        assert!(Cli::try_parse_from(["sere", "export", "--checkpoint", "c"]).is_err());
    }

    #[test]
    fn linear_and_visualize_flags_parse() {
        let l = match parse(&["eval", "linear", "--checkpoint", "c", "--data", "d"]).command {
            Command::Eval(EvalCommand::Linear(l)) => l,
            c => panic!("{c:?}"),
        };
        assert_eq!(l.probe_config(), ProbeConfig::default());
        assert!(!l.pixels && l.batch.is_none() && l.threads.is_none());
        let l = match parse(&[
            "eval",
            "linear",
            "--checkpoint",
            "c",
            "--data",
            "d",
            "--optimizer",
            "sgd",
            "--epochs",
            "7",
            "--weight-decay",
            "0.5",
            "--lr",
            "0.2",
            "--probe-batch",
            "64",
            "--seed",
            "3",
            "--threads",
            "2",
            "--pixels",
        ])
        .command
        {
            Command::Eval(EvalCommand::Linear(l)) => l,
            c => panic!("{c:?}"),
        };
        let p = l.probe_config();
        assert_eq!(
            (p.optimizer, p.epochs, p.weight_decay, p.lr, p.batch, p.seed),
            (Optimizer::Sgd, 7, 0.5, 0.2, 64, 3)
        );
        assert!(l.pixels && l.threads == Some(2));

        let v = match parse(&[
            "visualize",
            "--checkpoint",
            "c",
            "--out",
            "o",
            "--image",
            "a.png",
            "--image",
            "b.jpg",
            "--zoom",
            "2",
        ])
        .command
        {
            Command::Visualize(v) => v,
            c => panic!("{c:?}"),
        };
        assert_eq!(
            v.image,
            vec![PathBuf::from("a.png"), PathBuf::from("b.jpg")]
        );
        assert_eq!(
            (v.data.as_str(), v.count, v.zoom),
            ("synthetic", 4, Some(2))
        );
        assert!(Cli::try_parse_from(["sere", "visualize", "--checkpoint", "c"]).is_err());
        assert_eq!((v.image_size, v.threshold, v.force), (None, None, false));
        let v = match parse(&[
            "visualize",
            "--checkpoint",
            "c",
            "--out",
            "o",
            "--image-size",
            "480",
            "--threshold",
            "0.6",
            "--force",
        ])
        .command
        {
            Command::Visualize(v) => v,
            c => panic!("{c:?}"),
        };
        assert_eq!(
            (v.image_size, v.threshold, v.force),
            (Some(480), Some(0.6), true)
        );
    }

    #[test]
    fn plot_flags_parse() {
        let p = match parse(&["plot", "runs/a", "runs/b/metrics.jsonl", "--out", "c.png"]).command {
            Command::Plot(p) => p,
            c => panic!("{c:?}"),
        };
        assert_eq!(
            p.runs,
            [
                PathBuf::from("runs/a"),
                PathBuf::from("runs/b/metrics.jsonl")
            ]
        );
        assert_eq!((p.size, p.x, p.force), ((1600, 1000), XAxis::Step, false));
        let p = match parse(&[
            "plot", "r", "--out", "c.png", "--size", "800x600", "--x", "elapsed", "--force",
        ])
        .command
        {
            Command::Plot(p) => p,
            c => panic!("{c:?}"),
        };
        assert_eq!((p.size, p.x, p.force), ((800, 600), XAxis::Elapsed, true));
        for bad in [
            &["plot", "--out", "c.png"][..],
            &["plot", "r"],
            &["plot", "r", "--out", "c.png", "--size", "big"],
        ] {
            assert!(
                Cli::try_parse_from(std::iter::once("sere").chain(bad.iter().copied())).is_err()
            );
        }
    }
}
