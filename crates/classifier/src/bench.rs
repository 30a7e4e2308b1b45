//! Training throughput of the classifier's steps, for `cargo xtask bench classifier`.
//!
//! Times the two kinds of step the stage runs, each a full training step (forward in training
//! mode, loss, backward, SGD update) on random images, so the figure is the networks' cost
//! alone, without image decoding: a classification step (weighted cross-entropy, batch
//! `classifier.batch_size`: all of step 3a and the odd epochs of 3b) and a graph step (the frozen
//! SimNet's similarity matrix of the batch and the graph term as well, batch
//! `classifier.graph_batch_size`). The orchestrator prints and records the numbers; no test
//! asserts them.

use crate::losses::GraphReg;
use crate::stage::batch_loss;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use simtrans_backbone::{trainable_vars, ResNet};
use simtrans_core::Config;
use simtrans_ops::optim::Sgd;
use simtrans_simnet::head::HeadKind;
use simtrans_simnet::{SimNet, SimNetShape};
use std::time::Instant;

/// What one bench run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// `classification` or `graph`.
    pub step: String,
    /// Network name and the small network's width.
    pub arch: String,
    pub small_width: usize,
    /// Input side in pixels.
    pub image_size: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Timed steps (after one untimed warm-up step).
    pub steps: usize,
    /// Wall time of the timed steps.
    pub seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
    /// The device, as candle names it.
    pub device: String,
}

/// Times `steps` classification steps and `steps` graph steps of the configured networks.
pub fn bench(config: &Config, device: &Device, steps: usize) -> anyhow::Result<Vec<BenchReport>> {
    let b = &config.backbone;
    let c = &config.classifier;
    let classes = 4;
    let varmap = VarMap::new();
    let vb = simtrans_core::seed::var_builder(
        &varmap,
        0,
        "bench",
        simtrans_backbone::resnet::DTYPE,
        device,
    );
    let net = ResNet::new(b.arch, b.small_width, Some(classes), vb)?;
    let shape = SimNetShape {
        arch: b.arch,
        small_width: b.small_width,
        head: HeadKind::from_config(config.simnet.head)?,
    };
    let simnet = SimNet::build(shape, VarMap::new(), VarMap::new(), 0, device)?;
    let graph = GraphReg::from_config(c)?;
    let mut sgd = Sgd::new(
        trainable_vars(&varmap),
        c.optim.lr,
        c.optim.momentum,
        c.optim.weight_decay,
    );
    let side = config.data.image_size;
    let mut reports = vec![];
    for (step, batch) in [
        ("classification", c.batch_size),
        ("graph", c.graph_batch_size),
    ] {
        let x = Tensor::randn(0f32, 1., (batch, 3, side, side), device)?;
        let y: Vec<u32> = (0..batch as u32).map(|i| i % classes as u32).collect();
        let y = Tensor::new(y.as_slice(), device)?;
        let w = Tensor::ones(batch, candle_core::DType::F32, device)?;
        let with_graph = (step == "graph").then_some((&simnet, &graph));
        let mut train = || -> anyhow::Result<()> {
            let loss = batch_loss(&net, with_graph, &x, &y, &w)?.loss;
            sgd.step(&simtrans_ops::grad::backward(&loss)?)?;
            // Reading the loss waits for asynchronous devices.
            loss.to_scalar::<f32>()?;
            Ok(())
        };
        train()?;
        let start = Instant::now();
        for _ in 0..steps {
            train()?;
        }
        let seconds = start.elapsed().as_secs_f64();
        reports.push(BenchReport {
            step: step.into(),
            arch: simtrans_backbone::resnet::arch_name(b.arch).into(),
            small_width: b.small_width,
            image_size: side,
            batch_size: batch,
            steps,
            seconds,
            images_per_second: (steps * batch) as f64 / seconds.max(1e-9),
            device: format!("{device:?}"),
        });
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_steps_run_on_the_tiny_demo() {
        let mut config = simtrans_core::Config::preset(simtrans_core::Preset::Demo);
        config.backbone.small_width = 2;
        config.data.image_size = 12;
        config.classifier.batch_size = 4;
        config.classifier.graph_batch_size = 6;
        let r = super::bench(&config, &candle_core::Device::Cpu, 1).unwrap();
        let got: Vec<(&str, usize)> = r.iter().map(|r| (r.step.as_str(), r.batch_size)).collect();
        assert_eq!(got, [("classification", 4), ("graph", 6)]);
        assert!(r.iter().all(|r| r.images_per_second > 0.0 && r.steps == 1));
    }
}
