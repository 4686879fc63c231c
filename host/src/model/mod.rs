//! The networks: flat parameters, the ViT backbone, the DINO and SERE heads
//! and the loss assembly.

pub mod heads;
pub mod params;
pub mod sere_loss;
pub mod vit;
