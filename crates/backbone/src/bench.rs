//! Training throughput of the backbone, for `cargo xtask bench backbone`.
//!
//! Times full training steps (forward in training mode, cross-entropy, backward, SGD update
//! with momentum and weight decay) on random images, so the figure is the network's cost alone,
//! without image decoding. The orchestrator prints and records the numbers; no test asserts them.

use crate::error::Result;
use crate::resnet::{arch_name, Arch, ResNet, DTYPE};
use crate::trainable_vars;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use simtrans_ops::hostprof::Phases;
use simtrans_ops::optim::Sgd;
use simtrans_ops::BnMode;
use std::time::Instant;

/// What one bench run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Network name.
    pub arch: String,
    /// Width of the small network (0 for the torchvision ones).
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
    /// Bytes in use on the GPU after the warm-up step and after the timed steps
    /// ([`simtrans_ops::gpu::memory_in_use`]); `None` on the CPU.
    pub device_memory: Option<[u64; 2]>,
    /// Where a step's time goes: forward, backward and optimiser, from extra steps with a device
    /// synchronisation between phases.
    #[serde(flatten)]
    pub phases: Phases,
}

/// Times `steps` training steps of `arch` at `image_size` px in batches of `batch_size`.
pub fn bench(
    device: &Device,
    arch: Arch,
    small_width: usize,
    image_size: usize,
    batch_size: usize,
    steps: usize,
) -> Result<BenchReport> {
    let classes = 10;
    let varmap = VarMap::new();
    let vb = simtrans_core::seed::var_builder(&varmap, 0, "bench", DTYPE, device);
    let net = ResNet::new(arch, small_width, Some(classes), vb)?;
    let mut sgd = Sgd::new(trainable_vars(&varmap), 0.01, 0.9, 1e-4);
    let x = Tensor::randn(0f32, 1., (batch_size, 3, image_size, image_size), device)?;
    let y: Vec<u32> = (0..batch_size as u32).map(|i| i % classes as u32).collect();
    let y = Tensor::new(y.as_slice(), device)?;
    let mut step = || -> Result<()> {
        let (logits, _) = net.forward(&x, BnMode::Train)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
        sgd.step(&simtrans_ops::grad::backward(&loss)?)?;
        // Reading the loss waits for asynchronous devices.
        loss.to_scalar::<f32>()?;
        Ok(())
    };
    step()?;
    let memory_warm = simtrans_ops::gpu::memory_in_use(device)?;
    let start = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let memory_timed = simtrans_ops::gpu::memory_in_use(device)?;
    let mut phases = Phases::new(&["forward", "backward", "optimiser"]);
    for _ in 0..steps.clamp(1, 3) {
        let loss = phases.time(0, device, || {
            let (logits, _) = net.forward(&x, BnMode::Train)?;
            candle_nn::loss::cross_entropy(&logits, &y)
        })?;
        let grads = phases.time(1, device, || simtrans_ops::grad::backward(&loss))?;
        phases.time(2, device, || sgd.step(&grads))?;
    }
    Ok(BenchReport {
        arch: arch_name(arch).into(),
        small_width: if arch == Arch::Small { small_width } else { 0 },
        image_size,
        batch_size,
        steps,
        seconds,
        images_per_second: (steps * batch_size) as f64 / seconds.max(1e-9),
        device: format!("{device:?}"),
        device_memory: memory_warm.zip(memory_timed).map(|(a, b)| [a, b]),
        phases: phases.per_step(),
    })
}

/// What [`bench_files`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FilesReport {
    /// Network name.
    pub arch: String,
    /// Input side in pixels.
    pub image_size: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Timed steps (after one untimed warm-up step).
    pub steps: usize,
    /// Distinct JPEG files the batches cycle through.
    pub files: usize,
    /// Wall time of the timed steps.
    pub seconds: f64,
    /// Training images per second, decoding and augmentation included.
    pub images_per_second: f64,
    /// Threads the loader decodes with.
    pub decode_threads: usize,
    /// The device, as candle names it.
    pub device: String,
}

/// Times step 0's own epoch loop ([`crate::stage::train_epoch`]: batches decoded ahead on a
/// background thread with the train transform, then the training step) over synthetic JPEG
/// photographs of CUB's size, so the figure includes the input pipeline that [`bench()`]
/// leaves out: on a GPU it shows whether decoding keeps up with the device.
pub fn bench_files(
    device: &Device,
    arch: Arch,
    data: &simtrans_core::config::DataConfig,
    batch_size: usize,
    steps: usize,
) -> Result<FilesReport> {
    if batch_size < 2 {
        return Err(crate::BackboneError::Config(format!(
            "bench_files: batch size {batch_size}; training steps need at least 2 images (BatchNorm)"
        )));
    }
    let classes = 10u32;
    let files = (2 * batch_size).clamp(16, 128);
    let dir =
        tempfile::tempdir().map_err(|e| simtrans_data::DataError::io(std::env::temp_dir(), e))?;
    let index = simtrans_data::bench::synthetic_photos(dir.path(), files)?;
    let loader = simtrans_data::Loader::new(std::sync::Arc::new(index), data)?;
    let varmap = VarMap::new();
    let vb = simtrans_core::seed::var_builder(&varmap, 0, "bench", DTYPE, device);
    let net = ResNet::new(arch, 16, Some(classes as usize), vb)?;
    let mut sgd = Sgd::new(trainable_vars(&varmap), 0.01, 0.9, 1e-4);
    let labels: std::collections::HashMap<u32, u32> =
        (0..files as u32).map(|id| (id, id % classes)).collect();
    let batch = |s: usize| -> Vec<u32> {
        (0..batch_size)
            .map(|k| ((s * batch_size + k) % files) as u32)
            .collect()
    };
    let epoch = |first: usize, count: usize, sgd: &mut Sgd| {
        let work = crate::stage::Epoch {
            index: 0,
            batches: (first..first + count).map(batch).collect(),
            seeds: (first..first + count).map(|s| s as u64).collect(),
            labels: &labels,
            checkpoint_dir: dir.path(),
        };
        crate::stage::train_epoch(&net, sgd, &loader, work, device, |_| ())
    };
    epoch(0, 1, &mut sgd)?;
    let start = Instant::now();
    let stats = epoch(1, steps.max(1), &mut sgd)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(FilesReport {
        arch: arch_name(arch).into(),
        image_size: data.image_size,
        batch_size,
        steps: stats.steps,
        files,
        seconds,
        images_per_second: stats.seen as f64 / seconds.max(1e-9),
        decode_threads: if data.workers > 0 {
            data.workers
        } else {
            rayon::current_num_threads()
        },
        device: format!("{device:?}"),
    })
}

/// The two figures the README records: the demo network (small, width 16, 28 px, batch 64) on
/// `device`, and ResNet-50 at 224 px in batches of 8 (`bench table` has the larger batches).
pub fn bench_default(device: &Device, steps: usize) -> Result<Vec<BenchReport>> {
    Ok(vec![
        bench(device, Arch::Small, 16, 28, 64, steps)?,
        bench(device, Arch::Resnet50, 0, 224, 8, steps.clamp(1, 5))?,
    ])
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_step_runs() {
        let r = super::bench(&candle_core::Device::Cpu, super::Arch::Small, 2, 12, 4, 1).unwrap();
        assert_eq!((r.steps, r.batch_size, r.image_size), (1, 4, 12));
        assert!(r.images_per_second > 0.0);
        // Issuing a phase's work cannot take longer than the phase.
        assert_eq!((r.phases.phase_steps, r.phases.phase_seconds.len()), (1, 3));
        // The phases flatten into the report's JSON without shadowing a field of its own.
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json.matches("\"steps\"").count(), 1, "{json}");
        for (issued, whole) in r.phases.issue_seconds.iter().zip(&r.phases.phase_seconds) {
            assert!(*issued > 0.0 && issued <= whole, "{r:?}");
        }
    }

    #[test]
    fn the_stage_loop_runs_on_jpeg_files() {
        let mut data = simtrans_core::Config::preset(simtrans_core::Preset::Paper).data;
        data.image_size = 16;
        let r =
            super::bench_files(&candle_core::Device::Cpu, super::Arch::Small, &data, 4, 2).unwrap();
        assert_eq!((r.steps, r.batch_size, r.files), (2, 4, 16));
        assert!(r.images_per_second > 0.0);
        // A batch of one would skip every step (BatchNorm) and report nothing.
        assert!(
            super::bench_files(&candle_core::Device::Cpu, super::Arch::Small, &data, 1, 2).is_err()
        );
    }
}
