//! Transforms against Pillow's pixels and torchvision's geometry (goldens made by
//! `golden/make_golden.py`), and the loader's determinism.

use serde_json::Value;
use simtrans_core::config::{Config, DemoConfig, Preset};
use simtrans_data::transform::{self, CropDraws, ImageU8};
use simtrans_data::{Augment, DataIndex, Loader, Split};
use std::sync::Arc;

fn goldens() -> Value {
    serde_json::from_str(include_str!("golden/transforms.json")).unwrap()
}

fn image(v: &Value) -> ImageU8 {
    ImageU8::new(
        v["width"].as_u64().unwrap() as usize,
        v["height"].as_u64().unwrap() as usize,
        v["channels"].as_u64().unwrap() as usize,
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u8)
            .collect(),
    )
}

#[test]
fn rotation_matches_pillow_exactly() {
    for case in goldens()["rotate"].as_array().unwrap() {
        let input = image(&case["input"]);
        let want = image(&case["output"]);
        let angle = case["angle"].as_f64().unwrap();
        let got = transform::rotate_nearest(&input, angle);
        let diff = got
            .data
            .iter()
            .zip(&want.data)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff, 0,
            "{}x{} rotated by {angle}: {diff} pixels differ",
            input.width, input.height
        );
    }
}

#[test]
fn bilinear_resize_matches_pillow_exactly() {
    for case in goldens()["resize"].as_array().unwrap() {
        let input = image(&case["input"]);
        let want = image(&case["output"]);
        let got = transform::resize_bilinear(&input, want.width, want.height);
        assert_eq!(
            (got.width, got.height, got.channels),
            (want.width, want.height, want.channels)
        );
        let diff = got
            .data
            .iter()
            .zip(&want.data)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff, 0,
            "{}x{} → {}x{}: {diff} pixels differ",
            input.width, input.height, want.width, want.height
        );
    }
}

struct Scripted {
    uniforms: Vec<f64>,
    ints: Vec<usize>,
}

impl CropDraws for Scripted {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniforms.remove(0)
    }
    fn randint(&mut self, n: usize) -> usize {
        self.ints.remove(0) % n
    }
}

fn pair(v: &Value) -> [f64; 2] {
    [v[0].as_f64().unwrap(), v[1].as_f64().unwrap()]
}

#[test]
fn crop_boxes_follow_torchvision_get_params() {
    let cases = goldens();
    for case in cases["crop_params"].as_array().unwrap() {
        let mut draws = Scripted {
            uniforms: case["uniforms"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect(),
            ints: case["ints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect(),
        };
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let got = transform::resized_crop_params(
            w,
            h,
            pair(&case["scale"]),
            pair(&case["ratio"]),
            &mut draws,
        );
        let want: Vec<usize> = case["box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!([got.0, got.1, got.2, got.3].to_vec(), want, "{case}");
    }
}

#[test]
fn resize_and_center_crop_geometry_follow_torchvision() {
    let cases = goldens();
    for c in cases["resize_size"].as_array().unwrap() {
        let g = |k: &str| c[k].as_u64().unwrap() as usize;
        let got = transform::resize_shorter_size(g("width"), g("height"), g("size"));
        assert_eq!(
            [got.0, got.1].to_vec(),
            serde_json::from_value::<Vec<usize>>(c["out"].clone()).unwrap()
        );
    }
    for c in cases["center"].as_array().unwrap() {
        let g = |k: &str| c[k].as_u64().unwrap() as usize;
        let got = transform::center_crop_offsets(g("width"), g("height"), g("crop"), g("crop"));
        assert_eq!(
            [got.0, got.1].to_vec(),
            serde_json::from_value::<Vec<usize>>(c["top_left"].clone()).unwrap()
        );
    }
    assert_eq!(transform::round_half_even(2.5), 2.0);
    assert_eq!(transform::round_half_even(3.5), 4.0);
    assert_eq!(transform::round_half_even(-0.5), -0.0);
    assert_eq!(transform::round_half_even(2.4), 2.0);
}

#[test]
fn center_crop_pads_small_images_like_torchvision() {
    // A 2x1 image cropped to 3: padded left 0 / right 1 and top 1 / bottom 1.
    let img = ImageU8::new(2, 1, 1, vec![7, 9]);
    let out = transform::center_crop(&img, 3);
    assert_eq!(out.data, vec![0, 0, 0, 7, 9, 0, 0, 0, 0]);
}

fn small_index() -> (Arc<DataIndex>, Config) {
    let mut config = Config::preset(Preset::Demo);
    config.data.demo = DemoConfig {
        base_train_per_class: 10,
        base_val_per_class: 2,
        web_per_class: 10,
        novel_test_per_class: 4,
        ..DemoConfig::default_recipe()
    };
    let (index, _) = simtrans_data::build_index(&config, 0).unwrap();
    (Arc::new(index), config)
}

#[test]
fn test_transform_of_the_demo_is_resize_then_center_crop() {
    let (index, config) = small_index();
    let loader = Loader::new(index.clone(), &config.data).unwrap();
    let id = index.items_in(Split::NovelTest)[0].id;
    let src = loader.source_image(id).unwrap();
    // 28 → round(28 · 32/28) = 32 → central 28 at offset (2, 2).
    assert_eq!(transform::test_resize_side(&config.data), 32);
    let want = transform::crop(&transform::resize_bilinear(&src, 32, 32), 2, 2, 28, 28);
    assert_eq!(loader.transformed(id, 0, Augment::Test, 0).unwrap(), want);
    // Normalisation: (v/255 − mean)/std on three equal channels.
    let t = loader
        .batch(&[id], Augment::Test, 0, &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[1, 3, 28, 28]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let expect = (want.data[100] as f32 / 255.0 - 0.286) / 0.353;
    assert!((v[100] - expect).abs() < 1e-6);
    assert_eq!(v[100], v[100 + 28 * 28]);
    assert_eq!(v[100], v[100 + 2 * 28 * 28]);
}

#[test]
fn train_batches_are_deterministic_and_vary_with_seed_and_position() {
    let (index, mut config) = small_index();
    let ids: Vec<u32> = index
        .items_in(Split::BaseTrain)
        .iter()
        .take(12)
        .map(|i| i.id)
        .collect();
    let dev = candle_core::Device::Cpu;
    let a = Loader::new(index.clone(), &config.data).unwrap();
    config.data.workers = 1;
    let single = Loader::new(index.clone(), &config.data).unwrap();
    let x = a
        .batch(&ids, Augment::Train, 5, &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let y = single
        .batch(&ids, Augment::Train, 5, &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let z = a
        .batch(&ids, Augment::Train, 6, &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(x, y, "thread count must not change the batch");
    assert_ne!(x, z, "another seed must give other augmentations");
    // The same id at two positions of a batch is augmented differently.
    let twice = a.batch(&[ids[0], ids[0]], Augment::Train, 5, &dev).unwrap();
    let r0 = twice
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let r1 = twice
        .get(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(r0, r1);
    // A train image with every augmentation switched off is the source image.
    config.data.rotation_degrees = 0.0;
    config.data.crop_scale = [1.0, 1.0];
    config.data.hflip = false;
    let plain = Loader::new(index.clone(), &config.data).unwrap();
    let img = plain.transformed(ids[3], 3, Augment::Train, 1).unwrap();
    // With scale 1 on a square image every box that fits is the whole image (a 28-px side
    // rounds to 28 only when the ratio is near 1; otherwise the fallback takes the whole
    // image), so the result is the source image itself.
    assert_eq!(img, plain.source_image(ids[3]).unwrap());
    assert!(plain
        .batch(&[u32::MAX], Augment::Test, 0, &dev)
        .unwrap_err()
        .to_string()
        .contains("not in the data index"));
}

#[test]
fn train_augmentation_keeps_content_statistics() {
    // Rotation and crops move pixels but do not invent them: the mean brightness of the
    // augmented images stays near the source's (fill is black, so it can only drop a little).
    let (index, config) = small_index();
    let loader = Loader::new(index.clone(), &config.data).unwrap();
    let ids: Vec<u32> = index
        .items_in(Split::BaseTrain)
        .iter()
        .map(|i| i.id)
        .collect();
    let mut src_mean = 0.0;
    let mut aug_mean = 0.0;
    for (k, &id) in ids.iter().enumerate() {
        let s = loader.source_image(id).unwrap();
        let a = loader.transformed(id, k, Augment::Train, 0).unwrap();
        src_mean += s.data.iter().map(|&v| v as f64).sum::<f64>() / s.data.len() as f64;
        aug_mean += a.data.iter().map(|&v| v as f64).sum::<f64>() / a.data.len() as f64;
    }
    let ratio = aug_mean / src_mean;
    assert!(
        (0.8..1.25).contains(&ratio),
        "mean brightness ratio {ratio}"
    );
}

#[test]
fn base_train_normalisation_is_measured_on_the_base_training_pixels() {
    let (index, mut config) = small_index();
    // By hand: population mean and standard deviation of v / 255 over every base-train pixel.
    let (mut n, mut s, mut q) = (0f64, 0f64, 0f64);
    let fixed = Loader::new(index.clone(), &config.data).unwrap();
    for item in index.items_in(Split::BaseTrain) {
        for &v in &fixed.source_image(item.id).unwrap().data {
            let v = v as f64 / 255.0;
            n += 1.0;
            s += v;
            q += v * v;
        }
    }
    let mean = s / n;
    let std = (q / n - mean * mean).sqrt();
    assert_eq!(fixed.normalisation(), ([0.286; 3], [0.353; 3]));

    config.data.normalise = simtrans_core::config::Normalise::BaseTrain;
    let measured = Loader::new(index.clone(), &config.data).unwrap();
    let (m, sd) = measured.normalisation();
    for c in 0..3 {
        assert!((m[c] as f64 - mean).abs() < 1e-6, "mean {m:?} vs {mean}");
        assert!((sd[c] as f64 - std).abs() < 1e-6, "std {sd:?} vs {std}");
    }
    // What the batches use: a base-train image normalised with the measured values.
    let id = index.items_in(Split::BaseTrain)[0].id;
    let img = measured.transformed(id, 0, Augment::Test, 0).unwrap();
    let t = measured
        .batch(&[id], Augment::Test, 0, &candle_core::Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = (img.data[0] as f32 / 255.0 - m[0]) / sd[0];
    assert!((t[0] - want).abs() < 1e-6);

    // An index without base training images cannot be measured, and says what to do.
    let mut no_base = (*index).clone();
    no_base.items.retain(|i| i.split != Split::BaseTrain);
    let err = Loader::new(Arc::new(no_base), &config.data)
        .unwrap_err()
        .to_string();
    assert!(err.contains("data.normalise"), "{err}");
}

/// The loader's batches (one pass, [`simtrans_data::onepass`]) against its step-by-step
/// definition ([`Loader::transformed`], then `ToTensor` + `Normalize`), value for value, on
/// JPEG files as a real data set holds them: colour photographs of CUB's sizes, a grayscale
/// JPEG and a PNG, with the paper's train and test transforms.
#[test]
fn batches_of_files_equal_the_step_by_step_transforms() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = simtrans_data::bench::synthetic_photos(dir.path(), 4).unwrap();
    let gray = dir.path().join("gray.jpg");
    image::DynamicImage::ImageRgb8(simtrans_data::synthetic::photo(301, 217, 7))
        .into_luma8()
        .save(&gray)
        .unwrap();
    let png = dir.path().join("small.png");
    simtrans_data::synthetic::photo(150, 190, 9)
        .save(&png)
        .unwrap();
    let simtrans_data::Images::Paths(paths) = &mut index.images else {
        unreachable!("synthetic photos are files")
    };
    paths.extend([gray, png]);
    index
        .items
        .extend([4, 5].map(|id| simtrans_data::Item::clean(id, 0, Split::BaseTrain)));
    let mut cfg = Config::preset(Preset::Paper).data;
    cfg.image_size = 96;
    let loader = Loader::new(Arc::new(index), &cfg).unwrap();
    let ids: Vec<u32> = (0..6).collect();
    let s = cfg.image_size;
    for aug in [Augment::Train, Augment::Test] {
        let got = loader
            .batch(&ids, aug, 3, &candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (k, &id) in ids.iter().enumerate() {
            let img = loader.transformed(id, k, aug, 3).unwrap();
            let mut want = vec![0f32; 3 * s * s];
            transform::normalise_into(&img, cfg.mean, cfg.std, &mut want);
            assert!(
                got[k * 3 * s * s..(k + 1) * 3 * s * s] == want[..],
                "image {id}, {aug:?}: the batch differs from the definition"
            );
        }
    }
}
