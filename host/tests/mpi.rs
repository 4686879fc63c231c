//! Data-parallel training over MPI, end to end through `mpirun` and the
//! `sere` command: N ranks with B/N images each train as one process with
//! B images (losses and every tensor of the state), a run resumes with
//! another process count, and a rank that fails or dies ends the whole run
//! within a bound, saying which rank it was. Needs Open MPI's `mpirun`
//! (scripts/test.sh installs it); built only with the `mpi` feature.

#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{scratch, stderr};
use sere_host::checkpoint::Checkpoint;

const SERE: &str = env!("CARGO_BIN_EXE_sere");

/// A model small enough for a step in milliseconds that still has what a
/// data-parallel step must reduce: local crops (a third SERE pass),
/// drop path, iBOT masking (the patch centre), SyncBN in the SERE heads.
fn model_flags() -> Vec<String> {
    [
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
        "8",
        "--locals",
        "2",
        "--out-dim",
        "64",
        "--set",
        "head_hidden=64",
        "--set",
        "bottleneck=32",
        "--set",
        "mim=true",
        "--set",
        "drop_path=0.2",
        "--set",
        "warmup_epochs=0",
        "--set",
        "final_eval=false",
        "--lr",
        "0.05",
        "--log-every",
        "1",
        "--threads",
        "1",
        "--data",
        "synthetic:size=16,train=64,test=32",
    ]
    .map(String::from)
    .to_vec()
}

/// `mpirun` for `n` processes on this machine (more ranks than cores are
/// fine for a test; root is allowed, as in CI containers).
fn mpirun(n: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-n", &n.to_string()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits for `child`, killing it (and failing) after `limit`.
fn wait_within(mut child: Child, limit: Duration, what: &str) -> (Output, Duration) {
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return (child.wait_with_output().expect("output"), started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let o = child.wait_with_output().expect("output");
            panic!(
                "{what} hung (killed after {limit:?}); stderr: {}",
                stderr(&o)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(mut c: Command) -> Child {
    c.spawn()
        .expect("mpirun runs (Open MPI: apt-get install openmpi-bin)")
}

/// `sere train` with `extra` flags in `n` processes (`n == 1`: without
/// a launcher), which must succeed.
fn train(n: usize, extra: &[&str]) -> Output {
    let args: Vec<String> = std::iter::once("train".to_string())
        .chain(model_flags())
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
    let c = if n == 1 {
        let mut c = Command::new(SERE);
        c.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    } else {
        let mut c = mpirun(n);
        c.arg(SERE).args(&args);
        c
    };
    let (o, _) = wait_within(spawn(c), Duration::from_secs(300), "sere train");
    assert!(o.status.success(), "{n} process(es) failed: {}", stderr(&o));
    o
}

/// `sere train --resume ...` (no model flags: the checkpoint has them) in
/// `n` processes, which must succeed.
fn resume(n: usize, args: &[&str]) -> Output {
    let mut c = if n == 1 {
        Command::new(SERE)
    } else {
        let mut c = mpirun(n);
        c.arg(SERE);
        c
    };
    c.arg("train")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (o, _) = wait_within(spawn(c), Duration::from_secs(300), "sere train --resume");
    assert!(o.status.success(), "resuming on {n} failed: {}", stderr(&o));
    o
}

/// The losses of every logged step of a run.
fn losses(dir: &Path) -> Vec<[f64; 6]> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let v = |k: &str| {
                let at = l.find(&format!("\"{k}\":")).unwrap() + k.len() + 3;
                let end = l[at..].find([',', '}']).unwrap();
                l[at..at + end].parse::<f64>().unwrap()
            };
            [
                v("loss"),
                v("loss_dino"),
                v("teacher_entropy"),
                v("loss_mim"),
                v("loss_spatial"),
                v("loss_channel"),
            ]
        })
        .collect()
}

/// The largest relative difference between two runs' losses.
fn loss_gap(a: &Path, b: &Path) -> f64 {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "logged steps differ");
    la.iter()
        .zip(&lb)
        .flat_map(|(x, y)| x.iter().zip(y))
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-12))
        .fold(0.0, f64::max)
}

/// The values of tensor `name` the equality is asked of: all but the key
/// bias. Its exact gradient is zero (a query's softmax does not change when
/// the same `q . b_k` is added to every logit), so each run's gradient there
/// is rounding noise, which AdamW's `m / sqrt(v)` turns into steps of about
/// the learning rate in both runs, uncorrelated: equal only by chance.
fn compared(name: &str, v: &[f32]) -> Vec<f32> {
    if !name.ends_with("attn.qkv.bias") {
        return v.to_vec();
    }
    let third = v.len() / 3;
    [&v[..third], &v[2 * third..]].concat()
}

/// The largest over tensors of `max |a - b| / max |b|` (each tensor
/// against its own scale) between two checkpoints, and that tensor's name.
fn state_gap(a: &Path, b: &Path) -> (f64, String) {
    let (ca, cb) = (Checkpoint::load(a).unwrap(), Checkpoint::load(b).unwrap());
    assert_eq!(
        ca.tensors.keys().collect::<Vec<_>>(),
        cb.tensors.keys().collect::<Vec<_>>(),
        "the two checkpoints hold different tensors"
    );
    let mut worst = (0.0, String::new());
    for (name, (_, x)) in &ca.tensors {
        let y = &cb.tensors[name].1;
        let (x, y) = (compared(name, x), compared(name, y));
        let scale = y.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
        let diff = x
            .iter()
            .zip(y)
            .fold(0.0f64, |m, (p, q)| m.max((p - q).abs() as f64));
        let rel = if scale == 0.0 { diff } else { diff / scale };
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    worst
}

fn out(d: &Path) -> &str {
    d.to_str().unwrap()
}

fn ck(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("checkpoint-{step:08}.safetensors"))
}

/// Float sums in another order (over ranks, then within a rank, instead of
/// over one batch), through 4 AdamW steps: measured up to 1.3e-5 (a SERE
/// projector's batch-norm bias), the rest below 2e-6. A missing reduction
/// moves whole tensors by 1e-2 and more.
const TOLERANCE: f64 = 5e-5;

#[test]
fn two_ranks_train_as_one_process_with_the_whole_batch() {
    let (one, two) = (scratch("mpi", "one"), scratch("mpi", "two"));
    train(1, &["--steps", "4", "--out", out(&one)]);
    let o = train(2, &["--steps", "4", "--out", out(&two)]);
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("data-parallel: MPI, 2 processes") && said.contains("4 images per process"),
        "{said}"
    );
    let gap = loss_gap(&two, &one);
    println!("largest relative loss difference over 4 steps: {gap:.2e}");
    assert!(gap < TOLERANCE, "losses differ by {gap:.2e}");
    let (gap, name) = state_gap(&ck(&two, 4), &ck(&one, 4));
    println!("largest relative state difference after 4 steps: {gap:.2e} ({name})");
    assert!(gap < TOLERANCE, "{name} differs by {gap:.2e}");
}

/// A run resumed with another process count continues the same run: two
/// ranks resume one process's checkpoint and vice versa, and both end
/// where one process training straight through does.
#[test]
fn a_run_resumes_with_another_process_count() {
    let straight = scratch("mpi", "straight");
    let keep = ["--steps", "4", "--keep-every", "2"];
    train(1, &[&keep[..], &["--out", out(&straight)]].concat());
    let halves = scratch("mpi", "halves");
    train(2, &[&keep[..], &["--out", out(&halves)]].concat());
    for (n, first) in [(2, &straight), (1, &halves)] {
        let d = scratch("mpi", &format!("resume-on-{n}"));
        std::fs::copy(ck(first, 2), ck(&d, 2)).unwrap();
        resume(
            n,
            &[
                "--steps",
                "4",
                "--threads",
                "1",
                "--resume",
                out(&ck(&d, 2)),
            ],
        );
        let (gap, name) = state_gap(&ck(&d, 4), &ck(&straight, 4));
        println!(
            "resumed on {n} process(es): largest relative state difference {gap:.2e} ({name})"
        );
        assert!(
            gap < TOLERANCE,
            "resumed on {n}: {name} differs by {gap:.2e}"
        );
    }
}

/// `mpirun` with a different command per rank (MPMD), for a rank that
/// fails; returns the output and how long the run took.
fn mpmd(ranks: &[Vec<String>]) -> (Output, Duration) {
    let mut c = mpirun(1);
    let mut args = Vec::new();
    for (i, r) in ranks.iter().enumerate() {
        if i > 0 {
            args.extend([":".to_string(), "-n".into(), "1".into()]);
        }
        args.push(SERE.to_string());
        args.extend(r.iter().cloned());
    }
    c.args(&args);
    wait_within(
        spawn(c),
        Duration::from_secs(120),
        "a run with a failing rank",
    )
}

fn rank_args(extra: &[&str]) -> Vec<String> {
    std::iter::once("train".to_string())
        .chain(model_flags())
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
}

#[test]
fn a_rank_that_fails_ends_the_run_and_says_which_it_was() {
    let d = scratch("mpi", "bad-data");
    let good = rank_args(&["--steps", "1000", "--out", out(&d)]);
    let data_at = good.iter().position(|a| a == "--data").unwrap() + 1;
    let mut bad = good.clone();
    bad[data_at] = "/nonexistent/images".into();
    let (o, took) = mpmd(&[good, bad]);
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "a failed rank must fail the run: {err}"
    );
    assert!(err.contains("rank 1 of 2"), "names the rank: {err}");
    assert!(
        err.contains("/nonexistent/images"),
        "names the problem: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

#[test]
fn ranks_starting_from_different_states_are_refused() {
    let run = scratch("mpi", "diverging");
    train(1, &["--steps", "2", "--out", out(&run)]);
    let fresh = scratch("mpi", "diverging-fresh");
    let resumed = [
        "train",
        "--steps",
        "4",
        "--threads",
        "1",
        "--resume",
        out(&ck(&run, 2)),
    ]
    .map(String::from)
    .to_vec();
    let new = rank_args(&["--steps", "4", "--out", out(&fresh)]);
    let (o, _) = mpmd(&[resumed, new]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("1 of the 2 processes do not start from rank 0's checkpoint"),
        "{err}"
    );
    assert!(!ck(&run, 4).exists(), "nothing trained");
}

#[test]
fn a_batch_the_ranks_cannot_share_evenly_is_refused() {
    let d = scratch("mpi", "uneven");
    let args = rank_args(&["--steps", "2", "--out", out(&d)]);
    let mut c = mpirun(3);
    c.arg(SERE).args(&args);
    let (o, took) = wait_within(spawn(c), Duration::from_secs(120), "an uneven batch");
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("multiple of the process count"), "{err}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

/// The pids of `parent`'s children (from /proc).
fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the comm may hold spaces.
        let after = &stat[stat.rfind(')').unwrap_or(0) + 1..];
        let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// The MPI rank of process `pid` (from the environment mpirun gave it).
fn rank_of(pid: u32) -> String {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"OMPI_COMM_WORLD_RANK="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("mpirun sets OMPI_COMM_WORLD_RANK")
}

#[test]
fn a_killed_rank_ends_the_run_within_a_bound() {
    let d = scratch("mpi", "killed");
    let mut c = mpirun(2);
    c.arg(SERE)
        .args(rank_args(&["--steps", "100000", "--out", out(&d)]));
    let child = spawn(c);
    let metrics = d.join("metrics.jsonl");
    let started = Instant::now();
    while std::fs::metadata(&metrics).map_or(true, |m| m.len() == 0) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no step logged"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ranks: Vec<u32> = children(child.id())
        .into_iter()
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sere")
        })
        .collect();
    assert_eq!(ranks.len(), 2, "mpirun's two sere processes");
    let killed = ranks[1];
    let rank = rank_of(killed);
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(killed as i32, libc::SIGKILL) };
    let (o, took) = wait_within(child, Duration::from_secs(120), "a run with a killed rank");
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains(&format!("process rank {rank}")) && err.contains("signal 9"),
        "mpirun names the dead rank: {err}"
    );
    println!("the run ended {took:?} after a rank was killed");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(!children(std::process::id())
        .iter()
        .any(|&p| ranks.contains(&p)));
}
