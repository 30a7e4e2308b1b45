//! Step 0 of the pipeline and the network every later stage builds on.
//!
//! The reference fine-tunes an ImageNet ResNet-50 before training SimNet and the classifier.
//! candle's own ResNet runs BatchNorm in inference mode only, so this crate has a trainable
//! ResNet family ([`resnet`]) on a BatchNorm with training, inference and split-batch modes
//! ([`bn`]), loads torchvision/timm state dicts unchanged and fetches them from the Hugging Face
//! hub ([`weights`]), and runs step 0 itself ([`stage`]).
//!
//! Model construction and forward passes return `candle_core::Result` so that other stage
//! crates can compose them with their own layers; loading and the stage return [`Result`].

pub mod bench;
pub mod error;
pub mod import;
pub mod resnet;
pub mod stage;
pub mod weights;

pub use bench::{bench, bench_default, bench_files, BenchReport, FilesReport};
pub use error::{BackboneError, Result};
pub use resnet::{Arch, ResNet};
pub use stage::{artifact_arch, load_model, run, schema, SCHEMA_VERSION};
pub use weights::{fetch, load_state_dict};

use candle_core::Var;
use candle_nn::VarMap;

/// Whether a variable name is a BatchNorm running statistic (kept in the map, never trained).
pub fn is_running_stat(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

/// The variables an optimiser should update, sorted by name: every variable of the map except
/// the BatchNorm running statistics.
pub fn trainable_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut vars: Vec<(String, Var)> = data
        .iter()
        .filter(|(name, _)| !is_running_stat(name))
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}
