//! Tokenizer, LLaVA-1.5's chat format, and splicing image features into the prompt.

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use ecache_core::SlotKind;
use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};
use crate::llava::Llava;

/// LLaVA-1.5's single-turn chat format with the image first.
pub fn chat_prompt(question: &str) -> String {
    format!("USER: <image>\n{question} ASSISTANT:")
}

/// Who speaks a chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// Its name in chat messages and templates: `system`, `user`, `assistant`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One part of a chat turn: an image's place or a piece of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Image,
    Text(String),
}

/// One chat turn as the template sees it: its role and its parts, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub parts: Vec<Content>,
}

impl Turn {
    /// A user turn of `images` pictures followed by `question`.
    pub fn question(question: &str, images: usize) -> Self {
        let mut parts = vec![Content::Image; images];
        parts.push(Content::Text(question.to_string()));
        Self {
            role: Role::User,
            parts,
        }
    }

    /// Images the turn carries.
    pub fn images(&self) -> usize {
        self.parts.iter().filter(|p| **p == Content::Image).count()
    }

    /// The turn's text parts, in order.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Content::Text(t) => Some(t.as_str()),
            Content::Image => None,
        })
    }
}

/// LLaVA-1.5's chat template as the llava-hf checkpoints ship it (`chat_template` of
/// `llava-1.5-7b-hf`): each turn but a system one opens with `USER: ` or `ASSISTANT: `,
/// then one `<image>\n` per image (wherever the turn had it), then each text part
/// followed by a space; the prompt
/// ends with `ASSISTANT:`. One user turn holding an image and a question renders exactly
/// as [`chat_prompt`] does.
pub fn chat_template(turns: &[Turn]) -> String {
    let mut out = String::new();
    for turn in turns {
        match turn.role {
            Role::System => {}
            Role::User => out.push_str("USER: "),
            Role::Assistant => out.push_str("ASSISTANT: "),
        }
        for _ in 0..turn.images() {
            out.push_str("<image>\n");
        }
        for text in turn.texts() {
            out.push_str(text);
            out.push(' ');
        }
    }
    out.push_str("ASSISTANT:");
    out
}

/// A checkpoint's `tokenizer.json` with the model's image token.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    image_token_id: u32,
}

impl PromptTokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn load(dir: &Path, image_token_id: u32) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Tokenizer(format!(
                "{} does not exist",
                path.display()
            )));
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self {
            tokenizer,
            image_token_id,
        })
    }

    /// Encodes a prompt with the tokenizer's special tokens (BOS). With an image, the prompt
    /// must hold exactly one `<image>` token.
    pub fn encode_prompt(&self, text: &str, with_image: bool) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(ModelError::Prompt("the prompt is empty".into()));
        }
        let ids = self.encode(text, true)?;
        let images = ids.iter().filter(|&&i| i == self.image_token_id).count();
        match (with_image, images) {
            (true, 1) | (false, 0) => Ok(ids),
            (true, 0) => Err(ModelError::Prompt(
                "an image is given but the prompt has no <image> token".into(),
            )),
            (false, n) => Err(ModelError::Prompt(format!(
                "the prompt has {n} <image> token(s) but no image is given"
            ))),
            (true, n) => Err(ModelError::Prompt(format!(
                "the prompt has {n} <image> tokens; one image takes exactly one"
            ))),
        }
    }

    /// How many positions the encoded prompt `ids` takes once each `<image>` token is
    /// replaced by the image's `image_tokens` features.
    pub fn sequence_len(&self, ids: &[u32], image_tokens: usize) -> usize {
        let images = ids.iter().filter(|&&i| i == self.image_token_id).count();
        ids.len() - images + images * image_tokens
    }

    /// Encodes answer text without special tokens.
    pub fn encode_answer(&self, text: &str) -> Result<Vec<u32>> {
        self.encode(text, false)
    }

    /// The tokenizer's ids for `text`, with its special tokens added when `special`.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }
}

/// `ids` with their `i`-th image token repeated `counts[i]` times: one id per image slot,
/// as transformers' processors expand them. The caller has checked that `ids` holds one
/// image token per count.
pub fn expand_image_tokens(ids: Vec<u32>, image_token: u32, counts: &[usize]) -> Vec<u32> {
    let mut counts = counts.iter();
    let mut out = Vec::with_capacity(ids.len() + counts.as_slice().iter().sum::<usize>());
    for id in ids {
        if id == image_token {
            let n = counts.next().copied().unwrap_or(1);
            out.extend(std::iter::repeat_n(id, n));
        } else {
            out.push(id);
        }
    }
    out
}

/// Prompt embeddings with the image's features in place of its `<image>` token, and the
/// kind of every slot.
///
/// # Shapes
/// - `ids`: the prompt's `n` token ids (one `<image>` when `features` is given)
/// - `features`: `[1, image_tokens, hidden]`
/// - returns `[1, n - 1 + image_tokens, hidden]` (or `[1, n, hidden]` without an image)
pub fn splice<B: Backend>(
    model: &Llava<B>,
    ids: &[u32],
    image_token_id: u32,
    features: Option<Tensor<B, 3>>,
    device: &B::Device,
) -> (Tensor<B, 3>, Vec<SlotKind>) {
    let embed = |part: &[u32]| {
        let data: Vec<i64> = part.iter().map(|&i| i as i64).collect();
        model.decoder.embed(Tensor::<B, 2, Int>::from_data(
            TensorData::new(data, [1, part.len()]),
            device,
        ))
    };
    match (features, ids.iter().position(|&i| i == image_token_id)) {
        (Some(features), Some(at)) => {
            let n = features.dims()[1];
            let mut parts = Vec::new();
            if at > 0 {
                parts.push(embed(&ids[..at]));
            }
            parts.push(features);
            if at + 1 < ids.len() {
                parts.push(embed(&ids[at + 1..]));
            }
            let kinds = [
                vec![SlotKind::Text; at],
                vec![SlotKind::Image; n],
                vec![SlotKind::Text; ids.len() - at - 1],
            ]
            .concat();
            (Tensor::cat(parts, 1), kinds)
        }
        _ => (embed(ids), vec![SlotKind::Text; ids.len()]),
    }
}

/// The prompt's embeddings with each image token's row replaced by the next row of
/// `features`, and each slot's kind (any architecture: `ids` has one image token per
/// image slot, as [`crate::model::Frontend::encode_prompt`] makes them).
///
/// # Shapes
/// - `ids`: `T` token ids; `features`: `[image tokens, hidden]` -> `[1, T, hidden]`
pub fn embed_with_images<B: Backend>(
    decoder: &crate::llama::LlamaDecoder<B>,
    ids: &[u32],
    image_token: u32,
    features: Option<Tensor<B, 2>>,
    device: &B::Device,
) -> Result<(Tensor<B, 3>, Vec<SlotKind>)> {
    let t = ids.len();
    let kinds: Vec<SlotKind> = ids
        .iter()
        .map(|&id| {
            if id == image_token {
                SlotKind::Image
            } else {
                SlotKind::Text
            }
        })
        .collect();
    let rows = kinds.iter().filter(|k| **k == SlotKind::Image).count();
    let ids_tensor = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect(), [1, t]),
        device,
    );
    let embeds = decoder.embed(ids_tensor);
    let Some(features) = features else {
        return if rows == 0 {
            Ok((embeds, kinds))
        } else {
            Err(ModelError::Prompt(format!(
                "{rows} image tokens and no image features"
            )))
        };
    };
    let [n, hidden] = features.dims();
    if n != rows {
        return Err(ModelError::Prompt(format!(
            "{rows} image tokens for {n} image features"
        )));
    }
    // Runs of text and image rows, concatenated in order.
    let mut parts = Vec::new();
    let (mut i, mut f) = (0, 0);
    while i < t {
        let kind = kinds[i];
        let len = kinds[i..].iter().take_while(|k| **k == kind).count();
        parts.push(match kind {
            SlotKind::Text => embeds.clone().narrow(1, i, len),
            SlotKind::Image => features.clone().narrow(0, f, len).reshape([1, len, hidden]),
        });
        if kind == SlotKind::Image {
            f += len;
        }
        i += len;
    }
    Ok((Tensor::cat(parts, 1), kinds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(role: Role, images: usize, texts: &[&str]) -> Turn {
        let mut parts = vec![Content::Image; images];
        parts.extend(texts.iter().map(|t| Content::Text(t.to_string())));
        Turn { role, parts }
    }

    /// The llava-hf template, rendered by hand for a system turn, a user turn with an
    /// image, an assistant answer and a follow-up question.
    #[test]
    fn chat_template_renders_as_llava_hf() {
        let q = "what is in the picture ?";
        assert_eq!(chat_template(&[turn(Role::User, 1, &[q])]), chat_prompt(q));
        let turns = [
            turn(Role::System, 0, &["Answer briefly."]),
            turn(Role::User, 1, &["how many", "objects ?"]),
            turn(Role::Assistant, 0, &["three ."]),
            turn(Role::User, 0, &["and their colour ?"]),
        ];
        assert_eq!(
            chat_template(&turns),
            "Answer briefly. USER: <image>\nhow many objects ? ASSISTANT: three . USER: and their colour ? ASSISTANT:"
        );
    }
}
