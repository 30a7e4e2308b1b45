//! Per-epoch checkpoints, so that a killed training run resumes where it stopped.
//!
//! A checkpoint is an artifact (node `checkpoint`) tagged with the cache key of the node that
//! wrote it; a checkpoint from another configuration is never resumed from. The newest valid
//! one wins; a corrupt one (killed mid-write is impossible thanks to the atomic rename, but a
//! disk can still fail) is skipped with a warning. Only the newest `keep` files are kept.

use crate::artifact::{Artifact, ArtifactMeta, ArtifactSchema};
use crate::error::{CoreError, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Every variable of a map by name, copied (so later training does not alter them): what a
/// checkpoint or an artifact saves of a network.
pub fn varmap_tensors(varmap: &candle_nn::VarMap) -> candle_core::Result<BTreeMap<String, Tensor>> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut out = BTreeMap::new();
    for (k, v) in data.iter() {
        out.insert(k.clone(), v.as_tensor().copy()?);
    }
    Ok(out)
}

/// The checkpoint folder of one node.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    /// The folder.
    pub dir: PathBuf,
    cache_key: String,
    keep: usize,
}

/// A restored training state.
#[derive(Debug)]
pub struct Restored {
    /// Completed epochs; training continues with this epoch index.
    pub epochs_done: usize,
    /// The saved tensors (model variables, optimiser state, …).
    pub tensors: BTreeMap<String, Tensor>,
    /// The saved string entries.
    pub extra: BTreeMap<String, String>,
    /// The saved metrics.
    pub metrics: serde_json::Value,
}

impl Checkpoints {
    /// Checkpoints in `dir` for the node with `cache_key`.
    pub fn new(dir: PathBuf, cache_key: String) -> Self {
        Checkpoints {
            dir,
            cache_key,
            keep: 2,
        }
    }

    fn path(&self, epochs_done: usize) -> PathBuf {
        self.dir.join(format!("epoch-{epochs_done:05}.safetensors"))
    }

    /// Saves the state after `epochs_done` completed epochs and prunes older files.
    pub fn save(
        &self,
        epochs_done: usize,
        tensors: BTreeMap<String, Tensor>,
        mut extra: BTreeMap<String, String>,
        metrics: serde_json::Value,
    ) -> Result<()> {
        extra.insert("epochs_done".into(), epochs_done.to_string());
        let meta = ArtifactMeta {
            node: "checkpoint".into(),
            schema_version: 1,
            cache_key: self.cache_key.clone(),
            crate_version: env!("CARGO_PKG_VERSION").into(),
            metrics,
            extra,
            ..Default::default()
        };
        Artifact::new(meta, tensors).save(&self.path(epochs_done))?;
        let mut epochs = self.epochs()?;
        epochs.sort_unstable_by(|a, b| b.cmp(a));
        for old in epochs.into_iter().skip(self.keep) {
            let p = self.path(old);
            std::fs::remove_file(&p).map_err(|e| CoreError::io(&p, e))?;
        }
        Ok(())
    }

    fn epochs(&self) -> Result<Vec<usize>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(CoreError::io(&self.dir, e)),
        };
        Ok(rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("epoch-")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()
            })
            .collect())
    }

    /// The newest valid checkpoint of this cache key, if any.
    pub fn latest(&self, device: &Device) -> Result<Option<Restored>> {
        let mut epochs = self.epochs()?;
        epochs.sort_unstable_by(|a, b| b.cmp(a));
        for e in epochs {
            let path = self.path(e);
            match Artifact::load(&path, &ArtifactSchema::any(), device) {
                Ok(a) if a.meta.node == "checkpoint" && a.meta.cache_key == self.cache_key => {
                    return Ok(Some(Restored {
                        epochs_done: e,
                        tensors: a.tensors,
                        extra: a.meta.extra,
                        metrics: a.meta.metrics,
                    }));
                }
                Ok(_) => tracing::info!("ignoring {} (other configuration)", path.display()),
                Err(err) => tracing::warn!("skipping unreadable checkpoint: {err}"),
            }
        }
        Ok(None)
    }

    /// Removes every checkpoint of the node (after its artifact is committed, or on --force).
    pub fn clear(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CoreError::io(&self.dir, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(v: f32) -> BTreeMap<String, Tensor> {
        BTreeMap::from([("w".to_string(), Tensor::full(v, 4, &Device::Cpu).unwrap())])
    }

    #[test]
    fn newest_valid_checkpoint_of_the_same_key_wins() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpoints::new(dir.path().join("simnet"), "key-a".into());
        assert!(ck.latest(&Device::Cpu).unwrap().is_none());
        for e in 1..=4 {
            ck.save(e, state(e as f32), BTreeMap::new(), serde_json::json!({}))
                .unwrap();
        }
        // Only the newest two are kept.
        assert_eq!(std::fs::read_dir(&ck.dir).unwrap().count(), 2);
        let r = ck.latest(&Device::Cpu).unwrap().unwrap();
        assert_eq!(r.epochs_done, 4);
        assert_eq!(r.extra["epochs_done"], "4");

        // A corrupt newest file falls back to the previous one.
        std::fs::write(ck.path(4), b"garbage").unwrap();
        assert_eq!(ck.latest(&Device::Cpu).unwrap().unwrap().epochs_done, 3);

        // Another configuration never resumes from these.
        let other = Checkpoints::new(ck.dir.clone(), "key-b".into());
        assert!(other.latest(&Device::Cpu).unwrap().is_none());
        ck.clear().unwrap();
        assert!(ck.latest(&Device::Cpu).unwrap().is_none());
    }
}
