//! One SERE network (student or teacher share the layout): the ViT backbone,
//! the DINO head on the CLS token, and four SERE heads on the patch tokens
//! (spatial and channel, for global and for local crops).

use crate::backend::{Backend, OpResult};
use crate::config::TrainConfig;
use crate::model::heads::{DinoHead, DinoHeadConfig, SereHead, SereHeadState};
use crate::model::params::ParamLayout;
use crate::model::vit::{Vit, VitConfig};

/// One value per SERE head (the heads themselves, their batch-norm states,
/// their workspaces): spatial and channel relation, for global and for local
/// crops, named instead of indexed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SereHeads<T> {
    /// Spatial relation, global crops.
    pub spatial_global: T,
    /// Channel relation, global crops.
    pub channel_global: T,
    /// Spatial relation, local crops.
    pub spatial_local: T,
    /// Channel relation, local crops.
    pub channel_local: T,
}

/// Checkpoint names of the SERE heads, in [`SereHeads::iter`] order.
pub const SERE_HEAD_NAMES: [&str; 4] = [
    "spatial_global",
    "channel_global",
    "spatial_local",
    "channel_local",
];

impl<T> SereHeads<T> {
    /// Builds each head's value from its checkpoint name.
    pub fn from_fn(mut f: impl FnMut(&'static str) -> T) -> Self {
        let [sg, cg, sl, cl] = SERE_HEAD_NAMES;
        SereHeads {
            spatial_global: f(sg),
            channel_global: f(cg),
            spatial_local: f(sl),
            channel_local: f(cl),
        }
    }

    /// Each head's value mapped by a fallible `f`, in checkpoint order.
    pub fn try_map<U, E>(&self, mut f: impl FnMut(&T) -> Result<U, E>) -> Result<SereHeads<U>, E> {
        Ok(SereHeads {
            spatial_global: f(&self.spatial_global)?,
            channel_global: f(&self.channel_global)?,
            spatial_local: f(&self.spatial_local)?,
            channel_local: f(&self.channel_local)?,
        })
    }

    /// `(name, value)` in checkpoint order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &T)> {
        SERE_HEAD_NAMES.into_iter().zip([
            &self.spatial_global,
            &self.channel_global,
            &self.spatial_local,
            &self.channel_local,
        ])
    }

    /// `(name, value)` in checkpoint order, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&'static str, &mut T)> {
        SERE_HEAD_NAMES.into_iter().zip([
            &mut self.spatial_global,
            &mut self.channel_global,
            &mut self.spatial_local,
            &mut self.channel_local,
        ])
    }
}

/// The network's modules and their place in one flat parameter buffer.
#[derive(Debug, Clone)]
pub struct SereNet {
    /// Names, shapes and ranges of every parameter.
    pub layout: ParamLayout,
    /// Backbone.
    pub vit: Vit,
    /// Image-level head.
    pub dino: DinoHead,
    /// Relation heads.
    pub sere: SereHeads<SereHead>,
    /// iBOT's patch head when it has its own parameters (`mim` without
    /// `shared_head`); see [`SereNet::patch_head`].
    pub separate_patch_head: Option<DinoHead>,
}

impl SereNet {
    /// Builds the layout for a configuration (validated by the caller).
    pub fn new(cfg: &TrainConfig) -> Self {
        let mut layout = ParamLayout::new();
        let vit = Vit::new(&mut layout, BACKBONE_PREFIX, vit_config(cfg));
        let head = |out_dim| DinoHeadConfig {
            in_dim: cfg.dim,
            out_dim,
            hidden_dim: cfg.head_hidden,
            bottleneck_dim: cfg.bottleneck,
            nlayers: 3,
            norm_last_layer: cfg.norm_last_layer,
        };
        let dino = DinoHead::new(&mut layout, "dino_head", head(cfg.out_dim));
        let sere = SereHeads::from_fn(|n| SereHead::new(&mut layout, n, cfg.dim));
        // After every other tensor, so a run without it keeps its layout.
        let separate_patch_head = (cfg.mim && !cfg.shared_head)
            .then(|| DinoHead::new(&mut layout, "patch_head", head(cfg.patch_out_dim)));
        SereNet {
            layout,
            vit,
            dino,
            sere,
            separate_patch_head,
        }
    }

    /// iBOT's patch head: its own when it has one, else the CLS head
    /// (`shared_head`, as the authors' recipes).
    pub fn patch_head(&self) -> &DinoHead {
        self.separate_patch_head.as_ref().unwrap_or(&self.dino)
    }

    /// Parameters of one network (the student; the teacher is its copy):
    /// `(backbone, image-level heads, SERE heads)`, the image-level heads
    /// being the DINO head and a separate patch head.
    ///
    /// ```
    /// use sere_host::{config::TrainConfig, train::network::SereNet};
    /// let net = SereNet::new(&TrainConfig::default());
    /// let (backbone, image, sere) = net.parameter_counts();
    /// assert_eq!(backbone + image + sere, net.layout.len());
    /// ```
    pub fn parameter_counts(&self) -> (usize, usize, usize) {
        let heads = [&Some(self.dino.clone()), &self.separate_patch_head];
        let image: usize = heads
            .iter()
            .filter_map(|h| h.as_ref())
            .map(|h| h.param_range().len())
            .sum();
        let backbone: usize = self
            .layout
            .entries()
            .iter()
            .filter(|e| e.name.starts_with(BACKBONE_PREFIX))
            .map(|e| e.range.len())
            .sum();
        (backbone, image, self.layout.len() - backbone - image)
    }

    /// Fresh batch-norm running statistics of the four SERE heads.
    pub fn new_bn_states<B: Backend>(&self, be: &B) -> OpResult<SereHeads<SereHeadState<B>>> {
        self.sere.try_map(|h| h.new_state(be))
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
        mask_token: cfg.mim,
    }
}
