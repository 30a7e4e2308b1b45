//! Miniature trees of the four real layouts: resolution, counts, splits, labels, skipped web
//! files, and the errors for missing files, empty classes, unknown names and wrong layouts.

use simtrans_core::config::{Config, DatasetKind, Preset};
use simtrans_data::layouts::{build, detect_layout};
use simtrans_data::{Augment, DataIndex, Images, Loader, NoiseKind, Split};
use std::path::Path;
use std::sync::Arc;

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A tiny real image; the format follows the extension (.jpg or .png).
fn image(path: &Path, shade: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::from_fn(6, 4, |x, y| {
        image::Rgb([shade, (x * 40) as u8, (y * 60) as u8])
    })
    .save(path)
    .unwrap();
}

/// A listed clean image that only needs to exist for the index.
fn placeholder(path: &Path) {
    write(path, b"x");
}

fn path_of(index: &DataIndex, id: u32) -> &Path {
    match &index.images {
        Images::Paths(p) => &p[id as usize],
        Images::Pixels { .. } => panic!("real data sets store paths"),
    }
}

/// A CUB tree: 200 classes with one train and one test image each, two web images per novel
/// class, and in class 043's web folder a corrupt file, a zero-byte file and a text file.
fn cub_tree(root: &Path) {
    let mut images = String::new();
    let mut split = String::new();
    for n in 1..=200u32 {
        let folder = format!("{n:03}.Bird_{n}");
        for (k, train) in [(2 * n - 1, 1), (2 * n, 0)] {
            let rel = format!("{folder}/img_{k}.jpg");
            images += &format!("{k} {rel}\n");
            split += &format!("{k} {train}\n");
            placeholder(&root.join("CUB_200_2011/images").join(&rel));
        }
    }
    write(&root.join("CUB_200_2011/images.txt"), images.as_bytes());
    write(
        &root.join("CUB_200_2011/train_test_split.txt"),
        split.as_bytes(),
    );
    let novel = [43u32, 111, 23];
    for n in 1..=200u32 {
        let folder = root.join("CUB_web").join(format!("{n:03}.Bird_{n}"));
        std::fs::create_dir_all(&folder).unwrap();
        // Only the novel classes need web images; give the first three real ones and the
        // rest one each.
        if novel.contains(&n) || n % 7 == 0 {
            image(&folder.join("b.jpg"), 10);
            image(&folder.join("a.png"), 20);
        } else {
            image(&folder.join("a.jpg"), 30);
        }
    }
    let web43 = root.join("CUB_web/043.Bird_43");
    write(
        &web43.join("c_corrupt.jpg"),
        b"\xff\xd8\xff\xe0 this is not really a jpeg",
    );
    write(&web43.join("d_empty.jpg"), b"");
    write(&web43.join("e_notes.txt"), b"hello");
}

#[test]
fn cub_resolves_the_reference_split() {
    let dir = tempfile::tempdir().unwrap();
    cub_tree(dir.path());
    assert_eq!(detect_layout(dir.path()), Some(DatasetKind::Cub));
    let (index, metrics) = build(DatasetKind::Cub, dir.path()).unwrap();
    assert_eq!(index.class_names.len(), 200);
    assert_eq!(index.base_classes.len(), 150);
    assert_eq!(index.novel_classes.len(), 50);
    // Novel classes in the manifest's order: 043 first; base in trainvalclasses order: 002 first.
    assert_eq!(
        index.class_names[index.novel_classes[0] as usize],
        "043.Bird_43"
    );
    assert_eq!(
        index.class_names[index.base_classes[0] as usize],
        "002.Bird_2"
    );
    let c = index.split_counts();
    assert_eq!(
        (
            c["base_train"],
            c["base_val"],
            c["base_test"],
            c["novel_test"]
        ),
        (150, 0, 150, 50)
    );
    // 50 novel web folders: 3 with two images, the rest with 1 or 2; 3 files of 043 skipped.
    assert_eq!(metrics["skipped_web_images"], 3);
    let skipped: Vec<String> = metrics["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap().to_string())
        .collect();
    assert!(skipped.iter().any(|p| p.ends_with("c_corrupt.jpg")));
    assert!(skipped.iter().any(|p| p.ends_with("d_empty.jpg")));
    assert!(skipped.iter().any(|p| p.ends_with("e_notes.txt")));
    let web = index.items_in(Split::NovelWeb);
    assert!(web
        .iter()
        .all(|i| i.noise == NoiseKind::Unknown && i.true_label.is_none()));
    // Class 043's web images, sorted by name: a.png then b.jpg.
    let w43: Vec<&Path> = web
        .iter()
        .filter(|i| index.local_label(i) == 0)
        .map(|i| path_of(&index, i.id))
        .collect();
    assert_eq!(w43.len(), 2);
    assert!(w43[0].ends_with("043.Bird_43/a.png") && w43[1].ends_with("043.Bird_43/b.jpg"));
    // Labels agree with the folders of the clean images.
    for item in index.items.iter().filter(|i| i.split != Split::NovelWeb) {
        let folder = path_of(&index, item.id)
            .parent()
            .unwrap()
            .file_name()
            .unwrap();
        assert_eq!(
            folder.to_str().unwrap(),
            index.class_names[item.label as usize]
        );
        let train = path_of(&index, item.id).to_str().unwrap().contains("img_")
            && item.split == Split::BaseTrain;
        if train {
            let k: u32 = path_of(&index, item.id)
                .file_stem()
                .unwrap()
                .to_str()
                .unwrap()[4..]
                .parse()
                .unwrap();
            assert_eq!(k % 2, 1, "train images have odd ids in the tree");
        }
    }
    // The index survives the artifact and the loader decodes web files to RGB.
    let out = index.to_output(metrics).unwrap();
    assert!(out.tensors.contains_key("paths"));
    let mut cfg = Config::preset(Preset::Demo).data;
    cfg.image_size = 8;
    let loader = Loader::new(Arc::new(index.clone()), &cfg).unwrap();
    let ids: Vec<u32> = web.iter().take(4).map(|i| i.id).collect();
    let t = loader
        .batch(&ids, Augment::Train, 0, &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(t.dims(), &[4, 3, 8, 8]);
    // A clean placeholder is not an image: the loader's error names the file.
    let clean = index.items_in(Split::BaseTrain)[0].id;
    let err = loader
        .batch(&[clean], Augment::Test, 0, &candle_core::Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("img_"), "{err}");
}

#[test]
fn cub_errors_name_the_path_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    cub_tree(dir.path());
    let root = dir.path();
    // A listed image is missing.
    let missing = root.join("CUB_200_2011/images/002.Bird_2/img_3.jpg");
    std::fs::remove_file(&missing).unwrap();
    let err = build(DatasetKind::Cub, root).unwrap_err().to_string();
    assert!(
        err.contains("img_3.jpg") && err.contains("listed in") && err.contains("images.txt"),
        "{err}"
    );
    placeholder(&missing);
    // A novel class whose web images are all unusable.
    let web = root.join("CUB_web/111.Bird_111");
    std::fs::remove_dir_all(&web).unwrap();
    write(&web.join("x.jpg"), b"");
    let err = build(DatasetKind::Cub, root).unwrap_err().to_string();
    assert!(
        err.contains("111.Bird_111") && err.contains("no usable web image"),
        "{err}"
    );
    // A novel class without a web folder.
    std::fs::remove_dir_all(&web).unwrap();
    let err = build(DatasetKind::Cub, root).unwrap_err().to_string();
    assert!(
        err.contains("CUB_web/111.Bird_111") && err.contains("missing"),
        "{err}"
    );
    // The wrong --dataset for this folder, and a folder of no known layout.
    let err = build(DatasetKind::Air, root).unwrap_err().to_string();
    assert!(err.contains("--dataset cub"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let err = build(DatasetKind::Cub, empty.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nor any known layout") && err.contains("data-manifests/cub.toml"),
        "{err}"
    );
}

const AIR_NOVEL: [&str; 25] = [
    "F/A-18",
    "Eurofighter Typhoon",
    "DHC-6",
    "C-130",
    "SR-20",
    "Gulfstream V",
    "DHC-1",
    "CRJ-900",
    "757-300",
    "Fokker 70",
    "PA-28",
    "Saab 2000",
    "Tu-154",
    "Spitfire",
    "Model B200",
    "Saab 340",
    "An-12",
    "Cessna 208",
    "A321",
    "DR-400",
    "Cessna 525",
    "ATR-72",
    "Gulfstream IV",
    "737-200",
    "Cessna 172",
];

fn air_tree(root: &Path) {
    let data = root.join("fgvc-aircraft-2013b/data");
    let mut variants: Vec<&str> = vec!["707-320", "A380"];
    variants.extend(AIR_NOVEL);
    variants.push("Boeing 717");
    write(
        &data.join("variants.txt"),
        (variants.join("\n") + "\n").as_bytes(),
    );
    let (mut trainval, mut test) = (String::new(), String::new());
    let mut k = 1000000;
    for v in &variants {
        for to_test in [false, false, true] {
            k += 1;
            let list = if to_test { &mut test } else { &mut trainval };
            *list += &format!("{k} {v}\n");
            placeholder(&data.join(format!("images/{k}.jpg")));
        }
    }
    write(
        &data.join("images_variant_trainval.txt"),
        trainval.as_bytes(),
    );
    write(&data.join("images_variant_test.txt"), test.as_bytes());
    for v in AIR_NOVEL {
        image(&root.join("hardest_new_set").join(v).join("w1.jpg"), 50);
    }
}

#[test]
fn air_resolves_variants_and_nested_web_folders() {
    let dir = tempfile::tempdir().unwrap();
    air_tree(dir.path());
    let (index, metrics) = build(DatasetKind::Air, dir.path()).unwrap();
    assert_eq!(metrics["skipped_web_images"], 0);
    assert_eq!(index.base_names(), ["707-320", "A380", "Boeing 717"]);
    assert_eq!(index.novel_names()[0], "F/A-18");
    let c = index.split_counts();
    assert_eq!(
        (
            c["base_train"],
            c["base_test"],
            c["novel_web"],
            c["novel_test"]
        ),
        (6, 3, 25, 25)
    );
    let fa18 = index.items_in(Split::NovelWeb)[0];
    assert!(path_of(&index, fa18.id).ends_with("hardest_new_set/F/A-18/w1.jpg"));
    assert_eq!(index.local_label(fa18), 0);
    // An unknown class name in a list file.
    let list = dir
        .path()
        .join("fgvc-aircraft-2013b/data/images_variant_test.txt");
    let mut text = std::fs::read_to_string(&list).unwrap();
    text += "1999999 Concorde\n";
    std::fs::write(&list, text).unwrap();
    let err = build(DatasetKind::Air, dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("unknown class name `Concorde`") && err.contains("images_variant_test.txt"),
        "{err}"
    );
}

fn car_tree(root: &Path, with_names: bool) {
    for name in ["Gamma", "Alpha", "Epsilon", "Beta", "Delta"] {
        image(&root.join("web_data").join(name).join("w.jpg"), 70);
    }
    if with_names {
        // Model id k = line k; model 2 has no name; model 7 has no web category.
        write(
            &root.join("CampCar/misc/model_names.txt"),
            b"Alpha\n\n Beta \nDelta\nEpsilon\nGamma\nOther\n",
        );
    } else {
        write(
            &root.join("CampCar/misc/make_model_name.mat"),
            b"MATLAB 5.0 MAT-file",
        );
    }
    let (mut train, mut test) = (String::new(), String::new());
    for model in 1..=7 {
        for (list, tag) in [(&mut train, "a"), (&mut test, "b")] {
            let rel = format!("9/{model}/2014/{tag}{model}.jpg");
            *list += &format!("{rel}\n");
            placeholder(&root.join("CampCar/image").join(&rel));
        }
    }
    write(
        &root.join("CampCar/train_test_split/classification/train.txt"),
        train.as_bytes(),
    );
    write(
        &root.join("CampCar/train_test_split/classification/test.txt"),
        test.as_bytes(),
    );
}

#[test]
fn car_uses_sorted_web_folders_and_every_fourth_as_novel() {
    let dir = tempfile::tempdir().unwrap();
    car_tree(dir.path(), true);
    let (index, _) = build(DatasetKind::Car, dir.path()).unwrap();
    assert_eq!(
        index.class_names,
        ["Alpha", "Beta", "Delta", "Epsilon", "Gamma"]
    );
    assert_eq!(index.novel_names(), ["Alpha", "Gamma"]);
    assert_eq!(index.base_names(), ["Beta", "Delta", "Epsilon"]);
    let c = index.split_counts();
    // Base: Beta (model 3, trimmed), Delta (4), Epsilon (5): one train and one test image each.
    assert_eq!(
        (
            c["base_train"],
            c["base_test"],
            c["novel_web"],
            c["novel_test"]
        ),
        (3, 3, 2, 2)
    );
    let beta = index.items_in(Split::BaseTrain)[0];
    assert!(path_of(&index, beta.id).ends_with("CampCar/image/9/3/2014/a3.jpg"));
    // Only the .mat file: a clear error with the way out.
    let dir2 = tempfile::tempdir().unwrap();
    car_tree(dir2.path(), false);
    let err = build(DatasetKind::Car, dir2.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("make_model_name.mat") && err.contains("model_names.txt"),
        "{err}"
    );
}

fn webvision_tree(root: &Path) {
    let wnid = |i: usize| format!("n{:08}", i);
    for i in 1..=120 {
        std::fs::create_dir_all(root.join("ImageNet/train").join(wnid(i))).unwrap();
    }
    // Base classes are the last two sorted WNIDs (119, 120).
    let mut train_files = String::new();
    for i in [119, 120] {
        let rel = format!("train/{}/{}_1.JPEG", wnid(i), wnid(i));
        train_files += &format!("{rel},{}\n", wnid(i));
        placeholder(&root.join("ImageNet").join(&rel));
    }
    write(
        &root.join("ImageNet/train_files.txt"),
        train_files.as_bytes(),
    );
    // Devkit ids in reverse WNID order: id k is WNID 121 − k.
    let map: String = (1..=120)
        .map(|k| format!("{} {k} name_{k}\n", wnid(121 - k)))
        .collect();
    write(&root.join("ImageNet/map_clsloc.txt"), map.as_bytes());
    // Three validation images with ids 1 (→ WNID 120, base), 120 (→ WNID 1, novel), 2 (→ 119, base).
    write(
        &root.join("ImageNet/ILSVRC2012_validation_ground_truth.txt"),
        b"1\n120\n2\n",
    );
    for k in 1..=3 {
        placeholder(&root.join(format!("ImageNet/val/ILSVRC2012_val_{k:08}.JPEG")));
    }
    let synsets: String = (1..=120).map(|i| format!("{} things\n", wnid(i))).collect();
    write(&root.join("WebVision/info/synsets.txt"), synsets.as_bytes());
    let mut list = String::new();
    let pairs: Vec<(usize, usize)> = (0..118)
        .map(|s| (s, s + 1))
        .chain([(0, 1), (119, 120)])
        .collect();
    for (s, q) in pairs {
        let rel = format!("google/q{q:04}/img_{s}_{}.jpg", list.len());
        list += &format!("{rel} {s}\n");
        image(&root.join("WebVision/subset118").join(&rel), 90);
    }
    write(&root.join("WebVision/train_files_118.txt"), list.as_bytes());
}

#[test]
fn webvision_maps_validation_ids_through_the_devkit_table() {
    let dir = tempfile::tempdir().unwrap();
    webvision_tree(dir.path());
    let (index, _) = build(DatasetKind::Webvision, dir.path()).unwrap();
    assert_eq!(index.novel_classes.len(), 118);
    assert_eq!(index.base_classes.len(), 2);
    let c = index.split_counts();
    // Web: synsets 0..118 and another of synset 0 are novel; synset 119 (WNID 120) is base
    // and not used.
    assert_eq!(
        (
            c["base_train"],
            c["base_test"],
            c["novel_web"],
            c["novel_test"]
        ),
        (2, 2, 119, 1)
    );
    let test = index.items_in(Split::NovelTest)[0];
    assert_eq!(index.class_names[test.label as usize], "n00000001");
    assert!(path_of(&index, test.id).ends_with("ILSVRC2012_val_00000002.JPEG"));
    let base_test: Vec<&str> = index
        .items_in(Split::BaseTest)
        .iter()
        .map(|i| index.class_names[i.label as usize].as_str())
        .collect();
    assert_eq!(base_test, ["n00000120", "n00000119"]);
    // A listed web image that is missing is an error, not a skip.
    let list = std::fs::read_to_string(dir.path().join("WebVision/train_files_118.txt")).unwrap();
    let first = list.lines().next().unwrap().split(' ').next().unwrap();
    std::fs::remove_file(dir.path().join("WebVision/subset118").join(first)).unwrap();
    let err = build(DatasetKind::Webvision, dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("listed in") && err.contains("train_files_118.txt"),
        "{err}"
    );
}

#[test]
fn real_data_sets_need_a_data_path() {
    let mut config = Config::preset(Preset::Paper);
    config.run.data_path = None;
    let err = simtrans_data::build_index(&config, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--data-path") && err.contains("data-manifests/cub.toml"),
        "{err}"
    );
}

#[test]
fn car_reads_the_model_table_from_the_mat_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // The golden MAT-file's models: 1 Arrizo 7, 2 Yuexiang hatchback, 3 (empty), 4 Volvo S60,
    // 5 BWM 3 Series, 6 seventy A's.
    let long = "A".repeat(70);
    for name in [
        "Arrizo 7",
        "Yuexiang hatchback",
        "Volvo S60",
        "BWM 3 Series",
        long.as_str(),
    ] {
        image(&root.join("web_data").join(name).join("w.jpg"), 70);
    }
    let golden = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/model_names_compressed.mat"
    );
    std::fs::create_dir_all(root.join("CampCar/misc")).unwrap();
    std::fs::copy(golden, root.join("CampCar/misc/make_model_name.mat")).unwrap();
    let (mut train, mut test) = (String::new(), String::new());
    for model in 1..=6 {
        for (list, tag) in [(&mut train, "a"), (&mut test, "b")] {
            let rel = format!("9/{model}/2014/{tag}{model}.jpg");
            *list += &format!("{rel}\n");
            placeholder(&root.join("CampCar/image").join(&rel));
        }
    }
    write(
        &root.join("CampCar/train_test_split/classification/train.txt"),
        train.as_bytes(),
    );
    write(
        &root.join("CampCar/train_test_split/classification/test.txt"),
        test.as_bytes(),
    );
    let (index, _) = build(DatasetKind::Car, root).unwrap();
    assert_eq!(index.novel_names(), [long.as_str(), "Yuexiang hatchback"]);
    assert_eq!(
        index.base_names(),
        ["Arrizo 7", "BWM 3 Series", "Volvo S60"]
    );
    let c = index.split_counts();
    assert_eq!(
        (
            c["base_train"],
            c["base_test"],
            c["novel_web"],
            c["novel_test"]
        ),
        (3, 3, 2, 2)
    );
    let volvo = index
        .items_in(Split::BaseTrain)
        .into_iter()
        .find(|i| index.class_names[i.label as usize] == "Volvo S60")
        .unwrap();
    assert!(path_of(&index, volvo.id).ends_with("9/4/2014/a4.jpg"));
}
