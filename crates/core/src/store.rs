//! The run directory and cache keys.
//!
//! `runs/<name>/` holds the resolved `config.toml` and one folder per seed,
//! `seed-<s>/`, with one `<node>.safetensors` per node, `checkpoints/<node>/` and `logs/`.
//! A node's cache key hashes what its result depends on: its config section (see
//! [`crate::Config::stage_inputs`]), the seed, the checksums of its upstream artifacts and the
//! data set manifest. An artifact whose recorded key differs from the key computed now is stale.

use crate::artifact::{write_atomic, Artifact, ArtifactMeta};
use crate::config::Config;
use crate::error::{CoreError, Result};
use crate::hash::Hasher;
use crate::node::Node;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One run's folder.
#[derive(Debug, Clone)]
pub struct RunStore {
    /// `runs/<name>`.
    pub root: PathBuf,
    /// The run's name.
    pub name: String,
}

/// What is known about a node's artifact on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum Freshness {
    /// Present, intact, and built under the expected key.
    Fresh(ArtifactMeta),
    /// Not there.
    Missing,
    /// Intact but built from other inputs.
    Stale { reason: String },
    /// Unreadable, truncated, edited or foreign.
    Corrupt { reason: String },
}

impl RunStore {
    /// Opens (creating) `runs_dir/name`.
    pub fn open(runs_dir: &Path, name: &str) -> Result<Self> {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !name.starts_with('.');
        if !valid {
            return Err(CoreError::Config(format!(
                "run name `{name}` must be letters, digits, `-`, `_` or `.`"
            )));
        }
        let root = runs_dir.join(name);
        std::fs::create_dir_all(&root).map_err(|e| CoreError::io(&root, e))?;
        Ok(RunStore {
            root,
            name: name.to_string(),
        })
    }

    /// `runs/<name>/seed-<s>`.
    pub fn seed_dir(&self, seed: u64) -> PathBuf {
        self.root.join(format!("seed-{seed}"))
    }

    /// Where a node's artifact lives.
    pub fn artifact_path(&self, seed: u64, node: &Node) -> PathBuf {
        self.seed_dir(seed)
            .join(format!("{}.safetensors", node.name()))
    }

    /// Path of the resolved config.
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }

    /// Writes the resolved config atomically.
    pub fn save_config(&self, config: &Config) -> Result<()> {
        write_atomic(&self.config_path(), config.to_toml().as_bytes())
    }

    /// Checks a node's artifact against the key it should have now.
    pub fn freshness(&self, seed: u64, node: &Node, expected_key: &str) -> Freshness {
        let path = self.artifact_path(seed, node);
        if !path.exists() {
            return Freshness::Missing;
        }
        match Artifact::verify(&path) {
            Err(e) => Freshness::Corrupt {
                reason: e.to_string(),
            },
            Ok(meta) if meta.node != node.name() => Freshness::Corrupt {
                reason: format!("it was written by node `{}`", meta.node),
            },
            // An imported artifact stands for its source file, not for a config: nothing a
            // config changes makes it stale (only `--force` of its stage rebuilds it).
            Ok(meta) if is_imported(&meta) => Freshness::Fresh(meta),
            Ok(meta) if meta.cache_key != expected_key => Freshness::Stale {
                reason: "its config section or an upstream artifact changed".into(),
            },
            Ok(meta) => Freshness::Fresh(meta),
        }
    }

    /// Removes leftovers of interrupted writes (`.<file>.tmp-*`) below the run folder.
    pub fn clean_temporaries(&self) -> Result<usize> {
        fn walk(dir: &Path, n: &mut usize) -> std::io::Result<()> {
            for entry in std::fs::read_dir(dir)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    walk(&path, n)?;
                } else if entry
                    .file_name()
                    .to_str()
                    .is_some_and(|s| s.starts_with('.') && s.contains(".tmp-"))
                {
                    std::fs::remove_file(&path)?;
                    *n += 1;
                }
            }
            Ok(())
        }
        let mut n = 0;
        walk(&self.root, &mut n).map_err(|e| CoreError::io(&self.root, e))?;
        Ok(n)
    }
}

/// How the cache key of an imported artifact starts; the rest is its source file's SHA-256.
pub const IMPORTED_KEY_PREFIX: &str = "imported:";

/// The cache key of an artifact imported from a file with this SHA-256 (lower-case hex).
pub fn imported_key(sha256: &str) -> String {
    format!("{IMPORTED_KEY_PREFIX}{sha256}")
}

/// Whether an artifact was imported (`cargo xtask import`) rather than built by its stage.
pub fn is_imported(meta: &ArtifactMeta) -> bool {
    meta.cache_key.starts_with(IMPORTED_KEY_PREFIX)
}

/// The cache key of a node.
pub fn cache_key(
    node: &Node,
    seed: u64,
    stage_inputs: &str,
    upstream: &BTreeMap<String, String>,
    manifest_hash: &str,
) -> String {
    let mut h = Hasher::new();
    h.field(node.name())
        .field(seed.to_le_bytes())
        .field(stage_inputs)
        .field(manifest_hash);
    for (name, checksum) in upstream {
        h.field(name).field(checksum);
    }
    h.hex()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Stage;

    #[test]
    fn freshness_follows_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = RunStore::open(dir.path(), "t").unwrap();
        let node = Node::stage(Stage::Denoise);
        assert_eq!(store.freshness(0, &node, "k1"), Freshness::Missing);
        let meta = ArtifactMeta {
            node: "denoise".into(),
            cache_key: "k1".into(),
            ..Default::default()
        };
        let path = store.artifact_path(0, &node);
        Artifact::new(meta, BTreeMap::new()).save(&path).unwrap();
        assert!(matches!(
            store.freshness(0, &node, "k1"),
            Freshness::Fresh(_)
        ));
        assert!(matches!(
            store.freshness(0, &node, "k2"),
            Freshness::Stale { .. }
        ));
        std::fs::write(&path, b"xx").unwrap();
        assert!(matches!(
            store.freshness(0, &node, "k1"),
            Freshness::Corrupt { .. }
        ));
    }

    #[test]
    fn an_imported_artifact_is_fresh_whatever_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = RunStore::open(dir.path(), "t").unwrap();
        let node = Node::stage(Stage::Backbone);
        let meta = ArtifactMeta {
            node: "backbone".into(),
            cache_key: imported_key("ab12"),
            ..Default::default()
        };
        assert!(is_imported(&meta));
        Artifact::new(meta, BTreeMap::new())
            .save(&store.artifact_path(0, &node))
            .unwrap();
        assert!(matches!(
            store.freshness(0, &node, "any key"),
            Freshness::Fresh(_)
        ));
        // Written under another node's name it is still unusable there.
        let other = Node::stage(Stage::Simnet);
        std::fs::copy(
            store.artifact_path(0, &node),
            store.artifact_path(0, &other),
        )
        .unwrap();
        assert!(matches!(
            store.freshness(0, &other, "k"),
            Freshness::Corrupt { .. }
        ));
    }

    #[test]
    fn keys_depend_on_every_input() {
        let n = Node::stage(Stage::Simnet);
        let up = BTreeMap::from([("backbone".to_string(), "c1".to_string())]);
        let k = cache_key(&n, 0, "{}", &up, "m");
        assert_ne!(k, cache_key(&n, 1, "{}", &up, "m"));
        assert_ne!(k, cache_key(&n, 0, "{\"a\":1}", &up, "m"));
        assert_ne!(k, cache_key(&n, 0, "{}", &up, "m2"));
        let up2 = BTreeMap::from([("backbone".to_string(), "c2".to_string())]);
        assert_ne!(k, cache_key(&n, 0, "{}", &up2, "m"));
        assert_ne!(
            k,
            cache_key(&Node::stage(Stage::Denoise), 0, "{}", &up, "m")
        );
    }

    #[test]
    fn run_names_are_checked_and_temporaries_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        assert!(RunStore::open(dir.path(), "../x").is_err());
        let store = RunStore::open(dir.path(), "ok-1").unwrap();
        let mut a = Artifact::new(ArtifactMeta::default(), BTreeMap::new());
        a.write_uncommitted(&store.artifact_path(0, &Node::stage(Stage::Data)))
            .unwrap();
        assert_eq!(store.clean_temporaries().unwrap(), 1);
    }
}
