//! Golden regression test: every tensor of a tiny run's state after 3 steps
//! (student, teacher, AdamW moments, DINO centre, batch-norm statistics),
//! hashed bit for bit and compared with a committed fixture. It pins the
//! CPU arithmetic while code moves: a refactor that changes any bit of any
//! tensor fails here, by name.
//!
//! Bless on purpose, after a change that is *meant* to change the numbers:
//! `SERE_BLESS_GOLDEN=1 cargo test -p sere-tests --test golden`, and say why
//! in the commit.
//!
//! The numbers depend on the SGEMM path (FMA or not) and on how rayon splits
//! reductions, so the run uses a fixed pool of 2 threads and the fixture
//! names the GEMM path it was blessed on; another path skips, saying so.
//! On x86-64 with AVX2 + FMA the run takes our own tiles (`SERE_GEMM=avx2`;
//! the AVX-512 tile gives the same bits), not the `gemm` crate that
//! AVX-512 machines take by default, so every such machine checks the
//! same fixture.

use sere_host::checkpoint::Checkpoint;
use sere_host::config::TrainConfig;
use sere_host::train::{train, Start};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const FIXTURE: &str = "tests/fixtures/golden_3_steps.txt";
const BLESS_VAR: &str = "SERE_BLESS_GOLDEN";

/// Every loss term, drop path, local crops and both schedules' warm-ups on.
fn tiny(out: &Path) -> TrainConfig {
    let text = format!(
        r#"
        data = "synthetic:size=16,train=48,test=16,seed=3"
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
        drop_path = 0.2
        steps = 3
        warmup_epochs = 1
        freeze_last_layer = 1
        keep_every = 3
        log_every = 1
        seed = 7
        out = "{}"
        "#,
        out.display()
    );
    TrainConfig::from_toml(&text).expect("golden config parses")
}

/// The GEMM path the CPU backend takes on this machine, once
/// [`pin_gemm_path`] ran.
fn gemm_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "x86_64-avx2-fma";
        }
    }
    "portable"
}

/// Makes the CPU backend take our AVX2 tile where the CPU has it (read once
/// per process, at the first product: this file's one test runs first).
fn pin_gemm_path() {
    if gemm_path() == "x86_64-avx2-fma" {
        std::env::set_var("SERE_GEMM", "avx2");
    }
}

/// 64-bit FNV-1a of the tensor's f32 bit patterns (little endian).
fn fnv1a(data: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in data {
        for byte in v.to_bits().to_le_bytes() {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// One line per tensor: name, shape, hash, and the sum for a human reader.
fn digest(ck: &Checkpoint) -> String {
    let mut s = format!("gemm-path {}\n", gemm_path());
    for (name, (shape, data)) in &ck.tensors {
        let sum: f64 = data.iter().map(|&v| f64::from(v)).sum();
        writeln!(s, "{name} {shape:?} {:016x} {sum:.9e}", fnv1a(data)).unwrap();
    }
    s
}

#[test]
fn three_steps_reproduce_the_blessed_state_bit_for_bit() {
    pin_gemm_path();
    let root = std::env::temp_dir().join(format!("sere-golden-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a 2-thread pool");
    let summary = pool
        .install(|| train(tiny(&root), Start::Fresh))
        .expect("golden run trains");
    let ck = Checkpoint::load(&summary.checkpoint).expect("checkpoint loads");
    assert_eq!(ck.meta("step"), Some("3"));
    let got = digest(&ck);
    let _ = std::fs::remove_dir_all(&root);

    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    if std::env::var(BLESS_VAR).is_ok_and(|v| v == "1") {
        std::fs::write(&fixture, &got).expect("write the golden fixture");
        eprintln!("blessed {}", fixture.display());
        return;
    }
    let want = std::fs::read_to_string(&fixture)
        .unwrap_or_else(|e| panic!("{}: {e}; bless it with {BLESS_VAR}=1", fixture.display()));
    let blessed_path = want.lines().next().unwrap_or_default();
    if blessed_path != format!("gemm-path {}", gemm_path()) {
        eprintln!(
            "skipped: the golden state was blessed on `{blessed_path}`, this machine takes `{}`",
            gemm_path()
        );
        return;
    }
    let differ: Vec<&str> = want
        .lines()
        .zip(got.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, _)| a.split(' ').next().unwrap_or(a))
        .collect();
    assert!(
        differ.is_empty() && want.lines().count() == got.lines().count(),
        "{} of {} tensors differ from the golden state (first: {:?}); if the change is meant \
         to change the arithmetic, bless with {BLESS_VAR}=1 and say why",
        differ.len(),
        want.lines().count() - 1,
        &differ[..differ.len().min(5)]
    );
}
