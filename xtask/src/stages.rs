//! The real stage functions, one per crate, behind the [`StageRunner`] trait.

use crate::pipeline::StageRunner;
use anyhow::Result;
use simtrans_core::{Config, CoreError, Stage, StageContext, StageOutput};

/// Dispatches each stage to its crate.
pub struct RealStages;

impl StageRunner for RealStages {
    fn run(&self, ctx: &StageContext) -> Result<StageOutput> {
        match ctx.node.stage {
            Stage::Data => Ok(simtrans_data::run(ctx)?),
            Stage::Eval => simtrans_eval::stage::run(ctx),
            s => Err(CoreError::NotImplemented(s.name().into()).into()),
        }
    }

    fn schema_version(&self, stage: Stage) -> u32 {
        match stage {
            Stage::Data => simtrans_data::DataIndex::schema().version,
            Stage::Eval => simtrans_eval::stage::SCHEMA_VERSION,
            _ => 1,
        }
    }

    fn manifest_hash(&self, config: &Config) -> String {
        simtrans_data::manifest_hash(config.run.dataset)
    }
}
