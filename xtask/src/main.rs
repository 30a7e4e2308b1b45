//! `cargo xtask …`: runs the SimTrans pipeline end to end or one stage at a time.

use anyhow::{bail, Result};
use clap::Parser;
use simtrans_core::Stage;
use std::process::ExitCode;
use tracing_subscriber::{fmt, prelude::*, EnvFilter};
use xtask::cli::{Cli, Command, Common};
use xtask::pipeline::{seeds, Pipeline};
use xtask::stages::RealStages;

fn init_logging(common: Option<&Common>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = fmt::layer().with_writer(std::io::stderr).with_target(false);
    let file = common.and_then(|c| {
        let dir = c.runs_dir.join(&c.run).join("logs");
        std::fs::create_dir_all(&dir).ok()?;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("xtask.log"))
            .ok()?;
        Some(
            fmt::layer()
                .with_writer(std::sync::Mutex::new(f))
                .with_ansi(false),
        )
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(file)
        .init();
}

fn pipeline<'a>(common: &Common, runner: &'a RealStages) -> Result<Pipeline<'a>> {
    let config = common.resolve()?;
    let device = simtrans_core::device::parse(&config.run.device)?;
    let store = common.store()?;
    let cleaned = store.clean_temporaries()?;
    if cleaned > 0 {
        tracing::info!("removed {cleaned} leftover temporary file(s) of an interrupted write");
    }
    Ok(Pipeline {
        store,
        config,
        device,
        runner,
    })
}

fn run(cli: Cli) -> Result<()> {
    let runner = RealStages;
    match cli.command {
        Command::Reproduce(common) => {
            let p = pipeline(&common, &runner)?;
            let seeds = seeds(&p.config);
            p.reproduce(&seeds, &common.forced()?)?;
            let summary = simtrans_eval::stage::write_report(&p.store, &p.config, &seeds)?;
            print_headline(&summary, &p.store);
            Ok(())
        }
        Command::Stage { name, common } => {
            let stage: Stage = name.parse()?;
            let p = pipeline(&common, &runner)?;
            let force = common.forced()?.contains(&stage);
            p.stage(stage, &seeds(&p.config), force)?;
            Ok(())
        }
        Command::Eval(common) => {
            let p = pipeline(&common, &runner)?;
            let seeds = seeds(&p.config);
            p.stage(Stage::Eval, &seeds, common.forced()?.contains(&Stage::Eval))?;
            let summary = simtrans_eval::stage::write_report(&p.store, &p.config, &seeds)?;
            print_headline(&summary, &p.store);
            Ok(())
        }
        Command::Report(common) => {
            let p = pipeline(&common, &runner)?;
            let summary =
                simtrans_eval::stage::write_report(&p.store, &p.config, &seeds(&p.config))?;
            print_headline(&summary, &p.store);
            Ok(())
        }
        Command::Bench { what, common } => bench(&what, &common),
        Command::Fetch(common) => {
            let config = common.resolve()?;
            let path = simtrans_backbone::fetch(config.backbone.arch)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Config(common) => {
            print!("{}", common.resolve()?.to_toml());
            Ok(())
        }
        Command::Ci => ci(),
    }
}

/// Throughput benchmarks: prints each figure and writes them to `runs/<name>/bench-<what>.json`.
fn bench(what: &str, common: &Common) -> Result<()> {
    let config = common.resolve()?;
    let device = simtrans_core::device::parse(&config.run.device)?;
    let all = what == "all";
    let mut out = serde_json::Map::new();
    if all || what == "data" {
        // Decoding and augmentation of JPEG files at the paper's 224 px.
        let mut cfg = config.data.clone();
        cfg.image_size = 224;
        let r = simtrans_data::bench(&cfg, 64, 32, 2)?;
        println!(
            "data: {:.1} decoded+augmented images/s at 224 px ({} threads)",
            r.images_per_second, r.threads
        );
        out.insert("data".into(), serde_json::to_value(&r)?);
    }
    if all || what == "backbone" {
        let reports = simtrans_backbone::bench_default(&device, 5)?;
        for r in &reports {
            println!(
                "backbone: {} {} px batch {}: {:.1} training images/s on {}",
                r.arch, r.image_size, r.batch_size, r.images_per_second, r.device
            );
        }
        out.insert("backbone".into(), serde_json::to_value(&reports)?);
    }
    if all || what == "denoise" {
        let r = simtrans_denoise::bench::bench(&config, &device, 300)?;
        println!(
            "denoise: {} {} px: {:.1} feature images/s, {:.0} head pairs/s ({} images, {} pairs) on {}",
            r.arch, r.image_size, r.feature_images_per_second, r.pairs_per_second, r.images, r.images * r.images, r.device
        );
        out.insert("denoise".into(), serde_json::to_value(&r)?);
    }
    if what == "simnet" {
        bail!(simtrans_core::CoreError::NotImplemented(
            "bench simnet".into()
        ));
    }

    if out.is_empty() {
        bail!(
            "unknown benchmark `{what}`; the benchmarks are: data, backbone, simnet, denoise, all"
        );
    }
    let store = common.store()?;
    let path = store.root.join(format!("bench-{what}.json"));
    simtrans_core::artifact::write_atomic(&path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    println!("written to {}", path.display());
    Ok(())
}

/// The two accuracies and where the report is.
fn print_headline(summary: &serde_json::Value, store: &simtrans_core::RunStore) {
    let pct = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("—".to_string(), |x| format!("{:.2} %", 100.0 * x))
    };
    println!(
        "novel-class top-1, final epoch, mean over seeds {}:",
        summary["seeds"]
    );
    println!(
        "  baseline (naive, web images unweighted): {}",
        pct(&summary["baseline_top1"])
    );
    println!(
        "  SimTrans (full):                          {}",
        pct(&summary["novel_top1"])
    );
    if !summary["gap_closed"].is_null() {
        println!(
            "  gap closed towards the clean oracle:      {:.2}",
            summary["gap_closed"].as_f64().unwrap_or(0.0)
        );
    }
    println!("report: {}", store.root.join("report.md").display());
}

/// What CI runs, in order; stops at the first failure.
fn ci() -> Result<()> {
    let steps: [&[&str]; 3] = [
        &["fmt", "--all", "--", "--check"],
        &[
            "clippy",
            "--workspace",
            "--release",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &["test", "--workspace", "--release"],
    ];
    for args in steps {
        tracing::info!("cargo {}", args.join(" "));
        let status = std::process::Command::new(env!("CARGO"))
            .args(args)
            .status()?;
        if !status.success() {
            bail!("`cargo {}` failed", args.join(" "));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    if std::env::args_os().len() <= 1 {
        // No subcommand: help on stdout, success (clap's own default would exit 2).
        use clap::CommandFactory;
        let _ = Cli::command().print_help();
        println!();
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    let common = match &cli.command {
        Command::Reproduce(c) | Command::Eval(c) | Command::Report(c) | Command::Fetch(c) => {
            Some(c)
        }
        Command::Stage { common, .. } | Command::Bench { common, .. } => Some(common),
        Command::Config(_) | Command::Ci => None,
    };
    init_logging(common);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
