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

/// Parses a device name and opens the device (on CUDA, without cudarc's per-buffer events:
/// `cudnn::untrack_events`).
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
            let dev = Device::new_cuda(ordinal)
                .map_err(|e| CoreError::Device(format!("`{name}`: {e}")))?;
            #[cfg(feature = "cuda")]
            crate::cudnn::untrack_events(&dev);
            Ok(dev)
        }
    }
}

/// Makes `d`'s CUDA context current on this thread, for driver calls that act on the current
/// context.
#[cfg(feature = "cuda")]
fn bind(d: &candle_core::CudaDevice) -> candle_core::Result<()> {
    d.cuda_stream()
        .context()
        .bind_to_thread()
        .map_err(|e| candle_core::Error::Msg(format!("binding the CUDA context: {e:?}")))
}

/// Bytes of memory in use on `device`'s GPU, by every process (`cuMemGetInfo`); `None` on the
/// CPU. The memory pool keeps what this process frees (`cudnn`'s `keep_freed_memory`), so for
/// one process on a GPU this is its high-water mark: the benches read it after warm-up and after
/// the timed steps, and growth between the two is memory a step did not give back.
pub fn memory_in_use(device: &Device) -> candle_core::Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        bind(d)?;
        let (free, total) = cudarc::driver::result::mem_get_info()
            .map_err(|e| candle_core::Error::Msg(format!("cuMemGetInfo: {e:?}")))?;
        return Ok(Some((total - free) as u64));
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(None)
}

/// Runs `work` as the process's profiled range: on a CUDA device between `cuProfilerStart` and
/// `cuProfilerStop`, waiting for the device at both ends, so that a kernel profiler started with
/// `--profile-from-start off` (`ncu`, scripts/gpu-bench.sh section `profile`) records this work
/// alone: no start-up, no warm-up, no first-call costs. Elsewhere it only runs `work`.
pub fn profiled<T, E: From<candle_core::Error>>(
    device: &Device,
    work: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use cudarc::driver::sys as drv;
        let fail = |what: &str, e: cudarc::driver::DriverError| {
            candle_core::Error::Msg(format!("{what}: {e:?}"))
        };
        device.synchronize()?;
        bind(d)?;
        // SAFETY: no arguments; the context is current on this thread.
        unsafe { drv::cuProfilerStart() }
            .result()
            .map_err(|e| fail("cuProfilerStart", e))?;
        let out = work();
        let stopped = device.synchronize().and_then(|()| {
            // SAFETY: as above.
            unsafe { drv::cuProfilerStop() }
                .result()
                .map_err(|e| fail("cuProfilerStop", e))
        });
        let out = out?;
        stopped?;
        return Ok(out);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    work()
}

/// For GPU tests: the first CUDA device, or `None` after saying on stderr why `test` is
/// skipped (a `SKIPPED` line), so a CPU run of the suite says what it did not check. With
/// `SIMTRANS_REQUIRE_GPU` set (scripts/gpu-bench.sh sets it) a missing GPU panics instead.
///
/// The notice goes to file descriptor 2 itself: the test harness swallows `eprintln!` of
/// passing tests, and reopening `/dev/stderr` would write at its own offset into a redirected
/// log and be overwritten.
pub fn test_gpu(test: &str) -> Option<Device> {
    // Opened as the stages open it.
    #[cfg(feature = "cuda")]
    let why = match parse("cuda") {
        Ok(d) => return Some(d),
        Err(e) => format!("no usable CUDA device ({e})"),
    };
    #[cfg(not(feature = "cuda"))]
    let why = "built without `--features cuda` (scripts/gpu-bench.sh runs it on a GPU)";
    let line = format!("SKIPPED {test}: {why}");
    if std::env::var_os("SIMTRANS_REQUIRE_GPU").is_some() {
        panic!("{line}, and SIMTRANS_REQUIRE_GPU is set");
    }
    #[cfg(unix)]
    {
        use std::io::Write;
        use std::os::fd::FromRawFd;
        // SAFETY: fd 2 is open for the whole process; ManuallyDrop never closes it.
        let mut stderr = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(2) });
        // One write, so that lines from tests running in parallel do not interleave.
        let _ = stderr.write_all(format!("{line}\n").as_bytes());
    }
    #[cfg(not(unix))]
    eprintln!("{line}");
    None
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
        #[cfg(not(feature = "cuda"))]
        assert!(super::parse("cuda")
            .unwrap_err()
            .to_string()
            .contains("--features cuda"));
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
