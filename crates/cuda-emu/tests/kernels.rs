//! Our CUDA kernels, launched by the host code the GPU runs (`simtrans_ops::launch`), on the
//! CPU emulator, against references computed here in f64: BatchNorm forward and backward
//! (batch and running statistics, with and without ReLU and residual, the ReLU's mask read or
//! recomputed, both layouts and vector widths, f32 and bf16), the stem's max-pooling with its
//! ties and NaN, and the SGD update bit for bit against the CPU optimiser.

use candle_core::{DType, Device, Tensor, Var};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use simtrans_cuda_emu::Emu;
use simtrans_ops::launch::{self, BnRange, Relu, Stats};

type R = anyhow::Result<()>;

fn randn(rng: &mut ChaCha8Rng, n: usize, scale: f64, shift: f64) -> Vec<f64> {
    (0..n)
        .map(|_| shift + scale * (rng.random::<f64>() * 2.0 - 1.0))
        .collect()
}

/// Data in one of the kernels' dtypes: the values as the kernel sees them (rounded) and a way
/// to upload and read back.
#[derive(Clone, Copy, Debug)]
enum Ty {
    F32,
    Bf16,
}

impl Ty {
    fn dtype(self) -> DType {
        match self {
            Ty::F32 => DType::F32,
            Ty::Bf16 => DType::BF16,
        }
    }
    fn round(self, v: &[f64]) -> Vec<f64> {
        match self {
            Ty::F32 => v.iter().map(|&x| x as f32 as f64).collect(),
            Ty::Bf16 => v.iter().map(|&x| bf16::from_f64(x).to_f64()).collect(),
        }
    }
    fn upload(self, emu: &Emu, v: &[f64]) -> u64 {
        match self {
            Ty::F32 => emu.upload(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()),
            Ty::Bf16 => emu.upload(&v.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>()),
        }
    }
    fn alloc(self, emu: &Emu, n: usize) -> u64 {
        match self {
            Ty::F32 => emu.alloc_of::<f32>(n),
            Ty::Bf16 => emu.alloc_of::<bf16>(n),
        }
    }
    fn download(self, emu: &Emu, at: u64, n: usize) -> anyhow::Result<Vec<f64>> {
        Ok(match self {
            Ty::F32 => emu
                .download::<f32>(at, n)?
                .iter()
                .map(|&x| x as f64)
                .collect(),
            Ty::Bf16 => emu
                .download::<bf16>(at, n)?
                .iter()
                .map(|x| x.to_f64())
                .collect(),
        })
    }
    /// The relative error the issue allows (of the largest magnitude): 1e-5 in f32, 1e-2 in
    /// bf16 (whose outputs round to 8 bits).
    fn tol(self) -> f64 {
        match self {
            Ty::F32 => 1e-5,
            Ty::Bf16 => 1e-2,
        }
    }
}

fn f32s(emu: &Emu, v: &[f64]) -> u64 {
    emu.upload(&v.iter().map(|&x| x as f32).collect::<Vec<_>>())
}

fn read_f32(emu: &Emu, at: u64, n: usize) -> anyhow::Result<Vec<f64>> {
    Ok(emu
        .download::<f32>(at, n)?
        .iter()
        .map(|&x| x as f64)
        .collect())
}

/// Max |got − want| over max |want| (at least 1e-3 in the denominator).
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs()));
    if got.iter().any(|v| v.is_nan()) {
        f64::INFINITY
    } else {
        diff / scale
    }
}

fn check(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// One BatchNorm case: a range of n rows × c channels × hw values.
#[derive(Clone, Copy, Debug)]
struct Case {
    r: BnRange,
    ty: Ty,
    relu: bool,
    residual: bool,
    /// The backward recomputes the ReLU's mask from x instead of reading y.
    recompute: bool,
    stats: Stats,
}

/// The channel of value `i` of a range.
fn channel(r: BnRange, i: usize) -> usize {
    if r.channels_last {
        i % r.c
    } else {
        (i / r.hw) % r.c
    }
}

/// The per-channel mean and biased variance of x.
fn moments(x: &[f64], r: BnRange) -> (Vec<f64>, Vec<f64>) {
    let cnt = r.count() as f64;
    let mut mean = vec![0.0; r.c];
    let mut var = vec![0.0; r.c];
    for (i, v) in x.iter().enumerate() {
        mean[channel(r, i)] += v / cnt;
    }
    for (i, v) in x.iter().enumerate() {
        let c = channel(r, i);
        var[c] += (v - mean[c]).powi(2) / cnt;
    }
    (mean, var)
}

/// Runs forward and backward of a case on the emulator and checks every output.
fn bn_case(seed: u64, case: Case) -> R {
    let Case {
        r,
        ty,
        relu,
        residual,
        recompute,
        stats,
    } = case;
    let what = format!("{case:?}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (n, c) = (r.total(), r.c);
    let (eps, momentum) = (1e-5, 0.1);
    // Inputs well off zero mean, as activations are: the variance must not cancel.
    let x = ty.round(&randn(&mut rng, n, 2.0, 3.0));
    let res = ty.round(&randn(&mut rng, n, 1.0, 0.0));
    let dy = ty.round(&randn(&mut rng, n, 1.0, 0.0));
    let w = randn(&mut rng, c, 0.5, 1.0);
    let b = randn(&mut rng, c, 0.5, 0.0);
    let rm = randn(&mut rng, c, 1.0, 2.0);
    let rv = randn(&mut rng, c, 0.5, 3.0);
    let round32 = |v: &[f64]| v.iter().map(|&x| x as f32 as f64).collect::<Vec<_>>();
    let (w, b, rm, rv) = (round32(&w), round32(&b), round32(&rm), round32(&rv));

    let emu = Emu::new();
    let (px, pdy) = (ty.upload(&emu, &x), ty.upload(&emu, &dy));
    let pres = if residual { ty.upload(&emu, &res) } else { 0 };
    let (py, pdx) = (ty.alloc(&emu, n), ty.alloc(&emu, n));
    let pdres = if residual { ty.alloc(&emu, n) } else { 0 };
    let (pw, pb) = (f32s(&emu, &w), f32s(&emu, &b));
    let (prm, prv) = (f32s(&emu, &rm), f32s(&emu, &rv));
    let (pmean, pinv) = (emu.alloc_of::<f32>(c), emu.alloc_of::<f32>(c));
    // Parameter gradients accumulate onto what is there.
    let (dw0, db0) = (randn(&mut rng, c, 1.0, 0.0), randn(&mut rng, c, 1.0, 0.0));
    let (dw0, db0) = (round32(&dw0), round32(&db0));
    let (pdw, pdb) = (f32s(&emu, &dw0), f32s(&emu, &db0));
    launch::bn_forward(
        &emu,
        ty.dtype(),
        r,
        (px, pres, py),
        (pw, pb),
        (prm, prv),
        (eps, momentum),
        relu,
        stats,
        (pmean, pinv),
    )?;
    // The statistics the kernels should have used, and the running statistics after.
    let (mean, inv, rm_after, rv_after) = match stats {
        Stats::Batch => {
            let (m, v) = moments(&x, r);
            let cnt = r.count() as f64;
            let inv: Vec<f64> = v.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
            let rm2 = (0..c)
                .map(|k| (1.0 - momentum) * rm[k] + momentum * m[k])
                .collect::<Vec<_>>();
            let rv2 = (0..c)
                .map(|k| (1.0 - momentum) * rv[k] + momentum * v[k] * cnt / (cnt - 1.0))
                .collect::<Vec<_>>();
            (m, inv, rm2, rv2)
        }
        Stats::Running => {
            let inv = rv.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
            (rm.clone(), inv, rm.clone(), rv.clone())
        }
    };
    check(
        &format!("{what} mean"),
        &read_f32(&emu, pmean, c)?,
        &mean,
        1e-6,
    );
    check(
        &format!("{what} inv_std"),
        &read_f32(&emu, pinv, c)?,
        &inv,
        1e-6,
    );
    check(
        &format!("{what} running mean"),
        &read_f32(&emu, prm, c)?,
        &rm_after,
        1e-6,
    );
    check(
        &format!("{what} running var"),
        &read_f32(&emu, prv, c)?,
        &rv_after,
        1e-6,
    );
    let ch = |i: usize| channel(r, i);
    let xhat: Vec<f64> = (0..n).map(|i| (x[i] - mean[ch(i)]) * inv[ch(i)]).collect();
    let y_want: Vec<f64> = (0..n)
        .map(|i| {
            let o = xhat[i] * w[ch(i)] + b[ch(i)] + if residual { res[i] } else { 0.0 };
            if relu {
                o.max(0.0)
            } else {
                o
            }
        })
        .collect();
    let y = ty.download(&emu, py, n)?;
    check(&format!("{what} y"), &y, &y_want, ty.tol());

    // Backward, through the ReLU by the output the forward wrote, or recomputing it.
    let mask = match (relu, recompute) {
        (false, _) => Relu::None,
        (true, false) => Relu::Output(py),
        (true, true) => Relu::Recompute,
    };
    launch::bn_backward(
        &emu,
        ty.dtype(),
        r,
        (px, pdy, mask),
        (pmean, pinv),
        (pw, pb, pdw, pdb),
        true,
        stats,
        (pdx, pdres),
    )?;
    let g: Vec<f64> = (0..n)
        .map(|i| {
            if relu && (y[i] <= 0.0 || y[i].is_nan()) {
                0.0
            } else {
                dy[i]
            }
        })
        .collect();
    let cnt = r.count() as f64;
    let (mut sg, mut sgx) = (vec![0.0; c], vec![0.0; c]);
    for i in 0..n {
        sg[ch(i)] += g[i];
        sgx[ch(i)] += g[i] * xhat[i];
    }
    let dx_want: Vec<f64> = (0..n)
        .map(|i| {
            let k = ch(i);
            let centred = match stats {
                Stats::Batch => g[i] - sg[k] / cnt - xhat[i] * sgx[k] / cnt,
                Stats::Running => g[i],
            };
            w[k] * inv[k] * centred
        })
        .collect();
    check(
        &format!("{what} dx"),
        &ty.download(&emu, pdx, n)?,
        &dx_want,
        ty.tol(),
    );
    let dw_want: Vec<f64> = (0..c).map(|k| dw0[k] + sgx[k]).collect();
    let db_want: Vec<f64> = (0..c).map(|k| db0[k] + sg[k]).collect();
    // Sums of up to a few thousand products: f32 storage of the result bounds the accuracy.
    check(
        &format!("{what} dw"),
        &read_f32(&emu, pdw, c)?,
        &dw_want,
        1e-5,
    );
    check(
        &format!("{what} db"),
        &read_f32(&emu, pdb, c)?,
        &db_want,
        1e-5,
    );
    if residual {
        check(
            &format!("{what} dres"),
            &ty.download(&emu, pdres, n)?,
            &g,
            ty.tol(),
        );
    }
    Ok(())
}

fn range(n: usize, c: usize, hw: usize) -> BnRange {
    BnRange::nchw(n, c, hw)
}

#[test]
fn batch_norm_matches_f64_in_every_variant() -> R {
    let ranges = [
        // 4 values per access, several shares per channel.
        range(6, 3, 36),
        // One value per access (hw % 4 != 0).
        range(3, 5, 7),
        // [B, C] (hw = 1), the SimNet head's shape: read by the channels-last kernels.
        range(10, 6, 1),
        range(9, 8, 1),
        // More groups per row than a block has threads.
        range(2, 2, 1600),
        // Channels-last: 4 channels per access, 2 columns of threads per block.
        BnRange::nhwc(6, 8, 9),
        // One channel per access (c % 4 != 0).
        BnRange::nhwc(3, 5, 7),
        // 32 columns, two blocks across the channels (the second one partly idle).
        BnRange::nhwc(2, 132, 5),
        // Many rows: several shares.
        BnRange::nhwc(4, 64, 100),
    ];
    let mut seed = 0;
    for r in ranges {
        for ty in [Ty::F32, Ty::Bf16] {
            for stats in [Stats::Batch, Stats::Running] {
                for (relu, residual, recompute) in [
                    (false, false, false),
                    (true, false, false),
                    (true, false, true),
                    (true, true, false),
                ] {
                    seed += 1;
                    bn_case(
                        seed,
                        Case {
                            r,
                            ty,
                            relu,
                            residual,
                            recompute,
                            stats,
                        },
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[test]
fn batch_norm_sums_more_shares_than_a_warp_has_lanes() -> R {
    // Channels-last with few channels and many rows: 35 shares per channel, more than the 32
    // lanes of the warp that adds them up in the finish kernels.
    let r = BnRange::nhwc(2, 32, 2200);
    assert_eq!(r.shares(), 35);
    for stats in [Stats::Batch, Stats::Running] {
        bn_case(
            99,
            Case {
                r,
                ty: Ty::F32,
                relu: true,
                residual: true,
                recompute: false,
                stats,
            },
        )?;
    }
    Ok(())
}

#[test]
fn batch_norm_reads_a_misaligned_view_one_value_at_a_time() -> R {
    // A view starting one value into its buffer: 4-value accesses would be misaligned (the GPU
    // refuses them; the emulator crashes), so every pass reads one value at a time, and the
    // result is the aligned launch's.
    let r = BnRange::nhwc(4, 8, 9);
    let n = r.total();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let x: Vec<f32> = randn(&mut rng, n + 1, 2.0, 1.0)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let emu = Emu::new();
    let (w, b) = (emu.upload(&[1.5f32; 8]), emu.upload(&[0.25f32; 8]));
    let mut outputs = vec![];
    for (data, offset) in [(&x[1..], 0u64), (&x[..], 4)] {
        let px = emu.upload(data) + offset;
        let py = emu.alloc_of::<f32>(n);
        let (m, i) = (emu.alloc_of::<f32>(8), emu.alloc_of::<f32>(8));
        launch::bn_forward(
            &emu,
            DType::F32,
            r,
            (px, 0, py),
            (w, b),
            (0, 0),
            (1e-5, 0.1),
            true,
            Stats::Batch,
            (m, i),
        )?;
        outputs.push(emu.download::<f32>(py, n)?);
    }
    let names: Vec<_> = emu.launches().iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "bn_stats_cl_f32x4",
            "bn_stats_finish",
            "bn_apply_cl_f32x4",
            "bn_stats_cl_f32",
            "bn_stats_finish",
            "bn_apply_cl_f32",
        ]
    );
    let got: Vec<f64> = outputs[1].iter().map(|&v| v as f64).collect();
    let want: Vec<f64> = outputs[0].iter().map(|&v| v as f64).collect();
    check("misaligned view", &got, &want, 1e-6);
    Ok(())
}

#[test]
fn batch_norm_launches_have_the_planned_shapes() -> R {
    // The reductions take one block per (channel, share of the rows); the elementwise passes
    // one thread per 4 values when a plane allows it.
    let r = range(6, 3, 36);
    assert_eq!(r.shares(), 6);
    assert_eq!(r.vec(), 4);
    let emu = Emu::new();
    let n = r.total();
    let x = emu.upload(&vec![1.5f32; n]);
    let y = emu.alloc_of::<f32>(n);
    let (w, b) = (emu.upload(&[1f32; 3]), emu.upload(&[0f32; 3]));
    let (m, i) = (emu.alloc_of::<f32>(3), emu.alloc_of::<f32>(3));
    launch::bn_forward(
        &emu,
        DType::F32,
        r,
        (x, 0, y),
        (w, b),
        (0, 0),
        (1e-5, 0.1),
        false,
        Stats::Batch,
        (m, i),
    )?;
    let names: Vec<_> = emu.launches().iter().map(|(n, l)| (*n, l.grid)).collect();
    assert_eq!(
        names,
        [
            ("bn_stats_f32x4", (3, 6)),
            // One warp per channel.
            ("bn_stats_finish", (1, 1)),
            ("bn_apply_f32x4", ((n / 4).div_ceil(256) as u32, 1)),
        ]
    );
    // A constant channel normalises to zero (the variance is exactly 0, not negative).
    assert!(emu.download::<f32>(y, n)?.iter().all(|&v| v == 0.0));
    // Channels-last reductions on ResNet-50's first and last layers at batch 64: blocks of
    // 16 or 32 columns of 4 channels, about 2048 blocks, at least 4 rows per thread row.
    let first = BnRange::nhwc(64, 64, 56 * 56);
    assert_eq!((first.vec(), first.reduction().grid), (4, (1, 2048)));
    let last = BnRange::nhwc(64, 2048, 7 * 7);
    assert_eq!((last.vec(), last.reduction().grid), (4, (16, 98)));
    assert_eq!(last.finish().grid, (256, 1));
    assert_eq!(
        last.variant(launch::BnKernel::GradStats, DType::BF16)?,
        "bn_grad_stats_cl_bf16x4"
    );
    // [B, C] tensors are the same memory either way, and go to the channels-last kernels.
    let head = range(5000, 4096, 1);
    assert!(head.channels_last);
    assert_eq!(
        head.variant(launch::BnKernel::Stats, DType::F32)?,
        "bn_stats_cl_f32x4"
    );
    Ok(())
}

#[test]
fn batch_norm_refuses_a_single_value_per_channel() {
    let emu = Emu::new();
    let x = emu.upload(&[1f32, 2.0]);
    let err = launch::bn_forward(
        &emu,
        DType::F32,
        range(1, 2, 1),
        (x, 0, x),
        (x, x),
        (0, 0),
        (1e-5, 0.1),
        false,
        Stats::Batch,
        (x, x),
    )
    .unwrap_err();
    assert!(err.to_string().contains("more than one value"), "{err}");
    assert!(emu.launches().is_empty());
}

/// PyTorch's 3×3 / stride 2 / padding 1 max-pooling of one plane, with the winning window
/// position: the first maximum in row-major order, and a NaN wins.
fn pool_ref(x: &[f64], h: usize, w: usize) -> (Vec<f64>, Vec<usize>) {
    let (oh, ow) = (launch::pool_out(h), launch::pool_out(w));
    let mut y = Vec::new();
    let mut arg = Vec::new();
    for oy in 0..oh {
        for ox in 0..ow {
            let mut best: Option<(f64, usize)> = None;
            for ky in 0..3 {
                for kx in 0..3 {
                    let (iy, ix) = ((2 * oy + ky) as isize - 1, (2 * ox + kx) as isize - 1);
                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                        continue;
                    }
                    let v = x[iy as usize * w + ix as usize];
                    let better = match best {
                        None => true,
                        Some((b, _)) => v > b || (v.is_nan() && !b.is_nan()),
                    };
                    if better {
                        best = Some((v, ky * 3 + kx));
                    }
                }
            }
            let (v, k) = best.expect("every window holds an input");
            y.push(v);
            arg.push(k);
        }
    }
    (y, arg)
}

#[test]
fn max_pool_matches_the_reference_with_ties_and_nan() -> R {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for ty in [Ty::F32, Ty::Bf16] {
        for (h, w) in [(7, 9), (8, 8), (1, 3)] {
            let planes = 3;
            let per = h * w;
            // Few distinct values, so ties are common; one NaN in the first plane.
            let mut x: Vec<f64> = (0..planes * per)
                .map(|_| rng.random_range(-2i32..3) as f64)
                .collect();
            x[per / 2] = f64::NAN;
            let x = ty.round(&x);
            let (oh, ow) = (launch::pool_out(h), launch::pool_out(w));
            let outs = planes * oh * ow;
            let emu = Emu::new();
            let px = ty.upload(&emu, &x);
            let py = ty.alloc(&emu, outs);
            let parg = emu.alloc_of::<u8>(outs);
            launch::max_pool_forward(&emu, ty.dtype(), (px, py, parg), planes, (h, w))?;
            let y = ty.download(&emu, py, outs)?;
            let arg = emu.download::<u8>(parg, outs)?;
            let dy = ty.round(&randn(&mut rng, outs, 1.0, 0.0));
            let mut dx_want = vec![0.0; planes * per];
            for p in 0..planes {
                let (yr, ar) = pool_ref(&x[p * per..(p + 1) * per], h, w);
                for k in 0..oh * ow {
                    let o = p * oh * ow + k;
                    let same = y[o] == yr[k] || (y[o].is_nan() && yr[k].is_nan());
                    assert!(
                        same,
                        "{ty:?} {h}x{w}: output {o} is {}, want {}",
                        y[o], yr[k]
                    );
                    assert_eq!(
                        arg[o] as usize, ar[k],
                        "{ty:?} {h}x{w}: winner of output {o}"
                    );
                    let (oy, ox) = (k / ow, k % ow);
                    let (iy, ix) = (2 * oy + ar[k] / 3 - 1, 2 * ox + ar[k] % 3 - 1);
                    dx_want[p * per + iy * w + ix] += dy[o];
                }
            }
            let (pdy, pdx) = (ty.upload(&emu, &dy), ty.alloc(&emu, planes * per));
            launch::max_pool_backward(&emu, ty.dtype(), (pdy, parg, pdx), planes, (h, w))?;
            let dx = ty.download(&emu, pdx, planes * per)?;
            check(
                &format!("{ty:?} {h}x{w} dx"),
                &dx,
                &ty.round(&dx_want),
                ty.tol(),
            );
        }
    }
    Ok(())
}

#[test]
fn sgd_step_is_bit_identical_to_the_cpu_optimiser() -> R {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 1000;
    let p0: Vec<f32> = randn(&mut rng, n, 1.0, 0.0)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let c: Vec<f32> = randn(&mut rng, n, 1.0, 0.0)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let (lr, mu, wd) = (0.05, 0.9, 5e-4);
    // The CPU optimiser, three steps of loss = Σ p·c (gradient c).
    let var = Var::new(p0.as_slice(), &Device::Cpu)?;
    let ct = Tensor::new(c.as_slice(), &Device::Cpu)?;
    let mut opt = simtrans_ops::optim::Sgd::new(vec![("p".into(), var.clone())], lr, mu, wd);
    // The same on the emulator: the first step makes the momentum buffer.
    let emu = Emu::new();
    let (pp, pg, pbuf) = (emu.upload(&p0), emu.upload(&c), emu.alloc_of::<f32>(n));
    for step in 0..3 {
        let loss = (var.as_tensor() * &ct)?.sum_all()?;
        opt.step(&loss.backward()?)?;
        launch::sgd_step(&emu, (pp, pg, pbuf), n, (lr, mu, wd), step == 0)?;
        let want = var.as_tensor().to_vec1::<f32>()?;
        let got = emu.download::<f32>(pp, n)?;
        let differ = (0..n)
            .filter(|&i| got[i].to_bits() != want[i].to_bits())
            .count();
        assert_eq!(differ, 0, "step {step}: {differ} of {n} values differ");
    }
    // Without momentum there is no buffer.
    let (pp, pg) = (emu.upload(&p0), emu.upload(&c));
    launch::sgd_step(&emu, (pp, pg, 0), n, (lr, 0.0, wd), false)?;
    let got = emu.download::<f32>(pp, n)?;
    let want: Vec<f32> = (0..n)
        .map(|i| p0[i] - (c[i] + p0[i] * wd as f32) * lr as f32)
        .collect();
    assert_eq!(got, want);
    Ok(())
}

#[test]
fn launches_with_wrong_arguments_fail_with_a_message() {
    use simtrans_ops::launch::{Arg, Launch, Module, Runner};
    let emu = Emu::new();
    let at = Launch {
        grid: (1, 1),
        block: 32,
    };
    let e = emu
        .launch(Module::Sgd, "sgd_step", at, &[Arg::Ptr(0)])
        .unwrap_err();
    assert!(e.to_string().contains("takes 8 arguments, given 1"), "{e}");
    let e = emu.launch(Module::Bn, "sgd_step", at, &[]).unwrap_err();
    assert!(e.to_string().contains("lives in sgd.cu"), "{e}");
    let e = emu.launch(Module::Bn, "no_such", at, &[]).unwrap_err();
    assert!(e.to_string().contains("no such kernel"), "{e}");
    // bn_eval_stats's first parameter is an int, not a pointer.
    let e = emu
        .launch(
            Module::Bn,
            "bn_eval_stats",
            at,
            &[
                Arg::Ptr(0),
                Arg::F32(0.0),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::Ptr(0),
                Arg::Ptr(0),
            ],
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("argument 0 has 4 bytes, given 8"),
        "{e}"
    );
}

#[test]
fn a_kernel_writing_past_its_buffer_is_caught() {
    // sgd_step over 40 values on buffers of 32: the guards after them change.
    let emu = Emu::new();
    let p = emu.upload(&[1f32; 32]);
    let g = emu.upload(&[1f32; 32]);
    let e = launch::sgd_step(&emu, (p, g, 0), 40, (0.1, 0.0, 0.0), false).unwrap_err();
    assert!(e.to_string().contains("wrote outside"), "{e}");
}

#[test]
fn the_emulator_reports_broken_synchronisation() -> R {
    use simtrans_ops::launch::{Arg, Launch};
    let emu = Emu::new();
    let at = Launch {
        grid: (2, 1),
        block: 64,
    };
    let out = emu.alloc_of::<f64>(64);
    let e = emu
        .launch_in("selftest", "selftest_divergent_sync", at, &[Arg::Ptr(out)])
        .unwrap_err();
    assert!(
        e.to_string().contains("__syncthreads reached by 32 of 64"),
        "{e}"
    );
    let e = emu
        .launch_in("selftest", "selftest_partial_shuffle", at, &[Arg::Ptr(out)])
        .unwrap_err();
    assert!(e.to_string().contains("16 of the 32 lanes"), "{e}");
    // The same shuffle by whole warps, of the lane numbers: lane 0 of each warp ends with the
    // warp's sum; lane 31 always reads past the warp, which keeps its own value, so it doubles.
    emu.launch_in("selftest", "selftest_warp_sum", at, &[Arg::Ptr(out)])?;
    let got = emu.download::<f64>(out, 64)?;
    assert_eq!((got[0], got[32]), (496.0, 496.0));
    assert_eq!((got[31], got[63]), (992.0, 992.0));
    Ok(())
}

/// The pair grids of one test: (first row image, rows, first column image, columns) of a
/// `[images, 2h]` projection.
type Grids = [(usize, usize, usize, usize)];

/// f64 reference of the pair grid forward: the grids' outputs, concatenated.
fn pair_grid_ref(
    q: &[f64],
    bias: &[f64],
    h: usize,
    grids: &Grids,
    slots: (usize, usize),
) -> Vec<f64> {
    let mut out = vec![];
    for &(r0, rows, c0, cols) in grids {
        for r in 0..rows {
            for c in 0..cols {
                for k in 0..h {
                    out.push(
                        q[(r0 + r) * 2 * h + 2 * k + slots.0]
                            + q[(c0 + c) * 2 * h + 2 * k + slots.1]
                            + bias[k],
                    );
                }
            }
        }
    }
    out
}

/// f64 reference of the pair grid backward: dq `[images, 2h]`.
fn pair_grid_grad_ref(
    g: &[f64],
    images: usize,
    h: usize,
    grids: &Grids,
    slots: (usize, usize),
) -> Vec<f64> {
    let mut dq = vec![0.0; images * 2 * h];
    let mut at = 0;
    for &(r0, rows, c0, cols) in grids {
        for r in 0..rows {
            for c in 0..cols {
                for k in 0..h {
                    dq[(r0 + r) * 2 * h + 2 * k + slots.0] += g[at];
                    dq[(c0 + c) * 2 * h + 2 * k + slots.1] += g[at];
                    at += 1;
                }
            }
        }
    }
    dq
}

#[test]
fn pair_grid_matches_f64_forward_and_backward() -> R {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    // The SimNet step's two square grids (A, B), and an eval-mode block: 2 rows × all images.
    let grid_sets: [&Grids; 2] = [&[(0, 3, 0, 3), (3, 4, 3, 4)], &[(1, 2, 0, 7)]];
    for ty in [Ty::F32, Ty::Bf16] {
        for h in [8, 6, 5] {
            for slots in [(1, 0), (0, 1)] {
                for grids in grid_sets {
                    let images = 7;
                    let q = ty.round(&randn(&mut rng, images * 2 * h, 2.0, 0.5));
                    let bias: Vec<f64> = randn(&mut rng, h, 1.0, 0.0)
                        .iter()
                        .map(|&v| v as f32 as f64)
                        .collect();
                    let emu = Emu::new();
                    let pq = ty.upload(&emu, &q);
                    let pb = f32s(&emu, &bias);
                    let total: usize = grids.iter().map(|g| g.1 * g.3).sum();
                    let out = ty.alloc(&emu, total * h);
                    let elt = ty.dtype().size_in_bytes() as u64;
                    let mut plan = vec![];
                    let mut at = 0;
                    for &(r0, rows, c0, cols) in grids {
                        plan.push(launch::PairGrid {
                            qr: pq + (r0 * 2 * h) as u64 * elt,
                            qc: pq + (c0 * 2 * h) as u64 * elt,
                            out: out + (at * h) as u64 * elt,
                            rows,
                            cols,
                        });
                        at += rows * cols;
                    }
                    launch::pair_grid_forward(&emu, ty.dtype(), &plan, pb, h, slots)?;
                    let what = format!("{ty:?} h={h} slots={slots:?} grids={grids:?}");
                    let want = pair_grid_ref(&q, &bias, h, grids, slots);
                    // One rounding of the f32 sum.
                    check(
                        &format!("forward {what}"),
                        &ty.download(&emu, out, total * h)?,
                        &want,
                        ty.tol(),
                    );
                    // Backward: the same plan with `out` holding the gradient, into an f32 dq.
                    let g = ty.round(&randn(&mut rng, total * h, 1.0, 0.0));
                    let pg = ty.upload(&emu, &g);
                    let dq = f32s(&emu, &vec![0.0; images * 2 * h]);
                    let back: Vec<_> = plan
                        .iter()
                        .map(|p| launch::PairGrid {
                            qr: dq + (p.qr - pq) / elt * 4,
                            qc: dq + (p.qc - pq) / elt * 4,
                            out: pg + (p.out - out),
                            ..*p
                        })
                        .collect();
                    launch::pair_grid_backward(&emu, ty.dtype(), &back, h, slots)?;
                    let want = pair_grid_grad_ref(&g, images, h, grids, slots);
                    check(
                        &format!("backward {what}"),
                        &read_f32(&emu, dq, images * 2 * h)?,
                        &want,
                        1e-6,
                    );
                    // 16-byte loads exactly where h allows them (the emulator's buffers are aligned).
                    let names: Vec<_> = emu.launches().iter().map(|(n, _)| *n).collect();
                    let wide = h % (8 / ty.dtype().size_in_bytes()) == 0;
                    assert_eq!(names[0].ends_with('v'), wide, "{what}: {names:?}");
                }
            }
        }
    }
    Ok(())
}

/// f64 reference of LayerNorm + ReLU over rows of `h`: (y, mean, rstd).
fn ln_ref(x: &[f64], w: &[f64], b: &[f64], h: usize, eps: f64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (mut y, mut means, mut rstds) = (vec![], vec![], vec![]);
    for row in x.chunks(h) {
        let mean = row.iter().sum::<f64>() / h as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / h as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for k in 0..h {
            y.push(((row[k] - mean) * rstd * w[k] + b[k]).max(0.0));
        }
        means.push(mean);
        rstds.push(rstd);
    }
    (y, means, rstds)
}

#[test]
fn layer_norm_relu_matches_f64_forward_and_backward() -> R {
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let eps = 1e-5;
    // h above and below the block's 256 threads; n above a share of 64 rows.
    for ty in [Ty::F32, Ty::Bf16] {
        for (n, h) in [(3, 300), (70, 40), (5, 1)] {
            let x = ty.round(&randn(&mut rng, n * h, 3.0, 1.0));
            let w: Vec<f64> = randn(&mut rng, h, 1.0, 1.0)
                .iter()
                .map(|&v| v as f32 as f64)
                .collect();
            let b: Vec<f64> = randn(&mut rng, h, 0.5, 0.0)
                .iter()
                .map(|&v| v as f32 as f64)
                .collect();
            let emu = Emu::new();
            let (px, pw, pb) = (ty.upload(&emu, &x), f32s(&emu, &w), f32s(&emu, &b));
            let py = ty.alloc(&emu, n * h);
            let (pm, pr) = (emu.alloc_of::<f32>(n), emu.alloc_of::<f32>(n));
            launch::layer_norm_relu_forward(
                &emu,
                ty.dtype(),
                (px, pw, pb, py),
                (pm, pr),
                (n, h),
                eps,
            )?;
            let (want_y, want_m, want_r) = ln_ref(&x, &w, &b, h, eps);
            let what = format!("{ty:?} n={n} h={h}");
            let y = ty.download(&emu, py, n * h)?;
            check(&format!("y {what}"), &y, &want_y, ty.tol());
            check(
                &format!("mean {what}"),
                &read_f32(&emu, pm, n)?,
                &want_m,
                1e-6,
            );
            check(
                &format!("rstd {what}"),
                &read_f32(&emu, pr, n)?,
                &want_r,
                1e-5,
            );
            // Backward against f64 on the kernel's own y (its ReLU mask) and dy.
            let dy = ty.round(&randn(&mut rng, n * h, 1.0, 0.0));
            let pdy = ty.upload(&emu, &dy);
            let pdx = ty.alloc(&emu, n * h);
            let (pdw, pdb) = (emu.alloc_of::<f32>(h), emu.alloc_of::<f32>(h));
            launch::layer_norm_relu_backward(
                &emu,
                ty.dtype(),
                (px, py, pdy, pw),
                (pm, pr),
                (pdx, pdw, pdb),
                (n, h),
            )?;
            let (mut dx, mut dw, mut db) = (vec![], vec![0.0; h], vec![0.0; h]);
            for r in 0..n {
                let (m, rs) = (want_m[r], want_r[r]);
                let g: Vec<f64> = (0..h)
                    .map(|k| {
                        if y[r * h + k] > 0.0 {
                            dy[r * h + k]
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let xh: Vec<f64> = (0..h).map(|k| (x[r * h + k] - m) * rs).collect();
                let gw: Vec<f64> = (0..h).map(|k| g[k] * w[k]).collect();
                let ma = gw.iter().sum::<f64>() / h as f64;
                let mb = gw.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / h as f64;
                for k in 0..h {
                    dx.push(rs * (gw[k] - ma - xh[k] * mb));
                    dw[k] += g[k] * xh[k];
                    db[k] += g[k];
                }
            }
            check(
                &format!("dx {what}"),
                &ty.download(&emu, pdx, n * h)?,
                &dx,
                ty.tol(),
            );
            check(&format!("dw {what}"), &read_f32(&emu, pdw, h)?, &dw, 1e-5);
            check(&format!("db {what}"), &read_f32(&emu, pdb, h)?, &db, 1e-5);
        }
    }
    Ok(())
}

#[test]
fn add_bias_matches_f64_forward_and_backward() -> R {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    // h with and without 4-value accesses; n above a share of 64 rows.
    for ty in [Ty::F32, Ty::Bf16] {
        for (n, h) in [(70, 12), (3, 10), (1, 4)] {
            let x = ty.round(&randn(&mut rng, n * h, 2.0, 0.0));
            let b: Vec<f64> = randn(&mut rng, h, 1.0, 0.0)
                .iter()
                .map(|&v| v as f32 as f64)
                .collect();
            let emu = Emu::new();
            let (px, pb, py) = (ty.upload(&emu, &x), f32s(&emu, &b), ty.alloc(&emu, n * h));
            launch::add_bias_forward(&emu, ty.dtype(), (px, pb, py), (n, h))?;
            let want: Vec<f64> = (0..n * h).map(|i| x[i] + b[i % h]).collect();
            let what = format!("{ty:?} n={n} h={h}");
            check(
                &format!("y {what}"),
                &ty.download(&emu, py, n * h)?,
                &want,
                ty.tol(),
            );
            let g = ty.round(&randn(&mut rng, n * h, 1.0, 0.0));
            let (pg, pdb) = (ty.upload(&emu, &g), emu.alloc_of::<f32>(h));
            launch::add_bias_backward(&emu, ty.dtype(), (pg, pdb), (n, h))?;
            let want: Vec<f64> = (0..h).map(|k| (0..n).map(|r| g[r * h + k]).sum()).collect();
            check(&format!("db {what}"), &read_f32(&emu, pdb, h)?, &want, 1e-6);
            let first = emu.launches()[0].0;
            assert_eq!(first.ends_with("x4"), h % 4 == 0, "{what}: {first}");
        }
    }
    Ok(())
}

#[test]
fn sgd_steps_eight_per_launch_are_bit_identical_to_the_cpu_optimiser() -> R {
    let mut rng = ChaCha8Rng::seed_from_u64(24);
    let sizes = [1usize, 7, 300, 64, 5, 1000, 2, 3, 9, 513, 17];
    let (lr, mu, wd) = (0.05, 0.9, 5e-4);
    let emu = Emu::new();
    let mut vars = vec![];
    let mut consts = vec![];
    let mut tensors = vec![];
    for (i, &n) in sizes.iter().enumerate() {
        let p0: Vec<f32> = randn(&mut rng, n, 1.0, 0.0)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let c: Vec<f32> = randn(&mut rng, n, 1.0, 0.0)
            .iter()
            .map(|&v| v as f32)
            .collect();
        vars.push((format!("p{i}"), Var::new(p0.as_slice(), &Device::Cpu)?));
        consts.push(Tensor::new(c.as_slice(), &Device::Cpu)?);
        tensors.push(launch::SgdTensor {
            p: emu.upload(&p0),
            g: emu.upload(&c),
            buf: emu.alloc_of::<f32>(n),
            n,
        });
    }
    let mut opt = simtrans_ops::optim::Sgd::new(vars.clone(), lr, mu, wd);
    for step in 0..3 {
        // loss = Σ_i Σ p_i·c_i: gradient c_i.
        let mut loss = Tensor::new(0f32, &Device::Cpu)?;
        for ((_, v), c) in vars.iter().zip(&consts) {
            loss = (loss + (v.as_tensor() * c)?.sum_all()?)?;
        }
        opt.step(&loss.backward()?)?;
        launch::sgd_steps(&emu, &tensors, (lr, mu, wd), step == 0)?;
        for ((name, v), t) in vars.iter().zip(&tensors) {
            let want = v.as_tensor().to_vec1::<f32>()?;
            let got = emu.download::<f32>(t.p, t.n)?;
            let differ = (0..t.n)
                .filter(|&i| got[i].to_bits() != want[i].to_bits())
                .count();
            assert_eq!(
                differ, 0,
                "step {step}, {name}: {differ} of {} values differ",
                t.n
            );
        }
    }
    // 11 tensors: two launches, of 8 and 3 tensors.
    let launches: Vec<_> = emu
        .launches()
        .iter()
        .map(|(n, at)| (*n, at.grid.1))
        .collect();
    assert_eq!(launches[..2], [("sgd_step8", 8), ("sgd_step8", 3)]);
    Ok(())
}

#[test]
fn cross_entropy_matches_f64_forward_and_backward() -> R {
    let mut rng = ChaCha8Rng::seed_from_u64(25);
    // More rows than the block's threads; 2 classes (the SimNet's) and 5.
    for (n, c) in [(2500, 2), (7, 5), (1, 2)] {
        let logits: Vec<f64> = randn(&mut rng, n * c, 4.0, 0.0)
            .iter()
            .map(|&v| v as f32 as f64)
            .collect();
        let target: Vec<u32> = (0..n).map(|r| ((r * 7 + 3) % c) as u32).collect();
        let emu = Emu::new();
        let (pl, pt, ploss) = (
            f32s(&emu, &logits),
            emu.upload(&target),
            emu.alloc_of::<f32>(1),
        );
        launch::cross_entropy_forward(&emu, (pl, pt, ploss), (n, c))?;
        let mut want = 0.0;
        let mut dwant = vec![];
        let g = 0.75;
        for r in 0..n {
            let row = &logits[r * c..(r + 1) * c];
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            want += (lse - row[target[r] as usize]) / n as f64;
            for (j, v) in row.iter().enumerate() {
                let onehot = if j == target[r] as usize { 1.0 } else { 0.0 };
                dwant.push(((v - lse).exp() - onehot) * g / n as f64);
            }
        }
        check(
            &format!("loss n={n} c={c}"),
            &read_f32(&emu, ploss, 1)?,
            &[want],
            1e-5,
        );
        let (pg, pd) = (f32s(&emu, &[g]), emu.alloc_of::<f32>(n * c));
        launch::cross_entropy_backward(&emu, (pl, pt, pg, pd), (n, c))?;
        check(
            &format!("dlogits n={n} c={c}"),
            &read_f32(&emu, pd, n * c)?,
            &dwant,
            1e-5,
        );
    }
    Ok(())
}

#[test]
fn global_average_pooling_reads_either_layout_and_spreads_its_gradient() -> R {
    let mut rng = ChaCha8Rng::seed_from_u64(26);
    let (b, c, hw) = (3, 5, 4);
    for ty in [Ty::F32, Ty::Bf16] {
        // The same values stored NCHW and NHWC.
        let nchw = ty.round(&randn(&mut rng, b * c * hw, 2.0, 0.5));
        let mut nhwc = vec![0.0; b * c * hw];
        for n in 0..b {
            for ch in 0..c {
                for i in 0..hw {
                    nhwc[(n * hw + i) * c + ch] = nchw[(n * c + ch) * hw + i];
                }
            }
        }
        let want: Vec<f64> = nchw
            .chunks(hw)
            .map(|v| v.iter().sum::<f64>() / hw as f64)
            .collect();
        let emu = Emu::new();
        for (data, strides) in [(&nchw, (c * hw, hw, 1)), (&nhwc, (hw * c, 1, c))] {
            let (px, py) = (ty.upload(&emu, data), emu.alloc_of::<f32>(b * c));
            launch::avg_pool_forward(&emu, ty.dtype(), (px, py), (b, c, hw), strides)?;
            check(
                &format!("{ty:?} {strides:?}"),
                &read_f32(&emu, py, b * c)?,
                &want,
                1e-6,
            );
        }
        let dy = randn(&mut rng, b * c, 1.0, 0.0);
        let (pdy, pdx) = (f32s(&emu, &dy), ty.alloc(&emu, b * c * hw));
        launch::avg_pool_backward(&emu, ty.dtype(), (pdy, pdx), (b * c, hw))?;
        let want: Vec<f64> = (0..b * c * hw)
            .map(|k| dy[k / hw] as f32 as f64 / hw as f64)
            .collect();
        check(
            &format!("{ty:?} dx"),
            &ty.download(&emu, pdx, b * c * hw)?,
            &want,
            ty.tol(),
        );
    }
    Ok(())
}

#[test]
fn transpose_casts_every_tile_and_the_ragged_edges() -> R {
    let mut rng = ChaCha8Rng::seed_from_u64(27);
    for (from, to) in [
        (Ty::F32, Ty::Bf16),
        (Ty::Bf16, Ty::F32),
        (Ty::F32, Ty::F32),
        (Ty::Bf16, Ty::Bf16),
    ] {
        for (rows, cols) in [(70, 33), (32, 64), (1, 5)] {
            let x = from.round(&randn(&mut rng, rows * cols, 3.0, 0.0));
            let emu = Emu::new();
            let (px, py) = (from.upload(&emu, &x), to.alloc(&emu, rows * cols));
            launch::transpose(&emu, (from.dtype(), to.dtype()), (px, py), (rows, cols))?;
            let want: Vec<f64> = (0..rows * cols)
                .map(|k| x[(k % rows) * cols + k / rows])
                .collect();
            let got = to.download(&emu, py, rows * cols)?;
            // Exact where no rounding happens, to bf16 rounding where one does.
            check(
                &format!("{from:?}→{to:?} {rows}×{cols}"),
                &got,
                &to.round(&want),
                0.0,
            );
        }
    }
    Ok(())
}
