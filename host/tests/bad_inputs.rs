//! The bad-input corpus (issue 17): every case is generated here, in a
//! scratch folder, and replayed against the `sere` binary with a timeout.
//! Each must end with a non-zero exit that is not a panic (101), an abort
//! (134) or a kill (137), within the timeout, with a message naming the
//! problem; the cases that could lose data also check that nothing already
//! written changed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{sere_within, stderr, train_args, TINY, TINY_DATA};
use sere_host::checkpoint::Checkpoint;

fn sere(args: &[&str]) -> Output {
    sere_within(args, Duration::from_secs(120))
}

/// A clean refusal: non-zero, not 101/134/137 (nor killed by a signal), no
/// panic message, and `needle` in stderr.
fn assert_refused(o: &Output, needle: &str) {
    let err = stderr(o);
    let code = o.status.code();
    assert!(
        code.is_some_and(|c| c != 0 && ![101, 134, 137].contains(&c)),
        "expected a clean failure, got {:?}; stderr: {err}",
        o.status
    );
    assert!(!err.contains("panicked"), "must not panic: {err}");
    assert!(
        err.contains(needle),
        "stderr should mention {needle:?}: {err}"
    );
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fresh scratch folder for one case.
fn tmp(name: &str) -> PathBuf {
    common::scratch("bad", name)
}

/// A tiny run with checkpoints after steps 1 and 2, trained once.
fn tiny_run() -> &'static PathBuf {
    static RUN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let d = tmp("run");
        let o = sere(&train_args(&[
            "--data",
            TINY_DATA,
            "--steps",
            "2",
            "--set",
            "keep_every=1",
            "--out",
            s(&d),
        ]));
        assert_ok(&o);
        d
    })
}

fn ck(dir: &Path, step: u64) -> PathBuf {
    dir.join(sere_host::checkpoint::file_name(step))
}

/// A copy of the tiny run in a new folder.
fn copy_run(name: &str) -> PathBuf {
    let d = tmp(name);
    for step in [1, 2] {
        std::fs::copy(ck(tiny_run(), step), ck(&d, step)).unwrap();
    }
    std::fs::copy(tiny_run().join("metrics.jsonl"), d.join("metrics.jsonl")).unwrap();
    d
}

/// The tiny run's last checkpoint with `edit` applied, written to `name`.
fn edited_checkpoint(name: &str, edit: impl FnOnce(&mut Checkpoint)) -> PathBuf {
    let d = tmp(name);
    let mut c = Checkpoint::load(ck(tiny_run(), 2)).unwrap();
    edit(&mut c);
    let path = ck(&d, 2);
    c.save_atomic(&path).unwrap();
    path
}

fn set_value(c: &mut Checkpoint, prefix: &str, value: f32) -> String {
    let name = c
        .tensors
        .keys()
        .find(|k| k.starts_with(prefix))
        .unwrap_or_else(|| panic!("no tensor {prefix}*"))
        .clone();
    c.tensors.get_mut(&name).unwrap().1[0] = value;
    name
}

fn knn(checkpoint: &Path, extra: &[&str]) -> Output {
    let mut v = vec![
        "eval",
        "knn",
        "--checkpoint",
        s(checkpoint),
        "--data",
        TINY_DATA,
    ];
    v.extend_from_slice(extra);
    sere(&v)
}

// ---- data loss ----

#[test]
fn export_refuses_to_replace_what_it_did_not_write() {
    let d = tmp("export");
    let other = copy_run("export-other");
    let target = ck(&other, 2);
    let before = std::fs::read(&target).unwrap();
    let export = |out: &Path, extra: &[&str]| {
        let mut v = vec!["export", "--checkpoint", s(tiny_run()), "--out", s(out)];
        v.extend_from_slice(extra);
        sere(&v)
    };
    // Another run's newest checkpoint.
    assert_refused(
        &export(&target, &[]),
        "not a backbone written by `sere export`",
    );
    assert_eq!(std::fs::read(&target).unwrap(), before, "checkpoint kept");
    // Not a regular file: never, even with --force.
    for (path, needle) in [
        (PathBuf::from("/dev/null"), "not a regular file"),
        (d.clone(), "a directory"),
    ] {
        assert_refused(&export(&path, &["--force"]), needle);
    }
    let link = d.join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert_refused(&export(&link, &["--force"]), "a symbolic link");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    // A previous export is replaced; anything else with --force.
    let out = d.join("backbone.safetensors");
    assert_ok(&export(&out, &[]));
    assert_ok(&export(&out, &[]));
    assert_ok(&export(&target, &["--force"]));
}

#[test]
fn a_run_folder_in_use_is_refused() {
    let d = tmp("locked");
    // Held as a running `sere train` holds it.
    let lock = sere_host::train::lock_run_dir(&d).unwrap();
    let o = sere(&train_args(&[
        "--data",
        TINY_DATA,
        "--steps",
        "1",
        "--out",
        s(&d),
    ]));
    assert_refused(&o, "is in use by another `sere train`");
    assert_refused(&o, s(&d));
    assert!(!d.join("metrics.jsonl").exists(), "nothing written");
    drop(lock);
    assert_ok(&sere(&train_args(&[
        "--data",
        TINY_DATA,
        "--steps",
        "1",
        "--out",
        s(&d),
    ])));
}

#[test]
fn a_moved_run_resumes_in_the_folder_given() {
    let moved = copy_run("moved");
    let o = sere(&["train", "--resume", s(&moved), "--steps", "3"]);
    assert_ok(&o);
    assert!(ck(&moved, 3).exists(), "{}", stderr(&o));
    assert!(
        !ck(tiny_run(), 3).exists(),
        "the original folder is untouched"
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains(s(&moved)));
}

#[test]
fn resuming_an_older_checkpoint_sets_the_newer_branch_aside() {
    let run = copy_run("branch");
    let old2 = std::fs::read(ck(&run, 2)).unwrap();
    let o = sere(&["train", "--resume", s(&ck(&run, 1)), "--steps", "2"]);
    assert_ok(&o);
    assert!(stderr(&o).contains("abandoned branch"), "{}", stderr(&o));
    let aside = run.join("abandoned-after-1");
    assert_eq!(std::fs::read(ck(&aside, 2)).unwrap(), old2, "kept aside");
    assert!(aside.join("metrics.jsonl").exists());
    assert!(ck(&run, 2).exists(), "the new branch's checkpoint");
}

#[test]
fn a_run_that_died_before_its_first_checkpoint_is_no_dead_end() {
    let d = tmp("dead-end");
    std::fs::write(d.join("metrics.jsonl"), "{\"torn\n").unwrap();
    std::fs::write(d.join("config.toml"), "batch = 4\n").unwrap();
    let stale = d.join(".checkpoint-00000001.safetensors.tmp-1-0");
    std::fs::write(&stale, b"left by kill -9").unwrap();
    assert_refused(&sere(&["train", "--resume", s(&d)]), "stopped before");
    let o = sere(&train_args(&[
        "--data",
        TINY_DATA,
        "--steps",
        "1",
        "--out",
        s(&d),
    ]));
    assert_ok(&o);
    assert!(
        stderr(&o).contains("before its first checkpoint"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read(d.join("incomplete/metrics.jsonl")).unwrap(),
        b"{\"torn\n"
    );
    assert!(!stale.exists(), "stale temporary file removed");
    assert!(ck(&d, 1).exists());
}

// ---- the corpus: each case must be refused cleanly ----

#[test]
fn truncated_and_damaged_checkpoints() {
    let d = tmp("damaged");
    let bytes = std::fs::read(ck(tiny_run(), 2)).unwrap();
    let t8 = d.join("t8.safetensors");
    std::fs::write(&t8, &bytes[..8]).unwrap();
    assert_refused(&knn(&t8, &[]), "truncated");
    assert_refused(&sere(&["train", "--resume", s(&t8)]), "truncated");

    let nan = edited_checkpoint("nan-teacher", |c| {
        set_value(c, "teacher.backbone.", f32::NAN);
    });
    assert_refused(&knn(&nan, &[]), "not finite");
    let vis = d.join("vis");
    assert_refused(
        &sere(&["visualize", "--checkpoint", s(&nan), "--out", s(&vis)]),
        "not finite",
    );
    let out = d.join("b.safetensors");
    assert_refused(
        &sere(&["export", "--checkpoint", s(&nan), "--out", s(&out)]),
        "teacher.backbone.",
    );
    assert!(!out.exists(), "no NaN backbone written");

    for (prefix, value, needle) in [
        ("student.", f32::INFINITY, "not finite"),
        ("optim.v.", f32::NAN, "not finite"),
        ("optim.v.", -1.0, "negative"),
        ("bn.", f32::NAN, "not finite"),
    ] {
        let mut name = String::new();
        let path = edited_checkpoint("bad-resume", |c| {
            let p = if prefix == "bn." {
                let n = c
                    .tensors
                    .keys()
                    .find(|k| k.ends_with(".running_var"))
                    .unwrap()
                    .clone();
                c.tensors.get_mut(&n).unwrap().1[0] = value;
                n
            } else {
                set_value(c, prefix, value)
            };
            name = p;
        });
        let o = sere(&["train", "--resume", s(&path), "--steps", "3"]);
        assert_refused(&o, needle);
        assert_refused(&o, &name);
        assert!(!ck(path.parent().unwrap(), 3).exists());
    }
    let negvar = edited_checkpoint("neg-var", |c| {
        let n = c
            .tensors
            .keys()
            .find(|k| k.ends_with(".running_var"))
            .unwrap()
            .clone();
        c.tensors.get_mut(&n).unwrap().1[0] = -0.5;
    });
    assert_refused(
        &sere(&["train", "--resume", s(&negvar), "--steps", "3"]),
        "negative",
    );
}

#[test]
fn checkpoint_from_before_the_heads_were_rewired() {
    // Version 1 of the training format had the SERE heads on the normed
    // tokens with an unstacked predictor: not resumable, still evaluable.
    let old = edited_checkpoint("train-v1", |c| c.set_meta("format", "sere-train-1"));
    let o = sere(&["train", "--resume", s(&old), "--steps", "3"]);
    assert_refused(&o, "cannot be resumed");
    assert_refused(&o, "start a new run");
    assert!(!ck(old.parent().unwrap(), 3).exists());
    assert_ok(&knn(&old, &[]));
}

#[test]
fn hand_edited_checkpoint_configs() {
    for (from, to, key) in [
        ("heads = 2", "heads = 3", "heads:"),
        ("patch = 4", "patch = 0", "patch:"),
    ] {
        let path = edited_checkpoint("edited-config", |c| {
            let toml = c.meta("config").unwrap().to_string();
            assert!(toml.contains(from), "{toml}");
            c.set_meta("config", toml.replace(from, to));
        });
        assert_refused(&knn(&path, &[]), key);
        let out = path.with_file_name("b.safetensors");
        assert_refused(
            &sere(&["export", "--checkpoint", s(&path), "--out", s(&out)]),
            key,
        );
    }
}

#[test]
fn knn_settings() {
    let run = tiny_run();
    for (args, needle) in [
        (&["--k", "0"][..], "--k 0"),
        (&["--temperature", "0"], "--temperature 0"),
        (&["--temperature=-1"], "--temperature -1"),
        (&["--temperature", "nan"], "--temperature NaN"),
    ] {
        assert_refused(&knn(run, args), needle);
    }
}

#[test]
fn resume_flags_that_cannot_apply() {
    let run = copy_run("resume-flags");
    let cfg = run.join("c.toml");
    std::fs::write(&cfg, "lr = 1e-3\n").unwrap();
    let before = std::fs::read(ck(&run, 2)).unwrap();
    for (extra, needle) in [
        (
            &["--config", s(&cfg)][..],
            "--config cannot be combined with --resume",
        ),
        (&["--preset", "tiny"], "--preset cannot be combined"),
        (&["--heads", "4"], "heads: 2 -> 4"),
        (
            &["--set", "dim=64", "--depth", "3"],
            "dim: 32 -> 64, depth: 2 -> 3",
        ),
    ] {
        let mut v = vec!["train", "--resume", s(&run), "--steps", "3"];
        v.extend_from_slice(extra);
        assert_refused(&sere(&v), needle);
    }
    assert_eq!(std::fs::read(ck(&run, 2)).unwrap(), before);
    assert!(!ck(&run, 3).exists());
    // Without a value and without --out there is no run to resume.
    assert_refused(&sere(&["train", "--resume"]), "no --out was given");
}

#[test]
fn run_settings() {
    assert_refused(
        &sere(&train_args(&[
            "--data", TINY_DATA, "--steps", "1", "--set", "out=",
        ])),
        "out: is empty",
    );
    let bench = |extra: &[&str]| {
        let mut v = vec!["bench-step"];
        v.extend_from_slice(&TINY[..TINY.len() - 2]);
        v.extend_from_slice(extra);
        sere(&v)
    };
    assert_refused(&bench(&["--steps", "0"]), "--steps 0");
    let cores = std::thread::available_parallelism().unwrap().get();
    let o = bench(&["--steps", "1", "--warmup", "0", "--threads", "1000"]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains(&format!("--threads 1000 is more than the {cores} core(s)")),
        "{}",
        stderr(&o)
    );
}

/// Writes a small textured PNG (or, with `jpeg`, a JPEG) image.
fn write_image(path: &Path, v: u8, jpeg: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(48, 48, |x, y| {
        let t = ((x * 7 + y * 13) ^ (x * y)) as u8;
        image::Rgb([v.wrapping_add(t), t.wrapping_mul(3), x as u8 * 5])
    });
    let format = if jpeg {
        image::ImageFormat::Jpeg
    } else {
        image::ImageFormat::Png
    };
    img.save_with_format(path, format).unwrap();
}

fn train_on(data: &Path) -> Output {
    let spec = format!("folder:{}", s(data));
    let out = data.with_extension("out");
    let _ = std::fs::remove_dir_all(&out);
    sere(&train_args(&[
        "--data",
        &spec,
        "--steps",
        "2",
        "--out",
        s(&out),
    ]))
}

#[test]
fn image_folders() {
    // A FIFO named like an image: refused, not read forever.
    let d = tmp("fifo");
    write_image(&d.join("train/a/1.png"), 1, false);
    write_image(&d.join("train/a/2.png"), 2, false);
    let fifo = d.join("train/a/x.png");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let o = sere_within(
        &[
            "eval",
            "knn",
            "--checkpoint",
            s(tiny_run()),
            "--data",
            &format!("folder:{}", s(&d)),
        ],
        Duration::from_secs(60),
    );
    assert_refused(&o, "x.png is not a regular file");
    assert_refused(&train_on(&d), "x.png is not a regular file");

    // A truncated JPEG is named, not decoded half grey.
    let d = tmp("cut-jpeg");
    for (i, name) in ["1.jpg", "2.jpg", "3.jpg", "4.jpg"].iter().enumerate() {
        let p = d.join("a").join(name);
        write_image(&p, i as u8 * 60, true);
        // Cut in the scan data: the headers and most pixels are there.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() * 9 / 10]).unwrap();
    }
    assert_refused(&train_on(&d), "truncated");

    // Class folders whose names are not UTF-8.
    use std::os::unix::ffi::OsStrExt;
    let d = tmp("non-utf8");
    for (name, v) in [(&b"cl\xffa"[..], 1u8), (b"cl\xfea", 2)] {
        let dir = d.join(std::ffi::OsStr::from_bytes(name));
        write_image(&dir.join("1.png"), v, false);
        write_image(&dir.join("2.png"), v, false);
    }
    assert_refused(&train_on(&d), "not valid UTF-8");
}

#[test]
fn runs_too_large_for_memory_are_refused_before_allocating() {
    let d = tmp("memory");
    for extra in [
        &["--out-dim", "2000000000"][..],
        &["--overlap", "1000"],
        &["--dim", "100000"],
        &["--depth", "100000"],
        &["--img", "256", "--patch", "1"],
        &["--data", "synthetic:size=4096"],
    ] {
        let mut v = vec!["train", "--steps", "1", "--out", s(&d)];
        v.extend_from_slice(extra);
        let o = sere_within(&v, Duration::from_secs(60));
        assert_refused(&o, "the run needs about");
        assert_refused(&o, "is available");
        if !extra.contains(&"--data") {
            let mut b = vec!["bench-step", "--steps", "1", "--warmup", "0"];
            b.extend_from_slice(extra);
            let o = sere_within(&b, Duration::from_secs(60));
            assert_refused(&o, "the run needs about");
        }
    }
    assert!(!d.exists() || std::fs::read_dir(&d).unwrap().next().is_none());
    // Evaluating on a data set that cannot fit.
    let huge = "synthetic:size=4096";
    assert_refused(&knn_on(huge), "the run needs about");
    let run = s(tiny_run());
    for cmd in [
        &["eval", "linear", "--checkpoint", run, "--data", huge][..],
        &[
            "visualize",
            "--checkpoint",
            run,
            "--data",
            huge,
            "--out",
            s(&d),
        ],
    ] {
        assert_refused(&sere_within(cmd, Duration::from_secs(60)), "is available");
    }
}

fn knn_on(data: &str) -> Output {
    let run = s(tiny_run());
    sere_within(
        &["eval", "knn", "--checkpoint", run, "--data", data],
        Duration::from_secs(60),
    )
}

/// `eval` without `--data` opens the data the checkpoint was trained on;
/// when that is gone, the error names it.
#[test]
fn eval_without_data_names_the_missing_training_data() {
    let d = tmp("gone");
    for (i, class) in ["a", "b"].iter().enumerate() {
        for k in 0..4u8 {
            write_image(
                &d.join(format!("{class}/{k}.png")),
                i as u8 * 100 + k * 10,
                false,
            );
        }
    }
    let o = train_on(&d);
    assert_ok(&o);
    let out = d.with_extension("out");
    std::fs::remove_dir_all(&d).unwrap();
    for cmd in ["knn", "linear"] {
        let o = sere(&["eval", cmd, "--checkpoint", s(&out)]);
        assert_refused(&o, s(&d));
    }
}
