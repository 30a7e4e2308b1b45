//! Step 1 as a pipeline stage: the training loop, validation, checkpoints and the artifact.
//!
//! Each epoch: the learning rate follows `lr·decay^⌊epoch/step⌋` (both optimisers), momentum is
//! reset when configured (the reference rebuilt its optimisers every epoch), the source (clean
//! base train) and target (novel web) batches are drawn afresh from `ctx.rng("batches", epoch)`
//! and zipped (a pair of unequal sizes is skipped, as in the reference), and every pair of
//! batches makes one adversarial step ([`crate::train::Trainer::step`]). After the epoch the
//! pair F1 of "similar" is measured on fixed validation batches of the held-out base
//! validation split (used for selection when `select = "val"`) and of the novel test split
//! (logged and reported, labelled as test, never used for selection). A checkpoint after every
//! epoch holds the model, the momentum buffers, the history and the selected epoch's weights,
//! so a killed run resumes and ends exactly as an uninterrupted one.
//!
//! The loop reads images through [`TrainData`], so it is tested on synthetic images; the stage
//! itself ([`run`]) feeds it from the `data` artifact.

use crate::head::{HeadKind, PairOrder};
use crate::model::{insert_vars, meta, SimNet, SimNetShape};
use crate::pairs;
use crate::train::{PairCounts, Trainer};
use crate::{Result, SimnetError};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use simtrans_backbone::Arch;
use simtrans_core::config::Selection;
use simtrans_core::config::{DataConfig, SimnetConfig};
use simtrans_core::{Artifact, CoreError, StageContext, StageOutput};
use simtrans_data::{prefetch, sampler, Augment, DataIndex, InputWait, Loader, Prefetch, Split};
use simtrans_ops::optim::{step_lr, Sgd};
use simtrans_ops::BnMode;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The held-out sets SimNet is validated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSet {
    /// Held-out base validation images (selection).
    BaseVal,
    /// Novel test images (reported, labelled as test).
    NovelTest,
}

/// Batches of image ids.
pub type Batches = Vec<Vec<u32>>;

/// The images of [`TrainData::images_ahead`], in order.
pub trait ImagesAhead: Iterator<Item = Result<Tensor>> {
    /// How long their consumer has waited for them so far; `None` where each is built when
    /// taken (the wait is then the whole build).
    fn input_wait(&self) -> Option<InputWait> {
        None
    }
}

/// Images built one by one as they are taken.
struct BuiltWhenTaken<I>(I);

impl<I: Iterator<Item = Result<Tensor>>> Iterator for BuiltWhenTaken<I> {
    type Item = Result<Tensor>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next()
    }
}

impl<I: Iterator<Item = Result<Tensor>>> ImagesAhead for BuiltWhenTaken<I> {}

/// Images decoded ahead by the loader's [`Prefetch`].
struct Prefetched(Prefetch);

impl Iterator for Prefetched {
    type Item = Result<Tensor>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|b| Ok(b?.1))
    }
}

impl ImagesAhead for Prefetched {
    fn input_wait(&self) -> Option<InputWait> {
        Some(self.0.input_wait())
    }
}

/// Where the training loop gets its batches and images from.
pub trait TrainData {
    /// `[B, 3, S, S]` images of `ids`, with the training augmentation when `train`
    /// (randomness from `seed`), else the test transform.
    fn images(&self, ids: &[u32], train: bool, seed: u64, device: &Device) -> Result<Tensor>;
    /// The images of each `(ids, seed)` in turn, exactly as [`TrainData::images`] gives them;
    /// an implementation may build them ahead of use. By default each is built when taken.
    fn images_ahead<'a>(
        &'a self,
        jobs: Vec<(Vec<u32>, u64)>,
        train: bool,
        device: &'a Device,
    ) -> Box<dyn ImagesAhead + 'a> {
        Box::new(BuiltWhenTaken(
            jobs.into_iter()
                .map(move |(ids, seed)| self.images(&ids, train, seed, device)),
        ))
    }
    /// The label of an image (only equality matters).
    fn label(&self, id: u32) -> u32;
    /// One epoch's source (A) and target (B) batches.
    fn epoch_batches(&self, rng: &mut ChaCha8Rng) -> Result<(Batches, Batches)>;
    /// Validation batches of a held-out set (drawn once per run).
    fn eval_batches(&self, set: EvalSet, rng: &mut ChaCha8Rng) -> Result<Batches>;
}

/// [`TrainData`] over the `data` artifact: source = clean base train, target = novel web,
/// validation = base val and novel test; batches from `simtrans_data::sampler`, images from
/// [`simtrans_data::Loader`].
pub struct IndexData {
    index: Arc<DataIndex>,
    loader: Loader,
    source: Vec<(u32, u32)>,
    target: Vec<(u32, u32)>,
    base_val: Vec<(u32, u32)>,
    novel_test: Vec<(u32, u32)>,
    cfg: SimnetConfig,
}

impl IndexData {
    /// Reads the splits SimNet uses from an index.
    pub fn new(index: Arc<DataIndex>, data: &DataConfig, cfg: &SimnetConfig) -> Result<Self> {
        let source = index.pairs(Split::BaseTrain);
        let target = index.pairs(Split::NovelWeb);
        for (name, set) in [("base train", &source), ("novel web", &target)] {
            if set.is_empty() {
                return Err(SimnetError::Config(format!(
                    "the data index has no {name} images; SimNet needs both base train and novel web images"
                )));
            }
        }
        Ok(IndexData {
            loader: Loader::new(index.clone(), data)?,
            base_val: index.pairs(Split::BaseVal),
            novel_test: index.pairs(Split::NovelTest),
            index,
            source,
            target,
            cfg: cfg.clone(),
        })
    }
}

impl TrainData for IndexData {
    fn images(&self, ids: &[u32], train: bool, seed: u64, device: &Device) -> Result<Tensor> {
        let aug = if train { Augment::Train } else { Augment::Test };
        Ok(self.loader.batch(ids, aug, seed, device)?)
    }

    /// Decoded on a background thread, [`prefetch::DEPTH`] batches ahead.
    fn images_ahead<'a>(
        &'a self,
        jobs: Vec<(Vec<u32>, u64)>,
        train: bool,
        device: &'a Device,
    ) -> Box<dyn ImagesAhead + 'a> {
        let aug = if train { Augment::Train } else { Augment::Test };
        let (ids, seeds) = jobs.into_iter().unzip();
        Box::new(Prefetched(self.loader.prefetch(
            ids,
            seeds,
            aug,
            prefetch::DEPTH,
            device,
        )))
    }

    fn label(&self, id: u32) -> u32 {
        self.index.item(id).map(|i| i.label).unwrap_or(u32::MAX)
    }

    fn epoch_batches(&self, rng: &mut ChaCha8Rng) -> Result<(Batches, Batches)> {
        let c = &self.cfg;
        let a = sampler::simnet_batches(&self.source, c.batch_a, c.classes_a, rng);
        let b = sampler::simnet_batches(&self.target, c.batch_b, c.classes_b, rng);
        Ok((a, b))
    }

    fn eval_batches(&self, set: EvalSet, rng: &mut ChaCha8Rng) -> Result<Batches> {
        let items = match set {
            EvalSet::BaseVal => &self.base_val,
            EvalSet::NovelTest => &self.novel_test,
        };
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let c = &self.cfg;
        Ok(sampler::validation_batches(
            items,
            c.val_batches,
            c.val_classes,
            c.val_per_class,
            rng,
        ))
    }
}

/// The backbone artifact's network: its tensors (torchvision names) and the `arch` and
/// `small_width` recorded in its metadata.
pub fn backbone_init(artifact: &Artifact) -> Result<BackboneInit> {
    let (arch, small_width) = simtrans_backbone::artifact_arch(artifact)?;
    Ok(BackboneInit {
        arch,
        small_width,
        tensors: artifact.tensors.clone(),
    })
}

/// Step 1: trains SimNet from the `data` and `backbone` artifacts and returns the `simnet`
/// artifact (all tensors under `backbone.`, `head.`, `disc.`; rebuild metadata; F1 metrics).
pub fn run(ctx: &StageContext) -> Result<StageOutput> {
    let data = ctx.load_upstream("data", &DataIndex::schema())?;
    let index = Arc::new(DataIndex::from_artifact(&data)?);
    let backbone = ctx.load_upstream("backbone", &simtrans_backbone::schema())?;
    let init = backbone_init(&backbone)?;
    let source = IndexData::new(index, &ctx.config.data, &ctx.config.simnet)?;
    train(ctx, &source, &init)
}

/// The trained step-0 network SimNet starts from.
#[derive(Debug, Clone)]
pub struct BackboneInit {
    /// Architecture.
    pub arch: Arch,
    /// First-stage width of the `small` architecture.
    pub small_width: usize,
    /// Its tensors with torchvision names (`conv1.weight`, …); `fc.*` is ignored.
    pub tensors: BTreeMap<String, Tensor>,
}

/// Pair F1 of "similar" over all pairs of every batch, in eval mode.
pub fn pair_f1(
    net: &SimNet,
    data: &impl TrainData,
    batches: &[Vec<u32>],
    device: &Device,
) -> Result<PairCounts> {
    let mut counts = PairCounts::default();
    let jobs = batches.iter().map(|ids| (ids.clone(), 0)).collect();
    for (ids, x) in batches.iter().zip(data.images_ahead(jobs, false, device)) {
        let x = x?;
        let f = net.features(&x)?;
        let (logits, _) = net
            .head
            .forward_grid(&f, &f, PairOrder::ColFirst, BnMode::Eval)?;
        let labels: Vec<u32> = ids.iter().map(|&id| data.label(id)).collect();
        counts.add(&logits, &pairs::targets_tensor(&labels, device)?)?;
    }
    Ok(counts)
}

fn prefixed(
    tensors: BTreeMap<String, Tensor>,
    prefix: &str,
) -> impl Iterator<Item = (String, Tensor)> + '_ {
    tensors
        .into_iter()
        .map(move |(k, v)| (format!("{prefix}{k}"), v))
}

fn strip(tensors: &BTreeMap<String, Tensor>, prefix: &str) -> BTreeMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
        .collect()
}

/// Trains SimNet from a backbone on `data` under `ctx` (config, seed, checkpoints, logs).
pub fn train(
    ctx: &StageContext,
    data: &impl TrainData,
    init: &BackboneInit,
) -> Result<StageOutput> {
    let cfg = &ctx.config.simnet;
    check_batches(cfg)?;
    let net = build_net(ctx, init, HeadKind::from_config(cfg.head)?)?;
    let mut trainer = Trainer {
        sim_opt: optimiser(&net.simnet_vars, cfg),
        disc_opt: optimiser(&net.disc_vars, cfg),
        beta: cfg.beta,
        bn_split: cfg.bn_split,
    };
    let (val_batches, test_batches) = validation_batches(ctx, data)?;
    let mut progress = resume(ctx, &net, &mut trainer)?;
    for epoch in progress.start..cfg.optim.epochs {
        let lr = schedule(&mut trainer, cfg, epoch);
        let sums = train_epoch(ctx, data, &net, &mut trainer, epoch)?;
        let score = |b: &Batches| -> Result<Option<f64>> {
            if b.is_empty() {
                return Ok(None);
            }
            Ok(Some(pair_f1(&net, data, b, &ctx.device)?.f1()))
        };
        let (f1_val, f1_test) = (score(&val_batches)?, score(&test_batches)?);
        let record = sums.record(epoch, lr, f1_val, f1_test);
        tracing::info!(
            epoch,
            f1_val,
            f1_test,
            l_sim = sums.l_sim / sums.done as f64,
            "simnet epoch done"
        );
        ctx.log_json(&record)?;
        progress.history.push(record);
        if let (Selection::Val, Some(f1)) = (cfg.select, f1_val) {
            if progress.best.as_ref().is_none_or(|(_, f, _)| f1 > *f) {
                progress.best = Some((epoch, f1, net.tensors()?));
            }
        }
        save_checkpoint(ctx, epoch, &net, &trainer, &progress)?;
    }
    finish(ctx, &net, progress.history, progress.best)
}

/// The batch sizes and epochs a SimNet training can work with.
fn check_batches(cfg: &SimnetConfig) -> Result<()> {
    if cfg.batch_a < 2 || cfg.batch_b < 2 {
        return Err(SimnetError::Config(format!(
            "batch_a = {} and batch_b = {} must both be at least 2 (BatchNorm needs two images per domain)",
            cfg.batch_a, cfg.batch_b
        )));
    }
    if cfg.batch_a != cfg.batch_b {
        return Err(SimnetError::Config(format!(
            "batch_a = {} and batch_b = {} must be equal: a source and a target batch of unequal sizes are skipped (as in the reference), so no step would train; set simnet.batch_a and simnet.batch_b to one value",
            cfg.batch_a, cfg.batch_b
        )));
    }
    if cfg.optim.epochs == 0 {
        return Err(SimnetError::Config(
            "simnet.optim.epochs must be at least 1".into(),
        ));
    }
    Ok(())
}

/// The backbone's weights (classifier dropped), then the seeded head and discriminator; an
/// error if the artifact does not fill the whole trunk.
fn build_net(ctx: &StageContext, init: &BackboneInit, head: HeadKind) -> Result<SimNet> {
    let simnet_vars = VarMap::new();
    let backbone: BTreeMap<String, Tensor> = init
        .tensors
        .iter()
        .filter(|(k, _)| !k.starts_with("fc."))
        .map(|(k, v)| (format!("backbone.{k}"), v.clone()))
        .collect();
    insert_vars(&simnet_vars, &backbone, &["backbone."], &ctx.device)?;
    let loaded = simnet_vars.all_vars().len();
    let shape = SimNetShape {
        arch: init.arch,
        small_width: init.small_width,
        head,
    };
    let net = SimNet::build(shape, simnet_vars, VarMap::new(), ctx.seed, &ctx.device)?;
    let backbone_vars = net
        .simnet_vars
        .data()
        .lock()
        .expect("varmap lock")
        .keys()
        .filter(|k| k.starts_with("backbone."))
        .count();
    if backbone_vars != loaded {
        return Err(SimnetError::Artifact(format!(
            "the backbone artifact has {loaded} of the {backbone_vars} tensors a {:?} trunk needs; rebuild it with `{} backbone`",
            init.arch, ctx.rebuild_hint
        )));
    }
    Ok(net)
}

/// The reference's SGD over a map's trainable variables.
fn optimiser(vars: &VarMap, cfg: &SimnetConfig) -> Sgd {
    let oc = &cfg.optim;
    Sgd::new(
        simtrans_backbone::trainable_vars(vars),
        oc.lr,
        oc.momentum,
        oc.weight_decay,
    )
}

/// Fixed validation batches (base validation, novel test): every epoch is scored on the same
/// pairs.
fn validation_batches(ctx: &StageContext, data: &impl TrainData) -> Result<(Batches, Batches)> {
    let val = data.eval_batches(EvalSet::BaseVal, &mut ctx.rng("validation-base", 0))?;
    let test = data.eval_batches(EvalSet::NovelTest, &mut ctx.rng("validation-novel", 0))?;
    if val.is_empty() && ctx.config.simnet.select == Selection::Val {
        return Err(SimnetError::Config(
            "simnet.select = \"val\" needs base validation images, and the data index has none; use select = \"final\" or give the data set a base validation split".into(),
        ));
    }
    if val.is_empty() || test.is_empty() {
        tracing::warn!(
            base_val = val.len(),
            novel_test = test.len(),
            "a SimNet validation set is empty; its F1 is reported as null"
        );
    }
    Ok((val, test))
}

/// What the epochs so far have left: their records, the best epoch by validation F1 (with its
/// weights) and the first epoch still to train.
#[derive(Default)]
struct Progress {
    history: Vec<serde_json::Value>,
    best: Option<(usize, f64, BTreeMap<String, Tensor>)>,
    start: usize,
}

/// The newest checkpoint of this node, restored into `net` and the optimisers; nothing done
/// yet if there is none.
fn resume(ctx: &StageContext, net: &SimNet, trainer: &mut Trainer) -> Result<Progress> {
    let ck = ctx.checkpoints();
    let Some(r) = ck.latest(&ctx.device)? else {
        return Ok(Progress::default());
    };
    net.set_tensors(&r.tensors, "model.")?;
    trainer.sim_opt.load_state(&strip(&r.tensors, "opt.sim."))?;
    trainer
        .disc_opt
        .load_state(&strip(&r.tensors, "opt.disc."))?;
    let mut best = None;
    if let (Some(e), Some(f)) = (r.extra.get("best_epoch"), r.extra.get("best_f1_val")) {
        let parse_err = || {
            SimnetError::Artifact(format!(
                "checkpoint in {} has a bad best_epoch",
                ck.dir.display()
            ))
        };
        best = Some((
            e.parse().map_err(|_| parse_err())?,
            f.parse().map_err(|_| parse_err())?,
            strip(&r.tensors, "best."),
        ));
    }
    tracing::info!(
        epochs_done = r.epochs_done,
        "simnet resumes from its checkpoint"
    );
    Ok(Progress {
        history: r.metrics["history"].as_array().cloned().unwrap_or_default(),
        best,
        start: r.epochs_done,
    })
}

/// Sets this epoch's learning rate (and resets the momentum where the reference did); returns
/// the rate.
fn schedule(trainer: &mut Trainer, cfg: &SimnetConfig, epoch: usize) -> f64 {
    let oc = &cfg.optim;
    let lr = step_lr(oc.lr, oc.lr_decay, oc.lr_step, epoch);
    trainer.sim_opt.lr = lr;
    trainer.disc_opt.lr = lr;
    if oc.reset_momentum {
        trainer.sim_opt.reset_momentum();
        trainer.disc_opt.reset_momentum();
    }
    lr
}

/// One epoch's training sums.
#[derive(Default)]
struct EpochSums {
    l_sim: f64,
    l_dom: f64,
    dom_acc: f64,
    /// Steps trained, and batch pairs skipped (unequal sizes or fewer than 2 images).
    done: usize,
    skipped: usize,
    counts: PairCounts,
}

impl EpochSums {
    /// The epoch's log record: means per step, and the validation F1s.
    fn record(
        &self,
        epoch: usize,
        lr: f64,
        f1_val: Option<f64>,
        f1_test: Option<f64>,
    ) -> serde_json::Value {
        let n = self.done as f64;
        serde_json::json!({
            "epoch": epoch, "lr": lr, "steps": self.done, "skipped": self.skipped,
            "l_sim": self.l_sim / n, "l_dom": self.l_dom / n, "domain_acc": self.dom_acc / n,
            "f1_train": self.counts.f1(), "f1_val": f1_val, "f1_test": f1_test,
        })
    }
}

/// One epoch of steps over the epoch's seeded pairs of batches, their images decoded ahead
/// (source then target); an error on a non-finite loss or if no pair of batches was usable.
fn train_epoch(
    ctx: &StageContext,
    data: &impl TrainData,
    net: &SimNet,
    trainer: &mut Trainer,
    epoch: usize,
) -> Result<EpochSums> {
    let (batches_a, batches_b) = data.epoch_batches(&mut ctx.rng("batches", epoch as u64))?;
    let mut aug = ctx.rng("augment", epoch as u64);
    let steps = batches_a.len().min(batches_b.len());
    let bar = simtrans_core::progress::bar(steps as u64, format!("simnet epoch {epoch}"));
    let mut sums = EpochSums::default();
    // The usable pairs of batches and their two augmentation seeds, in order.
    let mut jobs = vec![];
    let mut usable = vec![];
    for (step, (ids_a, ids_b)) in batches_a.iter().zip(&batches_b).enumerate() {
        if ids_a.len() != ids_b.len() || ids_a.len() < 2 {
            sums.skipped += 1;
            continue;
        }
        let (seed_a, seed_b): (u64, u64) = (aug.random(), aug.random());
        jobs.push((ids_a.clone(), seed_a));
        jobs.push((ids_b.clone(), seed_b));
        usable.push(step);
    }
    let mut images = data.images_ahead(jobs, true, &ctx.device);
    let mut next_images = || {
        images.next().unwrap_or_else(|| {
            Err(simtrans_data::DataError::Invalid(
                "the image stream ended before the epoch's last batch".into(),
            )
            .into())
        })
    };
    for step in usable {
        bar.set_position(step as u64 + 1);
        let ids_a = &batches_a[step];
        let xa = next_images()?;
        let xb = next_images()?;
        let labels_a: Vec<u32> = ids_a.iter().map(|&id| data.label(id)).collect();
        let st = trainer.step(&net.backbone, &net.head, &net.disc, &xa, &labels_a, &xb)?;
        if !st.total.is_finite() || !st.l_dom.is_finite() {
            return Err(CoreError::NonFinite {
                what: "the SimNet loss".into(),
                epoch,
                step,
                checkpoint_dir: ctx.checkpoints().dir,
            }
            .into());
        }
        sums.l_sim += st.l_sim as f64;
        sums.l_dom += st.l_dom as f64;
        sums.dom_acc += st.domain_acc as f64;
        sums.counts.merge(&st.counts);
        sums.done += 1;
    }
    bar.finish_and_clear();
    if let Some(wait) = images.input_wait() {
        // Timing goes to the console only, so that the history and logs repeat byte for byte.
        tracing::info!("{} epoch {epoch}: {}", ctx.node, wait.describe());
    }
    if sums.done == 0 {
        return Err(SimnetError::Config(format!(
            "epoch {epoch} had no usable pair of batches ({} source, {} target, {} skipped: a batch pair of unequal sizes or of fewer than 2 images is skipped); lower simnet.batch_a and simnet.batch_b",
            batches_a.len(),
            batches_b.len(),
            sums.skipped
        )));
    }
    Ok(sums)
}

/// The checkpoint after `epoch`: weights, optimiser state, the best epoch so far and the
/// history.
fn save_checkpoint(
    ctx: &StageContext,
    epoch: usize,
    net: &SimNet,
    trainer: &Trainer,
    progress: &Progress,
) -> Result<()> {
    let mut state: BTreeMap<String, Tensor> = prefixed(net.tensors()?, "model.").collect();
    state.extend(prefixed(trainer.sim_opt.state(), "opt.sim."));
    state.extend(prefixed(trainer.disc_opt.state(), "opt.disc."));
    let mut extra = BTreeMap::new();
    if let Some((e, f, t)) = &progress.best {
        state.extend(prefixed(t.clone(), "best."));
        extra.insert("best_epoch".to_string(), e.to_string());
        extra.insert("best_f1_val".to_string(), f.to_string());
    }
    ctx.checkpoints().save(
        epoch + 1,
        state,
        extra,
        serde_json::json!({ "history": progress.history }),
    )?;
    Ok(())
}

/// The artifact: the selected weights, how to rebuild them, and the metrics.
fn finish(
    ctx: &StageContext,
    net: &SimNet,
    history: Vec<serde_json::Value>,
    best: Option<(usize, f64, BTreeMap<String, Tensor>)>,
) -> Result<StageOutput> {
    let cfg = &ctx.config.simnet;
    let last = history.last().cloned().unwrap_or_default();
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let (epoch, tensors) = match (cfg.select, best) {
        (Selection::Val, Some((e, _, t))) => (e, t),
        _ => (history.len().saturating_sub(1), net.tensors()?),
    };
    let selected = history.get(epoch).cloned().unwrap_or_default();
    // The test-selected epoch is reported for comparison with the paper only (SPEC "Traps" 3).
    let test_best = history
        .iter()
        .max_by(|a, b| f(a, "f1_test").total_cmp(&f(b, "f1_test")))
        .cloned()
        .unwrap_or_default();
    let metrics = serde_json::json!({
        "selection": match cfg.select { Selection::Val => "val", Selection::Final => "final" },
        "epoch": epoch,
        "f1_val": f(&selected, "f1_val"),
        "f1_test": f(&selected, "f1_test"),
        "final_f1_val": f(&last, "f1_val"),
        "final_f1_test": f(&last, "f1_test"),
        "test_selected_epoch": test_best["epoch"],
        "test_selected_f1_test": f(&test_best, "f1_test"),
        "history": history,
    });
    let mut meta = net.meta();
    meta.insert(
        meta::CONFIG.to_string(),
        serde_json::to_string(cfg).expect("the config serialises"),
    );
    meta.insert(meta::EPOCH.to_string(), epoch.to_string());
    Ok(StageOutput {
        tensors,
        metrics,
        meta,
    })
}
