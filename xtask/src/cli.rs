//! The command line: subcommands, common flags, and how a run's config is resolved.
//!
//! Resolution order: `--config FILE` if given; else `--preset` if given; else the run's saved
//! `runs/<name>/config.toml` if it exists (so `stage` and `eval` reuse what `reproduce` did);
//! else the `demo` preset (or `paper` when `--dataset` names a real data set). Flags and
//! `--set section.field=value` overrides are applied on top.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use simtrans_core::config::{DatasetKind, Preset};
use simtrans_core::{Config, RunStore, Stage};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// simtrans-rs: weak-shot fine-grained classification via similarity transfer.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole pipeline (every stale stage, every seed), then eval and report.
    Reproduce(Common),
    /// Run one stage on the cached artifacts of its upstream stages.
    Stage {
        /// data, backbone, simnet, denoise, classifier or eval.
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Evaluate the trained classifiers of a run and write eval.json and report.md.
    Eval(Common),
    /// Rewrite eval.json and report.md from the eval artifacts of a run.
    Report(Common),
    /// Import a PyTorch checkpoint of the reference code (the authors' released models) as the
    /// run's backbone, simnet or classifier artifact; a classifier is evaluated on the novel
    /// test images on the way in. The pickle is parsed, never executed.
    Import {
        /// backbone (step 0), simnet (step 1) or classifier (step 3).
        #[arg(long)]
        stage: String,
        /// The checkpoint (`.pth`: a whole pickled module or a state dict).
        file: PathBuf,
        /// The SimNet's discriminator checkpoint (`domain_classifier….pth`), with --stage simnet.
        #[arg(long)]
        disc: Option<PathBuf>,
        /// The classifier variant the checkpoint is (the reference's final classifier: full).
        #[arg(long, default_value = "full")]
        variant: String,
        #[command(flatten)]
        common: Common,
    },
    /// Measure throughput: data, backbone, classifier, simnet, denoise, table (the GPU table of
    /// BENCHMARKS.md: ResNet-50 at 224 px, slow on a CPU), profile (three ResNet-50 steps at
    /// batch 64, to run under a kernel profiler), profile-simnet and profile-similarity (the
    /// table's SimNet step and similarity matrix, likewise) or all (table only on CUDA).
    Bench {
        /// What to measure.
        #[arg(default_value = "all")]
        what: String,
        /// For `data`: the JPEG files to decode, `img_00000.jpg` … in this folder (the
        /// synthetic photographs are written there where missing and kept), so that another
        /// tool can be timed on the very same files; default a temporary folder.
        #[arg(long, value_name = "DIR")]
        photos: Option<std::path::PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Run the paper configuration end to end, one epoch per stage from random weights, on a
    /// synthetic CUB tree (photographs of CUB's sizes, written under the run folder; the run is
    /// `smoke` unless --run names another): checks a machine and a build, and times each stage,
    /// before a real run. Its accuracy means nothing.
    Smoke(Common),
    /// Pre-download the ImageNet weights the config needs into the Hugging Face cache.
    Fetch(Common),
    /// Print the resolved configuration as TOML.
    Config(Common),
    /// Run what CI runs: format check, clippy, and the test suite.
    Ci,
}

/// Flags shared by the run subcommands.
#[derive(Debug, Args, Clone, Default)]
pub struct Common {
    /// Name of the run folder under the runs directory.
    #[arg(long, default_value = "default")]
    pub run: String,
    /// Where run folders live.
    #[arg(long, env = "SIMTRANS_RUNS", default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Defaults to start from: demo or paper.
    #[arg(long)]
    pub preset: Option<String>,
    /// A config file (TOML) to start from instead of a preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// demo, cub, car, air or webvision.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Root folder of the data set.
    #[arg(long)]
    pub data_path: Option<String>,
    /// A second IDX source for junk noise in the demo benchmark.
    #[arg(long)]
    pub junk_path: Option<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Arithmetic on CUDA devices: f32 (exact), tf32 or bf16 (the CPU always uses f32).
    #[arg(long)]
    pub precision: Option<String>,
    /// First seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of seeds.
    #[arg(long)]
    pub seeds: Option<usize>,
    /// Rebuild this stage and everything downstream (repeatable).
    #[arg(long)]
    pub force: Vec<String>,
    /// Train all five classifier variants (naive, weighting, graph, full, clean).
    #[arg(long)]
    pub ablations: bool,
    /// Override one config field: section.field=value (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl Common {
    /// Resolves the config of this invocation (see the module doc).
    pub fn resolve(&self) -> Result<Config> {
        let saved = self.runs_dir.join(&self.run).join("config.toml");
        let dataset: Option<DatasetKind> = self.dataset.as_deref().map(str::parse).transpose()?;
        let mut config = if let Some(path) = &self.config {
            Config::load(path)?
        } else if let Some(p) = &self.preset {
            Config::preset(p.parse::<Preset>()?)
        } else if saved.exists() {
            Config::load(&saved)
                .with_context(|| format!("the saved config of run `{}`", self.run))?
        } else {
            match dataset {
                Some(d) if d != DatasetKind::Demo => Config::preset(Preset::Paper),
                _ => Config::preset(Preset::Demo),
            }
        };
        if let Some(d) = dataset {
            config.run.dataset = d;
        }
        if let Some(p) = &self.data_path {
            config.run.data_path = Some(p.clone());
        }
        if let Some(p) = &self.junk_path {
            config.run.junk_path = Some(p.clone());
        }
        if let Some(d) = &self.device {
            config.run.device = d.clone();
        }
        if let Some(p) = &self.precision {
            config.run.precision = p.clone();
        }
        if let Some(s) = self.seed {
            config.run.seed = s;
        }
        if let Some(n) = self.seeds {
            config.run.seeds = n;
        }
        if self.ablations {
            config.run.ablations = true;
        }
        for o in &self.overrides {
            config.set(o)?;
        }
        config.validate()?;
        Ok(config)
    }

    /// The stages named by `--force`.
    pub fn forced(&self) -> Result<BTreeSet<Stage>> {
        let mut out = BTreeSet::new();
        for name in &self.force {
            let stage: Stage = name.parse()?;
            // Forcing a stage forces everything downstream of it.
            out.extend(Stage::ALL.into_iter().filter(|s| *s >= stage));
        }
        Ok(out)
    }

    /// Opens the run folder.
    pub fn store(&self) -> Result<RunStore> {
        Ok(RunStore::open(Path::new(&self.runs_dir), &self.run)?)
    }
}
