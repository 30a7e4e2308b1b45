//! Networks trained by the reference code, turned into this crate's ResNet and artifact.
//!
//! The authors release their trained models as PyTorch checkpoints; `simtrans-pth` reads them
//! into tensors named as PyTorch's `state_dict()` names them, behind whatever wrappers the
//! reference put around the torchvision ResNet (`module.` of `DataParallel`, `backbone.` of its
//! classifier `Net`). Since our parameter names are torchvision's, importing is stripping those
//! prefixes and checking every tensor against the network the config describes: a mismatch is
//! an error that lists every missing, unexpected and wrongly shaped tensor and names the config
//! field to change, and nothing is loaded partly.

use crate::error::{BackboneError, Result};
use crate::resnet::{arch_name, ResNet};
use crate::weights::{load_tensors, LoadError};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use simtrans_core::config::BackboneConfig;
use simtrans_core::StageOutput;
use std::collections::{BTreeMap, HashMap};

/// The tensors whose names start with `prefix`, with it removed; the others are dropped.
/// With an empty prefix the map is returned as it is.
pub fn under(tensors: &BTreeMap<String, Tensor>, prefix: &str) -> BTreeMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_string(), v.clone())))
        .collect()
}

/// The first of `prefixes` (tried in order; `""` if none) under which `conv1.weight` is found:
/// the wrappers the reference put around its ResNet.
pub fn resnet_prefix<'a>(tensors: &BTreeMap<String, Tensor>, prefixes: &[&'a str]) -> &'a str {
    prefixes
        .iter()
        .copied()
        .find(|p| tensors.contains_key(&format!("{p}conv1.weight")))
        .unwrap_or("")
}

/// A ResNet of `cfg`'s architecture with an `fc` over `num_classes` (`classes_what` says what
/// they are, for the error), with every tensor of `tensors` (torchvision names) loaded.
pub fn resnet_from_tensors(
    tensors: &BTreeMap<String, Tensor>,
    cfg: &BackboneConfig,
    num_classes: usize,
    classes_what: &str,
    device: &Device,
) -> Result<(ResNet, VarMap)> {
    let varmap = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, device);
    let net = ResNet::new(cfg.arch, cfg.small_width, Some(num_classes), vb)?;
    let map: HashMap<String, Tensor> = tensors.clone().into_iter().collect();
    match load_tensors(&varmap, &map, &[]) {
        Ok(()) => Ok((net, varmap)),
        Err(LoadError::Candle(e)) => Err(e.into()),
        Err(LoadError::Problems(problems)) => Err(BackboneError::Import(format!(
            "the checkpoint does not fit backbone.arch = \"{}\"{} with an fc over {num_classes} \
             classes ({classes_what}); {} problems: {}. {}",
            arch_name(cfg.arch),
            if cfg.small_width > 0 && cfg.arch == crate::Arch::Small {
                format!(" (backbone.small_width = {})", cfg.small_width)
            } else {
                String::new()
            },
            problems.len(),
            problems.join("; "),
            hint(tensors, num_classes)
        ))),
    }
}

/// What the checkpoint's own shapes say about the fields to change.
fn hint(tensors: &BTreeMap<String, Tensor>, num_classes: usize) -> String {
    let mut out = Vec::new();
    if let Some(w) = tensors.get("conv1.weight") {
        out.push(format!(
            "Its conv1.weight is {:?} and it has {} layer blocks: set backbone.arch (resnet18, resnet34, resnet50 or small with backbone.small_width) to match",
            w.dims(),
            tensors.keys().filter(|k| k.ends_with(".conv1.weight") && k.starts_with("layer")).count()
        ));
    } else {
        out.push("It has no conv1.weight, so it is not a torchvision ResNet".to_string());
    }
    if let Some(fc) = tensors.get("fc.weight") {
        let rows = fc.dims().first().copied().unwrap_or(0);
        if rows != num_classes {
            out.push(format!(
                "its fc has {rows} rows where the data set has {num_classes} classes: check --dataset and the data set's class split"
            ));
        }
    }
    out.join("; ") + "."
}

/// A backbone artifact (step 0) from a reference checkpoint's tensors: the torchvision ResNet
/// of `DataParallel(ResNet)` (`module.` prefix) or a bare one, `fc` over the base classes
/// `classes` (global ids, the rows' order).
pub fn import(
    tensors: &BTreeMap<String, Tensor>,
    cfg: &BackboneConfig,
    classes: &[u32],
) -> Result<StageOutput> {
    let tensors = under(tensors, resnet_prefix(tensors, &["module.", ""]));
    let what = format!("the data set's {} base classes", classes.len());
    let (net, varmap) = resnet_from_tensors(&tensors, cfg, classes.len(), &what, &Device::Cpu)?;
    crate::stage::output(cfg, classes, &net, &varmap, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Arch;
    use simtrans_core::{Config, Preset};

    /// A small ResNet's tensors under the names `DataParallel(ResNet)` gives them.
    fn reference_state(width: usize, classes: usize) -> BTreeMap<String, Tensor> {
        let vm = VarMap::new();
        let vb = simtrans_core::seed::var_builder(&vm, 7, "ref", DType::F32, &Device::Cpu);
        ResNet::new(Arch::Small, width, Some(classes), vb).unwrap();
        let mut out: BTreeMap<String, Tensor> = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (format!("module.{k}"), v.as_tensor().clone()))
            .collect();
        out.insert(
            "module.bn1.num_batches_tracked".into(),
            Tensor::new(&[5i64], &Device::Cpu).unwrap(),
        );
        out
    }

    fn demo_backbone(width: usize) -> BackboneConfig {
        let mut cfg = Config::preset(Preset::Demo).backbone;
        cfg.small_width = width;
        cfg
    }

    #[test]
    fn a_data_parallel_resnet_imports_with_every_tensor() {
        let state = reference_state(4, 6);
        let out = import(&state, &demo_backbone(4), &[0, 1, 2, 3, 4, 5]).unwrap();
        for (k, v) in &out.tensors {
            let want = &state[&format!("module.{k}")];
            assert_eq!(
                v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{k}"
            );
        }
        assert_eq!(out.meta[crate::stage::meta::NUM_CLASSES], "6");
        assert_eq!(out.meta[crate::stage::meta::ARCH], "small");
    }

    #[test]
    fn a_mismatch_lists_the_tensors_and_names_the_fields() {
        let state = reference_state(4, 6);
        let err = import(&state, &demo_backbone(8), &[0, 1, 2, 3, 4, 5])
            .unwrap_err()
            .to_string();
        assert!(err.contains("backbone.arch = \"small\""), "{err}");
        assert!(err.contains("backbone.small_width = 8"), "{err}");
        assert!(
            err.contains(
                "`conv1.weight` is [4, 3, 3, 3] in the file, the network expects [8, 3, 3, 3]"
            ),
            "{err}"
        );
        let err = import(&state, &demo_backbone(4), &[0, 1, 2])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("its fc has 6 rows where the data set has 3 classes"),
            "{err}"
        );
        let mut resnet50 = demo_backbone(4);
        resnet50.arch = Arch::Resnet50;
        let err = import(&state, &resnet50, &[0, 1, 2, 3, 4, 5])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing `layer1.0.conv3.weight`"), "{err}");
        assert!(err.contains("set backbone.arch"), "{err}");
    }
}
