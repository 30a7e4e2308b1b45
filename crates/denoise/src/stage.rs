//! The denoise stage (step 2): similarity matrices and sample weights of every novel category.
//!
//! For each novel category, its web images (sorted by id) go through the SimNet's backbone once
//! with the test transform and BatchNorm in eval mode; `S[i, j] = sim([f_i ; f_j])` is then
//! computed in row blocks with the factorised head. The artifact keeps, per category, the image
//! ids and `S`, so that any weight scheme can be derived later ([`SampleWeights`]), plus the
//! default schemes' weights for inspection. Where the noise of the web images is known, the
//! ROC-AUC of each scheme's weights (clean = positive) goes into the metrics.
//!
//! For the transfer check ([`crate::transfer`]) it also keeps the similarities of a sample of
//! web images across categories: `transfer.ids [M]` (the same number of images from every
//! category, `denoise.transfer_images` in all, drawn with the node's seeded generator) and
//! `transfer.S [M, M]`. [`transfer_check`] reads them back with the graph term's settings.

use crate::auc::weight_auc;
use crate::similarity::similarity_matrix;
use crate::transfer::{GraphSettings, TransferCheck};
use crate::weights::{weights, WeightScheme};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use simtrans_core::{
    Artifact, ArtifactSchema, CoreError, Stage, StageContext, StageOutput, TensorSpec,
};
use simtrans_data::{DataIndex, Loader, NoiseKind, Split};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Layout version of `denoise.safetensors` (2: the transfer sample).
pub const SCHEMA_VERSION: u32 = 2;

/// What `denoise.safetensors` must hold.
pub fn schema() -> ArtifactSchema {
    ArtifactSchema::new(
        Stage::Denoise,
        SCHEMA_VERSION,
        vec![
            TensorSpec::new("ids", DType::U32, &[None]),
            TensorSpec::new("class_offsets", DType::U32, &[None]),
            TensorSpec::new("S.*", DType::F32, &[None, None]),
            TensorSpec::new("weights.*", DType::F32, &[None]),
            TensorSpec::new("transfer.ids", DType::U32, &[None]),
            TensorSpec::new("transfer.S", DType::F32, &[None, None]),
        ],
    )
}

/// The weight schemes stored in the artifact for inspection and the report.
pub const STORED_SCHEMES: [&str; 3] = ["savg1", "avg1", "avgR"];

/// Runs step 2.
pub fn run(ctx: &StageContext) -> anyhow::Result<StageOutput> {
    let data = Arc::new(DataIndex::from_artifact(
        &ctx.load_upstream("data", &DataIndex::schema())?,
    )?);
    let simnet = simtrans_simnet::SimNet::load(
        &ctx.load_upstream("simnet", &simtrans_simnet::schema())?,
        &ctx.device,
    )?;
    let loader = Loader::new(data.clone(), &ctx.config.data)?;
    let cfg = &ctx.config.denoise;
    let schemes: Vec<(String, WeightScheme)> = STORED_SCHEMES
        .iter()
        .map(|n| Ok((n.to_string(), WeightScheme::parse(n, cfg.top_r)?)))
        .collect::<crate::Result<_>>()?;

    let web = data.items_in(Split::NovelWeb);
    let mut all_ids: Vec<u32> = vec![];
    let mut offsets: Vec<u32> = vec![0];
    let mut tensors = BTreeMap::new();
    let mut stored: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    // Each category's web images, sorted; their feature batches are decoded ahead across
    // category boundaries.
    let mut per_class: Vec<Vec<u32>> = vec![];
    for &class in &data.novel_classes {
        let mut ids: Vec<u32> = web
            .iter()
            .filter(|it| it.label == class)
            .map(|it| it.id)
            .collect();
        ids.sort_unstable();
        if ids.is_empty() {
            anyhow::bail!(
                "novel category `{}` has no web images in the data artifact; check the data set's web folder",
                data.class_names[class as usize]
            );
        }
        per_class.push(ids);
    }
    let chunk = cfg.feature_batch.max(1);
    let batches: Vec<Vec<u32>> = per_class
        .iter()
        .flat_map(|ids| ids.chunks(chunk).map(|c| c.to_vec()))
        .collect();
    let mut prefetched = loader.prefetch_test(batches, &ctx.device);
    let per_sample = (cfg.transfer_images / per_class.len().max(1)).max(1);
    let mut sample_rng = ctx.rng("transfer-sample", 0);
    let (mut sample_ids, mut sample_feats) = (vec![], vec![]);
    let bar = simtrans_core::progress::bar(data.novel_classes.len() as u64, "denoise: categories");
    for (k, ids) in per_class.into_iter().enumerate() {
        let mut feats = vec![];
        for _ in 0..ids.len().div_ceil(chunk) {
            let (_, x) = prefetched.next().ok_or_else(|| {
                anyhow::anyhow!("the loader ended before the last feature batch")
            })??;
            feats.push(simnet.features(&x)?);
        }
        let feats = Tensor::cat(&feats, 0)?;
        let mut picks: Vec<u32> = (0..ids.len() as u32).collect();
        picks.shuffle(&mut sample_rng);
        picks.truncate(per_sample);
        picks.sort_unstable();
        sample_ids.extend(picks.iter().map(|&i| ids[i as usize]));
        let picks = Tensor::new(picks, feats.device())?;
        sample_feats.push(feats.index_select(&picks, 0)?);
        let s = similarity_matrix(&feats, cfg.row_block, |rows, all| {
            simnet.similarity_matrix(rows, all)
        })?
        .to_dtype(DType::F32)?;
        for (name, scheme) in &schemes {
            let w = weights(&s, *scheme)?.to_vec1::<f32>()?;
            stored.entry(name.clone()).or_default().extend(w);
        }
        tensors.insert(format!("S.{k}"), s.to_device(&Device::Cpu)?);
        all_ids.extend(&ids);
        offsets.push(all_ids.len() as u32);
        bar.inc(1);
    }
    bar.finish_and_clear();

    // Similarities of the sample across categories, for the transfer check.
    let sample_feats = Tensor::cat(&sample_feats, 0)?;
    let sample_s = similarity_matrix(&sample_feats, cfg.row_block, |rows, all| {
        simnet.similarity_matrix(rows, all)
    })?
    .to_dtype(DType::F32)?
    .to_device(&Device::Cpu)?;
    let m = sample_ids.len();
    tensors.insert(
        "transfer.ids".into(),
        Tensor::from_vec(sample_ids, m, &Device::Cpu)?,
    );
    tensors.insert("transfer.S".into(), sample_s);

    // Weight quality where the noise ground truth is known.
    let mut auc = serde_json::Map::new();
    let kinds: Vec<Option<NoiseKind>> = all_ids
        .iter()
        .map(|id| {
            data.item(*id)
                .map(|it| it.noise)
                .filter(|n| *n != NoiseKind::Unknown)
        })
        .collect();
    if kinds.iter().all(Option::is_some) {
        let kinds: Vec<u8> = kinds
            .into_iter()
            .map(|k| k.map_or(0, |k| k as u8))
            .collect();
        for (name, w) in &stored {
            let report = weight_auc(w, &kinds, NoiseKind::Clean as u8)?;
            let mut m = serde_json::Map::new();
            m.insert("overall".into(), serde_json::json!(report.overall));
            for k in &report.per_kind {
                let kind = NoiseKind::from_u8(k.kind).map_or("unknown", |n| n.name());
                m.insert(kind.to_string(), serde_json::json!(k.auc));
            }
            auc.insert(name.clone(), serde_json::Value::Object(m));
        }
    }

    let n = all_ids.len();
    tensors.insert("ids".into(), Tensor::from_vec(all_ids, n, &Device::Cpu)?);
    let c = offsets.len();
    tensors.insert(
        "class_offsets".into(),
        Tensor::from_vec(offsets, c, &Device::Cpu)?,
    );
    for (name, w) in stored {
        tensors.insert(
            format!("weights.{name}"),
            Tensor::from_vec(w, n, &Device::Cpu)?,
        );
    }
    Ok(StageOutput {
        tensors,
        metrics: serde_json::json!({ "web_images": n, "weights_auc": auc }),
        meta: BTreeMap::from([("top_r".to_string(), cfg.top_r.to_string())]),
    })
}

/// The transfer check of a denoise artifact: its cross-category sample, the web and (where
/// every sampled image's is known) true labels from the data index, and the graph term's settings.
pub fn transfer_check(
    denoise: &Artifact,
    data: &DataIndex,
    graph: GraphSettings,
) -> anyhow::Result<TransferCheck> {
    let ids = denoise.tensor("transfer.ids")?.to_vec1::<u32>()?;
    let s = denoise
        .tensor("transfer.S")?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let items = ids
        .iter()
        .map(|&id| {
            data.item(id).ok_or_else(|| {
                anyhow::anyhow!(
                    "transfer sample image {id} is not in the data index; rebuild the denoise stage"
                )
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let web: Vec<u32> = items.iter().map(|it| it.label).collect();
    let truth: Option<Vec<Option<u32>>> = items
        .iter()
        .all(|it| it.noise != NoiseKind::Unknown)
        .then(|| items.iter().map(|it| it.true_label).collect());
    let web_items = data.items_in(Split::NovelWeb);
    let sizes: Vec<usize> = data
        .novel_classes
        .iter()
        .map(|&c| web_items.iter().filter(|it| it.label == c).count())
        .collect();
    Ok(crate::transfer::check(
        &s,
        &web,
        truth.as_deref(),
        &sizes,
        graph,
    )?)
}

/// [`transfer_check`] of the denoise and data artifacts at these paths, with the graph term's
/// settings of `[classifier]`: what the orchestrator's warning and the eval stage both read.
pub fn transfer_check_files(
    denoise: &std::path::Path,
    data: &std::path::Path,
    classifier: &simtrans_core::config::ClassifierConfig,
) -> anyhow::Result<TransferCheck> {
    let denoise = Artifact::load(denoise, &schema(), &Device::Cpu)?;
    let data =
        DataIndex::from_artifact(&Artifact::load(data, &DataIndex::schema(), &Device::Cpu)?)?;
    transfer_check(&denoise, &data, GraphSettings::from_config(classifier))
}

/// Per-image weights of one scheme, looked up by stable image id.
#[derive(Debug, Clone)]
pub struct SampleWeights {
    scheme: String,
    by_id: HashMap<u32, f32>,
}

impl SampleWeights {
    /// Derives the weights of `scheme` from the similarity matrices of a denoise artifact.
    pub fn from_artifact(a: &Artifact, scheme: WeightScheme) -> crate::Result<Self> {
        let corrupt = |reason: String| CoreError::ArtifactCorrupt {
            path: a.path.clone().unwrap_or_default(),
            reason,
        };
        let ids = a.tensor("ids")?.to_vec1::<u32>()?;
        let offsets = a.tensor("class_offsets")?.to_vec1::<u32>()?;
        let mut by_id = HashMap::with_capacity(ids.len());
        for k in 0..offsets.len().saturating_sub(1) {
            let (lo, hi) = (offsets[k] as usize, offsets[k + 1] as usize);
            let s = a.tensor(&format!("S.{k}"))?;
            if hi > ids.len() || s.dims() != [hi - lo, hi - lo] {
                return Err(corrupt(format!("S.{k} does not match class_offsets")).into());
            }
            let w = weights(&s.to_dtype(DType::F32)?, scheme)?.to_vec1::<f32>()?;
            by_id.extend(ids[lo..hi].iter().copied().zip(w));
        }
        Ok(SampleWeights {
            scheme: scheme.name(),
            by_id,
        })
    }

    /// All ones (unweighted training), for any id.
    pub fn uniform() -> Self {
        SampleWeights {
            scheme: "none".into(),
            by_id: HashMap::new(),
        }
    }

    /// The weight of an image; a missing id is an error (the reference silently used 1.0).
    pub fn get(&self, id: u32) -> crate::Result<f32> {
        if self.scheme == "none" {
            return Ok(1.0);
        }
        self.by_id
            .get(&id)
            .copied()
            .ok_or(crate::DenoiseError::MissingWeight {
                id,
                scheme: self.scheme.clone(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simtrans_core::ArtifactMeta;

    fn artifact() -> Artifact {
        let dev = Device::Cpu;
        let mut t = BTreeMap::new();
        t.insert(
            "ids".to_string(),
            Tensor::new(&[10u32, 11, 12, 20, 21], &dev).unwrap(),
        );
        t.insert(
            "class_offsets".to_string(),
            Tensor::new(&[0u32, 3, 5], &dev).unwrap(),
        );
        let s0 = Tensor::new(&[[1f32, 0.8, 0.1], [0.8, 1.0, 0.2], [0.1, 0.3, 1.0]], &dev).unwrap();
        let s1 = Tensor::new(&[[1f32, 0.5], [0.5, 1.0]], &dev).unwrap();
        t.insert("S.0".to_string(), s0);
        t.insert("S.1".to_string(), s1);
        t.insert(
            "weights.savg1".to_string(),
            Tensor::ones(5, DType::F32, &dev).unwrap(),
        );
        Artifact::new(
            ArtifactMeta {
                node: "denoise".into(),
                schema_version: 1,
                ..Default::default()
            },
            t,
        )
    }

    #[test]
    fn weights_are_per_category_and_keyed_by_id() {
        let a = artifact();
        let w = SampleWeights::from_artifact(&a, WeightScheme::Avg1).unwrap();
        // Category 0 row means 0.6333, 0.6667, 0.4667 → divided by their mean 0.5889.
        let expect = [1.9 / 3.0, 2.0 / 3.0, 1.4 / 3.0];
        let m: f32 = expect.iter().sum::<f32>() / 3.0;
        for (id, e) in [10u32, 11, 12].iter().zip(expect) {
            assert!((w.get(*id).unwrap() - e / m).abs() < 1e-5);
        }
        // Category 1 is symmetric: both weights 1.
        assert!((w.get(21).unwrap() - 1.0).abs() < 1e-6);
        let err = w.get(99).unwrap_err().to_string();
        assert!(err.contains("99"), "{err}");
        assert_eq!(SampleWeights::uniform().get(99).unwrap(), 1.0);
    }
}
