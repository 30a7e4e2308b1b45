//! Pretrained weights: torchvision/timm state dicts from a file or from the Hugging Face hub.
//!
//! The paper starts from torchvision's ImageNet ResNet-50 ("V1" weights); timm republishes them
//! as safetensors under `timm/resnet50.tv_in1k` (and `timm/resnet18.tv_in1k`,
//! `timm/resnet34.tv_in1k`) with torchvision's parameter names, so they load into [`ResNet`]
//! unchanged. Downloads go through `hf-hub` and its cache (`$HF_HOME/hub`, by default
//! `~/.cache/huggingface/hub`); with `HF_HUB_OFFLINE=1` only the cache is consulted. Without
//! network and cache the error names the repository, the file and where to put it.
//!
//! [`ResNet`]: crate::ResNet

use crate::error::{BackboneError, Result};
use crate::resnet::{arch_name, Arch};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use hf_hub::Cache;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The file every timm repository holds.
pub const HUB_FILE: &str = "model.safetensors";

/// The hub repository with torchvision's ImageNet weights of an architecture.
pub fn hub_repo(arch: Arch) -> Option<&'static str> {
    match arch {
        Arch::Resnet18 => Some("timm/resnet18.tv_in1k"),
        Arch::Resnet34 => Some("timm/resnet34.tv_in1k"),
        Arch::Resnet50 => Some("timm/resnet50.tv_in1k"),
        Arch::Small => None,
    }
}

/// Where and how to look for hub files.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// The hub cache folder (`$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// Never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Another endpoint than `https://huggingface.co` (`HF_ENDPOINT`).
    pub endpoint: Option<String>,
}

impl HubSettings {
    /// The settings of the environment: `HF_HOME`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`.
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false);
        HubSettings {
            cache_dir: Cache::from_env().path().clone(),
            offline,
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
        }
    }
}

/// The local path of an architecture's ImageNet weights, downloading them if needed
/// (what `cargo xtask fetch` calls).
pub fn fetch(arch: Arch) -> Result<PathBuf> {
    fetch_with(arch, &HubSettings::from_env())
}

/// [`fetch`] with explicit settings.
pub fn fetch_with(arch: Arch, settings: &HubSettings) -> Result<PathBuf> {
    let repo = hub_repo(arch).ok_or_else(|| {
        BackboneError::Weights(format!(
            "there are no ImageNet weights for the `{}` network; set backbone.weights=scratch or to a safetensors file",
            arch_name(arch)
        ))
    })?;
    let cache = Cache::new(settings.cache_dir.clone());
    if let Some(path) = cache.model(repo.to_string()).get(HUB_FILE) {
        return Ok(path);
    }
    let unavailable = |why: String| {
        let folder = settings
            .cache_dir
            .join(format!("models--{}", repo.replace('/', "--")));
        BackboneError::Weights(format!(
            "ImageNet weights for {arch}: file `{HUB_FILE}` of the Hugging Face repository `{repo}` is not in the \
             hub cache {cache} and {why}. Fix: run `cargo xtask fetch` where there is network and copy the cache \
             (or point HF_HOME at it); or download https://huggingface.co/{repo}/resolve/main/{HUB_FILE} and put it at \
             {snap}, with the text `local` in {refs}; or set backbone.weights=/path/to/{HUB_FILE}",
            arch = arch_name(arch),
            cache = settings.cache_dir.display(),
            snap = folder.join("snapshots/local").join(HUB_FILE).display(),
            refs = folder.join("refs/main").display(),
        ))
    };
    if settings.offline {
        return Err(unavailable(
            "HF_HUB_OFFLINE is set, so nothing was downloaded".into(),
        ));
    }
    let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder
        .build()
        .map_err(|e| unavailable(format!("the hub client could not start ({e})")))?;
    tracing::info!(
        "downloading {repo}/{HUB_FILE} into {}",
        settings.cache_dir.display()
    );
    api.model(repo.to_string())
        .get(HUB_FILE)
        .map_err(|e| unavailable(format!("the download failed ({e})")))
}

/// Resolves the `backbone.weights` setting: `scratch` → none, `imagenet` → the hub file,
/// anything else → a path to a safetensors state dict, which must exist.
pub fn resolve(setting: &str, arch: Arch) -> Result<Option<PathBuf>> {
    match setting {
        "scratch" => Ok(None),
        "imagenet" => fetch(arch).map(Some),
        path => {
            let p = PathBuf::from(path);
            if p.is_file() {
                Ok(Some(p))
            } else {
                Err(BackboneError::Config(format!(
                    "weights = `{path}` is neither `scratch`, `imagenet` nor an existing safetensors file"
                )))
            }
        }
    }
}

/// Copies a torchvision/timm state dict into the variables of `varmap`.
///
/// Every variable whose name does not start with one of `skip_prefixes` (e.g. `fc.` when the
/// class count differs) must be in the file with the same shape, and every tensor of the file
/// must belong to a variable (BatchNorm's `num_batches_tracked` and skipped names excepted);
/// otherwise nothing is changed and the error lists every missing, mis-shaped and unexpected
/// tensor. Values are converted to the variables' dtype and device.
pub fn load_state_dict(varmap: &VarMap, path: &Path, skip_prefixes: &[&str]) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        BackboneError::Weights(format!(
            "{}: not a readable safetensors state dict ({e}); download it again or point backbone.weights elsewhere",
            path.display()
        ))
    })?;
    load_tensors(varmap, &tensors, skip_prefixes).map_err(|e| match e {
        LoadError::Problems(problems) => BackboneError::StateDict {
            path: path.to_path_buf(),
            problems,
        },
        LoadError::Candle(e) => e.into(),
    })
}

/// Why [`load_tensors`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Missing, mis-shaped and unexpected tensors, one line each.
    #[error("the tensors do not fit the network ({} problems): {}", .0.len(), .0.join("; "))]
    Problems(Vec<String>),
    /// Copying failed.
    #[error(transparent)]
    Candle(candle_core::Error),
}

impl From<LoadError> for BackboneError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Problems(problems) => BackboneError::StateDict {
                path: "<tensors in memory>".into(),
                problems,
            },
            LoadError::Candle(e) => e.into(),
        }
    }
}

/// [`load_state_dict`] from tensors already in memory (artifacts, checkpoints).
pub fn load_tensors(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    skip_prefixes: &[&str],
) -> std::result::Result<(), LoadError> {
    let skipped = |name: &str| skip_prefixes.iter().any(|p| name.starts_with(p));
    let data = varmap.data().lock().expect("varmap lock");
    let mut problems = Vec::new();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names.iter().filter(|n| !skipped(n)) {
        let want = data[*name].dims();
        match tensors.get(*name) {
            None => problems.push(format!("missing `{name}` {want:?}")),
            Some(t) if t.dims() != want => problems.push(format!(
                "`{name}` is {:?} in the file, the network expects {want:?}",
                t.dims()
            )),
            Some(_) => {}
        }
    }
    let mut extra: Vec<&String> = tensors
        .keys()
        .filter(|n| !data.contains_key(*n) && !skipped(n) && !n.ends_with("num_batches_tracked"))
        .collect();
    extra.sort();
    for name in extra {
        problems.push(format!("unexpected `{name}` {:?}", tensors[name].dims()));
    }
    if !problems.is_empty() {
        return Err(LoadError::Problems(problems));
    }
    for name in names.into_iter().filter(|n| !skipped(n)) {
        let var = &data[name];
        let value = tensors[name]
            .to_dtype(var.dtype())
            .and_then(|t| t.to_device(var.device()))
            .map_err(LoadError::Candle)?;
        var.set(&value).map_err(LoadError::Candle)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ResNet;
    use candle_core::DType;

    fn small(seed: u64, classes: Option<usize>) -> (ResNet, VarMap) {
        let vm = VarMap::new();
        let vb = simtrans_core::seed::var_builder(&vm, seed, "net", DType::F32, &Device::Cpu);
        (ResNet::new(Arch::Small, 2, classes, vb).unwrap(), vm)
    }

    fn state(vm: &VarMap) -> HashMap<String, Tensor> {
        vm.data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
            .collect()
    }

    #[test]
    fn state_dict_round_trip_and_problem_listing() {
        let dir = tempfile::tempdir().unwrap();
        let (_, src) = small(1, Some(4));
        let mut sd = state(&src);
        sd.insert(
            "bn1.num_batches_tracked".into(),
            Tensor::new(&[3i64], &Device::Cpu).unwrap(),
        );
        let path = dir.path().join("sd.safetensors");
        candle_core::safetensors::save(&sd, &path).unwrap();

        // Same architecture, other init: loads and equals the source.
        let (net, dst) = small(2, Some(4));
        load_state_dict(&dst, &path, &[]).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &Device::Cpu).unwrap();
        let (net_src, _) = (
            ResNet::new(
                Arch::Small,
                2,
                Some(4),
                candle_nn::VarBuilder::from_varmap(&src, DType::F32, &Device::Cpu),
            )
            .unwrap(),
            (),
        );
        let a = net.forward(&x, simtrans_ops::BnMode::Eval).unwrap().0;
        let b = net_src.forward(&x, simtrans_ops::BnMode::Eval).unwrap().0;
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());

        // Other class count: fails listing fc, loads with fc skipped.
        let (_, other) = small(3, Some(7));
        let err = load_state_dict(&other, &path, &[]).unwrap_err().to_string();
        assert!(
            err.contains("`fc.weight` is [4, 16] in the file, the network expects [7, 16]"),
            "{err}"
        );
        assert!(err.contains("`fc.bias`"), "{err}");
        let fc_before = state(&other)["fc.weight"].to_vec2::<f32>().unwrap();
        load_state_dict(&other, &path, &["fc."]).unwrap();
        assert_eq!(
            state(&other)["fc.weight"].to_vec2::<f32>().unwrap(),
            fc_before
        );
        assert_eq!(
            state(&other)["conv1.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            sd["conv1.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );

        // Missing and unexpected tensors are all listed; nothing is changed.
        sd.remove("layer3.0.bn2.running_var");
        sd.remove("bn1.weight");
        sd.insert(
            "layer5.0.conv1.weight".into(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&sd, &path).unwrap();
        let (_, third) = small(4, Some(4));
        let before = state(&third)["conv1.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let err = load_state_dict(&third, &path, &[]).unwrap_err();
        match &err {
            BackboneError::StateDict { problems, .. } => {
                assert_eq!(problems.len(), 3, "{problems:?}")
            }
            other => panic!("{other}"),
        }
        let msg = err.to_string();
        for want in [
            "missing `bn1.weight`",
            "missing `layer3.0.bn2.running_var`",
            "unexpected `layer5.0.conv1.weight`",
            "sd.safetensors",
        ] {
            assert!(msg.contains(want), "{msg}");
        }
        assert_eq!(
            state(&third)["conv1.weight"]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            before
        );

        // Not a safetensors file at all.
        std::fs::write(&path, b"nope").unwrap();
        let msg = load_state_dict(&third, &path, &[]).unwrap_err().to_string();
        assert!(
            msg.contains("sd.safetensors") && msg.contains("not a readable"),
            "{msg}"
        );
    }

    #[test]
    fn hub_cache_hit_offline_miss_and_unreachable_network() {
        let dir = tempfile::tempdir().unwrap();
        let hub = dir.path().join("hub");
        let repo_dir = hub.join("models--timm--resnet18.tv_in1k");
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::create_dir_all(repo_dir.join("snapshots/abc123")).unwrap();
        std::fs::write(repo_dir.join("refs/main"), "abc123").unwrap();
        std::fs::write(repo_dir.join("snapshots/abc123").join(HUB_FILE), b"x").unwrap();
        let offline = HubSettings {
            cache_dir: hub.clone(),
            offline: true,
            endpoint: None,
        };
        let p = fetch_with(Arch::Resnet18, &offline).unwrap();
        assert_eq!(p, repo_dir.join("snapshots/abc123").join(HUB_FILE));

        let msg = fetch_with(Arch::Resnet50, &offline)
            .unwrap_err()
            .to_string();
        for want in [
            "timm/resnet50.tv_in1k",
            HUB_FILE,
            "HF_HUB_OFFLINE",
            "models--timm--resnet50.tv_in1k/snapshots/local/model.safetensors",
            "backbone.weights=",
        ] {
            assert!(msg.contains(want), "{want} not in: {msg}");
        }
        assert!(fetch_with(Arch::Small, &offline)
            .unwrap_err()
            .to_string()
            .contains("scratch"));

        // A closed local port stands in for "no network": it fails at once.
        let unreachable = HubSettings {
            offline: false,
            endpoint: Some("http://127.0.0.1:9".into()),
            ..offline
        };
        let msg = fetch_with(Arch::Resnet34, &unreachable)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("timm/resnet34.tv_in1k") && msg.contains("download failed"),
            "{msg}"
        );
    }
}
