//! The trained SimNet as later stages use it: loading the `simnet` artifact and scoring pairs.
//!
//! The artifact holds every SimNet tensor under three prefixes (`backbone.` with torchvision
//! names, `head.`, `disc.`; see [`crate::head`] for the mapping to the reference's state dict)
//! and, as metadata, what is needed to rebuild the modules: `arch`, `small_width`,
//! `feature_dim`, `head`. [`SimNet::similarity_matrix`] runs the head in eval mode on every
//! pair of two feature sets with the factorised first layer, so the denoise and classifier
//! stages never build `L²` concatenations.

use crate::head::{similarity, Discriminator, HeadKind, PairOrder, SimHead};
use crate::{Result, SimnetError};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use simtrans_backbone::{Arch, ResNet};
use simtrans_core::{Artifact, ArtifactSchema, Stage, TensorSpec};
use simtrans_ops::BnMode;
use std::collections::BTreeMap;

/// Version of the `simnet` artifact layout.
pub const SCHEMA_VERSION: u32 = 1;

/// Metadata keys of the artifact (under `extra.` in the safetensors header).
pub mod meta {
    /// Backbone architecture (`small`, `resnet18`, `resnet34`, `resnet50`).
    pub const ARCH: &str = "arch";
    /// First-stage width of the `small` architecture.
    pub const SMALL_WIDTH: &str = "small_width";
    /// Feature dimension D.
    pub const FEATURE_DIM: &str = "feature_dim";
    /// Head type (4 or 2).
    pub const HEAD: &str = "head";
    /// The `[simnet]` config section the artifact was trained with, as JSON.
    pub const CONFIG: &str = "simnet_config";
    /// The epoch (0-based) whose weights the artifact holds.
    pub const EPOCH: &str = "epoch";
}

/// The tensors every `simnet` artifact must have.
pub fn schema() -> ArtifactSchema {
    let f = DType::F32;
    ArtifactSchema::new(
        Stage::Simnet,
        SCHEMA_VERSION,
        vec![
            TensorSpec::new("backbone.conv1.weight", f, &[None, Some(3), None, None]),
            TensorSpec::new("backbone.bn1.running_mean", f, &[None]),
            TensorSpec::new("disc.fc.weight", f, &[None, None]),
            TensorSpec::new("disc.fc2.weight", f, &[Some(2), None]),
        ],
    )
}

/// Most first-layer activations (floats) [`SimNet::similarity_matrix`] holds at once: 2²⁶ (256 MiB in f32).
pub const PAIR_BUDGET: usize = 1 << 26;

/// How to rebuild the modules of a SimNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimNetShape {
    pub arch: Arch,
    pub small_width: usize,
    pub head: HeadKind,
}

/// Backbone, similarity head and discriminator, built over variable maps.
pub struct SimNet {
    /// The ResNet trunk (no `fc`).
    pub backbone: ResNet,
    /// The similarity head.
    pub head: SimHead,
    /// The domain discriminator.
    pub disc: Discriminator,
    /// How it was built.
    pub shape: SimNetShape,
    /// `backbone.*` and `head.*` variables (what the SimNet optimiser updates).
    pub simnet_vars: VarMap,
    /// `disc.*` variables.
    pub disc_vars: VarMap,
}

impl SimNet {
    /// Builds the modules over the given maps; variables already in them are used as they are,
    /// missing ones are initialised from `(seed, "simnet-head" / "simnet-disc")`.
    pub fn build(
        shape: SimNetShape,
        simnet_vars: VarMap,
        disc_vars: VarMap,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let vb =
            simtrans_core::seed::var_builder(&simnet_vars, seed, "simnet-head", DType::F32, device);
        let backbone = ResNet::new(shape.arch, shape.small_width, None, vb.pp("backbone"))?;
        let d = backbone.feature_dim();
        let head = SimHead::new(shape.head, d, vb.pp("head"))?;
        let dvb =
            simtrans_core::seed::var_builder(&disc_vars, seed, "simnet-disc", DType::F32, device);
        let disc = Discriminator::new(shape.head.diff_dim(d), dvb.pp("disc"))?;
        Ok(SimNet {
            backbone,
            head,
            disc,
            shape,
            simnet_vars,
            disc_vars,
        })
    }

    /// Rebuilds a trained SimNet from its artifact (eval use: denoise, classifier, eval).
    pub fn load(artifact: &Artifact, device: &Device) -> Result<Self> {
        let extra = &artifact.meta.extra;
        let get = |k: &str| {
            extra.get(k).ok_or_else(|| {
                SimnetError::Artifact(format!(
                    "{}: metadata `{k}` is missing; rebuild it with `--force simnet`",
                    artifact_name(artifact)
                ))
            })
        };
        let arch_s = get(meta::ARCH)?;
        let arch = simtrans_backbone::resnet::parse_arch(arch_s).ok_or_else(|| {
            SimnetError::Artifact(format!(
                "{}: unknown arch `{arch_s}`",
                artifact_name(artifact)
            ))
        })?;
        let small_width = get(meta::SMALL_WIDTH)?.parse().map_err(|_| {
            SimnetError::Artifact(format!(
                "{}: small_width is not a number",
                artifact_name(artifact)
            ))
        })?;
        let head_no: u8 = get(meta::HEAD)?.parse().map_err(|_| {
            SimnetError::Artifact(format!("{}: head is not a number", artifact_name(artifact)))
        })?;
        let shape = SimNetShape {
            arch,
            small_width,
            head: HeadKind::from_config(head_no)?,
        };
        let simnet_vars = VarMap::new();
        let disc_vars = VarMap::new();
        insert_vars(
            &simnet_vars,
            &artifact.tensors,
            &["backbone.", "head."],
            device,
        )?;
        insert_vars(&disc_vars, &artifact.tensors, &["disc."], device)?;
        let before = (simnet_vars.all_vars().len(), disc_vars.all_vars().len());
        let net = SimNet::build(shape, simnet_vars, disc_vars, 0, device)?;
        let after = (
            net.simnet_vars.all_vars().len(),
            net.disc_vars.all_vars().len(),
        );
        if before != after {
            return Err(SimnetError::Artifact(format!(
                "{}: {} tensors the {:?} SimNet with head {} needs are missing; rebuild it with `--force simnet`",
                artifact_name(artifact),
                (after.0 + after.1) - (before.0 + before.1),
                arch,
                head_no
            )));
        }
        Ok(net)
    }

    /// Feature dimension D.
    pub fn feature_dim(&self) -> usize {
        self.backbone.feature_dim()
    }

    /// Pooled backbone features in eval mode, for inference ([`simtrans_ops::grad::inference`]:
    /// on CUDA the fused trunk keeps nothing for a backward pass) and detached from autograd,
    /// so that a caller collecting the features of many batches does not keep every batch's
    /// activations alive through their graphs (candle's ops hold their inputs for a backward
    /// pass).
    pub fn features(&self, images: &Tensor) -> Result<Tensor> {
        let f = simtrans_ops::grad::inference(|| self.backbone.features(images, BnMode::Eval))?;
        Ok(f.detach())
    }

    /// `S[i, j] = softmax(head([f_i ; f_j]))[1]` for features `[Bi, D]` and `[Bj, D]`, in eval
    /// mode, as `[Bi, Bj]`. Note the order: the first image of the pair is the row. The
    /// reference's pair enumeration (row `i·B + j` is `[f_j ; f_i]`) and the graph adjacency
    /// `A[i, j] = sim([f_j ; f_i])` of step 3b are the transpose `similarity_matrix(f, f)ᵀ`.
    ///
    /// The head's first-layer activations of a block of rows are `rows·Bj·H` floats; rows are
    /// processed in blocks that keep this under [`PAIR_BUDGET`] (eval-mode BatchNorm is
    /// row-wise, so blocking changes nothing in the result).
    pub fn similarity_matrix(&self, features_i: &Tensor, features_j: &Tensor) -> Result<Tensor> {
        self.similarity_matrix_within(features_i, features_j, PAIR_BUDGET)
    }

    /// [`SimNet::similarity_matrix`] holding at most `budget` first-layer activations at once
    /// (at least one row of pairs).
    pub fn similarity_matrix_within(
        &self,
        features_i: &Tensor,
        features_j: &Tensor,
        budget: usize,
    ) -> Result<Tensor> {
        let bi = features_i.dim(0)?;
        let bj = features_j.dim(0)?;
        // The first layer's output is the widest activation (2D for type 4, 4D for type 2).
        let width = self.head.kind().first_width(self.feature_dim()).max(1);
        let block = (budget / (bj.max(1) * width)).clamp(1, bi.max(1));
        let mut parts = Vec::with_capacity(bi.div_ceil(block));
        let mut start = 0;
        while start < bi {
            let n = block.min(bi - start);
            let rows = features_i.narrow(0, start, n)?;
            let (logits, _) =
                self.head
                    .forward_grid(&rows, features_j, PairOrder::RowFirst, BnMode::Eval)?;
            // Detached: each block's head activations go when the block is done.
            parts.push(similarity(&logits)?.reshape((n, bj))?.detach());
            start += n;
        }
        match parts.len() {
            0 => Ok(Tensor::zeros((0, bj), DType::F32, features_i.device())?),
            1 => Ok(parts.remove(0)),
            _ => Ok(Tensor::cat(&parts, 0)?),
        }
    }

    /// Every tensor of the model by artifact name (`backbone.*`, `head.*`, `disc.*`), copied.
    pub fn tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for vm in [&self.simnet_vars, &self.disc_vars] {
            for (name, var) in vm.data().lock().expect("varmap lock").iter() {
                out.insert(name.clone(), var.as_tensor().detach().copy()?);
            }
        }
        Ok(out)
    }

    /// Overwrites every variable from `tensors` (names as in [`SimNet::tensors`], optionally
    /// under `prefix`); every variable must be present.
    pub fn set_tensors(&self, tensors: &BTreeMap<String, Tensor>, prefix: &str) -> Result<()> {
        for vm in [&self.simnet_vars, &self.disc_vars] {
            for (name, var) in vm.data().lock().expect("varmap lock").iter() {
                let key = format!("{prefix}{name}");
                let t = tensors.get(&key).ok_or_else(|| {
                    SimnetError::Artifact(format!("saved state has no tensor `{key}`"))
                })?;
                var.set(&t.to_device(var.device())?)?;
            }
        }
        Ok(())
    }

    /// The metadata describing how to rebuild this network.
    pub fn meta(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                meta::ARCH.to_string(),
                simtrans_backbone::resnet::arch_name(self.shape.arch).to_string(),
            ),
            (
                meta::SMALL_WIDTH.to_string(),
                self.shape.small_width.to_string(),
            ),
            (
                meta::FEATURE_DIM.to_string(),
                self.feature_dim().to_string(),
            ),
            (meta::HEAD.to_string(), self.shape.head.number().to_string()),
        ])
    }
}

/// Renames the tensors of the reference's checkpoints (after conversion from their pickled
/// modules to flat state dicts) to this crate's names: `simnet` is the state dict of
/// `GANSimilarityNet` (`backbone.module.resnet.*`, `similarity_head.module.*`, with or without
/// the `module.` of `DataParallel`), `disc` that of the `DomainClassifier` (`module.*` or bare).
/// `num_batches_tracked` entries and the unused backbone `fc` are dropped; an entry that fits
/// neither layout is an error naming it.
pub fn from_reference(
    simnet: &BTreeMap<String, Tensor>,
    disc: Option<&BTreeMap<String, Tensor>>,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    let unknown = |name: &str| {
        SimnetError::Artifact(format!(
            "reference tensor `{name}` is neither backbone.module.resnet.*, similarity_head.module.* nor a discriminator entry"
        ))
    };
    for (name, t) in simnet {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let ours = if let Some(rest) = name
            .strip_prefix("backbone.module.resnet.")
            .or_else(|| name.strip_prefix("backbone.resnet."))
        {
            if rest.starts_with("fc.") {
                continue;
            }
            format!("backbone.{rest}")
        } else if let Some(rest) = name
            .strip_prefix("similarity_head.module.")
            .or_else(|| name.strip_prefix("similarity_head."))
        {
            format!("head.{rest}")
        } else {
            return Err(unknown(name));
        };
        out.insert(ours, t.clone());
    }
    for (name, t) in disc.into_iter().flatten() {
        let rest = name.strip_prefix("module.").unwrap_or(name);
        if !(rest.starts_with("fc.") || rest.starts_with("bn.") || rest.starts_with("fc2.")) {
            return Err(unknown(name));
        }
        out.insert(format!("disc.{rest}"), t.clone());
    }
    Ok(out)
}

fn artifact_name(a: &Artifact) -> String {
    a.path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("{} artifact", a.meta.node))
}

/// Copies the tensors whose names start with one of `prefixes` into `vm` as variables.
pub fn insert_vars(
    vm: &VarMap,
    tensors: &BTreeMap<String, Tensor>,
    prefixes: &[&str],
    device: &Device,
) -> Result<()> {
    let mut data = vm.data().lock().expect("varmap lock");
    for (name, t) in tensors {
        if prefixes.iter().any(|p| name.starts_with(p)) {
            let t = t.to_device(device)?.to_dtype(DType::F32)?.copy()?;
            data.insert(name.clone(), Var::from_tensor(&t)?);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_results_carry_no_autograd_graph() {
        let shape = SimNetShape {
            arch: Arch::Small,
            small_width: 4,
            head: HeadKind::Type4,
        };
        let net = SimNet::build(shape, VarMap::new(), VarMap::new(), 0, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1., (3, 3, 16, 16), &Device::Cpu).unwrap();
        // The trunk over trainable variables records a graph, which holds its activations ...
        assert!(net.backbone.features(&x, BnMode::Eval).unwrap().track_op());
        // ... which inference drops at once.
        let f = net.features(&x).unwrap();
        assert!(!f.track_op());
        // Also when the matrix is made of several row blocks (one row each here).
        let s = net.similarity_matrix_within(&f, &f, 1).unwrap();
        assert_eq!(s.dims(), &[3, 3]);
        assert!(!s.track_op());
        let whole = net.similarity_matrix(&f, &f).unwrap();
        assert!(!whole.track_op());
        let d = (s - whole).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
