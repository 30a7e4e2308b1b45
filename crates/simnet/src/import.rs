//! A SimNet trained by the reference code as a `simnet` artifact.
//!
//! The reference saves `GANSimilarityNet` (its trunk under `backbone.module.resnet.`, its head
//! under `similarity_head.module.`) and, in a second file, the discriminator
//! (`DataParallel(DomainClassifier)`); [`from_reference`] renames both to ours. The network the
//! config describes (`backbone.arch`, `backbone.small_width`, `simnet.head`) is built and every
//! tensor checked against it; a mismatch lists every missing, unexpected and wrongly shaped
//! tensor and names the fields. Without a discriminator file the discriminator keeps its seeded
//! initialisation (the later stages never use it), and the artifact's metadata says so.

use crate::head::HeadKind;
use crate::model::{from_reference, meta, SimNet, SimNetShape};
use crate::{Result, SimnetError};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use simtrans_backbone::resnet::arch_name;
use simtrans_backbone::weights::{load_tensors, LoadError};
use simtrans_core::config::{BackboneConfig, SimnetConfig};
use simtrans_core::StageOutput;
use std::collections::{BTreeMap, HashMap};

/// Metadata key: whether the discriminator was imported (`true`) or freshly initialised.
pub const DISC_IMPORTED: &str = "disc_imported";

/// The simnet artifact of a reference SimNet checkpoint's tensors (and its discriminator's).
pub fn import(
    simnet: &BTreeMap<String, Tensor>,
    disc: Option<&BTreeMap<String, Tensor>>,
    backbone: &BackboneConfig,
    cfg: &SimnetConfig,
    seed: u64,
) -> Result<StageOutput> {
    let ours = from_reference(simnet, disc)?;
    let shape = SimNetShape {
        arch: backbone.arch,
        small_width: backbone.small_width,
        head: HeadKind::from_config(cfg.head)?,
    };
    let net = SimNet::build(shape, VarMap::new(), VarMap::new(), seed, &Device::Cpu)?;
    let of = |prefixes: &[&str]| -> HashMap<String, Tensor> {
        ours.iter()
            .filter(|(k, _)| prefixes.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let mut problems = Vec::new();
    let mut check = |vars: &VarMap, tensors: HashMap<String, Tensor>| -> Result<()> {
        match load_tensors(vars, &tensors, &[]) {
            Ok(()) => Ok(()),
            Err(LoadError::Problems(p)) => {
                problems.extend(p);
                Ok(())
            }
            Err(LoadError::Candle(e)) => Err(e.into()),
        }
    };
    check(&net.simnet_vars, of(&["backbone.", "head."]))?;
    if disc.is_some() {
        check(&net.disc_vars, of(&["disc."]))?;
    }
    if !problems.is_empty() {
        return Err(SimnetError::Config(format!(
            "the checkpoint does not fit a SimNet with backbone.arch = \"{}\" (backbone.small_width = {}) \
             and simnet.head = {}; {} problems: {}. {}",
            arch_name(backbone.arch),
            backbone.small_width,
            cfg.head,
            problems.len(),
            problems.join("; "),
            head_hint(&ours)
        )));
    }
    let mut meta = net.meta();
    meta.insert(
        meta::CONFIG.to_string(),
        serde_json::to_string(cfg).expect("the config serialises"),
    );
    meta.insert(DISC_IMPORTED.to_string(), disc.is_some().to_string());
    Ok(StageOutput {
        tensors: net.tensors()?,
        metrics: serde_json::json!({ "f1_val": null, "f1_test": null, "history": [] }),
        meta,
    })
}

/// Which head the checkpoint holds, by its layer names.
fn head_hint(ours: &BTreeMap<String, Tensor>) -> String {
    if ours.contains_key("head.fc4.weight") {
        "Its head has fc1…fc4: head type 4 (set simnet.head = 4)".into()
    } else if ours.contains_key("head.fc2.weight") && ours.contains_key("head.bn.weight") {
        "Its head has fc, bn, fc2: head type 2 (set simnet.head = 2)".into()
    } else {
        "Its head is neither type 2 nor type 4".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simtrans_backbone::Arch;
    use simtrans_core::{Config, Preset};

    /// A SimNet's tensors under the reference's names: `GANSimilarityNet` and, apart, the
    /// `DataParallel(DomainClassifier)`.
    fn reference_files(
        head: u8,
        width: usize,
    ) -> (
        BTreeMap<String, Tensor>,
        BTreeMap<String, Tensor>,
        BTreeMap<String, Tensor>,
    ) {
        let shape = SimNetShape {
            arch: Arch::Small,
            small_width: width,
            head: HeadKind::from_config(head).unwrap(),
        };
        let net = SimNet::build(shape, VarMap::new(), VarMap::new(), 3, &Device::Cpu).unwrap();
        let ours = net.tensors().unwrap();
        let (mut simnet, mut disc) = (BTreeMap::new(), BTreeMap::new());
        for (k, v) in &ours {
            if let Some(rest) = k.strip_prefix("backbone.") {
                simnet.insert(format!("backbone.module.resnet.{rest}"), v.clone());
            } else if let Some(rest) = k.strip_prefix("head.") {
                simnet.insert(format!("similarity_head.module.{rest}"), v.clone());
            } else if let Some(rest) = k.strip_prefix("disc.") {
                disc.insert(format!("module.{rest}"), v.clone());
            }
        }
        (simnet, disc, ours)
    }

    fn configs(head: u8, width: usize) -> (BackboneConfig, SimnetConfig) {
        let c = Config::preset(Preset::Demo);
        let mut b = c.backbone;
        b.small_width = width;
        let mut s = c.simnet;
        s.head = head;
        (b, s)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn a_reference_simnet_and_discriminator_import_unchanged() {
        for head in [4, 2] {
            let (simnet, disc, ours) = reference_files(head, 4);
            let (b, s) = configs(head, 4);
            let out = import(&simnet, Some(&disc), &b, &s, 0).unwrap();
            assert_eq!(out.tensors.len(), ours.len());
            for (k, v) in &ours {
                assert_eq!(values(&out.tensors[k]), values(v), "{k}");
            }
            assert_eq!(out.meta[meta::HEAD], head.to_string());
            assert_eq!(out.meta[DISC_IMPORTED], "true");
            // Without the discriminator file the rest still imports.
            let out = import(&simnet, None, &b, &s, 0).unwrap();
            assert_eq!(out.meta[DISC_IMPORTED], "false");
            assert_eq!(
                values(&out.tensors["backbone.conv1.weight"]),
                values(&ours["backbone.conv1.weight"])
            );
        }
    }

    #[test]
    fn the_wrong_head_or_width_is_named() {
        let (simnet, disc, _) = reference_files(4, 4);
        let (b, s) = configs(2, 4);
        let err = import(&simnet, Some(&disc), &b, &s, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("simnet.head = 2"), "{err}");
        assert!(err.contains("head type 4 (set simnet.head = 4)"), "{err}");
        assert!(err.contains("unexpected `head.fc4.weight`"), "{err}");
        let (b, s) = configs(4, 8);
        let err = import(&simnet, Some(&disc), &b, &s, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("backbone.small_width = 8"), "{err}");
        assert!(
            err.contains("`backbone.conv1.weight` is [4, 3, 3, 3]"),
            "{err}"
        );
    }
}
