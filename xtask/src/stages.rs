//! The real stage functions, one per crate, behind the [`StageRunner`] trait.

use crate::pipeline::StageRunner;
use anyhow::Result;
use simtrans_core::{Config, Stage, StageContext, StageOutput};

/// Dispatches each stage to its crate.
pub struct RealStages;

impl StageRunner for RealStages {
    fn run(&self, ctx: &StageContext) -> Result<StageOutput> {
        match ctx.node.stage {
            Stage::Data => Ok(simtrans_data::run(ctx)?),
            Stage::Backbone => Ok(simtrans_backbone::run(ctx)?),
            Stage::Simnet => Ok(simtrans_simnet::stage::run(ctx)?),
            Stage::Denoise => simtrans_denoise::stage::run(ctx),
            Stage::Classifier => simtrans_classifier::stage::run(ctx),
            Stage::Eval => simtrans_eval::stage::run(ctx),
        }
    }

    fn schema_version(&self, stage: Stage) -> u32 {
        match stage {
            Stage::Data => simtrans_data::DataIndex::schema().version,
            Stage::Backbone => simtrans_backbone::schema().version,
            Stage::Simnet => simtrans_simnet::schema().version,
            Stage::Denoise => simtrans_denoise::stage::SCHEMA_VERSION,
            Stage::Classifier => simtrans_classifier::stage::SCHEMA_VERSION,
            Stage::Eval => simtrans_eval::stage::SCHEMA_VERSION,
        }
    }

    fn manifest_hash(&self, config: &Config) -> String {
        simtrans_data::manifest_hash(config.run.dataset)
    }

    /// Before a classifier variant with the graph term trains, the transfer check of its seed's
    /// denoise artifact: a warning when the SimNet's similarity would pull the novel categories
    /// together (the report repeats it).
    fn before(&self, ctx: &StageContext) -> Result<()> {
        let Some(variant) = ctx.node.variant.as_deref() else {
            return Ok(());
        };
        let variant: simtrans_classifier::Variant = variant.parse()?;
        if ctx.node.stage != Stage::Classifier || !variant.switches().graph {
            return Ok(());
        }
        let (denoise, data) = (
            ctx.seed_dir.join("denoise.safetensors"),
            ctx.seed_dir.join("data.safetensors"),
        );
        if !denoise.is_file() {
            tracing::info!(
                "{}: no denoise artifact yet, so no transfer check",
                ctx.node
            );
            return Ok(());
        }
        let check =
            simtrans_denoise::stage::transfer_check_files(&denoise, &data, &ctx.config.classifier)?;
        match check.warning() {
            Some(w) => tracing::warn!("seed {}: {}: {w}", ctx.seed, ctx.node),
            None => tracing::info!(
                "seed {}: transfer check: cross-category pairs get {:.0} % of a same-category pair's \
                 adjacency (warning at {:.0} %); same-vs-cross AUC {}",
                ctx.seed,
                100.0 * check.cross_to_same,
                100.0 * simtrans_denoise::transfer::WARN_RATIO,
                check.auc.map_or("n/a".into(), |a| format!("{a:.3}"))
            ),
        }
        Ok(())
    }
}
