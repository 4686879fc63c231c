//! Weights in: a ViT backbone under timm's parameter names, as `sere export`
//! writes it or as timm and Hugging Face save one (a plain `state_dict` in
//! safetensors, e.g. `safetensors.torch.save_file(model.state_dict(), f)`).
//!
//! `sere train --init-from FILE` starts the student and the teacher from it
//! (the heads keep their initialisation), and `eval`, `visualize` and
//! `export` read it where they read a training checkpoint. Matching is
//! strict: every backbone tensor of the model must be in the file with its
//! shape, and the file may hold nothing else, or the error lists each
//! mismatch.
//!
//! A file of `sere export` carries its model's sizes; a bare timm file does
//! not, so they are read from the tensors' shapes ([`backbone_config`]): the
//! width from `cls_token`, the patch from `patch_embed.proj.weight`, the
//! depth from the blocks, the MLP ratio from `mlp.fc1`, the trained image
//! size from `pos_embed`, and the heads from a `num_heads` metadata entry or
//! else timm's 64 channels per head (ViT-Ti/S/B/L all have it).

use std::collections::BTreeSet;

use crate::checkpoint::{self, Checkpoint};
use crate::config::{Preset, TrainConfig};
use crate::error::SereError;
use crate::export;
use crate::model::vit::MASK_TOKEN;
use crate::train::network::{SereNet, BACKBONE_PREFIX};

/// Channels per attention head of timm's standard ViTs: the heads of a bare
/// timm file with no `num_heads` entry.
pub const TIMM_HEAD_DIM: usize = 64;

/// Whether `ck` holds a backbone alone (a `sere export` file or a bare timm
/// `state_dict`) rather than a training checkpoint.
///
/// ```
/// use sere_host::checkpoint::Checkpoint;
/// use sere_host::import::is_backbone;
/// let mut timm = Checkpoint::new();
/// timm.insert("cls_token", &[1, 1, 8], vec![0.0; 8]);
/// assert!(is_backbone(&timm));
/// assert!(!is_backbone(&Checkpoint::new()));
/// ```
pub fn is_backbone(ck: &Checkpoint) -> bool {
    ck.meta(checkpoint::meta::FORMAT) == Some(export::FORMAT)
        || (ck.tensors.contains_key("cls_token")
            && !ck
                .tensors
                .keys()
                .any(|k| k.starts_with(checkpoint::keys::STUDENT)))
}

/// The shape of tensor `name`, or the error naming the file's kind.
fn shape<'a>(ck: &'a Checkpoint, name: &str) -> Result<&'a [usize], SereError> {
    ck.tensors
        .get(name)
        .map(|(s, _)| s.as_slice())
        .ok_or_else(|| {
            SereError::Other(format!(
                "the backbone file has no `{name}`: it is not a timm VisionTransformer state_dict \
                 (expected cls_token, pos_embed, patch_embed.proj.*, blocks.<i>.*, norm.*)"
            ))
        })
}

/// The model configuration of the backbone in `ck`: the training config a
/// `sere export` file stores, else one read from a bare timm file's tensor
/// shapes (see the module docs). Settings a backbone does not fix (heads
/// sizes, crops, schedule) keep their defaults.
pub fn backbone_config(ck: &Checkpoint) -> Result<TrainConfig, SereError> {
    if let Some(toml) = ck.meta(export::meta::TRAIN_CONFIG) {
        return TrainConfig::from_toml(toml)
            .map_err(|e| SereError::Other(format!("the backbone's stored training config: {e}")));
    }
    let cls = shape(ck, "cls_token")?;
    let proj = shape(ck, "patch_embed.proj.weight")?;
    let pos = shape(ck, "pos_embed")?;
    let fc1 = shape(ck, "blocks.0.mlp.fc1.weight")?;
    let (dim, patch) = (cls[cls.len() - 1], proj[proj.len() - 1]);
    if proj.len() != 4 || proj[1] != 3 || proj[2] != patch {
        return Err(SereError::Other(format!(
            "patch_embed.proj.weight has shape {proj:?}; sere's ViT takes square patches of \
             3-channel images ([dim, 3, p, p])"
        )));
    }
    let tokens = pos[pos.len() - 2].saturating_sub(1);
    let grid = (tokens as f64).sqrt().round() as usize;
    if grid * grid != tokens {
        return Err(SereError::Other(format!(
            "pos_embed has {} positions: not 1 class token + a square grid (a ViT with \
             register tokens or without a class token is not supported)",
            tokens + 1
        )));
    }
    let depth = (0..)
        .take_while(|i| ck.tensors.contains_key(&format!("blocks.{i}.norm1.weight")))
        .count();
    let heads = match ck.meta("num_heads") {
        Some(h) => h.parse::<usize>().map_err(|_| {
            SereError::Other(format!(
                "the backbone's num_heads metadata {h:?} is not a count"
            ))
        })?,
        None if dim % TIMM_HEAD_DIM == 0 => dim / TIMM_HEAD_DIM,
        None => {
            return Err(SereError::Other(format!(
                "a bare timm file does not say its attention heads, and embed_dim {dim} is not \
                 a multiple of timm's {TIMM_HEAD_DIM} channels per head; save it with \
                 metadata={{\"num_heads\": \"H\"}} (safetensors.torch.save_file)"
            )))
        }
    };
    let img = grid * patch;
    let defaults = TrainConfig::default();
    let cfg = TrainConfig {
        preset: Preset::Custom,
        img,
        patch,
        dim,
        depth,
        heads,
        mlp_ratio: fc1[0] as f64 / dim as f64,
        local_img: (grid / 2).max(1) * patch,
        overlap: defaults.overlap.min(grid),
        local_overlap: defaults.local_overlap.min((grid / 2).max(1)),
        ..defaults
    };
    cfg.validate()
        .map_err(|e| SereError::Other(format!("the backbone's sizes: {e}")))?;
    Ok(cfg)
}

/// Reads the backbone in `ck` into the backbone part of `params` (a flat
/// buffer of `net`'s layout), strictly: every backbone tensor of `net`
/// (but iBOT's mask token, which only training has) must be in `ck` with
/// its shape, and `ck` may hold nothing else; otherwise the error lists
/// the missing, unexpected and misshapen tensors.
pub fn read_backbone(ck: &Checkpoint, net: &SereNet, params: &mut [f32]) -> Result<(), SereError> {
    let mut wanted = BTreeSet::new();
    let (mut missing, mut misshapen) = (Vec::new(), Vec::new());
    for e in net.layout.entries() {
        let Some(name) = e.name.strip_prefix(BACKBONE_PREFIX) else {
            continue;
        };
        if name == MASK_TOKEN {
            continue;
        }
        wanted.insert(name);
        match ck.tensors.get(name) {
            None => missing.push(name.to_string()),
            Some((s, _)) if *s != e.shape => {
                misshapen.push(format!("{name} {s:?} (the model's: {:?})", e.shape))
            }
            Some((_, data)) => params[e.range.clone()].copy_from_slice(data),
        }
    }
    let unexpected: Vec<String> = ck
        .tensors
        .keys()
        .filter(|k| !wanted.contains(k.as_str()))
        .cloned()
        .collect();
    if missing.is_empty() && misshapen.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let list = |what: &str, v: &[String]| {
        (!v.is_empty()).then(|| {
            let shown: Vec<&str> = v.iter().take(8).map(String::as_str).collect();
            let more = v.len().saturating_sub(8);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!("{} {what}: {}{more}", v.len(), shown.join(", "))
        })
    };
    let parts: Vec<String> = [
        list("missing", &missing),
        list("not in the model", &unexpected),
        list("of another shape", &misshapen),
    ]
    .into_iter()
    .flatten()
    .collect();
    Err(SereError::Other(format!(
        "the backbone does not fit the model ({}); every tensor must match: give the model's \
         sizes of the file (--dim, --depth, --heads, --patch, --img of the trained \
         position grid), or a timm ViT without a classifier head (num_classes=0)",
        parts.join("; ")
    )))
}

/// The backbone `--init-from` names: a backbone file as it is, or the
/// teacher of a training checkpoint under timm's names.
pub fn load_backbone(path: &std::path::Path) -> Result<Checkpoint, SereError> {
    let ck = Checkpoint::load(path)?;
    if is_backbone(&ck) {
        return Ok(ck);
    }
    Ok(export::backbone(&ck, export::Network::Teacher)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TrainConfig {
        TrainConfig {
            preset: Preset::Custom,
            img: 16,
            patch: 4,
            dim: 64,
            depth: 2,
            heads: 1,
            local_img: 8,
            overlap: 4,
            local_overlap: 2,
            ..TrainConfig::default()
        }
    }

    /// A bare timm-style file of `cfg`'s backbone: tensor `i` filled with `i`.
    fn timm_file(cfg: &TrainConfig) -> Checkpoint {
        let net = SereNet::new(cfg);
        let mut ck = Checkpoint::new();
        for (i, e) in net.layout.entries().iter().enumerate() {
            if let Some(name) = e.name.strip_prefix(BACKBONE_PREFIX) {
                if name != MASK_TOKEN {
                    let n = e.range.len();
                    ck.insert(name, &e.shape, vec![i as f32; n]);
                }
            }
        }
        ck
    }

    #[test]
    fn a_bare_timm_file_gives_its_sizes_and_loads_exactly() {
        let cfg = tiny();
        let file = timm_file(&cfg);
        assert!(is_backbone(&file));
        let read = backbone_config(&file).unwrap();
        assert_eq!(
            (
                read.img,
                read.patch,
                read.dim,
                read.depth,
                read.heads,
                read.mlp_ratio
            ),
            (16, 4, 64, 2, 1, 4.0),
            "64 channels per head"
        );
        let net = SereNet::new(&read);
        let mut params = vec![-1.0; net.layout.len()];
        read_backbone(&file, &net, &mut params).unwrap();
        for (i, e) in net.layout.entries().iter().enumerate() {
            let inside = e.name.starts_with(BACKBONE_PREFIX) && !e.name.ends_with(MASK_TOKEN);
            let want = if inside { i as f32 } else { -1.0 };
            assert!(
                params[e.range.clone()].iter().all(|&v| v == want),
                "{}",
                e.name
            );
        }
    }

    #[test]
    fn every_mismatch_is_listed() {
        let cfg = tiny();
        let mut file = timm_file(&cfg);
        file.tensors.remove("norm.bias");
        file.insert("head.weight", &[10, 64], vec![0.0; 640]);
        file.insert("pos_embed", &[1, 5, 64], vec![0.0; 320]);
        let net = SereNet::new(&cfg);
        let mut params = vec![0.0; net.layout.len()];
        let e = read_backbone(&file, &net, &mut params)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 missing: norm.bias"), "{e}");
        assert!(e.contains("1 not in the model: head.weight"), "{e}");
        assert!(
            e.contains("pos_embed [1, 5, 64] (the model's: [1, 17, 64])"),
            "{e}"
        );
    }

    #[test]
    fn heads_come_from_metadata_or_timm_s_head_width() {
        let cfg = TrainConfig {
            dim: 96,
            heads: 3,
            ..tiny()
        };
        let mut file = timm_file(&cfg);
        let e = backbone_config(&file).unwrap_err().to_string();
        assert!(e.contains("num_heads"), "{e}");
        file.set_meta("num_heads", 3);
        assert_eq!(backbone_config(&file).unwrap().heads, 3);
    }
}
