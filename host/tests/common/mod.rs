//! Shared by the host's integration tests (`mod common;`): one test body
//! run on every backend present, candle's `test_device!` habit. The CPU
//! always runs; CUDA runs where a device is found and otherwise prints one
//! line, `skipped: <reason>`.

#![allow(dead_code)] // each test file uses its part

use sere_host::backend::{Backend, Cuda};

/// CUDA device 0, or `None` after printing why the CUDA variant is skipped;
/// with `SERE_REQUIRE_GPU=1` (cuda/gpu-check.sh) a missing GPU fails.
pub fn cuda_or_skip() -> Option<Cuda> {
    match sere_host::train::engine::open_cuda() {
        Ok(cuda) => Some(cuda),
        Err(e) => {
            if std::env::var("SERE_REQUIRE_GPU").is_ok_and(|v| !v.is_empty() && v != "0") {
                panic!("SERE_REQUIRE_GPU is set, but {e}");
            }
            println!("skipped: {e}");
            None
        }
    }
}

/// Uploads `host` to `be`.
pub fn up<B: Backend>(be: &B, host: &[f32]) -> B::Buf {
    be.upload(host).expect("upload")
}

/// Downloads `buf` from `be`.
pub fn down<B: Backend>(be: &B, buf: &B::Buf) -> Vec<f32> {
    be.download(buf).expect("download")
}

/// For each `name => body`, a module `name` with one test per backend:
/// `name::cpu` and `name::cuda`, each calling `body(&backend)`.
#[macro_export]
#[allow(clippy::crate_in_macro_def)] // `crate` is the test binary using it
macro_rules! on_every_backend {
    ($($name:ident => $body:ident;)*) => {
        $(
            mod $name {
                #[test]
                fn cpu() {
                    super::$body(&sere_host::backend::Cpu);
                }
                #[test]
                fn cuda() {
                    if let Some(be) = crate::common::cuda_or_skip() {
                        super::$body(&be);
                    }
                }
            }
        )*
    };
}
