//! `sere plot`: the learning curves of one or more runs as one PNG.
//!
//! Each RUN is a run folder (its `metrics.jsonl`) or a metrics file. The
//! picture is a legend (one colour per run, named after its folder) above a
//! grid of small charts sharing the x axis (steps, or elapsed minutes):
//! the total loss with its interval mean (dashed), the DINO term, the MIM,
//! spatial and channel terms when some run has them, the learning rate,
//! the teacher momentum, the teacher entropy and, when some run logged it
//! (`--eval-every`), the k-NN top-1 at the steps it was scored. Every run
//! is read before anything is drawn; the file is written atomically and an
//! existing one is replaced only with `--force`.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::cli::PlotArgs;
use crate::error::SereError;
use crate::font;
use crate::metrics::{read_metrics, StepMetrics, METRICS_FILE};

/// What the x axis counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum XAxis {
    /// Optimizer steps.
    #[default]
    Step,
    /// Wall-clock minutes since the run started (a resumed run's clock
    /// continues from where the previous part stopped).
    Elapsed,
}

impl XAxis {
    /// The axis title.
    pub fn title(self) -> &'static str {
        match self {
            XAxis::Step => "step",
            XAxis::Elapsed => "elapsed (minutes)",
        }
    }
}

/// One run's records and the name the legend gives it.
#[derive(Debug, Clone)]
pub struct Run {
    /// The legend entry: the run folder's name.
    pub name: String,
    /// The metrics file read.
    pub path: PathBuf,
    /// Its records, in file order.
    pub records: Vec<StepMetrics>,
}

/// The metrics file a RUN argument names: `RUN/metrics.jsonl` for a
/// folder, the file itself otherwise.
pub fn metrics_path(run: &Path) -> Result<PathBuf, SereError> {
    if run.is_dir() {
        let file = run.join(METRICS_FILE);
        if !file.is_file() {
            return Err(SereError::Other(format!(
                "{} has no {METRICS_FILE}: it is not a training run folder (pass the folder \
                 `sere train --out` wrote, or its {METRICS_FILE} file)",
                run.display()
            )));
        }
        return Ok(file);
    }
    if !run.exists() {
        return Err(SereError::Other(format!(
            "{} does not exist; pass a run folder or its {METRICS_FILE} file",
            run.display()
        )));
    }
    Ok(run.to_path_buf())
}

/// The legend name of a metrics file: its folder's name (the file's own
/// stem when it is not called `metrics.jsonl`).
pub fn run_name(file: &Path) -> String {
    let folder = file
        .parent()
        .and_then(|p| p.canonicalize().ok())
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    match (file.file_name(), folder) {
        (Some(n), Some(f)) if n == METRICS_FILE => f,
        _ => file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.display().to_string()),
    }
}

/// Reads one RUN: its records, refusing an empty or malformed file (the
/// error names the file and the bad line).
pub fn load_run(run: &Path) -> Result<Run, SereError> {
    let path = metrics_path(run)?;
    let records =
        read_metrics(&path).map_err(|e| SereError::io("cannot read metrics", &path, e))?;
    if records.is_empty() {
        return Err(SereError::Other(format!(
            "{} holds no metrics records (it is empty, or only a torn last line); plot the run \
             after its first logged step",
            path.display()
        )));
    }
    Ok(Run {
        name: run_name(&path),
        path,
        records,
    })
}

/// Legend names made unique: a name two runs share becomes each one's path
/// as given, so the legend never shows one name twice for two curves.
fn unique_names(runs: &mut [Run], args: &[PathBuf]) {
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for (run, given) in runs.iter_mut().zip(args) {
        if names.iter().filter(|n| **n == run.name).count() > 1 {
            run.name = given.display().to_string();
        }
    }
}

/// The x value of every record: the step, or elapsed minutes with the
/// clock of each resumed part continued from the previous part's last
/// value (`elapsed_s` restarts at 0 on resume).
pub fn x_values(records: &[StepMetrics], axis: XAxis) -> Vec<f64> {
    match axis {
        XAxis::Step => records.iter().map(|m| m.step as f64).collect(),
        XAxis::Elapsed => {
            let (mut offset, mut last) = (0.0, 0.0);
            records
                .iter()
                .map(|m| {
                    if m.elapsed_s < last {
                        offset += last;
                    }
                    last = m.elapsed_s;
                    (offset + m.elapsed_s) / 60.0
                })
                .collect()
        }
    }
}

/// Reads one quantity of a record (None: not logged on that line).
type Field = fn(&StepMetrics) -> Option<f64>;

/// A curve kind of a panel: its name in the panel and its field.
#[derive(Clone, Copy)]
struct Curve {
    label: &'static str,
    field: Field,
    /// Drawn dashed (a second curve of the same panel).
    dashed: bool,
    /// Points marked (sparse quantities such as the k-NN score).
    points: bool,
}

const fn curve(label: &'static str, field: Field) -> Curve {
    Curve {
        label,
        field,
        dashed: false,
        points: false,
    }
}

/// When a panel is drawn.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Show {
    Always,
    /// Only when some run has a non-zero value of the first curve (a
    /// term that is off logs 0).
    NonZero,
    /// Only when some run logged the first curve at all.
    Logged,
}

/// The panels in drawing order.
const PANELS: &[(&str, Show, &[Curve])] = &[
    (
        "total loss (dashed: interval mean)",
        Show::Always,
        &[
            curve("loss", |m| Some(m.loss)),
            Curve {
                dashed: true,
                // 0: an older file without the field.
                ..curve("loss_mean", |m| Some(m.loss_mean).filter(|v| *v != 0.0))
            },
        ],
    ),
    (
        "DINO loss",
        Show::Always,
        &[curve("loss_dino", |m| Some(m.loss_dino))],
    ),
    (
        "MIM loss",
        Show::NonZero,
        &[curve("loss_mim", |m| Some(m.loss_mim))],
    ),
    (
        "spatial relation loss",
        Show::NonZero,
        &[curve("loss_spatial", |m| Some(m.loss_spatial))],
    ),
    (
        "channel relation loss",
        Show::NonZero,
        &[curve("loss_channel", |m| Some(m.loss_channel))],
    ),
    (
        "learning rate",
        Show::Always,
        &[curve("lr", |m| Some(m.lr))],
    ),
    (
        "teacher momentum",
        Show::Always,
        &[curve("momentum", |m| Some(m.momentum))],
    ),
    (
        "teacher entropy (nats)",
        Show::Always,
        &[curve("teacher_entropy", |m| Some(m.teacher_entropy))],
    ),
    (
        "k-NN top-1",
        Show::Logged,
        &[Curve {
            points: true,
            ..curve("knn_top1", |m| m.knn_top1)
        }],
    ),
];

/// One curve of one run: `(x, y)` of the records that logged a finite
/// value.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Index of the run (its colour).
    pub run: usize,
    /// The metrics field, e.g. `loss_dino`.
    pub label: &'static str,
    /// The points in file order.
    pub points: Vec<(f64, f64)>,
    dashed: bool,
    marked: bool,
}

/// A chart of the grid: its title and its curves.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Shown above the chart.
    pub title: &'static str,
    /// Every run's curves.
    pub series: Vec<Series>,
}

/// The panels to draw for `runs`: every panel of the grid whose
/// condition some run meets, each with the curves of every run.
pub fn panels(runs: &[Run], axis: XAxis) -> Vec<Panel> {
    let xs: Vec<Vec<f64>> = runs.iter().map(|r| x_values(&r.records, axis)).collect();
    PANELS
        .iter()
        .filter(|(_, show, curves)| shown(*show, curves[0].field, runs))
        .map(|&(title, _, curves)| Panel {
            title,
            series: runs
                .iter()
                .enumerate()
                .flat_map(|(i, run)| {
                    let xs = &xs[i];
                    curves.iter().map(move |c| series(i, run, xs, c))
                })
                .filter(|s| !s.points.is_empty())
                .collect(),
        })
        .collect()
}

fn shown(show: Show, field: Field, runs: &[Run]) -> bool {
    let mut values = runs.iter().flat_map(|r| r.records.iter().filter_map(field));
    match show {
        Show::Always => true,
        Show::NonZero => values.any(|v| v != 0.0 && v.is_finite()),
        Show::Logged => values.next().is_some(),
    }
}

fn series(run: usize, r: &Run, xs: &[f64], c: &Curve) -> Series {
    let points = r
        .records
        .iter()
        .zip(xs)
        .filter_map(|(m, &x)| (c.field)(m).filter(|y| y.is_finite()).map(|y| (x, y)))
        .collect();
    Series {
        run,
        label: c.label,
        points,
        dashed: c.dashed,
        marked: c.points,
    }
}

/// Distinct colours of the runs (matplotlib's tab10), reused past ten.
const COLOURS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// The colour of run `i`.
fn colour(i: usize) -> RGBColor {
    let (r, g, b) = COLOURS[i % COLOURS.len()];
    RGBColor(r, g, b)
}

/// `[lo, hi]` of the values, widened by 5% (a constant by a little around
/// it) so no curve sits on the frame.
pub fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.05
    } else {
        (lo.abs() * 0.05).max(1e-3)
    };
    (lo - pad, hi + pad)
}

/// A tick label with as many decimals as the axis' span needs
/// (scientific for very small or large values, e.g. learning rates).
pub fn tick_label(v: f64, span: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = if span > 0.0 {
        (-(span / 10.0).log10()).ceil().clamp(0.0, 6.0) as usize
    } else {
        2
    };
    format!("{v:.decimals$}")
}

/// Turns a plotters drawing error into the command's error.
fn drawing<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> SereError {
    SereError::Other(format!("cannot draw the plot: {e}"))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// The legend strip: one coloured line and name per run.
fn draw_legend(area: &Area, runs: &[Run]) -> Result<(), SereError> {
    let style = font::text_style(16.0)?;
    let (mut x, y) = (16i32, 12i32);
    for (i, run) in runs.iter().enumerate() {
        let c = colour(i);
        area.draw(&PathElement::new(
            vec![(x, y + 8), (x + 28, y + 8)],
            c.stroke_width(3),
        ))
        .map_err(drawing)?;
        area.draw(&Text::new(run.name.clone(), (x + 34, y), style.clone()))
            .map_err(drawing)?;
        let (w, _) = area
            .estimate_text_size(&run.name, &style)
            .map_err(drawing)?;
        x += 34 + w as i32 + 28;
    }
    Ok(())
}

/// One chart of the grid.
fn draw_panel(area: &Area, panel: &Panel, axis: XAxis) -> Result<(), SereError> {
    let all = || panel.series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = padded_range(all().map(|p| p.0));
    let (y0, y1) = padded_range(all().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, font::text_style(16.0)?)
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(drawing)?;
    let (xs, ys) = (x1 - x0, y1 - y0);
    chart
        .configure_mesh()
        .x_labels(5)
        .y_labels(5)
        .x_desc(axis.title())
        .label_style(font::text_style(12.0)?)
        .axis_desc_style(font::text_style(12.0)?)
        .x_label_formatter(&|v| tick_label(*v, xs))
        .y_label_formatter(&|v| tick_label(*v, ys))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(drawing)?;
    for s in &panel.series {
        let style = colour(s.run).stroke_width(2);
        let pts = s.points.iter().copied();
        let drawn = if s.dashed {
            chart.draw_series(DashedLineSeries::new(pts, 6, 4, style))
        } else {
            chart.draw_series(LineSeries::new(pts, style))
        };
        drawn.map_err(drawing)?;
        if s.marked {
            let dots = s
                .points
                .iter()
                .map(|&p| Circle::new(p, 3, colour(s.run).filled()));
            chart.draw_series(dots).map_err(drawing)?;
        }
    }
    Ok(())
}

/// Columns of the grid for `n` panels.
fn grid(n: usize) -> (usize, usize) {
    let cols = if n <= 4 { 2 } else { 3 };
    (n.div_ceil(cols).max(1), cols)
}

/// Draws the legend and the panels into an RGB buffer of `w x h`.
pub fn render(runs: &[Run], axis: XAxis, (w, h): (u32, u32)) -> Result<Vec<u8>, SereError> {
    font::register()?;
    let panels = panels(runs, axis);
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let (legend, body) = root.split_vertically(40);
        draw_legend(&legend, runs)?;
        let (rows, cols) = grid(panels.len());
        let cells = body.split_evenly((rows, cols));
        for (panel, cell) in panels.iter().zip(&cells) {
            draw_panel(cell, panel, axis)?;
        }
        root.present().map_err(drawing)?;
    }
    Ok(buf)
}

/// Refuses an `--out` that cannot or must not be written: not a `.png`,
/// in a folder that does not exist, or an existing file without `--force`.
pub fn check_out(out: &Path, force: bool) -> Result<(), SereError> {
    let png = out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !png {
        return Err(SereError::Other(format!(
            "--out {}: `sere plot` writes a PNG; give the file a .png name",
            out.display()
        )));
    }
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = dir.filter(|d| !d.is_dir()) {
        return Err(SereError::Other(format!(
            "--out {}: the folder {} does not exist; create it first or write elsewhere",
            out.display(),
            dir.display()
        )));
    }
    if out.exists() && !force {
        return Err(SereError::Other(format!(
            "--out {} already exists; pass --force to replace it, or choose another name",
            out.display()
        )));
    }
    Ok(())
}

/// `sere plot`: reads every run, draws them and writes `--out`; returns the
/// file written.
pub fn run(args: &PlotArgs) -> Result<PathBuf, SereError> {
    check_out(&args.out, args.force)?;
    let mut runs = args
        .runs
        .iter()
        .map(|r| load_run(r))
        .collect::<Result<Vec<_>, _>>()?;
    unique_names(&mut runs, &args.runs);
    let (w, h) = args.size;
    let buf = render(&runs, args.x, (w, h))?;
    let img = image::RgbImage::from_raw(w, h, buf).expect("the buffer is w x h x 3");
    crate::visualize::write_png_atomic(&args.out, &img)?;
    Ok(args.out.clone())
}

/// Parses `--size WxH` (e.g. `1600x1000`), each side 200 to 8000 pixels.
pub fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{s:?} is not a size; write WIDTHxHEIGHT in pixels, e.g. 1600x1000");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let side = |v: &str| v.trim().parse::<u32>().map_err(|_| bad());
    let (w, h) = (side(w)?, side(h)?);
    if !(200..=8000).contains(&w) || !(200..=8000).contains(&h) {
        return Err(format!("{w}x{h}: each side must be 200 to 8000 pixels"));
    }
    Ok((w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, elapsed_s: f64, loss: f64) -> StepMetrics {
        StepMetrics {
            step,
            loss,
            loss_dino: loss,
            elapsed_s,
            lr: 1e-4,
            momentum: 0.996,
            ..Default::default()
        }
    }

    fn run(name: &str, records: Vec<StepMetrics>) -> Run {
        Run {
            name: name.into(),
            path: PathBuf::from(name),
            records,
        }
    }

    #[test]
    fn files_are_read_and_bad_ones_named() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("run-a");
        std::fs::create_dir(&dir).unwrap();
        // No metrics in the folder.
        let e = load_run(&dir).unwrap_err().to_string();
        assert!(
            e.contains("has no metrics.jsonl") && e.contains("run-a"),
            "{e}"
        );
        // Empty.
        let file = dir.join(METRICS_FILE);
        std::fs::write(&file, "").unwrap();
        let e = load_run(&dir).unwrap_err().to_string();
        assert!(e.contains("holds no metrics records"), "{e}");
        // A bad line before the last: named with its number.
        let good = serde_json::to_string(&rec(1, 1.0, 2.0)).unwrap();
        std::fs::write(&file, format!("{good}\n{{\"step\": oops}}\n{good}\n")).unwrap();
        let e = crate::error::render(&load_run(&dir).unwrap_err());
        assert!(e.contains("metrics.jsonl") && e.contains("line 2"), "{e}");
        // Good: by folder or by file, named after the folder.
        std::fs::write(&file, format!("{good}\n{good}\n")).unwrap();
        for arg in [&dir, &file] {
            let r = load_run(arg).unwrap();
            assert_eq!((r.name.as_str(), r.records.len()), ("run-a", 2));
        }
        let other = d.path().join("curves.jsonl");
        std::fs::write(&other, format!("{good}\n")).unwrap();
        assert_eq!(load_run(&other).unwrap().name, "curves");
        let e = load_run(&d.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn elapsed_minutes_continue_across_a_resume() {
        let r = [rec(1, 60.0, 1.0), rec(2, 120.0, 1.0), rec(3, 30.0, 1.0)];
        assert_eq!(x_values(&r, XAxis::Step), [1.0, 2.0, 3.0]);
        assert_eq!(x_values(&r, XAxis::Elapsed), [1.0, 2.0, 2.5]);
    }

    #[test]
    fn panels_follow_what_the_runs_logged() {
        let a = run(
            "a",
            vec![rec(1, 1.0, 3.0), rec(2, 2.0, f64::NAN), rec(3, 3.0, 2.0)],
        );
        let titles = |p: &[Panel]| p.iter().map(|p| p.title).collect::<Vec<_>>();
        let p = panels(std::slice::from_ref(&a), XAxis::Step);
        assert_eq!(
            titles(&p),
            [
                "total loss (dashed: interval mean)",
                "DINO loss",
                "learning rate",
                "teacher momentum",
                "teacher entropy (nats)"
            ]
        );
        // The NaN line is skipped; loss_mean (0: not logged) has no curve.
        assert_eq!(p[0].series.len(), 1);
        assert_eq!(p[0].series[0].points, [(1.0, 3.0), (3.0, 2.0)]);

        let mut b = run("b", vec![rec(1, 1.0, 1.0), rec(5, 2.0, 0.5)]);
        b.records[1].knn_top1 = Some(0.4);
        b.records[1].loss_spatial = 0.2;
        b.records[0].loss_mean = 1.5;
        let p = panels(&[a, b], XAxis::Step);
        let t = titles(&p);
        assert!(
            t.contains(&"spatial relation loss") && t.contains(&"k-NN top-1"),
            "{t:?}"
        );
        assert!(!t.contains(&"MIM loss") && !t.contains(&"channel relation loss"));
        let knn = p.iter().find(|p| p.title == "k-NN top-1").unwrap();
        assert_eq!(knn.series.len(), 1);
        assert_eq!(
            (knn.series[0].run, &knn.series[0].points[..]),
            (1, &[(5.0, 0.4)][..])
        );
        // Both runs' losses, run b's with its interval mean.
        let loss: Vec<_> = p[0].series.iter().map(|s| (s.run, s.label)).collect();
        assert_eq!(loss, [(0, "loss"), (1, "loss"), (1, "loss_mean")]);
    }

    #[test]
    fn ranges_ticks_and_sizes() {
        assert_eq!(padded_range([0.0, 10.0].into_iter()), (-0.5, 10.5));
        let (lo, hi) = padded_range([2.0].into_iter());
        assert!(lo < 2.0 && hi > 2.0);
        assert_eq!(padded_range(std::iter::empty()), (0.0, 1.0));
        assert_eq!(tick_label(0.0, 1.0), "0");
        assert_eq!(tick_label(2.5e-4, 1e-4), "2.5e-4");
        assert_eq!(tick_label(0.9965, 0.004), "0.9965");
        assert_eq!(tick_label(1200.0, 2000.0), "1200");
        assert_eq!(parse_size("1600x1000"), Ok((1600, 1000)));
        assert_eq!(parse_size("640X480"), Ok((640, 480)));
        assert!(parse_size("1600").unwrap_err().contains("WIDTHxHEIGHT"));
        assert!(parse_size("10x10").unwrap_err().contains("200 to 8000"));
    }

    #[test]
    fn out_is_checked_before_anything_is_read() {
        let d = tempfile::tempdir().unwrap();
        let png = d.path().join("x.png");
        check_out(&png, false).unwrap();
        std::fs::write(&png, b"old").unwrap();
        let e = check_out(&png, false).unwrap_err().to_string();
        assert!(e.contains("already exists") && e.contains("--force"), "{e}");
        check_out(&png, true).unwrap();
        let e = check_out(&d.path().join("no/x.png"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = check_out(&d.path().join("x.jpg"), false)
            .unwrap_err()
            .to_string();
        assert!(e.contains(".png"), "{e}");
    }

    #[test]
    fn renders_runs_into_a_buffer_of_the_size() {
        let mut a = run(
            "a",
            (1..20).map(|s| rec(s, s as f64, 5.0 / s as f64)).collect(),
        );
        a.records[9].knn_top1 = Some(0.3);
        let b = run(
            "b",
            (1..10).map(|s| rec(s, s as f64, 4.0 / s as f64)).collect(),
        );
        let buf = render(&[a, b], XAxis::Elapsed, (640, 400)).unwrap();
        assert_eq!(buf.len(), 640 * 400 * 3);
        // Both runs' colours appear (their curves and legend lines).
        let has = |c: (u8, u8, u8)| buf.chunks(3).any(|p| (p[0], p[1], p[2]) == c);
        assert!(has(COLOURS[0]) && has(COLOURS[1]));
    }
}
