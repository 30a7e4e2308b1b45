//! The stage-graph walk with fake stages: caching, invalidation, single stages, failures.

use anyhow::Result;
use candle_core::{Device, Tensor};
use simtrans_core::{Config, Preset, RunStore, Stage, StageContext, StageOutput};
use std::cell::RefCell;
use std::collections::BTreeSet;
use xtask::pipeline::{Outcome, Pipeline, StageRunner};

#[derive(Default)]
struct Fake {
    ran: RefCell<Vec<String>>,
    fail: Option<Stage>,
}

impl StageRunner for Fake {
    fn run(&self, ctx: &StageContext) -> Result<StageOutput> {
        if self.fail == Some(ctx.node.stage) {
            anyhow::bail!("boom");
        }
        self.ran.borrow_mut().push(ctx.node.name());
        // Every upstream artifact must be readable when a stage runs.
        for path in ctx.upstream.values() {
            simtrans_core::Artifact::verify(path)?;
        }
        let mut out = StageOutput::default();
        out.tensors
            .insert("x".into(), Tensor::new(&[ctx.seed as f32], &Device::Cpu)?);
        out.metrics = serde_json::json!({"node": ctx.node.name()});
        Ok(out)
    }
    fn schema_version(&self, _: Stage) -> u32 {
        1
    }
    fn manifest_hash(&self, _: &Config) -> String {
        "manifest".into()
    }
}

fn pipeline<'a>(dir: &std::path::Path, config: Config, runner: &'a Fake) -> Pipeline<'a> {
    Pipeline {
        store: RunStore::open(dir, "t").unwrap(),
        config,
        device: Device::Cpu,
        runner,
    }
}

fn built(outcomes: &std::collections::BTreeMap<(u64, String), Outcome>) -> Vec<String> {
    outcomes
        .iter()
        .filter(|(_, o)| **o == Outcome::Built)
        .map(|((_, n), _)| n.clone())
        .collect()
}

fn ablation_config() -> Config {
    let mut c = Config::preset(Preset::Demo);
    c.run.ablations = true;
    c
}

#[test]
fn a_config_change_invalidates_exactly_its_stage_and_downstream() {
    let dir = tempfile::tempdir().unwrap();
    let none = BTreeSet::new();
    let fake = Fake::default();
    let p = pipeline(dir.path(), ablation_config(), &fake);
    let first = p.reproduce(&[0], &none).unwrap();
    assert_eq!(built(&first).len(), 10, "{first:?}");
    let again = p.reproduce(&[0], &none).unwrap();
    assert!(built(&again).is_empty(), "{again:?}");

    let mut changed = ablation_config();
    changed.simnet.beta = 0.0;
    let fake = Fake::default();
    let p = pipeline(dir.path(), changed.clone(), &fake);
    let mut rebuilt = built(&p.reproduce(&[0], &none).unwrap());
    rebuilt.sort();
    assert_eq!(
        rebuilt,
        [
            "classifier-full",
            "classifier-graph",
            "classifier-weighting",
            "denoise",
            "eval",
            "simnet"
        ]
    );

    // Only the variants with the graph term read alpha.
    changed.classifier.alpha = 0.5;
    let fake = Fake::default();
    let p = pipeline(dir.path(), changed.clone(), &fake);
    let mut rebuilt = built(&p.reproduce(&[0], &none).unwrap());
    rebuilt.sort();
    assert_eq!(rebuilt, ["classifier-full", "classifier-graph", "eval"]);

    // What every variant reads rebuilds every variant.
    changed.classifier.epochs_3b += 2;
    let fake = Fake::default();
    let p = pipeline(dir.path(), changed, &fake);
    let mut rebuilt = built(&p.reproduce(&[0], &none).unwrap());
    rebuilt.sort();
    assert_eq!(
        rebuilt,
        [
            "classifier-clean",
            "classifier-full",
            "classifier-graph",
            "classifier-naive",
            "classifier-weighting",
            "eval"
        ]
    );
}

#[test]
fn adding_a_variant_trains_only_that_variant() {
    let dir = tempfile::tempdir().unwrap();
    let none = BTreeSet::new();
    let fake = Fake::default();
    let mut c = Config::preset(Preset::Demo);
    c.classifier.variants = vec!["naive".into()];
    pipeline(dir.path(), c.clone(), &fake)
        .reproduce(&[0], &none)
        .unwrap();
    c.classifier.variants.push("full".into());
    let fake = Fake::default();
    let mut rebuilt = built(
        &pipeline(dir.path(), c, &fake)
            .reproduce(&[0], &none)
            .unwrap(),
    );
    rebuilt.sort();
    assert_eq!(rebuilt, ["classifier-full", "eval"]);
}

#[test]
fn seeds_are_separate_and_force_rebuilds_downstream() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let p = pipeline(dir.path(), Config::preset(Preset::Demo), &fake);
    let out = p.reproduce(&[0, 1], &BTreeSet::new()).unwrap();
    // naive + full per seed: data, backbone, simnet, denoise, 2 classifiers, eval.
    assert_eq!(built(&out).len(), 14);
    assert!(p
        .store
        .artifact_path(1, &simtrans_core::Node::stage(Stage::Eval))
        .exists());
    let force: BTreeSet<Stage> = [Stage::Denoise, Stage::Classifier, Stage::Eval].into();
    let out = p.reproduce(&[0], &force).unwrap();
    let mut rebuilt = built(&out);
    rebuilt.sort();
    assert_eq!(
        rebuilt,
        ["classifier-full", "classifier-naive", "denoise", "eval"]
    );
}

#[test]
fn a_single_stage_needs_fresh_upstream_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let p = pipeline(dir.path(), Config::preset(Preset::Demo), &fake);
    let err = p.stage(Stage::Simnet, &[0], false).unwrap_err().to_string();
    assert!(err.contains("cargo xtask stage data --run t"), "{err}");
    p.stage(Stage::Data, &[0], false).unwrap();
    let err = p.stage(Stage::Simnet, &[0], false).unwrap_err().to_string();
    assert!(err.contains("cargo xtask stage backbone --run t"), "{err}");
    p.stage(Stage::Backbone, &[0], false).unwrap();
    assert_eq!(
        p.stage(Stage::Simnet, &[0], false).unwrap(),
        [Outcome::Built]
    );
    assert_eq!(
        p.stage(Stage::Simnet, &[0], false).unwrap(),
        [Outcome::Cached]
    );

    // Rebuilding data makes backbone stale, which a single simnet run must refuse.
    p.stage(Stage::Data, &[0], true).unwrap();
    let err = p.stage(Stage::Simnet, &[0], true).unwrap_err().to_string();
    assert!(err.contains("backbone") && err.contains("stale"), "{err}");
}

#[test]
fn a_failing_stage_writes_no_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake {
        fail: Some(Stage::Simnet),
        ..Default::default()
    };
    let p = pipeline(dir.path(), Config::preset(Preset::Demo), &fake);
    let err = p.reproduce(&[0], &BTreeSet::new()).unwrap_err();
    assert!(format!("{err:#}").contains("boom"));
    assert!(p
        .store
        .artifact_path(0, &simtrans_core::Node::stage(Stage::Backbone))
        .exists());
    assert!(!p
        .store
        .artifact_path(0, &simtrans_core::Node::stage(Stage::Simnet))
        .exists());
}

/// Writes an artifact as `cargo xtask import` does: key `imported:<sha>`, the data upstream.
fn write_imported(p: &Pipeline, seed: u64, node: &simtrans_core::Node, value: f32) {
    let data = simtrans_core::Artifact::verify(
        &p.store
            .artifact_path(seed, &simtrans_core::Node::stage(Stage::Data)),
    )
    .unwrap();
    let meta = simtrans_core::ArtifactMeta {
        node: node.name(),
        schema_version: 1,
        cache_key: simtrans_core::store::imported_key("feed"),
        upstream: [("data".to_string(), data.checksum)].into(),
        metrics: serde_json::json!({"node": node.name()}),
        ..Default::default()
    };
    let tensors = [(
        "x".to_string(),
        Tensor::new(&[value], &Device::Cpu).unwrap(),
    )]
    .into();
    simtrans_core::Artifact::new(meta, tensors)
        .save(&p.store.artifact_path(seed, node))
        .unwrap();
}

#[test]
fn an_imported_artifact_is_kept_and_keys_what_is_below_it() {
    let dir = tempfile::tempdir().unwrap();
    let none = BTreeSet::new();
    let fake = Fake::default();
    let p = pipeline(dir.path(), Config::preset(Preset::Demo), &fake);
    p.reproduce(&[0], &none).unwrap();
    let simnet = simtrans_core::Node::stage(Stage::Simnet);
    write_imported(&p, 0, &simnet, 42.0);

    // The walk keeps the imported SimNet whatever its key says, and rebuilds what reads it.
    let fake = Fake::default();
    let p = pipeline(dir.path(), Config::preset(Preset::Demo), &fake);
    let mut rebuilt = built(&p.reproduce(&[0], &none).unwrap());
    rebuilt.sort();
    assert_eq!(
        rebuilt,
        ["classifier-full", "denoise", "eval"],
        "{rebuilt:?}"
    );
    let kept = simtrans_core::Artifact::verify(&p.store.artifact_path(0, &simnet)).unwrap();
    assert!(simtrans_core::store::is_imported(&kept));
    // A config change of its own section does not make it stale either.
    let mut changed = Config::preset(Preset::Demo);
    changed.simnet.beta = 0.0;
    let fake = Fake::default();
    let p = pipeline(dir.path(), changed, &fake);
    assert!(built(&p.reproduce(&[0], &none).unwrap()).is_empty());
    // Forcing its stage rebuilds it.
    let fake = Fake::default();
    let p = pipeline(dir.path(), Config::preset(Preset::Demo), &fake);
    let forced: BTreeSet<Stage> = [Stage::Simnet].into();
    let rebuilt = built(&p.reproduce(&[0], &forced).unwrap());
    assert!(rebuilt.contains(&"simnet".to_string()), "{rebuilt:?}");
}

#[test]
fn a_run_holding_only_an_imported_classifier_can_be_evaluated() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::preset(Preset::Demo);
    config.classifier.variants = vec!["full".into()];
    let fake = Fake::default();
    let p = pipeline(dir.path(), config, &fake);
    p.stage(Stage::Data, &[0], false).unwrap();
    let full = simtrans_core::Node::variant(Stage::Classifier, "full");
    write_imported(&p, 0, &full, 1.0);
    // No backbone, SimNet or denoise artifact: eval reads data and the imported classifier.
    let outcomes = p.stage(Stage::Eval, &[0], false).unwrap();
    assert_eq!(outcomes, [Outcome::Built]);
    assert_eq!(*fake.ran.borrow(), ["data", "eval"]);
    let eval = simtrans_core::Artifact::verify(
        &p.store
            .artifact_path(0, &simtrans_core::Node::stage(Stage::Eval)),
    )
    .unwrap();
    let ups: Vec<&String> = eval.upstream.keys().collect();
    assert_eq!(ups, ["classifier-full", "data"]);
    // A variant with no artifact is still required (here first what it would be built from).
    let mut both = Config::preset(Preset::Demo);
    both.classifier.variants = vec!["naive".into(), "full".into()];
    let fake = Fake::default();
    let p = pipeline(dir.path(), both, &fake);
    let err = p.stage(Stage::Eval, &[0], false).unwrap_err().to_string();
    assert!(err.contains("backbone artifact missing"), "{err}");
}
