//! The classifier stage (steps 3a and 3b) for one variant.
//!
//! One training loop serves every variant: the [`schedule`] says, epoch by epoch, the phase,
//! the batch size, the weight scheme and whether the graph term is on; the variant's switches
//! say which training images are used (all web images, or the clean ones for the oracle). After
//! every epoch the model is checkpointed (resume after a kill) and measured on the novel test
//! set — that number is logged and recorded as `top1_test_per_epoch`, labelled as the test set,
//! and never used to choose the model: the artifact is the final epoch.
//!
//! Graph epochs also account for the graph term ([`GraphAccount`]): the mean weighted CE and
//! `α·reg` apart, and the mean adjacency `Â` over pairs of the same and of different web labels
//! (and true classes, where the data index knows them), logged per epoch and kept in the
//! history as `graph_epochs`. The final model's per-image correctness on the test set
//! (`test_ids`, `correct_final`) lets the eval stage bootstrap paired differences.

use crate::losses::{weighted_ce, GraphReg, GraphTerms};
use crate::variants::{schedule, EpochPlan, Phase, Variant};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use rand::RngCore;
use simtrans_backbone::{trainable_vars, ResNet};
use simtrans_core::checkpoint::varmap_tensors;
use simtrans_core::config::Selection;
use simtrans_core::{ArtifactSchema, CoreError, Stage, StageContext, StageOutput, TensorSpec};
use simtrans_data::{prefetch, sampler, Augment, DataIndex, Loader, NoiseKind, Split};
use simtrans_denoise::{SampleWeights, WeightScheme};
use simtrans_ops::optim::Sgd;
use simtrans_ops::BnMode;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Layout version of `classifier-<variant>.safetensors`.
pub const SCHEMA_VERSION: u32 = 1;

/// What a classifier artifact must hold: a ResNet with an `fc` over the novel classes.
pub fn schema() -> ArtifactSchema {
    ArtifactSchema::new(
        Stage::Classifier,
        SCHEMA_VERSION,
        vec![
            TensorSpec::new("fc.weight", DType::F32, &[None, None]),
            TensorSpec::new("fc.bias", DType::F32, &[None]),
        ],
    )
}

/// Builds the novel-class network and loads its initial weights (`classifier.init`).
fn init_model(ctx: &StageContext, num_classes: usize) -> anyhow::Result<(VarMap, ResNet)> {
    let bcfg = &ctx.config.backbone;
    let varmap = VarMap::new();
    let label = format!("{}-fc", ctx.node.name());
    let vb = simtrans_core::seed::var_builder(&varmap, ctx.seed, &label, DType::F32, &ctx.device);
    let net = ResNet::new(bcfg.arch, bcfg.small_width, Some(num_classes), vb)?;
    match ctx.config.classifier.init.as_str() {
        "backbone" => {
            let a = ctx.load_upstream("backbone", &simtrans_backbone::schema())?;
            let tensors: HashMap<String, Tensor> = a.tensors.into_iter().collect();
            simtrans_backbone::weights::load_tensors(&varmap, &tensors, &["fc."])?;
        }
        "imagenet" => {
            if let Some(path) = simtrans_backbone::weights::resolve("imagenet", bcfg.arch)? {
                simtrans_backbone::load_state_dict(&varmap, &path, &["fc."])?;
            }
        }
        "scratch" => {}
        other => anyhow::bail!(
            "classifier.init = `{other}`; use `backbone` (the step-0 network), `imagenet` or `scratch`"
        ),
    }
    Ok((varmap, net))
}

/// Predictions of `net` on `ids` (test transform, BatchNorm in eval mode).
pub fn predict(
    net: &ResNet,
    loader: &Loader,
    ids: &[u32],
    batch: usize,
    device: &Device,
) -> anyhow::Result<Vec<u32>> {
    let mut preds = Vec::with_capacity(ids.len());
    let chunks: Vec<Vec<u32>> = ids.chunks(batch.max(1)).map(|c| c.to_vec()).collect();
    for item in loader.prefetch_test(chunks, device) {
        let (_, x) = item?;
        let (logits, _) = simtrans_ops::grad::inference(|| net.forward(&x, BnMode::Eval))?;
        preds.extend(
            logits
                .argmax(D::Minus1)?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?,
        );
    }
    Ok(preds)
}

/// `counts[true][pred]`.
fn confusion(classes: usize, labels: &[u32], preds: &[u32]) -> Vec<Vec<u64>> {
    let mut c = vec![vec![0u64; classes]; classes];
    for (&l, &p) in labels.iter().zip(preds) {
        c[l as usize][p as usize] += 1;
    }
    c
}

fn top1(labels: &[u32], preds: &[u32]) -> f64 {
    let hits = labels.iter().zip(preds).filter(|(l, p)| l == p).count();
    hits as f64 / labels.len().max(1) as f64
}

/// One batch's training loss, with its parts on graph epochs.
#[derive(Debug)]
pub struct BatchLoss {
    /// What is differentiated.
    pub loss: Tensor,
    /// The weighted CE, `α·reg` and `Â` of a graph batch.
    pub graph: Option<GraphTerms>,
}

/// The training loss of one batch: `mean(w·CE)`, plus on graph epochs `α·reg(g, Â)` with
/// `A[i, j] = sim([f_j ; f_i])` computed by the frozen SimNet (eval mode, no gradient) on the
/// same augmented images.
pub fn batch_loss(
    net: &ResNet,
    graph: Option<(&simtrans_simnet::SimNet, &GraphReg)>,
    x: &Tensor,
    y: &Tensor,
    w: &Tensor,
) -> anyhow::Result<BatchLoss> {
    let (logits, g) = net.forward(x, BnMode::Train)?;
    Ok(match graph {
        Some((sim, reg)) => {
            // A constant of the loss, as in the reference (the SimNet is frozen).
            let f = sim.features(x)?;
            let a = sim.similarity_matrix(&f, &f)?.t()?.detach();
            let terms = reg.terms(&logits, y, w, &g, &a)?;
            BatchLoss {
                loss: terms.total()?,
                graph: Some(terms),
            }
        }
        None => BatchLoss {
            loss: weighted_ce(&logits, y, w)?,
            graph: None,
        },
    })
}

/// Sums of `Â` and pair counts over one kind of pair (off the diagonal).
#[derive(Debug, Default, Clone, Copy)]
struct PairSum {
    sum: f64,
    pairs: u64,
}

impl PairSum {
    fn mean(self) -> Option<f64> {
        (self.pairs > 0).then(|| self.sum / self.pairs as f64)
    }
}

/// One graph epoch's accounting of the graph term (see the module doc).
#[derive(Debug, Default)]
pub struct GraphAccount {
    batches: usize,
    ce: f64,
    reg: f64,
    /// Same web label, different web labels, same true class, different true classes.
    pairs: [PairSum; 4],
}

impl GraphAccount {
    /// Adds one batch: its CE and `α·reg`, `Â` as rows, the web labels and, where known, the
    /// true classes (`None`: junk, a class of its own) of its images.
    pub fn add(
        &mut self,
        ce: f64,
        reg: f64,
        a_hat: &[Vec<f32>],
        web: &[u32],
        truth: Option<&[Option<u32>]>,
    ) {
        self.batches += 1;
        self.ce += ce;
        self.reg += reg;
        for (i, row) in a_hat.iter().enumerate() {
            for (j, &a) in row.iter().enumerate() {
                if i == j {
                    continue;
                }
                let web_slot = usize::from(web[i] != web[j]);
                self.pairs[web_slot].sum += a as f64;
                self.pairs[web_slot].pairs += 1;
                if let Some(t) = truth {
                    let same = matches!((t[i], t[j]), (Some(x), Some(y)) if x == y);
                    let slot = 2 + usize::from(!same);
                    self.pairs[slot].sum += a as f64;
                    self.pairs[slot].pairs += 1;
                }
            }
        }
    }

    /// The epoch's record: means per batch and per pair.
    pub fn record(&self, epoch: usize) -> serde_json::Value {
        let n = self.batches.max(1) as f64;
        let [same, cross, same_true, cross_true] = self.pairs.map(PairSum::mean);
        serde_json::json!({
            "epoch": epoch,
            "ce": self.ce / n,
            "alpha_reg": self.reg / n,
            "a_hat_same_label": same,
            "a_hat_cross_label": cross,
            "a_hat_same_true_class": same_true,
            "a_hat_cross_true_class": cross_true,
        })
    }
}

/// Runs steps 3a and 3b of the variant named by `ctx.node.variant`.
pub fn run(ctx: &StageContext) -> anyhow::Result<StageOutput> {
    let cfg = &ctx.config.classifier;
    let variant = variant_of(ctx)?;
    let data = Arc::new(DataIndex::from_artifact(
        &ctx.load_upstream("data", &DataIndex::schema())?,
    )?);
    let loader = Loader::new(data.clone(), &ctx.config.data)?;
    let sets = Sets::new(&data, variant)?;
    let plans = schedule(variant, cfg, ctx.config.denoise.top_r)?;
    let upstream = Upstream::load(ctx, &plans)?;
    let graph = GraphReg::from_config(cfg)?;
    let (varmap, net) = init_model(ctx, data.novel_classes.len())?;
    let ocfg = &cfg.optim;
    let mut sgd = Sgd::new(
        trainable_vars(&varmap),
        ocfg.lr,
        ocfg.momentum,
        ocfg.weight_decay,
    );
    let (mut history, start) = resume(ctx, &varmap, &mut sgd)?;

    let mut weight_cache: BTreeMap<String, SampleWeights> = BTreeMap::new();
    let mut final_preds: Option<Vec<u32>> = None;
    let bar = simtrans_core::progress::bar(plans.len() as u64, format!("{}", ctx.node));
    bar.set_position(start as u64);
    for plan in plans.iter().skip(start) {
        let first_of_3b = plan.phase == Phase::Step3b && plan.epoch == 0;
        if ocfg.reset_momentum || first_of_3b {
            sgd.reset_momentum();
        }
        sgd.lr = plan.lr;
        let weights = upstream.weights(plan.weights, &mut weight_cache)?;
        let simnet = upstream.simnet.as_ref().filter(|_| plan.graph_loss);
        let epoch = EpochRun {
            ctx,
            loader: &loader,
            sets: &sets,
            net: &net,
            graph: simnet.map(|s| (s, &graph)),
            weights,
        };
        let (mean_loss, account) = epoch.train(plan, &mut sgd)?;
        let preds = predict(
            &net,
            &loader,
            &sets.test_ids,
            ctx.config.eval.batch_size,
            &ctx.device,
        )?;
        let acc = top1(&sets.test_labels, &preds);
        final_preds = Some(preds);
        log_epoch(ctx, &mut history, plan, mean_loss, acc, &account)?;
        save_checkpoint(ctx, plan.global_epoch, &varmap, &sgd, &history)?;
        bar.inc(1);
    }
    bar.finish_and_clear();

    // The last epoch's predictions, unless every epoch was restored from a checkpoint.
    let preds = match final_preds {
        Some(p) => p,
        None => predict(
            &net,
            &loader,
            &sets.test_ids,
            ctx.config.eval.batch_size,
            &ctx.device,
        )?,
    };
    output(variant, &data, &sets, &varmap, &preds, history)
}

/// The variant this node trains; `select = "val"` refused (weak-shot data have no clean novel
/// validation split).
fn variant_of(ctx: &StageContext) -> anyhow::Result<Variant> {
    let variant: Variant = ctx
        .node
        .variant
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("the classifier stage needs a variant"))?
        .parse()?;
    if ctx.config.classifier.select == Selection::Val {
        anyhow::bail!(
            "classifier.select = \"val\" needs a clean novel validation split, which weak-shot data do not have; \
             use \"final\" (the test-selected epoch is recorded separately, labelled as such)"
        );
    }
    Ok(variant)
}

/// The images a variant trains and is tested on.
pub(crate) struct Sets {
    /// The novel web images it trains on (all, or the clean ones for `clean`).
    train_ids: Vec<u32>,
    /// Each training image's label: the category it was found under.
    label_of: HashMap<u32, u32>,
    /// The clean novel test images and their labels.
    pub(crate) test_ids: Vec<u32>,
    test_labels: Vec<u32>,
    /// The true class of every web image, where the data index knows every one.
    truth_of: Option<HashMap<u32, Option<u32>>>,
}

impl Sets {
    pub(crate) fn new(data: &DataIndex, variant: Variant) -> anyhow::Result<Self> {
        let clean_only = variant.switches().clean_only;
        let web = data.items_in(Split::NovelWeb);
        if clean_only && web.iter().any(|it| it.noise == NoiseKind::Unknown) {
            anyhow::bail!("variant `clean` needs the noise ground truth of every web image; this data set has none");
        }
        let train: Vec<(u32, u32)> = web
            .iter()
            .filter(|it| !clean_only || it.noise == NoiseKind::Clean)
            .map(|it| (it.id, data.local_label(it)))
            .collect();
        let test: Vec<(u32, u32)> = data
            .items_in(Split::NovelTest)
            .iter()
            .map(|it| (it.id, data.local_label(it)))
            .collect();
        Ok(Sets {
            train_ids: train.iter().map(|p| p.0).collect(),
            label_of: train.iter().copied().collect(),
            test_ids: test.iter().map(|p| p.0).collect(),
            test_labels: test.iter().map(|p| p.1).collect(),
            truth_of: web
                .iter()
                .all(|it| it.noise != NoiseKind::Unknown)
                .then(|| web.iter().map(|it| (it.id, it.true_label)).collect()),
        })
    }
}

/// The upstream artifacts the variant's plans read: the denoise weights if any plan weights
/// its loss, SimNet if any plan has a graph term.
struct Upstream {
    denoise: Option<simtrans_core::Artifact>,
    simnet: Option<simtrans_simnet::SimNet>,
}

impl Upstream {
    fn load(ctx: &StageContext, plans: &[EpochPlan]) -> anyhow::Result<Self> {
        let denoise = if plans.iter().any(|p| p.weights != WeightScheme::None) {
            Some(ctx.load_upstream("denoise", &simtrans_denoise::schema())?)
        } else {
            None
        };
        let simnet = if plans.iter().any(|p| p.graph_loss) {
            Some(simtrans_simnet::SimNet::load(
                &ctx.load_upstream("simnet", &simtrans_simnet::schema())?,
                &ctx.device,
            )?)
        } else {
            None
        };
        Ok(Upstream { denoise, simnet })
    }

    /// The sample weights of `scheme`, read from the denoise artifact once per scheme.
    fn weights<'c>(
        &self,
        scheme: WeightScheme,
        cache: &'c mut BTreeMap<String, SampleWeights>,
    ) -> anyhow::Result<&'c SampleWeights> {
        let key = scheme.name();
        if !cache.contains_key(&key) {
            let w = match (scheme, &self.denoise) {
                (WeightScheme::None, _) => SampleWeights::uniform(),
                (scheme, Some(a)) => SampleWeights::from_artifact(a, scheme)?,
                (_, None) => unreachable!("denoise is loaded whenever a plan uses weights"),
            };
            cache.insert(key.clone(), w);
        }
        Ok(&cache[&key])
    }
}

/// The newest checkpoint of this node, restored into the model and the optimiser: the history
/// so far and the first epoch still to train (an empty history and 0 without one).
fn resume(
    ctx: &StageContext,
    varmap: &VarMap,
    sgd: &mut Sgd,
) -> anyhow::Result<(serde_json::Value, usize)> {
    let checkpoints = ctx.checkpoints();
    let Some(r) = checkpoints.latest(&ctx.device)? else {
        return Ok((
            serde_json::json!({ "train_loss": [], "top1_test_per_epoch": [], "graph_epochs": [] }),
            0,
        ));
    };
    let data_map = varmap.data().lock().expect("varmap lock");
    for (name, var) in data_map.iter() {
        let t = r.tensors.get(&format!("model.{name}")).ok_or_else(|| {
            anyhow::anyhow!(
                "checkpoint in {} lacks `model.{name}`; delete it",
                checkpoints.dir.display()
            )
        })?;
        var.set(t)?;
    }
    drop(data_map);
    sgd.load_state(&r.tensors)?;
    tracing::info!("{}: resuming after epoch {}", ctx.node, r.epochs_done);
    Ok((r.metrics, r.epochs_done))
}

/// What one epoch trains with.
struct EpochRun<'a> {
    ctx: &'a StageContext,
    loader: &'a Loader,
    sets: &'a Sets,
    net: &'a ResNet,
    /// SimNet and the graph term, on graph epochs.
    graph: Option<(&'a simtrans_simnet::SimNet, &'a GraphReg)>,
    /// The epoch's sample weights.
    weights: &'a SampleWeights,
}

impl EpochRun<'_> {
    /// One epoch of SGD steps over the seeded shuffled batches of the training set, decoded
    /// ahead: the mean loss per batch, and the graph terms' accounting on graph epochs. A
    /// non-finite loss stops the stage before any checkpoint takes it in.
    fn train(&self, plan: &EpochPlan, sgd: &mut Sgd) -> anyhow::Result<(f64, GraphAccount)> {
        let (ctx, e) = (self.ctx, plan.global_epoch);
        let mut rng = ctx.rng("batches", e as u64);
        let batches =
            sampler::shuffled_batches(&self.sets.train_ids, plan.batch_size, false, &mut rng);
        let epoch_seed = ctx.rng("augment", e as u64).next_u64();
        let seeds = (0..batches.len() as u64)
            .map(|b| epoch_seed ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let count = batches.len();
        let mut prefetched =
            self.loader
                .prefetch(batches, seeds, Augment::Train, prefetch::DEPTH, &ctx.device);
        let mut loss_sum = 0.0;
        let mut account = GraphAccount::default();
        for (b, item) in (&mut prefetched).enumerate() {
            let (ids, x) = item?;
            let web_labels: Vec<u32> = ids.iter().map(|id| self.sets.label_of[id]).collect();
            let w: Vec<f32> = ids
                .iter()
                .map(|id| self.weights.get(*id))
                .collect::<simtrans_denoise::Result<_>>()?;
            let y = Tensor::new(web_labels.as_slice(), &ctx.device)?;
            let w = Tensor::new(w, &ctx.device)?;
            let BatchLoss { loss, graph: terms } = batch_loss(self.net, self.graph, &x, &y, &w)?;
            sgd.step(&simtrans_ops::grad::backward(&loss)?)?;
            // Read after the update is queued: one wait for the device per step.
            let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !l.is_finite() {
                return Err(CoreError::NonFinite {
                    what: "classifier loss".into(),
                    epoch: e,
                    step: b,
                    checkpoint_dir: ctx.checkpoints().dir,
                }
                .into());
            }
            loss_sum += l;
            if let Some(t) = terms {
                let truth: Option<Vec<Option<u32>>> = self
                    .sets
                    .truth_of
                    .as_ref()
                    .map(|m| ids.iter().map(|id| m[id]).collect());
                account.add(
                    t.ce.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                    t.reg.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                    &t.a_hat.to_dtype(DType::F32)?.to_vec2::<f32>()?,
                    &web_labels,
                    truth.as_deref(),
                );
            }
        }
        // Timing goes to the console only, so that the history and logs repeat byte for byte.
        tracing::info!(
            "{} epoch {e}: {}",
            ctx.node,
            prefetched.input_wait().describe()
        );
        Ok((loss_sum / count.max(1) as f64, account))
    }
}

/// Records an epoch in the history, the JSONL log and the console.
fn log_epoch(
    ctx: &StageContext,
    history: &mut serde_json::Value,
    plan: &EpochPlan,
    mean_loss: f64,
    acc: f64,
    account: &GraphAccount,
) -> anyhow::Result<()> {
    let e = plan.global_epoch;
    let push = |history: &mut serde_json::Value, key: &str, v: serde_json::Value| {
        history[key].as_array_mut().expect("array").push(v);
    };
    push(history, "train_loss", mean_loss.into());
    push(history, "top1_test_per_epoch", acc.into());
    let mut line = serde_json::json!({
        "epoch": e, "phase": format!("{:?}", plan.phase), "kind": format!("{:?}", plan.kind),
        "lr": plan.lr, "train_loss": mean_loss, "top1_test": acc,
    });
    if account.batches > 0 {
        let r = account.record(e);
        tracing::info!(
            "{} epoch {e}: weighted CE {:.4}, α·reg {:.4}, mean Â same label {:.3} / cross label {:.3}",
            ctx.node,
            r["ce"].as_f64().unwrap_or(f64::NAN),
            r["alpha_reg"].as_f64().unwrap_or(f64::NAN),
            r["a_hat_same_label"].as_f64().unwrap_or(f64::NAN),
            r["a_hat_cross_label"].as_f64().unwrap_or(f64::NAN),
        );
        line["graph"] = r.clone();
        push(history, "graph_epochs", r);
    }
    ctx.log_json(&line)?;
    tracing::info!(
        "{} epoch {e}: loss {mean_loss:.4}, novel test top-1 {:.2} %",
        ctx.node,
        100.0 * acc
    );
    Ok(())
}

/// The checkpoint after global epoch `e`: the model, the optimiser state and the history.
fn save_checkpoint(
    ctx: &StageContext,
    e: usize,
    varmap: &VarMap,
    sgd: &Sgd,
    history: &serde_json::Value,
) -> anyhow::Result<()> {
    let mut state: BTreeMap<String, Tensor> = varmap_tensors(varmap)?
        .into_iter()
        .map(|(n, t)| (format!("model.{n}"), t))
        .collect();
    state.extend(sgd.state());
    ctx.checkpoints()
        .save(e + 1, state, BTreeMap::new(), history.clone())?;
    Ok(())
}

/// The artifact: the final weights, the final epoch's test results and the history.
pub(crate) fn output(
    variant: Variant,
    data: &DataIndex,
    sets: &Sets,
    varmap: &VarMap,
    preds: &[u32],
    history: serde_json::Value,
) -> anyhow::Result<StageOutput> {
    let n_classes = data.novel_classes.len();
    let test_labels = &sets.test_labels;
    let conf = confusion(n_classes, test_labels, preds);
    let per_class: Vec<f64> = conf
        .iter()
        .enumerate()
        .map(|(i, row)| row[i] as f64 / row.iter().sum::<u64>().max(1) as f64)
        .collect();
    let per_epoch: Vec<f64> = history["top1_test_per_epoch"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default();
    Ok(StageOutput {
        tensors: varmap_tensors(varmap)?,
        metrics: serde_json::json!({
            "variant": variant.name(),
            "train_images": sets.train_ids.len(),
            "top1_final": top1(test_labels, preds),
            "top1_test_selected": per_epoch.iter().cloned().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x)))),
            "per_class_final": per_class,
            "confusion_final": conf,
            "test_ids": sets.test_ids,
            "correct_final": test_labels.iter().zip(preds).map(|(l, p)| u8::from(l == p)).collect::<Vec<u8>>(),
            "history": history,
        }),
        meta: BTreeMap::from([
            ("variant".to_string(), variant.name().to_string()),
            ("num_classes".to_string(), n_classes.to_string()),
            (
                "class_names".to_string(),
                serde_json::to_string(&data.novel_names())?,
            ),
        ]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use simtrans_backbone::Arch;

    #[test]
    fn graph_accounting_splits_pairs_by_web_label_and_true_class() {
        let mut acc = GraphAccount::default();
        // Three images: 0 and 1 found for category 0, 2 for category 1; image 1 is truly of
        // class 1 and the diagonal is never counted.
        let a_hat = vec![
            vec![9.0, 0.2, 0.1],
            vec![0.4, 9.0, 0.8],
            vec![0.3, 0.6, 9.0],
        ];
        let truth = [Some(0), Some(1), Some(1)];
        acc.add(1.0, 0.5, &a_hat, &[0, 0, 1], Some(&truth));
        acc.add(3.0, 1.5, &a_hat, &[0, 0, 1], Some(&truth));
        let r = acc.record(7);
        assert_eq!(r["epoch"], 7);
        assert!((r["ce"].as_f64().unwrap() - 2.0).abs() < 1e-12);
        assert!((r["alpha_reg"].as_f64().unwrap() - 1.0).abs() < 1e-12);
        let close = |k: &str, v: f64| (r[k].as_f64().unwrap() - v).abs() < 1e-6;
        assert!(close("a_hat_same_label", (0.2 + 0.4) / 2.0), "{r}");
        assert!(
            close("a_hat_cross_label", (0.1 + 0.8 + 0.3 + 0.6) / 4.0),
            "{r}"
        );
        assert!(close("a_hat_same_true_class", (0.8 + 0.6) / 2.0), "{r}");
        assert!(
            close("a_hat_cross_true_class", (0.2 + 0.1 + 0.4 + 0.3) / 4.0),
            "{r}"
        );
        let mut unknown = GraphAccount::default();
        unknown.add(1.0, 0.5, &a_hat, &[0, 0, 1], None);
        assert!(unknown.record(0)["a_hat_same_true_class"].is_null());
    }
    use simtrans_core::{Config, Preset};
    use simtrans_simnet::{SimNet, SimNetShape};

    /// A graph step updates the classifier and leaves every SimNet variable without a gradient
    /// (so no optimiser can move it), and the loss differs from the plain weighted CE.
    #[test]
    fn a_graph_step_never_reaches_the_simnet() {
        let dev = Device::Cpu;
        let cfg = Config::preset(Preset::Demo);
        let vm = VarMap::new();
        let vb = simtrans_core::seed::var_builder(&vm, 0, "cls", DType::F32, &dev);
        let net = ResNet::new(Arch::Small, 4, Some(3), vb).unwrap();
        let shape = SimNetShape {
            arch: Arch::Small,
            small_width: 4,
            head: simtrans_simnet::head::HeadKind::from_config(4).unwrap(),
        };
        let sim = SimNet::build(shape, VarMap::new(), VarMap::new(), 1, &dev).unwrap();
        let n = 6 * 3 * 12 * 12;
        let x = Tensor::from_vec(
            (0..n)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect::<Vec<_>>(),
            (6, 3, 12, 12),
            &dev,
        )
        .unwrap();
        let y = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &dev).unwrap();
        let w = Tensor::new(&[1f32, 0.5, 1.5, 1.0, 1.0, 1.0], &dev).unwrap();
        let reg = GraphReg::from_config(&cfg.classifier).unwrap();
        let with_graph = batch_loss(&net, Some((&sim, &reg)), &x, &y, &w).unwrap();
        let plain = batch_loss(&net, None, &x, &y, &w).unwrap();
        assert!(plain.graph.is_none());
        let terms = with_graph.graph.as_ref().unwrap();
        assert_eq!(terms.a_hat.dims(), &[6, 6]);
        let parts = (terms.ce.to_scalar::<f32>().unwrap() + terms.reg.to_scalar::<f32>().unwrap())
            - with_graph.loss.to_scalar::<f32>().unwrap();
        assert!(parts.abs() < 1e-6, "the parts add up to the loss: {parts}");
        let (with_graph, plain) = (with_graph.loss, plain.loss);
        let (a, b) = (
            with_graph.to_scalar::<f32>().unwrap(),
            plain.to_scalar::<f32>().unwrap(),
        );
        assert!(a > b, "the graph term adds a positive amount: {a} vs {b}");
        let grads = with_graph.backward().unwrap();
        for (name, var) in sim
            .simnet_vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .chain(sim.disc_vars.data().lock().unwrap().iter())
        {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "SimNet variable {name} got a gradient"
            );
        }
        let trained = trainable_vars(&vm);
        assert!(trained
            .iter()
            .all(|(_, v)| grads.get(v.as_tensor()).is_some()));
    }
}
