//! Image preprocessing as the checkpoint's CLIP processor specifies
//! (`preprocessor_config.json`): RGB conversion, optional pad-to-square with the mean colour
//! (LLaVA-1.5's evaluation setting), shortest-edge bicubic resize, center crop, rescale and
//! normalise. Kept apart from the model: it produces `[channels, height, width]` f32 data.

use std::path::Path;

use image::{DynamicImage, ImageReader, Limits, RgbImage};

use crate::resample::{self, Filter};
use serde::Deserialize;

use crate::error::{ModelError, Result};

/// Largest accepted image side, so that a hostile header cannot make us allocate without bound.
pub const MAX_IMAGE_SIDE: u32 = 16_384;

#[derive(Debug, Clone, Deserialize, Default)]
struct HfSize {
    shortest_edge: Option<u32>,
    height: Option<u32>,
    width: Option<u32>,
}

/// `preprocessor_config.json` of a CLIP image processor, with transformers' defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct HfImageProcessorConfig {
    #[serde(flatten)]
    pixels: HfPixelConfig,
    #[serde(default)]
    size: Option<HfSize>,
    #[serde(default = "yes")]
    do_center_crop: bool,
    #[serde(default)]
    crop_size: Option<HfSize>,
}

/// The keys every image processor config has (CLIP's and Qwen2-VL's alike): whether and
/// with which filter to resize, and what becomes of each pixel value.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct HfPixelConfig {
    #[serde(default = "yes")]
    do_resize: bool,
    #[serde(default = "bicubic")]
    resample: u32,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "inv255")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    #[serde(default = "clip_mean")]
    image_mean: Vec<f32>,
    #[serde(default = "clip_std")]
    image_std: Vec<f32>,
}

/// [`HfPixelConfig`] validated.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PixelSteps {
    pub resize: bool,
    pub filter: Filter,
    /// `rescale_factor`, or 1 when `do_rescale` is off.
    scale: f32,
    normalise: bool,
    /// The mean colour (also what pad-to-square fills with).
    pub mean: [f32; 3],
    std: [f32; 3],
}

impl HfPixelConfig {
    /// Checks the filter, the mean and the std; errors name the key.
    pub(crate) fn validate(&self) -> std::result::Result<PixelSteps, String> {
        let filter = Filter::from_pil(self.resample)
            .ok_or_else(|| format!("resample = {} is not supported (0, 1, 2, 3)", self.resample))?;
        let three = |v: &[f32]| <[f32; 3]>::try_from(v).ok();
        let (Some(mean), Some(std)) = (three(&self.image_mean), three(&self.image_std)) else {
            return Err(format!(
                "image_mean and image_std need 3 values each (image_mean has {}, image_std {})",
                self.image_mean.len(),
                self.image_std.len()
            ));
        };
        if std.iter().any(|s| *s <= 0.0) {
            return Err(format!("image_std {std:?} must be positive"));
        }
        Ok(PixelSteps {
            resize: self.do_resize,
            filter,
            scale: if self.do_rescale {
                self.rescale_factor as f32
            } else {
                1.0
            },
            normalise: self.do_normalize,
            mean,
            std,
        })
    }
}

impl PixelSteps {
    /// One channel's grey level rescaled and normalised.
    pub(crate) fn value(&self, level: u8, channel: usize) -> f32 {
        let v = level as f32 * self.scale;
        if self.normalise {
            (v - self.mean[channel]) / self.std[channel]
        } else {
            v
        }
    }
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}
fn inv255() -> f64 {
    1.0 / 255.0
}
fn clip_mean() -> Vec<f32> {
    vec![0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn clip_std() -> Vec<f32> {
    vec![0.268_629_54, 0.261_302_6, 0.275_777_1]
}

/// A validated image processor.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    steps: PixelSteps,
    shortest_edge: Option<u32>,
    resize_to: Option<(u32, u32)>,
    crop: Option<(u32, u32)>,
    /// Pad to a square with the mean colour before resizing (LLaVA-1.5 evaluation).
    pub pad_to_square: bool,
}

impl ImageProcessor {
    /// Reads `dir/preprocessor_config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        load_config(dir, Self::new)
    }

    fn new(config: HfImageProcessorConfig) -> std::result::Result<Self, String> {
        let steps = config.pixels.validate()?;
        let size = config.size.clone().unwrap_or_default();
        let (shortest_edge, resize_to) = match (size.shortest_edge, size.height, size.width) {
            (Some(s), _, _) if s > 0 => (Some(s), None),
            (_, Some(h), Some(w)) if h > 0 && w > 0 => (None, Some((w, h))),
            _ if !steps.resize => (None, None),
            _ => return Err("size needs shortest_edge or height and width".into()),
        };
        let crop = match (config.do_center_crop, config.crop_size.as_ref()) {
            (false, _) => None,
            (
                true,
                Some(HfSize {
                    height: Some(h),
                    width: Some(w),
                    ..
                }),
            ) if *h > 0 && *w > 0 => Some((*w, *h)),
            (true, _) => return Err("crop_size needs height and width".into()),
        };
        Ok(Self {
            steps,
            shortest_edge,
            resize_to,
            crop,
            pad_to_square: false,
        })
    }

    /// Output `(width, height)` for an input image.
    pub fn output_size(&self, width: u32, height: u32) -> (u32, u32) {
        let side = width.max(height);
        let (w, h) = if self.pad_to_square {
            (side, side)
        } else {
            (width, height)
        };
        let (w, h) = self.resized(w, h);
        self.crop.unwrap_or((w, h))
    }

    fn resized(&self, w: u32, h: u32) -> (u32, u32) {
        if !self.steps.resize {
            return (w, h);
        }
        if let Some(s) = self.shortest_edge {
            // transformers' get_resize_output_image_size(default_to_square=False).
            let (short, long) = (w.min(h), w.max(h));
            let new_long = (s as u64 * long as u64 / short.max(1) as u64) as u32;
            if w <= h { (s, new_long) } else { (new_long, s) }
        } else {
            self.resize_to.unwrap_or((w, h))
        }
    }

    /// The picture the vision tower sees, before rescaling and normalisation: padded,
    /// resized and cropped as [`ImageProcessor::process`] does (its patch grid is the
    /// image tokens').
    pub fn picture(&self, image: &DynamicImage) -> Result<RgbImage> {
        if image.width() == 0 || image.height() == 0 {
            return Err(ModelError::Image(
                "the image has zero width or height".into(),
            ));
        }
        let mut rgb: RgbImage = image.to_rgb8();
        if self.pad_to_square {
            rgb = expand_to_square(&rgb, &self.steps.mean);
        }
        let (w, h) = self.resized(rgb.width(), rgb.height());
        if (w, h) != rgb.dimensions() {
            rgb = resample::resize(&rgb, w, h, self.steps.filter);
        }
        if let Some((cw, ch)) = self.crop {
            rgb = center_crop(&rgb, cw, ch);
        }
        Ok(rgb)
    }

    /// Opens an image file and returns [`ImageProcessor::picture`] of it.
    pub fn open_picture(&self, path: &Path) -> Result<RgbImage> {
        self.picture(&open_image(path)?)
    }

    /// Opens and preprocesses an image file.
    pub fn open(&self, path: &Path) -> Result<(Vec<f32>, [usize; 3])> {
        self.process(&open_image(path)?)
    }

    /// Decodes an encoded image (PNG, JPEG, ...) held in memory within `limits`, then
    /// preprocesses it; `name` says where it came from in errors.
    pub fn decode(
        &self,
        bytes: &[u8],
        name: &str,
        limits: &ImageLimits,
    ) -> Result<(Vec<f32>, [usize; 3])> {
        self.process(&decode_image(bytes, name, limits)?)
    }

    /// Preprocesses a decoded image into `[3, height, width]` normalised f32 data.
    pub fn process(&self, image: &DynamicImage) -> Result<(Vec<f32>, [usize; 3])> {
        let rgb = self.picture(image)?;
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let mut out = vec![0.0f32; 3 * h * w];
        for (x, y, pixel) in rgb.enumerate_pixels() {
            for c in 0..3 {
                out[(c * h + y as usize) * w + x as usize] = self.steps.value(pixel.0[c], c);
            }
        }
        Ok((out, [3, h, w]))
    }
}

/// Reads `dir/preprocessor_config.json` as `T` and builds the processor from it with
/// `build`; a missing file, bad JSON or a refused value is an error naming the file.
pub(crate) fn load_config<T: serde::de::DeserializeOwned, P>(
    dir: &Path,
    build: impl FnOnce(T) -> std::result::Result<P, String>,
) -> Result<P> {
    let path = dir.join("preprocessor_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let config: T = serde_json::from_str(&text)
        .map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))?;
    build(config).map_err(|e| ModelError::Config(format!("{}: {e}", path.display())))
}

/// What an image may cost to decode: its header is checked before any pixel is decoded,
/// so a small file that declares a huge picture (a decompression bomb) is refused cheaply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest width or height.
    pub max_side: u32,
    /// Largest width x height.
    pub max_pixels: u64,
    /// Most bytes the decoder may allocate.
    pub max_alloc: u64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_side: MAX_IMAGE_SIDE,
            max_pixels: MAX_IMAGE_SIDE as u64 * MAX_IMAGE_SIDE as u64,
            max_alloc: 1 << 30,
        }
    }
}

/// The format of an encoded image by its leading bytes (`"png"`, `"jpeg"`, ...), if known.
pub fn sniff_format(bytes: &[u8]) -> Option<&'static str> {
    image::guess_format(bytes)
        .ok()
        .and_then(|f| f.extensions_str().first().copied())
}

/// Opens and decodes an image file within the default [`ImageLimits`].
pub fn open_image(path: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::open(path)
        .map_err(|e| ModelError::Image(format!("cannot open {}: {e}", path.display())))?;
    decode(reader, &path.display().to_string(), &ImageLimits::default())
}

/// Decodes an encoded image (PNG, JPEG, ...) held in memory within `limits`; `name` says
/// where it came from in errors.
pub fn decode_image(bytes: &[u8], name: &str, limits: &ImageLimits) -> Result<DynamicImage> {
    decode(ImageReader::new(std::io::Cursor::new(bytes)), name, limits)
}

fn decode<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
    name: &str,
    limits: &ImageLimits,
) -> Result<DynamicImage> {
    use image::ImageDecoder;
    let unreadable = |e: &dyn std::fmt::Display| {
        ModelError::Image(format!("{name} is not a readable image: {e}"))
    };
    let mut decoder = reader
        .with_guessed_format()
        .map_err(|e| ModelError::Image(format!("cannot read {name}: {e}")))?
        .into_decoder()
        .map_err(|e| unreadable(&e))?;
    let (w, h) = decoder.dimensions();
    if w > limits.max_side || h > limits.max_side || w as u64 * h as u64 > limits.max_pixels {
        return Err(ModelError::Image(format!(
            "{name} declares {w} x {h} pixels, over the limit of {} per side and {} in all",
            limits.max_side, limits.max_pixels
        )));
    }
    let mut image_limits = Limits::default();
    image_limits.max_image_width = Some(limits.max_side);
    image_limits.max_image_height = Some(limits.max_side);
    image_limits.max_alloc = Some(limits.max_alloc);
    decoder
        .set_limits(image_limits)
        .map_err(|e| unreadable(&e))?;
    DynamicImage::from_decoder(decoder).map_err(|e| unreadable(&e))
}

/// LLaVA's `expand2square`: center the image on a square of the mean colour.
fn expand_to_square(rgb: &RgbImage, mean: &[f32]) -> RgbImage {
    let (w, h) = rgb.dimensions();
    if w == h {
        return rgb.clone();
    }
    let side = w.max(h);
    let fill = image::Rgb([0, 1, 2].map(|c| (mean[c] * 255.0) as u8));
    let mut square = RgbImage::from_pixel(side, side, fill);
    image::imageops::overlay(
        &mut square,
        rgb,
        ((side - w) / 2) as i64,
        ((side - h) / 2) as i64,
    );
    square
}

/// Crops the center, padding with black where the crop is larger (as transformers does).
fn center_crop(rgb: &RgbImage, cw: u32, ch: u32) -> RgbImage {
    let (w, h) = rgb.dimensions();
    let mut out = RgbImage::new(cw, ch);
    let top = (h as i64 - ch as i64) / 2;
    let left = (w as i64 - cw as i64) / 2;
    for y in 0..ch {
        for x in 0..cw {
            let (sx, sy) = (x as i64 + left, y as i64 + top);
            if sx >= 0 && sy >= 0 && (sx as u32) < w && (sy as u32) < h {
                out.put_pixel(x, y, *rgb.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}
