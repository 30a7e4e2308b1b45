//! The typed configuration of a run: one section per stage, two presets, overrides.
//!
//! Defaults are the reference settings of `SPEC.md` (the `paper` preset) or a scaled-down
//! version of them that runs on a laptop CPU in minutes (the `demo` preset). Every trap of the
//! reference code that we decided on is a named field here, so that a saved `config.toml` says
//! exactly what a run did. The resolved config is written beside the artifacts of every run.

use crate::error::{CoreError, Result};
use crate::node::Stage;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A set of defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The embedded Fashion-MNIST weak-shot benchmark, a small ResNet, CPU, minutes.
    Demo,
    /// The reference hyper-parameters: ResNet-50 at 224 px from ImageNet weights, one GPU.
    Paper,
}

impl std::str::FromStr for Preset {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "demo" => Ok(Preset::Demo),
            "paper" => Ok(Preset::Paper),
            other => Err(CoreError::Unknown(format!(
                "unknown preset `{other}`; the presets are: demo, paper"
            ))),
        }
    }
}

/// Which data set a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// The embedded weak-shot benchmark built from Fashion-MNIST.
    Demo,
    /// CUB-200-2011 with the authors' web images.
    Cub,
    /// CompCars with the authors' web images.
    Car,
    /// FGVC-Aircraft 2013b with the authors' web images.
    Air,
    /// ImageNet (base) and WebVision (novel web images).
    Webvision,
}

impl DatasetKind {
    /// The lower-case name used on the command line and in manifests.
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Demo => "demo",
            DatasetKind::Cub => "cub",
            DatasetKind::Car => "car",
            DatasetKind::Air => "air",
            DatasetKind::Webvision => "webvision",
        }
    }
}

impl std::str::FromStr for DatasetKind {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "demo" => Ok(DatasetKind::Demo),
            "cub" => Ok(DatasetKind::Cub),
            "car" => Ok(DatasetKind::Car),
            "air" => Ok(DatasetKind::Air),
            "webvision" => Ok(DatasetKind::Webvision),
            other => Err(CoreError::Unknown(format!(
                "unknown dataset `{other}`; the datasets are: demo, cub, car, air, webvision"
            ))),
        }
    }
}

/// Which checkpoint of a training stage becomes its artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Selection {
    /// The last epoch (honest; the default).
    Final,
    /// The best epoch on a held-out validation split (never the test set).
    Val,
}

/// The ResNet variant of a backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// torchvision ResNet-18 (512-d features).
    Resnet18,
    /// torchvision ResNet-34 (512-d features).
    Resnet34,
    /// torchvision ResNet-50 (2048-d features), the paper's backbone.
    Resnet50,
    /// A narrow basic-block ResNet for 28-px images (3×3 stem, no max-pool) for the CPU demo.
    Small,
}

/// Run-wide settings that are not a stage's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The preset the defaults came from.
    pub preset: Preset,
    /// The data set.
    pub dataset: DatasetKind,
    /// Root of the data set on disk (for `demo`: a folder of Fashion-MNIST IDX files).
    pub data_path: Option<String>,
    /// Optional second IDX source for junk noise in the demo benchmark (e.g. MNIST digits).
    pub junk_path: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`. Not part of any cache key.
    pub device: String,
    /// Arithmetic on CUDA devices: `f32` (exact), `tf32` or `bf16` (see
    /// [`crate::device::Precision`]); the CPU always computes in f32. Part of the cache keys
    /// of the training stages when it is not `f32`.
    #[serde(default = "default_precision")]
    pub precision: String,
    /// The first seed.
    pub seed: u64,
    /// How many seeds (`seed`, `seed+1`, …) `reproduce` runs.
    pub seeds: usize,
    /// Run all five classifier variants instead of `naive` and `full`.
    pub ablations: bool,
}

/// The data stage: image geometry, augmentation, and the demo benchmark recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Side of the square network input in pixels (224 in the paper).
    pub image_size: usize,
    /// Test transform: resize the shorter side to `round(image_size · resize_ratio)`, then center-crop.
    pub resize_ratio: f64,
    /// Train transform: RandomRotation(±degrees).
    pub rotation_degrees: f64,
    /// Train transform: RandomResizedCrop scale range.
    pub crop_scale: [f64; 2],
    /// Train transform: random horizontal flip.
    pub hflip: bool,
    /// Normalisation mean (ImageNet's); used when `normalise = "fixed"`.
    pub mean: [f32; 3],
    /// Normalisation standard deviation (ImageNet's); used when `normalise = "fixed"`.
    pub std: [f32; 3],
    /// Where the normalisation's mean and standard deviation come from: `fixed` (`mean`,
    /// `std`: right for ImageNet-pretrained weights and for the data set whose statistics they
    /// are) or `base_train` (measured on the base training images of the run's data set, per
    /// channel, each time a loader is built: for an IDX data set other than Fashion-MNIST).
    /// Part of the data stage's cache key only when not `fixed`.
    #[serde(default)]
    pub normalise: Normalise,
    /// Decode/augment threads; 0 = all cores.
    pub workers: usize,
    /// The embedded benchmark's recipe (ignored for real data sets).
    pub demo: DemoConfig,
}

/// Where the input normalisation's statistics come from (`data.normalise`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalise {
    /// `data.mean` and `data.std` as configured.
    #[default]
    Fixed,
    /// Measured on the data set's base training images.
    BaseTrain,
}

/// The recipe of the embedded weak-shot benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoConfig {
    /// Base (clean) class names.
    pub base: Vec<String>,
    /// Novel (web-only) class names.
    pub novel: Vec<String>,
    /// Clean training images per base class.
    pub base_train_per_class: usize,
    /// Held-out base validation images per base class (model selection, SimNet F1).
    pub base_val_per_class: usize,
    /// Web images per novel class, noise included.
    pub web_per_class: usize,
    /// Clean test images per novel class.
    pub novel_test_per_class: usize,
    /// Fraction of each web set that are images of another novel class.
    pub closed_set_rate: f64,
    /// Fraction of each web set that are images of a base class.
    pub open_set_rate: f64,
    /// Fraction of each web set drawn from `run.junk_path` (needs that path).
    pub junk_rate: f64,
    /// The closed-set donor of each novel class, in the order of `novel` (its confusable
    /// partner, as on the web); empty: donors drawn uniformly from the other novel classes.
    #[serde(default)]
    pub closed_set_partner: Vec<String>,
    /// The seed that draws the benchmark itself: which images are base training, validation
    /// and web images, which web images are noise, and each web set's order. A number: one
    /// benchmark for every run seed, as a real data set is, so that a run seed varies only the
    /// training (initialisation, batches, augmentation). `"run"`: each run seed draws its own
    /// benchmark (what configs written before the field existed did).
    #[serde(default)]
    pub benchmark_seed: BenchmarkSeed,
}

/// Which seed draws the embedded benchmark (`data.demo.benchmark_seed`): a number, or `"run"`
/// for the run's own seed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SeedText", into = "SeedText")]
pub enum BenchmarkSeed {
    /// Every run seed trains on the benchmark drawn with this seed.
    Fixed(u64),
    /// Each run seed draws its own benchmark.
    #[default]
    Run,
}

impl BenchmarkSeed {
    /// The seed that draws the benchmark of run seed `run_seed`.
    pub fn for_run(self, run_seed: u64) -> u64 {
        match self {
            BenchmarkSeed::Fixed(s) => s,
            BenchmarkSeed::Run => run_seed,
        }
    }
}

/// [`BenchmarkSeed`] as written in a config file.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SeedText {
    Number(i64),
    Word(String),
}

impl TryFrom<SeedText> for BenchmarkSeed {
    type Error = String;
    fn try_from(text: SeedText) -> std::result::Result<Self, String> {
        let written = match text {
            SeedText::Number(s) if s >= 0 => return Ok(BenchmarkSeed::Fixed(s as u64)),
            SeedText::Word(w) if w == "run" => return Ok(BenchmarkSeed::Run),
            SeedText::Number(s) => s.to_string(),
            SeedText::Word(w) => format!("\"{w}\""),
        };
        Err(format!(
            "benchmark_seed = {written}: use a seed (a whole number ≥ 0) or \"run\" (each run \
             seed draws its own benchmark)"
        ))
    }
}

impl From<BenchmarkSeed> for SeedText {
    fn from(seed: BenchmarkSeed) -> Self {
        match seed {
            BenchmarkSeed::Fixed(s) => SeedText::Number(s as i64),
            BenchmarkSeed::Run => SeedText::Word("run".into()),
        }
    }
}

/// Shared SGD and schedule settings of a training stage (the reference semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Epochs.
    pub epochs: usize,
    /// Initial learning rate.
    pub lr: f64,
    /// Multiplicative decay applied every `lr_step` epochs.
    pub lr_decay: f64,
    /// Epochs between decays.
    pub lr_step: usize,
    /// SGD momentum.
    pub momentum: f64,
    /// Coupled (L2) weight decay, PyTorch SGD semantics.
    pub weight_decay: f64,
    /// Zero the momentum buffers at the start of each epoch (the reference rebuilt its optimiser).
    pub reset_momentum: bool,
}

/// Step 0: the backbone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneConfig {
    /// The network.
    pub arch: Arch,
    /// Base width of the `small` network (channels of its first stage).
    pub small_width: usize,
    /// `imagenet` (hf-hub), `scratch`, or a path to a safetensors state dict.
    pub weights: String,
    /// `base` (clean base classes; our default) or `noisy_novel` (the script's choice).
    pub pretrain_on: String,
    /// Minibatch size.
    pub batch_size: usize,
    /// Optimiser and schedule.
    pub optim: OptimConfig,
}

/// Step 1: the similarity network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimnetConfig {
    /// Head type: 4 (default) or 2.
    pub head: u8,
    /// Weight of the adversarial domain loss; 0 disables it.
    pub beta: f64,
    /// BatchNorm statistics per domain half during training (what the reference's two GPUs did).
    pub bn_split: bool,
    /// Source batch size and classes per batch.
    pub batch_a: usize,
    /// Classes per source batch.
    pub classes_a: usize,
    /// Target (web) batch size.
    pub batch_b: usize,
    /// Classes per target batch.
    pub classes_b: usize,
    /// Validation: batches × classes × images.
    pub val_batches: usize,
    /// Validation classes per batch.
    pub val_classes: usize,
    /// Validation images per class.
    pub val_per_class: usize,
    /// Which epoch becomes the artifact.
    pub select: Selection,
    /// Optimiser and schedule (both SGDs).
    pub optim: OptimConfig,
}

/// Step 2: similarity matrices and sample weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenoiseConfig {
    /// Images per feature batch.
    pub feature_batch: usize,
    /// Rows of S computed at once (bounds memory: about rows · L · 2D · 4 bytes · 3 live tensors;
    /// 32 rows keep L = 1000, D = 2048 under 2 GB).
    pub row_block: usize,
    /// Fraction R of a row averaged by the `avgR` weights.
    pub top_r: f64,
    /// Web images (spread evenly over the novel categories) whose similarities to each other,
    /// across categories, the transfer check measures: a `[M, M]` matrix in the artifact.
    #[serde(default = "default_transfer_images")]
    pub transfer_images: usize,
}

fn default_transfer_images() -> usize {
    1024
}

/// Steps 3a/3b: the novel classifier and its baselines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// `imagenet` (the paper) or `backbone` (the step-0 network; the demo).
    pub init: String,
    /// Variants trained by default (`--ablations` adds the others).
    pub variants: Vec<String>,
    /// Step 3a: weighted training epochs.
    pub epochs_3a: usize,
    /// Step 3b: alternating epochs (graph and classification-only, counted together).
    pub epochs_3b: usize,
    /// Batch size of classification(-only) epochs.
    pub batch_size: usize,
    /// Batch size of graph epochs.
    pub graph_batch_size: usize,
    /// Weight scheme of step 3a.
    pub weights_3a: String,
    /// Weight scheme of step 3b.
    pub weights_3b: String,
    /// Weight α of the graph loss.
    pub alpha: f64,
    /// Relax exponent μ.
    pub mu: f64,
    /// Floor of the same-label mask: `Â = relax(A) ⊙ max(C, eye)` (1 = every pair regularised).
    pub eye: f64,
    /// `gcn` (‖g_i − g_j‖² weighted by Â) or `cos` ((cos − Â)²).
    pub reg: String,
    /// Which epoch becomes the artifact.
    pub select: Selection,
    /// Optimiser and schedule (lr 1e-4·0.5^⌊epoch/20⌋ in the paper).
    pub optim: OptimConfig,
}

/// Evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Images per evaluation batch.
    pub batch_size: usize,
}

/// Which of the CUDA path's implementations run; the CPU ignores this section.
///
/// Each field is one of the A/B choices the GPU work measured (BENCHMARKS.md has each table).
/// The defaults are the measured best, or where a measurement did not settle it the choice in
/// use since; the other value selects the alternative, kept to measure the difference again on
/// another GPU (`--set gpu.channels_last=false`) or to rule a fused path out when results
/// differ. The alternatives compute the same function, but sum in
/// another order, so on a GPU a non-default value is part of the training stages' cache keys
/// (absent from them otherwise, so older caches stay valid).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Convolutions and training-mode BatchNorm on cuDNN; `false`: candle's own CUDA
    /// convolution and the tensor-op BatchNorm (the "before" figures).
    pub cudnn: bool,
    /// Convolutions through cuDNN's backend API (execution plans); `false`: the legacy calls.
    pub cudnn_graph: bool,
    /// Convolution algorithms chosen by running them (PyTorch's `cudnn.benchmark`; faster, and
    /// the choice may differ between runs); `false` (the default): cuDNN's heuristics, the same
    /// algorithms every run.
    pub cudnn_find: bool,
    /// BatchNorm on this project's kernels; `false`: cuDNN's in training, candle's tensor ops in
    /// evaluation.
    pub own_batch_norm: bool,
    /// Residual blocks as fused ops; `false`: layer by layer.
    pub fused_blocks: bool,
    /// All residual blocks of a network as one op; `false`: one op per block.
    pub fused_chain: bool,
    /// The fused chain reads its parameters in place and hands their gradients over
    /// (`simtrans_ops::grad`); `false`: packs them with `cat` every step.
    pub side_grads: bool,
    /// The fused chain channels-last (NHWC) inside; `false`: channels-first.
    pub channels_last: bool,
    /// Inference keeps nothing for a backward pass; `false`: as a training-time forward.
    pub lean_inference: bool,
    /// The ReLU mask after a BatchNorm recomputed from its input on our kernels; `false`: read
    /// from its output (BENCHMARKS.md, run 10: within that run's spread).
    pub relu_recompute: bool,
    /// cudarc's two CUDA events per buffer kept (`false`, the default: not made; run 10:
    /// within that run's spread).
    pub event_tracking: bool,
    /// The SimNet head's, the discriminator's and the pooling's ops on this project's kernels;
    /// `false`: candle's ops.
    pub head_kernels: bool,
    /// Under `run.precision = "bf16"`, the SimNet head and discriminator in bf16 too; `false`:
    /// in f32.
    pub head_bf16: bool,
    /// The discriminator's gradient taken from the SimNet backward pass; `false`: its own
    /// forward and backward pass.
    pub disc_reuse: bool,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            cudnn: true,
            cudnn_graph: true,
            cudnn_find: false,
            own_batch_norm: true,
            fused_blocks: true,
            fused_chain: true,
            side_grads: true,
            channels_last: true,
            lean_inference: true,
            relu_recompute: true,
            event_tracking: false,
            head_kernels: true,
            head_bf16: true,
            disc_reuse: true,
        }
    }
}

/// A whole run's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub run: RunConfig,
    pub data: DataConfig,
    pub backbone: BackboneConfig,
    pub simnet: SimnetConfig,
    pub denoise: DenoiseConfig,
    pub classifier: ClassifierConfig,
    pub eval: EvalConfig,
    /// Missing from configs written before it existed: the defaults.
    #[serde(default)]
    pub gpu: GpuConfig,
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn optim(epochs: usize, lr: f64, lr_step: usize) -> OptimConfig {
    OptimConfig {
        epochs,
        lr,
        lr_decay: 0.5,
        lr_step,
        momentum: 0.9,
        weight_decay: 1e-4,
        reset_momentum: true,
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

impl Config {
    /// The defaults of a preset.
    pub fn preset(preset: Preset) -> Self {
        match preset {
            Preset::Paper => Self::paper(),
            Preset::Demo => Self::demo(),
        }
    }

    /// The reference hyper-parameters (`SPEC.md`), CUB, ResNet-50 at 224 px.
    fn paper() -> Self {
        Config {
            run: RunConfig {
                preset: Preset::Paper,
                dataset: DatasetKind::Cub,
                data_path: None,
                junk_path: None,
                device: "cuda".into(),
                precision: default_precision(),
                seed: 0,
                seeds: 1,
                ablations: false,
            },
            data: DataConfig {
                image_size: 224,
                resize_ratio: 255.0 / 224.0,
                rotation_degrees: 30.0,
                crop_scale: [0.5, 1.0],
                hflip: true,
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
                normalise: Normalise::Fixed,
                workers: 0,
                demo: DemoConfig::default_recipe(),
            },
            backbone: BackboneConfig {
                arch: Arch::Resnet50,
                small_width: 16,
                weights: "imagenet".into(),
                pretrain_on: "base".into(),
                batch_size: 64,
                optim: optim(30, 1e-4, 20),
            },
            simnet: SimnetConfig {
                head: 4,
                beta: 0.1,
                bn_split: true,
                batch_a: 50,
                classes_a: 20,
                batch_b: 50,
                classes_b: 2,
                val_batches: 10,
                val_classes: 10,
                val_per_class: 10,
                select: Selection::Final,
                optim: optim(50, 5e-3, 25),
            },
            denoise: DenoiseConfig {
                feature_batch: 100,
                row_block: 32,
                top_r: 0.5,
                transfer_images: default_transfer_images(),
            },
            classifier: ClassifierConfig {
                init: "imagenet".into(),
                variants: strings(&["naive", "full"]),
                epochs_3a: 60,
                epochs_3b: 100,
                batch_size: 8,
                graph_batch_size: 128,
                weights_3a: "savg1".into(),
                weights_3b: "avg1".into(),
                alpha: 0.1,
                mu: -4.0,
                eye: 1.0,
                reg: "gcn".into(),
                select: Selection::Final,
                optim: optim(0, 1e-4, 20),
            },
            eval: EvalConfig { batch_size: 100 },
            gpu: GpuConfig::default(),
        }
    }

    /// The embedded benchmark on a laptop CPU: same method, scaled down.
    fn demo() -> Self {
        let mut c = Self::paper();
        c.run.preset = Preset::Demo;
        c.run.dataset = DatasetKind::Demo;
        c.run.device = "cpu".into();
        c.data.image_size = 28;
        c.data.resize_ratio = 32.0 / 28.0;
        c.data.rotation_degrees = 10.0;
        c.data.crop_scale = [0.7, 1.0];
        c.data.mean = [0.286; 3];
        c.data.std = [0.353; 3];
        c.backbone.arch = Arch::Small;
        c.backbone.weights = "scratch".into();
        c.backbone.batch_size = 64;
        c.backbone.optim = optim(5, 0.05, 3);
        c.simnet.classes_a = 6;
        c.simnet.val_batches = 4;
        c.simnet.val_classes = 4;
        c.simnet.optim = optim(4, 5e-3, 2);
        c.classifier.init = "backbone".into();
        c.classifier.epochs_3a = 6;
        c.classifier.epochs_3b = 6;
        c.classifier.batch_size = 32;
        c.classifier.graph_batch_size = 64;
        // Times 0.3 every epoch in 3a and again in 3b: each step's last three epochs train at
        // 1/37 to 1/412 of its start, so the final epoch is a settled model rather than one draw
        // from a noisy trajectory (halving every epoch left 6 to 7 points between the last
        // three epochs of `naive` on two of three seeds; README, "The demo benchmark").
        c.classifier.optim = OptimConfig {
            lr_decay: 0.3,
            ..optim(0, 0.01, 1)
        };
        c
    }

    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
        toml::from_str(&text).map_err(|e| {
            CoreError::Config(format!(
                "{}: {}; fix the file or start from `cargo xtask config --preset demo`",
                path.display(),
                e.message()
            ))
        })
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serialises")
    }

    /// Sets one field from `section.field=value` (nested fields with more dots). The value is
    /// parsed as a TOML value, falling back to a string.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (path, raw) = assignment.split_once('=').ok_or_else(|| {
            CoreError::Config(format!(
                "override `{assignment}` is not of the form section.field=value"
            ))
        })?;
        let path = path.trim();
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {}", raw.trim()))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
        let mut root = toml::Value::try_from(&*self)
            .map_err(|e| CoreError::Config(format!("cannot serialise the config: {e}")))?;
        let mut slot = &mut root;
        let keys: Vec<&str> = path.split('.').collect();
        for (depth, key) in keys.iter().enumerate() {
            let table = slot.as_table_mut().ok_or_else(|| {
                CoreError::Config(format!("`{}` is not a section", keys[..depth].join(".")))
            })?;
            slot = table.get_mut(*key).ok_or_else(|| {
                CoreError::Config(format!(
                    "unknown config field `{path}`; see `cargo xtask config` for the fields"
                ))
            })?;
        }
        *slot = value;
        *self = root.try_into().map_err(|e: toml::de::Error| {
            CoreError::Config(format!("override `{assignment}`: {}", e.message()))
        })?;
        Ok(())
    }

    /// What a stage's result depends on in this config, as canonical JSON: its own section and
    /// the run-wide fields that change what it computes (never the device).
    pub fn stage_inputs(&self, stage: Stage) -> String {
        let section = match stage {
            Stage::Data => serde_json::to_value(&self.data),
            Stage::Backbone => serde_json::to_value(&self.backbone),
            Stage::Simnet => serde_json::to_value(&self.simnet),
            Stage::Denoise => serde_json::to_value(&self.denoise),
            Stage::Classifier => serde_json::to_value(&self.classifier),
            Stage::Eval => serde_json::to_value(&self.eval),
        }
        .expect("a config section serialises");
        self.inputs_with(stage, section)
    }

    /// [`Self::stage_inputs`] with `section` standing for the stage's own section: the part of
    /// it one node reads (a classifier variant reads only some of `[classifier]`).
    pub fn inputs_with(&self, stage: Stage, section: serde_json::Value) -> String {
        let section = match stage {
            Stage::Data => serde_json::json!({
                "section": without_default_normalise(section),
                "data_path": self.run.data_path,
                "junk_path": self.run.junk_path,
            }),
            _ => serde_json::json!({ "section": section }),
        };
        let mut key = serde_json::json!({ "dataset": self.run.dataset, "inputs": section });
        // f32 is the exact path every earlier run used, so it adds nothing to the key and old
        // caches stay valid; a reduced precision changes what the networks compute.
        if stage != Stage::Data && self.run.precision != "f32" {
            key["precision"] = serde_json::json!(self.run.precision);
        }
        // Likewise the GPU path's implementation choices, only where they differ from the
        // defaults every earlier run used.
        if stage != Stage::Data && self.gpu != GpuConfig::default() {
            key["gpu"] = serde_json::to_value(&self.gpu).expect("the gpu section serialises");
        }
        key.to_string()
    }
}

/// The data section as the cache key sees it: `normalise` only when it is not the default
/// every earlier run used, so that their caches stay valid.
fn without_default_normalise(mut section: serde_json::Value) -> serde_json::Value {
    if let Some(fields) = section.as_object_mut() {
        if fields.get("normalise") == Some(&serde_json::json!("fixed")) {
            fields.remove("normalise");
        }
    }
    section
}

impl Config {
    /// Checks every field whose value no stage can work with, naming the first bad field and
    /// what it accepts. The orchestrator calls it once on the resolved config, before any stage.
    pub fn validate(&self) -> Result<()> {
        let mut v = Validator::default();
        let r = &self.run;
        v.at_least("run.seeds", r.seeds, 1);
        v.check(
            "run.precision",
            ["f32", "tf32", "bf16"].contains(&r.precision.as_str()),
            &r.precision,
            "one of f32, tf32, bf16",
        );
        let d = &self.data;
        v.at_least("data.image_size", d.image_size, 1);
        v.check(
            "data.resize_ratio",
            d.resize_ratio.is_finite() && d.resize_ratio >= 1.0,
            d.resize_ratio,
            "a number ≥ 1",
        );
        v.non_negative("data.rotation_degrees", d.rotation_degrees, "a number ≥ 0");
        let [lo, hi] = d.crop_scale;
        v.check(
            "data.crop_scale",
            lo > 0.0 && lo <= hi && hi <= 1.0,
            format!("[{lo}, {hi}]"),
            "[lo, hi] with 0 < lo ≤ hi ≤ 1",
        );
        v.check(
            "data.std",
            d.std.iter().all(|s| s.is_finite() && *s > 0.0),
            format!("{:?}", d.std),
            "three positive numbers",
        );
        let demo = &d.demo;
        for (name, n) in [
            ("data.demo.base_train_per_class", demo.base_train_per_class),
            ("data.demo.web_per_class", demo.web_per_class),
            ("data.demo.novel_test_per_class", demo.novel_test_per_class),
        ] {
            v.at_least(name, n, 1);
        }
        for (name, x) in [
            ("data.demo.closed_set_rate", demo.closed_set_rate),
            ("data.demo.open_set_rate", demo.open_set_rate),
            ("data.demo.junk_rate", demo.junk_rate),
        ] {
            v.fraction(name, x);
        }
        v.at_least("backbone.batch_size", self.backbone.batch_size, 1);
        v.optim("backbone.optim", &self.backbone.optim, true);
        let s = &self.simnet;
        for (name, n) in [
            ("simnet.batch_a", s.batch_a),
            ("simnet.classes_a", s.classes_a),
            ("simnet.batch_b", s.batch_b),
            ("simnet.classes_b", s.classes_b),
            ("simnet.val_batches", s.val_batches),
            ("simnet.val_classes", s.val_classes),
            ("simnet.val_per_class", s.val_per_class),
        ] {
            v.at_least(name, n, 1);
        }
        v.non_negative(
            "simnet.beta",
            s.beta,
            "a number ≥ 0 (0 switches the domain loss off)",
        );
        v.optim("simnet.optim", &s.optim, true);
        let dn = &self.denoise;
        v.at_least("denoise.feature_batch", dn.feature_batch, 1);
        v.at_least("denoise.row_block", dn.row_block, 1);
        v.at_least("denoise.transfer_images", dn.transfer_images, 2);
        v.check(
            "denoise.top_r",
            dn.top_r > 0.0 && dn.top_r <= 1.0,
            dn.top_r,
            "a fraction in (0, 1]",
        );
        let c = &self.classifier;
        v.check(
            "classifier.epochs_3a",
            c.epochs_3a + c.epochs_3b >= 1,
            c.epochs_3a,
            "epochs_3a + epochs_3b ≥ 1",
        );
        v.at_least("classifier.batch_size", c.batch_size, 1);
        v.at_least("classifier.graph_batch_size", c.graph_batch_size, 2);
        v.non_negative(
            "classifier.alpha",
            c.alpha,
            "a number ≥ 0 (0 switches the graph term off)",
        );
        v.check(
            "classifier.mu",
            c.mu.is_finite() && c.mu != 0.0,
            c.mu,
            "a finite non-zero number (the paper uses -4)",
        );
        v.fraction("classifier.eye", c.eye);
        v.optim("classifier.optim", &c.optim, false);
        v.at_least("eval.batch_size", self.eval.batch_size, 1);
        v.finish()
    }
}

/// Collects the first invalid field of [`Config::validate`].
#[derive(Default)]
struct Validator {
    error: Option<String>,
}

impl Validator {
    fn check(&mut self, field: &str, ok: bool, value: impl std::fmt::Display, accepts: &str) {
        if !ok && self.error.is_none() {
            self.error = Some(format!(
                "{field} = {value} is invalid: it must be {accepts}; fix it in the config file or with \
                 `--set {field}=…`"
            ));
        }
    }

    fn at_least(&mut self, field: &str, value: usize, min: usize) {
        self.check(field, value >= min, value, &format!("≥ {min}"));
    }

    fn non_negative(&mut self, field: &str, x: f64, accepts: &str) {
        self.check(field, x.is_finite() && x >= 0.0, x, accepts);
    }

    fn fraction(&mut self, field: &str, x: f64) {
        self.check(field, (0.0..=1.0).contains(&x), x, "a fraction in [0, 1]");
    }

    /// The schedule of a training stage; `epochs_required`: the section's own `epochs` is used
    /// (the classifier counts its epochs in `epochs_3a`/`epochs_3b` instead).
    fn optim(&mut self, section: &str, o: &OptimConfig, epochs_required: bool) {
        if epochs_required {
            self.at_least(&format!("{section}.epochs"), o.epochs, 1);
        }
        self.check(
            &format!("{section}.lr"),
            o.lr.is_finite() && o.lr > 0.0,
            o.lr,
            "a positive number",
        );
        self.check(
            &format!("{section}.lr_decay"),
            o.lr_decay > 0.0 && o.lr_decay <= 1.0,
            o.lr_decay,
            "a factor in (0, 1]",
        );
        self.at_least(&format!("{section}.lr_step"), o.lr_step, 1);
        self.check(
            &format!("{section}.momentum"),
            (0.0..1.0).contains(&o.momentum),
            o.momentum,
            "in [0, 1)",
        );
        self.non_negative(
            &format!("{section}.weight_decay"),
            o.weight_decay,
            "a number ≥ 0",
        );
    }

    fn finish(self) -> Result<()> {
        match self.error {
            Some(e) => Err(CoreError::Config(e)),
            None => Ok(()),
        }
    }
}

fn default_precision() -> String {
    "f32".into()
}

impl DemoConfig {
    /// The default split and noise recipe of the embedded benchmark.
    pub fn default_recipe() -> Self {
        DemoConfig {
            base: strings(&[
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Sandal",
                "Bag",
            ]),
            novel: strings(&["Coat", "Shirt", "Sneaker", "Ankle boot"]),
            base_train_per_class: 600,
            base_val_per_class: 50,
            web_per_class: 300,
            novel_test_per_class: 300,
            closed_set_rate: 0.30,
            open_set_rate: 0.20,
            junk_rate: 0.0,
            closed_set_partner: strings(&["Shirt", "Coat", "Ankle boot", "Sneaker"]),
            // One benchmark for all run seeds, as CUB's web sets are one fixed draw (README,
            // "The demo benchmark").
            benchmark_seed: BenchmarkSeed::Fixed(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reduced_precision_keys_the_training_stages_and_f32_keys_nothing() {
        let f32 = Config::preset(Preset::Demo);
        let mut bf16 = f32.clone();
        bf16.run.precision = "bf16".into();
        assert_eq!(
            f32.stage_inputs(Stage::Data),
            bf16.stage_inputs(Stage::Data)
        );
        for stage in [Stage::Backbone, Stage::Simnet, Stage::Classifier] {
            assert_ne!(f32.stage_inputs(stage), bf16.stage_inputs(stage));
            assert!(!f32.stage_inputs(stage).contains("precision"));
        }
        // A config saved before the field existed reads as f32.
        let text = toml::to_string(&f32)
            .unwrap()
            .replace("precision = \"f32\"\n", "");
        assert!(!text.contains("precision"));
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back.run.precision, "f32");
    }

    #[test]
    fn both_presets_are_valid() {
        Config::preset(Preset::Demo).validate().unwrap();
        Config::preset(Preset::Paper).validate().unwrap();
    }

    #[test]
    fn validation_names_the_bad_field() {
        for (assignment, field) in [
            ("run.seeds=0", "run.seeds"),
            ("run.precision=\"fp8\"", "run.precision"),
            ("backbone.optim.lr=-1", "backbone.optim.lr"),
            ("simnet.optim.epochs=0", "simnet.optim.epochs"),
            ("simnet.optim.lr_step=0", "simnet.optim.lr_step"),
            ("classifier.optim.lr_decay=1.5", "classifier.optim.lr_decay"),
            ("classifier.optim.momentum=1.0", "classifier.optim.momentum"),
            ("backbone.batch_size=0", "backbone.batch_size"),
            (
                "classifier.graph_batch_size=1",
                "classifier.graph_batch_size",
            ),
            ("classifier.eye=2", "classifier.eye"),
            ("classifier.alpha=-0.1", "classifier.alpha"),
            ("classifier.mu=0", "classifier.mu"),
            ("data.demo.closed_set_rate=1.2", "data.demo.closed_set_rate"),
            ("data.crop_scale=[0.9, 0.5]", "data.crop_scale"),
            ("denoise.top_r=0", "denoise.top_r"),
            ("eval.batch_size=0", "eval.batch_size"),
        ] {
            let mut c = Config::preset(Preset::Demo);
            c.set(assignment).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("{field} = ")), "{assignment}: {err}");
        }
        let mut c = Config::preset(Preset::Demo);
        c.set("classifier.epochs_3a=0").unwrap();
        c.validate().unwrap();
        c.set("classifier.epochs_3b=0").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn normalise_is_settable_and_keyed_only_when_not_fixed() {
        let mut c = Config::preset(Preset::Demo);
        let fixed = c.stage_inputs(Stage::Data);
        assert!(!fixed.contains("normalise"), "{fixed}");
        assert!(c.to_toml().contains("normalise = \"fixed\""));
        c.set("data.normalise=base_train").unwrap();
        assert_eq!(c.data.normalise, Normalise::BaseTrain);
        assert_ne!(c.stage_inputs(Stage::Data), fixed);
        assert!(c.stage_inputs(Stage::Data).contains("base_train"));
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back.data.normalise, Normalise::BaseTrain);
        assert!(c.set("data.normalise=mean").is_err());
        // A config saved before the field existed still reads, as `fixed`.
        let old = Config::preset(Preset::Demo)
            .to_toml()
            .replace("normalise = \"fixed\"\n", "");
        assert!(!old.contains("normalise"));
        let back: Config = toml::from_str(&old).unwrap();
        assert_eq!(back.data.normalise, Normalise::Fixed);
    }

    #[test]
    fn benchmark_seed_is_a_number_or_run_and_old_configs_draw_per_run() {
        let mut c = Config::preset(Preset::Demo);
        assert_eq!(c.data.demo.benchmark_seed, BenchmarkSeed::Fixed(0));
        let fixed = c.stage_inputs(Stage::Data);
        c.set("data.demo.benchmark_seed=run").unwrap();
        assert_eq!(c.data.demo.benchmark_seed, BenchmarkSeed::Run);
        assert_ne!(c.stage_inputs(Stage::Data), fixed);
        assert!(c.to_toml().contains("benchmark_seed = \"run\""));
        let back: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back.data.demo.benchmark_seed, BenchmarkSeed::Run);
        c.set("data.demo.benchmark_seed=7").unwrap();
        assert_eq!(c.data.demo.benchmark_seed, BenchmarkSeed::Fixed(7));
        assert_eq!(c.data.demo.benchmark_seed.for_run(3), 7);
        assert_eq!(BenchmarkSeed::Run.for_run(3), 3);
        for bad in [
            "data.demo.benchmark_seed=each",
            "data.demo.benchmark_seed=-1",
        ] {
            let err = c.set(bad).unwrap_err().to_string();
            assert!(
                err.contains("a whole number ≥ 0) or \"run\""),
                "{bad}: {err}"
            );
        }
        // A config saved before the field existed reads as one benchmark per run seed.
        let old = Config::preset(Preset::Demo)
            .to_toml()
            .replace("benchmark_seed = 0\n", "");
        assert!(!old.contains("benchmark_seed"));
        let back: Config = toml::from_str(&old).unwrap();
        assert_eq!(back.data.demo.benchmark_seed, BenchmarkSeed::Run);
    }

    #[test]
    fn presets_round_trip_through_toml() {
        for p in [Preset::Demo, Preset::Paper] {
            let c = Config::preset(p);
            let back: Config = toml::from_str(&c.to_toml()).unwrap();
            assert_eq!(c, back);
        }
    }

    #[test]
    fn paper_preset_has_the_reference_values() {
        let c = Config::preset(Preset::Paper);
        assert_eq!(c.simnet.optim.lr, 5e-3);
        assert_eq!(c.simnet.optim.lr_step, 25);
        assert_eq!(c.simnet.optim.epochs, 50);
        assert_eq!(c.simnet.beta, 0.1);
        assert_eq!(c.classifier.alpha, 0.1);
        assert_eq!(c.classifier.mu, -4.0);
        assert_eq!(c.classifier.graph_batch_size, 128);
        assert_eq!(c.classifier.batch_size, 8);
        assert_eq!(c.data.image_size, 224);
    }

    #[test]
    fn overrides_set_typed_fields_and_reject_bad_ones() {
        let mut c = Config::preset(Preset::Demo);
        c.set("simnet.beta=0").unwrap();
        assert_eq!(c.simnet.beta, 0.0);
        c.set("simnet.optim.epochs=3").unwrap();
        assert_eq!(c.simnet.optim.epochs, 3);
        c.set("backbone.weights=scratch").unwrap();
        assert_eq!(c.backbone.weights, "scratch");
        let err = c.set("simnet.nosuch=1").unwrap_err().to_string();
        assert!(err.contains("simnet.nosuch"), "{err}");
        let err = c.set("simnet.bn_split=maybe").unwrap_err().to_string();
        assert!(err.contains("bn_split"), "{err}");
        let err = c.set("simnet.head=\"four\"").unwrap_err().to_string();
        assert!(err.contains("simnet.head"), "{err}");
    }

    #[test]
    fn a_non_default_gpu_section_keys_the_training_stages_only() {
        let c = Config::preset(Preset::Demo);
        let mut g = c.clone();
        g.gpu.channels_last = false;
        assert_eq!(
            c.stage_inputs(Stage::Data),
            g.stage_inputs(Stage::Data),
            "data does not run on the GPU path"
        );
        for st in [
            Stage::Backbone,
            Stage::Simnet,
            Stage::Denoise,
            Stage::Classifier,
        ] {
            assert_ne!(c.stage_inputs(st), g.stage_inputs(st), "{st}");
            assert!(
                !c.stage_inputs(st).contains("\"gpu\""),
                "defaults add nothing: {st}"
            );
        }
        // A config written before the section existed reads as the defaults.
        let mut old: toml::Value = toml::Value::try_from(&c).unwrap();
        old.as_table_mut().unwrap().remove("gpu");
        let back: Config = old.try_into().unwrap();
        assert_eq!(back.gpu, GpuConfig::default());
    }

    #[test]
    fn stage_inputs_change_only_with_their_section() {
        let a = Config::preset(Preset::Demo);
        let mut b = a.clone();
        b.simnet.beta = 0.0;
        assert_eq!(
            a.stage_inputs(Stage::Backbone),
            b.stage_inputs(Stage::Backbone)
        );
        assert_ne!(a.stage_inputs(Stage::Simnet), b.stage_inputs(Stage::Simnet));
        let mut d = a.clone();
        d.run.device = "cuda:1".into();
        for s in Stage::ALL {
            assert_eq!(a.stage_inputs(s), d.stage_inputs(s));
        }
    }
}
