//! Device selection from the command line (`cpu`, `cuda`, `cuda:N`) and the arithmetic the
//! GPU uses (`run.precision`).
//!
//! The precision is process-wide because it is read deep inside the network code (every
//! convolution and matrix product) and must be the same for all of them; stages set it once
//! from the config before they build a model.

use crate::error::{CoreError, Result};
use candle_core::Device;
use std::sync::atomic::{AtomicU8, Ordering};

/// How CUDA devices compute the training hot path. The CPU always computes in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// IEEE f32 everywhere (cuDNN FMA math, no TF32): matches the CPU to rounding.
    #[default]
    F32,
    /// f32 storage; convolutions and matrix products may use TF32 tensor cores (PyTorch's
    /// default for convolutions).
    Tf32,
    /// The ResNet trunk keeps its activations in bf16 with f32 master weights, f32 BatchNorm
    /// statistics and f32 loss (PyTorch's autocast).
    Bf16,
}

impl Precision {
    /// `f32`, `tf32` or `bf16`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(CoreError::Config(format!(
                "run.precision `{name}` is not one of f32, tf32, bf16"
            ))),
        }
    }

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
}

static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the process-wide precision (and candle's TF32 switch for f32 matrix products).
pub fn set_precision(p: Precision) {
    PRECISION.store(p as u8, Ordering::Relaxed);
    candle_core::cuda::set_gemm_reduced_precision_f32(p != Precision::F32);
}

/// The process-wide precision; [`Precision::F32`] unless [`set_precision`] said otherwise.
pub fn precision() -> Precision {
    match PRECISION.load(Ordering::Relaxed) {
        1 => Precision::Tf32,
        2 => Precision::Bf16,
        _ => Precision::F32,
    }
}

/// Parses a device name and opens the device. The stages open theirs through
/// `simtrans_ops::gpu::open`, which also sets up the CUDA path.
pub fn parse(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = match name {
                "cuda" => 0,
                _ => name
                    .strip_prefix("cuda:")
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| {
                        CoreError::Device(format!("`{name}` is not one of cpu, cuda, cuda:N"))
                    })?,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(CoreError::Device(format!(
                    "`{name}` needs a build with `--features cuda` (see README, GPU build)"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| CoreError::Device(format!("`{name}`: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert!(super::parse("cpu").unwrap().is_cpu());
        assert!(super::parse("gpu")
            .unwrap_err()
            .to_string()
            .contains("cpu, cuda"));
        assert!(super::parse("cuda:x").is_err());
        if !candle_core::utils::cuda_is_available() {
            assert!(super::parse("cuda")
                .unwrap_err()
                .to_string()
                .contains("--features cuda"));
        }
    }

    #[test]
    fn precision_names_round_trip() {
        use super::Precision;
        for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
            assert_eq!(Precision::parse(p.name()).unwrap(), p);
        }
        assert!(Precision::parse("fp16")
            .unwrap_err()
            .to_string()
            .contains("tf32"));
    }
}
