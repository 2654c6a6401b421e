//! Image resizing as Pillow (12 and 13) does it (`Image.resize` without `reducing_gap`),
//! which is what transformers' PIL image processors call: the same filters, the same
//! support and rounding of each output pixel's window, the same 22-bit fixed-point
//! coefficients, and the same two passes through an 8-bit intermediate image, in Pillow's
//! order (horizontal first, unless the height shrinks by more than twice the width).
//! Bit-exact output is the point: a resize that differs by one grey level moves a
//! normalised pixel by 0.015, far more than the model's other numerics.
//!
//! Written here rather than taken from the `image` crate, whose Catmull-Rom filter is the
//! same curve but rounds and normalises differently (one or two grey levels off in places).

use image::RgbImage;

/// Pillow's resampling filters (`PIL.Image.Resampling`), by their numbers in
/// `preprocessor_config.json`'s `resample`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// 0
    Nearest,
    /// 1
    Lanczos,
    /// 2
    Bilinear,
    /// 3
    Bicubic,
}

impl Filter {
    /// The filter numbered `n`, if Pillow has it and so do we.
    pub fn from_pil(n: u32) -> Option<Filter> {
        match n {
            0 => Some(Filter::Nearest),
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Nearest => 0.0,
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Nearest => 0.0,
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                let sinc = |x: f64| {
                    if x == 0.0 {
                        1.0
                    } else {
                        let x = x * std::f64::consts::PI;
                        x.sin() / x
                    }
                };
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Bits after the point of Pillow's fixed-point coefficients for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output coordinate's window: the first input index and its fixed-point weights.
struct Window {
    start: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` for `in_size -> out_size`.
fn windows(in_size: usize, out_size: usize, filter: Filter) -> Vec<Window> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter.support() * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filter_scale;
            // C's `(int)` truncates toward zero; a negative start is clamped anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin);
            let raw: Vec<f64> = (0..count)
                .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * (1u32 << PRECISION_BITS) as f64;
                    if w < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            Window {
                start: xmin,
                weights,
            }
        })
        .collect()
}

/// Pillow's `clip8`: drop the fraction and clamp to a grey level.
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `src` to `width x height` exactly as Pillow's `Image.resize(size, filter)`.
pub fn resize(src: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (w0, h0) = src.dimensions();
    if (w0, h0) == (width, height) || width == 0 || height == 0 {
        return if (w0, h0) == (width, height) {
            src.clone()
        } else {
            RgbImage::new(width, height)
        };
    }
    if filter == Filter::Nearest {
        return nearest(src, width, height);
    }
    let horizontal = windows(w0 as usize, width as usize, filter);
    let vertical = windows(h0 as usize, height as usize, filter);
    // Pillow (12 on) runs the vertical pass first when the height shrinks by more than
    // twice what the width does. The order changes the 8-bit intermediate image, so it is
    // Pillow's order that gives Pillow's pixels.
    let (dh, dw) = (h0 as i64 - height as i64, w0 as i64 - width as i64);
    if dh > 0 && dh > dw * 2 {
        let temp = vertical_pass(src, &vertical, 0, w0, height);
        if w0 == width {
            return temp;
        }
        return horizontal_pass(&temp, &horizontal, 0, height as usize, width);
    }
    if w0 == width {
        return vertical_pass(src, &vertical, 0, width, height);
    }
    // Only the input rows some output row reads go through the horizontal pass.
    let first = vertical.first().map_or(0, |v| v.start);
    let last = vertical
        .last()
        .map_or(h0 as usize, |v| v.start + v.weights.len());
    let temp = horizontal_pass(src, &horizontal, first, last - first, width);
    if h0 == height {
        return temp;
    }
    vertical_pass(&temp, &vertical, first, width, height)
}

/// The horizontal pass over `rows` rows of `src` from row `first`.
fn horizontal_pass(
    src: &RgbImage,
    horizontal: &[Window],
    first: usize,
    rows: usize,
    width: u32,
) -> RgbImage {
    let mut out = RgbImage::new(width, rows as u32);
    for y in 0..rows {
        for (x, win) in horizontal.iter().enumerate() {
            let pixels = (0..win.weights.len())
                .map(|i| src.get_pixel((win.start + i) as u32, (first + y) as u32));
            out.put_pixel(x as u32, y as u32, weighted(pixels, &win.weights));
        }
    }
    out
}

/// The vertical pass over `src`, whose row 0 is input row `first`.
fn vertical_pass(
    src: &RgbImage,
    vertical: &[Window],
    first: usize,
    width: u32,
    height: u32,
) -> RgbImage {
    let mut out = RgbImage::new(width, height);
    for (y, win) in vertical.iter().enumerate() {
        for x in 0..width {
            let pixels =
                (0..win.weights.len()).map(|i| src.get_pixel(x, (win.start - first + i) as u32));
            out.put_pixel(x, y as u32, weighted(pixels, &win.weights));
        }
    }
    out
}

/// One output pixel: the window's pixels times their fixed-point weights, rounded half up
/// and clipped per channel, as Pillow does.
fn weighted<'a>(
    pixels: impl Iterator<Item = &'a image::Rgb<u8>>,
    weights: &[i32],
) -> image::Rgb<u8> {
    let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
    for (p, &k) in pixels.zip(weights) {
        for (a, &v) in acc.iter_mut().zip(&p.0) {
            *a += v as i64 * k as i64;
        }
    }
    image::Rgb(acc.map(clip8))
}

/// Pillow's nearest-neighbour resize: the input pixel under each output pixel's centre.
fn nearest(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w0, h0) = src.dimensions();
    let (sx, sy) = (w0 as f64 / width as f64, h0 as f64 / height as f64);
    RgbImage::from_fn(width, height, |x, y| {
        let xi = (((x as f64 + 0.5) * sx) as u32).min(w0 - 1);
        let yi = (((y as f64 + 0.5) * sy) as u32).min(h0 - 1);
        *src.get_pixel(xi, yi)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights of every window sum to one in fixed point (within the rounding of each).
    #[test]
    fn windows_are_normalised() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            for (a, b) in [(64, 56), (48, 56), (500, 336), (7, 28), (336, 336)] {
                for win in windows(a, b, filter) {
                    let sum: i64 = win.weights.iter().map(|&w| w as i64).sum();
                    let one = 1i64 << PRECISION_BITS;
                    assert!((sum - one).abs() <= win.weights.len() as i64, "{a}->{b}");
                    assert!(win.start + win.weights.len() <= a);
                }
            }
        }
    }

    /// A flat image stays flat, and a resize to the same size is the identity.
    #[test]
    fn flat_images_stay_flat() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([12, 200, 255]));
        for filter in [
            Filter::Nearest,
            Filter::Bilinear,
            Filter::Bicubic,
            Filter::Lanczos,
        ] {
            let out = resize(&img, 64, 9, filter);
            assert!(out.pixels().all(|p| p.0 == [12, 200, 255]), "{filter:?}");
            assert_eq!(resize(&img, 37, 23, filter), img);
        }
    }
}
