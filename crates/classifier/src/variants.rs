//! The classifier variants of the ablation table, their switches, and the epoch schedule.
//!
//! Every variant is the same training code with switches, so that the table compares methods and
//! not code paths. **Design decision: every variant trains the same total number of epochs**,
//! `epochs_3a` then `epochs_3b`, from the same initialisation and with the same learning-rate
//! schedule and batch sizes, so that paired comparisons (same seed, same data) are fair and differ
//! only in what the switches name:
//!
//! | variant     | step 3a            | step 3b                          | training images            |
//! |-------------|--------------------|----------------------------------|----------------------------|
//! | `naive`     | unweighted         | unweighted, no graph term        | all web images             |
//! | `weighting` | weighted (`savg1`) | weighted (`avg1`), no graph term | all web images             |
//! | `graph`     | unweighted         | unweighted, graph term           | all web images             |
//! | `full`      | weighted (`savg1`) | weighted (`avg1`), graph term    | all web images (the paper) |
//! | `clean`     | unweighted         | unweighted, no graph term        | clean web images only      |
//!
//! (The weight schemes are `classifier.weights_3a` / `weights_3b`; the defaults are shown.)
//! `naive` is the webly-supervised baseline; `full` is the paper's final model; `clean` is the
//! naive recipe on only the web images whose recorded ground truth is clean — the oracle upper
//! bound, available only where the data index has noise ground truth.
//!
//! **Step 3b alternates** epoch kinds, counted from 0 at the start of 3b: even epochs are graph
//! epochs (batches of `graph_batch_size`, the graph term on where the variant has it), odd epochs
//! are classification-only (batches of `batch_size`); epoch 0 is a graph epoch. A variant without
//! the graph term keeps the same alternation of batch sizes with the term switched off, so that
//! `graph` vs `naive` and `full` vs `weighting` differ in the regulariser alone and not in the
//! number of optimiser steps. Step 3a uses `batch_size` throughout.
//!
//! **Learning rate**: `step_lr(lr, lr_decay, lr_step, e)` with `e` the epoch within the step,
//! counted across both kinds of 3b epoch; the count restarts at 3b, as the reference ran 3b as a
//! fresh script from the 3a model (`lr 1e-4·0.5^⌊epoch/20⌋` over 60 and then over 100 epochs).

use std::fmt;
use std::str::FromStr;

use simtrans_core::config::ClassifierConfig;
use simtrans_denoise::WeightScheme;
use simtrans_ops::optim::step_lr;

use crate::error::{ClassifierError, Result};

/// One row of the ablation table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Variant {
    /// Unweighted, no graph: the webly-supervised baseline.
    Naive,
    /// Weighted cross-entropy in 3a and 3b, no graph.
    Weighting,
    /// Unweighted, with the graph term in 3b.
    Graph,
    /// Weighted, with the graph term in 3b: the paper's final model.
    Full,
    /// The naive recipe on the clean web images only: the oracle.
    Clean,
}

/// What a variant switches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switches {
    /// Step 3a weights the cross-entropy by `weights_3a`.
    pub weighted_3a: bool,
    /// Step 3b weights the cross-entropy by `weights_3b`.
    pub weighted_3b: bool,
    /// Graph epochs of 3b add the graph regulariser.
    pub graph: bool,
    /// Train only on web images whose recorded ground truth is clean.
    pub clean_only: bool,
}

impl Variant {
    /// Every variant, in table order.
    pub const ALL: [Variant; 5] = [
        Self::Naive,
        Self::Weighting,
        Self::Graph,
        Self::Full,
        Self::Clean,
    ];

    /// The accepted names.
    pub const VALID: &'static str = "naive, weighting, graph, full, clean";

    /// The config and artifact name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Naive => "naive",
            Self::Weighting => "weighting",
            Self::Graph => "graph",
            Self::Full => "full",
            Self::Clean => "clean",
        }
    }

    /// The variant's switches (see the module doc's table).
    pub fn switches(self) -> Switches {
        let (weighted, graph, clean_only) = match self {
            Self::Naive => (false, false, false),
            Self::Weighting => (true, false, false),
            Self::Graph => (false, true, false),
            Self::Full => (true, true, false),
            Self::Clean => (false, false, true),
        };
        Switches {
            weighted_3a: weighted,
            weighted_3b: weighted,
            graph,
            clean_only,
        }
    }

    /// Whether the variant needs the noise ground truth of the web images (only `clean`).
    pub fn needs_noise_truth(self) -> bool {
        self.switches().clean_only
    }

    /// Whether the variant needs the denoise artifact (its weights) or the SimNet (its graph).
    pub fn needs_denoise(self) -> bool {
        let s = self.switches();
        s.weighted_3a || s.weighted_3b
    }

    /// Whether the variant needs the SimNet at training time (for `A` on graph epochs).
    pub fn needs_simnet(self) -> bool {
        self.switches().graph
    }

    /// The part of `[classifier]` this variant's training reads, as JSON: its cache key's
    /// section. `variants` (which variants a run trains) is never part of it, the weight schemes
    /// only where the variant weights, and the graph term's settings only where it has one, so
    /// adding a variant or changing `alpha` retrains exactly the variants that read the change.
    pub fn reads(self, cfg: &ClassifierConfig) -> serde_json::Value {
        let mut section = serde_json::to_value(cfg).expect("the classifier config serialises");
        let fields = section.as_object_mut().expect("a section is an object");
        fields.remove("variants");
        let s = self.switches();
        if !(s.weighted_3a || s.weighted_3b) {
            fields.remove("weights_3a");
            fields.remove("weights_3b");
        }
        if !s.graph {
            for f in ["alpha", "mu", "eye", "reg"] {
                fields.remove(f);
            }
        }
        section
    }

    /// Parses a list of names (the `classifier.variants` setting), rejecting duplicates.
    pub fn parse_list<S: AsRef<str>>(names: &[S]) -> Result<Vec<Variant>> {
        let mut out: Vec<Variant> = Vec::with_capacity(names.len());
        for name in names {
            let v: Variant = name.as_ref().parse()?;
            if out.contains(&v) {
                return Err(ClassifierError::Config(format!(
                    "variant `{v}` is listed twice in classifier.variants; list each once"
                )));
            }
            out.push(v);
        }
        Ok(out)
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = ClassifierError;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| ClassifierError::UnknownVariant {
                name: s.to_string(),
                valid: Self::VALID,
            })
    }
}

/// Step 3a or step 3b.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Step 3a: weighted (or plain) cross-entropy only.
    Step3a,
    /// Step 3b: alternating graph and classification-only epochs.
    Step3b,
}

/// The kind of an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochKind {
    /// A 3b graph epoch: batches of `graph_batch_size`; the graph term where the variant has it.
    Graph,
    /// A classification-only epoch: batches of `batch_size`.
    Classification,
}

/// The kind of epoch `e` of step 3b (counted from 0 at the start of 3b): even → graph.
pub fn kind_3b(e: usize) -> EpochKind {
    if e % 2 == 0 {
        EpochKind::Graph
    } else {
        EpochKind::Classification
    }
}

/// Everything the training loop needs to know about one epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochPlan {
    /// Step 3a or 3b.
    pub phase: Phase,
    /// Epoch within its phase, from 0.
    pub epoch: usize,
    /// Epoch over the whole run, from 0 (3a epochs first): the checkpoint index.
    pub global_epoch: usize,
    /// Graph or classification-only.
    pub kind: EpochKind,
    /// Images per batch.
    pub batch_size: usize,
    /// Whether the loss includes the graph term this epoch.
    pub graph_loss: bool,
    /// Weights of the cross-entropy this epoch (`None` = all ones).
    pub weights: WeightScheme,
    /// Learning rate of this epoch.
    pub lr: f64,
}

/// The whole epoch schedule of `variant`: `epochs_3a` plans of step 3a, then `epochs_3b` of 3b.
/// `top_r` is `denoise.top_r`, used if a weight scheme is `avgR`. Fails on unknown weight scheme
/// names, zero batch sizes, or a graph variant without any 3b epoch.
pub fn schedule(variant: Variant, cfg: &ClassifierConfig, top_r: f64) -> Result<Vec<EpochPlan>> {
    if cfg.batch_size == 0 || cfg.graph_batch_size == 0 {
        return Err(ClassifierError::Config(format!(
            "batch_size = {} and graph_batch_size = {} must both be at least 1",
            cfg.batch_size, cfg.graph_batch_size
        )));
    }
    let sw = variant.switches();
    if sw.graph && cfg.epochs_3b == 0 {
        return Err(ClassifierError::Config(format!(
            "variant `{variant}` regularises on step-3b graph epochs, but epochs_3b = 0; set epochs_3b ≥ 1"
        )));
    }
    // Parse both names even when unused, so that a typo fails every variant alike.
    let w3a = WeightScheme::parse(&cfg.weights_3a, top_r)?;
    let w3b = WeightScheme::parse(&cfg.weights_3b, top_r)?;
    let o = &cfg.optim;
    let lr = |e: usize| step_lr(o.lr, o.lr_decay, o.lr_step, e);
    let mut plans = Vec::with_capacity(cfg.epochs_3a + cfg.epochs_3b);
    for e in 0..cfg.epochs_3a {
        plans.push(EpochPlan {
            phase: Phase::Step3a,
            epoch: e,
            global_epoch: e,
            kind: EpochKind::Classification,
            batch_size: cfg.batch_size,
            graph_loss: false,
            weights: if sw.weighted_3a {
                w3a
            } else {
                WeightScheme::None
            },
            lr: lr(e),
        });
    }
    for e in 0..cfg.epochs_3b {
        let kind = kind_3b(e);
        plans.push(EpochPlan {
            phase: Phase::Step3b,
            epoch: e,
            global_epoch: cfg.epochs_3a + e,
            kind,
            batch_size: match kind {
                EpochKind::Graph => cfg.graph_batch_size,
                EpochKind::Classification => cfg.batch_size,
            },
            graph_loss: sw.graph && kind == EpochKind::Graph,
            weights: if sw.weighted_3b {
                w3b
            } else {
                WeightScheme::None
            },
            lr: lr(e),
        });
    }
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use simtrans_core::Config;

    #[test]
    fn a_variant_reads_only_its_own_settings() {
        let a = paper();
        let mut b = a.clone();
        b.variants.push("graph".into());
        b.alpha = 0.5;
        b.weights_3a = "avg1".into();
        assert_eq!(Variant::Naive.reads(&a), Variant::Naive.reads(&b));
        assert_eq!(Variant::Clean.reads(&a), Variant::Clean.reads(&b));
        assert_ne!(Variant::Weighting.reads(&a), Variant::Weighting.reads(&b));
        assert_ne!(Variant::Graph.reads(&a), Variant::Graph.reads(&b));
        let mut c = a.clone();
        c.alpha = 0.5;
        assert_eq!(Variant::Weighting.reads(&a), Variant::Weighting.reads(&c));
        assert_ne!(Variant::Full.reads(&a), Variant::Full.reads(&c));
        // What every variant reads still keys every variant.
        let mut d = a.clone();
        d.epochs_3b += 1;
        for v in Variant::ALL {
            assert_ne!(v.reads(&a), v.reads(&d), "{v}");
        }
    }

    fn paper() -> ClassifierConfig {
        Config::preset(simtrans_core::Preset::Paper).classifier
    }

    #[test]
    fn names_round_trip_and_unknown_names_list_valid_ones() {
        for v in Variant::ALL {
            assert_eq!(v.name().parse::<Variant>().unwrap(), v);
            assert_eq!(v.to_string(), v.name());
        }
        let err = "Full".parse::<Variant>().unwrap_err().to_string();
        assert!(
            err.contains("`Full`") && err.contains(Variant::VALID),
            "{err}"
        );
        assert!(Variant::parse_list(&["naive", "naive"]).is_err());
        assert_eq!(
            Variant::parse_list(&["full", "naive"]).unwrap(),
            vec![Variant::Full, Variant::Naive]
        );
    }

    #[test]
    fn switches_follow_the_table() {
        let s = |v: Variant| {
            let s = v.switches();
            (s.weighted_3a, s.weighted_3b, s.graph, s.clean_only)
        };
        assert_eq!(s(Variant::Naive), (false, false, false, false));
        assert_eq!(s(Variant::Weighting), (true, true, false, false));
        assert_eq!(s(Variant::Graph), (false, false, true, false));
        assert_eq!(s(Variant::Full), (true, true, true, false));
        assert_eq!(s(Variant::Clean), (false, false, false, true));
        assert!(Variant::Clean.needs_noise_truth() && !Variant::Full.needs_noise_truth());
        assert!(Variant::Full.needs_simnet() && !Variant::Weighting.needs_simnet());
        assert!(Variant::Weighting.needs_denoise() && !Variant::Graph.needs_denoise());
    }

    #[test]
    fn paper_schedule_of_the_full_model() {
        let cfg = paper();
        let plans = schedule(Variant::Full, &cfg, 0.5).unwrap();
        assert_eq!(plans.len(), 160);
        let a = &plans[..60];
        assert!(a.iter().all(|p| p.phase == Phase::Step3a
            && p.batch_size == 8
            && !p.graph_loss
            && p.weights == WeightScheme::Savg1));
        assert_eq!((a[19].lr, a[20].lr, a[59].lr), (1e-4, 5e-5, 2.5e-5));
        let b = &plans[60..];
        assert_eq!((b[0].epoch, b[0].global_epoch), (0, 60));
        // Epoch 0 of 3b is a graph epoch; the kinds alternate from there.
        assert_eq!(b[0].kind, EpochKind::Graph);
        assert!(b[0].graph_loss && b[0].batch_size == 128);
        assert_eq!(b[1].kind, EpochKind::Classification);
        assert!(!b[1].graph_loss && b[1].batch_size == 8);
        for p in b {
            assert_eq!(p.kind == EpochKind::Graph, p.epoch % 2 == 0);
            assert_eq!(p.weights, WeightScheme::Avg1);
        }
        // The learning rate restarts at 3b and decays every 20 epochs of either kind.
        assert_eq!(
            (b[0].lr, b[19].lr, b[20].lr, b[21].lr),
            (1e-4, 1e-4, 5e-5, 5e-5)
        );
        assert_eq!(b[99].lr, 1e-4 * 0.5f64.powi(4));
    }

    #[test]
    fn every_variant_trains_the_same_epochs_and_batches() {
        let cfg = paper();
        let full = schedule(Variant::Full, &cfg, 0.5).unwrap();
        for v in Variant::ALL {
            let plans = schedule(v, &cfg, 0.5).unwrap();
            assert_eq!(plans.len(), full.len(), "{v}");
            let sw = v.switches();
            for (p, f) in plans.iter().zip(&full) {
                assert_eq!(
                    (p.phase, p.epoch, p.kind, p.batch_size, p.lr),
                    (f.phase, f.epoch, f.kind, f.batch_size, f.lr)
                );
                assert_eq!(p.graph_loss, sw.graph && f.graph_loss, "{v}");
                let weighted = match p.phase {
                    Phase::Step3a => sw.weighted_3a,
                    Phase::Step3b => sw.weighted_3b,
                };
                assert_eq!(p.weights != WeightScheme::None, weighted, "{v}");
            }
        }
    }

    #[test]
    fn bad_settings_are_errors() {
        let mut cfg = paper();
        cfg.weights_3b = "avg2".into();
        assert!(schedule(Variant::Naive, &cfg, 0.5).is_err());
        let mut cfg = paper();
        cfg.epochs_3b = 0;
        assert!(schedule(Variant::Graph, &cfg, 0.5).is_err());
        assert_eq!(schedule(Variant::Weighting, &cfg, 0.5).unwrap().len(), 60);
        let mut cfg = paper();
        cfg.graph_batch_size = 0;
        assert!(schedule(Variant::Naive, &cfg, 0.5).is_err());
    }
}
