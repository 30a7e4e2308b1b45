//! Image transforms with the reference (torchvision on PIL images) semantics.
//!
//! The reference trains on `RandomRotation(30) → RandomResizedCrop(224, scale=(0.5, 1)) →
//! RandomHorizontalFlip → ToTensor → Normalize` and tests on `Resize(255) → CenterCrop(224) →
//! ToTensor → Normalize`, all applied by torchvision to PIL images. Reproducing the geometry
//! exactly matters for parity: this module follows torchvision's parameter formulas (Python's
//! round-half-to-even included) and PIL's pixel arithmetic (nearest-neighbour affine sampling in
//! 16.16 fixed point, antialiased bilinear resampling with 22-bit fixed-point weights and 8-bit
//! rounding between the horizontal and vertical passes). Images stay 8-bit until normalisation,
//! as in the reference. Randomness comes from a caller-supplied generator.

use rand::Rng;
use simtrans_core::config::DataConfig;

/// An 8-bit image stored channel-planar (`[C, H, W]`), 1 (grayscale) or 3 (RGB) channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageU8 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl ImageU8 {
    /// An image from planar data; panics when the size does not match (a programming error).
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Self {
        assert_eq!(data.len(), width * height * channels, "planar buffer size");
        ImageU8 {
            width,
            height,
            channels,
            data,
        }
    }

    /// A black image.
    pub fn zeros(width: usize, height: usize, channels: usize) -> Self {
        Self::new(width, height, channels, vec![0; width * height * channels])
    }

    /// From an `image` crate RGB buffer (interleaved) to planar.
    pub fn from_rgb(img: &image::RgbImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let n = w * h;
        let mut data = vec![0u8; 3 * n];
        let (r, gb) = data.split_at_mut(n);
        let (g, b) = gb.split_at_mut(n);
        for (((px, r), g), b) in img.as_raw().chunks_exact(3).zip(r).zip(g).zip(b) {
            (*r, *g, *b) = (px[0], px[1], px[2]);
        }
        Self::new(w, h, 3, data)
    }

    /// Channel `c` of the planar buffer.
    pub(crate) fn plane(&self, c: usize) -> &[u8] {
        let n = self.width * self.height;
        &self.data[c * n..(c + 1) * n]
    }
}

/// Python's `round` on floats: halves go to the even neighbour.
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// PIL's `Image.rotate(angle, NEAREST, expand=False, fillcolor=0)`: counter-clockwise by
/// `angle` degrees about the image centre, nearest neighbour, uncovered pixels black.
pub fn rotate_nearest(img: &ImageU8, angle: f64) -> ImageU8 {
    rotate_crop(img, angle, 0, 0, img.height, img.width)
}

/// `crop(&rotate_nearest(img, angle), top, left, height, width)` for a box inside the image,
/// computing only the pixels of the box (the training transform rotates, then crops).
pub fn rotate_crop(
    img: &ImageU8,
    angle: f64,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
) -> ImageU8 {
    let (w, h) = (img.width, img.height);
    assert!(
        top + height <= h && left + width <= w,
        "rotate_crop: the box must lie inside the image"
    );
    let Some(rotation) = Rotation::new(w, h, angle) else {
        return crop(img, top as i64, left as i64, height, width);
    };
    let mut out = ImageU8::zeros(width, height, img.channels);
    let (n_in, n_out) = (w * h, width * height);
    // Per output row, the covered pixels' source indices (the others stay black).
    let mut src_of = Vec::with_capacity(width);
    for oy in 0..height {
        let covered = rotation.line(top + oy, left, width, Along::Row);
        let first = covered.range.start;
        src_of.clear();
        src_of.extend(covered.sources());
        for ch in 0..img.channels {
            let src = &img.data[ch * n_in..(ch + 1) * n_in];
            let row = ch * n_out + oy * width + first;
            for (d, &s) in out.data[row..row + src_of.len()].iter_mut().zip(&src_of) {
                *d = src[s];
            }
        }
    }
    out
}

/// PIL's inverse map of `rotate(angle, NEAREST, expand=False)` in 16.16 fixed point: which
/// source pixel each output pixel of a `width × height` image shows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rotation {
    a: [i64; 6],
    width: usize,
    height: usize,
}

impl Rotation {
    /// The map of a counter-clockwise rotation by `angle` degrees about the centre; `None` when
    /// the angle is a multiple of 360 (the image is unchanged).
    pub(crate) fn new(width: usize, height: usize, angle: f64) -> Option<Self> {
        let angle = angle.rem_euclid(360.0);
        if angle == 0.0 {
            return None;
        }
        let r = -angle.to_radians();
        let round15 = |v: f64| (v * 1e15).round() / 1e15;
        let (a, b, d, e) = (
            round15(r.cos()),
            round15(r.sin()),
            round15(-r.sin()),
            round15(r.cos()),
        );
        let (cx, cy) = (width as f64 / 2.0, height as f64 / 2.0);
        let c = a * -cx + b * -cy + cx;
        let f = d * -cx + e * -cy + cy;
        // PIL samples at pixel centres in 16.16 fixed point and floors with an arithmetic shift.
        let fix = |v: f64| (v * 65536.0 + 0.5).floor() as i64;
        Some(Rotation {
            a: [
                fix(a),
                fix(b),
                fix(c + a * 0.5 + b * 0.5),
                fix(d),
                fix(e),
                fix(f + d * 0.5 + e * 0.5),
            ],
            width,
            height,
        })
    }

    /// The `n` output pixels from `(y, x)` on along a row (to the right) or a column (down):
    /// which of them the rotated image covers (a range, as a line meets a rectangle in one
    /// segment) and, in order, their source pixel indices (`y · width + x`); the others are
    /// black.
    pub(crate) fn line(&self, y: usize, x: usize, n: usize, along: Along) -> CoveredLine {
        let [a0, a1, a2, a3, a4, a5] = self.a;
        let (y, x) = (y as i64, x as i64);
        let (xx, yy) = (a2 + a1 * y + a0 * x, a5 + a4 * y + a3 * x);
        let (w, h) = (self.width as i64, self.height as i64);
        let (a0, a3) = match along {
            Along::Row => (a0, a3),
            Along::Column => (a1, a4),
        };
        // Each coordinate is monotone along the line, so the covered pixels are contiguous.
        let covered = |k: usize| {
            let (xin, yin) = ((xx + a0 * k as i64) >> 16, (yy + a3 * k as i64) >> 16);
            (0..w).contains(&xin) && (0..h).contains(&yin)
        };
        let start = (0..n).find(|&k| covered(k)).unwrap_or(n);
        let end = (start..n)
            .rev()
            .find(|&k| covered(k))
            .map_or(start, |k| k + 1);
        CoveredLine {
            range: start..end,
            xx: xx + a0 * start as i64,
            yy: yy + a3 * start as i64,
            step: (a0, a3),
            width: self.width,
        }
    }
}

/// Which way [`Rotation::line`] walks the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Along {
    Row,
    Column,
}

/// The covered pixels of one output line of a [`Rotation`] and their source pixels.
pub(crate) struct CoveredLine {
    /// The covered output pixels, as offsets from the line's first pixel.
    pub(crate) range: std::ops::Range<usize>,
    xx: i64,
    yy: i64,
    step: (i64, i64),
    width: usize,
}

impl CoveredLine {
    /// The source pixel indices of the covered pixels, in order.
    pub(crate) fn sources(&self) -> impl Iterator<Item = usize> + '_ {
        let ((a, b), w) = (self.step, self.width);
        (0..self.range.len() as i64).map(move |k| {
            ((self.yy + b * k) >> 16) as usize * w + ((self.xx + a * k) >> 16) as usize
        })
    }
}

pub(crate) const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's bilinear filter for one axis, flat: output pixel `o` reads the input pixels from
/// `start[o]` on with the fixed-point weights `weights[offset[o]..offset[o + 1]]` (at most 2^22
/// each, so i32 sums hold).
#[derive(Debug, Clone)]
pub(crate) struct Taps {
    start: Vec<usize>,
    offset: Vec<usize>,
    weights: Vec<i32>,
}

impl Taps {
    /// The filter resampling `in_size` pixels to `out_size`.
    pub(crate) fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = filterscale; // the bilinear (triangle) filter has support 1
        let triangle = |x: f64| {
            let x = x.abs();
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        };
        let one = (1i64 << PRECISION_BITS) as f64;
        let mut taps = Taps {
            start: Vec::with_capacity(out_size),
            offset: Vec::with_capacity(out_size + 1),
            weights: Vec::new(),
        };
        taps.offset.push(0);
        let mut k = Vec::new();
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            k.clear();
            k.extend((xmin..xmax.max(xmin)).map(|x| triangle((x as f64 - center + 0.5) * ss)));
            let total: f64 = k.iter().sum();
            taps.weights.extend(k.iter().map(|&v| {
                let v = if total != 0.0 { v / total } else { v };
                if v < 0.0 {
                    (-0.5 + v * one) as i32
                } else {
                    (0.5 + v * one) as i32
                }
            }));
            taps.start.push(xmin);
            taps.offset.push(taps.weights.len());
        }
        taps
    }

    /// Output pixel `o`'s first input pixel and weights.
    pub(crate) fn get(&self, o: usize) -> (usize, &[i32]) {
        (
            self.start[o],
            &self.weights[self.offset[o]..self.offset[o + 1]],
        )
    }
}

/// `2^(PRECISION_BITS − 1)`: the rounding term every filter sum starts from.
pub(crate) const HALF: i32 = 1 << (PRECISION_BITS - 1);

#[inline(always)]
pub(crate) fn clip8(v: i32) -> u8 {
    // Sums stay below 2^31: 255 · (2^22 + taps) + 2^21 (the weights are non-negative).
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `Image.resize((out_w, out_h), BILINEAR)`: antialiased when shrinking, horizontal pass
/// first, each pass rounded to 8 bits.
pub fn resize_bilinear(img: &ImageU8, out_w: usize, out_h: usize) -> ImageU8 {
    if (out_w, out_h) == (img.width, img.height) {
        return img.clone();
    }
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 || out_w == 0 || out_h == 0 {
        return ImageU8::zeros(out_w, out_h, img.channels);
    }
    let hc = Taps::new(w, out_w);
    let vc = Taps::new(h, out_h);
    let mut out = ImageU8::zeros(out_w, out_h, img.channels);
    let mut tmp = vec![0u8; out_w * h];
    let mut acc = vec![0i32; out_w];
    for ch in 0..img.channels {
        let src = img.plane(ch);
        for (row, dst) in src.chunks_exact(w).zip(tmp.chunks_exact_mut(out_w)) {
            for (o, d) in dst.iter_mut().enumerate() {
                let (x0, k) = hc.get(o);
                let taps = &row[x0..x0 + k.len()];
                let s = taps
                    .iter()
                    .zip(k)
                    .fold(HALF, |s, (&p, &kk)| s + p as i32 * kk);
                *d = clip8(s);
            }
        }
        // The vertical pass a whole row at a time: each tap adds a weighted row.
        let dst = &mut out.data[ch * out_w * out_h..(ch + 1) * out_w * out_h];
        for (o, row) in dst.chunks_exact_mut(out_w).enumerate() {
            let (y0, k) = vc.get(o);
            acc.fill(HALF);
            for (i, &kk) in k.iter().enumerate() {
                let line = &tmp[(y0 + i) * out_w..(y0 + i + 1) * out_w];
                for (a, &p) in acc.iter_mut().zip(line) {
                    *a += p as i32 * kk;
                }
            }
            for (d, &a) in row.iter_mut().zip(&acc) {
                *d = clip8(a);
            }
        }
    }
    out
}

/// The box `(top, left, height, width)`; parts outside the image are black (PIL's `crop`).
pub fn crop(img: &ImageU8, top: i64, left: i64, height: usize, width: usize) -> ImageU8 {
    let mut out = ImageU8::zeros(width, height, img.channels);
    let (w, h) = (img.width as i64, img.height as i64);
    // The columns of the box that lie inside the image.
    let (x0, x1) = (left.max(0), (left + width as i64).min(w));
    if x0 >= x1 {
        return out;
    }
    let (src_x, dst_x, len) = (x0 as usize, (x0 - left) as usize, (x1 - x0) as usize);
    for ch in 0..img.channels {
        let src = img.plane(ch);
        let dst = &mut out.data[ch * width * height..(ch + 1) * width * height];
        for (y, row) in dst.chunks_exact_mut(width).enumerate() {
            let sy = top + y as i64;
            if (0..h).contains(&sy) {
                let from = sy as usize * img.width + src_x;
                row[dst_x..dst_x + len].copy_from_slice(&src[from..from + len]);
            }
        }
    }
    out
}

/// Mirror left–right.
pub fn hflip(img: &ImageU8) -> ImageU8 {
    let mut out = img.clone();
    let w = img.width;
    for row in out.data.chunks_mut(w) {
        row.reverse();
    }
    out
}

/// The random draws of [`resized_crop_params`], so that tests can script them.
pub trait CropDraws {
    /// A float in `[lo, hi)`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64;
    /// An integer in `[0, n)`.
    fn randint(&mut self, n: usize) -> usize;
}

/// [`CropDraws`] from a random generator.
pub struct RngDraws<'a, R: Rng>(pub &'a mut R);

impl<R: Rng> CropDraws for RngDraws<'_, R> {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        if hi > lo {
            lo + (hi - lo) * self.0.random::<f64>()
        } else {
            lo
        }
    }
    fn randint(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }
}

/// torchvision `RandomResizedCrop.get_params`: `(top, left, height, width)` of the crop box.
/// Ten attempts at a box of area `U(scale) · W·H` and aspect ratio `exp(U(ln r0, ln r1))`, sides
/// rounded half to even; the first that fits gets a uniform position. If none fits, the central
/// crop of the whole image clamped to the ratio range.
pub fn resized_crop_params(
    width: usize,
    height: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    draws: &mut impl CropDraws,
) -> (usize, usize, usize, usize) {
    let area = (width * height) as f64;
    let (l0, l1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * draws.uniform(scale[0], scale[1]);
        let aspect = draws.uniform(l0, l1).exp();
        let w = round_half_even((target * aspect).sqrt()) as i64;
        let h = round_half_even((target / aspect).sqrt()) as i64;
        if 0 < w && w as usize <= width && 0 < h && h as usize <= height {
            let (w, h) = (w as usize, h as usize);
            let i = draws.randint(height - h + 1);
            let j = draws.randint(width - w + 1);
            return (i, j, h, w);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (rmin, rmax) = (ratio[0].min(ratio[1]), ratio[0].max(ratio[1]));
    let (w, h) = if in_ratio < rmin {
        (width, round_half_even(width as f64 / rmin) as usize)
    } else if in_ratio > rmax {
        (round_half_even(height as f64 * rmax) as usize, height)
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// torchvision `Resize(size)` with an int: the output `(width, height)` whose shorter side is
/// `size` and whose longer side is `int(size · long / short)` (truncated).
pub fn resize_shorter_size(width: usize, height: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    if short == size {
        return (width, height);
    }
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// torchvision `CenterCrop` offsets `(top, left)` for an image at least as large as the crop:
/// `int(round((H − h) / 2))`, `int(round((W − w) / 2))`, Python rounding.
pub fn center_crop_offsets(
    width: usize,
    height: usize,
    crop_w: usize,
    crop_h: usize,
) -> (usize, usize) {
    let top = round_half_even((height as f64 - crop_h as f64) / 2.0) as usize;
    let left = round_half_even((width as f64 - crop_w as f64) / 2.0) as usize;
    (top, left)
}

/// torchvision `CenterCrop(size)`'s box `(top, left)` in a `width × height` image; negative
/// where the image is smaller and gets padded with black first (left/top get `(size − W) // 2`).
pub fn center_crop_box(width: usize, height: usize, size: usize) -> (i64, i64) {
    let pad = |side: usize| size.saturating_sub(side);
    let (pw, ph) = (pad(width), pad(height));
    let (t, l) = center_crop_offsets(width + pw, height + ph, size, size);
    (t as i64 - (ph / 2) as i64, l as i64 - (pw / 2) as i64)
}

/// torchvision `CenterCrop(size)`: the central `size` square, padded with black where the
/// image is smaller ([`center_crop_box`]).
pub fn center_crop(img: &ImageU8, size: usize) -> ImageU8 {
    let (top, left) = center_crop_box(img.width, img.height, size);
    crop(img, top, left, size, size)
}

/// The aspect-ratio range of `RandomResizedCrop`.
pub const CROP_RATIO: [f64; 2] = [3.0 / 4.0, 4.0 / 3.0];

/// The reference training augmentation, up to (not including) normalisation: rotation by
/// `U(−d, d)` degrees, random resized crop to `image_size` (scale `crop_scale`, ratio 3/4–4/3,
/// bilinear), horizontal flip with p = 0.5 when `hflip`.
pub fn train_transform(img: &ImageU8, cfg: &DataConfig, rng: &mut impl Rng) -> ImageU8 {
    let draws = TrainDraws::new(img.width, img.height, cfg, rng);
    let (i, j, h, w) = draws.crop;
    let cropped = rotate_crop(img, draws.angle, i, j, h, w);
    let resized = resize_bilinear(&cropped, cfg.image_size, cfg.image_size);
    if draws.flip {
        hflip(&resized)
    } else {
        resized
    }
}

/// The random choices of the training augmentation for one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainDraws {
    /// Rotation, degrees counter-clockwise.
    pub angle: f64,
    /// The crop box `(top, left, height, width)` of the rotated image (the rotation keeps the
    /// size, expand=False, and the box lies inside it).
    pub crop: (usize, usize, usize, usize),
    /// Whether the result is mirrored.
    pub flip: bool,
}

impl TrainDraws {
    /// The draws for a `width × height` image, in the reference's order: the angle, the crop,
    /// the flip.
    pub fn new(width: usize, height: usize, cfg: &DataConfig, rng: &mut impl Rng) -> Self {
        let d = cfg.rotation_degrees;
        let angle = if d > 0.0 {
            rng.random_range(-d..d)
        } else {
            0.0
        };
        let crop = resized_crop_params(
            width,
            height,
            cfg.crop_scale,
            CROP_RATIO,
            &mut RngDraws(&mut *rng),
        );
        let flip = cfg.hflip && rng.random::<f64>() < 0.5;
        TrainDraws { angle, crop, flip }
    }
}

/// The side the test transform resizes the shorter side to: `round(image_size · resize_ratio)`.
pub fn test_resize_side(cfg: &DataConfig) -> usize {
    (cfg.image_size as f64 * cfg.resize_ratio).round() as usize
}

/// The reference test transform, up to normalisation: shorter side to
/// [`test_resize_side`] (bilinear), then the central `image_size` square.
pub fn test_transform(img: &ImageU8, cfg: &DataConfig) -> ImageU8 {
    let (w, h) = resize_shorter_size(img.width, img.height, test_resize_side(cfg));
    center_crop(&resize_bilinear(img, w, h), cfg.image_size)
}

/// `ToTensor` + `Normalize`: writes `[3, H, W]` floats `(v/255 − mean) / std` into `out`,
/// repeating a grayscale plane on the three channels.
pub fn normalise_into(img: &ImageU8, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let n = img.width * img.height;
    assert_eq!(out.len(), 3 * n, "output buffer size");
    for c in 0..3 {
        let src = img.plane(if img.channels == 1 { 0 } else { c });
        let (m, s) = (mean[c], std[c]);
        for (o, &v) in out[c * n..(c + 1) * n].iter_mut().zip(src) {
            *o = (v as f32 / 255.0 - m) / s;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A `width × height` planar image of seeded random bytes.
    pub(crate) fn noise(width: usize, height: usize, channels: usize, seed: u64) -> ImageU8 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data = (0..width * height * channels)
            .map(|_| rng.random())
            .collect();
        ImageU8::new(width, height, channels, data)
    }

    /// The crop pixel by pixel, the definition the row copies must keep.
    fn crop_by_pixel(img: &ImageU8, top: i64, left: i64, height: usize, width: usize) -> ImageU8 {
        let mut out = ImageU8::zeros(width, height, img.channels);
        for ch in 0..img.channels {
            for y in 0..height {
                for x in 0..width {
                    let (sy, sx) = (top + y as i64, left + x as i64);
                    if (0..img.height as i64).contains(&sy) && (0..img.width as i64).contains(&sx) {
                        out.data[(ch * height + y) * width + x] =
                            img.plane(ch)[sy as usize * img.width + sx as usize];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn crop_copies_rows_like_the_pixel_definition() {
        let img = noise(13, 9, 3, 1);
        for (top, left, h, w) in [
            (0, 0, 9, 13),
            (2, 3, 4, 5),
            (-3, -2, 15, 18),
            (5, 10, 7, 6),
            (-4, 0, 3, 13),
            (0, 14, 3, 3),
            (-2, -7, 4, 5),
        ] {
            assert_eq!(
                crop(&img, top, left, h, w),
                crop_by_pixel(&img, top, left, h, w),
                "box ({top}, {left}, {h}, {w})"
            );
        }
    }

    #[test]
    fn resizing_to_or_from_nothing_gives_an_empty_black_image() {
        let img = noise(7, 5, 3, 4);
        assert_eq!(resize_bilinear(&img, 0, 4), ImageU8::zeros(0, 4, 3));
        assert_eq!(resize_bilinear(&img, 6, 0), ImageU8::zeros(6, 0, 3));
        let empty = ImageU8::zeros(0, 5, 3);
        assert_eq!(resize_bilinear(&empty, 4, 4), ImageU8::zeros(4, 4, 3));
    }

    #[test]
    fn rotate_crop_equals_rotating_then_cropping() {
        for (channels, seed) in [(1, 2), (3, 3)] {
            let img = noise(31, 22, channels, seed);
            for angle in [0.0, 7.5, -12.25, 29.9, 90.0, -181.0] {
                let rotated = rotate_nearest(&img, angle);
                for (top, left, h, w) in [
                    (0, 0, 22, 31),
                    (3, 5, 10, 20),
                    (21, 30, 1, 1),
                    (0, 11, 22, 4),
                ] {
                    assert_eq!(
                        rotate_crop(&img, angle, top, left, h, w),
                        crop(&rotated, top as i64, left as i64, h, w),
                        "{channels} channels, {angle}°, box ({top}, {left}, {h}, {w})"
                    );
                }
            }
        }
    }
}
