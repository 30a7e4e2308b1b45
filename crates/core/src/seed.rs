//! Deterministic randomness.
//!
//! Every random draw of the pipeline (weight init, noise recipe, batch order, augmentation) comes
//! from a ChaCha generator whose seed is derived from the run seed and a label naming the
//! purpose, so that the same seed gives the same run, a resumed run draws exactly what an
//! uninterrupted one would, and adding a new consumer of randomness does not shift the others.
//! candle's CPU random functions cannot be seeded, so weights are initialised here too.

use crate::hash::Hasher;
use candle_core::{DType, Device, Result as CResult, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use std::sync::Mutex;

/// A generator for `(seed, labels…, index)`.
pub fn rng(seed: u64, labels: &[&str], index: u64) -> ChaCha8Rng {
    let mut h = Hasher::new();
    h.field(seed.to_le_bytes());
    for l in labels {
        h.field(l);
    }
    h.field(index.to_le_bytes());
    ChaCha8Rng::from_seed(h.bytes())
}

/// Draws `shape.elem_count()` values following a candle [`Init`] with our generator.
pub fn sample_init(init: Init, shape: &Shape, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let n = shape.elem_count();
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => normal(mean, stdev, n, rng),
        Init::Uniform { lo, up } => uniform(lo, up, n, rng),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let fan = fan.for_shape(shape) as f64;
            let std = non_linearity.gain() / fan.sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Normal => normal(0.0, std, n, rng),
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound, n, rng)
                }
            }
        }
    }
}

fn normal(mean: f64, std: f64, n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let d = Normal::new(mean, std.max(0.0)).expect("finite normal parameters");
    (0..n).map(|_| d.sample(rng) as f32).collect()
}

fn uniform(lo: f64, up: f64, n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    if up <= lo {
        return vec![lo as f32; n];
    }
    let d = Uniform::new(lo, up).expect("lo < up");
    (0..n).map(|_| d.sample(rng) as f32).collect()
}

/// A VarBuilder backend that creates missing variables in a [`VarMap`] with seeded values.
struct SeededBackend {
    varmap: VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl SimpleBackend for SeededBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> CResult<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let values = {
            let mut rng = self.rng.lock().expect("rng lock");
            sample_init(h, &s, &mut rng)
        };
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> CResult<Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("variable {name} has no shape to initialise it with"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("varmap lock")
            .contains_key(name)
    }
}

/// A VarBuilder that fills `varmap` with trainable variables initialised from `(seed, label)`.
/// Variables already in the map are reused as they are (e.g. loaded weights).
pub fn var_builder(
    varmap: &VarMap,
    seed: u64,
    label: &str,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededBackend {
        varmap: varmap.clone(),
        rng: Mutex::new(rng(seed, &["init", label], 0)),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// Deterministic, well-spread values in `[lo, hi)` of a given shape on the CPU (a scrambled sine
/// of the element index), for tests and goldens that need "random-looking" inputs without an RNG.
pub fn det_tensor(shape: &[usize], seed: f64, lo: f32, hi: f32) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let x = Tensor::arange(0u32, n as u32, &Device::Cpu)?.to_dtype(DType::F32)?;
    let s = x.affine(12.9898, seed)?.sin()?.affine(43758.547, 0.0)?;
    let frac = (&s - s.floor()?)?;
    frac.affine((hi - lo) as f64, lo as f64)?.reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn same_labels_same_stream_other_labels_other_stream() {
        let a: Vec<u32> = (0..4).map(|_| rng(7, &["x"], 1).random()).collect();
        let b: u32 = rng(7, &["x"], 1).random();
        assert_eq!(a[0], b);
        let c: u32 = rng(7, &["y"], 1).random();
        let d: u32 = rng(7, &["x"], 2).random();
        assert_ne!(b, c);
        assert_ne!(b, d);
    }

    #[test]
    fn seeded_builder_is_reproducible_and_follows_init() {
        let make = |seed| {
            let vm = VarMap::new();
            let vb = var_builder(&vm, seed, "net", DType::F32, &Device::Cpu);
            let w = vb
                .get_with_hints((64, 32), "w", candle_nn::init::DEFAULT_KAIMING_NORMAL)
                .unwrap();
            let b = vb.get_with_hints(5, "b", Init::Const(0.25)).unwrap();
            (
                w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.to_vec1::<f32>().unwrap(),
                vm,
            )
        };
        let (w1, b1, vm) = make(3);
        let (w2, _, _) = make(3);
        let (w3, _, _) = make(4);
        assert_eq!(w1, w2);
        assert_ne!(w1, w3);
        assert_eq!(b1, vec![0.25; 5]);
        // Kaiming normal, fan-in 32, ReLU gain: std = sqrt(2/32) = 0.25.
        let n = w1.len() as f64;
        let mean = w1.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = w1.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!((var.sqrt() - 0.25).abs() < 0.02, "std {}", var.sqrt());
        assert_eq!(vm.all_vars().len(), 2);
    }
}
