//! Shared by the host's integration tests (`mod common;`): one test body
//! run on every backend present, candle's `test_device!` habit. The CPU
//! always runs; CUDA runs where a device is found and otherwise prints one
//! line, `skipped: <reason>`.

#![allow(dead_code)] // each test file uses its part

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sere_host::backend::{Backend, Cuda};

/// CUDA device 0, or `None` after printing why the CUDA variant is skipped;
/// with `SERE_REQUIRE_GPU=1` (cuda/gpu-check.sh) a missing GPU fails.
pub fn cuda_or_skip() -> Option<Cuda> {
    sere_testkit::device_or_skip("CUDA", sere_host::train::engine::open_cuda)
}

/// Runs `sere` with `args`, killing it (and failing) after `timeout`.
pub fn sere_within(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sere"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sere runs");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let o = child.wait_with_output().expect("output");
            panic!(
                "sere {args:?} hung (killed after {timeout:?}); stderr: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `sere` wrote to stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh scratch folder `sere-<suite>-<pid>-<name>` in the temp dir.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sere-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Tiny synthetic data for the command-line tests.
pub const TINY_DATA: &str = "synthetic:size=16,train=64,test=32";

/// The flags of a tiny model (trains a step in well under a second).
pub const TINY: &[&str] = &[
    "--preset",
    "custom",
    "--dim",
    "32",
    "--depth",
    "2",
    "--heads",
    "2",
    "--img",
    "16",
    "--local-img",
    "8",
    "--patch",
    "4",
    "--batch",
    "4",
    "--locals",
    "0",
    "--out-dim",
    "64",
    "--set",
    "head_hidden=64",
    "--set",
    "bottleneck=32",
    "--threads",
    "2",
];

pub fn train_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train"];
    v.extend_from_slice(TINY);
    v.extend_from_slice(extra);
    v
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
