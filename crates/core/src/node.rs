//! The names of the pipeline's stages and of the nodes of its graph.
//!
//! Why a module of its own: configs, artifacts and the stage contract all name stages, and
//! each of them imports this module, which imports nothing of theirs; so the names sit at the
//! bottom of the crate and no import goes in a circle.

use crate::error::{CoreError, Result};

/// A pipeline stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Data,
    Backbone,
    Simnet,
    Denoise,
    Classifier,
    Eval,
}

impl Stage {
    /// Every stage in pipeline order.
    pub const ALL: [Stage; 6] = [
        Stage::Data,
        Stage::Backbone,
        Stage::Simnet,
        Stage::Denoise,
        Stage::Classifier,
        Stage::Eval,
    ];

    /// The stage's name on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Data => "data",
            Stage::Backbone => "backbone",
            Stage::Simnet => "simnet",
            Stage::Denoise => "denoise",
            Stage::Classifier => "classifier",
            Stage::Eval => "eval",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Stage {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        Stage::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
                CoreError::Unknown(format!(
                    "unknown stage `{s}`; the stages are: {}",
                    names.join(", ")
                ))
            })
    }
}

/// One artifact-producing node of the graph: a stage, and for stages that train several
/// variants (the classifier), which one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Node {
    pub stage: Stage,
    pub variant: Option<String>,
}

impl Node {
    /// The node of a single-artifact stage.
    pub fn stage(stage: Stage) -> Self {
        Node {
            stage,
            variant: None,
        }
    }

    /// A variant of a stage.
    pub fn variant(stage: Stage, variant: impl Into<String>) -> Self {
        Node {
            stage,
            variant: Some(variant.into()),
        }
    }

    /// File-name form: `simnet`, `classifier-full`.
    pub fn name(&self) -> String {
        match &self.variant {
            None => self.stage.name().to_string(),
            Some(v) => format!("{}-{}", self.stage.name(), v),
        }
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_stage_lists_the_stages() {
        let err = "nosuch".parse::<Stage>().unwrap_err().to_string();
        for s in Stage::ALL {
            assert!(err.contains(s.name()), "{err}");
        }
        assert_eq!("denoise".parse::<Stage>().unwrap(), Stage::Denoise);
    }

    #[test]
    fn node_names() {
        assert_eq!(Node::stage(Stage::Simnet).name(), "simnet");
        assert_eq!(
            Node::variant(Stage::Classifier, "full").name(),
            "classifier-full"
        );
    }
}
