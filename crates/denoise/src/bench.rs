//! Throughput of step 2: images/s through the SimNet backbone (features, eval mode) and pairs/s
//! through the similarity head (the factorised first layer over all pairs of a category).
//! Called by `cargo xtask bench denoise`; weights are random, which does not change the cost.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use simtrans_core::Config;
use simtrans_simnet::{head::HeadKind, SimNet, SimNetShape};
use std::time::Instant;

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
}

/// Times the features of `images` images and their `images²` similarity matrix.
pub fn bench(config: &Config, device: &Device, images: usize) -> anyhow::Result<BenchReport> {
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
    net.features(&x)?; // warm-up
    let start = Instant::now();
    let mut feats = vec![];
    let mut done = 0;
    while done < images {
        let k = batch.min(images - done);
        feats.push(net.features(&x.narrow(0, 0, k)?)?);
        done += k;
    }
    let feats = Tensor::cat(&feats, 0)?;
    feats.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?; // wait for the device
    let feature_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let sim = crate::similarity::similarity_matrix(&feats, config.denoise.row_block, |r, a| {
        net.similarity_matrix(r, a)
    })?;
    sim.sum_all()?.to_scalar::<f32>()?;
    let pair_seconds = start.elapsed().as_secs_f64();
    Ok(BenchReport {
        arch: simtrans_backbone::resnet::arch_name(b.arch).to_string(),
        image_size: s,
        images,
        feature_images_per_second: images as f64 / feature_seconds,
        pairs_per_second: (images * images) as f64 / pair_seconds,
        device: format!("{device:?}"),
    })
}
