//! End-to-end properties of a training run, across the core and the host:
//! reproducibility bit for bit, exact resumption from a checkpoint, and the
//! checkpoint carrying everything the run needs.

use sere_host::checkpoint::Checkpoint;
use sere_host::config::TrainConfig;
use sere_host::train::{train, Start};
use std::path::Path;

/// A tiny but complete configuration: every loss term and every schedule
/// is active (warm-up, frozen last layer, teacher-temperature warm-up).
fn tiny(out: &Path, steps: u64) -> TrainConfig {
    tiny_with(out, steps, "")
}

/// [`tiny`] with extra TOML lines.
fn tiny_with(out: &Path, steps: u64, extra: &str) -> TrainConfig {
    let text = format!(
        r#"
        data = "synthetic:size=16,train=48,test=16,seed=1"
        preset = "custom"
        img = 16
        local_img = 8
        patch = 4
        dim = 16
        depth = 2
        heads = 2
        batch = 8
        locals = 2
        out_dim = 64
        head_hidden = 32
        bottleneck = 16
        overlap = 3
        local_overlap = 2
        steps = {steps}
        warmup_epochs = 1
        freeze_last_layer = 1
        warmup_teacher_temp_epochs = 2
        warmup_teacher_temp = 0.04
        teacher_temp = 0.07
        keep_every = 3
        log_every = 1
        out = "{}"
        {extra}
        "#,
        out.display()
    );
    let cfg = TrainConfig::from_toml(&text).expect("tiny config parses");
    cfg.validate().expect("tiny config is valid");
    cfg
}

fn tensors(path: &Path) -> Checkpoint {
    Checkpoint::load(path).expect("checkpoint loads")
}

#[test]
fn same_seed_same_result_and_resume_continues_exactly() {
    check_reproducible_and_resumable("plain", "");
}

/// With iBOT's masks, mask token, separate patch head and patch centre: the
/// masks come from their own deterministic streams, so the same holds.
#[test]
fn masked_image_modelling_runs_are_reproducible_and_resume_exactly() {
    let extra = "mim = true\nshared_head = false\npatch_out_dim = 32\nmask_probability = 0.8";
    let ck = check_reproducible_and_resumable("mim", extra);
    let (shape, centre) = ck.tensor("ibot.patch_centre").unwrap();
    assert_eq!(shape, [32]);
    assert!(centre.iter().any(|&c| c != 0.0), "the patch centre moved");
    let (_, token) = ck.tensor("student.backbone.masked_embed").unwrap();
    assert!(token.iter().any(|&v| v != 0.0), "the mask token learned");
}

/// Runs the checks on [`tiny_with`]`(extra)`; returns the final checkpoint.
fn check_reproducible_and_resumable(tag: &str, extra: &str) -> Checkpoint {
    let tiny = |out: &Path, steps| tiny_with(out, steps, extra);
    let root = std::env::temp_dir().join(format!("sere-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (a, b, c) = (root.join("a"), root.join("b"), root.join("c"));

    // Two identical runs of 7 steps (checkpoints at 3 and 6 and 7).
    let ra = train(tiny(&a, 7), Start::Fresh).expect("run a");
    let rb = train(tiny(&b, 7), Start::Fresh).expect("run b");
    let (ca, cb) = (tensors(&ra.checkpoint), tensors(&rb.checkpoint));
    assert_eq!(
        ca.tensors, cb.tensors,
        "same seed and data must give identical state"
    );
    assert!(ra.last.loss.is_finite());

    // A 7-step run interrupted at step 5, after its step-3 checkpoint, and
    // resumed in its own directory from that checkpoint ends exactly where
    // the uninterrupted run did.
    let at3 = a.join("checkpoint-00000003.safetensors");
    assert!(at3.exists(), "keep_every = 3 keeps step 3");
    std::fs::create_dir_all(&c).unwrap();
    let c3 = c.join("checkpoint-00000003.safetensors");
    std::fs::copy(&at3, &c3).unwrap();
    let lines5: String = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .take(5)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(c.join("metrics.jsonl"), lines5).unwrap();
    let resumed = train(tiny(&c, 7), Start::Resume(c3)).expect("run c, resumed");
    let cc = tensors(&resumed.checkpoint);
    assert_eq!(cc.meta("step"), Some("7"));
    let mut differ = Vec::new();
    for (name, (shape, data)) in &ca.tensors {
        let (s2, d2) = cc
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing after resume"));
        assert_eq!(shape, s2, "{name}: shape");
        if data != d2 {
            differ.push(name.clone());
        }
    }
    assert!(
        differ.is_empty(),
        "resumed run differs from the uninterrupted one in {differ:?}"
    );
    // The metrics file has one line per step: steps 4 and 5 of the
    // interrupted run were dropped, not duplicated, by the resume.
    let lines = std::fs::read_to_string(c.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 7);

    // Training changed the student, and the teacher follows it (EMA).
    let fresh = sere_host::train::engine::CpuEngine::cpu(&tiny(&a, 7));
    let (_, s) = ca
        .tensor("student.backbone.blocks.0.attn.qkv.weight")
        .unwrap();
    let (_, t) = ca
        .tensor("teacher.backbone.blocks.0.attn.qkv.weight")
        .unwrap();
    let r = fresh
        .net
        .layout
        .get("backbone.blocks.0.attn.qkv.weight")
        .unwrap()
        .range
        .clone();
    let s0 = &fresh.student[r];
    let moved = |x: &[f32]| x.iter().zip(s0).map(|(a, b)| (a - b).abs()).sum::<f32>();
    assert!(
        moved(s) > 0.0 && moved(t) > 0.0 && moved(t) < moved(s),
        "teacher must trail the student"
    );
    let _ = std::fs::remove_dir_all(&root);
    ca
}

#[test]
fn runs_shorter_than_the_epoch_based_settings_are_warned_about() {
    let cfg = tiny(Path::new("/unused"), 7);
    // 6 steps per epoch: a 7-step run leaves the frozen first epoch.
    assert!(sere_host::train::schedule_warnings(&cfg, 7, 6).is_empty());
    let w = sere_host::train::schedule_warnings(&cfg, 7, 100);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains("freeze_last_layer") && w[1].contains("warmup_epochs"));
}
