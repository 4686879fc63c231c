//! The networks, written once over a [`crate::backend::Backend`]: flat
//! parameters, the ViT backbone, the DINO and SERE heads.

pub mod heads;
pub mod params;
pub mod vit;
