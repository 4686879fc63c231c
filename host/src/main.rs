//! The `sere` command: train, evaluate and benchmark SERE on CPU.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use sere_host::checkpoint::{self, Checkpoint};
use sere_host::cli::{BenchStepArgs, Cli, Command, EvalCommand, KnnArgs, Resume, TrainArgs};
use sere_host::data::DataSpec;
use sere_host::error::{report, SereError};
use sere_host::eval::{features, features::Embedder, knn};
use sere_host::train;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

fn run(cmd: Command) -> Result<(), SereError> {
    cmd.check_implemented()?;
    match cmd {
        Command::Train(args) => run_train(&args),
        Command::BenchStep(args) => run_bench(&args),
        Command::Eval(EvalCommand::Knn(args)) => run_knn(&args),
        _ => unreachable!("check_implemented rejects the rest"),
    }
}

/// A checkpoint file from a file or a directory (its newest checkpoint).
fn checkpoint_in(path: &Path) -> Result<PathBuf, SereError> {
    if path.is_dir() {
        checkpoint::latest_in(path)
            .map_err(|e| SereError::io("cannot list checkpoints in", path, e))?
            .ok_or_else(|| {
                SereError::Other(format!(
                    "no checkpoint-*.safetensors in {}; train first or pass a checkpoint file",
                    path.display()
                ))
            })
    } else {
        Ok(path.to_path_buf())
    }
}

fn run_train(args: &TrainArgs) -> Result<(), SereError> {
    let mut cfg = args.to_config()?;
    let resume = match args.resume() {
        None => None,
        Some(Resume::LatestInOut) => Some(checkpoint_in(&cfg.out_dir())?),
        Some(Resume::Path(p)) => Some(checkpoint_in(&p)?),
    };
    if let Some(path) = &resume {
        // The run continues with its own settings; only the flags given now
        // (e.g. a longer --steps, another --out) change them.
        let ck = Checkpoint::load(path)?;
        cfg = ck.config()?;
        for s in &args.set {
            cfg.set(s)?;
        }
        args.apply(&mut cfg);
        if cfg.out.is_none() {
            cfg.out = path.parent().map(Path::to_path_buf);
        }
    } else if cfg.out.is_none() {
        cfg.out = Some(cfg.out_dir());
    }
    let summary = train::train(cfg, resume)?;
    println!(
        "trained {} steps; final loss {:.4} (dino {:.4}, spatial {:.4}, channel {:.4})",
        summary.steps,
        summary.last.loss,
        summary.last.loss_dino,
        summary.last.loss_spatial,
        summary.last.loss_channel
    );
    println!("checkpoint: {}", summary.checkpoint.display());
    println!(
        "metrics:    {}",
        summary.out_dir.join("metrics.jsonl").display()
    );
    println!("output in   {}", summary.out_dir.display());
    Ok(())
}

fn run_bench(args: &BenchStepArgs) -> Result<(), SereError> {
    let cfg = args.to_config()?;
    let r = train::bench::bench_step(&cfg, args.steps, args.warmup)?;
    println!(
        "{}",
        serde_json::to_string(&r).map_err(|e| SereError::Other(e.to_string()))?
    );
    Ok(())
}

fn run_knn(args: &KnnArgs) -> Result<(), SereError> {
    let path = checkpoint_in(&args.checkpoint)?;
    let ck = Checkpoint::load(&path)?;
    let emb = Embedder::from_checkpoint(&ck)?;
    train::set_threads(emb.config().threads);
    let data = DataSpec::parse(&args.data)
        .and_then(|s| s.open())
        .map_err(SereError::data)?;
    let test = data.test_split().map_err(SereError::data)?;
    let batch = args.batch.unwrap_or(emb.config().batch).max(1);
    let (train_f, train_l) = emb.embed(&data.train, batch)?;
    let (test_f, test_l) = emb.embed(test, batch)?;
    let acc = knn::weighted_knn_accuracy(
        &train_f,
        &train_l,
        &test_f,
        &test_l,
        emb.dim(),
        args.k,
        args.temperature as f32,
        data.num_classes(),
    );
    println!(
        "{{\"metric\":\"knn_top1\",\"features\":\"teacher_cls\",\"k\":{},\"temperature\":{},\"train\":{},\"test\":{},\"top1\":{:.4}}}",
        args.k,
        args.temperature,
        train_l.len(),
        test_l.len(),
        acc
    );
    if args.pixels {
        let img = emb.config().img;
        let (mut tr, trl) = features::pixel_features(&data.train, img, batch)?;
        let (mut te, tel) = features::pixel_features(test, img, batch)?;
        let d = 3 * img * img;
        let mean = features::column_mean(&tr, d);
        features::centre_and_normalize(&mut tr, &mean);
        features::centre_and_normalize(&mut te, &mean);
        let acc = knn::weighted_knn_accuracy(
            &tr,
            &trl,
            &te,
            &tel,
            d,
            args.k,
            args.temperature as f32,
            data.num_classes(),
        );
        println!(
            "{{\"metric\":\"knn_top1\",\"features\":\"pixels\",\"k\":{},\"temperature\":{},\"train\":{},\"test\":{},\"top1\":{:.4}}}",
            args.k, args.temperature, trl.len(), tel.len(), acc
        );
    }
    Ok(())
}
