//! The real stage functions, one per crate, behind the [`StageRunner`] trait.

use crate::pipeline::StageRunner;
use anyhow::Result;
use simtrans_core::{Config, CoreError, Stage, StageContext, StageOutput};

/// Dispatches each stage to its crate.
pub struct RealStages;

impl StageRunner for RealStages {
    fn run(&self, ctx: &StageContext) -> Result<StageOutput> {
        match ctx.node.stage {
            s => Err(CoreError::NotImplemented(s.name().into()).into()),
        }
    }

    fn schema_version(&self, _stage: Stage) -> u32 {
        1
    }

    fn manifest_hash(&self, config: &Config) -> String {
        simtrans_core::hash::sha256_hex(config.run.dataset.name())
    }
}
