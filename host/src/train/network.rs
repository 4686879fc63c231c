//! One SERE network (student or teacher share the layout): the ViT backbone,
//! the DINO head on the CLS token, and four SERE heads on the patch tokens
//! (spatial and channel, for global and for local crops).

use crate::config::TrainConfig;
use crate::model::heads::{DinoHead, DinoHeadConfig, SereHead, SereHeadState};
use crate::model::params::ParamLayout;
use crate::model::vit::{Vit, VitConfig};

/// Index of each SERE head in [`SereNet::sere`].
pub const SPATIAL_GLOBAL: usize = 0;
/// Channel head for global crops.
pub const CHANNEL_GLOBAL: usize = 1;
/// Spatial head for local crops.
pub const SPATIAL_LOCAL: usize = 2;
/// Channel head for local crops.
pub const CHANNEL_LOCAL: usize = 3;
/// Checkpoint names of the SERE heads, in index order.
pub const SERE_HEAD_NAMES: [&str; 4] = [
    "spatial_global",
    "channel_global",
    "spatial_local",
    "channel_local",
];

/// The network's modules and their place in one flat parameter buffer.
#[derive(Debug, Clone)]
pub struct SereNet {
    /// Names, shapes and ranges of every parameter.
    pub layout: ParamLayout,
    /// Backbone.
    pub vit: Vit,
    /// Image-level head.
    pub dino: DinoHead,
    /// Relation heads, indexed by [`SPATIAL_GLOBAL`] etc.
    pub sere: [SereHead; 4],
}

impl SereNet {
    /// Builds the layout for a configuration (validated by the caller).
    pub fn new(cfg: &TrainConfig) -> Self {
        let mut layout = ParamLayout::new();
        let vit = Vit::new(&mut layout, BACKBONE_PREFIX, vit_config(cfg));
        let dino = DinoHead::new(
            &mut layout,
            "dino_head",
            DinoHeadConfig {
                in_dim: cfg.dim,
                out_dim: cfg.out_dim,
                hidden_dim: cfg.head_hidden,
                bottleneck_dim: cfg.bottleneck,
                nlayers: 3,
            },
        );
        let sere = SERE_HEAD_NAMES.map(|n| SereHead::new(&mut layout, n, cfg.dim));
        SereNet {
            layout,
            vit,
            dino,
            sere,
        }
    }

    /// Fresh batch-norm running statistics of the four SERE heads.
    pub fn new_bn_states(&self) -> [SereHeadState; 4] {
        [0, 1, 2, 3].map(|i| self.sere[i].new_state())
    }
}

/// Name prefix of the backbone's parameters in a network's layout (the
/// rest of each name is timm's).
pub const BACKBONE_PREFIX: &str = "backbone.";

/// The backbone's configuration from a training configuration.
pub fn vit_config(cfg: &TrainConfig) -> VitConfig {
    VitConfig {
        img: cfg.img,
        patch: cfg.patch,
        dim: cfg.dim,
        depth: cfg.depth,
        heads: cfg.heads,
        mlp_ratio: cfg.mlp_ratio as f32,
        drop_path: cfg.drop_path as f32,
        in_chans: 3,
    }
}
