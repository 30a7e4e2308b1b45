//! Compiles this crate's CUDA kernels (`src/*.cu`) to PTX when the `cuda` feature is on;
//! `src/lib.rs` embeds the PTX, which the driver compiles for the GPU at first use. Without
//! the feature (the CPU build and CI) this does nothing and needs no CUDA toolchain.
//!
//! nvcc is `$NVCC`, else `$CUDA_ROOT/bin/nvcc`, else `nvcc` on the PATH (the toolchain of
//! `scripts/cuda-toolchain.sh` sets `CUDA_ROOT`); the PTX targets `compute_$CUDA_COMPUTE_CAP`
//! (default 80, the oldest architecture with bf16 arithmetic; newer GPUs JIT it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_ROOT").map(|r| PathBuf::from(r).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in ["bn", "head", "sgd", "pool"] {
        compile(&nvcc, &cap, &out, name);
    }
}

/// `src/{name}.cu` → `$OUT_DIR/{name}.ptx`.
fn compile(nvcc: &Path, cap: &str, out: &Path, name: &str) {
    let src = format!("src/{name}.cu");
    let ptx = out.join(format!("{name}.ptx"));
    let status = Command::new(nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
        ])
        .arg(&src)
        .arg("-o")
        .arg(&ptx)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} to compile {src} ({e}): set NVCC or CUDA_ROOT, or source the \
                 toolchain of scripts/cuda-toolchain.sh",
                nvcc.display()
            )
        });
    assert!(status.success(), "{} failed on {src}", nvcc.display());
}
