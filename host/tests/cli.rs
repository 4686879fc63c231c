//! The `sere` command's behaviour on bad input: a clear message naming the
//! problem, a non-zero exit, no panic, and nothing already written lost.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use common::{stderr, train_args, TINY_DATA};

fn sere(args: &[&str]) -> Output {
    common::sere_within(args, Duration::from_secs(600))
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
    common::scratch("cli", name)
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

/// Every command that runs the model takes `--device`; without a GPU,
/// `--device cuda` is the no-GPU error, never a silent CPU run.
#[test]
fn eval_and_visualize_on_cuda_run_there_or_say_why_not() {
    if sere_cuda::probe().is_ok() {
        println!("skipped: a GPU is present (the GPU runs are in gpu-check)");
        return;
    }
    let ck = tiny_run().to_str().unwrap();
    let out = tmp("vis-cuda");
    let vis = [
        "visualize",
        "--checkpoint",
        ck,
        "--data",
        TINY_DATA,
        "--count",
        "1",
    ];
    let cases: [Vec<&str>; 3] = [
        vec!["eval", "knn", "--checkpoint", ck, "--data", TINY_DATA],
        vec!["eval", "linear", "--checkpoint", ck, "--data", TINY_DATA],
        [&vis[..], &["--out", out.to_str().unwrap()]].concat(),
    ];
    for args in cases {
        let o = sere(&[&args[..], &["--device", "cuda"]].concat());
        assert_fails_with(&o, "--device cuda needs an NVIDIA GPU");
        assert_fails_with(&o, "run with --device cpu");
        assert!(o.stdout.is_empty(), "{args:?} printed a result: no CPU run");
    }
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "no maps drawn");
}

/// A run directory with a tiny checkpoint (2 steps on tiny synthetic data),
/// trained once per test binary.
fn tiny_run() -> &'static PathBuf {
    static RUN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    RUN.get_or_init(|| {
        let d = tmp("tiny-run");
        let out = d.to_str().unwrap();
        let o = sere(&train_args(&[
            "--steps", "2", "--data", TINY_DATA, "--out", out,
        ]));
        assert!(o.status.success(), "tiny training failed: {}", stderr(&o));
        d
    })
}

#[test]
fn a_fresh_run_does_not_overwrite_an_existing_one() {
    let run = tiny_run();
    let metrics = run.join("metrics.jsonl");
    let ck = run.join("checkpoint-00000002.safetensors");
    let before = (
        std::fs::read(&metrics).unwrap(),
        std::fs::read(&ck).unwrap(),
    );
    let o = sere(&[
        "train",
        "--preset",
        "tiny",
        "--data",
        TINY_DATA,
        "--steps",
        "1",
        "--out",
        run.to_str().unwrap(),
    ]);
    // Another model in a folder holding a run is not continued: it is
    // refused, naming the change and the ways to start a new run.
    assert_fails_with(&o, "holds a run of another model");
    assert_fails_with(&o, "dim: 32 -> ");
    assert_fails_with(&o, "--no-resume");

    // Resuming another run's checkpoint into this folder is refused too;
    // into a new folder it continues there.
    let other = tmp("resume-into");
    let other_ck = other.join("checkpoint-00000002.safetensors");
    std::fs::copy(&ck, &other_ck).unwrap();
    let resume_into = |out: &std::path::Path| {
        sere(&[
            "train",
            "--resume",
            other_ck.to_str().unwrap(),
            "--steps",
            "3",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    assert_fails_with(&resume_into(run), "already holds a training run");
    let after = (
        std::fs::read(&metrics).unwrap(),
        std::fs::read(&ck).unwrap(),
    );
    assert!(before == after, "metrics and checkpoint untouched");
    let fresh = other.join("continued");
    let o = resume_into(&fresh);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fresh.join("checkpoint-00000003.safetensors").exists());
}

/// The JSON lines of stdout.
fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[test]
fn eval_linear_reports_top1_deterministically() {
    let run = tiny_run().to_str().unwrap();
    let args = [
        "eval",
        "linear",
        "--checkpoint",
        run,
        "--data",
        TINY_DATA,
        "--threads",
        "2",
        "--pixels",
    ];
    let o = sere(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, features) in lines.iter().zip(["teacher_cls", "pixels"]) {
        assert_eq!(line["metric"], "linear_top1");
        assert_eq!(line["features"], features);
        assert_eq!(
            (line["train"].as_u64(), line["test"].as_u64()),
            (Some(64), Some(32))
        );
        let top1 = line["top1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&top1), "{line}");
        // The probe fits its training set better than chance (10 classes).
        assert!(line["train_top1"].as_f64().unwrap() > 0.3, "{line}");
        assert!(line["loss"].as_f64().unwrap() < 10f64.ln(), "{line}");
    }
    // Same numbers on a second run (timings aside), and with SGD too.
    let strip = |mut v: serde_json::Value| {
        let m = v.as_object_mut().unwrap();
        m.remove("features_s");
        m.remove("fit_s");
        v
    };
    let again = json_lines(&sere(&args));
    assert_eq!(strip(again[0].clone()), strip(lines[0].clone()));
    let sgd = sere(&[
        "eval",
        "linear",
        "--checkpoint",
        run,
        "--data",
        TINY_DATA,
        "--optimizer",
        "sgd",
        "--epochs",
        "5",
    ]);
    assert!(sgd.status.success(), "{}", stderr(&sgd));
    assert_eq!(json_lines(&sgd)[0]["optimizer"], "sgd");
}

#[test]
fn eval_takes_dino_linear_evaluation_features_and_checks_the_block_count() {
    let run = tiny_run().to_str().unwrap();
    let o = sere(&[
        "eval",
        "linear",
        "--knn",
        "--last-blocks",
        "2",
        "--avgpool",
        "--checkpoint",
        run,
        "--data",
        TINY_DATA,
        "--epochs",
        "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 2, "{lines:?}");
    for (line, metric) in lines.iter().zip(["knn_top1", "linear_top1"]) {
        assert_eq!(line["metric"], metric);
        assert_eq!(line["features"], "teacher_cls_last2+avgpool");
    }
    // The tiny backbone has 2 blocks: asking for 3 is refused, saying why.
    for cmd in ["knn", "linear"] {
        let o = sere(&[
            "eval",
            cmd,
            "--last-blocks",
            "3",
            "--checkpoint",
            run,
            "--data",
            TINY_DATA,
        ]);
        assert_fails_with(
            &o,
            "--last-blocks 3 does not fit the checkpoint's 2-block backbone",
        );
    }
}

#[test]
fn eval_linear_without_a_checkpoint_is_a_clear_error() {
    let o = sere(&[
        "eval",
        "linear",
        "--checkpoint",
        "/nonexistent/ck.safetensors",
        "--data",
        "synthetic",
    ]);
    assert_fails_with(&o, "/nonexistent/ck.safetensors");
    let empty = tmp("no-ck");
    let o = sere(&[
        "eval",
        "linear",
        "--checkpoint",
        empty.to_str().unwrap(),
        "--data",
        "synthetic",
    ]);
    assert_fails_with(&o, "no checkpoint.safetensors or checkpoint-");
}

/// The size of a `sere visualize` sheet of `rows` rows of `cols` panels.
fn sheet(cols: usize, rows: usize, side: usize) -> (u32, u32) {
    sere_host::visualize::sheet_size(cols, rows, side)
}

/// Decodes a PNG and returns its size.
fn png_size(path: &std::path::Path) -> (u32, u32) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (img.width(), img.height())
}

#[test]
fn visualize_writes_decodable_pngs_of_the_expected_size() {
    let run = tiny_run().to_str().unwrap();
    let out = tmp("vis");
    let o = sere(&[
        "visualize",
        "--checkpoint",
        run,
        "--data",
        TINY_DATA,
        "--count",
        "2",
        "--zoom",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let listed: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect();
    // 2 heads: input + 2 heads + mean, over their overlays; input + 5
    // query maps; 16 px panels; dataset images named by split and index.
    let expected = [
        ("test00000_attn.png", sheet(4, 2, 16)),
        ("test00000_relation.png", sheet(6, 1, 16)),
        ("test00001_attn.png", sheet(4, 2, 16)),
        ("test00001_relation.png", sheet(6, 1, 16)),
    ];
    assert_eq!(listed.len(), expected.len(), "{listed:?}");
    for ((name, size), line) in expected.iter().zip(&listed) {
        let path = out.join(name);
        assert_eq!(PathBuf::from(line), path);
        assert_eq!(png_size(&path), *size, "{name}");
    }
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 4, "no temporary files left: {names:?}");

    // An image file, drawn at the default zoom (panels of 128 px), its
    // files named after it.
    let png = out.join("input.png");
    image::RgbImage::from_fn(40, 24, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 10) as u8, 90])
    })
    .save(&png)
    .unwrap();
    let out2 = tmp("vis-file");
    let o = sere(&[
        "visualize",
        "--checkpoint",
        run,
        "--image",
        png.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&out2.join("input_attn.png")), sheet(4, 2, 128));
}

/// `--image-size` runs the backbone on more patches (larger panels at
/// zoom 1) and refuses a size that is not a multiple of the patch;
/// `--threshold` adds the row of masks and refuses a fraction outside
/// (0, 1]; two inputs of one name get files of two names, and a second
/// run into the folder needs --force.
#[test]
fn visualize_image_size_threshold_and_file_names() {
    let run = tiny_run().to_str().unwrap();
    let d = tmp("vis-options");
    let vis = |extra: &[&str], out: &str| {
        let base = [
            "visualize",
            "--checkpoint",
            run,
            "--data",
            TINY_DATA,
            "--count",
            "1",
            "--zoom",
            "1",
            "--out",
        ];
        sere(&[&base[..], &[out], extra].concat())
    };
    let out = d.join("size");
    let o = vis(&["--image-size", "32"], out.to_str().unwrap());
    assert!(o.status.success(), "{}", stderr(&o));
    // 32 px at patch 4: an 8 x 8 grid instead of 4 x 4, panels of 32 px.
    assert_eq!(png_size(&out.join("test00000_attn.png")), sheet(4, 2, 32));
    assert_eq!(
        png_size(&out.join("test00000_relation.png")),
        sheet(6, 1, 32)
    );
    let bad = d.join("bad");
    let o = vis(&["--image-size", "30"], bad.to_str().unwrap());
    assert_fails_with(&o, "not a multiple of the checkpoint's patch size 4");
    assert_fails_with(&o, "nearest valid sizes are 28 and 32");

    let out = d.join("threshold");
    let o = vis(&["--threshold", "0.6"], out.to_str().unwrap());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&out.join("test00000_attn.png")), sheet(4, 3, 16));
    for t in ["0", "1.5", "-0.2"] {
        let o = vis(&["--threshold", t], bad.to_str().unwrap());
        assert_fails_with(&o, "must be in (0, 1]");
    }
    assert!(!bad.exists(), "nothing written on a refused flag");

    // Two files named dog in two folders, and a cat.
    for (dir, name) in [("a", "dog.png"), ("b", "dog.png"), ("a", "cat.png")] {
        std::fs::create_dir_all(d.join(dir)).unwrap();
        image::RgbImage::from_fn(20, 20, |x, y| {
            image::Rgb([(x * 12) as u8, (y * 12) as u8, 0])
        })
        .save(d.join(dir).join(name))
        .unwrap();
    }
    let out = d.join("named");
    let files: Vec<String> = ["a/dog.png", "b/dog.png", "a/cat.png"]
        .iter()
        .map(|f| d.join(f).to_str().unwrap().to_string())
        .collect();
    let images = |out: &PathBuf, extra: &[&str]| {
        let mut args = vec!["visualize", "--checkpoint", run, "--zoom", "1"];
        for f in &files {
            args.extend(["--image", f.as_str()]);
        }
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(extra);
        sere(&args)
    };
    let o = images(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "cat_attn.png",
            "cat_relation.png",
            "dog-2_attn.png",
            "dog-2_relation.png",
            "dog_attn.png",
            "dog_relation.png"
        ]
    );
    let before = std::fs::read(out.join("dog_attn.png")).unwrap();
    let o = images(&out, &[]);
    assert_fails_with(&o, "dog_attn.png already exists; pass --force");
    assert_eq!(std::fs::read(out.join("dog_attn.png")).unwrap(), before);
    let o = images(&out, &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// `sere plot`: a decodable PNG of the requested size from one run, two
/// runs overlaid in two colours, no silent overwrite, and clear errors
/// for a folder without metrics, a malformed file and a missing --out
/// folder.
#[test]
fn plot_draws_learning_curves_of_one_or_more_runs() {
    let run = tiny_run();
    let d = tmp("plot");
    let png = d.join("curves.png");
    let plot = |args: &[&str]| sere(&[&["plot"], args].concat());
    let o = plot(&[
        run.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--size",
        "800x500",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        png.to_str().unwrap()
    );
    assert_eq!(png_size(&png), (800, 500));

    // A second run: the tiny run's records, a k-NN score added, as a file.
    let other = d.join("other-run");
    std::fs::create_dir_all(&other).unwrap();
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.last_mut().unwrap()["knn_top1"] = 0.25.into();
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(other.join("metrics.jsonl"), body).unwrap();
    let two = d.join("two.png");
    let o = plot(&[
        run.to_str().unwrap(),
        other.join("metrics.jsonl").to_str().unwrap(),
        "--out",
        two.to_str().unwrap(),
        "--x",
        "elapsed",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&two).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1600, 1000), "the default size");
    for colour in [[31, 119, 180], [255, 127, 14]] {
        assert!(img.pixels().any(|p| p.0 == colour), "a curve in {colour:?}");
    }

    // An existing file is kept unless --force.
    let before = std::fs::read(&png).unwrap();
    let o = plot(&[run.to_str().unwrap(), "--out", png.to_str().unwrap()]);
    assert_fails_with(&o, "already exists; pass --force");
    assert_eq!(std::fs::read(&png).unwrap(), before);
    let o = plot(&[
        run.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--force",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_size(&png), (1600, 1000));

    // A folder without metrics, a malformed file, a missing --out folder.
    let empty = d.join("not-a-run");
    std::fs::create_dir_all(&empty).unwrap();
    let out = d.join("never.png");
    let o = plot(&[empty.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_fails_with(&o, "not-a-run has no metrics.jsonl");
    let broken = d.join("broken.jsonl");
    std::fs::write(&broken, format!("{{\"step\": 1,\n{}", text)).unwrap();
    let o = plot(&[broken.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_fails_with(&o, "broken.jsonl");
    assert_fails_with(&o, "line 1");
    let o = plot(&[
        run.to_str().unwrap(),
        "--out",
        d.join("missing/x.png").to_str().unwrap(),
    ]);
    assert_fails_with(&o, "does not exist; create it first");
    assert!(!out.exists());
}

#[test]
fn visualize_names_an_unreadable_image_and_writes_nothing() {
    let run = tiny_run().to_str().unwrap();
    let d = tmp("vis-bad");
    let bad = d.join("broken.png");
    std::fs::write(&bad, b"not a png").unwrap();
    let out = d.join("out");
    let o = sere(&[
        "visualize",
        "--checkpoint",
        run,
        "--image",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_fails_with(&o, "broken.png");
    assert!(!out.exists());
    let o = sere(&[
        "visualize",
        "--checkpoint",
        run,
        "--image",
        "/nonexistent/x.jpg",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_fails_with(&o, "/nonexistent/x.jpg");
}

/// The tensors of a safetensors file, read with the `safetensors` crate
/// itself (not sere's checkpoint reader): name -> (shape, values), metadata.
type Tensors = std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>;
fn read_safetensors(
    path: &std::path::Path,
) -> (Tensors, std::collections::HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .iter()
        .map(|(name, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{name}");
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (name.to_string(), (v.shape().to_vec(), data))
        })
        .collect();
    (tensors, meta)
}

#[test]
fn export_writes_the_backbone_under_timm_names() {
    let run = tiny_run();
    let dir = tmp("export");
    let out = dir.join("backbone.safetensors");
    let o = sere(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = &json_lines(&o)[0];
    assert_eq!(line["network"], "teacher");
    assert_eq!(line["step"], 2);

    // timm's VisionTransformer names and shapes (dim 32, depth 2, patch 4,
    // 16 px: 16 patches + CLS, MLP ratio 4), nothing else.
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("cls_token".into(), vec![1, 1, 32]),
        ("pos_embed".into(), vec![1, 17, 32]),
        ("patch_embed.proj.weight".into(), vec![32, 3, 4, 4]),
        ("patch_embed.proj.bias".into(), vec![32]),
        ("norm.weight".into(), vec![32]),
        ("norm.bias".into(), vec![32]),
    ];
    for i in 0..2 {
        for (name, shape) in [
            ("norm1.weight", vec![32]),
            ("norm1.bias", vec![32]),
            ("attn.qkv.weight", vec![96, 32]),
            ("attn.qkv.bias", vec![96]),
            ("attn.proj.weight", vec![32, 32]),
            ("attn.proj.bias", vec![32]),
            ("norm2.weight", vec![32]),
            ("norm2.bias", vec![32]),
            ("mlp.fc1.weight", vec![128, 32]),
            ("mlp.fc1.bias", vec![128]),
            ("mlp.fc2.weight", vec![32, 128]),
            ("mlp.fc2.bias", vec![32]),
        ] {
            want.push((format!("blocks.{i}.{name}"), shape));
        }
    }
    want.sort();
    let (tensors, meta) = read_safetensors(&out);
    let got: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(k, (s, _))| (k.clone(), s.clone()))
        .collect();
    assert_eq!(got, want);
    for (key, value) in [
        ("format", "sere-backbone"),
        ("network", "teacher"),
        ("img_size", "16"),
        ("patch_size", "4"),
        ("embed_dim", "32"),
        ("depth", "2"),
        ("num_heads", "2"),
        ("in_chans", "3"),
        // The input protocol the features were evaluated with.
        ("mean", "[0.485, 0.456, 0.406]"),
        ("std", "[0.229, 0.224, 0.225]"),
        ("crop_pct", "1"),
        ("interpolation", "bilinear"),
    ] {
        assert_eq!(meta.get(key).map(String::as_str), Some(value), "{key}");
    }

    // The values are the checkpoint's teacher (or student) backbone.
    let (source, _) = read_safetensors(&run.join("checkpoint-00000002.safetensors"));
    let same_as = |tensors: &Tensors, network: &str| {
        tensors
            .iter()
            .all(|(k, v)| source[&format!("{network}.backbone.{k}")] == *v)
    };
    assert!(same_as(&tensors, "teacher"));
    assert!(
        !same_as(&tensors, "student"),
        "teacher and student differ after 2 steps"
    );
    let student = dir.join("student.safetensors");
    let o = sere(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        student.to_str().unwrap(),
        "--network",
        "student",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(same_as(&read_safetensors(&student).0, "student"));

    // eval reads an exported backbone as it is: the teacher's k-NN.
    let knn = |ck: &std::path::Path| {
        let o = sere(&[
            "eval",
            "knn",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--data",
            TINY_DATA,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        json_lines(&o)[0]["top1"].clone()
    };
    assert_eq!(knn(&out), knn(run));
    // It is not a training checkpoint: exporting it again says so.
    let again = dir.join("again.safetensors");
    let o = sere(&[
        "export",
        "--checkpoint",
        out.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert_fails_with(&o, "exported by `sere export`");
}

#[test]
fn export_refuses_to_overwrite_its_checkpoint_or_a_missing_one() {
    let d = tmp("export-self");
    let ck = d.join("checkpoint-00000002.safetensors");
    std::fs::copy(tiny_run().join("checkpoint-00000002.safetensors"), &ck).unwrap();
    let before = std::fs::read(&ck).unwrap();
    let o = sere(&[
        "export",
        "--checkpoint",
        d.to_str().unwrap(),
        "--out",
        ck.to_str().unwrap(),
    ]);
    assert_fails_with(&o, "is the checkpoint being exported");
    assert_eq!(std::fs::read(&ck).unwrap(), before, "checkpoint untouched");
    let o = sere(&[
        "export",
        "--checkpoint",
        "/nonexistent/ck.safetensors",
        "--out",
        d.join("b.safetensors").to_str().unwrap(),
    ]);
    assert_fails_with(&o, "/nonexistent/ck.safetensors");
}

/// `sere train` ends with the evaluation on the data's test split: k-NN of
/// the trained teacher, the random initialisation and raw pixels, and the
/// linear probe, printed and written to `eval.json`; the numbers are the
/// ones `sere eval` prints for the same checkpoint, and `eval` without
/// `--data` takes the data the checkpoint was trained on.
#[test]
fn train_ends_with_the_evaluation_and_eval_defaults_to_the_training_data() {
    let d = tmp("final-eval");
    let out = d.join("run");
    let o = sere(&train_args(&[
        "--steps",
        "3",
        "--data",
        TINY_DATA,
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    for needle in [
        "evaluation on the test split of synthetic:size=16,train=64,test=32",
        "64 train / 32 test images",
        "weighted 20-NN top-1:  random init",
        "trained teacher",
        "raw pixels",
        "linear probe top-1:",
        "points from raw pixels",
        "eval.json",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing in: {stdout}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(report["step"], 3);
    assert_eq!(report["checkpoint"], "checkpoint-00000003.safetensors");
    assert_eq!(
        (report["train"].as_u64(), report["test"].as_u64()),
        (Some(64), Some(32))
    );
    assert_eq!(
        (report["k"].as_u64(), report["features"].as_str()),
        (Some(20), Some("teacher_cls"))
    );
    let acc = |key: &str| {
        let v = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key}: {report}"));
        assert!((0.0..=1.0).contains(&v), "{key}: {v}");
        v
    };
    for key in ["knn_random_init", "linear_random_init"] {
        acc(key);
    }

    // `eval knn --pixels` and `eval linear`, both without --data, on the
    // run folder: the same data, the same numbers.
    let ck = out.to_str().unwrap();
    let o = sere(&["eval", "knn", "--checkpoint", ck, "--pixels"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        (lines[0]["train"].as_u64(), lines[0]["test"].as_u64()),
        (Some(64), Some(32))
    );
    let close = |a: f64, b: f64| (a - b).abs() < 1e-4;
    assert!(
        close(lines[0]["top1"].as_f64().unwrap(), acc("knn_teacher")),
        "{lines:?} {report}"
    );
    assert!(
        close(lines[1]["top1"].as_f64().unwrap(), acc("knn_pixels")),
        "{lines:?} {report}"
    );
    let o = sere(&["eval", "linear", "--checkpoint", ck]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = &json_lines(&o)[0];
    assert_eq!(line["test"].as_u64(), Some(32));
    assert!(
        close(line["top1"].as_f64().unwrap(), acc("linear_teacher")),
        "{line} {report}"
    );
    // --random-init scores the run's starting network: the report's
    // baseline, named as such, at step 0, from other features than the
    // teacher's (3 steps move the teacher too little to change a score).
    let dumps = [d.join("teacher.safetensors"), d.join("init.safetensors")];
    let o = sere(&[
        "eval",
        "knn",
        "--checkpoint",
        ck,
        "--dump-features",
        dumps[0].to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = sere(&[
        "eval",
        "knn",
        "--checkpoint",
        ck,
        "--random-init",
        "--dump-features",
        dumps[1].to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let [teacher, init] = dumps.map(|p| sere_host::eval::dump::FeatureDump::load(&p).unwrap());
    assert!(
        teacher.train_features != init.train_features,
        "--random-init embedded with the trained teacher"
    );
    let line = &json_lines(&o)[0];
    assert_eq!(
        (line["features"].as_str(), line["step"].as_u64()),
        (Some("init_cls"), Some(0)),
        "{line}"
    );
    assert!(
        close(line["top1"].as_f64().unwrap(), acc("knn_random_init")),
        "{line} {report}"
    );
    let o = sere(&["eval", "linear", "--checkpoint", ck, "--random-init"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        close(
            json_lines(&o)[0]["top1"].as_f64().unwrap(),
            acc("linear_random_init")
        ),
        "{report}"
    );
    let o = sere(&[
        "eval",
        "knn",
        "--checkpoint",
        ck,
        "--random-init",
        "--network",
        "student",
    ]);
    assert_fails_with(&o, "--network");
    // --data still wins over the stored data.
    let o = sere(&[
        "eval",
        "knn",
        "--checkpoint",
        ck,
        "--data",
        "synthetic:size=16,train=40,test=20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_lines(&o)[0]["test"].as_u64(), Some(20));

    // --no-eval skips it; data without a test split says it was skipped.
    let o = sere(&train_args(&[
        "--steps",
        "1",
        "--data",
        TINY_DATA,
        "--no-eval",
        "--out",
        d.join("no-eval").to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("evaluation"));
    assert!(!d.join("no-eval/eval.json").exists());
    let o = sere(&train_args(&[
        "--steps",
        "1",
        "--data",
        "synthetic:size=16,train=64,test=0",
        "--out",
        d.join("no-test").to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("evaluation skipped"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(!d.join("no-test/eval.json").exists());
    // Evaluating that run without --data: its data has no test split.
    let o = sere(&[
        "eval",
        "knn",
        "--checkpoint",
        d.join("no-test").to_str().unwrap(),
    ]);
    assert_fails_with(&o, "has no test split");
}

/// `--eval-every N` scores the teacher every N steps and at the last one,
/// logging `knn_top1` (and the seconds spent evaluating) in metrics.jsonl,
/// with raw pixels on the same subset printed at the start; every record
/// carries the teacher entropy and the teacher-student KL. Data without a
/// test split is refused before anything is written.
#[test]
fn eval_every_logs_the_knn_curve_and_the_collapse_monitor() {
    let d = tmp("eval-every");
    let out = d.join("run");
    let o = sere(&train_args(&[
        "--steps",
        "5",
        "--data",
        TINY_DATA,
        "--eval-every",
        "2",
        "--set",
        "eval_train_images=40",
        "--set",
        "eval_test_images=16",
        "--set",
        "log_every=1",
        "--no-eval",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        stdout.contains("k-NN of the teacher every 2 steps on 40 training / 16 test images"),
        "{stdout}"
    );
    assert!(stdout.contains("step 4: teacher k-NN top-1 "), "{stdout}");
    // The start of the run says what DINO says: data, parameters, schedule.
    let err = stderr(&o);
    for needle in [
        "data: synthetic:size=16,train=64,test=32: 64 training images, 10 classes (32 test)",
        "M parameters in the backbone",
        "5 in all",
        "config.toml",
    ] {
        assert!(err.contains(needle), "{needle:?} missing in: {err}");
    }
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 5, "{text}");
    let scored: Vec<u64> = records
        .iter()
        .filter(|r| r.get("knn_top1").is_some())
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(scored, [2, 4, 5], "{text}");
    let ln_k = 64f64.ln();
    let mut last_eval_s = 0.0;
    for r in &records {
        let (h, kl, dino) = (
            r["teacher_entropy"].as_f64().unwrap(),
            r["teacher_student_kl"].as_f64().unwrap(),
            r["loss_dino"].as_f64().unwrap(),
        );
        assert!((0.0..=ln_k + 1e-4).contains(&h), "{r}");
        assert!(kl >= -1e-4 && (h + kl - dino).abs() < 1e-4, "{r}");
        // log_every = 1: each interval is one step, its mean that step's.
        assert_eq!(r["loss_mean"].as_f64(), r["loss"].as_f64(), "{r}");
        if let Some(top1) = r.get("knn_top1") {
            assert!((0.0..=1.0).contains(&top1.as_f64().unwrap()), "{r}");
        }
        let eval_s = r["eval_s"].as_f64().unwrap();
        assert!(eval_s >= last_eval_s && eval_s > 0.0, "{r}");
        last_eval_s = eval_s;
    }

    let o = sere(&train_args(&[
        "--steps",
        "2",
        "--data",
        "synthetic:size=16,train=64,test=0",
        "--eval-every",
        "1",
        "--out",
        d.join("no-test").to_str().unwrap(),
    ]));
    assert_fails_with(&o, "has no test split");
    assert!(!d.join("no-test/metrics.jsonl").exists());
}

/// `--recipe` sets every value of the authors' command line below the
/// other layers, and `--print-config` prints the resolved configuration
/// (valid TOML, reusable as --config) with each value's source, training
/// nothing and writing nothing.
#[test]
fn print_config_shows_a_recipe_with_the_source_of_every_value() {
    let d = tmp("print-config");
    std::fs::create_dir_all(&d).unwrap();
    let file = d.join("over.toml");
    std::fs::write(&file, "alpha = 0.3\n").unwrap();
    let out = d.join("never");
    let o = sere(&[
        "train",
        "--recipe",
        "sere-vit-s16",
        "--config",
        file.to_str().unwrap(),
        "--set",
        "beta=0.6",
        "--batch",
        "64",
        "--out",
        out.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.starts_with("# recipe sere-vit-s16: SERE.md"), "{text}");
    assert!(text.contains("# not reproduced: fp16 autocast"), "{text}");
    let source = |key: &str| {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} missing: {text}"));
        line.rsplit("# ").next().unwrap().to_string()
    };
    assert_eq!(source("norm_last_layer"), "recipe sere-vit-s16");
    assert_eq!(source("dim"), "recipe sere-vit-s16");
    assert_eq!(source("alpha"), format!("file {}", file.display()));
    assert_eq!(source("beta"), "--set");
    assert_eq!(source("batch"), "flag");
    assert_eq!(source("seed"), "default");
    let cfg = sere_host::config::TrainConfig::from_toml(&text).expect("the output is TOML");
    assert_eq!(
        (cfg.dim, cfg.patch, cfg.alpha, cfg.beta, cfg.batch),
        (384, 16, 0.3, 0.6, 64)
    );
    assert!(cfg.mim && !cfg.norm_last_layer);
    assert!(!out.exists(), "nothing written");

    // A recipe cannot be layered over a resumed run's stored settings.
    let o = sere(&[
        "train",
        "--recipe",
        "dino-vit-s16",
        "--resume",
        tiny_run().to_str().unwrap(),
        "--out",
        d.join("r").to_str().unwrap(),
    ]);
    assert_fails_with(&o, "--recipe cannot be combined with --resume");
}

/// `eval knn --k 10 20 ...` reports every k from one feature pass, each with
/// top-1 and top-5, for the features and (with --pixels) for raw pixels; a
/// single k gives the same top-1 as it does alone.
#[test]
fn eval_knn_reports_several_k_with_top5() {
    let ck = tiny_run().to_str().unwrap();
    let o = sere(&[
        "eval",
        "knn",
        "--checkpoint",
        ck,
        "--k",
        "5",
        "10",
        "--pixels",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    let got: Vec<(&str, u64)> = lines
        .iter()
        .map(|l| (l["features"].as_str().unwrap(), l["k"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        got,
        [
            ("teacher_cls", 5),
            ("teacher_cls", 10),
            ("pixels", 5),
            ("pixels", 10)
        ]
    );
    for l in &lines {
        let (t1, t5) = (l["top1"].as_f64().unwrap(), l["top5"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&t1) && t5 >= t1 && t5 <= 1.0, "{l}");
    }
    let alone = sere(&["eval", "knn", "--checkpoint", ck, "--k", "10"]);
    assert!(alone.status.success(), "{}", stderr(&alone));
    assert_eq!(json_lines(&alone)[0]["top1"], lines[1]["top1"]);
    assert!(
        stderr(&o).contains("extracting teacher_cls features"),
        "{}",
        stderr(&o)
    );
    // Each line also for a person, on stderr.
    assert!(
        stderr(&o).contains("weighted 5-NN (T = 0.07) on pixels: top-1 "),
        "{}",
        stderr(&o)
    );
}

/// `--network student` (DINO's `--checkpoint_key`) evaluates the student's
/// backbone, named so in the output; it differs from the teacher's after
/// training steps.
#[test]
fn eval_takes_the_student_on_request() {
    let ck = tiny_run().to_str().unwrap();
    let run = |extra: &[&str]| {
        let o = sere(&[&["eval", "linear", "--checkpoint", ck, "--knn"], extra].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        json_lines(&o)
    };
    let teacher = run(&[]);
    let student = run(&["--network", "student"]);
    assert_eq!(teacher[0]["features"], "teacher_cls");
    assert_eq!(student[0]["features"], "student_cls");
    // The probe's loss tells the two backbones apart; timings aside, the
    // alias gives the same lines.
    assert_ne!(teacher[1]["loss"], student[1]["loss"]);
    let untimed = |mut lines: Vec<serde_json::Value>| {
        for l in &mut lines {
            let o = l.as_object_mut().unwrap();
            o.remove("features_s");
            o.remove("fit_s");
        }
        lines
    };
    let alias = run(&["--checkpoint_key", "student"]);
    assert_eq!(untimed(alias), untimed(student));
}

/// Rerunning a command continues its run (DINO's resume): from the newest
/// checkpoint, with the command's changed settings listed; a finished run
/// says so and exits 0 without writing; `--no-resume` moves the old run
/// aside and starts afresh.
#[test]
fn rerunning_the_command_continues_the_run_dino_style() {
    let d = tmp("rerun");
    let out = d.join("run");
    let run = |steps: &str, extra: &[&str]| {
        let o = sere(&train_args(
            &[
                &["--steps", steps, "--data", TINY_DATA, "--no-eval"],
                extra,
                &["--out", out.to_str().unwrap()],
            ]
            .concat(),
        ));
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let last_step = |dir: &std::path::Path| {
        let m = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        let last: serde_json::Value = serde_json::from_str(m.lines().last().unwrap()).unwrap();
        last["step"].as_u64().unwrap()
    };
    run("2", &[]);
    assert!(
        out.join("checkpoint.safetensors").exists(),
        "{:?}",
        listing()
    );
    let o = run("4", &[]);
    let err = stderr(&o);
    assert!(err.contains("continuing it from"), "{err}");
    assert!(
        err.contains("resumed from") && err.contains("at step 2 of 4"),
        "{err}"
    );
    assert!(err.contains("steps: 2 -> 4"), "{err}");
    assert!(out.join("checkpoint-00000004.safetensors").exists());
    assert_eq!(last_step(&out), 4);

    let before = listing();
    let o = run("4", &[]);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("is finished") && said.contains("step 4 of 4"),
        "{said}"
    );
    assert_eq!(listing(), before, "a finished run writes nothing");

    let o = run("1", &["--no-resume"]);
    assert!(stderr(&o).contains("previous-run"), "{}", stderr(&o));
    let aside = out.join("previous-run");
    assert!(aside.join("checkpoint-00000004.safetensors").exists());
    assert_eq!(last_step(&aside), 4);
    assert_eq!(last_step(&out), 1);
    assert!(!out.join("checkpoint-00000004.safetensors").exists());
}

/// A ViT of one block and one 64-channel head that timm saved (bench/
/// check_export.py --resave): timm's names, no metadata but `format: pt`.
fn timm_fixture() -> String {
    format!(
        "{}/tests/fixtures/timm_tiny.safetensors",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// The flags of the model in [`timm_fixture`]: the tiny model's, one block
/// of one 64-channel head (timm's head width).
fn timm_tiny() -> Vec<&'static str> {
    let mut flags = common::TINY.to_vec();
    for (flag, value) in [("--dim", "64"), ("--depth", "1"), ("--heads", "1")] {
        let at = flags.iter().position(|f| *f == flag).expect("a tiny flag");
        flags[at + 1] = value;
    }
    flags
}

/// The round trip of issue 18: a backbone exported, loaded into timm and
/// saved from there is read by `eval` as it is, and `--init-from` starts a
/// run from it: the run's teacher after a step at learning rate 0 (the
/// warm-up's first) has the same features, to float rounding.
#[test]
fn a_timm_backbone_is_evaluated_and_trained_from() {
    use sere_host::eval::dump::FeatureDump;
    let d = tmp("timm");
    let (a, b) = (d.join("timm.safetensors"), d.join("run.safetensors"));
    let knn = |ck: &str, dump: &std::path::Path| {
        let o = sere(&[
            "eval",
            "knn",
            "--checkpoint",
            ck,
            "--data",
            TINY_DATA,
            "--dump-features",
            dump.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        o
    };
    let from_timm = knn(&timm_fixture(), &a);
    assert!(
        stderr(&from_timm).contains("train: 64/64 images (100%"),
        "{}",
        stderr(&from_timm)
    );
    let run = d.join("run");
    let mut train = vec!["train"];
    train.extend(timm_tiny());
    let fixture = timm_fixture();
    let o = sere(
        &[
            &train[..],
            &[
                "--data",
                TINY_DATA,
                "--steps",
                "1",
                "--no-eval",
                "--init-from",
                &fixture,
            ],
            &["--out", run.to_str().unwrap()],
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("backbone of student and teacher from"),
        "{}",
        stderr(&o)
    );
    let scored = knn(run.to_str().unwrap(), &b);
    // The line names what it scored: the run's checkpoint and its step.
    let line = &json_lines(&scored)[0];
    assert_eq!(line["step"], 1, "{line}");
    assert!(line["checkpoint"]
        .as_str()
        .unwrap()
        .ends_with("checkpoint-00000001.safetensors"));
    let (fa, fb) = (
        FeatureDump::load(&a).unwrap(),
        FeatureDump::load(&b).unwrap(),
    );
    assert_eq!(fa.train_labels, fb.train_labels);
    let worst = fa
        .train_features
        .iter()
        .chain(&fa.test_features)
        .zip(fb.train_features.iter().chain(&fb.test_features))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "features differ by {worst}");

    // The dump scores as the extraction did, and is never replaced.
    let o = sere(&["eval", "knn", "--load-features", a.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_lines(&o)[0]["top1"], json_lines(&from_timm)[0]["top1"]);
    let o = sere(&[
        "eval",
        "knn",
        "--checkpoint",
        &fixture,
        "--data",
        TINY_DATA,
        "--dump-features",
        a.to_str().unwrap(),
    ]);
    assert_fails_with(&o, "already exists");
    // Without --data a bare timm file cannot say what to evaluate on.
    let o = sere(&["eval", "knn", "--checkpoint", &fixture]);
    assert_fails_with(&o, "pass --data");
}

/// `eval linear --save-probe` writes the fitted probe; `--load-probe`
/// scores it again on the test split with the same result, and an
/// existing file is never replaced.
#[test]
fn a_saved_linear_probe_scores_again() {
    let run = tiny_run().to_str().unwrap();
    let probe = tmp("probe").join("probe.safetensors");
    let p = probe.to_str().unwrap();
    let linear = |extra: &[&str]| {
        sere(
            &[
                &["eval", "linear", "--checkpoint", run, "--epochs", "30"],
                extra,
            ]
            .concat(),
        )
    };
    let fitted = linear(&["--save-probe", p]);
    assert!(fitted.status.success(), "{}", stderr(&fitted));
    let again = linear(&["--load-probe", p]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(
        json_lines(&again)[0]["top1"],
        json_lines(&fitted)[0]["top1"]
    );
    assert_fails_with(&linear(&["--save-probe", p]), "already exists");
    let o = linear(&["--load-probe", p, "--last-blocks", "2"]);
    assert_fails_with(&o, "features it was fitted on");
}

/// `eval linear --augment`: eval_linear.py's SGD probe on augmented views,
/// reproducible run to run; it needs SGD.
#[test]
fn the_augmented_linear_probe_runs_reproducibly() {
    let run = tiny_run().to_str().unwrap();
    let linear = |extra: &[&str]| {
        sere(
            &[
                &[
                    "eval",
                    "linear",
                    "--checkpoint",
                    run,
                    "--epochs",
                    "2",
                    "--augment",
                ],
                extra,
            ]
            .concat(),
        )
    };
    let sgd = ["--optimizer", "sgd", "--probe-batch", "16", "--lr", "0.5"];
    let a = linear(&sgd);
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(stderr(&a).contains("probe epoch 2/2"), "{}", stderr(&a));
    let line = &json_lines(&a)[0];
    assert_eq!(line["features"], "teacher_cls_augmented");
    assert_eq!(
        line["iterations"], 8,
        "2 epochs of 64 images in batches of 16"
    );
    let b = linear(&sgd);
    assert_eq!(
        json_lines(&b)[0]["loss"],
        line["loss"],
        "same views, same probe"
    );
    assert_fails_with(&linear(&[]), "add --optimizer sgd");
}

/// `--init-from` a backbone of another model lists every mismatch.
#[test]
fn init_from_another_model_is_refused_with_the_mismatches() {
    let out = tmp("init-mismatch").join("run");
    let fixture = timm_fixture();
    let o = sere(&train_args(&[
        "--data",
        TINY_DATA,
        "--steps",
        "1",
        "--init-from",
        &fixture,
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_fails_with(&o, "does not fit the model");
    assert_fails_with(
        &o,
        "of another shape: cls_token [1, 1, 64] (the model's: [1, 1, 32])",
    );
    assert_fails_with(&o, "missing: blocks.1.");
}

/// `--train-images N` trains on N images: epochs shrink with it.
#[test]
fn train_images_shortens_the_epoch() {
    let out = tmp("train-images").join("run");
    let o = sere(&train_args(&[
        "--steps",
        "1",
        "--data",
        TINY_DATA,
        "--no-eval",
        "--train-images",
        "8",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("training on 8 of them"), "{err}");
    assert!(err.contains("2 steps per epoch"), "{err}");
}

/// `--keep-last K` leaves the newest K numbered checkpoints after each save,
/// and the run resumes from the newest.
#[test]
fn keep_last_prunes_old_checkpoints_and_the_run_resumes() {
    let d = tmp("keep-last");
    let out = d.join("run");
    let o = sere(&train_args(&[
        "--steps",
        "5",
        "--data",
        TINY_DATA,
        "--checkpoint-every",
        "1",
        "--keep-every",
        "1",
        "--keep-last",
        "2",
        "--no-eval",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    let mut cks: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    cks.sort();
    assert_eq!(
        cks,
        [
            "checkpoint-00000004.safetensors",
            "checkpoint-00000005.safetensors"
        ]
    );
    let o = sere(&["train", "--steps", "6", "--resume", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resumed from"), "{}", stderr(&o));
    // The stored keep_last applies to the resumed run too.
    assert!(!out.join("checkpoint-00000004.safetensors").exists());
    assert!(out.join("checkpoint-00000006.safetensors").exists());
}

/// `--crop-pct 0.875` evaluates DINO's centre crop (named in the output
/// and different features on images with borders); a fraction outside
/// (0, 1] is refused by name.
#[test]
fn eval_crop_protocol_is_selectable() {
    let ck = tiny_run().to_str().unwrap();
    let knn = |extra: &[&str]| sere(&[&["eval", "knn", "--checkpoint", ck], extra].concat());
    let o = knn(&["--crop-pct", "0.875"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_lines(&o)[0]["features"], "teacher_cls@crop0.875");
    assert_fails_with(&knn(&["--crop-pct", "1.5"]), "--crop-pct 1.5");
    assert_fails_with(&knn(&["--crop-pct", "0"]), "--crop-pct 0");
}

/// A build without MPI started by a launcher for several processes says
/// how to get one that has it, instead of training N times into one folder.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_launcher_asking_for_ranks_of_a_build_without_mpi_is_refused() {
    let d = common::scratch("cli", "no-mpi");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sere"))
        .args(train_args(&["--steps", "1", "--out", d.to_str().unwrap()]))
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert_fails_with(&o, "--features mpi");
    assert!(!d.join("metrics.jsonl").exists());
}
