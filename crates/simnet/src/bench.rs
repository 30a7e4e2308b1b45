//! Throughput of one adversarial SimNet training step, for `cargo xtask bench simnet` and the
//! GPU table of `BENCHMARKS.md`.
//!
//! One step is what step 1 repeats: the backbone in training mode on `cat(A, B)`, the head on
//! the `|A|² + |B|²` pairs within each half, the SimNet update, then the discriminator update.
//! Images are deterministic pseudo-random values and labels cycle over ten classes, so the
//! figure is the network's cost alone, without decoding.

use crate::head::HeadKind;
use crate::train::{head_forward_with, PairTargets, Trainer};
use crate::{SimNet, SimNetShape};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use simtrans_backbone::resnet::{arch_name, Arch};
use simtrans_ops::hostprof::Phases;
use simtrans_ops::optim::Sgd;
use std::time::Instant;

/// What one bench run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// The backbone.
    pub arch: String,
    /// Input side in pixels.
    pub image_size: usize,
    /// Images per step (`|A| + |B|`).
    pub images: usize,
    /// Head rows per step (`|A|² + |B|²`).
    pub pairs: usize,
    /// Head kind (2 or 4).
    pub head: u8,
    /// Timed steps (after one untimed warm-up step).
    pub steps: usize,
    /// Wall time of the timed steps.
    pub seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
    /// The device, as candle names it.
    pub device: String,
    /// Bytes in use on the GPU after the warm-up step and after the timed steps
    /// ([`simtrans_ops::gpu::memory_in_use`]); `None` on the CPU.
    pub device_memory: Option<[u64; 2]>,
    /// Where a step's time goes, from extra steps with a device synchronisation between
    /// phases: the backbone's forward pass, the head and the losses (the discriminator's
    /// forward pass included), the backward pass and the update of the SimNet, then the
    /// discriminator's whole update.
    #[serde(flatten)]
    pub phases: Phases,
}

/// Times `steps` SimNet steps on `images / 2` source and `images / 2` target images.
pub fn bench(
    device: &Device,
    arch: Arch,
    small_width: usize,
    image_size: usize,
    images: usize,
    head: HeadKind,
    steps: usize,
) -> crate::Result<BenchReport> {
    let shape = SimNetShape {
        arch,
        small_width,
        head,
    };
    let net = SimNet::build(shape, VarMap::new(), VarMap::new(), 0, device)?;
    let mut trainer = Trainer {
        sim_opt: Sgd::new(
            simtrans_backbone::trainable_vars(&net.simnet_vars),
            1e-3,
            0.9,
            1e-4,
        ),
        disc_opt: Sgd::new(
            simtrans_backbone::trainable_vars(&net.disc_vars),
            1e-3,
            0.9,
            1e-4,
        ),
        beta: 0.1,
        bn_split: true,
    };
    let na = images / 2;
    let nb = images - na;
    let n = na * 3 * image_size * image_size;
    let pixels = |seed: usize| {
        (0..n)
            .map(|i| (((i + seed) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
            .collect::<Vec<_>>()
    };
    let a = Tensor::from_vec(pixels(0), (na, 3, image_size, image_size), device)?;
    let b = Tensor::from_vec(pixels(1), (na, 3, image_size, image_size), device)?.narrow(
        0,
        0,
        nb.min(na),
    )?;
    let labels: Vec<u32> = (0..na as u32).map(|i| i % 10).collect();
    // `step` reads its losses back, which waits for the device.
    trainer.step(&net.backbone, &net.head, &net.disc, &a, &labels, &b)?;
    let memory_warm = simtrans_ops::gpu::memory_in_use(device)?;
    let start = Instant::now();
    for _ in 0..steps {
        trainer.step(&net.backbone, &net.head, &net.disc, &a, &labels, &b)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let memory_timed = simtrans_ops::gpu::memory_in_use(device)?;
    let mut phases = Phases::new(&[
        "backbone forward",
        "head and losses",
        "SimNet backward",
        "SimNet optimiser",
        "discriminator update",
    ]);
    for _ in 0..steps.clamp(1, 3) {
        // In the order of `Trainer::forward`: the targets before the backbone's work.
        let (targets, fa, fb) = phases.time(0, device, || {
            let targets = PairTargets::new(&labels, b.dim(0)?, device)?;
            let (fa, fb) = trainer.features(&net.backbone, &a, &b)?;
            candle_core::Result::Ok((targets, fa, fb))
        })?;
        let (fwd, losses) = phases.time(1, device, || {
            let fwd = head_forward_with(&net.head, &fa, &fb, targets, trainer.bn_split)?;
            let losses = fwd.losses(&net.disc, trainer.beta)?;
            candle_core::Result::Ok((fwd, losses))
        })?;
        let grads = phases.time(2, device, || simtrans_ops::grad::backward(&losses.total))?;
        phases.time(3, device, || trainer.sim_opt.step(&grads))?;
        phases.time(4, device, || {
            trainer.discriminator_step(&losses, grads, &fwd, &net.disc)
        })?;
    }
    let nb = b.dim(0)?;
    Ok(BenchReport {
        arch: arch_name(arch).into(),
        image_size,
        images: na + nb,
        pairs: na * na + nb * nb,
        head: head.number(),
        steps,
        seconds,
        images_per_second: (steps * (na + nb)) as f64 / seconds.max(1e-9),
        device: format!("{device:?}"),
        device_memory: memory_warm.zip(memory_timed).map(|(a, b)| [a, b]),
        phases: phases.per_step(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_step_runs_and_counts_pairs() {
        let head = crate::head::HeadKind::from_config(4).unwrap();
        let r = super::bench(
            &candle_core::Device::Cpu,
            simtrans_backbone::Arch::Small,
            2,
            12,
            6,
            head,
            1,
        )
        .unwrap();
        assert_eq!((r.images, r.pairs, r.head), (6, 18, 4));
        assert_eq!((r.phases.phase_steps, r.phases.phase_seconds.len()), (1, 5));
        for (issued, whole) in r.phases.issue_seconds.iter().zip(&r.phases.phase_seconds) {
            assert!(*issued > 0.0 && issued <= whole, "{r:?}");
        }
        assert!(r.images_per_second > 0.0);
    }
}
