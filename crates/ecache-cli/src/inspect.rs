//! `ecache inspect`: pictures of what each decoder layer keeps. One greedy generation under
//! a policy; for every layer, the picture the vision tower saw with its patch grid coloured
//! by what happened to each image slot (kept, merged into a kept slot, removed) after the
//! prefill and at the end, a strip of the text slots under each, and an `index.html` that
//! shows them all beside the answer.
//!
//! The colours come from the session itself: the prefill's own record of what each layer
//! kept and merged ([`Sequence::record_prefill`]) and each layer's slot table at the end.
//! A slot merged at the prefill counts as merged at the end while its anchor is still held.
//! (No built-in policy merges while decoding.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::tensor::DType;
use ecache_core::{PolicyConfig, SlotKind};
use ecache_model::Session;
use ecache_model::kernels::KernelBackend;
use ecache_model::sequence::PrefillRecord;
use image::{Rgb, RgbImage};
use serde::Serialize;

use crate::BadInput;
use crate::backend::BackendJob;
use crate::policies::builtin_registry;

/// What happened to a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fate {
    Kept,
    Merged,
    Removed,
}

impl Fate {
    /// Its colour in the pictures.
    pub fn colour(self) -> Rgb<u8> {
        match self {
            Fate::Kept => Rgb([40, 170, 70]),
            Fate::Merged => Rgb([250, 170, 20]),
            Fate::Removed => Rgb([70, 70, 70]),
        }
    }

    /// The fate whose colour this is, if any.
    pub fn of_colour(colour: Rgb<u8>) -> Option<Fate> {
        [Fate::Kept, Fate::Merged, Fate::Removed]
            .into_iter()
            .find(|f| f.colour() == colour)
    }
}

/// One inspection: a model, an image, a question, a policy.
pub struct InspectRequest {
    pub model_dir: PathBuf,
    pub image: PathBuf,
    pub prompt: String,
    pub policy: PolicyConfig,
    pub max_new_tokens: usize,
    pub out: PathBuf,
    pub pad_to_square: bool,
    /// Precision of the weights and activations.
    pub dtype: DType,
}

/// What an inspection found, per layer, by slot position.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub answer: String,
    /// The greedy tokens generated.
    pub tokens: Vec<u32>,
    /// Prompt slot kinds, by position.
    pub kinds: Vec<SlotKind>,
    /// Per layer: each slot's fate after the prefill (prompt positions) and at the end
    /// (every position fed: the prompt and all generated tokens but the last).
    pub after_prefill: Vec<Vec<Fate>>,
    pub at_end: Vec<Vec<Fate>>,
    /// How the image's slots lie over the picture, `(rows, columns)`: its last
    /// `rows x columns` image slots are the cells, row by row.
    pub cells: [usize; 2],
    /// The picture files, one per layer, relative to the output directory.
    pub pictures: Vec<String>,
}

impl Inspection {
    /// Layer `layer`'s image slots kept, merged and removed, after the prefill and at the
    /// end.
    pub fn image_counts(&self, layer: usize) -> [[usize; 3]; 2] {
        let count = |fates: &[Fate]| {
            let mut n = [0; 3];
            for (p, f) in fates.iter().enumerate() {
                if self.kinds.get(p) == Some(&SlotKind::Image) {
                    n[*f as usize] += 1;
                }
            }
            n
        };
        [
            count(&self.after_prefill[layer]),
            count(&self.at_end[layer]),
        ]
    }
}

/// Pixel geometry of a layer's picture: two panels (after the prefill, at the end) side by
/// side, each the scaled picture with a strip of text slots under it.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Side of one patch in picture pixels (after scaling).
    pub patch: u32,
    /// Picture width and height after scaling.
    pub width: u32,
    pub height: u32,
    /// Width of one text cell, cells per strip row, strip rows.
    pub cell: u32,
    pub cells_per_row: u32,
    pub strip_rows: u32,
}

/// Gap between the panels and around the strip, in pixels.
const GAP: u32 = 8;

impl Layout {
    fn new(cells: [usize; 2], picture: (u32, u32), text_slots: usize) -> Self {
        let scale = (336 / picture.0.max(1)).max(1);
        let (width, height) = (picture.0 * scale, picture.1 * scale);
        let cell = 12;
        let cells_per_row = (width / cell).max(1);
        Self {
            patch: width / cells[1].max(1) as u32,
            width,
            height,
            cell,
            cells_per_row,
            strip_rows: (text_slots as u32).div_ceil(cells_per_row).max(1),
        }
    }

    /// The whole image's size.
    pub fn size(&self) -> (u32, u32) {
        (
            2 * self.width + GAP,
            self.height + GAP + self.strip_rows * self.cell,
        )
    }

    /// The centre of patch `i` (row by row, `columns` to a row) in panel `panel` (0: after
    /// prefill, 1: end).
    pub fn patch_centre(&self, panel: u32, columns: usize, i: usize) -> (u32, u32) {
        let (row, col) = ((i / columns) as u32, (i % columns) as u32);
        let x0 = panel * (self.width + GAP);
        (
            x0 + col * self.patch + self.patch / 2,
            row * self.patch + self.patch / 2,
        )
    }

    /// The centre of text cell `k` in panel `panel`.
    pub fn cell_centre(&self, panel: u32, k: usize) -> (u32, u32) {
        let (row, col) = (k as u32 / self.cells_per_row, k as u32 % self.cells_per_row);
        let x0 = panel * (self.width + GAP);
        (
            x0 + col * self.cell + self.cell / 2,
            self.height + GAP + row * self.cell + self.cell / 2,
        )
    }
}

/// The layout of an inspection's pictures (the picture the model saw is `picture` pixels).
pub fn layout(inspection: &Inspection, picture: (u32, u32)) -> Layout {
    let text = inspection.at_end[0].len()
        - inspection
            .kinds
            .iter()
            .filter(|k| **k == SlotKind::Image)
            .count();
    Layout::new(inspection.cells, picture, text)
}

/// Fates of positions `0..n` from what a layer holds (`held`, ascending positions) and
/// the prefill's merges (members count as merged while their anchor is held).
pub fn fates(n: usize, held: &[usize], merged: &[(usize, Vec<usize>)]) -> Vec<Fate> {
    let mut out = vec![Fate::Removed; n];
    for &p in held {
        if p < n {
            out[p] = Fate::Kept;
        }
    }
    for (anchor, members) in merged {
        if held.binary_search(anchor).is_ok() {
            for &m in members {
                if m < n && out[m] == Fate::Removed {
                    out[m] = Fate::Merged;
                }
            }
        }
    }
    out
}

/// Runs the inspection on `backend` and writes its pictures and `index.html`.
pub fn run(request: InspectRequest, backend: ecache_core::BackendKind) -> Result<Inspection> {
    crate::backend::on_backend(backend, request)
}

impl BackendJob for InspectRequest {
    type Output = Inspection;

    fn run<B: KernelBackend>(self, device: &B::Device) -> Result<Inspection> {
        let bad = |e: &dyn std::fmt::Display| BadInput(format!("{e}"));
        let policy = builtin_registry()?
            .build(&self.policy)
            .map_err(|e| bad(&e))?;
        let dir = &self.model_dir;
        let options = ecache_model::FrontendOptions {
            pad_to_square: self.pad_to_square,
        };
        let frontend = ecache_model::load_frontend(dir, options).map_err(|e| bad(&e))?;
        let model = ecache_model::load_model::<B>(dir, device, self.dtype).map_err(|e| bad(&e))?;
        let image = ecache_model::model::open_image(&self.image).map_err(|e| bad(&e))?;
        let picture = frontend.picture(&image).map_err(|e| bad(&e))?;
        let (prompt, pixels) = ecache_model::image_prompt(
            frontend.as_ref(),
            model.as_ref(),
            &self.prompt,
            &image,
            device,
            self.dtype,
        )
        .map_err(|e| bad(&e))?;
        let text = frontend.text();
        let t = prompt.kinds.len();
        if t + self.max_new_tokens > text.max_positions {
            return Err(BadInput(format!(
                "the prompt's {t} tokens and {} new ones exceed the model's context of {}",
                self.max_new_tokens, text.max_positions
            ))
            .into());
        }
        let kinds = prompt.kinds.clone();
        let mut session = Session::new(
            model.decoder(),
            text,
            policy.as_ref(),
            self.policy.positions,
            1,
            device,
            self.dtype,
        );
        session.sequences_mut()[0].record_prefill();
        let mut row = ecache_model::generate::rows_of(session.prefill_prompt_last(prompt)?)?;
        let records: Vec<PrefillRecord> = session.sequences()[0]
            .prefill_records()
            .unwrap_or_default()
            .to_vec();
        let mut tokens = Vec::new();
        for step in 0..self.max_new_tokens {
            let next = ecache_model::generate::argmax(&row[0]);
            tokens.push(next);
            if text.eos_token_ids.contains(&next) || step + 1 == self.max_new_tokens {
                break;
            }
            row = ecache_model::generate::rows_of(session.step(&[next])?)?;
        }
        let fed = session.tokens_seen()[0];
        let after_prefill: Vec<Vec<Fate>> = records
            .iter()
            .map(|r| fates(t, &r.kept, &r.merged))
            .collect();
        let at_end: Vec<Vec<Fate>> = session.sequences()[0]
            .caches()
            .iter()
            .zip(&records)
            .map(|(cache, r)| {
                let held = cache.table(0).map(|t| t.positions().to_vec());
                held.map(|h| fates(fed, &h, &r.merged))
            })
            .collect::<std::result::Result<_, _>>()?;
        let answer = frontend.tokenizer().decode(&tokens).map_err(|e| bad(&e))?;
        let mut inspection = Inspection {
            answer,
            tokens,
            kinds,
            after_prefill,
            at_end,
            cells: pixels.cells,
            pictures: Vec::new(),
        };
        write(&self, &mut inspection, &picture)?;
        Ok(inspection)
    }
}

/// Writes one PNG per layer and `index.html`.
fn write(request: &InspectRequest, inspection: &mut Inspection, picture: &RgbImage) -> Result<()> {
    let out = &request.out;
    std::fs::create_dir_all(out)
        .map_err(|e| BadInput(format!("cannot create {}: {e}", out.display())))?;
    let layout = layout(inspection, picture.dimensions());
    let scaled = image::imageops::resize(
        picture,
        layout.width,
        layout.height,
        image::imageops::FilterType::Nearest,
    );
    let image_positions: Vec<usize> = (0..inspection.kinds.len())
        .filter(|&p| inspection.kinds[p] == SlotKind::Image)
        .collect();
    // With a class token among the image slots (feature strategy "full"), it is the first.
    let skip = image_positions
        .len()
        .saturating_sub(inspection.cells[0] * inspection.cells[1]);
    for (layer, (prefill, end)) in inspection
        .after_prefill
        .iter()
        .zip(&inspection.at_end)
        .enumerate()
    {
        let (w, h) = layout.size();
        let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
        for (panel, fates) in [(0u32, prefill), (1, end)] {
            draw_panel(
                &mut img,
                &layout,
                panel,
                &scaled,
                inspection,
                &image_positions[skip..],
                fates,
            );
        }
        let name = format!("layer-{layer:02}.png");
        img.save(out.join(&name))
            .map_err(|e| BadInput(format!("cannot write {}: {e}", out.join(&name).display())))?;
        inspection.pictures.push(name);
    }
    crate::eval::write_atomically(&out.join("index.html"), &html(request, inspection))?;
    crate::eval::write_atomically(
        &out.join("inspection.json"),
        &(serde_json::to_string(inspection)? + "\n"),
    )
}

fn draw_panel(
    img: &mut RgbImage,
    layout: &Layout,
    panel: u32,
    picture: &RgbImage,
    inspection: &Inspection,
    image_positions: &[usize],
    fates: &[Fate],
) {
    let x0 = panel * (layout.width + GAP);
    let fate_of: HashMap<usize, Fate> = fates.iter().copied().enumerate().collect();
    let [rows, columns] = inspection.cells.map(|c| c as u32);
    for (x, y, p) in picture.enumerate_pixels() {
        let (col, row) = (x / layout.patch, y / layout.patch);
        // Pixels past the last whole patch (a picture not a multiple of the grid) stay as
        // they are.
        let cell = (col < columns && row < rows).then(|| (row * columns + col) as usize);
        let mut c = *p;
        let fate = cell
            .and_then(|cell| image_positions.get(cell))
            .and_then(|pos| fate_of.get(pos));
        if let Some(f) = fate {
            let tint = f.colour();
            let alpha = if *f == Fate::Removed { 0.7 } else { 0.4 };
            for k in 0..3 {
                c.0[k] = (c.0[k] as f32 * (1.0 - alpha) + tint.0[k] as f32 * alpha) as u8;
            }
        }
        let edge = x % layout.patch == 0 || y % layout.patch == 0;
        img.put_pixel(x0 + x, y, if edge { Rgb([255, 255, 255]) } else { c });
    }
    // A solid mark at each patch's centre in its fate's colour (what a reader or a test
    // can read back exactly).
    let mark = (layout.patch / 5).max(1);
    for (i, pos) in image_positions.iter().enumerate() {
        let Some(f) = fate_of.get(pos) else { continue };
        let (cx, cy) = layout.patch_centre(panel, inspection.cells[1], i);
        fill(img, cx, cy, mark, f.colour());
    }
    let text: Vec<usize> = (0..fates.len())
        .filter(|&p| inspection.kinds.get(p) != Some(&SlotKind::Image))
        .collect();
    for (k, p) in text.iter().enumerate() {
        let (cx, cy) = layout.cell_centre(panel, k);
        fill(img, cx, cy, layout.cell / 2 - 1, fates[*p].colour());
    }
}

/// Fills the square of half-side `half` around `(cx, cy)`.
fn fill(img: &mut RgbImage, cx: u32, cy: u32, half: u32, colour: Rgb<u8>) {
    for y in cy.saturating_sub(half)..=(cy + half).min(img.height() - 1) {
        for x in cx.saturating_sub(half)..=(cx + half).min(img.width() - 1) {
            img.put_pixel(x, y, colour);
        }
    }
}

fn html(request: &InspectRequest, inspection: &Inspection) -> String {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let swatch = |f: Fate| {
        let Rgb([r, g, b]) = f.colour();
        format!("<span style=\"background:rgb({r},{g},{b});padding:0 0.8em\"></span>")
    };
    let mut body = format!(
        "<h1>What each layer keeps</h1>\n<p>Model <code>{}</code>, image <code>{}</code>, policy <b>{}</b> at budget {} {}</p>\n<p>Question: {}</p>\n<p>Answer ({} tokens): <b>{}</b></p>\n<p>{} kept &nbsp; {} merged into a kept slot &nbsp; {} removed. Left: after the prefill; right: at the end. The strip under each picture is the text slots, prompt then generated, in order.</p>\n",
        escape(&request.model_dir.display().to_string()),
        escape(&request.image.display().to_string()),
        escape(&request.policy.name),
        request.policy.budget,
        escape(&crate::eval::params_label(&request.policy)),
        escape(&request.prompt),
        inspection.tokens.len(),
        escape(&inspection.answer),
        swatch(Fate::Kept),
        swatch(Fate::Merged),
        swatch(Fate::Removed),
    );
    for (layer, name) in inspection.pictures.iter().enumerate() {
        let [[pk, pm, pr], [ek, em, er]] = inspection.image_counts(layer);
        body += &format!(
            "<h2>Layer {layer}</h2>\n<p>image slots after the prefill: {pk} kept, {pm} merged, {pr} removed; at the end: {ek} kept, {em} merged, {er} removed</p>\n<img src=\"{name}\" alt=\"layer {layer}\">\n",
        );
    }
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>ecache inspect</title></head>\n<body style=\"font-family:sans-serif;max-width:60em\">\n{body}</body></html>\n"
    )
}

/// Reads the fate colours back from a layer's picture: the marks at the patch centres of
/// `panel` (for tests and for anyone checking a picture).
pub fn read_patch_fates(
    path: &Path,
    layout: &Layout,
    panel: u32,
    columns: usize,
    patches: usize,
) -> Result<Vec<Option<Fate>>> {
    let img = image::open(path)
        .map_err(|e| BadInput(format!("cannot read {}: {e}", path.display())))?
        .to_rgb8();
    Ok((0..patches)
        .map(|i| {
            let (x, y) = layout.patch_centre(panel, columns, i);
            Fate::of_colour(*img.get_pixel(x, y))
        })
        .collect())
}

/// `ecache inspect` arguments.
#[derive(clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: crate::args::ModelArgs,
    /// The image (default with the demo model: its bundled scene).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// A question (wrapped in the chat format) or a full prompt with `<image>` (default
    /// with the demo model: its description question).
    #[arg(long)]
    pub prompt: Option<String>,
    #[command(flatten)]
    pub policy: crate::args::PolicyArgs,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Where the pictures and index.html go.
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `ecache inspect`.
pub fn command(args: InspectArgs) -> Result<()> {
    let mut config = crate::args::run_config(&args.policy, "elastic", 0.2)?;
    let demo = args.model.model.is_none() && config.model.path.is_none();
    if demo {
        config.model.path = Some(crate::demo::model_dir());
    }
    let model_dir = args.model.apply(&mut config)?;
    let (image, prompt) = match (args.image, args.prompt) {
        (Some(i), Some(p)) => (i, p),
        (i, p) if demo => (
            i.unwrap_or_else(|| model_dir.join("scene.png")),
            p.unwrap_or_else(|| ecache_demo::language::DESCRIBE.to_string()),
        ),
        _ => return Err(BadInput("give --image IMG and --prompt TEXT".into()).into()),
    };
    if args.max_new_tokens == 0 {
        return Err(BadInput("--max-new-tokens must be at least 1".into()).into());
    }
    let request = InspectRequest {
        model_dir,
        image,
        prompt,
        policy: config.policy.clone(),
        max_new_tokens: args.max_new_tokens,
        out: args.out.clone(),
        pad_to_square: args.model.pad_to_square,
        dtype: crate::backend::dtype(config.model.dtype),
    };
    let inspection = run(request, config.model.backend)?;
    println!("answer: {}", inspection.answer);
    for layer in 0..inspection.pictures.len() {
        let [[pk, pm, pr], [ek, em, er]] = inspection.image_counts(layer);
        println!(
            "layer {layer:>2}: image slots kept/merged/removed after prefill {pk}/{pm}/{pr}, at the end {ek}/{em}/{er}"
        );
    }
    println!("wrote {}", args.out.join("index.html").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only image slots are counted, each by its fate, after the prefill and at the end.
    #[test]
    fn image_counts_count_image_slots_by_fate() {
        use Fate::{Kept as K, Merged as M, Removed as R};
        let (t, i) = (SlotKind::Text, SlotKind::Image);
        let inspection = Inspection {
            answer: String::new(),
            tokens: vec![],
            kinds: vec![t, i, i, i, i, t],
            after_prefill: vec![vec![K, K, M, M, R, R]],
            at_end: vec![vec![K, R, M, R, R, K, K]],
            cells: [2, 2],
            pictures: vec![],
        };
        assert_eq!(inspection.image_counts(0), [[1, 2, 1], [0, 1, 3]]);
    }
}
