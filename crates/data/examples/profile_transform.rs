//! Where an image's time goes in the input pipeline, on one thread: decoding, the step-by-step
//! train transform (`transform`) by step, and the one-pass transforms (`onepass`) the loader
//! runs. Milliseconds per image, the best of five passes over the files.
//!
//! `cargo run --release -p simtrans-data --example profile_transform [DIR]`: the JPEG files
//! `DIR/img_00000.jpg` … (written where missing: the bench's synthetic photographs), 128 of
//! them; without DIR a temporary folder.
use rand::SeedableRng;
use simtrans_data::onepass::{self, Normaliser, Pixels};
use simtrans_data::transform::{normalise_into, resize_bilinear, rotate_crop, ImageU8, TrainDraws};
use std::time::Instant;

/// Milliseconds per image of `work` over `n` images, the best of five.
fn best(n: usize, mut work: impl FnMut()) -> f64 {
    (0..5)
        .map(|_| {
            let t = Instant::now();
            work();
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        })
        .fold(f64::MAX, f64::min)
}

fn main() -> anyhow::Result<()> {
    let cfg = simtrans_core::Config::preset(simtrans_core::Preset::Paper).data;
    let temporary = tempfile::tempdir()?;
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| temporary.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let n = 128;
    simtrans_data::bench::synthetic_photos(&dir, n)?;
    let paths: Vec<_> = (0..n)
        .map(|k| dir.join(format!("img_{k:05}.jpg")))
        .collect();

    let decode = best(n, || {
        for p in &paths {
            std::hint::black_box(simtrans_data::loader::decode_rgb(p).unwrap());
        }
    });
    let decoded: Vec<_> = paths
        .iter()
        .map(|p| simtrans_data::loader::decode_rgb(p))
        .collect::<Result<_, _>>()?;

    // The definition, step by step, on the same draws for every pass.
    let planar: Vec<_> = decoded.iter().map(ImageU8::from_rgb).collect();
    let to_planar = best(n, || {
        for img in &decoded {
            std::hint::black_box(ImageU8::from_rgb(img));
        }
    });
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let draws: Vec<_> = planar
        .iter()
        .map(|p| {
            let d = TrainDraws::new(p.width, p.height, &cfg, &mut rng);
            (d.angle, d.crop)
        })
        .collect();
    let rotate = best(n, || {
        for (p, &(a, (i, j, h, w))) in planar.iter().zip(&draws) {
            std::hint::black_box(rotate_crop(p, a, i, j, h, w));
        }
    });
    let crops: Vec<_> = planar
        .iter()
        .zip(&draws)
        .map(|(p, &(a, (i, j, h, w)))| rotate_crop(p, a, i, j, h, w))
        .collect();
    let s = cfg.image_size;
    let resize = best(n, || {
        for c in &crops {
            std::hint::black_box(resize_bilinear(c, s, s));
        }
    });
    let resized: Vec<_> = crops.iter().map(|c| resize_bilinear(c, s, s)).collect();
    let mut out = vec![0f32; 3 * s * s];
    let normalise = best(n, || {
        for r in &resized {
            normalise_into(r, cfg.mean, cfg.std, &mut out);
        }
    });

    let norm = Normaliser::new(cfg.mean, cfg.std);
    let train = best(n, || {
        for (k, img) in decoded.iter().enumerate() {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(k as u64);
            onepass::train_into(&Pixels::rgb(img), &cfg, &mut rng, &norm, &mut out);
        }
    });
    let test = best(n, || {
        for img in &decoded {
            onepass::test_into(&Pixels::rgb(img), &cfg, &norm, &mut out);
        }
    });
    println!(
        "ms per image, 1 thread, {} files in {}:\n  decode {decode:.3}\n  definition: to planar {to_planar:.3}, rotate+crop {rotate:.3}, resize {resize:.3}, normalise {normalise:.3} (sum {:.3})\n  onepass: train {train:.3}, test {test:.3}",
        n,
        dir.display(),
        to_planar + rotate + resize + normalise
    );
    Ok(())
}
