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
    /// Image-level (DINO) loss: the CLS term.
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss_dino: f64,
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
        }
    }

    /// Whether a bar is drawn.
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// Reports the step just completed.
    pub fn update(&mut self, m: &StepMetrics) {
        if let Some(bar) = &self.bar {
            bar.set_position(m.step);
            bar.set_message(format_terms(m));
        } else if let Some(out) = &mut self.lines {
            if m.step % self.log_every == 0 || m.step == self.total {
                let eta = eta(
                    self.started.elapsed(),
                    m.step.saturating_sub(self.start_step),
                    self.total.saturating_sub(m.step),
                );
                let _ = writeln!(out, "{}", format_line(m, self.total, eta));
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

/// `loss 9.1234 (dino 8.1234 sp 0.9000 ch 1.2000) lr 6.25e-5 512.3 img/s`,
/// with `mim 7.1234` after the DINO term in a run with masked image
/// modelling.
pub fn format_terms(m: &StepMetrics) -> String {
    let mim = if m.loss_mim != 0.0 {
        format!(" mim {:.4}", m.loss_mim)
    } else {
        String::new()
    };
    format!(
        "loss {:.4} (dino {:.4}{mim} sp {:.4} ch {:.4}) lr {:.3e} {:.1} img/s",
        m.loss, m.loss_dino, m.loss_spatial, m.loss_channel, m.lr, m.images_per_s
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
            loss_dino: 8.0,
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
        assert!(lines[0].starts_with("step 10/25 ep 1 | loss 9.4000 (dino 8.0000 sp 1.2500 ch 2.5000) lr 6.250e-5 512.2 img/s | eta "), "{}", lines[0]);
        assert!(lines[2].starts_with("step 25/25"));
        assert_eq!(lines[3], "done");

        let mut q = Progress::new(10, 0, 1, ProgressMode::Quiet);
        q.update(&record(1));
        q.println("nothing");
        assert!(!q.is_bar());
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
