//! Training scaffolding: the oracle the decoder reads first, and the losses that tell heads
//! where to look (focus on the asked cell, cues in the question) or a probe what a cell
//! holds. None of it is exported with the model.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Int, Tensor, TensorData, activation::log_softmax, backend::Backend};
use ecache_model::Llava;

use crate::batch::{Batch, ORACLE_WORDS};
use crate::scene::{COLOURS, SHAPES, SIZES};

/// The oracle embedding of every image token: the sum of the decoder's embeddings of the
/// words that name the token's grid cell and the object in it (or the cell alone). In the
/// first training stage the decoder reads these in place of the tower's features, so that it
/// learns to find and read a cell while its inputs are already in its own word space (as
/// LLaVA's pretrained language model is); the tower and projector meanwhile learn to produce
/// them, and the second stage hands the decoder the real features.
///
/// # Shapes
/// - returns `[batch, image_tokens, hidden]`
pub fn oracle_embeddings<B: Backend>(
    model: &Llava<B>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 3> {
    let (n, t) = (batch.size, batch.image_tokens);
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(batch.oracle_ids.clone(), [n, t * ORACLE_WORDS]),
        device,
    );
    let embeds = model.decoder.embed(ids);
    let hidden = embeds.dims()[2];
    let mask = Tensor::<B, 4>::from_data(
        TensorData::new(batch.oracle_mask.clone(), [n, t, ORACLE_WORDS, 1]),
        device,
    );
    (embeds.reshape([n, t, ORACLE_WORDS, hidden]) * mask)
        .sum_dim(2)
        .reshape([n, t, hidden])
}

/// How far the projected features are from the oracle: squared error relative to the
/// oracle's mean square (the oracle is a target here and gets no gradient).
///
/// # Shapes
/// - `features`, `oracle`: `[batch, image_tokens, hidden]` -> scalar
pub fn oracle_loss<B: Backend>(features: Tensor<B, 3>, oracle: Tensor<B, 3>) -> Tensor<B, 1> {
    let oracle = oracle.detach();
    let scale = oracle.clone().powi_scalar(2).mean().detach();
    (features - oracle).powi_scalar(2).mean() / scale
}

/// The focus loss: at every position whose prediction is about one object (its size,
/// colour or shape in a description; the answer to a question about one cell or object),
/// minus the log of the attention mass that the first head of the probed layer puts on the
/// image tokens of that object's cell; averaged so that every answer with such positions
/// weighs the same, however many it has. Training
/// scaffolding, like the oracle: it tells the decoder where to look, which plain
/// next-token loss did not teach it within the training budget (docs/demo.md).
///
/// # Shapes
/// - `probs`: `[batch, heads, sequence, sequence]` -> scalar
pub fn focus_loss<B: Backend>(
    probs: Tensor<B, 4>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 1> {
    let [n, _, t, _] = probs.dims();
    let (from, image) = (batch.prefix_len, batch.image_tokens);
    let head = probs
        .slice([0..n, 0..1, 0..t, from..from + image])
        .reshape([n, t, image]);
    let cells = Tensor::<B, 3>::from_data(
        TensorData::new(batch.focus_cells.clone(), [n, t, image]),
        device,
    );
    let weights =
        Tensor::<B, 2>::from_data(TensorData::new(batch.focus_weights.clone(), [n, t]), device);
    let mass = (head * cells).sum_dim(2).reshape([n, t]);
    (mass.add_scalar(1e-6).log() * weights).sum().neg()
}

/// The cue loss: at every position whose prediction is about one object, minus the log of
/// the attention mass that head `j * heads / 2` of the probed layer puts on the object's
/// `j`-th cue word (its cell's row and column words, or its colour and shape words;
/// [`Qa::cues`]), so that the first layer carries both words to the position that then
/// looks the object up. Averaged so that every answer with cues weighs the same.
/// Scaffolding like the focus loss: without it the first layer carried only the row word,
/// and the model answered from the occupied cell of the asked row (docs/demo.md).
///
/// # Shapes
/// - `probs`: `[batch, heads, sequence, sequence]` -> scalar
pub fn cue_loss<B: Backend>(
    probs: Tensor<B, 4>,
    batch: &Batch,
    device: &B::Device,
) -> Tensor<B, 1> {
    let [n, h, t, _] = probs.dims();
    let index: Vec<i64> = batch
        .cue_terms
        .iter()
        .map(|&(s, p, j, at, _)| ((((s * h + j * h / 2) * t + p) * t) + at) as i64)
        .collect();
    let weights: Vec<f32> = batch.cue_terms.iter().map(|term| term.4).collect();
    if index.is_empty() {
        return Tensor::zeros([1], device);
    }
    let terms = index.len();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [terms]), device);
    let weights = Tensor::<B, 1>::from_data(TensorData::new(weights, [terms]), device);
    let mass = probs.reshape([n * h * t * t]).select(0, index);
    (mass.add_scalar(1e-6).log() * weights).sum().neg()
}

/// A training-only probe that reads each grid cell's colour, shape and size (or "empty")
/// from the image feature at the cell's centre. It plays the part that a pretrained CLIP
/// plays in LLaVA: without it the tower trained from scratch collapsed to features that
/// were the same for every picture (the decoder learned the answers' language first and
/// the image tokens turned into constant attention sinks). Not exported.
#[derive(Module, Debug)]
pub struct CellProbe<B: Backend> {
    colour: Linear<B>,
    shape: Linear<B>,
    size: Linear<B>,
    cell: Linear<B>,
}

impl<B: Backend> CellProbe<B> {
    /// A probe over features of width `hidden`.
    pub fn init(hidden: usize, device: &B::Device) -> Self {
        let head = |classes| LinearConfig::new(hidden, classes).init(device);
        Self {
            colour: head(COLOURS.len() + 1),
            shape: head(SHAPES.len() + 1),
            size: head(SIZES.len() + 1),
            cell: head(9),
        }
    }

    /// Mean cross-entropy of the three attributes over every cell, and of every token's cell.
    ///
    /// # Shapes
    /// - `features`: `[batch, grid * grid, hidden]` -> scalar
    pub fn loss(&self, features: Tensor<B, 3>, batch: &Batch, device: &B::Device) -> Tensor<B, 1> {
        let [n, tokens, hidden] = features.dims();
        let grid = (tokens as f64).sqrt().round() as usize;
        let centre = |k: usize| k * grid / 3 + grid / 6;
        let index: Vec<i64> = (0..9)
            .map(|cell| (centre(cell / 3) * grid + centre(cell % 3)) as i64)
            .collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [9]), device);
        let cells = features.clone().select(1, index).reshape([n * 9, hidden]);
        let targets = Tensor::<B, 2, Int>::from_data(
            TensorData::new(batch.cell_targets.clone(), [n * 9, 3]),
            device,
        );
        let mut total = None;
        for (k, head) in [&self.colour, &self.shape, &self.size]
            .into_iter()
            .enumerate()
        {
            let logp = log_softmax(head.forward(cells.clone()), 1);
            let t = targets.clone().slice([0..n * 9, k..k + 1]);
            let loss = logp.gather(1, t).mean().neg();
            total = Some(match total {
                None => loss,
                Some(sum) => sum + loss,
            });
        }
        // Every token also says which cell it lies in, so that the decoder can find a
        // cell by content rather than by counting positions.
        let where_: Vec<i64> = (0..n)
            .flat_map(|_| {
                (0..tokens).map(|t| ((t / grid) * 3 / grid * 3 + (t % grid) * 3 / grid) as i64)
            })
            .collect();
        let where_ =
            Tensor::<B, 2, Int>::from_data(TensorData::new(where_, [n * tokens, 1]), device);
        let logp = log_softmax(self.cell.forward(features.reshape([n * tokens, hidden])), 1);
        let position = logp.gather(1, where_).mean().neg();
        (total.expect("three heads") + position) / 4.0
    }
}
