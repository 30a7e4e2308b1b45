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

/// The configured device, with the configured GPU precision and `[gpu]` settings installed for
/// the process.
fn device_of(config: &simtrans_core::Config) -> Result<candle_core::Device> {
    use simtrans_core::device::{set_precision, Precision};
    set_precision(Precision::parse(&config.run.precision)?);
    simtrans_ops::gpu::configure(&config.gpu);
    Ok(simtrans_ops::gpu::open(&config.run.device)?)
}

fn pipeline<'a>(common: &Common, runner: &'a RealStages) -> Result<Pipeline<'a>> {
    let config = common.resolve()?;
    let device = device_of(&config)?;
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

/// Every stale stage of every seed, then eval.json and the report; prints the headline.
fn reproduce<'a>(
    common: &Common,
    runner: &'a RealStages,
) -> Result<(Pipeline<'a>, serde_json::Value)> {
    let p = pipeline(common, runner)?;
    let seeds = seeds(&p.config);
    p.reproduce(&seeds, &common.forced()?)?;
    let summary = simtrans_eval::stage::write_report(&p.store, &p.config, &seeds)?;
    print_headline(&summary, &p.store);
    Ok((p, summary))
}

fn run(cli: Cli) -> Result<()> {
    let runner = RealStages;
    match cli.command {
        Command::Reproduce(common) => reproduce(&common, &runner).map(|_| ()),
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
        Command::Import {
            stage,
            file,
            disc,
            variant,
            common,
        } => {
            let p = pipeline(&common, &runner)?;
            let req = xtask::import::Request {
                stage: stage.parse()?,
                file,
                disc,
                variant,
            };
            let path = xtask::import::import(&p, &req)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Bench {
            what,
            photos,
            common,
        } => bench(&what, photos.as_deref(), &common),
        Command::Smoke(common) => {
            let (common, photos) = xtask::smoke::prepare(&common)?;
            let start = std::time::Instant::now();
            let (p, summary) = reproduce(&common, &runner)?;
            // Each stage's time, in pipeline order.
            let stages: Vec<String> = Stage::ALL
                .iter()
                .filter_map(|stage| {
                    let s = summary["wall_seconds"][stage.name()].as_f64()?;
                    Some(format!("{} {s:.1} s", stage.name()))
                })
                .collect();
            println!(
                "smoke: {} at {} px on {} ({}), one epoch per stage on {photos} synthetic photographs: {:.1} s (each stage when built: {})",
                simtrans_backbone::resnet::arch_name(p.config.backbone.arch),
                p.config.data.image_size,
                p.config.run.device,
                p.config.run.precision,
                start.elapsed().as_secs_f64(),
                stages.join(", ")
            );
            if let Some(bytes) = simtrans_ops::gpu::memory_in_use(&p.device)? {
                // With the memory pool keeping freed memory: the run's high-water mark.
                println!(
                    "smoke: GPU memory in use at the end: {:.2} GiB",
                    bytes as f64 / (1u64 << 30) as f64
                );
            }
            Ok(())
        }
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
fn bench(what: &str, photos: Option<&std::path::Path>, common: &Common) -> Result<()> {
    let config = common.resolve()?;
    let device = device_of(&config)?;
    let all = what == "all";
    let mut out = serde_json::Map::new();
    if all || what == "data" {
        // Decoding and augmentation of JPEG files at the paper's 224 px: the workload of
        // ../shared/anchors/torchvision_data.py (256 files, batches of 64, three passes).
        let mut cfg = config.data.clone();
        cfg.image_size = 224;
        let r = simtrans_data::bench(&cfg, 256, 64, 3, photos)?;
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
        let r = simtrans_denoise::bench::bench(&config, &device, 300, 3)?;
        println!(
            "denoise: {} {} px: {:.1} feature images/s, {:.0} head pairs/s ({} images, {} pairs) on {}",
            r.arch, r.image_size, r.feature_images_per_second, r.pairs_per_second, r.images, r.images * r.images, r.device
        );
        out.insert("denoise".into(), serde_json::to_value(&r)?);
    }
    if all || what == "classifier" {
        // Steps 3a/3b of the configured networks: classification, and graph (with the SimNet).
        let reports = simtrans_classifier::bench::bench(&config, &device, 3)?;
        for r in &reports {
            println!(
                "classifier: {} step, {} {} px batch {}: {:.1} training images/s on {}",
                r.step, r.arch, r.image_size, r.batch_size, r.images_per_second, r.device
            );
        }
        out.insert("classifier".into(), serde_json::to_value(&reports)?);
    }
    if all || what == "simnet" {
        // The configured network; 8 + 8 images (128 pairs) keeps the demo figure quick on a CPU.
        let b = &config.backbone;
        let head = simtrans_simnet::head::HeadKind::from_config(config.simnet.head)?;
        let images = if device.is_cpu() { 16 } else { 100 };
        let r = simtrans_simnet::bench::bench(
            &device,
            b.arch,
            b.small_width,
            config.data.image_size,
            images,
            head,
            3,
        )?;
        println!(
            "simnet: {} {} px, {} images ({} pairs), head {}: {:.1} training images/s on {}",
            r.arch, r.image_size, r.images, r.pairs, r.head, r.images_per_second, r.device
        );
        out.insert("simnet".into(), serde_json::to_value(&r)?);
    }
    // Fixed workloads to run under a kernel profiler (`ncu --profile-from-start off`,
    // scripts/gpu-bench.sh): the table's rows of the same names, run once to warm up, then
    // once more inside the profiled range ([`simtrans_ops::gpu::profiled`]).
    let profiled = |work: &dyn Fn() -> Result<serde_json::Value>| -> Result<serde_json::Value> {
        work()?;
        simtrans_ops::gpu::profiled(&device, work)
    };
    if what == "profile" {
        // Three ResNet-50 training steps at 224 px, batch 64 (one untimed, one timed, one
        // timed by phase).
        let r = profiled(&|| {
            let r = simtrans_backbone::bench(
                &device,
                simtrans_backbone::Arch::Resnet50,
                0,
                224,
                64,
                1,
            )?;
            Ok(serde_json::to_value(r)?)
        })?;
        out.insert("profile".into(), r);
    }
    if what == "profile-simnet" {
        // Three SimNet steps of the table (100 images, 5000 pairs, head 4 and the
        // discriminator): one untimed, one timed, one timed by phase.
        let head = simtrans_simnet::head::HeadKind::from_config(4)?;
        let r = profiled(&|| {
            let r = simtrans_simnet::bench::bench(
                &device,
                simtrans_backbone::Arch::Resnet50,
                0,
                224,
                100,
                head,
                1,
            )?;
            Ok(serde_json::to_value(r)?)
        })?;
        out.insert("profile-simnet".into(), r);
    }
    if what == "profile-similarity" {
        // The similarity matrix of the table: the paper network's features of 300 images and
        // its head on their 90,000 pairs, twice (one untimed pass, one timed).
        let mut paper = simtrans_core::Config::preset(simtrans_core::config::Preset::Paper);
        paper.run.device = config.run.device.clone();
        let r = profiled(&|| {
            let r = simtrans_denoise::bench::bench(&paper, &device, 300, 1)?;
            Ok(serde_json::to_value(r)?)
        })?;
        out.insert("profile-similarity".into(), r);
    }
    if what == "table" || (all && device.is_cuda()) {
        let rows = gpu_table(&config, &device)?;
        out.insert("table".into(), serde_json::Value::Array(rows));
    }

    if out.is_empty() {
        bail!(
            "unknown benchmark `{what}`; the benchmarks are: data, backbone, classifier, simnet, denoise, table, \
             profile, profile-simnet, profile-similarity, all"
        );
    }
    let store = common.store()?;
    let path = store.root.join(format!("bench-{what}.json"));
    simtrans_core::artifact::write_atomic(&path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    println!("written to {}", path.display());
    Ok(())
}

/// The workloads of the GPU table in `BENCHMARKS.md` (issue #9), at the paper's size whatever
/// the preset: ResNet-50 training steps at 224 px in batches of 8, 64 and 128, one SimNet step
/// on 50 + 50 images (5000 pairs, head 4 and the discriminator), and the features and
/// similarity matrix of 300 images (step 2); between them, two more rows: the steps at batch 8
/// and 64 fed from JPEG files by step 0's loop. Prints one line per row.
fn gpu_table(
    config: &simtrans_core::Config,
    device: &candle_core::Device,
) -> Result<Vec<serde_json::Value>> {
    use simtrans_backbone::Arch;
    let precision = simtrans_core::device::precision().name();
    const GIB: f64 = (1u64 << 30) as f64;
    let mut rows = vec![];
    let mut row = |workload: String, ips: f64, detail: serde_json::Value| {
        // Where a step's time goes, for the rows that time their phases.
        let names: Vec<&str> = detail["phase_names"]
            .as_array()
            .map(|a| a.iter().filter_map(|n| n.as_str()).collect())
            .unwrap_or_default();
        let phases = match (detail.get("phase_seconds"), detail.get("issue_seconds")) {
            (Some(p), Some(i)) if !names.is_empty() => {
                format!(
                    " [{} s/step: {p}; issued by the host after: {i}]",
                    names.join(", ")
                )
            }
            _ => String::new(),
        };
        let memory = match detail["device_memory"].as_array().map(|m| m.as_slice()) {
            Some([a, b]) => format!(
                " [GPU memory in use: {:.2} GiB after warm-up, {:.2} GiB after the timed steps]",
                a.as_f64().unwrap_or(0.0) / GIB,
                b.as_f64().unwrap_or(0.0) / GIB
            ),
            _ => String::new(),
        };
        println!("table: {workload}: {ips:.1} images/s ({precision}){phases}{memory}");
        // With SIMTRANS_HOST_PROFILE=1: the host's calls of each phase, per step.
        if let Some(serde_json::Value::Array(phases)) = detail.get("host_calls") {
            for (name, calls) in names.iter().zip(phases) {
                let Some(calls) = calls.as_object().filter(|c| !c.is_empty()) else {
                    continue;
                };
                let parts: Vec<String> = calls
                    .iter()
                    .map(|(label, v)| {
                        let n = v[0].as_f64().unwrap_or(0.0);
                        let ms = 1e3 * v[1].as_f64().unwrap_or(0.0);
                        format!("{label} {n:.0}x {ms:.2} ms")
                    })
                    .collect();
                println!("table:   host, {name}: {}", parts.join(", "));
            }
        }
        rows.push(serde_json::json!({
            "workload": workload, "images_per_second": ips, "precision": precision, "detail": detail,
        }));
    };
    for (batch, steps) in [(8, 20), (64, 8), (128, 5)] {
        let r = simtrans_backbone::bench(device, Arch::Resnet50, 0, 224, batch, steps)?;
        row(
            format!("train step, batch {batch}"),
            r.images_per_second,
            serde_json::to_value(&r)?,
        );
    }
    // The same steps fed by step 0's own loop from JPEG files (decoded ahead on the host's
    // cores): the gap to the rows above is what the input pipeline costs. Twice the steps of
    // those rows, since the loop's first batch is decoded before any overlap (once per epoch
    // in a real run).
    let mut data = simtrans_core::Config::preset(simtrans_core::config::Preset::Paper).data;
    data.workers = config.data.workers;
    for (batch, steps) in [(8, 40), (64, 16)] {
        match simtrans_backbone::bench_files(device, Arch::Resnet50, &data, batch, steps) {
            Ok(r) => row(
                format!(
                    "train step from JPEG files, batch {batch} ({} decoding threads)",
                    r.decode_threads
                ),
                r.images_per_second,
                serde_json::to_value(&r)?,
            ),
            // Not yet run on a GPU: a failure here must not cost the rows after it.
            Err(e) => println!("table: train step from JPEG files, batch {batch}: failed: {e}"),
        }
    }
    let head = simtrans_simnet::head::HeadKind::from_config(4)?;
    let r = simtrans_simnet::bench::bench(device, Arch::Resnet50, 0, 224, 100, head, 5)?;
    row(
        format!(
            "SimNet step ({} images, {} pairs, head 4 + discriminator)",
            r.images, r.pairs
        ),
        r.images_per_second,
        serde_json::to_value(&r)?,
    );
    let mut paper = simtrans_core::Config::preset(simtrans_core::config::Preset::Paper);
    paper.run.device = config.run.device.clone();
    let r = simtrans_denoise::bench::bench(&paper, device, 300, 3)?;
    let total = r.images as f64
        / (r.images as f64 / r.feature_images_per_second
            + (r.images * r.images) as f64 / r.pairs_per_second);
    row(
        format!("similarity matrix of {} images (step 2)", r.images),
        total,
        serde_json::to_value(&r)?,
    );
    Ok(rows)
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
    let full = &summary["variants"]["full"];
    // The interval over seeds, else the one seed's bootstrap over the test images.
    let ci = match &full["paired_diff_ci95"] {
        serde_json::Value::Null => &full["paired_bootstrap_ci95"][0],
        ci => ci,
    };
    if let (Some(d), Some(lo), Some(hi), Some(verdict)) = (
        full["paired_diff_vs_naive_mean"].as_f64(),
        ci["lo"].as_f64(),
        ci["hi"].as_f64(),
        full["verdict"].as_str(),
    ) {
        println!(
            "  full − naive: {:+.2} points, 95 % CI {:+.2} to {:+.2} ({}): {}",
            100.0 * d,
            100.0 * lo,
            100.0 * hi,
            full["verdict_basis"].as_str().unwrap_or("?"),
            match verdict {
                "helped" => "SimTrans helped",
                "hurt" => "SimTrans hurt",
                _ => "cannot be told apart",
            }
        );
    }
    if let Some(warned) = summary["transfer"]["warned_seeds"].as_array() {
        if !warned.is_empty() {
            println!(
                "  transfer check: the SimNet's similarity may not transfer (seeds {}); see the report",
                summary["transfer"]["warned_seeds"]
            );
        }
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
    simtrans_ops::process::prepare();
    if std::env::args_os().len() <= 1 {
        // No subcommand: help on stdout, success (clap's own default would exit 2).
        use clap::CommandFactory;
        let _ = Cli::command().print_help();
        println!();
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    let common = match &cli.command {
        Command::Reproduce(c)
        | Command::Eval(c)
        | Command::Report(c)
        | Command::Fetch(c)
        | Command::Smoke(c) => Some(c),
        Command::Stage { common, .. }
        | Command::Bench { common, .. }
        | Command::Import { common, .. } => Some(common),
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
