//! The GPU around the ops: which implementations the CUDA path runs (the config's `[gpu]`
//! section, installed once per process), opening a device the way the stages do, its memory in
//! use, the profiled range of a kernel profiler, and the device a GPU test runs on.
//!
//! Why here and not in `simtrans-core`: each of these talks to the CUDA driver or steers the
//! fused ops of this crate, and core stays free of CUDA. The settings are process-wide, like
//! the precision, because they are read deep inside the ops (every convolution and BatchNorm)
//! and must be the same for all of them; the orchestrator installs them from the config before
//! a stage builds a model.

use candle_core::Device;
use simtrans_core::config::GpuConfig;
use std::sync::RwLock;

/// The installed settings; `None` until [`configure`]: the defaults.
static SETTINGS: RwLock<Option<GpuConfig>> = RwLock::new(None);

/// Installs the `[gpu]` section for every op of this process.
pub fn configure(gpu: &GpuConfig) {
    *SETTINGS.write().unwrap_or_else(|p| p.into_inner()) = Some(gpu.clone());
}

/// The installed settings ([`GpuConfig::default`] until [`configure`] says otherwise).
pub fn settings() -> GpuConfig {
    SETTINGS
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Opens the device `name` names (`cpu`, `cuda`, `cuda:N`; see
/// [`simtrans_core::device::parse`]), on CUDA without cudarc's per-buffer events
/// ([`untrack_events`]); [`configure`] first.
pub fn open(name: &str) -> simtrans_core::Result<Device> {
    let device = simtrans_core::device::parse(name)?;
    #[cfg(feature = "cuda")]
    untrack_events(&device);
    Ok(device)
}

/// Stops cudarc from making two CUDA events with every buffer of `dev` and destroying them
/// with it (unless `gpu.event_tracking = true`, to measure the difference). cudarc waits on
/// those events only while a context runs several streams; candle's device runs one, its
/// per-thread stream, and nothing in this project makes another, so they are never used, yet
/// each buffer — every op's output and every scratch buffer, many hundreds per training step —
/// pays four driver calls for them. Buffers made before this call keep theirs.
#[cfg(feature = "cuda")]
fn untrack_events(dev: &candle_core::Device) {
    if let candle_core::Device::Cuda(d) = dev {
        if settings().event_tracking {
            return;
        }
        // SAFETY: the events order work between streams of one context; every buffer of
        // this device is used on its one stream, where work runs in order anyway.
        unsafe { d.disable_event_tracking() }
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

/// For GPU tests: the first CUDA device, opened
/// as the stages open it. GPU tests are `#[ignore = "needs a CUDA build and a GPU …"]`, so the
/// test runner reports them as ignored, and `scripts/gpu-bench.sh` runs them with
/// `--include-ignored`; asked for on a machine or a build without a GPU, this panics saying
/// why, so such a test never passes without having checked anything.
pub fn test_device(test: &str) -> Device {
    #[cfg(feature = "cuda")]
    let why = match open("cuda") {
        Ok(d) => return d,
        Err(e) => format!("no usable CUDA device ({e})"),
    };
    #[cfg(not(feature = "cuda"))]
    let why = "built without `--features cuda`".to_string();
    panic!("{test} needs a GPU: {why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_the_defaults_until_configured() {
        // The only test of this binary that touches the process-wide settings.
        assert_eq!(settings(), GpuConfig::default());
        let changed = GpuConfig {
            channels_last: false,
            ..GpuConfig::default()
        };
        configure(&changed);
        assert_eq!(settings(), changed);
        configure(&GpuConfig::default());
        assert!(settings().channels_last);
    }

    #[test]
    fn opening_names_the_device_or_says_why_not() {
        assert!(open("cpu").unwrap().is_cpu());
        let e = open("gpu").unwrap_err().to_string();
        assert!(e.contains("cpu, cuda"), "{e}");
        #[cfg(not(feature = "cuda"))]
        assert!(open("cuda")
            .unwrap_err()
            .to_string()
            .contains("--features cuda"));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    #[should_panic(expected = "needs a GPU: built without `--features cuda`")]
    fn a_gpu_test_without_a_gpu_fails() {
        test_device("this test");
    }
}
