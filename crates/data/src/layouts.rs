//! The four real data set layouts of the reference (CUB, CompCars, FGVC-Aircraft, WebVision),
//! resolved into a [`DataIndex`] of image paths.
//!
//! Each builder reads exactly the files the reference reads (see `data-manifests/<name>.toml`
//! for the layout and the class split, which is read from the embedded manifest), so that our
//! splits match the paper's. Clean images come from the data set's own list files and must
//! exist; web images come from folders or lists and are decoded once here: corrupt, truncated,
//! zero-byte or non-image web files are skipped, counted and listed in the metrics, and the
//! run continues. Everything else that is wrong (a missing listed file, an empty class, an
//! unknown class name, a folder that matches no layout) is an error naming the path and the fix.
//!
//! Item order (ids): base train, base validation (always empty for real data: the reference has
//! none), base test, novel web, novel test; within a split, list-file order for clean images
//! and class order then sorted file name for web folders.

use crate::error::{DataError, Result};
use crate::index::{DataIndex, Images, Item, NoiseKind, Split};
use rayon::prelude::*;
use serde::Deserialize;
use simtrans_core::config::DatasetKind;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The `[split]` section of a manifest.
#[derive(Debug, Default, Deserialize)]
struct SplitSpec {
    base_ids: Option<Vec<u32>>,
    novel_ids: Option<Vec<u32>>,
    novel: Option<Vec<String>>,
    novel_every: Option<usize>,
    novel_first: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default)]
    split: SplitSpec,
}

fn split_spec(kind: DatasetKind) -> Result<SplitSpec> {
    let m: Manifest = toml::from_str(crate::manifest(kind)).map_err(|e| {
        DataError::Invalid(format!(
            "data-manifests/{}.toml is not valid: {e}",
            kind.name()
        ))
    })?;
    Ok(m.split)
}

/// The class numbers (`NNN` of the class folders) of the novel classes of `kind`'s manifest
/// split, where it lists them by number (CUB).
pub fn novel_class_numbers(kind: DatasetKind) -> Result<Vec<u32>> {
    split_spec(kind)?.novel_ids.ok_or_else(|| {
        DataError::Invalid(format!(
            "data-manifests/{}.toml lists no novel_ids",
            kind.name()
        ))
    })
}

fn hint(kind: DatasetKind) -> String {
    format!(
        "see data-manifests/{}.toml for the expected layout and how to obtain the data",
        kind.name()
    )
}

/// Marker files of each layout, relative to the data root.
const MARKERS: [(DatasetKind, &str); 4] = [
    (DatasetKind::Cub, "CUB_200_2011/images.txt"),
    (
        DatasetKind::Car,
        "CampCar/train_test_split/classification/train.txt",
    ),
    (DatasetKind::Air, "fgvc-aircraft-2013b/data/variants.txt"),
    (DatasetKind::Webvision, "ImageNet/train_files.txt"),
];

/// Which known layout a folder holds, judged by marker files.
pub fn detect_layout(root: &Path) -> Option<DatasetKind> {
    MARKERS
        .iter()
        .find(|(_, m)| root.join(m).is_file())
        .map(|(k, _)| *k)
}

fn check_root(kind: DatasetKind, root: &Path) -> Result<()> {
    let marker = MARKERS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, m)| *m)
        .expect("every real layout has a marker");
    if !root.is_dir() {
        return Err(DataError::layout(
            root,
            "run.data_path is not a folder",
            format!(
                "point --data-path at the {} data; {}",
                kind.name(),
                hint(kind)
            ),
        ));
    }
    if root.join(marker).is_file() {
        return Ok(());
    }
    let reason = format!("no {marker}: this is not the {} layout", kind.name());
    Err(match detect_layout(root) {
        Some(other) => DataError::layout(
            root,
            reason,
            format!(
                "the folder looks like the `{}` layout: pass --dataset {}",
                other.name(),
                other.name()
            ),
        ),
        None => DataError::layout(
            root,
            format!("{reason}, nor any known layout (cub, car, air, webvision)"),
            hint(kind),
        ),
    })
}

fn read_lines(path: &Path, kind: DatasetKind) -> Result<Vec<String>> {
    if !path.is_file() {
        return Err(DataError::layout(path, "missing", hint(kind)));
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    Ok(text
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .filter(|l| !l.trim().is_empty())
        .collect())
}

fn bad_line(path: &Path, n: usize, line: &str, expected: &str, kind: DatasetKind) -> DataError {
    DataError::layout(
        path,
        format!("line {}: `{line}` is not of the form {expected}", n + 1),
        format!("restore the original file; {}", hint(kind)),
    )
}

/// Files of a web folder, sorted by name; subfolders are not images and are skipped.
fn list_folder(dir: &Path, kind: DatasetKind) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(DataError::layout(
            dir,
            "the web image folder of this class is missing",
            hint(kind),
        ));
    }
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let e = e.map_err(|e| DataError::io(dir, e))?;
        let p = e.path();
        if p.is_dir() {
            continue;
        }
        names.push((e.file_name().to_string_lossy().into_owned(), p));
    }
    names.sort();
    Ok(names.into_iter().map(|(_, p)| p).collect())
}

/// Names of the subfolders of `dir`, sorted (the class lists of layouts defined by folders);
/// `missing` says why the folder is needed when it does not exist.
fn subfolder_names(dir: &Path, missing: &str, kind: DatasetKind) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Err(DataError::layout(dir, missing, hint(kind)));
    }
    let mut names: Vec<String> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let e = e.map_err(|e| DataError::io(dir, e))?;
        if e.path().is_dir() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Why a web file cannot be used, or `None` when it decodes.
fn unusable(path: &Path) -> Option<String> {
    match std::fs::metadata(path) {
        Err(e) => return Some(format!("unreadable: {e}")),
        Ok(m) if m.len() == 0 => return Some("zero bytes".into()),
        Ok(_) => {}
    }
    let reader = match image::ImageReader::open(path).and_then(|r| r.with_guessed_format()) {
        Ok(r) => r,
        Err(e) => return Some(format!("unreadable: {e}")),
    };
    if reader.format().is_none() {
        return Some("not a JPEG or PNG image".into());
    }
    match reader.decode() {
        Ok(_) => None,
        Err(e) => Some(format!("cannot be decoded: {e}")),
    }
}

/// Collects the items of a real data set and turns them into an index.
struct Collector {
    kind: DatasetKind,
    class_names: Vec<String>,
    base: Vec<u32>,
    novel: Vec<u32>,
    clean: BTreeMap<Split, Vec<(u32, PathBuf)>>,
    web: Vec<(u32, PathBuf)>,
}

impl Collector {
    fn new(kind: DatasetKind, class_names: Vec<String>, base: Vec<u32>, novel: Vec<u32>) -> Self {
        Collector {
            kind,
            class_names,
            base,
            novel,
            clean: BTreeMap::new(),
            web: Vec::new(),
        }
    }

    fn clean(&mut self, split: Split, label: u32, path: PathBuf, listed_in: &Path) -> Result<()> {
        if !path.is_file() {
            return Err(DataError::layout(
                &path,
                format!("listed in {} but missing", listed_in.display()),
                format!(
                    "restore the file (the data set is incomplete); {}",
                    hint(self.kind)
                ),
            ));
        }
        self.clean.entry(split).or_default().push((label, path));
        Ok(())
    }

    /// Decodes every web file in parallel, drops the unusable ones and builds the index.
    fn finish(self) -> Result<(DataIndex, serde_json::Value)> {
        let verdicts: Vec<Option<String>> = self.web.par_iter().map(|(_, p)| unusable(p)).collect();
        let mut web = Vec::new();
        let mut skipped = Vec::new();
        for ((label, path), verdict) in self.web.into_iter().zip(verdicts) {
            match verdict {
                None => web.push((label, path)),
                Some(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "skipping web image");
                    skipped.push(
                        serde_json::json!({ "path": path.display().to_string(), "reason": reason }),
                    );
                }
            }
        }
        let web_classes: HashSet<u32> = web.iter().map(|(l, _)| *l).collect();
        for &c in &self.novel {
            if !web_classes.contains(&c) {
                return Err(DataError::layout(
                    PathBuf::from(&self.class_names[c as usize]),
                    "this novel class has no usable web image",
                    format!(
                        "add its web images or fix the corrupt ones; {}",
                        hint(self.kind)
                    ),
                ));
            }
        }
        let mut items = Vec::new();
        let mut paths = Vec::new();
        let mut push =
            |label: u32, split: Split, noise: NoiseKind, truth: Option<u32>, path: PathBuf| {
                items.push(Item {
                    id: items.len() as u32,
                    label,
                    split,
                    noise,
                    true_label: truth,
                });
                paths.push(path);
            };
        let mut clean = self.clean;
        for split in [Split::BaseTrain, Split::BaseVal, Split::BaseTest] {
            for (label, path) in clean.remove(&split).unwrap_or_default() {
                push(label, split, NoiseKind::Clean, Some(label), path);
            }
        }
        for (label, path) in web {
            push(label, Split::NovelWeb, NoiseKind::Unknown, None, path);
        }
        for (label, path) in clean.remove(&Split::NovelTest).unwrap_or_default() {
            push(label, Split::NovelTest, NoiseKind::Clean, Some(label), path);
        }
        let index = DataIndex {
            dataset: self.kind,
            class_names: self.class_names,
            base_classes: self.base,
            novel_classes: self.novel,
            items,
            images: Images::Paths(paths),
        };
        index.validate()?;
        for split in [Split::BaseTrain, Split::NovelTest] {
            if index.items_in(split).is_empty() {
                return Err(DataError::layout(
                    PathBuf::from(split.name()),
                    "no image in this split",
                    format!("check the list files; {}", hint(index.dataset)),
                ));
            }
        }
        let metrics = serde_json::json!({
            "skipped_web_images": skipped.len(),
            "skipped": skipped,
        });
        Ok((index, metrics))
    }
}

fn base_novel_of(
    names: &[String],
    novel: &[String],
    kind: DatasetKind,
    source: &Path,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let pos: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let mut novel_ids = Vec::new();
    for n in novel {
        let id = *pos.get(n.as_str()).ok_or_else(|| {
            DataError::layout(
                source,
                format!("the manifest's novel class `{n}` is not one of its classes"),
                hint(kind),
            )
        })?;
        novel_ids.push(id);
    }
    let base = (0..names.len() as u32)
        .filter(|i| !novel_ids.contains(i))
        .collect();
    Ok((base, novel_ids))
}

/// CUB-200-2011 + `CUB_web`.
fn cub(root: &Path) -> Result<Collector> {
    let kind = DatasetKind::Cub;
    let spec = split_spec(kind)?;
    let dir = root.join("CUB_200_2011");
    let images_txt = dir.join("images.txt");
    let split_txt = dir.join("train_test_split.txt");
    let mut images: Vec<(String, String)> = Vec::new();
    for (n, line) in read_lines(&images_txt, kind)?.iter().enumerate() {
        let (id, rel) = line.trim().split_once(' ').ok_or_else(|| {
            bad_line(
                &images_txt,
                n,
                line,
                "`<image id> <class folder>/<file>`",
                kind,
            )
        })?;
        if !rel.contains('/') {
            return Err(bad_line(
                &images_txt,
                n,
                line,
                "`<image id> <class folder>/<file>`",
                kind,
            ));
        }
        images.push((id.to_string(), rel.to_string()));
    }
    let mut is_train: HashMap<String, bool> = HashMap::new();
    for (n, line) in read_lines(&split_txt, kind)?.iter().enumerate() {
        match line.trim().split_once(' ') {
            Some((id, "1")) => is_train.insert(id.to_string(), true),
            Some((id, "0")) => is_train.insert(id.to_string(), false),
            _ => return Err(bad_line(&split_txt, n, line, "`<image id> <1|0>`", kind)),
        };
    }
    let folders: Vec<String> = {
        let set: HashSet<&str> = images
            .iter()
            .map(|(_, r)| r.split('/').next().unwrap_or(""))
            .collect();
        let mut v: Vec<String> = set.into_iter().map(str::to_string).collect();
        v.sort();
        v
    };
    let by_number: HashMap<u32, u32> = folders
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            f.split('.')
                .next()?
                .parse::<u32>()
                .ok()
                .map(|n| (n, i as u32))
        })
        .collect();
    let lookup = |ids: &Option<Vec<u32>>| -> Result<Vec<u32>> {
        ids.as_deref()
            .unwrap_or_default()
            .iter()
            .map(|n| {
                by_number.get(n).copied().ok_or_else(|| {
                    DataError::layout(
                        &images_txt,
                        format!("no class folder numbered {n:03} (e.g. `{n:03}.Name/`) is listed"),
                        format!("use the original CUB-200-2011 images.txt; {}", hint(kind)),
                    )
                })
            })
            .collect()
    };
    let base = lookup(&spec.base_ids)?;
    let novel = lookup(&spec.novel_ids)?;
    let mut c = Collector::new(kind, folders.clone(), base.clone(), novel.clone());
    for (id, rel) in &images {
        let folder = rel.split('/').next().unwrap_or("");
        let label = *by_number
            .get(
                &folder
                    .split('.')
                    .next()
                    .unwrap_or("")
                    .parse::<u32>()
                    .unwrap_or(0),
            )
            .unwrap_or(&u32::MAX);
        let train = *is_train.get(id).ok_or_else(|| {
            DataError::layout(
                &split_txt,
                format!("image id {id} of images.txt has no line"),
                hint(kind),
            )
        })?;
        let split = match (base.contains(&label), novel.contains(&label), train) {
            (true, _, true) => Split::BaseTrain,
            (true, _, false) => Split::BaseTest,
            (_, true, false) => Split::NovelTest,
            _ => continue, // clean training images of novel classes are never used
        };
        c.clean(split, label, dir.join("images").join(rel), &images_txt)?;
    }
    for &n in &novel {
        for p in list_folder(&root.join("CUB_web").join(&folders[n as usize]), kind)? {
            c.web.push((n, p));
        }
    }
    Ok(c)
}

/// FGVC-Aircraft 2013b + `hardest_new_set`.
fn air(root: &Path) -> Result<Collector> {
    let kind = DatasetKind::Air;
    let spec = split_spec(kind)?;
    let data = root.join("fgvc-aircraft-2013b").join("data");
    let variants_txt = data.join("variants.txt");
    let names: Vec<String> = read_lines(&variants_txt, kind)?
        .iter()
        .map(|l| l.trim().to_string())
        .collect();
    let (base, novel) = base_novel_of(
        &names,
        spec.novel.as_deref().unwrap_or_default(),
        kind,
        &variants_txt,
    )?;
    let pos: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let mut c = Collector::new(kind, names.clone(), base.clone(), novel.clone());
    for (file, train) in [
        ("images_variant_trainval.txt", true),
        ("images_variant_test.txt", false),
    ] {
        let list = data.join(file);
        for (n, line) in read_lines(&list, kind)?.iter().enumerate() {
            let line = line.trim();
            if line.len() < 9 || !line.is_char_boundary(7) || !line.is_char_boundary(8) {
                return Err(bad_line(
                    &list,
                    n,
                    line,
                    "`<7-character id> <variant>`",
                    kind,
                ));
            }
            let (id, variant) = (&line[..7], &line[8..]);
            let label = *pos.get(variant).ok_or_else(|| {
                DataError::layout(
                    &list,
                    format!(
                        "line {}: unknown class name `{variant}` (not in variants.txt)",
                        n + 1
                    ),
                    format!("use the original list files; {}", hint(kind)),
                )
            })?;
            let split = match (novel.contains(&label), train) {
                (false, true) => Split::BaseTrain,
                (false, false) => Split::BaseTest,
                (true, false) => Split::NovelTest,
                (true, true) => continue,
            };
            c.clean(
                split,
                label,
                data.join("images").join(format!("{id}.jpg")),
                &list,
            )?;
        }
    }
    for &n in &novel {
        // A '/' in a variant name is a nested folder, as in the reference.
        for p in list_folder(&root.join("hardest_new_set").join(&names[n as usize]), kind)? {
            c.web.push((n, p));
        }
    }
    Ok(c)
}

/// Model id → model name of CompCars, from `model_names.txt` (line k = id k).
fn car_model_names(root: &Path) -> Result<HashMap<u32, String>> {
    let kind = DatasetKind::Car;
    let misc = root.join("CampCar").join("misc");
    let txt = misc.join("model_names.txt");
    if txt.is_file() {
        let text = std::fs::read_to_string(&txt).map_err(|e| DataError::io(&txt, e))?;
        return Ok(text
            .lines()
            .enumerate()
            .map(|(i, l)| {
                let name = l.trim();
                (
                    i as u32 + 1,
                    if name.is_empty() {
                        "unknown".to_string()
                    } else {
                        name.to_string()
                    },
                )
            })
            .collect());
    }
    let mat = misc.join("make_model_name.mat");
    if mat.is_file() {
        return crate::mat::model_names(&mat).map_err(|reason| {
            DataError::layout(
                &mat,
                reason,
                "write CampCar/misc/model_names.txt with the Python line in data-manifests/car.toml",
            )
        });
    }
    Err(DataError::layout(
        &txt,
        "missing (and so is make_model_name.mat)",
        format!("restore CompCars' misc/make_model_name.mat; {}", hint(kind)),
    ))
}

/// CompCars + `web_data`.
fn car(root: &Path) -> Result<Collector> {
    let kind = DatasetKind::Car;
    let spec = split_spec(kind)?;
    let every = spec.novel_every.unwrap_or(4).max(1);
    let web_root = root.join("web_data");
    let names = subfolder_names(&web_root, "missing: it defines the Car categories", kind)?;
    if names.is_empty() {
        return Err(DataError::layout(
            &web_root,
            "has no category folder",
            hint(kind),
        ));
    }
    let novel: Vec<u32> = (0..names.len() as u32)
        .filter(|i| *i as usize % every == 0)
        .collect();
    let base: Vec<u32> = (0..names.len() as u32)
        .filter(|i| *i as usize % every != 0)
        .collect();
    let pos: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let models = car_model_names(root)?;
    let mut c = Collector::new(kind, names.clone(), base, novel.clone());
    let split_dir = root
        .join("CampCar")
        .join("train_test_split")
        .join("classification");
    for (file, train) in [("train.txt", true), ("test.txt", false)] {
        let list = split_dir.join(file);
        for (n, line) in read_lines(&list, kind)?.iter().enumerate() {
            let rel = line.trim();
            let model: u32 = rel
                .split('/')
                .nth(1)
                .and_then(|m| m.parse().ok())
                .ok_or_else(|| {
                    bad_line(&list, n, rel, "`<make>/<model>/<year>/<file>.jpg`", kind)
                })?;
            let name = models.get(&model).ok_or_else(|| {
                DataError::layout(
                    &list,
                    format!(
                        "line {}: model id {model} has no name in the model-name table",
                        n + 1
                    ),
                    hint(kind),
                )
            })?;
            // Images of models without a web category are not part of the benchmark.
            let Some(&label) = pos.get(name.as_str()) else {
                continue;
            };
            let split = match (novel.contains(&label), train) {
                (false, true) => Split::BaseTrain,
                (false, false) => Split::BaseTest,
                (true, false) => Split::NovelTest,
                (true, true) => continue,
            };
            c.clean(
                split,
                label,
                root.join("CampCar").join("image").join(rel),
                &list,
            )?;
        }
    }
    for &n in &novel {
        for p in list_folder(&web_root.join(&names[n as usize]), kind)? {
            c.web.push((n, p));
        }
    }
    Ok(c)
}

/// ImageNet (base) + WebVision (novel web).
fn webvision(root: &Path) -> Result<Collector> {
    let kind = DatasetKind::Webvision;
    let spec = split_spec(kind)?;
    let imagenet = root.join("ImageNet");
    let train_dir = imagenet.join("train");
    let names = subfolder_names(
        &train_dir,
        "missing: its WNID folders define the classes",
        kind,
    )?;
    let n_novel = spec.novel_first.unwrap_or(118).min(names.len());
    let novel: Vec<u32> = (0..n_novel as u32).collect();
    let base: Vec<u32> = (n_novel as u32..names.len() as u32).collect();
    let pos: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    let unknown = |file: &Path, n: usize, wnid: &str| {
        DataError::layout(
            file,
            format!(
                "line {}: unknown class name `{wnid}` (no folder ImageNet/train/{wnid})",
                n + 1
            ),
            hint(kind),
        )
    };
    let mut c = Collector::new(kind, names.clone(), base, novel);

    let train_files = imagenet.join("train_files.txt");
    for (n, line) in read_lines(&train_files, kind)?.iter().enumerate() {
        let (rel, wnid) = line
            .trim()
            .split_once(',')
            .ok_or_else(|| bad_line(&train_files, n, line, "`<relpath>,<WNID>`", kind))?;
        let label = *pos
            .get(wnid)
            .ok_or_else(|| unknown(&train_files, n, wnid))?;
        if label as usize >= n_novel {
            c.clean(Split::BaseTrain, label, imagenet.join(rel), &train_files)?;
        }
    }

    // Validation images: ILSVRC2012_val_<k>.JPEG has the k-th ground-truth id.
    let truth_file = imagenet.join("ILSVRC2012_validation_ground_truth.txt");
    let truth = read_lines(&truth_file, kind)?;
    let map_file = imagenet.join("map_clsloc.txt");
    let mut id_to_wnid: HashMap<u32, String> = HashMap::new();
    for (n, line) in read_lines(&map_file, kind)?.iter().enumerate() {
        let mut parts = line.split_whitespace();
        match (
            parts.next(),
            parts.next().and_then(|i| i.parse::<u32>().ok()),
        ) {
            (Some(w), Some(i)) => id_to_wnid.insert(i, w.to_string()),
            _ => {
                return Err(bad_line(
                    &map_file,
                    n,
                    line,
                    "`<WNID> <ILSVRC2012 id> <name>`",
                    kind,
                ))
            }
        };
    }
    let val_dir = imagenet.join("val");
    let mut val = list_folder(&val_dir, kind)?;
    val.sort();
    for p in val {
        let name = p
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let k: usize = name
            .rsplit('_')
            .next()
            .and_then(|s| s.split('.').next())
            .and_then(|s| s.parse().ok())
            .filter(|k| *k >= 1 && *k <= truth.len())
            .ok_or_else(|| {
                DataError::layout(
                    &p,
                    "not a validation image name ILSVRC2012_val_<k>.JPEG with a ground-truth line",
                    "remove the file from ImageNet/val",
                )
            })?;
        let id: u32 = truth[k - 1]
            .trim()
            .parse()
            .map_err(|_| bad_line(&truth_file, k - 1, &truth[k - 1], "an ILSVRC2012 id", kind))?;
        let wnid = id_to_wnid.get(&id).ok_or_else(|| {
            DataError::layout(
                &map_file,
                format!("ILSVRC2012 id {id} is not listed"),
                hint(kind),
            )
        })?;
        let label = *pos
            .get(wnid.as_str())
            .ok_or_else(|| unknown(&map_file, 0, wnid))?;
        let split = if (label as usize) < n_novel {
            Split::NovelTest
        } else {
            Split::BaseTest
        };
        c.clean(split, label, p.clone(), &truth_file)?;
    }

    let web = root.join("WebVision");
    let synsets_file = web.join("info").join("synsets.txt");
    let synsets: Vec<String> = read_lines(&synsets_file, kind)?
        .iter()
        .map(|l| l.chars().take(9).collect())
        .collect();
    let list = web.join("train_files_118.txt");
    for (n, line) in read_lines(&list, kind)?.iter().enumerate() {
        let (rel, synset) = line
            .trim()
            .split_once(' ')
            .ok_or_else(|| bad_line(&list, n, line, "`<relpath> <synset index>`", kind))?;
        let wnid = synset
            .trim()
            .parse::<usize>()
            .ok()
            .and_then(|s| synsets.get(s))
            .ok_or_else(|| {
                bad_line(
                    &list,
                    n,
                    line,
                    "`<relpath> <synset index>` with a synset of info/synsets.txt",
                    kind,
                )
            })?;
        let label = *pos
            .get(wnid.as_str())
            .ok_or_else(|| unknown(&list, n, wnid))?;
        if (label as usize) < n_novel {
            let path = web.join("subset118").join(rel);
            if !path.exists() {
                return Err(DataError::layout(
                    &path,
                    format!("listed in {} but missing", list.display()),
                    format!("restore the file; {}", hint(kind)),
                ));
            }
            c.web.push((label, path));
        }
    }
    Ok(c)
}

/// Resolves a real data set under `root` into an index, with metrics (skipped web files).
pub fn build(kind: DatasetKind, root: &Path) -> Result<(DataIndex, serde_json::Value)> {
    check_root(kind, root)?;
    // Absolute paths in the artifact, so later stages may run from another folder.
    let root = &root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let collector = match kind {
        DatasetKind::Cub => cub(root)?,
        DatasetKind::Car => car(root)?,
        DatasetKind::Air => air(root)?,
        DatasetKind::Webvision => webvision(root)?,
        DatasetKind::Demo => {
            return Err(DataError::Invalid(
                "the demo benchmark is built by the `demo` module, not from a layout".into(),
            ))
        }
    };
    let (index, mut metrics) = collector.finish()?;
    metrics["source"] = serde_json::json!(root.display().to_string());
    Ok((index, metrics))
}
