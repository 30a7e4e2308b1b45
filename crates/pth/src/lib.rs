//! Reads PyTorch checkpoints without Python and without executing them.
//!
//! The authors of SimTrans release their trained models as files of `torch.save`: mostly whole
//! pickled modules (`nn.DataParallel` around a torchvision ResNet, the SimNet's own classes),
//! some plain state dicts. Python's `torch.load` runs whatever a pickle names; this crate only
//! parses ([`pickle`]), accepts the few globals a model needs ([`ALLOWED`] and the module
//! classes of [`is_module_class`]) and refuses any other by name, checks every declared size
//! against the file before using it ([`container`]), and names the tensors exactly as
//! `module.state_dict()` would ([`tensors`]). Mapping those names onto a network is the
//! caller's business (the stage crates' `import` modules).

pub mod container;
pub mod error;
pub mod pickle;
pub mod tensors;

pub use container::Format;
pub use error::{PthError, Result};

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// What a checkpoint holds at its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A pickled `nn.Module` (its tensors named as its `state_dict()` names them).
    WholeModule,
    /// A dict of tensors (or a dict holding one under `state_dict`).
    StateDict,
}

/// A checkpoint read into CPU tensors.
#[derive(Debug)]
pub struct Checkpoint {
    /// The file as given, for messages.
    pub name: String,
    /// SHA-256 of the whole file, lower-case hex.
    pub sha256: String,
    /// zip or legacy.
    pub format: Format,
    /// Whole module or state dict.
    pub layout: Layout,
    /// Each module's path (`""` the root, `module`, `module.backbone`, …) and class, root first;
    /// empty for a state dict.
    pub modules: Vec<(String, String)>,
    /// The tensors by `state_dict()` name, in the file's dtype (bool as u8).
    pub tensors: BTreeMap<String, candle_core::Tensor>,
}

/// The functions and classes other than modules that a model checkpoint's pickle may name:
/// torch's tensor records and storage types, and the containers its modules hold.
pub const ALLOWED: &[(&str, &str)] = &[
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    // Files written from a GPU by old torch versions may name the CUDA storage classes.
    ("torch.cuda", "FloatStorage"),
    ("torch.cuda", "DoubleStorage"),
    ("torch.cuda", "HalfStorage"),
    ("torch.cuda", "BFloat16Storage"),
    ("torch.cuda", "LongStorage"),
    ("torch.cuda", "IntStorage"),
    ("torch.cuda", "ShortStorage"),
    ("torch.cuda", "ByteStorage"),
    ("torch.cuda", "BoolStorage"),
    ("torch", "device"),
    // torch < 1.1 kept each module's `_backend`, and torch 0.4 pickled parameters by class.
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("__builtin__", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "frozenset"),
];

/// The reference code's own module classes (`module`, `class`): the step-3 classifier's `Net`
/// of `GCN_reg/graph_modules.py` (and the same wrapper defined in a training script, pickled
/// as `__main__.Net`), and the SimNet's classes.
pub const REFERENCE_CLASSES: &[(&str, &str)] = &[
    ("GCN_reg.graph_modules", "Net"),
    ("__main__", "Net"),
    ("ad_similarity.ad_modules", "GANSimilarityNet"),
    ("ad_similarity.ad_modules", "Backbone"),
    ("ad_similarity.ad_modules", "GANSimilarityHead2"),
    ("ad_similarity.ad_modules", "GANSimilarityHead4"),
    ("ad_similarity.ad_modules", "DomainClassifier"),
];

/// Whether `module.name` is a module class a checkpoint may hold: torch's layers and
/// containers, torchvision's models, and the reference's own classes.
pub fn is_module_class(module: &str, name: &str) -> bool {
    let torch = [
        "torch.nn.modules.",
        "torch.nn.parallel.",
        "torchvision.models.",
    ]
    .iter()
    .any(|p| module.starts_with(p));
    torch || REFERENCE_CLASSES.contains(&(module, name))
}

/// Whether a pickle may name `module.name`.
pub fn is_allowed(module: &str, name: &str) -> bool {
    ALLOWED.contains(&(module, name)) || is_module_class(module, name)
}

/// Reads a checkpoint file.
pub fn read(path: &Path) -> Result<Checkpoint> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|error| PthError::Io {
        file: name.clone(),
        error,
    })?;
    read_bytes(&bytes, &name)
}

/// Reads a checkpoint from memory; `name` stands for it in errors.
pub fn read_bytes(bytes: &[u8], name: &str) -> Result<Checkpoint> {
    let sha256 = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut opened = container::open(bytes, name, &is_allowed)?;
    let found = tensors::collect(&opened.pickle, &mut opened.storages, name)?;
    Ok(Checkpoint {
        name: name.to_string(),
        sha256,
        format: opened.format,
        layout: if found.whole_module {
            Layout::WholeModule
        } else {
            Layout::StateDict
        },
        modules: found.modules,
        tensors: found.tensors,
    })
}
