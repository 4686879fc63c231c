//! Training metrics: an append-only `metrics.jsonl` (one JSON object per
//! logged step, flushed line by line so a crash loses at most the line being
//! written) and a progress display (a bar on a terminal, plain lines every
//! `log_every` steps otherwise).

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Deserializer, Serialize};

/// What is logged for one step. Non-finite values are written as JSON
/// `null` and read back as NaN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps completed.
    pub step: u64,
    /// Epoch in progress (0-based).
    pub epoch: usize,
    /// Total loss `L_I (4 - alpha - beta) / 2 + alpha L_s + beta L_c`.
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss: f64,
    /// Mean total loss over the steps since the previous record (the
    /// logging interval; absent in older files: 0).
    #[serde(default, deserialize_with = "f64_or_nan")]
    pub loss_mean: f64,
    /// Image-level (DINO) loss: the CLS term.
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss_dino: f64,
    /// Mean entropy (nats) of the teacher's centred, sharpened CLS output:
    /// near `ln K` a collapse to uniform, near 0 (with the KL near 0) onto
    /// one prototype (absent in older files: 0).
    #[serde(default, deserialize_with = "f64_or_nan")]
    pub teacher_entropy: f64,
    /// Mean `KL(teacher || student)` of the CLS outputs: the DINO loss less
    /// the teacher entropy; 0 in either collapse (absent in older files).
    #[serde(default, deserialize_with = "f64_or_nan")]
    pub teacher_student_kl: f64,
    /// iBOT's masked-patch loss (0 without `mim`; absent in older files).
    #[serde(default, deserialize_with = "f64_or_nan")]
    pub loss_mim: f64,
    /// Spatial self-relation loss.
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss_spatial: f64,
    /// Channel self-relation loss.
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss_channel: f64,
    /// Learning rate used for this step.
    #[serde(deserialize_with = "f64_or_nan")]
    pub lr: f64,
    /// Weight decay used for this step.
    #[serde(deserialize_with = "f64_or_nan")]
    pub wd: f64,
    /// Teacher EMA momentum used for this step.
    #[serde(deserialize_with = "f64_or_nan")]
    pub momentum: f64,
    /// DINO teacher temperature used for this step.
    #[serde(deserialize_with = "f64_or_nan")]
    pub teacher_temp: f64,
    /// Throughput over the last logging interval.
    #[serde(deserialize_with = "f64_or_nan")]
    pub images_per_s: f64,
    /// Seconds since the run (or the resumed run) started.
    #[serde(deserialize_with = "f64_or_nan")]
    pub elapsed_s: f64,
    /// Global gradient L2 norm before clipping.
    #[serde(deserialize_with = "f64_or_nan")]
    pub grad_norm: f64,
    /// Weighted 20-NN top-1 of the teacher on the `--eval-every` subset,
    /// on the steps it was scored (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knn_top1: Option<f64>,
    /// Seconds of `elapsed_s` spent in those evaluations so far (training
    /// time is `elapsed_s - eval_s`; absent in older files: 0).
    #[serde(default)]
    pub eval_s: f64,
}

fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// File name of a run's metrics in its output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends [`StepMetrics`] to a JSON-lines file.
#[derive(Debug)]
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Starts a new file at `path` (replacing an existing one).
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path)?;
        Ok(MetricsWriter { file, path })
    }

    /// Continues `path` after resuming from step `step`: keeps the records
    /// with `step <= step`, drops later ones (they will be logged again) and
    /// a torn last line, then appends. A missing file is created.
    pub fn resume(path: impl AsRef<Path>, step: u64) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if path.exists() {
            let kept: Vec<String> = BufReader::new(File::open(&path)?)
                .lines()
                .collect::<io::Result<Vec<_>>>()?
                .into_iter()
                .filter(|l| serde_json::from_str::<StepMetrics>(l).is_ok_and(|m| m.step <= step))
                .collect();
            let tmp = path.with_extension("jsonl.tmp");
            {
                let mut f = File::create(&tmp)?;
                for l in &kept {
                    writeln!(f, "{l}")?;
                }
                f.sync_all()?;
            }
            fs::rename(&tmp, &path)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(MetricsWriter { file, path })
    }

    /// Appends one record as one line and flushes it.
    pub fn append(&mut self, m: &StepMetrics) -> io::Result<()> {
        let mut line = serde_json::to_string(m).map_err(io::Error::other)?;
        line.push('\n');
        // One write per line: readers never see half a record unless the
        // process dies inside this call.
        self.file.write_all(line.as_bytes())?;
        self.file.flush()
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads a metrics file; a torn last line (a crash mid-write) is ignored,
/// any other bad line is an error naming its line number.
pub fn read_metrics(path: impl AsRef<Path>) -> io::Result<Vec<StepMetrics>> {
    let lines: Vec<String> = BufReader::new(File::open(path)?)
        .lines()
        .collect::<io::Result<_>>()?;
    let mut out = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(l) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("metrics line {}: {e}", i + 1),
                ))
            }
        }
    }
    Ok(out)
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// A bar when stdout is a terminal, else plain lines.
    #[default]
    Auto,
    /// Always a bar (on stdout).
    Bar,
    /// A plain line every `log_every` steps (and at the last step).
    Lines,
    /// Nothing.
    Quiet,
}

/// Training progress: step/total, loss terms, lr, images/s and ETA.
pub struct Progress {
    bar: Option<ProgressBar>,
    lines: Option<Box<dyn Write + Send>>,
    total: u64,
    start_step: u64,
    log_every: u64,
    started: Instant,
    /// Prototypes `K` of the DINO head, for the collapse warning (None: no
    /// check).
    out_dim: Option<usize>,
}

impl Progress {
    /// Progress over `total` steps of which `start_step` are already done
    /// (resume), printing lines every `log_every` steps when not a bar.
    pub fn new(total: u64, start_step: u64, log_every: u64, mode: ProgressMode) -> Self {
        let mode = match mode {
            ProgressMode::Auto if io::stdout().is_terminal() => ProgressMode::Bar,
            ProgressMode::Auto => ProgressMode::Lines,
            m => m,
        };
        let mut p = Self::with_lines(total, start_step, log_every, Box::new(io::stdout()));
        match mode {
            ProgressMode::Bar => {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout())
                    .with_position(start_step)
                    .with_style(
                        ProgressStyle::with_template(
                            "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg} | eta {eta}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                bar.reset_eta();
                p.bar = Some(bar);
                p.lines = None;
            }
            ProgressMode::Quiet => p.lines = None,
            _ => {}
        }
        p
    }

    /// Plain-lines progress written to `out` (tests, log files).
    pub fn with_lines(
        total: u64,
        start_step: u64,
        log_every: u64,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Progress {
            bar: None,
            lines: Some(out),
            total,
            start_step,
            log_every: log_every.max(1),
            started: Instant::now(),
            out_dim: None,
        }
    }

    /// Warns on the progress line when the DINO output of a head with
    /// `out_dim` prototypes collapses (see [`Collapse`]).
    pub fn watch_collapse(mut self, out_dim: usize) -> Self {
        self.out_dim = Some(out_dim);
        self
    }

    /// Whether a bar is drawn.
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// Reports the step just completed.
    pub fn update(&mut self, m: &StepMetrics) {
        let warning = self
            .out_dim
            .and_then(|k| Collapse::detect(m, k).map(|c| c.warning(m, k)));
        if let Some(bar) = &self.bar {
            bar.set_position(m.step);
            match &warning {
                Some(w) => bar.set_message(format!("{} | {w}", format_terms(m))),
                None => bar.set_message(format_terms(m)),
            }
        } else if let Some(out) = &mut self.lines {
            if m.step % self.log_every == 0 || m.step == self.total {
                let eta = eta(
                    self.started.elapsed(),
                    m.step.saturating_sub(self.start_step),
                    self.total.saturating_sub(m.step),
                );
                let mut line = format_line(m, self.total, eta);
                if let Some(w) = &warning {
                    let _ = write!(line, " | {w}");
                }
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }

    /// Prints a message without garbling the bar.
    pub fn println(&mut self, msg: impl AsRef<str>) {
        if let Some(bar) = &self.bar {
            bar.println(msg);
        } else if let Some(out) = &mut self.lines {
            let _ = writeln!(out, "{}", msg.as_ref());
            let _ = out.flush();
        }
    }

    /// Leaves the final state on screen.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Remaining time from the pace so far, `None` before the first step.
fn eta(elapsed: Duration, done: u64, left: u64) -> Option<Duration> {
    (done > 0).then(|| elapsed.mul_f64(left as f64 / done as f64))
}

/// How the DINO term has collapsed, judged from [`StepMetrics`]'s teacher
/// entropy `H` and KL against `ln K` (DINO's collapse study, Caron et al.
/// 2021, section 5.3: in both collapses the KL goes to 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collapse {
    /// `H >= 0.95 ln K`: the teacher's output is close to uniform, whatever
    /// the image (centring won over sharpening).
    Uniform,
    /// `H <= 0.05 ln K` and `KL <= 0.05 ln K`: every image goes to the
    /// same prototype (sharpening won over centring).
    OnePrototype,
}

impl Collapse {
    /// Share of `ln K` within which the entropy counts as at a bound.
    const MARGIN: f64 = 0.05;

    /// `ln K`, the entropy of a uniform output over `out_dim` prototypes.
    fn ln_k(out_dim: usize) -> f64 {
        (out_dim.max(2) as f64).ln()
    }

    /// The collapse `m` shows for `K = out_dim` prototypes, if any.
    pub fn detect(m: &StepMetrics, out_dim: usize) -> Option<Collapse> {
        let ln_k = Self::ln_k(out_dim);
        let (h, kl) = (m.teacher_entropy, m.teacher_student_kl);
        if !(h.is_finite() && kl.is_finite()) {
            return None;
        }
        if h >= (1.0 - Self::MARGIN) * ln_k {
            Some(Collapse::Uniform)
        } else if h <= Self::MARGIN * ln_k && kl <= Self::MARGIN * ln_k {
            Some(Collapse::OnePrototype)
        } else {
            None
        }
    }

    /// The warning shown on the progress line.
    pub fn warning(self, m: &StepMetrics, out_dim: usize) -> String {
        let ln_k = Self::ln_k(out_dim);
        let what = match self {
            Collapse::Uniform => "near uniform",
            Collapse::OnePrototype => "on one prototype",
        };
        format!(
            "WARNING: DINO output collapsing ({what}: teacher entropy {:.3} of ln K = {ln_k:.3}, KL {:.3})",
            m.teacher_entropy, m.teacher_student_kl
        )
    }
}

/// `loss 9.1234 [mean 9.3012] (dino 8.1234 H 4.52 sp 0.9000 ch 1.2000) lr
/// 6.25e-5 512.3 img/s`: the last step's loss, the logging interval's mean
/// loss and the last step's terms (`H`: the teacher entropy), with `mim
/// 7.1234` in a run with masked image modelling and without `sp`/`ch` in
/// one without relations.
pub fn format_terms(m: &StepMetrics) -> String {
    let mim = if m.loss_mim != 0.0 {
        format!(" mim {:.4}", m.loss_mim)
    } else {
        String::new()
    };
    // A run without relations (alpha = beta = 0) computes neither.
    let relations = if m.loss_spatial != 0.0 || m.loss_channel != 0.0 {
        format!(" sp {:.4} ch {:.4}", m.loss_spatial, m.loss_channel)
    } else {
        String::new()
    };
    // The interval's mean beside the last step's value, when logged.
    let mean = if m.loss_mean != 0.0 {
        format!(" [mean {:.4}]", m.loss_mean)
    } else {
        String::new()
    };
    format!(
        "loss {:.4}{mean} (dino {:.4} H {:.2}{mim}{relations}) lr {:.3e} {:.1} img/s",
        m.loss, m.loss_dino, m.teacher_entropy, m.lr, m.images_per_s
    )
}

/// One plain progress line:
/// `step 120/1000 ep 2 | loss ... | eta 1m12s`.
pub fn format_line(m: &StepMetrics, total: u64, eta: Option<Duration>) -> String {
    let mut s = format!(
        "step {}/{} ep {} | {}",
        m.step,
        total,
        m.epoch,
        format_terms(m)
    );
    if let Some(eta) = eta {
        let _ = write!(s, " | eta {}", format_duration(eta));
    }
    s
}

/// `1h02m`, `3m05s`, `12s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, min, sec) => format!("{min}m{sec:02}s"),
        (h, min, _) => format!("{h}h{min:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn record(step: u64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: (step / 10) as usize,
            loss: 9.5 - step as f64 * 0.01,
            loss_mean: 9.6 - step as f64 * 0.01,
            loss_dino: 8.0,
            teacher_entropy: 4.5,
            teacher_student_kl: 3.5,
            loss_mim: 0.0,
            loss_spatial: 1.25,
            loss_channel: 2.5,
            lr: 6.25e-5,
            wd: 0.04,
            momentum: 0.996,
            teacher_temp: 0.04,
            images_per_s: 512.25,
            elapsed_s: step as f64,
            grad_norm: 1.5,
            knn_top1: None,
            eval_s: 0.0,
        }
    }

    #[test]
    fn jsonl_round_trip_and_nan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::create(&path).unwrap();
        let mut nan = record(2);
        nan.loss = f64::NAN;
        nan.grad_norm = f64::INFINITY;
        for m in [record(1), nan] {
            w.append(&m).unwrap();
        }
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text
            .lines()
            .next()
            .unwrap()
            .starts_with("{\"step\":1,\"epoch\":0,\"loss\":9.49,"));
        assert!(text.contains("\"loss\":null"));
        let back = read_metrics(&path).unwrap();
        assert_eq!(back[0], record(1));
        assert!(back[1].loss.is_nan() && back[1].grad_norm.is_nan());
        assert_eq!(back[1].loss_dino, 8.0);
    }

    #[test]
    fn resume_drops_later_and_torn_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut w = MetricsWriter::create(&path).unwrap();
        for s in [10, 20, 30, 40] {
            w.append(&record(s)).unwrap();
        }
        drop(w);
        // A crash in the middle of a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"step\":50,\"ep").unwrap();
        drop(f);
        assert_eq!(read_metrics(&path).unwrap().len(), 4);

        let mut w = MetricsWriter::resume(&path, 20).unwrap();
        w.append(&record(30)).unwrap();
        let steps: Vec<u64> = read_metrics(&path)
            .unwrap()
            .iter()
            .map(|m| m.step)
            .collect();
        assert_eq!(steps, vec![10, 20, 30]);
        // Resuming without a file creates it.
        let fresh = dir.path().join("new.jsonl");
        MetricsWriter::resume(&fresh, 5)
            .unwrap()
            .append(&record(6))
            .unwrap();
        assert_eq!(read_metrics(&fresh).unwrap().len(), 1);
        // A bad line in the middle is an error.
        fs::write(&path, "{}\n").unwrap();
        fs::write(
            &path,
            format!("garbage\n{}\n", serde_json::to_string(&record(1)).unwrap()),
        )
        .unwrap();
        assert!(read_metrics(&path)
            .unwrap_err()
            .to_string()
            .contains("line 1"));
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_lines_every_log_every_steps() {
        let sink = Shared::default();
        let mut p = Progress::with_lines(25, 0, 10, Box::new(sink.clone()));
        assert!(!p.is_bar());
        for s in 1..=25 {
            p.update(&record(s));
        }
        p.println("done");
        p.finish();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("step 10/25 ep 1 | loss 9.4000 [mean 9.5000] (dino 8.0000 H 4.50 sp 1.2500 ch 2.5000) lr 6.250e-5 512.2 img/s | eta "), "{}", lines[0]);
        assert!(lines[2].starts_with("step 25/25"));
        assert_eq!(lines[3], "done");

        let mut q = Progress::new(10, 0, 1, ProgressMode::Quiet);
        q.update(&record(1));
        q.println("nothing");
        assert!(!q.is_bar());
    }

    #[test]
    fn collapse_is_detected_at_both_bounds_and_warned_on_the_line() {
        let k = 1024;
        let ln_k = (k as f64).ln();
        let at = |h: f64, kl: f64| StepMetrics {
            teacher_entropy: h,
            teacher_student_kl: kl,
            ..record(10)
        };
        assert_eq!(Collapse::detect(&at(4.5, 3.5), k), None);
        assert_eq!(
            Collapse::detect(&at(0.96 * ln_k, 0.0), k),
            Some(Collapse::Uniform)
        );
        assert_eq!(
            Collapse::detect(&at(0.01, 0.02), k),
            Some(Collapse::OnePrototype)
        );
        // A sharp teacher the student does not yet match is not a collapse.
        assert_eq!(Collapse::detect(&at(0.01, 2.0), k), None);
        assert_eq!(Collapse::detect(&at(f64::NAN, 0.0), k), None);

        let sink = Shared::default();
        let mut p = Progress::with_lines(20, 0, 10, Box::new(sink.clone())).watch_collapse(k);
        p.update(&at(4.5, 3.5));
        p.update(&StepMetrics {
            step: 20,
            ..at(6.9, 0.01)
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(!lines[0].contains("WARNING"), "{text}");
        assert!(
            lines[1].ends_with("| WARNING: DINO output collapsing (near uniform: teacher entropy 6.900 of ln K = 6.931, KL 0.010)"),
            "{text}"
        );
    }

    #[test]
    fn a_run_without_relations_does_not_print_them() {
        let dino_only = StepMetrics {
            loss_spatial: 0.0,
            loss_channel: 0.0,
            ..record(3)
        };
        let line = format_terms(&dino_only);
        assert!(!line.contains(" sp ") && !line.contains(" ch "), "{line}");
        assert!(format_terms(&record(3)).contains(" sp 1.2500 ch 2.5000"));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_duration(Duration::from_secs(12)), "12s");
        assert_eq!(format_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(format_duration(Duration::from_secs(3720)), "1h02m");
        assert_eq!(
            eta(Duration::from_secs(10), 5, 10),
            Some(Duration::from_secs(20))
        );
        assert_eq!(eta(Duration::from_secs(10), 0, 10), None);
        let line = format_line(&record(3), 9, Some(Duration::from_secs(61)));
        assert!(
            line.starts_with("step 3/9 ep 0 |") && line.ends_with("| eta 1m01s"),
            "{line}"
        );
    }
}
