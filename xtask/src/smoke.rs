//! `cargo xtask smoke`: the paper configuration end to end, one epoch per stage, on a synthetic
//! CUB tree ([`simtrans_data::synthetic`]).
//!
//! Why it exists: the paper configuration (ResNet-50 at 224 px, the paper's batch sizes, the
//! real-data loader and its JPEG decoding, every stage) had never run end to end, because no
//! machine here has held CUB and a GPU at once. The smoke run checks a machine and a build
//! before a real run (a first run on CUB takes hours) and times each stage on data of CUB's
//! sizes. It starts from random weights, so it needs no download, and its accuracy means
//! nothing.

use crate::cli::Common;
use anyhow::{Context, Result};
use simtrans_data::synthetic::{cub_tree, CubTree, PhotoSize};

/// The overrides of the paper preset that make it a smoke run; `--set` flags come after them.
pub const SETTINGS: &[&str] = &[
    "backbone.weights=scratch",
    "classifier.init=backbone",
    "backbone.optim.epochs=1",
    "simnet.optim.epochs=1",
    "classifier.epochs_3a=1",
    "classifier.epochs_3b=1",
];

/// The run a smoke run writes to unless `--run` names another than `default`, so that it never
/// replaces the artifacts of the default run.
pub const RUN: &str = "smoke";

/// The invocation a smoke run makes of `common`: run [`RUN`] (unless it names another), the
/// paper preset (unless it names a preset or a config file), the CUB data set, and
/// [`SETTINGS`] before its own `--set` flags. The data path is [`prepare`]'s.
pub fn invocation(common: &Common) -> Common {
    let mut smoke = common.clone();
    if smoke.run == "default" {
        smoke.run = RUN.into();
    }
    if smoke.preset.is_none() && smoke.config.is_none() {
        smoke.preset = Some("paper".into());
    }
    smoke.dataset = Some("cub".into());
    smoke.overrides = SETTINGS.iter().map(|s| s.to_string()).collect();
    smoke.overrides.extend(common.overrides.iter().cloned());
    smoke
}

/// Prepares a smoke run: [`invocation`] with the data path at a synthetic tree under the run
/// folder, sized by [`tree_for`] and written unless it is there. Returns the invocation and the
/// number of photographs in the tree.
pub fn prepare(common: &Common) -> Result<(Common, usize)> {
    let mut smoke = invocation(common);
    let spec = tree_for(&smoke.resolve()?)?;
    // The folder names the spec, so that a different spec never reuses a tree (nor the data
    // stage's cached index of it).
    let name = format!("synthetic-cub-{}-{}-{}", spec.train, spec.test, spec.web);
    let root = smoke.runs_dir.join(&smoke.run).join(name);
    let photos = spec.photos()?;
    if !root.exists() {
        // Written beside, then renamed: a killed run leaves no half tree behind.
        let partial = root.with_extension("partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial)
                .with_context(|| format!("removing {}", partial.display()))?;
        }
        tracing::info!(
            "writing {photos} synthetic photographs to {}",
            root.display()
        );
        cub_tree(&partial, &spec)?;
        std::fs::rename(&partial, &root)
            .with_context(|| format!("renaming {} into place", partial.display()))?;
    }
    smoke.data_path = Some(root.to_string_lossy().into_owned());
    Ok((smoke, photos))
}

/// Steps of the backbone's one epoch that the tree provides for.
///
/// Why: BatchNorm's running statistics start at mean 0 and variance 1 and move 10 % per
/// training step, and evaluation mode (the similarity matrices, the tests) normalises with
/// them. A ResNet-50 from random weights gave features of order 6·10⁵ in evaluation mode after
/// 16 steps (one epoch of a tree with 3 images per class), which made every similarity of a
/// category exactly 0 and stopped step 2; with the statistics moved by more forward passes,
/// 3 after 48 and 1.5 after 80 (measured on the CPU at 32 px). Forty backbone steps and the
/// SimNet's epoch give more than 60.
pub const BACKBONE_STEPS: usize = 40;

/// Enough images for the configuration's batches: training images of each base class for
/// [`BACKBONE_STEPS`] steps of the backbone (and at least a SimNet source batch's
/// `batch_a / classes_a`, at least 3), one test image per class, and web images of each novel
/// class for a whole SimNet target batch from `classes_b` classes (at least 4).
pub fn tree_for(config: &simtrans_core::Config) -> Result<CubTree> {
    let s = &config.simnet;
    let (base_classes, _) = simtrans_data::synthetic::cub_split()?;
    let train = (BACKBONE_STEPS * config.backbone.batch_size)
        .div_ceil(base_classes)
        .max(s.batch_a.div_ceil(s.classes_a.max(1)))
        .max(3);
    Ok(CubTree {
        train,
        test: 1,
        web: 4.max(s.batch_b.div_ceil(s.classes_b.max(1))),
        size: PhotoSize::Cub,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paper_preset_gets_a_tree_for_its_batches_and_user_settings_win() {
        let common = Common {
            run: "default".into(),
            overrides: vec!["classifier.epochs_3b=2".into()],
            ..Common::default()
        };
        let smoke = invocation(&common);
        assert_eq!(smoke.run, RUN, "never the default run");
        let config = smoke.resolve().unwrap();
        assert_eq!(config.run.dataset, simtrans_core::config::DatasetKind::Cub);
        assert_eq!(
            (config.backbone.arch, config.data.image_size),
            (simtrans_backbone::Arch::Resnet50, 224)
        );
        assert_eq!(
            (config.classifier.epochs_3a, config.classifier.epochs_3b),
            (1, 2)
        );
        assert_eq!(config.backbone.weights, "scratch");
        // 40 backbone steps of 64 images over 150 classes; SimNet target batches of 50 images
        // from 2 classes.
        let spec = tree_for(&config).unwrap();
        assert_eq!((spec.train, spec.test, spec.web), (18, 1, 25));
        // A named preset is kept.
        let demo = Common {
            preset: Some("demo".into()),
            ..Common::default()
        };
        assert_eq!(
            invocation(&demo).resolve().unwrap().backbone.arch,
            simtrans_backbone::Arch::Small
        );
    }
}
