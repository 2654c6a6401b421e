//! The image processor of Qwen2-VL and Qwen2.5-VL, as transformers' PIL processor
//! (`Qwen2VLImageProcessorPil`) computes it: `smart_resize` to multiples of
//! `patch_size * merge_size` with the pixel count within `[min_pixels, max_pixels]`, a
//! Pillow resize, rescale and normalise, then the picture cut into patch rows, each patch
//! repeated `temporal_patch_size` times (a still image is a clip of identical frames), the
//! patches of each `merge_size x merge_size` group next to each other. The number of image
//! tokens follows from the grid.

use std::path::Path;

use image::{DynamicImage, RgbImage};
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::preprocess::{HfPixelConfig, PixelSteps};
use crate::resample;

/// `size` of a Qwen2-VL `preprocessor_config.json` (transformers 5 writes the pixel bounds
/// here).
#[derive(Debug, Clone, Default, Deserialize)]
struct HfPixelBounds {
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
}

/// A Qwen2-VL `preprocessor_config.json`, with transformers' defaults. The published
/// checkpoints give the bounds as top-level `min_pixels` / `max_pixels`, which win over
/// `size` as in transformers.
#[derive(Debug, Clone, Deserialize)]
struct HfQwenImageConfig {
    #[serde(flatten)]
    pixels: HfPixelConfig,
    #[serde(default = "fourteen")]
    patch_size: usize,
    #[serde(default = "two")]
    temporal_patch_size: usize,
    #[serde(default = "two")]
    merge_size: usize,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    #[serde(default)]
    size: HfPixelBounds,
}

fn fourteen() -> usize {
    14
}
fn two() -> usize {
    2
}

/// A validated Qwen2-VL image processor.
#[derive(Debug, Clone)]
pub struct QwenImageProcessor {
    steps: PixelSteps,
    patch_size: usize,
    temporal_patch_size: usize,
    merge_size: usize,
    min_pixels: u64,
    max_pixels: u64,
}

/// An image as the vision tower takes it: `grid[0] * grid[1] * grid[2]` patch rows of
/// `channels * temporal_patch_size * patch_size^2` values.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenPixels {
    /// Row-major `[rows, row_len]`.
    pub patches: Vec<f32>,
    /// Values per patch row.
    pub row_len: usize,
    /// `(temporal, height, width)` in patches: transformers' `image_grid_thw`.
    pub grid: [usize; 3],
}

impl QwenPixels {
    /// Patch rows.
    pub fn rows(&self) -> usize {
        self.grid.iter().product()
    }
}

impl QwenImageProcessor {
    /// Reads `dir/preprocessor_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        crate::preprocess::load_config(dir, Self::new)
    }

    fn new(c: HfQwenImageConfig) -> std::result::Result<Self, String> {
        let steps = c.pixels.validate()?;
        if c.patch_size == 0 || c.temporal_patch_size == 0 || c.merge_size == 0 {
            return Err("patch_size, temporal_patch_size and merge_size must be at least 1".into());
        }
        let min_pixels = c.min_pixels.or(c.size.shortest_edge).unwrap_or(56 * 56);
        let max_pixels = c
            .max_pixels
            .or(c.size.longest_edge)
            .unwrap_or(28 * 28 * 1280);
        if min_pixels == 0 || min_pixels > max_pixels {
            return Err(format!(
                "min_pixels = {min_pixels} and max_pixels = {max_pixels}: need 0 < min <= max"
            ));
        }
        Ok(Self {
            steps,
            patch_size: c.patch_size,
            temporal_patch_size: c.temporal_patch_size,
            merge_size: c.merge_size,
            min_pixels,
            max_pixels,
        })
    }

    /// Patches per side of a merge group (`merge_size`).
    pub fn merge_size(&self) -> usize {
        self.merge_size
    }

    /// The side every resized dimension is a multiple of: `patch_size * merge_size`.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// transformers' `smart_resize`: `(height, width)` rounded to multiples of
    /// [`QwenImageProcessor::factor`] (Python's `round`, halves to even), scaled down or up
    /// so that the pixel count lies within `[min_pixels, max_pixels]`.
    pub fn smart_resize(&self, height: u32, width: u32) -> Result<(u32, u32)> {
        let (h, w) = (height as f64, width as f64);
        if height == 0 || width == 0 || h.max(w) / h.min(w) > 200.0 {
            return Err(ModelError::Image(format!(
                "a {width} x {height} image: the aspect ratio must be below 200"
            )));
        }
        let f = self.factor() as f64;
        let mut h_bar = round_half_even(h / f) * f;
        let mut w_bar = round_half_even(w / f) * f;
        if h_bar * w_bar > self.max_pixels as f64 {
            let beta = (h * w / self.max_pixels as f64).sqrt();
            h_bar = f.max((h / beta / f).floor() * f);
            w_bar = f.max((w / beta / f).floor() * f);
        } else if h_bar * w_bar < self.min_pixels as f64 {
            let beta = (self.min_pixels as f64 / (h * w)).sqrt();
            h_bar = (h * beta / f).ceil() * f;
            w_bar = (w * beta / f).ceil() * f;
        }
        Ok((h_bar as u32, w_bar as u32))
    }

    /// Image tokens the decoder sees for a grid: its patches over `merge_size^2`.
    pub fn image_tokens(&self, grid: [usize; 3]) -> usize {
        grid.iter().product::<usize>() / (self.merge_size * self.merge_size)
    }

    /// The picture the vision tower sees, before rescaling and normalisation: resized by
    /// [`QwenImageProcessor::smart_resize`] (its sides multiples of the merge groups').
    pub fn picture(&self, image: &DynamicImage) -> Result<RgbImage> {
        let rgb = image.to_rgb8();
        let (w0, h0) = rgb.dimensions();
        let (h, w) = if self.steps.resize {
            self.smart_resize(h0, w0)?
        } else {
            (h0, w0)
        };
        let f = self.factor() as u32;
        if h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            return Err(ModelError::Image(format!(
                "a {w} x {h} picture does not divide into {f}-pixel merge groups (do_resize is off)"
            )));
        }
        Ok(resample::resize(&rgb, w, h, self.steps.filter))
    }

    /// Preprocesses one image.
    pub fn process(&self, image: &DynamicImage) -> Result<QwenPixels> {
        let rgb = self.picture(image)?;
        let (w, h) = rgb.dimensions();
        let (p, t, m) = (self.patch_size, self.temporal_patch_size, self.merge_size);
        let (gh, gw) = (h as usize / p, w as usize / p);
        let row_len = 3 * t * p * p;
        let value = |x: u32, y: u32, c: usize| self.steps.value(rgb.get_pixel(x, y).0[c], c);
        let mut patches = Vec::with_capacity(gh * gw * row_len);
        // Patch order: merge groups row by row, and within a group its m x m patches row by
        // row; within a patch: channel, frame, pixel row, pixel column.
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (y0, x0) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for c in 0..3 {
                            for _ in 0..t {
                                for py in 0..p {
                                    for px in 0..p {
                                        patches.push(value((x0 + px) as u32, (y0 + py) as u32, c));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(QwenPixels {
            patches,
            row_len,
            grid: [1, gh, gw],
        })
    }
}

/// Python's `round` on a non-negative float: halves go to the even neighbour.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processor(min: u64, max: u64) -> QwenImageProcessor {
        let config: HfQwenImageConfig =
            serde_json::from_str(&format!(r#"{{"min_pixels": {min}, "max_pixels": {max}}}"#))
                .unwrap();
        QwenImageProcessor::new(config).unwrap()
    }

    /// Hand-computed `smart_resize` cases, one per branch, and Python's rounding of halves.
    #[test]
    fn smart_resize_takes_each_branch() {
        let p = processor(56 * 56, 28 * 28 * 12);
        // round(60 / 28) = 2, round(100 / 28) = 4: 56 x 112 fits.
        assert_eq!(p.smart_resize(60, 100).unwrap(), (56, 112));
        // 40 x 40 rounds to 28 x 28, under min: beta = sqrt(3136 / 1600), ceil(40 * 1.4 / 28) = 2.
        assert_eq!(p.smart_resize(40, 40).unwrap(), (56, 56));
        // 120 x 200 rounds to 112 x 196, over max: floor down to 56 x 112.
        assert_eq!(p.smart_resize(120, 200).unwrap(), (56, 112));
        // 42 / 28 = 1.5 rounds to 2 (even), 70 / 28 = 2.5 rounds to 2 (even).
        let wide = processor(28 * 28, 28 * 28 * 100);
        assert_eq!(wide.smart_resize(42, 70).unwrap(), (56, 56));
        assert!(p.smart_resize(1, 201).is_err());
        assert_eq!(round_half_even(0.5), 0.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(2.4), 2.0);
    }

    #[test]
    fn bad_configs_name_the_field() {
        for (json, needle) in [
            (r#"{"image_mean": [0.5, 0.5]}"#, "image_mean"),
            (r#"{"resample": 7}"#, "resample"),
            (r#"{"min_pixels": 100, "max_pixels": 10}"#, "min_pixels"),
            (r#"{"merge_size": 0}"#, "merge_size"),
        ] {
            let config: HfQwenImageConfig = serde_json::from_str(json).unwrap();
            let err = QwenImageProcessor::new(config).unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
