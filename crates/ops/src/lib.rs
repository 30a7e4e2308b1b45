//! The differentiable operations the networks are built from, each once: its plain candle
//! composition, which defines it and is the CPU path, and beside it the CUDA path that runs it
//! fast (cuDNN execution plans, this project's kernels of `simtrans-kernels`, and the launch
//! code shared with the CPU emulator of `crates/cuda-emu`).
//!
//! Why a crate of its own: the backbone, SimNet and the classifier use the same convolution,
//! BatchNorm and SGD; the fused GPU paths are most of the code and none of the stage logic; and
//! the rule that keeps them correct is local to each op — the GPU path is tested against the
//! plain definition beside it (`crates/backbone/tests/gpu.rs`, `crates/simnet/tests/gpu.rs`,
//! and on every CPU run through the emulator). Candle keeps its kernels and its CUDA backend
//! apart in the same way, and burn its backends out of its core.
//!
//! - [`conv`]: the 2-D convolution (a fused per-image unfold and GEMM on the CPU, cuDNN on
//!   CUDA), the one entry point of every network.
//! - [`bn`]: BatchNorm in its training, evaluation and split-batch modes; in training on the
//!   CPU one fused op each way (`bn_cpu`), defined by the candle composition beside it.
//! - [`headops`]: the SimNet head's pair grid, LayerNorm+ReLU, bias, cross-entropy and the
//!   global average pooling.
//! - [`optim`]: PyTorch's SGD and the step schedule.
//! - [`grad`]: the one entry point for a training step's gradients (and inference scopes).
//! - `cudnn`, `kernels` (`--features cuda`) and [`launch`]: the CUDA path — fused residual
//!   blocks, BatchNorm, pooling and SGD on our kernels — and the host side of our kernels.
//! - [`gpu`]: the `[gpu]` settings the CUDA path follows, and the device helpers around it.
//! - [`hostprof`]: where the host's time goes while it issues a step's work.
//! - [`process`]: the setup of a CPU training process (the allocator reuses freed buffers,
//!   candle's idle workers sleep instead of spinning).

pub mod bn;
mod bn_cpu;
pub mod conv;
#[cfg(feature = "cuda")]
pub mod cudnn;
pub mod gpu;
pub mod grad;
pub mod headops;
pub mod hostprof;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod launch;
pub mod optim;
pub mod process;
#[cfg(feature = "cuda")]
mod storage;

pub use bn::{BatchNorm, BnMode};
pub use optim::Sgd;
