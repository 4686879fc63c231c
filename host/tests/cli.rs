//! The `sere` command's behaviour on bad input: a clear message naming the
//! problem, a non-zero exit, no panic, and nothing already written lost.

use std::path::PathBuf;
use std::process::{Command, Output};

fn sere(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sere"))
        .args(args)
        .output()
        .expect("sere runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "must not panic: {err}");
    assert!(
        err.contains(needle),
        "stderr should mention {needle:?}: {err}"
    );
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sere-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn impossible_config_is_explained() {
    let o = sere(&["train", "--img", "30", "--patch", "4", "--steps", "1"]);
    assert_fails_with(&o, "img");
    let o = sere(&[
        "train", "--dim", "100", "--heads", "3", "--preset", "custom", "--steps", "1",
    ]);
    assert_fails_with(&o, "heads");
}

#[test]
fn unknown_config_key_is_named() {
    let d = tmp("cfg");
    let f = d.join("bad.toml");
    std::fs::write(&f, "learning_rate = 0.1\n").unwrap();
    let o = sere(&["train", "--config", f.to_str().unwrap(), "--steps", "1"]);
    assert_fails_with(&o, "learning_rate");
}

#[test]
fn missing_data_is_reported() {
    let o = sere(&[
        "train",
        "--data",
        "/nonexistent/imagenet",
        "--steps",
        "1",
        "--out",
        tmp("nodata").to_str().unwrap(),
    ]);
    assert_fails_with(&o, "/nonexistent/imagenet");
}

#[test]
fn corrupt_checkpoint_is_rejected_and_kept() {
    let d = tmp("corrupt");
    let ck = d.join("checkpoint-00000005.safetensors");
    std::fs::write(&ck, b"this is not a safetensors file").unwrap();
    let o = sere(&["train", "--resume", ck.to_str().unwrap()]);
    assert_fails_with(&o, "checkpoint-00000005.safetensors");
    assert_eq!(
        std::fs::read(&ck).unwrap(),
        b"this is not a safetensors file"
    );
    let o = sere(&[
        "eval",
        "knn",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--data",
        "synthetic",
    ]);
    assert_fails_with(&o, "checkpoint-00000005.safetensors");
}

#[test]
fn cuda_without_a_cuda_build_is_a_clear_error() {
    let o = sere(&[
        "bench-step",
        "--device",
        "cuda",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]);
    assert_fails_with(&o, "cuda");
}

#[test]
fn unimplemented_commands_say_so() {
    let o = sere(&["export", "--checkpoint", "x"]);
    assert!(!o.status.success());
    assert!(!stderr(&o).contains("panicked"));
}
