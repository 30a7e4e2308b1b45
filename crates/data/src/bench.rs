//! Throughput of the input pipeline, for `cargo xtask bench data`.
//!
//! Writes synthetic JPEG photographs (textured, varied sizes around 500×375 like CUB) to a
//! temporary folder, indexes them as a real data set and times decoded + augmented images per
//! second through [`Loader::batch`] with the train transform. The figure is written by the
//! orchestrator to its bench file; no test asserts it.

use crate::error::{DataError, Result};
use crate::index::{DataIndex, Images, Item, Split};
use crate::loader::{Augment, Loader};
use candle_core::Device;
use simtrans_core::config::{DataConfig, DatasetKind};
use std::sync::Arc;
use std::time::Instant;

/// What one bench run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// Images decoded and augmented in the timed passes.
    pub images: usize,
    /// Wall time of the timed passes.
    pub seconds: f64,
    /// `images / seconds`.
    pub images_per_second: f64,
    /// Output side in pixels.
    pub image_size: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Threads used for decoding (rayon).
    pub threads: usize,
    /// How many distinct JPEG files were written.
    pub files: usize,
}

/// Indexes `files` JPEG photographs `dir/img_00000.jpg` … as the base training images of one
/// class, ids `0..files`, writing the synthetic ones ([`crate::synthetic::photo`], sizes around
/// 500×375 like CUB's) where a file is missing.
pub fn synthetic_photos(dir: &std::path::Path, files: usize) -> Result<DataIndex> {
    let paths: Vec<_> = (0..files)
        .map(|k| dir.join(format!("img_{k:05}.jpg")))
        .collect();
    for (k, path) in paths.iter().enumerate() {
        if !path.exists() {
            crate::synthetic::write_photo(path, crate::synthetic::PhotoSize::Cub, k)?;
        }
    }
    let items = (0..files as u32)
        .map(|id| Item::clean(id, 0, Split::BaseTrain))
        .collect();
    Ok(DataIndex {
        dataset: DatasetKind::Cub,
        class_names: vec!["bench".into(), "unused".into()],
        base_classes: vec![0],
        novel_classes: vec![1],
        items,
        images: Images::Paths(paths),
    })
}

/// Times `passes` passes over `files` JPEGs in batches of `batch_size`, at `cfg.image_size`
/// with the train transform (one untimed warm-up batch first). The files are those of
/// `photos` ([`synthetic_photos`]: missing ones are written and kept), or synthetic ones in a
/// temporary folder.
pub fn bench(
    cfg: &DataConfig,
    files: usize,
    batch_size: usize,
    passes: usize,
    photos: Option<&std::path::Path>,
) -> Result<BenchReport> {
    let files = files.max(1);
    let batch_size = batch_size.max(1);
    let temporary;
    let dir = match photos {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
            dir
        }
        None => {
            temporary = tempfile::tempdir().map_err(|e| DataError::io(std::env::temp_dir(), e))?;
            temporary.path()
        }
    };
    let index = synthetic_photos(dir, files)?;
    let loader = Loader::new(Arc::new(index), cfg)?;
    let ids: Vec<u32> = (0..files as u32).collect();
    let device = Device::Cpu;
    loader.batch(&ids[..batch_size.min(files)], Augment::Train, 0, &device)?;
    let start = Instant::now();
    let mut images = 0;
    for pass in 0..passes.max(1) {
        for (b, chunk) in ids.chunks(batch_size).enumerate() {
            loader.batch(chunk, Augment::Train, (pass * 1000 + b) as u64, &device)?;
            images += chunk.len();
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(BenchReport {
        images,
        seconds,
        images_per_second: images as f64 / seconds.max(1e-9),
        image_size: cfg.image_size,
        batch_size,
        threads: if cfg.workers > 0 {
            cfg.workers
        } else {
            rayon::current_num_threads()
        },
        files,
    })
}
