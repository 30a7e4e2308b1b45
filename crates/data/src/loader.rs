//! Turning image ids into normalised batches: decode, augment, normalise, in parallel.
//!
//! Every stage that trains or evaluates a network asks the loader for `[B, 3, S, S]` tensors of
//! ids drawn by a sampler. The loader reads pixels from the index (demo) or decodes files
//! (real data sets), applies the reference train or test transform with randomness derived
//! from `(seed, id, position)` only, so the same arguments always give the same tensor whatever
//! the thread count, and fans the images out over rayon. Batches are computed by
//! [`crate::onepass`] straight from the decoder's interleaved pixels; [`Loader::transformed`]
//! gives the same image through the step-by-step definition in [`crate::transform`].
//!
//! With `data.normalise = "base_train"` the loader measures the normalisation's mean and
//! standard deviation itself, per channel over the source pixels of the index's base training
//! images, when it is built: every stage that builds one from the same index gets the same
//! values, and no artifact has to carry them.

use crate::error::{DataError, Result};
use crate::index::{DataIndex, Images, Split};
use crate::onepass::{self, Normaliser, Pixels};
use crate::transform::{test_transform, train_transform, ImageU8};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use simtrans_core::config::{DataConfig, Normalise};
use std::path::Path;
use std::sync::Arc;

/// Which transform a batch gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Augment {
    /// Rotation, random resized crop, flip, normalisation.
    Train,
    /// Resize, centre crop, normalisation.
    Test,
}

/// Decodes an image file to planar RGB; the error names the file.
pub fn decode_file(path: &Path) -> Result<ImageU8> {
    Ok(ImageU8::from_rgb(&decode_rgb(path)?))
}

/// Decodes an image file to interleaved RGB (as the decoder returns it); the error names the
/// file.
pub fn decode_rgb(path: &Path) -> Result<image::RgbImage> {
    let mut buf = Vec::new();
    let (width, height) = decode_rgb_into(path, &mut buf)?;
    Ok(image::RgbImage::from_raw(width as u32, height as u32, buf)
        .expect("decode_rgb_into returns width · height · 3 bytes"))
}

/// [`decode_rgb`] into `buf` (resized to `width · height · 3` bytes), so that a thread can
/// reuse one buffer from image to image; returns `(width, height)`. RGB files are decoded
/// straight into it, others (grayscale, CMYK, PNG with alpha…) converted.
pub fn decode_rgb_into(path: &Path, buf: &mut Vec<u8>) -> Result<(usize, usize)> {
    use image::ImageDecoder;
    let failed = |e: image::ImageError| DataError::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let decoder = image::ImageReader::open(path)
        .map_err(|e| DataError::io(path, e))?
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?
        .into_decoder()
        .map_err(failed)?;
    let (width, height) = decoder.dimensions();
    if decoder.color_type() == image::ColorType::Rgb8 {
        let bytes = usize::try_from(decoder.total_bytes()).unwrap_or(usize::MAX);
        buf.clear();
        buf.resize(bytes, 0);
        decoder.read_image(buf).map_err(failed)?;
    } else {
        let img = image::DynamicImage::from_decoder(decoder)
            .map_err(failed)?
            .into_rgb8();
        buf.clear();
        buf.extend_from_slice(img.as_raw());
    }
    Ok((width as usize, height as usize))
}

thread_local! {
    /// Each loader thread's decoded image, reused from image to image (a fresh buffer costs a
    /// page fault per 4 KiB).
    static DECODED: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::default();
}

/// Batches of transformed images from a [`DataIndex`].
#[derive(Clone)]
pub struct Loader {
    index: Arc<DataIndex>,
    cfg: DataConfig,
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("items", &self.index.items.len())
            .field("image_size", &self.cfg.image_size)
            .field("workers", &self.cfg.workers)
            .finish()
    }
}

impl Loader {
    /// A loader over `index` with the transforms of `cfg`; `cfg.workers` threads (0 = rayon's
    /// global pool, all cores). With `cfg.normalise = "base_train"` the normalisation is
    /// measured here ([`Loader::pixel_stats`] of the base training images); an index without
    /// base training images is then an error.
    pub fn new(index: Arc<DataIndex>, cfg: &DataConfig) -> Result<Self> {
        let pool = (cfg.workers > 0)
            .then(|| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(cfg.workers)
                    .build()
                    .ok()
            })
            .flatten()
            .map(Arc::new);
        let mut loader = Loader {
            index,
            cfg: cfg.clone(),
            pool,
        };
        if cfg.normalise == Normalise::BaseTrain {
            let (mean, std) = loader.pixel_stats(Split::BaseTrain)?;
            tracing::info!(
                ?mean,
                ?std,
                "normalisation measured on the base training images"
            );
            loader.cfg.mean = mean;
            loader.cfg.std = std;
        }
        Ok(loader)
    }

    /// The mean and standard deviation (population, per channel, of `v / 255`) of the source
    /// pixels of every image of `split`; a grayscale image counts on all three channels.
    /// Images that do not decode are skipped and counted in a warning.
    pub fn pixel_stats(&self, split: Split) -> Result<([f32; 3], [f32; 3])> {
        let ids: Vec<u32> = self.index.items_in(split).iter().map(|i| i.id).collect();
        if ids.is_empty() {
            return Err(DataError::Invalid(format!(
                "data.normalise = \"base_train\" needs base training images, but the index has \
                 none in split {}; set data.normalise = \"fixed\" with data.mean and data.std",
                split.name()
            )));
        }
        let zero = || ([0f64; 3], [0f64; 3], 0u64, 0usize);
        let sums = |ids: &[u32]| {
            ids.par_iter()
                .fold(zero, |(mut s, mut q, mut n, mut bad), &id| {
                    match self.source_image(id) {
                        Ok(img) => {
                            for c in 0..3 {
                                let plane = img.plane(if img.channels == 1 { 0 } else { c });
                                for &v in plane {
                                    let v = v as f64 / 255.0;
                                    s[c] += v;
                                    q[c] += v * v;
                                }
                            }
                            n += (img.width * img.height) as u64;
                        }
                        Err(_) => bad += 1,
                    }
                    (s, q, n, bad)
                })
                .reduce(zero, |a, b| {
                    let add = |x: [f64; 3], y: [f64; 3]| [x[0] + y[0], x[1] + y[1], x[2] + y[2]];
                    (add(a.0, b.0), add(a.1, b.1), a.2 + b.2, a.3 + b.3)
                })
        };
        let (s, q, n, bad) = match &self.pool {
            Some(pool) => pool.install(|| sums(&ids)),
            None => sums(&ids),
        };
        if bad > 0 {
            tracing::warn!(
                skipped = bad,
                "images that did not decode left out of the normalisation"
            );
        }
        if n == 0 {
            return Err(DataError::Invalid(format!(
                "none of the {} images of split {} decoded, so no normalisation can be measured",
                ids.len(),
                split.name()
            )));
        }
        let mut mean = [0f32; 3];
        let mut std = [0f32; 3];
        for c in 0..3 {
            let m = s[c] / n as f64;
            mean[c] = m as f32;
            // A constant image set would divide by zero; 1 leaves it centred and unscaled.
            let sd = (q[c] / n as f64 - m * m).max(0.0).sqrt();
            std[c] = if sd > 1e-6 { sd as f32 } else { 1.0 };
        }
        Ok((mean, std))
    }

    /// The normalisation mean and standard deviation the batches use.
    pub fn normalisation(&self) -> ([f32; 3], [f32; 3]) {
        (self.cfg.mean, self.cfg.std)
    }

    /// The index the loader reads.
    pub fn index(&self) -> &Arc<DataIndex> {
        &self.index
    }

    /// The untransformed image of an id (grayscale for the demo, RGB for files).
    pub fn source_image(&self, id: u32) -> Result<ImageU8> {
        self.check_id(id)?;
        match &self.index.images {
            Images::Pixels { .. } => {
                let p = self.stored(id);
                Ok(ImageU8::new(p.width, p.height, 1, p.data.to_vec()))
            }
            Images::Paths(paths) => decode_file(&paths[id as usize]),
        }
    }

    /// The pixels of image `id` of an index that holds them (the demo's grayscale images);
    /// panics for an index of files (a programming error).
    fn stored(&self, id: u32) -> Pixels<'_> {
        let Images::Pixels {
            height,
            width,
            data,
        } = &self.index.images
        else {
            panic!("stored pixels asked of an index of image files");
        };
        let n = height * width;
        let i = id as usize;
        Pixels::new(*width, *height, 1, &data[i * n..(i + 1) * n])
    }

    /// An error unless `id` is in the index.
    fn check_id(&self, id: u32) -> Result<()> {
        if self.index.item(id).is_none() {
            return Err(DataError::Invalid(format!(
                "image id {id} is not in the data index ({} items); rebuild the downstream stage",
                self.index.items.len()
            )));
        }
        Ok(())
    }

    /// The augmentation randomness of `id` at position `k` of a batch drawn with `seed`.
    fn augment_rng(&self, id: u32, k: usize, seed: u64) -> impl rand::Rng {
        simtrans_core::seed::rng(seed, &["augment", &id.to_string()], k as u64)
    }

    /// One transformed (not yet normalised) image, `id` at position `k` of a batch, through
    /// the step-by-step definition of the transforms.
    pub fn transformed(&self, id: u32, k: usize, aug: Augment, seed: u64) -> Result<ImageU8> {
        let img = self.source_image(id)?;
        Ok(match aug {
            Augment::Train => train_transform(&img, &self.cfg, &mut self.augment_rng(id, k, seed)),
            Augment::Test => test_transform(&img, &self.cfg),
        })
    }

    /// `[B, 3, S, S]` f32, normalised; image k's augmentation randomness is derived from
    /// `(seed, ids[k], k)`, decoded and augmented in parallel. Same arguments, same tensor
    /// (and the same values as [`Loader::transformed`] normalised).
    pub fn batch(&self, ids: &[u32], aug: Augment, seed: u64, device: &Device) -> Result<Tensor> {
        let s = self.cfg.image_size;
        let per = 3 * s * s;
        let mut out = vec![0f32; ids.len() * per];
        let norm = Normaliser::new(self.cfg.mean, self.cfg.std);
        let work = |out: &mut [f32]| {
            out.par_chunks_mut(per.max(1))
                .zip(ids.par_iter())
                .enumerate()
                .try_for_each(|(k, (dst, &id))| self.transform_into(id, k, aug, seed, &norm, dst))
        };
        match &self.pool {
            Some(pool) => pool.install(|| work(&mut out))?,
            None => work(&mut out)?,
        }
        Ok(Tensor::from_vec(out, (ids.len(), 3, s, s), &Device::Cpu)?.to_device(device)?)
    }

    /// Image `id` at position `k` of a batch, transformed and normalised into `dst` in one pass.
    fn transform_into(
        &self,
        id: u32,
        k: usize,
        aug: Augment,
        seed: u64,
        norm: &Normaliser,
        dst: &mut [f32],
    ) -> Result<()> {
        self.check_id(id)?;
        let mut transform = |pixels: &Pixels| match aug {
            Augment::Train => {
                let mut rng = self.augment_rng(id, k, seed);
                onepass::train_into(pixels, &self.cfg, &mut rng, norm, dst)
            }
            Augment::Test => onepass::test_into(pixels, &self.cfg, norm, dst),
        };
        match &self.index.images {
            Images::Pixels { .. } => transform(&self.stored(id)),
            Images::Paths(paths) => DECODED.with_borrow_mut(|buf| -> Result<()> {
                let (width, height) = decode_rgb_into(&paths[id as usize], buf)?;
                transform(&Pixels::new(width, height, 3, buf));
                Ok(())
            })?,
        }
        Ok(())
    }
}
