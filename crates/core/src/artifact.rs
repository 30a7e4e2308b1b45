//! Safetensors artifacts with provenance, checksums, schemas and atomic writes.
//!
//! An artifact is a safetensors file whose `__metadata__` records which node wrote it, with
//! which schema version, under which cache key, from which upstream artifacts, by which crate
//! version, how long it took and what it measured. A SHA-256 checksum over the metadata and
//! every tensor's bytes is stored too, so a truncated or hand-edited file is refused on load.
//! Files are written to a temporary name in the same folder and renamed into place, so a crash
//! mid-write leaves the previous artifact intact.

use crate::error::{CoreError, Result};
use crate::hash::Hasher;
use crate::node::Stage;
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The marker every simtrans artifact carries; a safetensors file without it is foreign.
pub const FORMAT: &str = "simtrans-artifact/1";

/// Provenance and results recorded with an artifact.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ArtifactMeta {
    /// The node that wrote it (`simnet`, `classifier-full`, `checkpoint`).
    pub node: String,
    /// The version of the node's tensor layout.
    pub schema_version: u32,
    /// The cache key it was built under.
    pub cache_key: String,
    /// Upstream node name → that artifact's checksum.
    pub upstream: BTreeMap<String, String>,
    /// Version of the crate that wrote it.
    pub crate_version: String,
    /// Wall time of the stage in seconds.
    pub wall_seconds: f64,
    /// Metrics as JSON.
    pub metrics: serde_json::Value,
    /// Extra string entries (class names, architecture, epoch, …).
    pub extra: BTreeMap<String, String>,
    /// SHA-256 over metadata and tensors; filled in by save and checked by load.
    pub checksum: String,
}

impl ArtifactMeta {
    fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("format".into(), FORMAT.into());
        m.insert("node".into(), self.node.clone());
        m.insert("schema_version".into(), self.schema_version.to_string());
        m.insert("cache_key".into(), self.cache_key.clone());
        m.insert(
            "upstream".into(),
            serde_json::to_string(&self.upstream).expect("string map serialises"),
        );
        m.insert("crate_version".into(), self.crate_version.clone());
        m.insert("wall_seconds".into(), format!("{}", self.wall_seconds));
        m.insert("metrics".into(), self.metrics.to_string());
        for (k, v) in &self.extra {
            m.insert(format!("extra.{k}"), v.clone());
        }
        m
    }

    fn from_map(m: &HashMap<String, String>, path: &Path) -> Result<Self> {
        let corrupt = |reason: String| CoreError::ArtifactCorrupt {
            path: path.to_path_buf(),
            reason,
        };
        let get = |k: &str| {
            m.get(k)
                .cloned()
                .ok_or_else(|| corrupt(format!("metadata has no `{k}`")))
        };
        if get("format")? != FORMAT {
            return Err(corrupt(format!("format is not {FORMAT}")));
        }
        let extra = m
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("extra.").map(|k| (k.to_string(), v.clone())))
            .collect();
        Ok(ArtifactMeta {
            node: get("node")?,
            schema_version: get("schema_version")?
                .parse()
                .map_err(|_| corrupt("schema_version is not a number".into()))?,
            cache_key: get("cache_key")?,
            upstream: serde_json::from_str(&get("upstream")?)
                .map_err(|e| corrupt(format!("upstream: {e}")))?,
            crate_version: get("crate_version")?,
            wall_seconds: get("wall_seconds")?
                .parse()
                .map_err(|_| corrupt("wall_seconds is not a number".into()))?,
            metrics: serde_json::from_str(&get("metrics")?)
                .map_err(|e| corrupt(format!("metrics: {e}")))?,
            extra,
            checksum: get("checksum")?,
        })
    }
}

/// The expected dtype and shape of one tensor (or of every tensor whose name starts with a
/// prefix, when `name` ends in `*`). `None` in a shape matches any size.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Option<usize>>,
}

impl TensorSpec {
    /// A spec; use `None` for free dimensions.
    pub fn new(name: impl Into<String>, dtype: DType, shape: &[Option<usize>]) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }
}

/// What a node's artifact must contain.
#[derive(Debug, Clone)]
pub struct ArtifactSchema {
    /// The stage whose artifacts these are (any variant), or `None` for checkpoints.
    pub stage: Option<Stage>,
    /// Layout version; bump when the tensors change meaning.
    pub version: u32,
    /// Required tensors.
    pub tensors: Vec<TensorSpec>,
}

impl ArtifactSchema {
    /// Schema of a stage's artifact.
    pub fn new(stage: Stage, version: u32, tensors: Vec<TensorSpec>) -> Self {
        ArtifactSchema {
            stage: Some(stage),
            version,
            tensors,
        }
    }

    /// Accepts any artifact of ours whatever its tensors (checkpoints, generic inspection).
    pub fn any() -> Self {
        ArtifactSchema {
            stage: None,
            version: 0,
            tensors: vec![],
        }
    }

    fn check(
        &self,
        meta: &ArtifactMeta,
        tensors: &BTreeMap<String, Tensor>,
        path: &Path,
    ) -> Result<()> {
        let Some(stage) = self.stage else {
            return Ok(());
        };
        let fail = |reason: String| CoreError::Schema {
            path: path.to_path_buf(),
            node: stage.name().to_string(),
            version: self.version,
            reason,
        };
        let belongs =
            meta.node == stage.name() || meta.node.starts_with(&format!("{}-", stage.name()));
        if !belongs {
            return Err(fail(format!("it was written by node `{}`", meta.node)));
        }
        if meta.schema_version != self.version {
            return Err(fail(format!("it has schema v{}", meta.schema_version)));
        }
        for spec in &self.tensors {
            let matches: Vec<(&String, &Tensor)> = match spec.name.strip_suffix('*') {
                Some(prefix) => tensors
                    .iter()
                    .filter(|(n, _)| n.starts_with(prefix))
                    .collect(),
                None => tensors.get_key_value(&spec.name).into_iter().collect(),
            };
            if matches.is_empty() {
                return Err(fail(format!("tensor `{}` is missing", spec.name)));
            }
            for (name, t) in matches {
                if t.dtype() != spec.dtype {
                    return Err(fail(format!(
                        "tensor `{name}` is {:?}, expected {:?}",
                        t.dtype(),
                        spec.dtype
                    )));
                }
                let dims = t.dims();
                let ok = dims.len() == spec.shape.len()
                    && dims
                        .iter()
                        .zip(&spec.shape)
                        .all(|(d, s)| s.is_none_or(|s| s == *d));
                if !ok {
                    return Err(fail(format!(
                        "tensor `{name}` has shape {dims:?}, expected {:?}",
                        spec.shape
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A tensor already flattened to little-endian bytes, ready to hash and serialise.
struct RawTensor {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &RawTensor {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn checksum<'a>(
    meta: &BTreeMap<String, String>,
    tensors: impl Iterator<Item = (&'a str, StDtype, &'a [usize], &'a [u8])>,
) -> String {
    let mut h = Hasher::new();
    for (k, v) in meta {
        if k != "checksum" {
            h.field(k).field(v);
        }
    }
    for (name, dtype, shape, data) in tensors {
        h.field(name).field(format!("{dtype:?}{shape:?}"));
        h.field((data.len() as u64).to_le_bytes());
        h.raw(data);
    }
    h.hex()
}

/// A loaded or to-be-written artifact.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub meta: ArtifactMeta,
    pub tensors: BTreeMap<String, Tensor>,
    /// Where it was loaded from, for error messages.
    pub path: Option<PathBuf>,
}

impl Artifact {
    /// A new artifact.
    pub fn new(meta: ArtifactMeta, tensors: BTreeMap<String, Tensor>) -> Self {
        Artifact {
            meta,
            tensors,
            path: None,
        }
    }

    /// One tensor by name, with an error naming the artifact when absent.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| CoreError::ArtifactCorrupt {
                path: self.path.clone().unwrap_or_default(),
                reason: format!("tensor `{name}` is missing from node `{}`", self.meta.node),
            })
    }

    /// Serialises the artifact and fills in its checksum.
    fn serialize(&mut self) -> Result<Vec<u8>> {
        let mut raws = BTreeMap::new();
        for (name, t) in &self.tensors {
            let t = t.contiguous()?;
            let data = View::data(&&t).into_owned();
            raws.insert(
                name.clone(),
                RawTensor {
                    dtype: View::dtype(&&t),
                    shape: t.dims().to_vec(),
                    data,
                },
            );
        }
        let mut map = self.meta.to_map();
        self.meta.checksum = checksum(
            &map,
            raws.iter()
                .map(|(n, r)| (n.as_str(), r.dtype, r.shape.as_slice(), r.data.as_slice())),
        );
        map.insert("checksum".into(), self.meta.checksum.clone());
        safetensors::tensor::serialize(
            raws.iter().map(|(n, r)| (n.as_str(), r)),
            Some(map.into_iter().collect()),
        )
        .map_err(|e| CoreError::Config(format!("safetensors serialisation failed: {e}")))
    }

    /// Writes the artifact to a temporary file beside `path` and returns that file's path,
    /// without making it visible under `path`. [`Artifact::save`] is this plus [`commit`].
    pub fn write_uncommitted(&mut self, path: &Path) -> Result<PathBuf> {
        let bytes = self.serialize()?;
        write_temp(path, &bytes)
    }

    /// Writes the artifact atomically to `path`.
    pub fn save(&mut self, path: &Path) -> Result<()> {
        let tmp = self.write_uncommitted(path)?;
        commit(&tmp, path)?;
        self.path = Some(path.to_path_buf());
        Ok(())
    }

    /// Reads the metadata and verifies the checksum without creating tensors.
    pub fn verify(path: &Path) -> Result<ArtifactMeta> {
        let bytes = read(path)?;
        let (meta, _) = parse(&bytes, path)?;
        Ok(meta)
    }

    /// Loads, verifies and validates an artifact against a schema.
    pub fn load(path: &Path, schema: &ArtifactSchema, device: &Device) -> Result<Self> {
        use candle_core::safetensors::Load;
        let bytes = read(path)?;
        let (meta, st) = parse(&bytes, path)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            tensors.insert(name.to_string(), view.load(device)?);
        }
        schema.check(&meta, &tensors, path)?;
        Ok(Artifact {
            meta,
            tensors,
            path: Some(path.to_path_buf()),
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| CoreError::io(path, e))
}

fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<(ArtifactMeta, SafeTensors<'a>)> {
    let corrupt = |reason: String| CoreError::ArtifactCorrupt {
        path: path.to_path_buf(),
        reason,
    };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| corrupt(format!("not a readable safetensors file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
    let map = header
        .metadata()
        .clone()
        .ok_or_else(|| corrupt("no simtrans metadata".into()))?;
    let meta = ArtifactMeta::from_map(&map, path)?;
    let sorted: BTreeMap<String, String> = map.into_iter().collect();
    let mut views: Vec<_> = st.iter().collect();
    views.sort_by(|a, b| a.0.cmp(b.0));
    let shapes: Vec<Vec<usize>> = views.iter().map(|(_, v)| v.shape().to_vec()).collect();
    let actual = checksum(
        &sorted,
        views
            .iter()
            .zip(&shapes)
            .map(|((n, v), s)| (*n, v.dtype(), s.as_slice(), v.data())),
    );
    if actual != meta.checksum {
        return Err(corrupt(
            "checksum mismatch: the file was modified after it was written".into(),
        ));
    }
    Ok((meta, st))
}

/// Writes bytes to a fresh temporary file in the folder of `path` and syncs it.
pub fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    let file_name = path
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("artifact");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".{file_name}.tmp-{}-{nanos}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| CoreError::io(&tmp, e))?;
    f.sync_all().map_err(|e| CoreError::io(&tmp, e))?;
    Ok(tmp)
}

/// Renames a temporary file into place (atomic on POSIX file systems).
pub fn commit(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).map_err(|e| CoreError::io(path, e))
}

/// Writes bytes atomically (temporary file, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_temp(path, bytes)?;
    commit(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(value: f32) -> Artifact {
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            Tensor::full(value, (2, 3), &Device::Cpu).unwrap(),
        );
        tensors.insert(
            "ids".to_string(),
            Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap(),
        );
        let meta = ArtifactMeta {
            node: "simnet".into(),
            schema_version: 1,
            cache_key: "k".into(),
            crate_version: "0.1.0".into(),
            metrics: serde_json::json!({"f1": 0.5}),
            ..Default::default()
        };
        Artifact::new(meta, tensors)
    }

    fn schema() -> ArtifactSchema {
        ArtifactSchema::new(
            Stage::Simnet,
            1,
            vec![
                TensorSpec::new("w", DType::F32, &[Some(2), None]),
                TensorSpec::new("ids", DType::U32, &[None]),
            ],
        )
    }

    #[test]
    fn round_trip_keeps_tensors_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("simnet.safetensors");
        let mut a = sample(1.5);
        a.save(&path).unwrap();
        let b = Artifact::load(&path, &schema(), &Device::Cpu).unwrap();
        assert_eq!(b.meta, a.meta);
        assert_eq!(
            b.tensor("w").unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![1.5f32; 3]; 2]
        );
        assert_eq!(
            b.tensor("ids").unwrap().to_vec1::<u32>().unwrap(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn a_crash_before_rename_leaves_the_previous_artifact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("simnet.safetensors");
        sample(1.0).save(&path).unwrap();
        let tmp = sample(2.0).write_uncommitted(&path).unwrap();
        assert!(tmp.exists());
        let b = Artifact::load(&path, &schema(), &Device::Cpu).unwrap();
        assert_eq!(b.tensor("w").unwrap().to_vec2::<f32>().unwrap()[0][0], 1.0);
    }

    #[test]
    fn truncation_and_edits_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("simnet.safetensors");
        sample(1.0).save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();

        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = Artifact::load(&path, &schema(), &Device::Cpu).unwrap_err();
        assert!(matches!(err, CoreError::ArtifactCorrupt { .. }), "{err}");

        // Flip one byte of tensor data (the last byte belongs to a tensor).
        let mut edited = bytes.clone();
        *edited.last_mut().unwrap() ^= 0x40;
        std::fs::write(&path, &edited).unwrap();
        let err = Artifact::verify(&path).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");

        // Edit the metadata in place (same length, so the header still parses).
        let needle = b"\"cache_key\":\"k\"";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap();
        let mut edited = bytes.clone();
        edited[at + needle.len() - 2] = b'x';
        std::fs::write(&path, &edited).unwrap();
        let err = Artifact::verify(&path).unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn foreign_files_and_wrong_schemas_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a", t)]), &path).unwrap();
        let err = Artifact::verify(&path).unwrap_err().to_string();
        assert!(err.contains("corrupt or foreign"), "{err}");

        sample(1.0).save(&path).unwrap();
        let wrong_shape = ArtifactSchema::new(
            Stage::Simnet,
            1,
            vec![TensorSpec::new("w", DType::F32, &[Some(3), None])],
        );
        let err = Artifact::load(&path, &wrong_shape, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shape"), "{err}");
        let wrong_stage = ArtifactSchema::new(Stage::Denoise, 1, vec![]);
        let err = Artifact::load(&path, &wrong_stage, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("written by node `simnet`"), "{err}");
        let missing = ArtifactSchema::new(
            Stage::Simnet,
            1,
            vec![TensorSpec::new("head.*", DType::F32, &[None])],
        );
        let err = Artifact::load(&path, &missing, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
