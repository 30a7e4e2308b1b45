//! Throughput of step 2: images/s through the SimNet backbone (features, eval mode) and pairs/s
//! through the similarity head (the factorised first layer over all pairs of a category).
//! Called by `cargo xtask bench denoise`; weights are random, which does not change the cost.
//! Both are timed after an untimed pass of each (kernel loading, algorithm choice).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use simtrans_core::Config;
use simtrans_ops::hostprof::Phases;
use simtrans_simnet::{head::HeadKind, SimNet, SimNetShape};

/// What one bench run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// The backbone.
    pub arch: String,
    /// Input side in pixels.
    pub image_size: usize,
    /// Images of the category (L): features of L images, then L² pairs.
    pub images: usize,
    /// Backbone images per second (eval mode, batches of `denoise.feature_batch`).
    pub feature_images_per_second: f64,
    /// Head pairs per second (the whole L×L matrix).
    pub pairs_per_second: f64,
    /// The device, as candle names it.
    pub device: String,
    /// Seconds per pass of the features and of the matrix, from `reps` passes after an
    /// untimed one.
    #[serde(flatten)]
    pub phases: Phases,
}

/// Times the features of `images` images and their `images²` similarity matrix: one untimed
/// pass, then the mean of `reps` passes.
pub fn bench(
    config: &Config,
    device: &Device,
    images: usize,
    reps: usize,
) -> anyhow::Result<BenchReport> {
    let b = &config.backbone;
    let shape = SimNetShape {
        arch: b.arch,
        small_width: b.small_width,
        head: HeadKind::from_config(config.simnet.head)?,
    };
    let net = SimNet::build(shape, VarMap::new(), VarMap::new(), 0, device)?;
    let s = config.data.image_size;
    let batch = config.denoise.feature_batch.max(1).min(images);
    let n = batch * 3 * s * s;
    let x = Tensor::from_vec(
        (0..n)
            .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
            .collect::<Vec<_>>(),
        (batch, 3, s, s),
        device,
    )?;
    let features = || -> anyhow::Result<Tensor> {
        let mut feats = vec![];
        let mut done = 0;
        while done < images {
            let k = batch.min(images - done);
            feats.push(net.features(&x.narrow(0, 0, k)?)?);
            done += k;
        }
        Ok(Tensor::cat(&feats, 0)?)
    };
    let matrix = |feats: &Tensor| -> anyhow::Result<Tensor> {
        Ok(crate::similarity::similarity_matrix(
            feats,
            config.denoise.row_block,
            |r, a| net.similarity_matrix(r, a),
        )?)
    };
    // Warm-up of both, at the timed shapes: first calls load kernels and choose algorithms.
    matrix(&features()?)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    let mut phases = Phases::new(&["features", "similarity matrix"]);
    for _ in 0..reps.max(1) {
        let feats = phases.time(0, device, features)?;
        phases.time(1, device, || matrix(&feats))?;
    }
    let phases = phases.per_step();
    Ok(BenchReport {
        arch: simtrans_backbone::resnet::arch_name(b.arch).to_string(),
        image_size: s,
        images,
        feature_images_per_second: images as f64 / phases.phase_seconds[0].max(1e-9),
        pairs_per_second: (images * images) as f64 / phases.phase_seconds[1].max(1e-9),
        device: format!("{device:?}"),
        phases,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_phases_are_timed_after_a_warm_up() {
        let config = simtrans_core::Config::preset(simtrans_core::Preset::Demo);
        let r = super::bench(&config, &candle_core::Device::Cpu, 6, 2).unwrap();
        assert_eq!(r.phases.phase_steps, 2);
        assert_eq!(r.phases.phase_names, ["features", "similarity matrix"]);
        for (issued, whole) in r.phases.issue_seconds.iter().zip(&r.phases.phase_seconds) {
            assert!(*issued > 0.0 && issued <= whole, "{r:?}");
        }
        let pairs_per_second = 36.0 / r.phases.phase_seconds[1];
        assert!(
            (r.pairs_per_second / pairs_per_second - 1.0).abs() < 1e-9,
            "{r:?}"
        );
    }
}
