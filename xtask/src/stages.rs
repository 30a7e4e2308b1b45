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
}
