//! The CUDA sources of this project's own kernels, and nothing else: `src/*.cu` (with the
//! shared helpers of `common.cuh`) and the build step that turns them into PTX.
//!
//! Why a crate of its own: the sources are read by two builds that have nothing else in
//! common — nvcc, through `build.rs`, for the GPU (`--features cuda`), and the C++ compiler of
//! `crates/cuda-emu`, which runs the same files on the CPU in every test run. Keeping them here,
//! apart from the Rust that launches them (`simtrans-ops`), means a kernel change touches one
//! folder, and a CPU build needs no CUDA toolchain at all. Candle keeps its kernels the same
//! way (`candle-kernels`).
//!
//! With the `cuda` feature each constant below is `(module name, PTX)`; the driver compiles the
//! PTX for the GPU at first launch. Which kernel runs when, on which grid, is
//! `simtrans_ops::launch`'s.

/// The folder of the `.cu` sources (for builds that compile them themselves, like the
/// emulator's).
pub const SOURCE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// Training-mode BatchNorm with the ReLU and the residual addition folded in (`bn.cu`).
#[cfg(feature = "cuda")]
pub const BN: (&str, &str) = (
    "simtrans_bn",
    include_str!(concat!(env!("OUT_DIR"), "/bn.ptx")),
);

/// The SimNet head's pair grid, LayerNorm+ReLU, bias and cross-entropy (`head.cu`).
#[cfg(feature = "cuda")]
pub const HEAD: (&str, &str) = (
    "simtrans_head",
    include_str!(concat!(env!("OUT_DIR"), "/head.ptx")),
);

/// The SGD update of many parameters in one launch (`sgd.cu`).
#[cfg(feature = "cuda")]
pub const SGD: (&str, &str) = (
    "simtrans_sgd",
    include_str!(concat!(env!("OUT_DIR"), "/sgd.ptx")),
);

/// The stem's max-pooling with a gather backward, and global average pooling (`pool.cu`).
#[cfg(feature = "cuda")]
pub const POOL: (&str, &str) = (
    "simtrans_pool",
    include_str!(concat!(env!("OUT_DIR"), "/pool.ptx")),
);

#[cfg(test)]
mod tests {
    /// Every kernel file the build compiles is in the source folder, so the emulator, which
    /// includes them from there, sees the same set.
    #[test]
    fn sources_are_where_the_builds_look() {
        for name in ["bn.cu", "head.cu", "sgd.cu", "pool.cu", "common.cuh"] {
            let path = std::path::Path::new(super::SOURCE_DIR).join(name);
            assert!(path.is_file(), "{} is missing", path.display());
        }
    }
}
