//! The host side of this project's own CUDA kernels (`kernels/src/*.cu`): which kernel runs on which
//! grid with which arguments, in which order.
//!
//! Why it is apart from `kernels` (CUDA builds only): the sequences here are written against the
//! [`Runner`] trait, not against a GPU, so that the CPU build can run them too. With
//! `--features cuda`, `kernels::Cuda` runs them on the device; in tests, the emulator of
//! `crates/cuda-emu` runs the same sequences and the same `.cu` sources on the CPU, so the
//! kernels, their launch shapes and their argument lists are checked on every CI run, not only
//! when a GPU is at hand.
//!
//! Addresses are `u64` (device addresses on a GPU, host addresses in the emulator) of
//! contiguous tensors; 0 means "no tensor" where an argument is optional.

use candle_core::{bail, DType, Result};

/// One kernel argument, by the C type of the kernel's parameter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// Any pointer (an address, 0 for null).
    Ptr(u64),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

/// A launch's grid (x, y) and block size (x only; our kernels use one-dimensional blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32),
    pub block: u32,
}

/// The source file, and so the compiled module, a kernel lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    /// `kernels/src/bn.cu`.
    Bn,
    /// `kernels/src/head.cu`.
    Head,
    /// `kernels/src/pool.cu`.
    Pool,
    /// `kernels/src/sgd.cu`.
    Sgd,
}

/// Something that runs our kernels: the GPU (`kernels::Cuda`) or the CPU emulator.
pub trait Runner {
    /// A scratch buffer, freed when dropped (after the work queued on it, on a GPU).
    type Buf;
    /// `bytes` of uninitialised scratch memory, aligned for f64.
    fn alloc(&self, bytes: usize) -> Result<Self::Buf>;
    /// The address of a scratch buffer.
    fn addr(&self, buf: &mut Self::Buf) -> u64;
    /// Queues (or, in the emulator, runs) kernel `name` of `module`.
    fn launch(&self, module: Module, name: &'static str, at: Launch, args: &[Arg]) -> Result<()>;
}

/// Threads per block of every launch here (a multiple of 32, as the block reductions need).
pub const THREADS: u32 = 256;

fn launch_of(grid: (u32, u32), block: u32) -> Launch {
    Launch { grid, block }
}

/// One BatchNorm launch's view of a contiguous tensor: `n` rows (images) of `c` channels of
/// `hw` values, stored NCHW, or NHWC when `channels_last` (then the kernels see `n·hw` rows
/// of `c` channels). A split batch is one range per part, on offset addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BnRange {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub channels_last: bool,
    /// One value per access whatever the shape ([`BnRange::aligned_for`]).
    pub scalar: bool,
}

/// The names of one BatchNorm kernel's variants, in [`BnRange::variant`]'s order.
macro_rules! bn_variants {
    ($base:literal) => {
        [
            concat!("bn_", $base, "_f32"),
            concat!("bn_", $base, "_f32x4"),
            concat!("bn_", $base, "_bf16"),
            concat!("bn_", $base, "_bf16x4"),
            concat!("bn_", $base, "_cl_f32"),
            concat!("bn_", $base, "_cl_f32x4"),
            concat!("bn_", $base, "_cl_bf16"),
            concat!("bn_", $base, "_cl_bf16x4"),
        ]
    };
}

/// The BatchNorm kernels that come in variants (layout, dtype, vector width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnKernel {
    Stats,
    Apply,
    GradStats,
    GradApply,
}

impl BnRange {
    /// An NCHW range. With `hw == 1` (a `[B, C]` tensor, such as the SimNet head's) NCHW and
    /// NHWC are the same memory, and the channels-last kernels read it: the NCHW reductions
    /// would read one value per row, `c` values apart.
    pub fn nchw(n: usize, c: usize, hw: usize) -> Self {
        BnRange {
            n,
            c,
            hw,
            channels_last: hw == 1,
            scalar: false,
        }
    }
    /// A channels-last (NHWC) range.
    pub fn nhwc(n: usize, c: usize, hw: usize) -> Self {
        BnRange {
            channels_last: true,
            ..Self::nchw(n, c, hw)
        }
    }
    /// Values per channel.
    pub fn count(&self) -> usize {
        self.n * self.hw
    }
    /// Values in the range.
    pub fn total(&self) -> usize {
        self.n * self.c * self.hw
    }
    /// The variant of `kernel` for `dtype`, this layout and [`BnRange::vec`].
    pub fn variant(&self, kernel: BnKernel, dtype: DType) -> Result<&'static str> {
        const STATS: [&str; 8] = bn_variants!("stats");
        const APPLY: [&str; 8] = bn_variants!("apply");
        const GRAD_STATS: [&str; 8] = bn_variants!("grad_stats");
        const GRAD_APPLY: [&str; 8] = bn_variants!("grad_apply");
        let names = match kernel {
            BnKernel::Stats => &STATS,
            BnKernel::Apply => &APPLY,
            BnKernel::GradStats => &GRAD_STATS,
            BnKernel::GradApply => &GRAD_APPLY,
        };
        let d = match dtype {
            DType::F32 => 0,
            DType::BF16 => 1,
            other => bail!("our BatchNorm kernels take f32 or bf16, not {other:?}"),
        };
        Ok(names[4 * self.channels_last as usize + 2 * d + (self.vec() == 4) as usize])
    }
    /// The same range, read one value at a time when any of the data addresses `ptrs` (0 for
    /// none) is not aligned for 4-value accesses of `dtype`: a view into a tensor can start
    /// anywhere, and the GPU refuses a misaligned vector access.
    pub fn aligned_for(self, dtype: DType, ptrs: &[u64]) -> Self {
        let bytes = 4 * dtype.size_in_bytes() as u64;
        BnRange {
            scalar: self.scalar || ptrs.iter().any(|&p| p % bytes != 0),
            ..self
        }
    }
    /// Values per memory access: 4 when a channel's plane (NCHW) or a row of channels (NHWC)
    /// divides by 4 and the addresses allow it, else 1.
    pub fn vec(&self) -> usize {
        let run = if self.channels_last { self.c } else { self.hw };
        if run % 4 == 0 && !self.scalar {
            4
        } else {
            1
        }
    }
    /// Channels-last reductions: columns of threads per block (each [`BnRange::vec`] channels
    /// wide), a power of two up to 32 that `THREADS` divides.
    fn columns(&self) -> usize {
        (self.c / self.vec()).max(1).next_power_of_two().min(32)
    }
    /// Blocks across the channels in a reduction (NCHW: one per channel).
    fn tiles(&self) -> usize {
        if self.channels_last {
            self.c.div_ceil(self.columns() * self.vec())
        } else {
            self.c
        }
    }
    /// Shares of the rows per block of channels in the reductions: enough blocks to fill a
    /// large GPU (about 2048), without splitting below one image (NCHW) or below four rows
    /// per thread row (NHWC).
    pub fn shares(&self) -> usize {
        let most = if self.channels_last {
            let rows_per_block = THREADS as usize / self.columns();
            self.count().div_ceil(4 * rows_per_block)
        } else {
            self.n
        };
        2048usize.div_ceil(self.tiles()).clamp(1, most.max(1))
    }
    /// One thread per channel (`bn_eval_stats`).
    pub fn per_channel(&self) -> Launch {
        launch_of(((self.c as u32).div_ceil(THREADS), 1), THREADS)
    }
    /// One warp per channel (the `*_finish` kernels, which sum a channel's shares).
    pub fn finish(&self) -> Launch {
        launch_of(((self.c as u32).div_ceil(THREADS / 32), 1), THREADS)
    }
    /// One block per channel (NCHW) or block of channels (NHWC) and share of the rows (the
    /// reductions).
    pub fn reduction(&self) -> Launch {
        launch_of((self.tiles() as u32, self.shares() as u32), THREADS)
    }
    /// The reductions' arguments after the data pointers: `n, c, hw` (NCHW) or `m = n·hw, c,
    /// columns` (NHWC).
    fn extent(&self) -> [Arg; 3] {
        if self.channels_last {
            [
                Arg::I64(self.count() as i64),
                Arg::I32(self.c as i32),
                Arg::I32(self.columns() as i32),
            ]
        } else {
            [
                Arg::I32(self.n as i32),
                Arg::I32(self.c as i32),
                Arg::I32(self.hw as i32),
            ]
        }
    }
    /// One thread per group of `vec()` values (the elementwise passes).
    pub fn elementwise(&self) -> Launch {
        let blocks = (self.total() / self.vec()).div_ceil(THREADS as usize);
        launch_of((blocks as u32, 1), THREADS)
    }
    fn check(&self) -> Result<()> {
        if self.count() < 2 {
            bail!(
                "BatchNorm in training mode needs more than one value per channel, got {} rows \
                 of {} values",
                self.n,
                self.hw
            )
        }
        if self.c > i32::MAX as usize || self.hw > i32::MAX as usize || self.n > i32::MAX as usize {
            bail!("BatchNorm range {self:?} is too large for the kernels' indices")
        }
        Ok(())
    }
}

/// Which statistics normalise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stats {
    /// The batch's own (training mode); the running statistics, when given, move.
    Batch,
    /// The running statistics (evaluation mode); constants for the backward pass.
    Running,
}

/// Where the backward of a BatchNorm followed by a ReLU takes the ReLU's mask from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relu {
    /// No ReLU followed.
    None,
    /// The ReLU's output at this address (`y > 0`); needed when a residual was added.
    Output(u64),
    /// Recomputed from the input, `BN(x) > 0` by the forward's own expression, which saves
    /// reading the output (a BatchNorm without a residual).
    Recompute,
}

impl Relu {
    /// The same mask for a range starting `bytes` further.
    pub fn offset(self, bytes: u64) -> Self {
        match self {
            Relu::Output(y) => Relu::Output(y + bytes),
            other => other,
        }
    }
    /// The address of the ReLU's output that masks the gradient, 0 when none is read.
    pub fn output(self) -> u64 {
        match self {
            Relu::Output(y) => y,
            Relu::None | Relu::Recompute => 0,
        }
    }
}

/// A scratch buffer for the grid `(c, shares)` partial sums of one reduction (two f64 each).
fn partial_sums<R: Runner>(run: &R, r: &BnRange) -> Result<R::Buf> {
    run.alloc(r.c * r.shares() * 2 * std::mem::size_of::<f64>())
}

/// `y = [relu](BN(x) + residual)` of one range, with the statistics used written to
/// `mean`/`inv_std` (f32 `[c]`, kept for the backward) and, in [`Stats::Batch`] mode when
/// `running` is not `(0, 0)`, the running statistics moved in place (PyTorch's rule: the
/// unbiased variance, weight `momentum`). `residual` 0 means none. `w`, `b` are f32 `[c]`.
#[allow(clippy::too_many_arguments)]
pub fn bn_forward<R: Runner>(
    run: &R,
    dtype: DType,
    r: BnRange,
    (x, residual, y): (u64, u64, u64),
    (w, b): (u64, u64),
    running: (u64, u64),
    (eps, momentum): (f64, f64),
    relu: bool,
    stats: Stats,
    (mean, inv_std): (u64, u64),
) -> Result<()> {
    let r = r.aligned_for(dtype, &[x, residual, y]);
    let (c, hw) = (r.c as i32, r.hw as i32);
    let eps32 = eps as f32;
    if stats == Stats::Running {
        if running.0 == 0 || running.1 == 0 {
            bail!("BatchNorm in evaluation mode needs running statistics")
        }
        run.launch(
            Module::Bn,
            "bn_eval_stats",
            r.per_channel(),
            &[
                Arg::I32(c),
                Arg::F32(eps32),
                Arg::Ptr(running.0),
                Arg::Ptr(running.1),
                Arg::Ptr(mean),
                Arg::Ptr(inv_std),
            ],
        )?;
    } else {
        r.check()?;
        let mut partial = partial_sums(run, &r)?;
        let pp = run.addr(&mut partial);
        let [e0, e1, e2] = r.extent();
        run.launch(
            Module::Bn,
            r.variant(BnKernel::Stats, dtype)?,
            r.reduction(),
            &[Arg::Ptr(x), e0, e1, e2, Arg::Ptr(pp)],
        )?;
        run.launch(
            Module::Bn,
            "bn_stats_finish",
            r.finish(),
            &[
                Arg::Ptr(pp),
                Arg::I32(c),
                Arg::I32(r.shares() as i32),
                Arg::F64(r.count() as f64),
                Arg::F32(eps32),
                Arg::F32(momentum as f32),
                Arg::Ptr(running.0),
                Arg::Ptr(running.1),
                Arg::Ptr(mean),
                Arg::Ptr(inv_std),
            ],
        )?;
    }
    run.launch(
        Module::Bn,
        r.variant(BnKernel::Apply, dtype)?,
        r.elementwise(),
        &[
            Arg::Ptr(x),
            Arg::Ptr(residual),
            Arg::Ptr(y),
            Arg::Ptr(mean),
            Arg::Ptr(inv_std),
            Arg::Ptr(w),
            Arg::Ptr(b),
            Arg::I64(r.total() as i64),
            Arg::I32(c),
            Arg::I32(hw),
            Arg::I32(relu as i32),
        ],
    )
}

/// The backward of [`bn_forward`] for one range (`stats` as there): `dx` from `x`, the output
/// gradient `dy` (taken through the ReLU as `relu` says) and the saved statistics; the
/// parameter gradients are written to `dw`/`db` (added when `accumulate`), and the gradient
/// at the sum (the residual's) to `dres` unless it is 0. `w`, `b` are the forward's.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward<R: Runner>(
    run: &R,
    dtype: DType,
    r: BnRange,
    (x, dy, relu): (u64, u64, Relu),
    (mean, inv_std): (u64, u64),
    (w, b, dw, db): (u64, u64, u64, u64),
    accumulate: bool,
    stats: Stats,
    (dx, dres): (u64, u64),
) -> Result<()> {
    let y = relu.output();
    let r = r.aligned_for(dtype, &[x, dy, y, dx, dres]);
    let (y, from_x) = (Arg::Ptr(y), Arg::I32((relu == Relu::Recompute) as i32));
    let mut partial = partial_sums(run, &r)?;
    let mut coef = run.alloc(2 * r.c * std::mem::size_of::<f32>())?;
    let (pp, pc) = (run.addr(&mut partial), run.addr(&mut coef));
    let (c, hw) = (r.c as i32, r.hw as i32);
    let [e0, e1, e2] = r.extent();
    run.launch(
        Module::Bn,
        r.variant(BnKernel::GradStats, dtype)?,
        r.reduction(),
        &[
            Arg::Ptr(x),
            Arg::Ptr(dy),
            y,
            Arg::Ptr(mean),
            Arg::Ptr(inv_std),
            Arg::Ptr(w),
            Arg::Ptr(b),
            from_x,
            e0,
            e1,
            e2,
            Arg::Ptr(pp),
        ],
    )?;
    run.launch(
        Module::Bn,
        "bn_grad_finish",
        r.finish(),
        &[
            Arg::Ptr(pp),
            Arg::I32(c),
            Arg::I32(r.shares() as i32),
            Arg::F64(r.count() as f64),
            Arg::I32(accumulate as i32),
            Arg::I32((stats == Stats::Running) as i32),
            Arg::Ptr(dw),
            Arg::Ptr(db),
            Arg::Ptr(pc),
        ],
    )?;
    run.launch(
        Module::Bn,
        r.variant(BnKernel::GradApply, dtype)?,
        r.elementwise(),
        &[
            Arg::Ptr(x),
            Arg::Ptr(dy),
            y,
            Arg::Ptr(mean),
            Arg::Ptr(inv_std),
            Arg::Ptr(w),
            Arg::Ptr(b),
            from_x,
            Arg::Ptr(pc),
            Arg::Ptr(dx),
            Arg::Ptr(dres),
            Arg::I64(r.total() as i64),
            Arg::I32(c),
            Arg::I32(hw),
        ],
    )
}

/// PyTorch's SGD step on `n` f32 values in place, in one pass (`kernels/src/sgd.cu`): `d = g + λ·p`;
/// with momentum μ, `buf ← μ·buf + d` (`buf ← d` when `fresh`) and `d = buf`; then
/// `p ← p − lr·d`. `buf` is 0 without momentum.
pub fn sgd_step<R: Runner>(
    run: &R,
    (p, g, buf): (u64, u64, u64),
    n: usize,
    (lr, momentum, weight_decay): (f64, f64, f64),
    fresh: bool,
) -> Result<()> {
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 4096) as u32;
    run.launch(
        Module::Sgd,
        "sgd_step",
        launch_of((blocks, 1), THREADS),
        &[
            Arg::Ptr(p),
            Arg::Ptr(g),
            Arg::Ptr(buf),
            Arg::I64(n as i64),
            Arg::F32(lr as f32),
            Arg::F32(momentum as f32),
            Arg::F32(weight_decay as f32),
            Arg::I32(fresh as i32),
        ],
    )
}

/// One tensor of [`sgd_steps`]: parameter, gradient and momentum buffer (0 for none)
/// addresses, and its number of values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgdTensor {
    pub p: u64,
    pub g: u64,
    pub buf: u64,
    pub n: usize,
}

/// [`sgd_step`] on many tensors, eight per launch (`sgd_step8`).
pub fn sgd_steps<R: Runner>(
    run: &R,
    tensors: &[SgdTensor],
    (lr, momentum, weight_decay): (f64, f64, f64),
    fresh: bool,
) -> Result<()> {
    for group in tensors.chunks(8) {
        let most = group.iter().map(|t| t.n).max().unwrap_or(0);
        let blocks = most.div_ceil(THREADS as usize).clamp(1, 4096) as u32;
        let mut args = Vec::with_capacity(36);
        for i in 0..8 {
            let t = group.get(i).copied().unwrap_or(SgdTensor {
                p: 0,
                g: 0,
                buf: 0,
                n: 0,
            });
            args.extend([
                Arg::Ptr(t.p),
                Arg::Ptr(t.g),
                Arg::Ptr(t.buf),
                Arg::I64(t.n as i64),
            ]);
        }
        args.extend([
            Arg::F32(lr as f32),
            Arg::F32(momentum as f32),
            Arg::F32(weight_decay as f32),
            Arg::I32(fresh as i32),
        ]);
        run.launch(
            Module::Sgd,
            "sgd_step8",
            launch_of((blocks, group.len() as u32), THREADS),
            &args,
        )?;
    }
    Ok(())
}

/// Global average pooling of `x` `[b, c, hw]` read at `b·sb + c·sc + i·shw` (elements) into
/// the contiguous f32 `y` `[b, c]`.
pub fn avg_pool_forward<R: Runner>(
    run: &R,
    dtype: DType,
    (x, y): (u64, u64),
    (b, c, hw): (usize, usize, usize),
    (sb, sc, shw): (usize, usize, usize),
) -> Result<()> {
    let name = dtype_variant(
        dtype,
        ("avg_pool_fwd_f32", "avg_pool_fwd_bf16"),
        "average-pooling",
    )?;
    run.launch(
        Module::Pool,
        name,
        launch_of(
            ((b * c).div_ceil(THREADS as usize).max(1) as u32, 1),
            THREADS,
        ),
        &[
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::I32(b as i32),
            Arg::I32(c as i32),
            Arg::I32(hw as i32),
            Arg::I64(sb as i64),
            Arg::I64(sc as i64),
            Arg::I64(shw as i64),
        ],
    )
}

/// The backward of [`avg_pool_forward`]: `dx` contiguous `[b·c, hw]` in `dtype`, each value
/// its row's f32 `dy` over `hw`.
pub fn avg_pool_backward<R: Runner>(
    run: &R,
    dtype: DType,
    (dy, dx): (u64, u64),
    (rows, hw): (usize, usize),
) -> Result<()> {
    let name = dtype_variant(
        dtype,
        ("avg_pool_bwd_f32", "avg_pool_bwd_bf16"),
        "average-pooling",
    )?;
    run.launch(
        Module::Pool,
        name,
        launch_of((stride_blocks(rows * hw), 1), THREADS),
        &[
            Arg::Ptr(dy),
            Arg::Ptr(dx),
            Arg::I64((rows * hw) as i64),
            Arg::I32(hw as i32),
        ],
    )
}

/// The output side of the stem's 3×3 / stride 2 / padding 1 max-pooling.
pub fn pool_out(side: usize) -> usize {
    (side - 1) / 2 + 1
}

/// The f32 or bf16 variant of a kernel (`names`, in that order) for `dtype`; `kernels` says
/// which kernels in the error for any other dtype.
fn dtype_variant(
    dtype: DType,
    (f32_name, bf16_name): (&'static str, &'static str),
    kernels: &str,
) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => f32_name,
        DType::BF16 => bf16_name,
        other => bail!("our {kernels} kernels take f32 or bf16, not {other:?}"),
    })
}

fn pool_kernel(dtype: DType, pass: &str) -> Result<&'static str> {
    let names = match pass {
        "fwd" => ("max_pool_fwd_f32", "max_pool_fwd_bf16"),
        "bwd" => ("max_pool_bwd_f32", "max_pool_bwd_bf16"),
        other => bail!("max-pooling has passes fwd and bwd, not {other}"),
    };
    dtype_variant(dtype, names, "max-pooling")
}

/// One launch over `count` threads of a max-pooling kernel on `planes` planes of `h × w`.
fn pool_launch<R: Runner>(
    run: &R,
    name: &'static str,
    (a, b, c): (u64, u64, u64),
    planes: usize,
    (h, w): (usize, usize),
    count: usize,
) -> Result<()> {
    let blocks = count.div_ceil(THREADS as usize) as u32;
    run.launch(
        Module::Pool,
        name,
        launch_of((blocks, 1), THREADS),
        &[
            Arg::Ptr(a),
            Arg::Ptr(b),
            Arg::Ptr(c),
            Arg::I64(planes as i64),
            Arg::I32(h as i32),
            Arg::I32(w as i32),
            Arg::I32(pool_out(h) as i32),
            Arg::I32(pool_out(w) as i32),
        ],
    )
}

/// Max-pooling (3×3, stride 2, padding 1) of `planes` contiguous `h × w` planes at `x` into
/// `y`, with the winning window position of each output (one byte, 0–8 in row-major window
/// order) at `arg`.
pub fn max_pool_forward<R: Runner>(
    run: &R,
    dtype: DType,
    (x, y, arg): (u64, u64, u64),
    planes: usize,
    (h, w): (usize, usize),
) -> Result<()> {
    let name = pool_kernel(dtype, "fwd")?;
    let count = planes * pool_out(h) * pool_out(w);
    pool_launch(run, name, (x, y, arg), planes, (h, w), count)
}

/// The backward of [`max_pool_forward`]: `dx` (the input's shape) from the output gradient
/// `dy` and the recorded winners `arg`.
pub fn max_pool_backward<R: Runner>(
    run: &R,
    dtype: DType,
    (dy, arg, dx): (u64, u64, u64),
    planes: usize,
    (h, w): (usize, usize),
) -> Result<()> {
    let name = pool_kernel(dtype, "bwd")?;
    pool_launch(run, name, (dy, arg, dx), planes, (h, w), planes * h * w)
}

/// One grid of pairs for [`pair_grid_forward`] and [`pair_grid_backward`]: `rows × cols` pairs
/// of the images at `qr` (`rows` of them) with those at `qc` (`cols`), output row
/// `r·cols + c`. `qr`, `qc` are addresses of `[images, 2h]` projections (see `kernels/src/head.cu`);
/// `out` (forward) is where the grid's `[rows·cols, h]` output starts, `g` (backward) its
/// gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairGrid {
    pub qr: u64,
    pub qc: u64,
    pub out: u64,
    pub rows: usize,
    pub cols: usize,
}

fn head_kernel(
    dtype: DType,
    f32_name: &'static str,
    bf16_name: &'static str,
) -> Result<&'static str> {
    dtype_variant(dtype, (f32_name, bf16_name), "SimNet head's")
}

/// Blocks for a grid-stride loop over `total` items, at most 65,535·4.
fn stride_blocks(total: usize) -> u32 {
    total.div_ceil(THREADS as usize).clamp(1, 65_535 * 4) as u32
}

/// The first Linear's output on each grid of pairs:
/// `out[r·cols + c, k] = qr[r, 2k + row_slot] + (qc[c, 2k + col_slot] + bias[k])` (`bias` f32,
/// 0 for none). 16-byte loads of q (the `v`
/// kernels, `8 / size` units per thread) where `h` and every address allow them.
pub fn pair_grid_forward<R: Runner>(
    run: &R,
    dtype: DType,
    grids: &[PairGrid],
    bias: u64,
    h: usize,
    (row_slot, col_slot): (usize, usize),
) -> Result<()> {
    if row_slot > 1 || col_slot > 1 {
        bail!("pair grid slots are 0 or 1, got {row_slot} and {col_slot}")
    }
    let elt = dtype.size_in_bytes();
    let per_load = 8 / elt.max(1);
    for g in grids {
        if g.rows == 0 || g.cols == 0 {
            continue;
        }
        let wide = h % per_load == 0
            && g.qr % 16 == 0
            && g.qc % 16 == 0
            && g.out % (per_load * elt) as u64 == 0;
        let (name, vec) = if wide {
            (
                head_kernel(dtype, "pair_grid_f32v", "pair_grid_bf16v")?,
                per_load,
            )
        } else {
            (head_kernel(dtype, "pair_grid_f32", "pair_grid_bf16")?, 1)
        };
        run.launch(
            Module::Head,
            name,
            launch_of((stride_blocks(g.rows * g.cols * h / vec), 1), THREADS),
            &[
                Arg::Ptr(g.qr),
                Arg::Ptr(g.qc),
                Arg::Ptr(bias),
                Arg::Ptr(g.out),
                Arg::I32(h as i32),
                Arg::I32(g.rows as i32),
                Arg::I32(g.cols as i32),
                Arg::I32(row_slot as i32),
                Arg::I32(col_slot as i32),
            ],
        )?;
    }
    Ok(())
}

/// The backward of [`pair_grid_forward`]: adds each grid's row sums of its gradient `g` (at
/// the grid's `out`) into slot `row_slot` of the f32 `dq` rows at the grid's `qr`, and its
/// column sums into slot `col_slot` of those at `qc`. `dq` must start zeroed; grids run one
/// after another, so images shared between grids sum deterministically.
pub fn pair_grid_backward<R: Runner>(
    run: &R,
    dtype: DType,
    grids: &[PairGrid],
    h: usize,
    (row_slot, col_slot): (usize, usize),
) -> Result<()> {
    let rows_k = head_kernel(dtype, "pair_grid_rows_f32", "pair_grid_rows_bf16")?;
    let cols_k = head_kernel(dtype, "pair_grid_cols_f32", "pair_grid_cols_bf16")?;
    for g in grids {
        if g.rows == 0 || g.cols == 0 {
            continue;
        }
        for (name, dq, slot, images) in [
            (rows_k, g.qr, row_slot, g.rows),
            (cols_k, g.qc, col_slot, g.cols),
        ] {
            run.launch(
                Module::Head,
                name,
                launch_of((stride_blocks(images * h), 1), THREADS),
                &[
                    Arg::Ptr(g.out),
                    Arg::Ptr(dq),
                    Arg::I32(h as i32),
                    Arg::I32(g.rows as i32),
                    Arg::I32(g.cols as i32),
                    Arg::I32(slot as i32),
                ],
            )?;
        }
    }
    Ok(())
}

/// `y = relu(LayerNorm(x)·w + b)` over the last dimension of `n` contiguous rows of `h`
/// values at `x`, keeping each row's mean and rstd (f32, `n` each) for the backward.
pub fn layer_norm_relu_forward<R: Runner>(
    run: &R,
    dtype: DType,
    (x, w, b, y): (u64, u64, u64, u64),
    (mean, rstd): (u64, u64),
    (n, h): (usize, usize),
    eps: f64,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    run.launch(
        Module::Head,
        head_kernel(dtype, "ln_relu_fwd_f32", "ln_relu_fwd_bf16")?,
        launch_of((n as u32, 1), THREADS),
        &[
            Arg::Ptr(x),
            Arg::Ptr(w),
            Arg::Ptr(b),
            Arg::Ptr(y),
            Arg::Ptr(mean),
            Arg::Ptr(rstd),
            Arg::I32(h as i32),
            Arg::F32(eps as f32),
        ],
    )
}

/// Rows per share of the column sums (the LayerNorm's parameters, a bias).
const LN_ROWS_PER_SHARE: usize = 64;

/// The backward of [`layer_norm_relu_forward`] from its input `x`, output `y` and output
/// gradient `dy`: `dx` (x's dtype) and the f32 gradients `dw`, `db` of the parameters.
pub fn layer_norm_relu_backward<R: Runner>(
    run: &R,
    dtype: DType,
    (x, y, dy, w): (u64, u64, u64, u64),
    (mean, rstd): (u64, u64),
    (dx, dw, db): (u64, u64, u64),
    (n, h): (usize, usize),
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    run.launch(
        Module::Head,
        head_kernel(dtype, "ln_relu_bwd_f32", "ln_relu_bwd_bf16")?,
        launch_of((n as u32, 1), THREADS),
        &[
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::Ptr(dy),
            Arg::Ptr(w),
            Arg::Ptr(mean),
            Arg::Ptr(rstd),
            Arg::Ptr(dx),
            Arg::I32(h as i32),
        ],
    )?;
    let shares = n.div_ceil(LN_ROWS_PER_SHARE).min(65_535);
    let mut partial = run.alloc(shares * 2 * h * 4)?;
    let pp = run.addr(&mut partial);
    let columns = h.div_ceil(THREADS as usize) as u32;
    run.launch(
        Module::Head,
        head_kernel(dtype, "ln_param_grad_f32", "ln_param_grad_bf16")?,
        launch_of((columns, shares as u32), THREADS),
        &[
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::Ptr(dy),
            Arg::Ptr(mean),
            Arg::Ptr(rstd),
            Arg::Ptr(pp),
            Arg::I32(n as i32),
            Arg::I32(h as i32),
        ],
    )?;
    run.launch(
        Module::Head,
        "ln_param_finish",
        launch_of((columns, 1), THREADS),
        &[
            Arg::Ptr(pp),
            Arg::Ptr(dw),
            Arg::Ptr(db),
            Arg::I32(shares as i32),
            Arg::I32(h as i32),
        ],
    )
}

/// `y = x + b` over `n` contiguous rows of `h` values (`b` f32): four values per access where
/// `h` and the addresses allow it.
pub fn add_bias_forward<R: Runner>(
    run: &R,
    dtype: DType,
    (x, b, y): (u64, u64, u64),
    (n, h): (usize, usize),
) -> Result<()> {
    if n * h == 0 {
        return Ok(());
    }
    let bytes = 4 * dtype.size_in_bytes() as u64;
    let wide = h % 4 == 0 && x % bytes == 0 && y % bytes == 0;
    let (name, vec) = if wide {
        (head_kernel(dtype, "add_bias_f32x4", "add_bias_bf16x4")?, 4)
    } else {
        (head_kernel(dtype, "add_bias_f32", "add_bias_bf16")?, 1)
    };
    run.launch(
        Module::Head,
        name,
        launch_of((stride_blocks(n * h / vec), 1), THREADS),
        &[
            Arg::Ptr(x),
            Arg::Ptr(b),
            Arg::Ptr(y),
            Arg::I64(n as i64),
            Arg::I32(h as i32),
        ],
    )
}

/// The bias's gradient: `db[k] = Σ_r g[r, k]` (f32) over `n` contiguous rows of `h`.
pub fn add_bias_backward<R: Runner>(
    run: &R,
    dtype: DType,
    (g, db): (u64, u64),
    (n, h): (usize, usize),
) -> Result<()> {
    if h == 0 {
        return Ok(());
    }
    let shares = n.div_ceil(LN_ROWS_PER_SHARE).clamp(1, 65_535);
    let mut partial = run.alloc(shares * h * 4)?;
    let pp = run.addr(&mut partial);
    let columns = h.div_ceil(THREADS as usize) as u32;
    run.launch(
        Module::Head,
        head_kernel(dtype, "col_sum_f32", "col_sum_bf16")?,
        launch_of((columns, shares as u32), THREADS),
        &[
            Arg::Ptr(g),
            Arg::Ptr(pp),
            Arg::I32(n as i32),
            Arg::I32(h as i32),
        ],
    )?;
    run.launch(
        Module::Head,
        "col_sum_finish",
        launch_of((columns, 1), THREADS),
        &[
            Arg::Ptr(pp),
            Arg::Ptr(db),
            Arg::I32(shares as i32),
            Arg::I32(h as i32),
        ],
    )
}

/// The mean cross-entropy of `n` rows of `c` f32 logits with u32 targets, into the f32 scalar
/// `loss`: one block.
pub fn cross_entropy_forward<R: Runner>(
    run: &R,
    (logits, target, loss): (u64, u64, u64),
    (n, c): (usize, usize),
) -> Result<()> {
    if n == 0 || c == 0 {
        bail!("cross-entropy of {n} rows of {c} classes")
    }
    run.launch(
        Module::Head,
        "cross_entropy_fwd",
        launch_of((1, 1), 1024),
        &[
            Arg::Ptr(logits),
            Arg::Ptr(target),
            Arg::Ptr(loss),
            Arg::I32(n as i32),
            Arg::I32(c as i32),
        ],
    )
}

/// The backward of [`cross_entropy_forward`] for the loss's gradient at `g` (an f32 scalar on
/// the device): `dlogits` `[n, c]` f32.
pub fn cross_entropy_backward<R: Runner>(
    run: &R,
    (logits, target, g, dlogits): (u64, u64, u64, u64),
    (n, c): (usize, usize),
) -> Result<()> {
    run.launch(
        Module::Head,
        "cross_entropy_bwd",
        launch_of((n.div_ceil(THREADS as usize).max(1) as u32, 1), THREADS),
        &[
            Arg::Ptr(logits),
            Arg::Ptr(target),
            Arg::Ptr(g),
            Arg::Ptr(dlogits),
            Arg::I32(n as i32),
            Arg::I32(c as i32),
        ],
    )
}

/// `y = xᵀ` for a contiguous `x` `[rows, cols]` in `from`, written contiguous `[cols, rows]`
/// in `to` (f32 or bf16 each).
pub fn transpose<R: Runner>(
    run: &R,
    (from, to): (DType, DType),
    (x, y): (u64, u64),
    (rows, cols): (usize, usize),
) -> Result<()> {
    let name = match (from, to) {
        (DType::F32, DType::F32) => "transpose_f32_f32",
        (DType::F32, DType::BF16) => "transpose_f32_bf16",
        (DType::BF16, DType::F32) => "transpose_bf16_f32",
        (DType::BF16, DType::BF16) => "transpose_bf16_bf16",
        other => bail!("our transpose kernels take f32 and bf16, not {other:?}"),
    };
    if rows * cols == 0 {
        return Ok(());
    }
    if rows.div_ceil(32) > 65_535 {
        bail!("transpose of {rows} rows: more than 65,535 tiles of 32")
    }
    run.launch(
        Module::Head,
        name,
        launch_of(
            (cols.div_ceil(32) as u32, rows.div_ceil(32) as u32),
            THREADS,
        ),
        &[
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::I32(rows as i32),
            Arg::I32(cols as i32),
        ],
    )
}
