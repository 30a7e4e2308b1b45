//! The losses of SimNet training and one adversarial training step, in the reference's order.
//!
//! One step on a source batch A (clean base images) and a target batch B (novel web images):
//! 1. the backbone runs on `cat(A, B)`; the head runs on the pairs within A and the pairs within
//!    B (never across), `|A|² + |B|²` rows, with the factorised first layer;
//! 2. `L_sim` = cross-entropy of the head on A's pairs (targets: same label);
//! 3. `L_dom` = cross-entropy of the discriminator on diff_feat (domain 0 for A's pairs, 1 for B's);
//! 4. the SimNet optimiser (backbone + head parameters only) minimises `L_sim − β·L_dom`;
//! 5. the discriminator optimiser (its parameters only) minimises `L_dom` on **detached** diff_feat.
//!
//! Step 5's gradient is already in step 4's backward pass when β ≠ 0: `L_sim` does not depend on
//! the discriminator's parameters θ_D, so `∂(L_sim − β·L_dom)/∂θ_D = −β·∂L_dom/∂θ_D`, and the
//! discriminator's forward on diff_feat is the same whether diff_feat is detached or not (step 4
//! leaves θ_D unchanged). [`Trainer::step`] therefore rescales that gradient by `−1/β` instead of
//! running the discriminator forward and backward again: the same update to rounding (the
//! reference runs the second pass). With β = 0, or `gpu.disc_reuse = false`, it runs the second
//! pass ([`Trainer::discriminator_update`]).
//!
//! With `bn_split`, every BatchNorm runs in [`BnMode::Split`]: the backbone at `|A|` images and
//! the head at `|A|²` pair rows, which is what the reference's two-GPU `DataParallel` did (GPU 0
//! held the base half, GPU 1 the web half, and running statistics came from GPU 0).

use crate::head::{compute_dtype, Discriminator, PairOrder, SimHead};
use crate::pairs;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, D};
use simtrans_ops::headops::{cross_entropy, Grid};
use simtrans_ops::optim::Sgd;
use simtrans_ops::BnMode;

/// Anything that turns a batch of images into `[B, D]` features with a BatchNorm mode.
pub trait FeatureNet {
    /// Pooled features of `images`.
    fn features(&self, images: &Tensor, mode: BnMode) -> Result<Tensor>;
}

impl FeatureNet for simtrans_backbone::ResNet {
    fn features(&self, images: &Tensor, mode: BnMode) -> Result<Tensor> {
        simtrans_backbone::ResNet::features(self, images, mode)
    }
}

/// The tensors of one forward pass over a pair of batches.
#[derive(Debug, Clone)]
pub struct Forward {
    /// Head logits of A's pairs then B's pairs, `[|A|² + |B|², 2]`.
    pub logits: Tensor,
    /// diff_feat of the same rows.
    pub diff_feat: Tensor,
    /// Number of A pair rows (`|A|²`).
    pub rows_a: usize,
    /// Pair targets of A (same label = 1).
    pub targets_a: Tensor,
    /// Domain targets: 0 for A's pairs, 1 for B's.
    pub domains: Tensor,
}

impl Forward {
    /// `L_sim`: cross-entropy of the head on A's pairs.
    pub fn sim_loss(&self) -> Result<Tensor> {
        cross_entropy(&self.logits.narrow(0, 0, self.rows_a)?, &self.targets_a)
    }

    /// `L_dom` with the gradient flowing into the head (for the SimNet step).
    pub fn dom_loss(&self, disc: &Discriminator) -> Result<Tensor> {
        Ok(self.dom(disc)?.0)
    }

    /// `(L_dom, domain logits)`, the gradient flowing into the head.
    fn dom(&self, disc: &Discriminator) -> Result<(Tensor, Tensor)> {
        let d_logits = disc.forward(&self.diff_feat)?;
        Ok((cross_entropy(&d_logits, &self.domains)?, d_logits))
    }

    /// `L_sim − β·L_dom`; with β = 0 exactly `L_sim` (the discriminator is not evaluated).
    pub fn simnet_loss(&self, disc: &Discriminator, beta: f64) -> Result<Tensor> {
        Ok(self.losses(disc, beta)?.total)
    }

    /// The step's losses: `L_sim`, `L_sim − β·L_dom`, and (β ≠ 0) `L_dom` with the domain
    /// logits it came from.
    pub fn losses(&self, disc: &Discriminator, beta: f64) -> Result<Losses> {
        let l_sim = self.sim_loss()?;
        if beta == 0.0 {
            return Ok(Losses {
                total: l_sim.clone(),
                l_sim,
                dom: None,
            });
        }
        let (l_dom, d_logits) = self.dom(disc)?;
        Ok(Losses {
            total: (&l_sim - (&l_dom * beta)?)?,
            l_sim,
            dom: Some((l_dom, d_logits)),
        })
    }
}

/// The losses of one step ([`Forward::losses`]).
#[derive(Debug, Clone)]
pub struct Losses {
    /// `L_sim`.
    pub l_sim: Tensor,
    /// `L_sim − β·L_dom`, what the SimNet optimiser minimises.
    pub total: Tensor,
    /// `(L_dom, domain logits)` with the gradient flowing into the head; `None` when β = 0.
    pub dom: Option<(Tensor, Tensor)>,
}

/// Whether [`Trainer::discriminator_step`] takes the discriminator's gradient from the SimNet
/// backward pass (β ≠ 0); `gpu.disc_reuse = false` runs the separate pass, to compare.
fn disc_reuse() -> bool {
    simtrans_ops::gpu::settings().disc_reuse
}

/// The targets of one step's pair rows, on the device: same-label targets of A's pairs and
/// the domain of every row (0 for A's pairs, 1 for B's).
///
/// Why separate: copying host memory to the device may wait for the device's queue to drain
/// (CUDA documents this for pageable memory). [`Trainer::forward`] makes them before queueing
/// the step's work, where that wait costs nothing, instead of between the backbone's forward
/// pass and the head's, where the device would idle while the host issues the rest of the step.
#[derive(Debug, Clone)]
pub struct PairTargets {
    /// Same label = 1, over A's `|A|²` pairs in the head's row order.
    pub targets_a: Tensor,
    /// 0 for A's pairs, 1 for B's.
    pub domains: Tensor,
}

impl PairTargets {
    /// The targets of `labels_a`'s pairs and the domains of those and of `nb²` target pairs.
    pub fn new(labels_a: &[u32], nb: usize, device: &candle_core::Device) -> Result<Self> {
        let rows_a = labels_a.len() * labels_a.len();
        let mut domains = vec![0u32; rows_a];
        domains.resize(rows_a + nb * nb, 1);
        Ok(PairTargets {
            targets_a: pairs::targets_tensor(labels_a, device)?,
            domains: Tensor::new(domains, device)?,
        })
    }
}

/// The head on the pairs within A and within B, from their features `[|A|, D]` and `[|B|, D]`.
pub fn head_forward(
    head: &SimHead,
    features_a: &Tensor,
    labels_a: &[u32],
    features_b: &Tensor,
    bn_split: bool,
) -> Result<Forward> {
    let targets = PairTargets::new(labels_a, features_b.dim(0)?, features_a.device())?;
    head_forward_with(head, features_a, features_b, targets, bn_split)
}

/// [`head_forward`] with the targets made beforehand.
pub fn head_forward_with(
    head: &SimHead,
    features_a: &Tensor,
    features_b: &Tensor,
    targets: PairTargets,
    bn_split: bool,
) -> Result<Forward> {
    let na = features_a.dim(0)?;
    let nb = features_b.dim(0)?;
    let rows_a = na * na;
    let (ta, td) = (targets.targets_a.dims1()?, targets.domains.dims1()?);
    if (ta, td) != (rows_a, rows_a + nb * nb) {
        candle_core::bail!(
            "pair targets of {ta} and {td} rows for {na} source and {nb} target images"
        );
    }
    let h = head.first_layer_grids(
        &Tensor::cat(&[features_a, features_b], 0)?,
        &[Grid::square(0, na), Grid::square(na, nb)],
        PairOrder::ColFirst,
        compute_dtype(features_a.device()),
    )?;
    let mode = if bn_split {
        BnMode::Split(rows_a)
    } else {
        BnMode::Train
    };
    let (logits, diff_feat) = head.from_first_layer(&h, mode)?;
    Ok(Forward {
        logits,
        diff_feat,
        rows_a,
        targets_a: targets.targets_a,
        domains: targets.domains,
    })
}

/// What one step measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    /// `L_sim`.
    pub l_sim: f32,
    /// `L_dom` (before the discriminator update).
    pub l_dom: f32,
    /// `L_sim − β·L_dom`.
    pub total: f32,
    /// Similarity confusion counts on A's pairs.
    pub counts: PairCounts,
    /// Discriminator accuracy on this step's pairs.
    pub domain_acc: f32,
}

/// The two optimisers and the settings of adversarial training.
pub struct Trainer {
    /// SimNet (backbone + head) optimiser.
    pub sim_opt: Sgd,
    /// Discriminator optimiser.
    pub disc_opt: Sgd,
    /// Weight of the adversarial term.
    pub beta: f64,
    /// Per-domain BatchNorm statistics.
    pub bn_split: bool,
}

impl Trainer {
    /// The forward pass of one step: backbone on `cat(A, B)`, head on the pairs within each.
    pub fn forward(
        &self,
        net: &impl FeatureNet,
        head: &SimHead,
        images_a: &Tensor,
        labels_a: &[u32],
        images_b: &Tensor,
    ) -> Result<Forward> {
        let targets = PairTargets::new(labels_a, images_b.dim(0)?, images_a.device())?;
        let (fa, fb) = self.features(net, images_a, images_b)?;
        head_forward_with(head, &fa, &fb, targets, self.bn_split)
    }

    /// The backbone's half of [`Self::forward`]: the features of A and of B, from one pass
    /// over `cat(A, B)`.
    pub fn features(
        &self,
        net: &impl FeatureNet,
        images_a: &Tensor,
        images_b: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let na = images_a.dim(0)?;
        let nb = images_b.dim(0)?;
        let mode = if self.bn_split {
            BnMode::Split(na)
        } else {
            BnMode::Train
        };
        let feats = net.features(&Tensor::cat(&[images_a, images_b], 0)?, mode)?;
        Ok((feats.narrow(0, 0, na)?, feats.narrow(0, na, nb)?))
    }

    /// The SimNet update: minimises `L_sim − β·L_dom` over the backbone and head variables
    /// (the only ones `sim_opt` holds). Returns `(L_sim, total)`.
    pub fn simnet_update(
        &mut self,
        fwd: &Forward,
        disc: &Discriminator,
    ) -> crate::Result<(Tensor, Tensor)> {
        let losses = fwd.losses(disc, self.beta)?;
        self.sim_opt
            .step(&simtrans_ops::grad::backward(&losses.total)?)?;
        Ok((losses.l_sim, losses.total))
    }

    /// The discriminator update after the SimNet update, from that update's `losses` and
    /// backward pass `grads`: with β ≠ 0 the gradient of `L_dom` is `grads`' own, rescaled by
    /// `−1/β` (see the module documentation), else [`Self::discriminator_update`]'s separate
    /// pass. Returns `(L_dom, domain logits)`.
    pub fn discriminator_step(
        &mut self,
        losses: &Losses,
        mut grads: GradStore,
        fwd: &Forward,
        disc: &Discriminator,
    ) -> crate::Result<(Tensor, Tensor)> {
        match &losses.dom {
            Some((l_dom, d_logits)) if disc_reuse() => {
                let scale = -1.0 / self.beta;
                for (_, var) in self.disc_opt.vars() {
                    if let Some(g) = grads.remove(var.as_tensor()) {
                        grads.insert(var.as_tensor(), (g * scale)?);
                    }
                }
                self.disc_opt.step(&grads)?;
                Ok((l_dom.detach(), d_logits.detach()))
            }
            _ => self.discriminator_update(fwd, disc),
        }
    }

    /// The discriminator update: minimises `L_dom` on detached diff_feat over the
    /// discriminator's variables. Returns `(L_dom, domain logits)`.
    pub fn discriminator_update(
        &mut self,
        fwd: &Forward,
        disc: &Discriminator,
    ) -> crate::Result<(Tensor, Tensor)> {
        let d_logits = disc.forward(&fwd.diff_feat.detach())?;
        let l_dom = cross_entropy(&d_logits, &fwd.domains)?;
        self.disc_opt.step(&simtrans_ops::grad::backward(&l_dom)?)?;
        Ok((l_dom, d_logits))
    }

    /// One adversarial step on source images A (with labels) and target images B: the forward
    /// pass, the SimNet update, then the discriminator update on the same (pre-update) diff_feat.
    pub fn step(
        &mut self,
        net: &impl FeatureNet,
        head: &SimHead,
        disc: &Discriminator,
        images_a: &Tensor,
        labels_a: &[u32],
        images_b: &Tensor,
    ) -> crate::Result<StepStats> {
        let fwd = self.forward(net, head, images_a, labels_a, images_b)?;
        let losses = fwd.losses(disc, self.beta)?;
        let grads = simtrans_ops::grad::backward(&losses.total)?;
        self.sim_opt.step(&grads)?;
        let (l_dom, d_logits) = self.discriminator_step(&losses, grads, &fwd, disc)?;
        let (l_sim, total) = (&losses.l_sim, &losses.total);

        let mut counts = PairCounts::default();
        counts.add(&fwd.logits.narrow(0, 0, fwd.rows_a)?, &fwd.targets_a)?;
        let hits = d_logits
            .argmax(D::Minus1)?
            .eq(&fwd.domains)?
            .to_dtype(candle_core::DType::F32)?
            .mean_all()?;
        Ok(StepStats {
            l_sim: l_sim.to_scalar::<f32>()?,
            l_dom: l_dom.to_scalar::<f32>()?,
            total: total.to_scalar::<f32>()?,
            counts,
            domain_acc: hits.to_scalar::<f32>()?,
        })
    }
}

/// Confusion counts of the "similar" class (predicted similar when logit 1 > logit 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairCounts {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub tn: u64,
}

impl PairCounts {
    /// Adds `[N, 2]` logits against `N` targets (u32, 1 = similar).
    pub fn add(&mut self, logits: &Tensor, targets: &Tensor) -> Result<()> {
        let l = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        let t = targets.to_vec1::<u32>()?;
        if l.len() != t.len() {
            candle_core::bail!("{} logit rows for {} targets", l.len(), t.len());
        }
        for (row, &y) in l.iter().zip(&t) {
            match (row[1] > row[0], y == 1) {
                (true, true) => self.tp += 1,
                (true, false) => self.fp += 1,
                (false, true) => self.fn_ += 1,
                (false, false) => self.tn += 1,
            }
        }
        Ok(())
    }

    /// Adds another set of counts.
    pub fn merge(&mut self, other: &PairCounts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
        self.tn += other.tn;
    }

    /// F1 of "similar": `2·TP / (2·TP + FP + FN)`, 0 when there is nothing to score.
    pub fn f1(&self) -> f64 {
        let denom = 2 * self.tp + self.fp + self.fn_;
        if denom == 0 {
            0.0
        } else {
            2.0 * self.tp as f64 / denom as f64
        }
    }
}
