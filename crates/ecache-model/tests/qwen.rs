//! Qwen2-VL and Qwen2.5-VL against transformers: the image processor
//! (`Qwen2VLImageProcessorPil`) on three pictures that take each branch of `smart_resize`,
//! the vision towers' features, the decoder's logits at multimodal positions, and the
//! policies' PPL against the independent spec implementation, on the tiny random
//! checkpoints that `tools/make_qwen_fixtures.py` builds.

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use common::{fixture, json, max_difference, st_f32};
use ecache_core::{CachePolicy, PolicyConfig, PositionMode};
use ecache_model::embed_with_images;
use ecache_model::generate::{nll, rows_of};
use ecache_model::layers::Loader;
use ecache_model::llama::LlamaDecoder;
use ecache_model::qwen::{QwenVlConfig, mrope_positions};
use ecache_model::qwen_image::{QwenImageProcessor, QwenPixels};
use ecache_model::qwen_vision::QwenVision;
use ecache_model::weights::Checkpoint;
use ecache_model::{Runner, Sequence};

type B = common::AnyBackend;

const CHECKPOINTS: [&str; 2] = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"];
const PICTURES: [&str; 3] = ["wide", "large", "small"];

/// A tiny checkpoint, loaded whole (every tensor used), with its expectations.
struct Qwen {
    config: QwenVlConfig,
    tower: QwenVision<B>,
    decoder: LlamaDecoder<B>,
    processor: QwenImageProcessor,
    expected: serde_json::Value,
    tensors: Vec<u8>,
}

impl Qwen {
    fn load(name: &'static str) -> Self {
        let dir = fixture(name);
        let config = QwenVlConfig::from_path(&dir.join("config.json")).unwrap();
        let mut checkpoint = Checkpoint::open(&dir).unwrap();
        let mut loader = Loader::<B> {
            checkpoint: &mut checkpoint,
            device: &Default::default(),
            dtype: DType::F32,
        };
        let tower = QwenVision::load(&config.vision, &mut loader).unwrap();
        let decoder = LlamaDecoder::load(&config.text, &mut loader).unwrap();
        checkpoint.finish().unwrap();
        Self {
            config,
            tower,
            decoder,
            processor: QwenImageProcessor::load(&dir).unwrap(),
            expected: json(&dir.join("expected.json")),
            tensors: std::fs::read(dir.join("expected.safetensors")).unwrap(),
        }
    }

    fn expected_f32(&self, tensor: &str) -> (Vec<usize>, Vec<f32>) {
        st_f32(&self.tensors, tensor)
    }

    fn ids(&self, key: &str) -> Vec<u32> {
        ids_of(&self.expected[key])
    }

    fn pixels(&self, picture: &str) -> QwenPixels {
        let image = image::open(fixture("qwen2-vl-images").join(format!("{picture}.png"))).unwrap();
        self.processor.process(&image).unwrap()
    }

    /// The merger's output for a picture, `[tokens, hidden]`.
    fn features(&self, pixels: &QwenPixels) -> Tensor<B, 2> {
        let input = Tensor::<B, 2>::from_data(
            TensorData::new(pixels.patches.clone(), [pixels.rows(), pixels.row_len]),
            &Default::default(),
        );
        self.tower.forward(input, pixels.grid).unwrap()
    }

    /// A fresh sequence with the fixture's prompt (the wide picture) run under `policy`:
    /// the sequence and the hidden states of every prompt position.
    fn prefill(&self, policy: &dyn CachePolicy) -> (Sequence<B>, Tensor<B, 3>) {
        let device = Default::default();
        let prompt = self.ids("prompt_ids");
        let pixels = self.pixels("wide");
        let (embeds, kinds) = embed_with_images(
            &self.decoder,
            &prompt,
            self.config.image_token_id,
            Some(self.features(&pixels)),
            &device,
        )
        .unwrap();
        let (positions, _) = mrope_positions(
            &prompt,
            self.config.image_token_id,
            &[pixels.grid],
            self.config.vision.merge,
        )
        .unwrap();
        let mut seq = Sequence::new(
            &self.config.text,
            policy,
            PositionMode::Absolute,
            &device,
            DType::F32,
        );
        let hidden = self
            .runner()
            .prefill_at(&mut seq, policy, embeds, &kinds, Some(&positions))
            .unwrap();
        (seq, hidden)
    }

    fn runner(&self) -> Runner<'_, B> {
        Runner::new(&self.decoder, &self.config.text, &Default::default())
    }
}

/// A JSON array of token ids.
fn ids_of(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn patches_and_grids_match_transformers() {
    let dir = fixture("qwen2-vl-images");
    let processor = QwenImageProcessor::load(&dir).unwrap();
    let expected = json(&dir.join("expected.json"));
    let tensors = std::fs::read(dir.join("expected.safetensors")).unwrap();
    for name in PICTURES {
        let image = image::open(dir.join(format!("{name}.png"))).unwrap();
        let got = processor.process(&image).unwrap();
        let grid: Vec<usize> = expected["image_grid_thw"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(got.grid.to_vec(), grid, "{name}");
        let (shape, want) = st_f32(&tensors, &format!("pixel_values_{name}"));
        assert_eq!(shape, [got.rows(), got.row_len], "{name}");
        let max = max_difference(&got.patches, &want);
        assert!(max <= 1e-6, "{name}: max difference {max}");
        assert_eq!(processor.image_tokens(got.grid), got.rows() / 4);
    }
}

/// The vision towers (Qwen2.5-VL's with windows of 3 x 3 merge groups, padded, and one
/// full-attention block): features within 1e-4 of transformers' `get_image_features` for
/// the three pictures, from our own preprocessing.
#[test]
fn vision_features_match_transformers() {
    for name in CHECKPOINTS {
        let q = Qwen::load(name);
        for picture in PICTURES {
            let pixels = q.pixels(picture);
            let got: Vec<f32> = q.features(&pixels).into_data().into_vec().unwrap();
            let (shape, want) = q.expected_f32(&format!("features_{picture}"));
            assert_eq!(shape, [pixels.rows() / 4, 64], "{name} {picture}");
            let max = max_difference(&got, &want);
            assert!(max <= 1e-4, "{name} {picture}: max difference {max}");
        }
    }
}

/// A prompt with the wide picture under the full cache: every prompt position's logits,
/// then three tokens fed one at a time, within 1e-4 of transformers' (which places them
/// with `get_rope_index`). The tokens after the prompt continue at the true multimodal
/// position (`rope_deltas`: a mutation that drops it is off by 2.7 at the first new token).
#[test]
fn prompt_and_decode_logits_match_transformers() {
    let full = ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).unwrap();
    for name in CHECKPOINTS {
        let q = Qwen::load(name);
        let (prompt, continuation) = (q.ids("prompt_ids"), q.ids("continuation_ids"));
        let pixels = q.pixels("wide");
        let (_, delta) =
            mrope_positions(&prompt, q.config.image_token_id, &[pixels.grid], 2).unwrap();
        assert_eq!(delta, q.expected["rope_delta"].as_i64().unwrap());
        let (shape, want) = q.expected_f32("logits");
        let vocab = shape[1];
        let close = |got: &[f32], row: usize| {
            let max = max_difference(got, &want[row * vocab..(row + 1) * vocab]);
            assert!(max <= 1e-4, "{name} position {row}: max difference {max}");
        };
        let (mut seq, hidden) = q.prefill(full.as_ref());
        let logits: Vec<f32> = q.decoder.head(hidden).into_data().into_vec().unwrap();
        for row in 0..prompt.len() {
            close(&logits[row * vocab..(row + 1) * vocab], row);
        }
        let runner = q.runner();
        for (k, &token) in continuation.iter().enumerate() {
            let logits: Vec<f32> = runner
                .decode(&mut [(&mut seq, full.as_ref())], &[token])
                .unwrap()
                .into_data()
                .into_vec()
                .unwrap();
            close(&logits, prompt.len() + k);
        }
    }
}

/// Greedy decoding after the prompt under the full cache: the same eight tokens as
/// transformers' `generate()`, each fed back at its multimodal position.
#[test]
fn greedy_tokens_match_transformers() {
    let full = ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).unwrap();
    for name in CHECKPOINTS {
        let q = Qwen::load(name);
        let want = q.ids("greedy_ids");
        let (mut seq, hidden) = q.prefill(full.as_ref());
        let mut row = rows_of(q.decoder.last_logits(hidden)).unwrap().remove(0);
        let runner = q.runner();
        let mut got = Vec::new();
        while got.len() < want.len() {
            let next = ecache_model::generate::argmax(&row);
            got.push(next);
            let logits = runner
                .decode(&mut [(&mut seq, full.as_ref())], &[next])
                .unwrap();
            row = rows_of(logits).unwrap().remove(0);
        }
        assert_eq!(got, want, "{name}");
    }
}

/// The answer's teacher-forced PPL under the full cache (transformers' own, 1e-5) and
/// under local, h2o, elastic and snapkv at budget 0.5 (the independent spec
/// implementation over transformers' modules in tools/make_qwen_fixtures.py, 1e-4): the
/// decode steps run at the true multimodal positions while the policies remove and merge
/// slots.
#[test]
fn policies_match_the_spec_implementation() {
    for name in CHECKPOINTS {
        let q = Qwen::load(name);
        let answer = q.ids("answer_ids");
        let ppl = |policy: &dyn CachePolicy| -> f64 {
            let (mut seq, hidden) = q.prefill(policy);
            let t = hidden.dims()[1];
            let last = q.decoder.head(hidden.narrow(1, t - 1, 1));
            let vocab = q.config.text.vocab_size;
            let mut row = rows_of(last.reshape([1, vocab])).unwrap().remove(0);
            let runner = q.runner();
            let mut total = 0.0;
            for (i, &a) in answer.iter().enumerate() {
                total += nll(&row, a);
                if i + 1 < answer.len() {
                    let logits = runner.decode(&mut [(&mut seq, policy)], &[a]).unwrap();
                    row = rows_of(logits).unwrap().remove(0);
                }
            }
            (total / answer.len() as f64).exp()
        };
        let full = ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).unwrap();
        let (got, want) = (ppl(full.as_ref()), q.expected["ppl"].as_f64().unwrap());
        assert!(
            ((got - want) / want).abs() < 1e-5,
            "{name} full: {got} vs {want}"
        );
        let budget = q.expected["policy_budget"].as_f64().unwrap();
        for (policy, build) in [
            (
                "local",
                ecache_policy_local::build as ecache_core::PolicyConstructor,
            ),
            ("h2o", ecache_policy_h2o::build),
            ("elastic", ecache_policy_elastic::build),
            ("snapkv", ecache_policy_snapkv::build),
        ] {
            let mut config = PolicyConfig::new(policy, budget);
            if policy == "snapkv" {
                for (key, value) in q.expected["snapkv_params"].as_object().unwrap() {
                    config.set_param(key, &value.to_string()).unwrap();
                }
            }
            let got = ppl(build(&config).unwrap().as_ref());
            let want = q.expected["policy_ppl"][policy].as_f64().unwrap();
            assert!(
                ((got - want) / want).abs() < 1e-4,
                "{name} {policy}: ppl {got} vs spec {want}"
            );
        }
    }
}

/// The chat prompt: the text Qwen2-VL's template renders for one question about the wide
/// picture, and its ids with the image pad expanded to the picture's tokens, as
/// transformers produces them (`expected_prompt.json`); a prompt whose pads and images
/// disagree is refused.
#[test]
fn chat_prompts_match_transformers() {
    use ecache_model::PromptTokenizer;
    use ecache_model::qwen::{chat_prompt, encode_prompt};

    for name in CHECKPOINTS {
        let q = Qwen::load(name);
        let expected = json(&fixture(name).join("expected_prompt.json"));
        let question = expected["question"].as_str().unwrap();
        let text = chat_prompt(question, 1);
        assert_eq!(text, expected["text"].as_str().unwrap(), "{name}");
        let tokenizer = PromptTokenizer::load(&fixture(name), q.config.image_token_id).unwrap();
        let pixels = q.pixels("wide");
        let tokens = q.processor.image_tokens(pixels.grid);
        let ids = encode_prompt(&tokenizer, &text, q.config.image_token_id, &[tokens]).unwrap();
        let want = ids_of(&expected["input_ids"]);
        assert_eq!(ids, want, "{name}");
        assert!(encode_prompt(&tokenizer, &text, q.config.image_token_id, &[]).is_err());
        // The ids place as the decoder expects: one image, its grid.
        let (positions, _) =
            mrope_positions(&ids, q.config.image_token_id, &[pixels.grid], 2).unwrap();
        assert_eq!(positions.len(), ids.len());
    }
}

/// The chat template through the model interface (the directory's `chat_template.jinja`,
/// rendered by minijinja): each conversation of
/// `expected_chat.json` (a system turn, a picture between texts, an assistant answer, a
/// text-only question, a picture after the text) renders as transformers'
/// `apply_chat_template` renders it; the frontend's encoded prompt equals the processor's
/// ids, and each picture's slots follow its grid.
#[test]
fn the_frontend_renders_and_encodes_as_transformers() {
    use ecache_model::{Architecture, Content, Role, Turn};

    for (name, arch) in CHECKPOINTS
        .into_iter()
        .zip([Architecture::Qwen2Vl, Architecture::Qwen25Vl])
    {
        let dir = fixture(name);
        let frontend = ecache_model::load_frontend(&dir, Default::default()).unwrap();
        assert_eq!(frontend.architecture(), arch);
        let expected = json(&dir.join("expected_chat.json"));
        for chat in expected["chats"].as_array().unwrap() {
            let turns: Vec<Turn> = chat["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| Turn {
                    role: match m["role"].as_str().unwrap() {
                        "system" => Role::System,
                        "user" => Role::User,
                        _ => Role::Assistant,
                    },
                    parts: m["content"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| match p["type"].as_str().unwrap() {
                            "image" => Content::Image,
                            _ => Content::Text(p["text"].as_str().unwrap().into()),
                        })
                        .collect(),
                })
                .collect();
            assert_eq!(
                frontend.chat(&turns).unwrap(),
                chat["text"].as_str().unwrap(),
                "{name}"
            );
        }
        let prompt = json(&dir.join("expected_prompt.json"));
        let question = prompt["question"].as_str().unwrap();
        let text = frontend.question(question, 1).unwrap();
        assert!(frontend.is_formatted(&text) && !frontend.is_formatted(question));
        let pixels = frontend
            .open(&fixture("qwen2-vl-images").join("wide.png"))
            .unwrap();
        assert_eq!((pixels.tokens, pixels.cells), (8, [2, 4]));
        let ids = frontend.encode_prompt(&text, &[&pixels]).unwrap();
        let want = ids_of(&prompt["input_ids"]);
        assert_eq!(ids, want, "{name}");
        let err = frontend.encode_prompt(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("image pad"), "{err}");
        let err = ecache_model::load_frontend(
            &dir,
            ecache_model::FrontendOptions {
                pad_to_square: true,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("pad_to_square"), "{err}");
    }
}
