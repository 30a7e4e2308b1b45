//! The embedded weak-shot benchmark built from Fashion-MNIST (`--dataset demo`).
//!
//! The real weak-shot data sets are tens of gigabytes behind fragile hosts, so the default run
//! builds a benchmark with the same structure from a small labelled image set that is always at
//! hand: clean base classes, novel classes whose only training images are "web" sets mixing
//! clean images with closed-set noise (images of other novel classes), open-set noise (images of
//! base classes) and junk (images from a second IDX source), at exact rates, with the truth of
//! every web image recorded.
//!
//! # Source
//! `run.data_path` (a folder with `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
//! `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]` and optionally `classes.txt`,
//! one class name per line) if set; else the Debian package's folder
//! `/usr/share/datasets/fashion-mnist` if it holds the files; else the subset compiled into this
//! library (`assets/fashion-mnist-subset/`: the first 900 training and 300 test images of each
//! class, in file order).
//!
//! # How images are drawn
//! Each class contributes exactly as many images as the recipe needs from each file, and they
//! are **the first ones of that class in file order**; only which role each of them plays is
//! random. Hence the subset and the full files build the same benchmark (same pixels, same ids)
//! whenever the recipe fits in the subset. Per web set of `W` images the noise counts are
//! `round(W · rate)` for each kind (halves away from zero) and the rest are clean; each closed-set
//! image comes from the set's confusable partner when `closed_set_partner` names one per novel
//! class (as web noise does: a search for "coat" returns shirts, not sneakers), else from a novel
//! class other than the set's own, drawn uniformly; each open-set image comes from a base class,
//! drawn uniformly. All draws come from
//! `simtrans_core::seed::rng(seed, &["data", "demo", …], 0)`, where `seed` is
//! `data.demo.benchmark_seed`: by default one fixed benchmark for every run seed, as a real data
//! set is; `"run"` draws a benchmark per run seed.
//!
//! # Item order (ids)
//! Base train (class by class in the order of `data.demo.base`), base validation, base test,
//! novel web (class by class in the order of `data.demo.novel`, each web set shuffled), novel
//! test. Base test uses `novel_test_per_class` images per base class from the test file.

use crate::error::{DataError, Result};
use crate::idx::{find_in, parse_idx, read_idx, IdxImages};
use crate::index::{DataIndex, Images, Item, NoiseKind, Split};
use rand::seq::SliceRandom;
use rand::Rng;
use simtrans_core::config::{DatasetKind, DemoConfig};
use simtrans_core::seed;
use std::path::Path;

/// Fashion-MNIST's class names, by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Where the Debian package `dataset-fashion-mnist` installs the files.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";

const EMBEDDED: [(&str, &[u8]); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        include_bytes!("../assets/fashion-mnist-subset/train-images-idx3-ubyte.gz"),
    ),
    (
        "train-labels-idx1-ubyte.gz",
        include_bytes!("../assets/fashion-mnist-subset/train-labels-idx1-ubyte.gz"),
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        include_bytes!("../assets/fashion-mnist-subset/t10k-images-idx3-ubyte.gz"),
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        include_bytes!("../assets/fashion-mnist-subset/t10k-labels-idx1-ubyte.gz"),
    ),
];

/// The labelled train and test files of a benchmark source.
#[derive(Debug, Clone)]
pub struct DemoSource {
    /// The training file (base train/val, web sets).
    pub train: IdxImages,
    /// The test file (base and novel test).
    pub test: IdxImages,
    /// Class name of each label.
    pub class_names: Vec<String>,
    /// Where the files came from (`embedded subset`, a folder).
    pub origin: String,
}

impl DemoSource {
    /// Whether the class names are Fashion-MNIST's (no `classes.txt`, or one that repeats
    /// them): the demo preset's normalisation constants and horizontal flips are meant for it.
    pub fn is_fashion_mnist(&self) -> bool {
        self.class_names.iter().eq(FASHION_MNIST_CLASSES.iter())
    }
}

/// The `origin` of the subset compiled into the library.
pub const EMBEDDED_ORIGIN: &str = "embedded Fashion-MNIST subset";

/// The subset compiled into the library.
pub fn embedded_source() -> Result<DemoSource> {
    let get = |i: usize| {
        let (name, bytes) = EMBEDDED[i];
        parse_idx(bytes, &format!("embedded {name}"))
    };
    let train = IdxImages::new(get(0)?, Some(get(1)?), EMBEDDED[0].0, EMBEDDED[1].0)?;
    let test = IdxImages::new(get(2)?, Some(get(3)?), EMBEDDED[2].0, EMBEDDED[3].0)?;
    Ok(DemoSource {
        train,
        test,
        class_names: FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
        origin: EMBEDDED_ORIGIN.into(),
    })
}

fn load_pair(dir: &Path, prefix: &str) -> Result<IdxImages> {
    let missing = |stem: &str| {
        DataError::layout(
            dir,
            format!("no {stem} or {stem}.gz"),
            "point run.data_path (--data-path) at a folder with the four Fashion-MNIST IDX files \
             (train/t10k images and labels), or unset it to use the embedded subset",
        )
    };
    let im_stem = format!("{prefix}-images-idx3-ubyte");
    let lb_stem = format!("{prefix}-labels-idx1-ubyte");
    let im = find_in(dir, &im_stem).ok_or_else(|| missing(&im_stem))?;
    let lb = find_in(dir, &lb_stem).ok_or_else(|| missing(&lb_stem))?;
    let mut pair = IdxImages::new(
        read_idx(&im)?,
        Some(read_idx(&lb)?),
        &im.display().to_string(),
        &lb.display().to_string(),
    )?;
    pair.origin = im.display().to_string();
    Ok(pair)
}

/// A folder of IDX files (and optional `classes.txt`).
pub fn dir_source(dir: &Path) -> Result<DemoSource> {
    let train = load_pair(dir, "train")?;
    let test = load_pair(dir, "t10k")?;
    let names_file = dir.join("classes.txt");
    let class_names: Vec<String> = if names_file.is_file() {
        std::fs::read_to_string(&names_file)
            .map_err(|e| DataError::io(&names_file, e))?
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    } else {
        FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    for (set, file) in [(&train, "train"), (&test, "t10k")] {
        let max = set
            .labels
            .as_ref()
            .and_then(|l| l.iter().max())
            .copied()
            .unwrap_or(0);
        if max as usize >= class_names.len() {
            return Err(DataError::layout(
                dir,
                format!(
                    "the {file} labels go up to {max} but there are only {} class names",
                    class_names.len()
                ),
                "add a classes.txt with one class name per line (label order)",
            ));
        }
    }
    if train.height != test.height || train.width != test.width {
        return Err(DataError::layout(
            dir,
            "train and t10k images differ in size",
            "use a matching pair of IDX files",
        ));
    }
    Ok(DemoSource {
        train,
        test,
        class_names,
        origin: dir.display().to_string(),
    })
}

/// The lookup order: `data_path`, then the Debian folder, then the embedded subset.
pub fn resolve_source(data_path: Option<&Path>) -> Result<DemoSource> {
    if let Some(dir) = data_path {
        if !dir.is_dir() {
            return Err(DataError::layout(
                dir,
                "run.data_path is not a folder",
                "point --data-path at a folder with the Fashion-MNIST IDX files, or unset it",
            ));
        }
        return dir_source(dir);
    }
    let debian = Path::new(DEBIAN_DIR);
    if find_in(debian, "train-images-idx3-ubyte").is_some() {
        return dir_source(debian);
    }
    embedded_source()
}

/// Loads junk images: an IDX image file, or a folder holding `train-images-idx3-ubyte[.gz]`.
pub fn load_junk(path: &Path) -> Result<IdxImages> {
    let file = if path.is_dir() {
        find_in(path, "train-images-idx3-ubyte").ok_or_else(|| {
            DataError::layout(
                path,
                "no train-images-idx3-ubyte[.gz] in the junk folder",
                "point run.junk_path (--junk-path) at an IDX image file or a folder with one (e.g. MNIST)",
            )
        })?
    } else if path.is_file() {
        path.to_path_buf()
    } else {
        return Err(DataError::layout(
            path,
            "run.junk_path does not exist",
            "point --junk-path at an IDX image file or a folder with train-images-idx3-ubyte[.gz]",
        ));
    };
    let name = file.display().to_string();
    let mut im = IdxImages::new(read_idx(&file)?, None, &name, "")?;
    im.origin = name;
    Ok(im)
}

/// The composition of every web set of a recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebCounts {
    pub clean: usize,
    pub closed_set: usize,
    pub open_set: usize,
    pub junk: usize,
}

/// Noise counts of one web set: `round(W · rate)` per kind (halves away from zero), the rest clean.
pub fn web_counts(recipe: &DemoConfig) -> Result<WebCounts> {
    let w = recipe.web_per_class;
    let count = |rate: f64, name: &str| -> Result<usize> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(DataError::Recipe(format!(
                "data.demo.{name} = {rate} is not a fraction in [0, 1]"
            )));
        }
        Ok((w as f64 * rate).round() as usize)
    };
    let closed_set = count(recipe.closed_set_rate, "closed_set_rate")?;
    let open_set = count(recipe.open_set_rate, "open_set_rate")?;
    let junk = count(recipe.junk_rate, "junk_rate")?;
    let noise = closed_set + open_set + junk;
    if noise > w {
        return Err(DataError::Recipe(format!(
            "the noise rates add up to {noise} noisy images in a web set of {w}; lower them"
        )));
    }
    Ok(WebCounts {
        clean: w - noise,
        closed_set,
        open_set,
        junk,
    })
}

fn class_ids(names: &[String], all: &[String], what: &str) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for n in names {
        let id = all.iter().position(|a| a == n).ok_or_else(|| {
            DataError::Recipe(format!(
                "unknown {what} class `{n}`; the classes are: {}",
                all.join(", ")
            ))
        })? as u32;
        if ids.contains(&id) {
            return Err(DataError::Recipe(format!(
                "{what} class `{n}` is listed twice"
            )));
        }
        ids.push(id);
    }
    if ids.is_empty() {
        return Err(DataError::Recipe(format!(
            "data.demo.{what} lists no class"
        )));
    }
    Ok(ids)
}

/// Positions of each label's images in file order.
fn by_class(set: &IdxImages, classes: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); classes];
    if let Some(labels) = &set.labels {
        for (i, &l) in labels.iter().enumerate() {
            if (l as usize) < classes {
                out[l as usize].push(i);
            }
        }
    }
    out
}

/// The first `n` images of a class, or an error saying what the recipe asked for.
fn head(pool: &[usize], n: usize, class: &str, file: &str, origin: &str) -> Result<Vec<usize>> {
    if pool.len() < n {
        let more = if origin == EMBEDDED_ORIGIN {
            ", or set run.data_path (--data-path) to the full Fashion-MNIST (Debian package \
             dataset-fashion-mnist)"
        } else {
            ""
        };
        return Err(DataError::Recipe(format!(
            "the recipe needs {n} images of class `{class}` from the {file} file of {origin}, which has only {}; \
             lower the per-class counts or noise rates in [data.demo]{more}",
            pool.len()
        )));
    }
    Ok(pool[..n].to_vec())
}

/// The closed-set donor of each novel class when `data.demo.closed_set_partner` names one per
/// class (in the order of `data.demo.novel`); `None` when the list is empty (donors uniform).
fn closed_set_partners(
    recipe: &DemoConfig,
    names: &[String],
    novel: &[u32],
) -> Result<Option<Vec<u32>>> {
    if recipe.closed_set_partner.is_empty() {
        return Ok(None);
    }
    if recipe.closed_set_partner.len() != novel.len() {
        return Err(DataError::Recipe(format!(
            "data.demo.closed_set_partner names {} classes for {} novel classes; name one partner per \
             novel class, in the order of data.demo.novel, or leave it empty for uniform donors",
            recipe.closed_set_partner.len(),
            novel.len()
        )));
    }
    let mut out = Vec::with_capacity(novel.len());
    for (&c, p) in novel.iter().zip(&recipe.closed_set_partner) {
        let id = names.iter().position(|n| n == p).map(|i| i as u32);
        match id {
            Some(id) if id != c && novel.contains(&id) => out.push(id),
            _ => {
                return Err(DataError::Recipe(format!(
                    "data.demo.closed_set_partner: `{p}` (partner of `{}`) must be another novel class; \
                     the novel classes are: {}",
                    names[c as usize],
                    recipe.novel.join(", ")
                )))
            }
        }
    }
    Ok(Some(out))
}

/// Checks that every base and novel class has `data.demo.novel_test_per_class` test images,
/// naming the smallest class and the largest value the source allows.
fn check_test_pools(
    recipe: &DemoConfig,
    source: &DemoSource,
    test_pool: &[Vec<usize>],
    base: &[u32],
    novel: &[u32],
) -> Result<()> {
    let want = recipe.novel_test_per_class;
    let Some((smallest, have)) = base
        .iter()
        .chain(novel)
        .map(|&c| (c, test_pool[c as usize].len()))
        .min_by_key(|&(_, n)| n)
    else {
        return Ok(());
    };
    if have >= want {
        return Ok(());
    }
    let more = if source.origin == EMBEDDED_ORIGIN {
        " (or set run.data_path, --data-path, to the full Fashion-MNIST: Debian package \
         dataset-fashion-mnist)"
    } else {
        ""
    };
    Err(DataError::Recipe(format!(
        "data.demo.novel_test_per_class = {want}, but class `{}` has only {have} images in the test \
         file of {} (the smallest class; the setting sizes the base test sets too): set it to at most \
         {have}{more}",
        source.class_names[smallest as usize], source.origin
    )))
}

/// Builds the benchmark index of a recipe from a source (and junk images when the recipe has junk)
/// for run seed `run_seed`; the draws use the recipe's `benchmark_seed`, which may be that seed.
pub fn build(
    recipe: &DemoConfig,
    source: &DemoSource,
    junk: Option<&IdxImages>,
    run_seed: u64,
) -> Result<DataIndex> {
    let seed = recipe.benchmark_seed.for_run(run_seed);
    let names = &source.class_names;
    let base = class_ids(&recipe.base, names, "base")?;
    let novel = class_ids(&recipe.novel, names, "novel")?;
    if let Some(n) = novel.iter().find(|n| base.contains(n)) {
        return Err(DataError::Recipe(format!(
            "class `{}` is both base and novel",
            names[*n as usize]
        )));
    }
    if recipe.web_per_class == 0 {
        return Err(DataError::Recipe(
            "data.demo.web_per_class must be positive".into(),
        ));
    }
    let counts = web_counts(recipe)?;
    if counts.closed_set > 0 && novel.len() < 2 {
        return Err(DataError::Recipe(
            "closed-set noise needs at least two novel classes; set data.demo.closed_set_rate = 0"
                .into(),
        ));
    }
    let junk = match (counts.junk > 0, junk) {
        (false, _) => None,
        (true, None) => {
            return Err(DataError::Recipe(format!(
                "data.demo.junk_rate = {} needs junk images: set run.junk_path (--junk-path) to an IDX \
                 image file (e.g. MNIST's train-images-idx3-ubyte.gz), or set the rate to 0",
                recipe.junk_rate
            )))
        }
        (true, Some(j)) => {
            if (j.height, j.width) != (source.train.height, source.train.width) {
                return Err(DataError::Recipe(format!(
                    "junk images in {} are {}x{} but the benchmark's are {}x{}",
                    j.origin, j.height, j.width, source.train.height, source.train.width
                )));
            }
            Some(j)
        }
    };

    let partners = closed_set_partners(recipe, names, &novel)?;

    // Draw the donor class of every noise slot, web set by web set.
    let mut rng = seed::rng(seed, &["data", "demo", "noise-sources"], 0);
    let mut donors: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
    let mut demand = vec![0usize; names.len()];
    for (k, &c) in novel.iter().enumerate() {
        let others: Vec<u32> = match &partners {
            Some(p) => vec![p[k]],
            None => novel.iter().copied().filter(|&o| o != c).collect(),
        };
        let closed: Vec<u32> = (0..counts.closed_set)
            .map(|_| others[rng.random_range(0..others.len())])
            .collect();
        let open: Vec<u32> = (0..counts.open_set)
            .map(|_| base[rng.random_range(0..base.len())])
            .collect();
        for &d in closed.iter().chain(&open) {
            demand[d as usize] += 1;
        }
        donors.push((closed, open));
    }

    // Take each class's images from the head of the training file and give them roles.
    let train_pool = by_class(&source.train, names.len());
    let test_pool = by_class(&source.test, names.len());
    let mut roles: Vec<Vec<usize>> = vec![Vec::new(); names.len()];
    for &c in base.iter().chain(&novel) {
        let own = if base.contains(&c) {
            recipe.base_train_per_class + recipe.base_val_per_class
        } else {
            counts.clean
        };
        let name = &names[c as usize];
        let mut taken = head(
            &train_pool[c as usize],
            own + demand[c as usize],
            name,
            "train",
            &source.origin,
        )?;
        taken.shuffle(&mut seed::rng(seed, &["data", "demo", "roles", name], 0));
        roles[c as usize] = taken;
    }

    let mut items: Vec<Item> = Vec::new();
    let mut pixels: Vec<u8> = Vec::new();
    let mut push = |items: &mut Vec<Item>, img: &[u8], label, split, noise, truth| {
        items.push(Item {
            id: items.len() as u32,
            label,
            split,
            noise,
            true_label: truth,
        });
        pixels.extend_from_slice(img);
    };

    // Base train and validation: the first roles of each base class.
    for (split, skip, n) in [
        (Split::BaseTrain, 0, recipe.base_train_per_class),
        (
            Split::BaseVal,
            recipe.base_train_per_class,
            recipe.base_val_per_class,
        ),
    ] {
        for &b in &base {
            for &i in &roles[b as usize][skip..skip + n] {
                push(
                    &mut items,
                    source.train.image(i),
                    b,
                    split,
                    NoiseKind::Clean,
                    Some(b),
                );
            }
        }
    }
    check_test_pools(recipe, source, &test_pool, &base, &novel)?;
    let test_heads = |classes: &[u32]| -> Vec<Vec<usize>> {
        classes
            .iter()
            .map(|&c| test_pool[c as usize][..recipe.novel_test_per_class].to_vec())
            .collect()
    };
    for (&b, imgs) in base.iter().zip(test_heads(&base)) {
        for i in imgs {
            push(
                &mut items,
                source.test.image(i),
                b,
                Split::BaseTest,
                NoiseKind::Clean,
                Some(b),
            );
        }
    }

    // Web sets: own clean images, then donated noise, then junk, shuffled per set.
    let mut next = vec![0usize; names.len()];
    for &b in &base {
        next[b as usize] = recipe.base_train_per_class + recipe.base_val_per_class;
    }
    for &c in &novel {
        next[c as usize] = counts.clean;
    }
    let mut junk_order: Vec<usize> = (0..junk.map_or(0, |_| counts.junk * novel.len())).collect();
    if let Some(j) = junk {
        if j.count < junk_order.len() {
            return Err(DataError::Recipe(format!(
                "the recipe needs {} junk images but {} has only {}",
                junk_order.len(),
                j.origin,
                j.count
            )));
        }
        junk_order.shuffle(&mut seed::rng(seed, &["data", "demo", "junk"], 0));
    }
    let mut junk_next = 0;
    for (k, &c) in novel.iter().enumerate() {
        // (image source, index, noise kind, true label)
        let mut set: Vec<(bool, usize, NoiseKind, Option<u32>)> =
            Vec::with_capacity(recipe.web_per_class);
        for &i in &roles[c as usize][..counts.clean] {
            set.push((false, i, NoiseKind::Clean, Some(c)));
        }
        let (closed, open) = &donors[k];
        for (kind, list) in [(NoiseKind::ClosedSet, closed), (NoiseKind::OpenSet, open)] {
            for &d in list {
                let i = roles[d as usize][next[d as usize]];
                next[d as usize] += 1;
                set.push((false, i, kind, Some(d)));
            }
        }
        for _ in 0..counts.junk {
            set.push((true, junk_order[junk_next], NoiseKind::Junk, None));
            junk_next += 1;
        }
        set.shuffle(&mut seed::rng(
            seed,
            &["data", "demo", "web-order", &names[c as usize]],
            0,
        ));
        for (is_junk, i, kind, truth) in set {
            let img = if is_junk {
                junk.expect("junk images exist when junk slots do").image(i)
            } else {
                source.train.image(i)
            };
            push(&mut items, img, c, Split::NovelWeb, kind, truth);
        }
    }
    for (&c, imgs) in novel.iter().zip(test_heads(&novel)) {
        for i in imgs {
            push(
                &mut items,
                source.test.image(i),
                c,
                Split::NovelTest,
                NoiseKind::Clean,
                Some(c),
            );
        }
    }

    let index = DataIndex {
        dataset: DatasetKind::Demo,
        class_names: names.clone(),
        base_classes: base,
        novel_classes: novel,
        items,
        images: Images::Pixels {
            height: source.train.height,
            width: source.train.width,
            data: pixels,
        },
    };
    index.validate()?;
    Ok(index)
}
