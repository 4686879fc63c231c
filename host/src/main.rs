//! The `sere` command: train, evaluate, visualise, plot, export and
//! benchmark SERE, on the CPU or a CUDA GPU (`--device`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use sere_host::backend::{Backend, Cpu};
use sere_host::checkpoint::{self, Checkpoint};
use sere_host::cli::{
    BenchStepArgs, Command, EvalCommand, ExportArgs, KnnArgs, LinearArgs, PlotArgs, Resume,
    TrainArgs, VisualizeArgs,
};
use sere_host::config::Device;
use sere_host::data::DataSpec;
use sere_host::dist::{self, ProcessGroup};
use sere_host::error::{self, report, SereError};
use sere_host::eval::dump::FeatureDump;
use sere_host::eval::{features, features::Embedder, knn, linear, report};
use sere_host::export::{self, Network};
use sere_host::metrics;
use sere_host::plot;
use sere_host::train::engine::open_cuda;
use sere_host::train::{self, Start};
use sere_host::visualize;

/// Runs `$body` with `$emb` the checkpoint's teacher backbone loaded on the
/// device `$device` names (the CPU when it names none), or ends with the
/// no-GPU error: never a silent CPU run when CUDA was asked for.
macro_rules! on_device {
    ($device:expr, $ck:expr, $emb:ident => $body:expr) => {
        on_device!($device, $ck, Network::Teacher, false, $emb => $body)
    };
    ($device:expr, $ck:expr, $network:expr, $random_init:expr, $emb:ident => $body:expr) => {
        match $device.unwrap_or(Device::Cpu) {
            Device::Cpu => {
                let $emb = load_embedder(Cpu, $ck, $network, $random_init)?;
                $body
            }
            Device::Cuda => {
                let $emb = load_embedder(open_cuda()?, $ck, $network, $random_init)?;
                $body
            }
        }
    };
}

/// `network` of `ck` on `be`, or with `random_init` the network its run
/// started from (drawn from the run's seed): the baseline that says what
/// training added, for any choice of features.
fn load_embedder<B: Backend>(
    be: B,
    ck: &Checkpoint,
    network: Network,
    random_init: bool,
) -> Result<Embedder<B>, SereError> {
    if !random_init {
        return Embedder::from_checkpoint_network(be, ck, network);
    }
    if sere_host::import::is_backbone(ck) {
        return Err(SereError::Other(
            "--random-init needs a training checkpoint: its config and seed say which initialisation \
             the run drew, and a backbone file (`sere export`'s or timm's) has neither; pass the \
             checkpoint the backbone was exported from"
                .into(),
        ));
    }
    Embedder::random_init(be, &ck.training_config()?)
}

fn main() -> ExitCode {
    let cli = sere_host::cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

fn run(cmd: Command) -> Result<(), SereError> {
    match cmd {
        Command::Train(args) => run_train_in_group(&args),
        Command::BenchStep(args) => run_bench(&args),
        Command::Eval(EvalCommand::Knn(args)) => run_knn(&args),
        Command::Eval(EvalCommand::Linear(args)) => run_linear(&args),
        Command::Visualize(args) => run_visualize(&args),
        Command::Plot(args) => run_plot(&args),
        Command::Export(args) => run_export(&args),
    }
}

/// A checkpoint file from a file or a directory (its newest checkpoint).
fn checkpoint_in(path: &Path) -> Result<PathBuf, SereError> {
    if path.is_dir() {
        checkpoint::latest_in(path)
            .map_err(|e| SereError::io("cannot list checkpoints in", path, e))?
            .ok_or_else(|| {
                SereError::Other(format!(
                    "no checkpoint.safetensors or checkpoint-*.safetensors in {}; train first (a run that stopped before \
                     its first checkpoint is started again with `sere train --out {}`) or pass a \
                     checkpoint file",
                    path.display(),
                    path.display()
                ))
            })
    } else {
        Ok(path.to_path_buf())
    }
}

/// `sere train` in the processes an MPI launcher started (one process
/// otherwise). A rank that fails says which it is and ends the whole run:
/// the others would wait for it in their next collective for ever.
fn run_train_in_group(args: &TrainArgs) -> Result<(), SereError> {
    if args.print_config {
        return print_config(args);
    }
    let group = dist::from_launcher().map_err(SereError::Other)?;
    match run_train(args, &group) {
        Err(e) if group.world() > 1 => {
            eprintln!(
                "sere: rank {} of {} ({}) failed; ending every process of the run",
                group.rank(),
                group.world(),
                group.describe()
            );
            let _ = report(&e);
            group.abort(1)
        }
        r => r,
    }
}

fn run_train(args: &TrainArgs, group: &ProcessGroup) -> Result<(), SereError> {
    let lead = group.rank() == 0;
    // A resumed run's flags apply over its checkpoint's config, which is
    // validated with them (in `train`), not over the defaults.
    let mut cfg = match args.resume {
        Some(_) => args.merged()?,
        None => args.to_config()?,
    };
    let resume = match args.resume() {
        None => None,
        Some(Resume::LatestInOut) => {
            // Without --out the default folder is a new runs/<date-time>,
            // which holds no run to resume.
            let out = cfg.out.clone().ok_or_else(|| {
                SereError::Other(
                    "`--resume` without a value resumes the run in --out, but no --out was given; \
                     pass the run folder (`--resume DIR`) or a checkpoint file, or add --out DIR"
                        .into(),
                )
            })?;
            Some(checkpoint_in(&out)?)
        }
        Some(Resume::Path(p)) => Some(checkpoint_in(&p)?),
    };
    if let Some(path) = &resume {
        // The run continues with its own settings; only the flags given now
        // (e.g. a longer --steps, another --out) change them.
        for (given, flag) in [
            (args.config.is_some(), "--config"),
            (args.model.preset.is_some(), "--preset"),
            (args.recipe.is_some(), "--recipe"),
        ] {
            if given {
                return Err(SereError::Other(format!(
                    "{flag} cannot be combined with --resume: a resumed run keeps the settings \
                     stored in its checkpoint; change single settings with --set KEY=VALUE or \
                     their flags (--steps, --lr, ...)"
                )));
            }
        }
        let ck = Checkpoint::load(path)?;
        let stored = ck.training_config()?;
        cfg = stored.clone();
        // The folder resumed is the run, wherever it was first written: the
        // `out` stored in the checkpoint may be a folder moved or copied
        // away since.
        cfg.out = None;
        for s in &args.set {
            cfg.set(s)?;
        }
        args.apply(&mut cfg);
        let changed = stored.architecture_changes(&cfg);
        if !changed.is_empty() {
            return Err(SereError::Other(format!(
                "cannot change the model of a resumed run ({}, checkpoint -> requested); drop \
                 these flags to continue the run, or start a new run with another --out",
                changed.join(", ")
            )));
        }
        if cfg.out.is_none() {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            cfg.out = Some(dir.to_path_buf());
        }
    } else if cfg.out.is_none() {
        if group.world() > 1 {
            // Each process would name its own runs/<date-time>.
            return Err(SereError::Other(format!(
                "a data-parallel run ({} processes) needs --out DIR: the folder rank 0 writes \
                 its run to and every rank resumes from",
                group.world()
            )));
        }
        cfg.out = Some(cfg.out_dir());
    }
    let start = match resume {
        Some(path) => Start::Resume(path),
        None if args.no_resume => Start::FreshMovingAside,
        None => match rerun_of(&cfg, lead)? {
            Some(path) => Start::Resume(path),
            None => Start::Fresh,
        },
    };
    let summary = train::train_in(cfg, start, group.clone())?;
    if !lead {
        return Ok(()); // rank 0 reports the run
    }
    if group.world() > 1 {
        println!(
            "data-parallel: {}, {} images per process and step",
            group.describe(),
            summary.config.batch / group.world()
        );
    }
    if summary.already_finished {
        return finished_already(&summary);
    }
    let last = &summary.last;
    let mim = if last.loss_mim != 0.0 {
        format!(", mim {:.4}", last.loss_mim)
    } else {
        String::new()
    };
    let relations = if summary.config.relations() {
        format!(
            ", spatial {:.4}, channel {:.4}",
            last.loss_spatial, last.loss_channel
        )
    } else {
        String::new()
    };
    println!(
        "trained {} steps; final loss {:.4} (dino {:.4}{mim}{relations}); teacher entropy {:.3}, KL {:.3}",
        summary.steps,
        last.loss,
        last.loss_dino,
        last.teacher_entropy,
        last.teacher_student_kl
    );
    let out_dim = summary.config.out_dim;
    if let Some(c) = metrics::Collapse::detect(last, out_dim) {
        println!(
            "{}: the image-level term no longer teaches; what is learned comes from the other losses (BENCHMARKS.md, \"The default run\")",
            c.warning(last, out_dim)
        );
    }
    println!("checkpoint: {}", summary.checkpoint.display());
    println!(
        "metrics:    {}",
        summary.out_dir.join(metrics::METRICS_FILE).display()
    );
    println!("output in   {}", summary.out_dir.display());
    if summary.config.final_eval {
        final_eval(&summary)?;
    }
    Ok(())
}

/// DINO's resume: a command whose `--out` already holds a checkpoint
/// continues that run from its newest one, with the command's settings
/// (those that differ from the checkpoint's are listed). A changed model is
/// refused: that is a new run, which `--no-resume` or another `--out` starts.
/// `say`: print the notes (rank 0 of a data-parallel run).
fn rerun_of(cfg: &sere_host::config::TrainConfig, say: bool) -> Result<Option<PathBuf>, SereError> {
    let dir = cfg.out_dir();
    if !dir.is_dir() {
        return Ok(None);
    }
    let Some(path) = checkpoint::latest_in(&dir)
        .map_err(|e| SereError::io("cannot list checkpoints in", &dir, e))?
    else {
        return Ok(None);
    };
    let stored = Checkpoint::load(&path)?.training_config()?;
    let model = stored.architecture_changes(cfg);
    if !model.is_empty() {
        return Err(SereError::Other(format!(
            "{} holds a run of another model ({}, checkpoint -> this command); rerun its own command to continue it, or start a new run with --no-resume (the old one is moved into {}/previous-run/) or another --out",
            dir.display(),
            model.join(", "),
            dir.display()
        )));
    }
    if !say {
        return Ok(Some(path)); // rank 0 says it
    }
    eprintln!(
        "note: {} holds a run: continuing it from {} (--no-resume starts a new one there)",
        dir.display(),
        path.display()
    );
    let changed = stored.setting_changes(cfg);
    if !changed.is_empty() {
        eprintln!(
            "note: settings taken from this command that differ from the checkpoint's: {}",
            changed.join(", ")
        );
    }
    Ok(Some(path))
}

/// A rerun of a run that already reached the end of its schedule: says so
/// and exits 0, after the final evaluation if the run has none yet (it
/// stopped between its last checkpoint and its evaluation).
fn finished_already(summary: &train::TrainSummary) -> Result<(), SereError> {
    println!(
        "the run in {} is finished: {} is at step {} of {}; nothing to train (raise --epochs or --steps to train further, or start a new run with --no-resume or another --out)",
        summary.out_dir.display(),
        summary.checkpoint.display(),
        summary.steps,
        summary.steps
    );
    let evaluated = summary.out_dir.join(report::EVAL_FILE).exists();
    if summary.config.final_eval && !evaluated {
        final_eval(summary)?;
    }
    Ok(())
}

/// `sere train --print-config`: the resolved, validated configuration of a
/// new run, each value with its source; nothing is trained or written.
fn print_config(args: &TrainArgs) -> Result<(), SereError> {
    if args.resume.is_some() {
        return Err(SereError::Other(
            "--print-config shows the configuration of a new run; a resumed run keeps its \
             checkpoint's (see config.toml in its folder), so drop --resume"
                .into(),
        ));
    }
    let (cfg, prov) = args.merged_with_provenance()?;
    cfg.validate()?;
    if let Some(r) = args.recipe {
        println!("# recipe {}: {}", r.name(), r.source());
        for what in r.unmatched() {
            println!("# not reproduced: {what}");
        }
    }
    print!("{}", prov.annotate(&cfg));
    Ok(())
}

/// The end-of-training evaluation of the run's last checkpoint, on the
/// device it trained on: printed, and written to `eval.json` in the run
/// folder.
fn final_eval(summary: &train::TrainSummary) -> Result<(), SereError> {
    let path = &summary.checkpoint;
    let ck = Checkpoint::load(path)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    eprintln!("evaluating {name} on the test split ...");
    let report = match summary.config.device {
        Device::Cpu => report::final_eval(Cpu, &ck, &name)?,
        Device::Cuda => report::final_eval(open_cuda()?, &ck, &name)?,
    };
    match report {
        Some(r) => {
            for line in r.lines() {
                println!("{line}");
            }
            r.write(&summary.out_dir)?;
            println!(
                "evaluation: {}",
                summary.out_dir.join(report::EVAL_FILE).display()
            );
        }
        None => println!(
            "evaluation skipped: {} has no test split (evaluate with `sere eval knn --data ...`)",
            summary.config.data
        ),
    }
    Ok(())
}

fn run_bench(args: &BenchStepArgs) -> Result<(), SereError> {
    if args.steps == 0 {
        return Err(SereError::Other(
            "--steps 0 times nothing; give at least 1 timed step (default 10)".into(),
        ));
    }
    let cfg = args.to_config()?;
    let r = train::bench::bench_step(&cfg, args.steps, args.warmup)?;
    println!(
        "{}",
        serde_json::to_string(&r).map_err(|e| SereError::Other(e.to_string()))?
    );
    Ok(())
}

/// The data an evaluation runs on: `--data`, else the data the checkpoint
/// was trained on (its stored config), checked to fit in memory.
fn eval_data(given: Option<&str>, ck: &Checkpoint) -> Result<String, SereError> {
    let data = match given {
        Some(d) => d.to_string(),
        // A bare timm backbone does not say what it was trained on.
        None if sere_host::import::is_backbone(ck)
            && ck.meta(export::meta::TRAIN_CONFIG).is_none() =>
        {
            return Err(SereError::Other(
                "the backbone file does not say which data it was trained on; pass --data".into(),
            ))
        }
        None if sere_host::import::is_backbone(ck) => sere_host::import::backbone_config(ck)?.data,
        None => ck.training_config()?.data,
    };
    train::check_data_memory(&data)?;
    Ok(data)
}

fn run_knn(args: &KnnArgs) -> Result<(), SereError> {
    for &k in &args.k {
        knn::check_params(k, args.temperature)?;
    }
    if let Some(file) = &args.load_features {
        let dump = FeatureDump::load(file)?;
        eprintln!(
            "scoring the {} features saved in {} ({} training, {} test, width {})",
            dump.features,
            file.display(),
            dump.train_labels.len(),
            dump.test_labels.len(),
            dump.dim()
        );
        return print_knn_scores(args, &dump);
    }
    if let Some(out) = &args.dump_features {
        // Before the extraction, not after it: nothing is replaced.
        error::refuse_existing("--dump-features", out)?;
    }
    let given = args
        .checkpoint
        .as_deref()
        .expect("clap requires --checkpoint without --load-features");
    let path = checkpoint_in(given)?;
    let ck = Checkpoint::load(&path)?;
    let data = eval_data(args.data.as_deref(), &ck)?;
    // The initialisation is the network of step 0, whatever the file's step.
    let step = if args.random_init {
        "0"
    } else {
        ck.meta(checkpoint::meta::STEP).unwrap_or("")
    };
    let source = (path.display().to_string(), step.to_string());
    on_device!(args.device, &ck, args.network, args.random_init, emb => knn_on(&emb, args, &data, &source))
}

fn knn_on<B: Backend>(
    emb: &Embedder<B>,
    args: &KnnArgs,
    data: &str,
    (source, step): &(String, String),
) -> Result<(), SereError> {
    train::set_threads(args.threads.or(emb.config().threads));
    let spec_str = data;
    let data = DataSpec::parse(data)
        .and_then(|s| s.open())
        .map_err(SereError::data)?;
    let test = data.test_split().map_err(SereError::data)?;
    let batch = args.batch.unwrap_or(emb.config().batch).max(1);
    let spec = args.features;
    let name = feature_name(spec, args.network, args.random_init);
    eprintln!(
        "extracting {name} features of {} training and {} test images of {source} (step {step}) ...",
        data.train.len(),
        test.len()
    );
    let (train_f, train_l) = emb.embed_reporting(&data.train, batch, spec, "train")?;
    let (test_f, test_l) = emb.embed_reporting(test, batch, spec, "test")?;
    let dump = FeatureDump {
        train_features: train_f,
        train_labels: train_l,
        test_features: test_f,
        test_labels: test_l,
        num_classes: data.num_classes(),
        features: name,
        provenance: vec![
            ("source".into(), source.clone()),
            ("step".into(), step.clone()),
            ("data".into(), spec_str.to_string()),
        ],
    };
    if let Some(out) = &args.dump_features {
        dump.save(out)?;
        eprintln!("features saved to {}", out.display());
    }
    print_knn_scores(args, &dump)?;
    if args.pixels {
        let ((tr, trl), (te, tel)) =
            features::pixel_baseline(&data.train, test, emb.config().img, batch)?;
        let scores = knn::weighted_knn(
            tr.view(),
            &trl,
            te.view(),
            &tel,
            &args.k,
            args.temperature as f32,
            data.num_classes(),
        )?;
        for s in &scores {
            print_knn("pixels", args.temperature, (trl.len(), tel.len()), s);
        }
    }
    Ok(())
}

/// The k-NN lines of features extracted now or loaded from a dump.
fn print_knn_scores(args: &KnnArgs, d: &FeatureDump) -> Result<(), SereError> {
    let scores = knn::weighted_knn(
        d.train_features.view(),
        &d.train_labels,
        d.test_features.view(),
        &d.test_labels,
        &args.k,
        args.temperature as f32,
        d.num_classes,
    )?;
    let sizes = (d.train_labels.len(), d.test_labels.len());
    for s in &scores {
        print_knn_from(&d.features, args.temperature, sizes, s, &d.provenance);
    }
    Ok(())
}

/// The features' name in the output lines: `teacher_cls...`, or
/// `student_cls...` when the student is evaluated.
fn feature_name(spec: features::FeatureSpec, network: Network, random_init: bool) -> String {
    let source = if random_init { "init" } else { network.name() };
    spec.name().replacen("teacher", source, 1)
}

/// One JSON line per k-NN evaluation (one per `k`).
fn print_knn(features: &str, temperature: f64, sizes: (usize, usize), s: &knn::KnnScore) {
    print_knn_from(features, temperature, sizes, s, &[]);
}

/// [`print_knn`] with the checkpoint and step the features came from
/// (`provenance`: the dump's `source` and `step`) in the JSON line.
fn print_knn_from(
    features: &str,
    temperature: f64,
    (train, test): (usize, usize),
    s: &knn::KnnScore,
    provenance: &[(String, String)],
) {
    let mut line = serde_json::json!({
        "metric": "knn_top1",
        "features": features,
        "k": s.k,
        "temperature": temperature,
        "train": train,
        "test": test,
        "top1": (s.top1 as f64 * 1e4).round() / 1e4,
        "top5": (s.top5 as f64 * 1e4).round() / 1e4,
    });
    for (key, value) in provenance {
        let value = match key.as_str() {
            "source" => serde_json::Value::from(value.as_str()),
            "step" => value
                .parse::<u64>()
                .map_or(serde_json::Value::Null, Into::into),
            _ => continue,
        };
        let key = if key == "source" {
            "checkpoint"
        } else {
            key.as_str()
        };
        line[key] = value;
    }
    println!("{line}");
    eprintln!(
        "weighted {}-NN (T = {temperature}) on {features}: top-1 {:.2}%, top-5 {:.2}% on {test} \
         test images ({train} training images)",
        s.k,
        100.0 * s.top1,
        100.0 * s.top5
    );
}

fn run_linear(args: &LinearArgs) -> Result<(), SereError> {
    if let Some(out) = &args.save_probe {
        // Before any work, not after it: nothing is replaced.
        error::refuse_existing("--save-probe", out)?;
    }
    let path = checkpoint_in(&args.checkpoint)?;
    let ck = Checkpoint::load(&path)?;
    let data = eval_data(args.data.as_deref(), &ck)?;
    on_device!(args.device, &ck, args.network, args.random_init, emb => linear_on(&emb, args, &data))
}

/// The linear probe on `emb`'s features; the probe itself is fitted on the
/// CPU (L-BFGS on frozen features), the features come from the device.
fn linear_on<B: Backend>(
    emb: &Embedder<B>,
    args: &LinearArgs,
    data: &str,
) -> Result<(), SereError> {
    let cfg = args.probe_config();
    train::set_threads(args.threads.or(emb.config().threads));
    let data_name = data;
    let data = DataSpec::parse(data)
        .and_then(|s| s.open())
        .map_err(SereError::data)?;
    let test = data.test_split().map_err(SereError::data)?;
    let batch = args.batch.unwrap_or(emb.config().batch).max(1);
    let classes = data.num_classes();
    let spec = args.features;
    if let Some(file) = &args.load_probe {
        return score_saved_probe(emb, file, test, batch, args);
    }
    if args.augment {
        return linear_augmented(emb, args, &data, batch, data_name);
    }
    let name = feature_name(spec, args.network, args.random_init);
    let started = Instant::now();
    let (mut train_f, train_l) = emb.embed(&data.train, batch, spec)?;
    let (mut test_f, test_l) = emb.embed(test, batch, spec)?;
    let embed_s = started.elapsed().as_secs_f64();
    if args.knn {
        // Before the probe, which standardises the features in place.
        let (k, t) = (20, 0.07);
        let scores = knn::weighted_knn(
            train_f.view(),
            &train_l,
            test_f.view(),
            &test_l,
            &[k],
            t as f32,
            classes,
        )?;
        print_knn(&name, t, (train_l.len(), test_l.len()), &scores[0]);
    }
    let started = Instant::now();
    let r = linear::evaluate(
        train_f.view_mut(),
        &train_l,
        test_f.view_mut(),
        &test_l,
        classes,
        &cfg,
    )?;
    print_linear(
        &name,
        &cfg,
        &r,
        (train_l.len(), test_l.len()),
        embed_s,
        started,
    );
    save_probe(args, &r, &name, &cfg, data_name)?;
    if args.pixels {
        let started = Instant::now();
        let ((mut tr, trl), (mut te, tel)) =
            features::pixel_baseline(&data.train, test, emb.config().img, batch)?;
        let embed_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let r = linear::evaluate(tr.view_mut(), &trl, te.view_mut(), &tel, classes, &cfg)?;
        print_linear("pixels", &cfg, &r, (trl.len(), tel.len()), embed_s, started);
    }
    Ok(())
}

/// `eval linear --augment`: eval_linear.py's probe (SGD on augmented
/// views), scored on the plain test views; saved as any probe.
fn linear_augmented<B: Backend>(
    emb: &Embedder<B>,
    args: &LinearArgs,
    data: &sere_host::data::Dataset,
    batch: usize,
    data_name: &str,
) -> Result<(), SereError> {
    let cfg = args.probe_config();
    let spec = args.features;
    let test = data.test_split().map_err(SereError::data)?;
    let classes = data.num_classes();
    let name = feature_name(spec, args.network, args.random_init);
    eprintln!(
        "linear probe on augmented views of {} training images, {} epochs ...",
        data.train.len(),
        cfg.epochs
    );
    let started = Instant::now();
    let fit = sere_host::eval::linear_aug::fit_augmented(emb, &data.train, spec, classes, &cfg)?;
    let (train_f, train_l) = emb.embed(&data.train, batch, spec)?;
    let (test_f, test_l) = emb.embed(test, batch, spec)?;
    let d = spec.dim(emb.dim());
    let r = linear::ProbeReport {
        top1: fit.probe.accuracy(test_f.view(), &test_l)?,
        train_top1: fit.probe.accuracy(train_f.view(), &train_l)?,
        fit,
        mean: ndarray::Array1::zeros(d),
        inv_std: ndarray::Array1::ones(d),
    };
    let sizes = (train_l.len(), test_l.len());
    print_linear(&format!("{name}_augmented"), &cfg, &r, sizes, 0.0, started);
    save_probe(args, &r, &name, &cfg, data_name)
}

/// `--save-probe`: the fitted probe with its features' standardisation.
fn save_probe(
    args: &LinearArgs,
    r: &linear::ProbeReport,
    features: &str,
    cfg: &linear::ProbeConfig,
    data_name: &str,
) -> Result<(), SereError> {
    let Some(out) = &args.save_probe else {
        return Ok(());
    };
    let saved = linear::SavedProbe {
        probe: r.fit.probe.clone(),
        mean: r.mean.clone(),
        inv_std: r.inv_std.clone(),
        features: features.to_string(),
    };
    saved.save(
        out,
        &[
            ("top1", format!("{:.4}", r.top1)),
            ("train_top1", format!("{:.4}", r.train_top1)),
            ("optimizer", cfg.optimizer.name().to_string()),
            ("augmented", args.augment.to_string()),
            ("data", data_name.to_string()),
        ],
    )?;
    eprintln!("probe saved to {}", out.display());
    Ok(())
}

/// `eval linear --load-probe`: a saved probe scored on the test split's
/// features (which must be the ones it was fitted on).
fn score_saved_probe<B: Backend>(
    emb: &Embedder<B>,
    file: &Path,
    test: &sere_host::data::Split,
    batch: usize,
    args: &LinearArgs,
) -> Result<(), SereError> {
    let saved = linear::SavedProbe::load(file)?;
    let spec = args.features;
    let name = feature_name(spec, args.network, args.random_init);
    if saved.probe.dim != spec.dim(emb.dim()) {
        return Err(SereError::Other(format!(
            "the probe in {} takes {} features ({}), these are {} ({name}); evaluate the \
             features it was fitted on (--last-blocks, --avgpool, the same model)",
            file.display(),
            saved.probe.dim,
            saved.features,
            spec.dim(emb.dim())
        )));
    }
    let (mut x, y) = emb.embed_reporting(test, batch, spec, "test")?;
    let top1 = saved.accuracy(x.view_mut(), &y)?;
    println!(
        "{{\"metric\":\"linear_top1\",\"features\":\"{name}\",\"probe\":{},\"test\":{},\"top1\":{top1:.4}}}",
        serde_json::Value::from(file.display().to_string()),
        y.len()
    );
    eprintln!(
        "saved linear probe {} ({}) on {name}: top-1 {:.2}% on {} test images",
        file.display(),
        saved.features,
        100.0 * top1,
        y.len()
    );
    Ok(())
}

/// One JSON line per linear evaluation, as `eval knn` prints.
fn print_linear(
    features: &str,
    cfg: &linear::ProbeConfig,
    r: &linear::ProbeReport,
    (train, test): (usize, usize),
    embed_s: f64,
    fit_started: Instant,
) {
    println!(
        "{{\"metric\":\"linear_top1\",\"features\":\"{features}\",\"optimizer\":\"{}\",\"weight_decay\":{},\"epochs\":{},\"iterations\":{},\"passes\":{},\"train\":{train},\"test\":{test},\"loss\":{:.6},\"train_top1\":{:.4},\"top1\":{:.4},\"features_s\":{:.2},\"fit_s\":{:.2}}}",
        cfg.optimizer.name(),
        cfg.weight_decay,
        cfg.epochs,
        r.fit.iterations,
        r.fit.passes,
        r.fit.loss,
        r.train_top1,
        r.top1,
        embed_s,
        fit_started.elapsed().as_secs_f64(),
    );
    // The same, for a person (stderr: stdout stays one JSON line each).
    eprintln!(
        "linear probe ({}, weight decay {}) on {features}: top-1 {:.2}% on {test} test images \
         (train {:.2}%, {train} images)",
        cfg.optimizer.name(),
        cfg.weight_decay,
        100.0 * r.top1,
        100.0 * r.train_top1
    );
}

fn run_visualize(args: &VisualizeArgs) -> Result<(), SereError> {
    if args.image.is_empty() {
        train::check_data_memory(&args.data)?;
    }
    let path = checkpoint_in(&args.checkpoint)?;
    let ck = Checkpoint::load(&path)?;
    on_device!(args.device, &ck, emb => visualize_on(&emb, args))
}

fn visualize_on<B: Backend>(emb: &Embedder<B>, args: &VisualizeArgs) -> Result<(), SereError> {
    train::set_threads(args.threads.or(emb.config().threads));
    for file in visualize::run(emb, args)? {
        println!("{}", file.display());
    }
    Ok(())
}

/// `sere plot`: prints the file written.
fn run_plot(args: &PlotArgs) -> Result<(), SereError> {
    println!("{}", plot::run(args)?.display());
    Ok(())
}

fn run_export(args: &ExportArgs) -> Result<(), SereError> {
    let path = checkpoint_in(&args.checkpoint)?;
    // Exporting over the source would replace a training checkpoint (with
    // its optimizer state) by a backbone: refuse before reading anything.
    if let (Ok(a), Ok(b)) = (path.canonicalize(), args.out.canonicalize()) {
        if a == b {
            return Err(SereError::Other(format!(
                "--out {} is the checkpoint being exported; choose another file name",
                args.out.display()
            )));
        }
    }
    export::check_target(&args.out, args.force)?;
    let ck = Checkpoint::load(&path)?;
    let out = export::backbone(&ck, args.network)?;
    out.save_atomic(&args.out)?;
    let params: usize = out.tensors.values().map(|(_, d)| d.len()).sum();
    let step = out
        .meta(checkpoint::meta::STEP)
        .and_then(|s| s.parse::<u64>().ok());
    let line = serde_json::json!({
        "exported": args.out.display().to_string(),
        "from": path.display().to_string(),
        "network": args.network.name(),
        "step": step,
        "tensors": out.tensors.len(),
        "parameters": params,
    });
    println!("{line}");
    Ok(())
}
