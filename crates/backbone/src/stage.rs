//! Step 0: fine-tune the backbone, and rebuild networks from its artifact.
//!
//! The reference's `naive/train.py` fine-tunes an ImageNet ResNet-50 with a new `fc` and plain
//! cross-entropy. Its script trains on the novel web images; the authors' answer in their issue #2
//! says SimNet should start from a network trained on the clean base classes, which is our
//! default (`backbone.pretrain_on = "base"`); `"noisy_novel"` is the script's choice (and then
//! this step is also the web-only baseline). Training uses the reference's SGD (momentum,
//! coupled weight decay, step schedule, momentum reset every epoch when configured), keeps a
//! checkpoint after every epoch and resumes from the newest one, and stops with
//! [`CoreError::NonFinite`] on a NaN or infinite loss, before that epoch's checkpoint is
//! written, so the last good one stays.
//!
//! Batches: `sampler::shuffled_batches` without dropping the last batch (PyTorch's default),
//! except that a last batch of one image is skipped, since training-mode BatchNorm needs two.
//! Augmentation randomness of step `s` of epoch `e` comes from `ctx.rng("augment", e)`, the batch
//! order from `ctx.rng("batches", e)`, so a resumed run draws exactly what an uninterrupted one
//! would.
//!
//! The artifact holds every variable of the network under its torchvision name (`conv1.weight`,
//! …, `fc.bias`; BatchNorm running statistics included) and the metadata in [`meta`].

use crate::error::{BackboneError, Result};
use crate::resnet::{arch_name, parse_arch, Arch, ResNet, DTYPE};
use crate::trainable_vars;
use crate::weights::{load_tensors, LoadError};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use rand::Rng;
use simtrans_core::artifact::{Artifact, ArtifactSchema, TensorSpec};
use simtrans_core::checkpoint::varmap_tensors;
use simtrans_core::config::BackboneConfig;
use simtrans_core::stage::{Stage, StageContext, StageOutput};
use simtrans_core::CoreError;
use simtrans_data::{prefetch, sampler, Augment, DataIndex, Loader, Split};
use simtrans_ops::optim::{step_lr, Sgd};
use simtrans_ops::BnMode;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Version of the artifact layout.
pub const SCHEMA_VERSION: u32 = 1;

/// Metadata keys of a backbone artifact.
pub mod meta {
    /// Architecture name (`resnet50`, `small`, …; see [`crate::resnet::arch_name`]).
    pub const ARCH: &str = "arch";
    /// First-stage width of the small architecture.
    pub const SMALL_WIDTH: &str = "small_width";
    /// Rows of `fc` (number of classes it was trained on).
    pub const NUM_CLASSES: &str = "num_classes";
    /// Size of the pooled feature.
    pub const FEATURE_DIM: &str = "feature_dim";
    /// JSON list of the global class ids of the rows of `fc`, in order.
    pub const CLASSES: &str = "classes";
    /// `base` or `noisy_novel`.
    pub const PRETRAIN_ON: &str = "pretrain_on";
    /// The `backbone.weights` setting training started from.
    pub const WEIGHTS: &str = "weights";
}

/// What a backbone artifact must contain.
pub fn schema() -> ArtifactSchema {
    let f = DType::F32;
    ArtifactSchema::new(
        Stage::Backbone,
        SCHEMA_VERSION,
        vec![
            TensorSpec::new("conv1.weight", f, &[None, Some(3), None, None]),
            TensorSpec::new("bn1.weight", f, &[None]),
            TensorSpec::new("bn1.running_mean", f, &[None]),
            TensorSpec::new("bn1.running_var", f, &[None]),
            TensorSpec::new("layer4.0.conv1.weight", f, &[None, None, None, None]),
            TensorSpec::new("fc.weight", f, &[None, None]),
            TensorSpec::new("fc.bias", f, &[None]),
        ],
    )
}

fn meta_value<'a>(artifact: &'a Artifact, key: &str) -> Result<&'a str> {
    artifact
        .meta
        .extra
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| {
            BackboneError::Config(format!(
                "{}: metadata `{key}` is missing; rebuild the backbone with `--force backbone`",
                artifact
                    .path
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "backbone artifact".into())
            ))
        })
}

/// The architecture and small width recorded in a backbone artifact.
pub fn artifact_arch(artifact: &Artifact) -> Result<(Arch, usize)> {
    let name = meta_value(artifact, meta::ARCH)?;
    let arch = parse_arch(name).ok_or_else(|| {
        BackboneError::Config(format!("backbone artifact has unknown arch `{name}`"))
    })?;
    let width = meta_value(artifact, meta::SMALL_WIDTH)?
        .parse()
        .map_err(|_| {
            BackboneError::Config("backbone artifact: small_width is not a number".into())
        })?;
    Ok((arch, width))
}

/// Rebuilds the network of a backbone artifact on `device`, with every tensor loaded
/// (running statistics included), and returns it with its VarMap (ready to train further).
///
/// `num_classes = None` gives the trunk only (features); `Some(n)` with the artifact's own class
/// count keeps its trained `fc`; another `n` gets a fresh `fc` initialised as PyTorch's `Linear`,
/// seeded from the artifact's checksum (deterministic for a given artifact).
pub fn load_model(
    artifact: &Artifact,
    num_classes: Option<usize>,
    device: &Device,
) -> Result<(ResNet, VarMap)> {
    let (arch, width) = artifact_arch(artifact)?;
    let trained_classes = artifact
        .tensors
        .get("fc.weight")
        .map(|w| w.dim(0))
        .transpose()?;
    let keep_fc = num_classes.is_some() && num_classes == trained_classes;
    let varmap = VarMap::new();
    let seed =
        u64::from_str_radix(artifact.meta.checksum.get(..16).unwrap_or("0"), 16).unwrap_or(0);
    let vb = simtrans_core::seed::var_builder(&varmap, seed, "backbone-fc", DTYPE, device);
    let net = ResNet::new(arch, width, num_classes, vb)?;
    let tensors: HashMap<String, Tensor> = artifact
        .tensors
        .iter()
        .filter(|(k, _)| keep_fc || !k.starts_with("fc."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let skip: &[&str] = if keep_fc { &[] } else { &["fc."] };
    load_tensors(&varmap, &tensors, skip).map_err(|e| match e {
        LoadError::Problems(problems) => BackboneError::StateDict {
            path: artifact.path.clone().unwrap_or_default(),
            problems,
        },
        LoadError::Candle(e) => e.into(),
    })?;
    Ok((net, varmap))
}

/// Top-1 accuracy of `net` (eval mode, test transform) on `(id, local label)` pairs.
pub fn accuracy(
    net: &ResNet,
    loader: &Loader,
    items: &[(u32, u32)],
    batch: usize,
    device: &Device,
) -> Result<f64> {
    if items.is_empty() {
        return Ok(f64::NAN);
    }
    let mut correct = 0usize;
    let chunks: Vec<&[(u32, u32)]> = items.chunks(batch.max(1)).collect();
    let ids = chunks
        .iter()
        .map(|c| c.iter().map(|p| p.0).collect())
        .collect();
    let batches = loader.prefetch_test(ids, device);
    for (chunk, item) in chunks.into_iter().zip(batches) {
        let (_, x) = item?;
        let (logits, _) = simtrans_ops::grad::inference(|| net.forward(&x, BnMode::Eval))?;
        let pred = logits
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?;
        correct += pred.iter().zip(chunk).filter(|(p, c)| **p == c.1).count();
    }
    Ok(correct as f64 / items.len() as f64)
}

/// One epoch's work for [`train_epoch`].
pub struct Epoch<'a> {
    /// The epoch's number (for errors).
    pub index: usize,
    /// Image ids per step.
    pub batches: Vec<Vec<u32>>,
    /// One augmentation seed per batch.
    pub seeds: Vec<u64>,
    /// Each image's label.
    pub labels: &'a HashMap<u32, u32>,
    /// Where the stage's checkpoints are (for errors).
    pub checkpoint_dir: &'a std::path::Path,
}

/// What an epoch of [`train_epoch`] saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct EpochStats {
    /// Sum over images of the cross-entropy.
    pub loss_sum: f64,
    /// Correct training predictions (before each update).
    pub correct: usize,
    /// Images trained on.
    pub seen: usize,
    /// Steps taken.
    pub steps: usize,
    /// How long the loop waited for decoded batches, out of the epoch.
    pub input: simtrans_data::InputWait,
}

/// One epoch of step-0 training: each batch of at least two images (smaller ones are skipped:
/// BatchNorm) is decoded ahead on a background thread, then forward in training mode,
/// cross-entropy, backward and the SGD update; the loss is read once the update is queued, so
/// the host waits for the device once per step. `on_step(k)` follows step k (progress). A
/// non-finite loss stops the epoch with [`CoreError::NonFinite`], before the caller's
/// checkpoint could take it in. `cargo xtask bench` times this same loop on image files.
pub fn train_epoch(
    net: &ResNet,
    sgd: &mut Sgd,
    loader: &Loader,
    epoch: Epoch,
    device: &Device,
    mut on_step: impl FnMut(usize),
) -> Result<EpochStats> {
    assert_eq!(
        epoch.batches.len(),
        epoch.seeds.len(),
        "train_epoch: one seed per batch"
    );
    let (steps, kept): (Vec<usize>, Vec<(Vec<u32>, u64)>) = epoch
        .batches
        .into_iter()
        .zip(epoch.seeds)
        .enumerate()
        .filter(|(_, (b, _))| b.len() >= 2)
        .unzip();
    let (kept, seeds): (Vec<_>, Vec<_>) = kept.into_iter().unzip();
    let mut prefetched = loader.prefetch(kept, seeds, Augment::Train, prefetch::DEPTH, device);
    let mut stats = EpochStats::default();
    for (step, item) in steps.into_iter().zip(&mut prefetched) {
        let (batch, x) = item?;
        let y: Vec<u32> = batch.iter().map(|id| epoch.labels[id]).collect();
        let y = Tensor::new(y.as_slice(), device)?;
        let (logits, _) = net.forward(&x, BnMode::Train)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        let hits = logits
            .argmax(D::Minus1)?
            .eq(&y)?
            .to_dtype(DType::F32)?
            .sum_all()?;
        sgd.step(&simtrans_ops::grad::backward(&loss)?)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(CoreError::NonFinite {
                what: "backbone training loss".into(),
                epoch: epoch.index,
                step,
                checkpoint_dir: epoch.checkpoint_dir.to_path_buf(),
            }
            .into());
        }
        stats.loss_sum += value * batch.len() as f64;
        stats.correct += hits.to_scalar::<f32>()? as usize;
        stats.seen += batch.len();
        stats.steps += 1;
        on_step(step);
    }
    stats.input = prefetched.input_wait();
    Ok(stats)
}

/// Step 0 (see the module documentation).
pub fn run(ctx: &StageContext) -> Result<StageOutput> {
    let cfg = &ctx.config.backbone;
    let oc = &cfg.optim;
    let device = &ctx.device;
    let index = Arc::new(DataIndex::from_artifact(
        &ctx.load_upstream("data", &DataIndex::schema())?,
    )?);
    let sets = Sets::new(&index, cfg)?;
    let loader = Loader::new(index.clone(), &ctx.config.data)?;
    let (varmap, net) = init_model(ctx, sets.classes.len())?;
    let mut sgd = Sgd::new(trainable_vars(&varmap), oc.lr, oc.momentum, oc.weight_decay);
    let (mut history, start) = resume(ctx, &varmap, &mut sgd)?;
    for epoch in start..oc.epochs {
        if oc.reset_momentum {
            sgd.reset_momentum();
        }
        sgd.lr = step_lr(oc.lr, oc.lr_decay, oc.lr_step, epoch);
        let batches = sampler::shuffled_batches(
            &sets.ids,
            cfg.batch_size,
            false,
            &mut ctx.rng("batches", epoch as u64),
        );
        // One augmentation seed per batch, in order, skipped batches included.
        let mut aug_rng = ctx.rng("augment", epoch as u64);
        let seeds: Vec<u64> = batches.iter().map(|_| aug_rng.random()).collect();
        let bar = simtrans_core::progress::bar(
            batches.len() as u64,
            format!("backbone epoch {}", epoch + 1),
        );
        let checkpoint_dir = ctx.checkpoints().dir;
        let work = Epoch {
            index: epoch,
            batches,
            seeds,
            labels: &sets.labels,
            checkpoint_dir: &checkpoint_dir,
        };
        let stats = train_epoch(&net, &mut sgd, &loader, work, device, |step| {
            bar.set_position(step as u64 + 1)
        })?;
        bar.finish_and_clear();
        let val_acc = accuracy(&net, &loader, &sets.val, cfg.batch_size, device)?;
        let record = serde_json::json!({
            "epoch": epoch + 1,
            "lr": sgd.lr,
            "train_loss": stats.loss_sum / stats.seen.max(1) as f64,
            "train_acc": stats.correct as f64 / stats.seen.max(1) as f64,
            "val_acc": if val_acc.is_nan() { serde_json::Value::Null } else { val_acc.into() },
        });
        tracing::info!("backbone {record}");
        // Timing stays out of the record, so that a run's logs repeat byte for byte.
        tracing::info!("backbone epoch {}: {}", epoch + 1, stats.input.describe());
        ctx.log_json(&record)?;
        history.push(record);
        save_checkpoint(ctx, epoch, &varmap, &sgd, &history)?;
    }
    output(cfg, &sets.classes, &net, &varmap, history)
}

/// The images step 0 trains and validates on.
struct Sets {
    /// The classes it learns (base, or the novel classes of `pretrain_on = "noisy_novel"`).
    classes: Vec<u32>,
    /// The training images and each one's label.
    ids: Vec<u32>,
    labels: HashMap<u32, u32>,
    /// Clean held-out images of those classes with their labels: the base validation split,
    /// none for the novel classes (their test set is for the final evaluation only).
    val: Vec<(u32, u32)>,
}

impl Sets {
    fn new(index: &DataIndex, cfg: &BackboneConfig) -> Result<Self> {
        let (train_split, classes) = match cfg.pretrain_on.as_str() {
            "base" => (Split::BaseTrain, index.base_classes.clone()),
            "noisy_novel" => (Split::NovelWeb, index.novel_classes.clone()),
            other => {
                return Err(BackboneError::Config(format!(
                    "pretrain_on = `{other}`; use `base` (clean base classes) or `noisy_novel` (web images of the novel classes)"
                )))
            }
        };
        let pairs = |split: Split| -> Vec<(u32, u32)> {
            index
                .items_in(split)
                .into_iter()
                .map(|it| (it.id, index.local_label(it)))
                .collect()
        };
        let train = pairs(train_split);
        let val = if train_split == Split::BaseTrain {
            pairs(Split::BaseVal)
        } else {
            vec![]
        };
        if train.len() < 2 || cfg.batch_size < 2 {
            return Err(BackboneError::Config(format!(
                "step 0 needs at least 2 training images ({} in split {:?}) and batch_size >= 2 (is {})",
                train.len(),
                train_split,
                cfg.batch_size
            )));
        }
        Ok(Sets {
            classes,
            ids: train.iter().map(|p| p.0).collect(),
            labels: train.iter().copied().collect(),
            val,
        })
    }
}

/// The seeded network, started from the configured pretrained weights (its `fc` excepted)
/// where `backbone.weights` names some.
fn init_model(ctx: &StageContext, num_classes: usize) -> Result<(VarMap, ResNet)> {
    let cfg = &ctx.config.backbone;
    let varmap = VarMap::new();
    let vb = simtrans_core::seed::var_builder(&varmap, ctx.seed, "backbone", DTYPE, &ctx.device);
    let net = ResNet::new(cfg.arch, cfg.small_width, Some(num_classes), vb)?;
    if let Some(path) = crate::weights::resolve(&cfg.weights, cfg.arch)? {
        crate::weights::load_state_dict(&varmap, &path, &["fc."])?;
        tracing::info!("backbone starts from {}", path.display());
    }
    Ok((varmap, net))
}

/// The newest checkpoint of this node, restored into the model and the optimiser: the history
/// so far and the first epoch still to train (none and 0 without one).
fn resume(
    ctx: &StageContext,
    varmap: &VarMap,
    sgd: &mut Sgd,
) -> Result<(Vec<serde_json::Value>, usize)> {
    let checkpoints = ctx.checkpoints();
    let Some(r) = checkpoints.latest(&ctx.device)? else {
        return Ok((vec![], 0));
    };
    let model: HashMap<String, Tensor> = r
        .tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("model.").map(|k| (k.to_string(), v.clone())))
        .collect();
    load_tensors(varmap, &model, &[]).map_err(|e| match e {
        LoadError::Problems(p) => BackboneError::StateDict {
            path: checkpoints.dir.clone(),
            problems: p,
        },
        LoadError::Candle(e) => e.into(),
    })?;
    sgd.load_state(&r.tensors)?;
    let history = r
        .metrics
        .get("history")
        .and_then(|h| h.as_array())
        .cloned()
        .unwrap_or_default();
    tracing::info!("backbone resumes after epoch {}", r.epochs_done);
    Ok((history, r.epochs_done))
}

/// The checkpoint after `epoch`: the model, the optimiser state and the history.
fn save_checkpoint(
    ctx: &StageContext,
    epoch: usize,
    varmap: &VarMap,
    sgd: &Sgd,
    history: &[serde_json::Value],
) -> Result<()> {
    let mut state: BTreeMap<String, Tensor> = varmap_tensors(varmap)?
        .into_iter()
        .map(|(k, v)| (format!("model.{k}"), v))
        .collect();
    state.extend(sgd.state());
    ctx.checkpoints().save(
        epoch + 1,
        state,
        BTreeMap::new(),
        serde_json::json!({ "history": history }),
    )?;
    Ok(())
}

/// The artifact: the trained weights, how to rebuild the network, and the metrics.
pub(crate) fn output(
    cfg: &BackboneConfig,
    classes: &[u32],
    net: &ResNet,
    varmap: &VarMap,
    history: Vec<serde_json::Value>,
) -> Result<StageOutput> {
    let last = history.last().cloned().unwrap_or(serde_json::Value::Null);
    let metrics = serde_json::json!({
        "train_loss": last.get("train_loss"),
        "train_acc": last.get("train_acc"),
        "val_acc": last.get("val_acc"),
        "epochs": cfg.optim.epochs,
        "history": history,
    });
    let mut out_meta = BTreeMap::new();
    out_meta.insert(meta::ARCH.into(), arch_name(cfg.arch).into());
    out_meta.insert(meta::SMALL_WIDTH.into(), cfg.small_width.to_string());
    out_meta.insert(meta::NUM_CLASSES.into(), classes.len().to_string());
    out_meta.insert(meta::FEATURE_DIM.into(), net.feature_dim().to_string());
    out_meta.insert(
        meta::CLASSES.into(),
        serde_json::to_string(&classes).expect("ids serialise"),
    );
    out_meta.insert(meta::PRETRAIN_ON.into(), cfg.pretrain_on.clone());
    out_meta.insert(meta::WEIGHTS.into(), cfg.weights.clone());
    Ok(StageOutput {
        tensors: varmap_tensors(varmap)?,
        metrics,
        meta: out_meta,
    })
}
