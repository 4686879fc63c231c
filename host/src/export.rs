//! `sere export`: a checkpoint's ViT backbone as a standalone safetensors
//! file under timm's (and DINO's) parameter names, the form in which DINO and
//! SERE release their pre-trained backbones.
//!
//! The names and shapes are those of timm's `VisionTransformer` (`cls_token`,
//! `pos_embed`, `patch_embed.proj.*`, `blocks.<i>.{norm1,attn.qkv,attn.proj,
//! norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`), which the ViT reference test checks
//! against a PyTorch implementation. In Python:
//!
//! ```text
//! from safetensors.torch import load_file
//! model = timm.create_model("vit_small_patch16_224", num_classes=0,
//!                           img_size=..., dynamic_img_size=True)
//! model.load_state_dict(load_file("backbone.safetensors"))
//! ```
//!
//! The model's sizes travel in the file's metadata ([`meta`]); the heads,
//! optimizer state and the other network are left out.

use std::path::Path;

use crate::checkpoint::{self, Checkpoint, CheckpointError};
use crate::error::SereError;
use crate::model::vit::MASK_TOKEN;
use crate::train::network::{SereNet, BACKBONE_PREFIX};

/// Value of the `format` metadata key of an exported backbone.
pub const FORMAT: &str = checkpoint::formats::BACKBONE;

/// Metadata keys of an exported backbone besides `format`, `format_version`
/// and `step` (those of [`checkpoint::meta`]).
pub mod meta {
    /// `"teacher"` or `"student"`.
    pub const NETWORK: &str = "network";
    /// timm-style model sizes: image size the position grid was trained at.
    pub const IMG_SIZE: &str = "img_size";
    /// Patch size in pixels.
    pub const PATCH_SIZE: &str = "patch_size";
    /// Input channels.
    pub const IN_CHANS: &str = "in_chans";
    /// Token width.
    pub const EMBED_DIM: &str = "embed_dim";
    /// Transformer blocks.
    pub const DEPTH: &str = "depth";
    /// Attention heads.
    pub const NUM_HEADS: &str = "num_heads";
    /// MLP hidden width over the token width.
    pub const MLP_RATIO: &str = "mlp_ratio";
    /// Layer-norm epsilon.
    pub const NORM_EPS: &str = "norm_eps";
    /// The training run's config (TOML), for provenance.
    pub const TRAIN_CONFIG: &str = "train_config";
    /// Per-channel input mean (RGB, of values in `[0, 1]`), as a JSON list:
    /// timm's `pretrained_cfg["mean"]`.
    pub const MEAN: &str = "mean";
    /// Per-channel input standard deviation, as a JSON list (timm's `std`).
    pub const STD: &str = "std";
    /// Fraction of the image's shorter side the evaluation centre crop
    /// keeps before resizing to `img_size` (timm's `crop_pct`; 1.0: the
    /// whole centre square, as `sere eval` does).
    pub const CROP_PCT: &str = "crop_pct";
    /// Resampling of that crop (timm's `interpolation`): PIL-style bilinear
    /// (a triangle filter that widens when shrinking).
    pub const INTERPOLATION: &str = "interpolation";
}

/// Checks that `sere export` may write `out`: a new file, or a backbone an
/// earlier export wrote; any other file (a training checkpoint, data) only
/// with `force`; never anything but a regular file, whatever `force` says
/// (the atomic rename would replace `/dev/null`, a FIFO or a symbolic link
/// itself).
pub fn check_target(out: &Path, force: bool) -> Result<(), SereError> {
    let meta = match out.symlink_metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SereError::io("cannot inspect the --out file", out, e)),
    };
    if !meta.file_type().is_file() {
        let what = if meta.file_type().is_symlink() {
            "a symbolic link"
        } else if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a device, FIFO or socket)"
        };
        return Err(SereError::Other(format!(
            "--out {} is {what}; export writes a new regular file: name a file path \
             (e.g. backbone.safetensors)",
            out.display()
        )));
    }
    if force || checkpoint::format_of(out).as_deref() == Some(FORMAT) {
        return Ok(());
    }
    Err(SereError::Other(format!(
        "--out {} already exists and is not a backbone written by `sere export` (it may be \
         a training checkpoint); choose another file name, or pass --force to replace it",
        out.display()
    )))
}

/// Which of the two networks of a SERE checkpoint to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Network {
    /// The EMA teacher: what DINO and SERE evaluate and release.
    Teacher,
    /// The student, as last updated by the optimizer.
    Student,
}

impl Network {
    /// The key prefix of this network's tensors in a training checkpoint.
    pub fn checkpoint_key(self) -> &'static str {
        match self {
            Network::Teacher => checkpoint::keys::TEACHER,
            Network::Student => checkpoint::keys::STUDENT,
        }
    }

    /// The name stored in the file's metadata.
    pub fn name(self) -> &'static str {
        match self {
            Network::Teacher => "teacher",
            Network::Student => "student",
        }
    }
}

/// The backbone of `network` in the training checkpoint `ck`, under timm's
/// names, with the model sizes, the step and the run's config as metadata.
/// Every backbone tensor is read with its shape checked against the config,
/// so a checkpoint of another model is refused rather than half exported.
pub fn backbone(ck: &Checkpoint, network: Network) -> Result<Checkpoint, CheckpointError> {
    // A NaN in the checkpoint would otherwise be exported as if trained.
    let cfg = ck.training_config()?;
    let net = SereNet::new(&cfg);
    let mut params = vec![0.0f32; net.layout.len()];
    ck.read_params(network.checkpoint_key(), &net.layout, &mut params)?;

    let vit = net.vit.config();
    let mut out = Checkpoint::new();
    out.set_meta(checkpoint::meta::FORMAT, FORMAT);
    for e in net.layout.entries() {
        match e.name.strip_prefix(BACKBONE_PREFIX) {
            // iBOT's mask token only exists in training: timm's ViT has none.
            Some(MASK_TOKEN) | None => {}
            Some(name) => out.insert(name, &e.shape, params[e.range.clone()].to_vec()),
        }
    }
    if let Some(step) = ck.meta(checkpoint::meta::STEP) {
        out.set_meta(checkpoint::meta::STEP, step);
    }
    out.set_meta(meta::NETWORK, network.name());
    out.set_meta(meta::IMG_SIZE, vit.img);
    out.set_meta(meta::PATCH_SIZE, vit.patch);
    out.set_meta(meta::IN_CHANS, vit.in_chans);
    out.set_meta(meta::EMBED_DIM, vit.dim);
    out.set_meta(meta::DEPTH, vit.depth);
    out.set_meta(meta::NUM_HEADS, vit.heads);
    out.set_meta(meta::MLP_RATIO, vit.mlp_ratio);
    out.set_meta(meta::NORM_EPS, crate::backend::LN_EPS);
    out.set_meta(meta::TRAIN_CONFIG, cfg.to_toml());
    // The input protocol `sere eval` feeds the backbone, so that code
    // loading the file preprocesses as the features were evaluated.
    let eval = crate::data::EvalTransform::new(vit.img);
    let list = |v: [f32; 3]| format!("[{}, {}, {}]", v[0], v[1], v[2]);
    out.set_meta(meta::MEAN, list(eval.mean));
    out.set_meta(meta::STD, list(eval.std));
    out.set_meta(meta::CROP_PCT, eval.crop_fraction);
    out.set_meta(meta::INTERPOLATION, "bilinear");
    Ok(out)
}
