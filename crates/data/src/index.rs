//! The resolved data index: every image of a run with its id, label, split and noise truth.
//!
//! The data stage resolves a data set once into this index and stores it as the `data`
//! artifact; every later stage reads it back with [`DataIndex::from_artifact`] and refers to
//! images only by their stable id. For the demo benchmark the pixels travel inside the artifact,
//! so downstream stages never need the IDX files; for real data sets the artifact holds the
//! image paths.

use crate::error::{DataError, Result};
use candle_core::{DType, Device, Tensor};
use simtrans_core::config::DatasetKind;
use simtrans_core::{Artifact, ArtifactSchema, Stage, StageOutput, TensorSpec};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The layout version of the `data` artifact.
pub const SCHEMA_VERSION: u32 = 1;

/// Which part of the benchmark an image belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Split {
    /// Clean training images of the base classes.
    BaseTrain = 0,
    /// Held-out clean base images for model selection.
    BaseVal = 1,
    /// Clean test images of the base classes.
    BaseTest = 2,
    /// Web (noisy) training images of the novel classes.
    NovelWeb = 3,
    /// Clean test images of the novel classes.
    NovelTest = 4,
}

impl Split {
    /// Every split in id order.
    pub const ALL: [Split; 5] = [
        Split::BaseTrain,
        Split::BaseVal,
        Split::BaseTest,
        Split::NovelWeb,
        Split::NovelTest,
    ];

    /// The split's name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Split::BaseTrain => "base_train",
            Split::BaseVal => "base_val",
            Split::BaseTest => "base_test",
            Split::NovelWeb => "novel_web",
            Split::NovelTest => "novel_test",
        }
    }

    /// The split with this numeric code.
    pub fn from_u8(v: u8) -> Option<Self> {
        Split::ALL.get(v as usize).copied()
    }
}

/// What a web image really is, where known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum NoiseKind {
    /// An image of the class it is labelled with.
    Clean = 0,
    /// An image of another novel class.
    ClosedSet = 1,
    /// An image of a base class (outside the novel label set).
    OpenSet = 2,
    /// An image of none of the classes (e.g. a digit).
    Junk = 3,
    /// A real web image whose truth nobody recorded.
    Unknown = 4,
}

impl NoiseKind {
    /// Every kind in id order.
    pub const ALL: [NoiseKind; 5] = [
        NoiseKind::Clean,
        NoiseKind::ClosedSet,
        NoiseKind::OpenSet,
        NoiseKind::Junk,
        NoiseKind::Unknown,
    ];

    /// The kind's name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            NoiseKind::Clean => "clean",
            NoiseKind::ClosedSet => "closed_set",
            NoiseKind::OpenSet => "open_set",
            NoiseKind::Junk => "junk",
            NoiseKind::Unknown => "unknown",
        }
    }

    /// The kind with this numeric code.
    pub fn from_u8(v: u8) -> Option<Self> {
        NoiseKind::ALL.get(v as usize).copied()
    }
}

/// One image of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item {
    /// Stable id: the item's position in [`DataIndex::items`].
    pub id: u32,
    /// Global class id (`class_names[label]`); for a web image the class it was found for.
    pub label: u32,
    /// Which split it belongs to.
    pub split: Split,
    /// Its noise kind (`Clean` for curated images, `Unknown` for real web images).
    pub noise: NoiseKind,
    /// Its real class where known; `None` for junk and for real web images.
    pub true_label: Option<u32>,
}

impl Item {
    /// A curated (clean) image of class `label` in `split`.
    pub fn clean(id: u32, label: u32, split: Split) -> Self {
        Item {
            id,
            label,
            split,
            noise: NoiseKind::Clean,
            true_label: Some(label),
        }
    }
}

/// Where the pixels of the items are.
#[derive(Clone, PartialEq)]
pub enum Images {
    /// Grayscale images stored in the index, `[N, height, width]` row-major (the demo).
    Pixels {
        height: usize,
        width: usize,
        data: Vec<u8>,
    },
    /// One image file per item (real data sets), decoded on demand.
    Paths(Vec<PathBuf>),
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Images::Pixels {
                height,
                width,
                data,
            } => write!(
                f,
                "Pixels({} images of {height}x{width})",
                data.len() / (height * width).max(1)
            ),
            Images::Paths(p) => write!(f, "Paths({} files)", p.len()),
        }
    }
}

/// The resolved data set of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct DataIndex {
    /// Which data set it was built from.
    pub dataset: DatasetKind,
    /// Name of every global class id.
    pub class_names: Vec<String>,
    /// Global ids of the base classes; a base item's local label is its position here.
    pub base_classes: Vec<u32>,
    /// Global ids of the novel classes; a novel item's local label is its position here.
    pub novel_classes: Vec<u32>,
    /// Every image, `items[i].id == i`.
    pub items: Vec<Item>,
    /// The pixels or files of the items, in id order.
    pub images: Images,
}

fn shape(dims: &[Option<usize>]) -> Vec<Option<usize>> {
    dims.to_vec()
}

impl DataIndex {
    /// The tensors every `data` artifact holds. Besides these, a demo artifact holds `pixels`
    /// (U8 `[N, H, W]`) and a real one `paths` (U8, newline-joined UTF-8 paths).
    pub fn schema() -> ArtifactSchema {
        ArtifactSchema::new(
            Stage::Data,
            SCHEMA_VERSION,
            vec![
                TensorSpec::new("label", DType::U32, &shape(&[None])),
                TensorSpec::new("split", DType::U8, &shape(&[None])),
                TensorSpec::new("noise", DType::U8, &shape(&[None])),
                TensorSpec::new("true_label", DType::I64, &shape(&[None])),
                TensorSpec::new("base_classes", DType::U32, &shape(&[None])),
                TensorSpec::new("novel_classes", DType::U32, &shape(&[None])),
            ],
        )
    }

    /// Checks the internal consistency of an index (ids, label ranges, image count).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(DataError::Artifact(m));
        let c = self.class_names.len() as u32;
        for (i, item) in self.items.iter().enumerate() {
            if item.id as usize != i {
                return bad(format!("item {i} has id {}", item.id));
            }
            if item.label >= c || item.true_label.is_some_and(|t| t >= c) {
                return bad(format!("item {i} has a label outside the {c} classes"));
            }
            let set = match item.split {
                Split::BaseTrain | Split::BaseVal | Split::BaseTest => &self.base_classes,
                Split::NovelWeb | Split::NovelTest => &self.novel_classes,
            };
            if !set.contains(&item.label) {
                return bad(format!(
                    "item {i} of split {} has label {} which is not one of its classes",
                    item.split.name(),
                    item.label
                ));
            }
        }
        for &k in self.base_classes.iter().chain(&self.novel_classes) {
            if k >= c {
                return bad(format!("class id {k} is outside the {c} classes"));
            }
        }
        if self
            .base_classes
            .iter()
            .any(|b| self.novel_classes.contains(b))
        {
            return bad("a class is both base and novel".into());
        }
        let n = match &self.images {
            Images::Pixels {
                height,
                width,
                data,
            } => {
                if height * width == 0 || data.len() % (height * width) != 0 {
                    return bad(format!(
                        "pixel buffer of {} bytes is not a whole number of {height}x{width} images",
                        data.len()
                    ));
                }
                data.len() / (height * width)
            }
            Images::Paths(p) => p.len(),
        };
        if n != self.items.len() {
            return bad(format!("{n} images for {} items", self.items.len()));
        }
        Ok(())
    }

    /// The index as a stage output: tensors, metrics (counts per split and noise kind) and
    /// metadata (data set name, class names as JSON).
    pub fn to_output(&self, extra_metrics: serde_json::Value) -> Result<StageOutput> {
        self.validate()?;
        let cpu = Device::Cpu;
        let n = self.items.len();
        let mut tensors = BTreeMap::new();
        let labels: Vec<u32> = self.items.iter().map(|i| i.label).collect();
        let splits: Vec<u8> = self.items.iter().map(|i| i.split as u8).collect();
        let noise: Vec<u8> = self.items.iter().map(|i| i.noise as u8).collect();
        let truth: Vec<i64> = self
            .items
            .iter()
            .map(|i| i.true_label.map_or(-1, |t| t as i64))
            .collect();
        tensors.insert("label".into(), Tensor::from_vec(labels, n, &cpu)?);
        tensors.insert("split".into(), Tensor::from_vec(splits, n, &cpu)?);
        tensors.insert("noise".into(), Tensor::from_vec(noise, n, &cpu)?);
        tensors.insert("true_label".into(), Tensor::from_vec(truth, n, &cpu)?);
        tensors.insert(
            "base_classes".into(),
            Tensor::from_vec(self.base_classes.clone(), self.base_classes.len(), &cpu)?,
        );
        tensors.insert(
            "novel_classes".into(),
            Tensor::from_vec(self.novel_classes.clone(), self.novel_classes.len(), &cpu)?,
        );
        match &self.images {
            Images::Pixels {
                height,
                width,
                data,
            } => {
                tensors.insert(
                    "pixels".into(),
                    Tensor::from_vec(data.clone(), (n, *height, *width), &cpu)?,
                );
            }
            Images::Paths(paths) => {
                let mut text = Vec::new();
                for (k, p) in paths.iter().enumerate() {
                    let s = p.to_str().ok_or_else(|| {
                        DataError::Invalid(format!("{} is not valid UTF-8; rename it", p.display()))
                    })?;
                    if s.contains('\n') {
                        return Err(DataError::Invalid(format!(
                            "{s:?} contains a line break; rename it"
                        )));
                    }
                    if k > 0 {
                        text.push(b'\n');
                    }
                    text.extend_from_slice(s.as_bytes());
                }
                let len = text.len();
                tensors.insert("paths".into(), Tensor::from_vec(text, len, &cpu)?);
            }
        }
        let mut metrics = serde_json::json!({
            "dataset": self.dataset.name(),
            "classes": { "base": self.base_classes.len(), "novel": self.novel_classes.len() },
            "items": n,
            "splits": self.split_counts(),
            "web_noise": self.noise_counts(Split::NovelWeb),
            "web_noise_by_class": self.web_noise_by_class(),
        });
        if let (Some(m), serde_json::Value::Object(extra)) =
            (metrics.as_object_mut(), extra_metrics)
        {
            m.extend(extra);
        }
        let mut meta = BTreeMap::new();
        meta.insert("dataset".to_string(), self.dataset.name().to_string());
        meta.insert(
            "class_names".to_string(),
            serde_json::to_string(&self.class_names).expect("strings serialise"),
        );
        Ok(StageOutput {
            tensors,
            metrics,
            meta,
        })
    }

    /// Items per split, by split name.
    pub fn split_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m: BTreeMap<&'static str, usize> =
            Split::ALL.iter().map(|s| (s.name(), 0)).collect();
        for i in &self.items {
            *m.get_mut(i.split.name()).expect("every split is a key") += 1;
        }
        m
    }

    /// Items of one split per noise kind, by kind name.
    pub fn noise_counts(&self, split: Split) -> BTreeMap<&'static str, usize> {
        let mut m: BTreeMap<&'static str, usize> =
            NoiseKind::ALL.iter().map(|s| (s.name(), 0)).collect();
        for i in self.items.iter().filter(|i| i.split == split) {
            *m.get_mut(i.noise.name()).expect("every kind is a key") += 1;
        }
        m
    }

    /// Web items per novel class name and noise kind.
    pub fn web_noise_by_class(&self) -> BTreeMap<String, BTreeMap<&'static str, usize>> {
        let mut m: BTreeMap<String, BTreeMap<&'static str, usize>> = BTreeMap::new();
        for &c in &self.novel_classes {
            m.insert(
                self.class_names[c as usize].clone(),
                NoiseKind::ALL.iter().map(|k| (k.name(), 0)).collect(),
            );
        }
        for i in self.items.iter().filter(|i| i.split == Split::NovelWeb) {
            if let Some(row) = m.get_mut(&self.class_names[i.label as usize]) {
                *row.get_mut(i.noise.name()).expect("every kind is a key") += 1;
            }
        }
        m
    }

    /// Reads an index back from a `data` artifact (validated against [`DataIndex::schema`]).
    pub fn from_artifact(a: &Artifact) -> Result<Self> {
        let bad = |m: String| DataError::Artifact(m);
        let dataset: DatasetKind = a
            .meta
            .extra
            .get("dataset")
            .ok_or_else(|| bad("metadata has no `dataset`".into()))?
            .parse()?;
        let class_names: Vec<String> = serde_json::from_str(
            a.meta
                .extra
                .get("class_names")
                .ok_or_else(|| bad("metadata has no `class_names`".into()))?,
        )
        .map_err(|e| bad(format!("class_names is not a JSON list of strings: {e}")))?;
        let labels = a.tensor("label")?.to_vec1::<u32>()?;
        let splits = a.tensor("split")?.to_vec1::<u8>()?;
        let noise = a.tensor("noise")?.to_vec1::<u8>()?;
        let truth = a.tensor("true_label")?.to_vec1::<i64>()?;
        let n = labels.len();
        if splits.len() != n || noise.len() != n || truth.len() != n {
            return Err(bad(
                "label, split, noise and true_label differ in length".into()
            ));
        }
        let mut items = Vec::with_capacity(n);
        for k in 0..n {
            items.push(Item {
                id: k as u32,
                label: labels[k],
                split: Split::from_u8(splits[k])
                    .ok_or_else(|| bad(format!("item {k} has split code {}", splits[k])))?,
                noise: NoiseKind::from_u8(noise[k])
                    .ok_or_else(|| bad(format!("item {k} has noise code {}", noise[k])))?,
                true_label: match truth[k] {
                    -1 => None,
                    t if t >= 0 && t <= u32::MAX as i64 => Some(t as u32),
                    t => return Err(bad(format!("item {k} has true label {t}"))),
                },
            });
        }
        let images = if let Some(p) = a.tensors.get("pixels") {
            let (_, h, w) = p.dims3()?;
            Images::Pixels {
                height: h,
                width: w,
                data: p.flatten_all()?.to_vec1::<u8>()?,
            }
        } else if let Some(p) = a.tensors.get("paths") {
            let bytes = p.to_vec1::<u8>()?;
            let text = String::from_utf8(bytes).map_err(|_| bad("paths are not UTF-8".into()))?;
            if n == 0 {
                Images::Paths(vec![])
            } else {
                Images::Paths(text.split('\n').map(PathBuf::from).collect())
            }
        } else {
            return Err(bad("neither `pixels` nor `paths` is present".into()));
        };
        let index = DataIndex {
            dataset,
            class_names,
            base_classes: a.tensor("base_classes")?.to_vec1::<u32>()?,
            novel_classes: a.tensor("novel_classes")?.to_vec1::<u32>()?,
            items,
            images,
        };
        index.validate()?;
        Ok(index)
    }

    /// The items of one split, in id order.
    pub fn items_in(&self, split: Split) -> Vec<&Item> {
        self.items.iter().filter(|i| i.split == split).collect()
    }

    /// `(id, local label)` pairs of one split, the input of the samplers.
    pub fn pairs(&self, split: Split) -> Vec<(u32, u32)> {
        self.items
            .iter()
            .filter(|i| i.split == split)
            .map(|i| (i.id, self.local_label(i)))
            .collect()
    }

    /// The item's label as a position in `base_classes` (base splits) or `novel_classes`
    /// (novel splits).
    pub fn local_label(&self, item: &Item) -> u32 {
        let set = match item.split {
            Split::BaseTrain | Split::BaseVal | Split::BaseTest => &self.base_classes,
            Split::NovelWeb | Split::NovelTest => &self.novel_classes,
        };
        set.iter()
            .position(|&c| c == item.label)
            .expect("a validated index labels every item with one of its split's classes")
            as u32
    }

    /// The item with this id.
    pub fn item(&self, id: u32) -> Option<&Item> {
        self.items.get(id as usize)
    }

    /// The names of the base classes, in local-label order.
    pub fn base_names(&self) -> Vec<&str> {
        self.base_classes
            .iter()
            .map(|&c| self.class_names[c as usize].as_str())
            .collect()
    }

    /// The names of the novel classes, in local-label order.
    pub fn novel_names(&self) -> Vec<&str> {
        self.novel_classes
            .iter()
            .map(|&c| self.class_names[c as usize].as_str())
            .collect()
    }
}
