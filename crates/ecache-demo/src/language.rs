//! What the demo task says: scene descriptions (long answers), short questions about one
//! object or a count, the closed vocabulary, and the word-level `tokenizer.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use ecache_model::generate::SeededRng;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::DemoError;
use crate::scene::{CELLS, COLOURS, SHAPES, SIZES, Scene};

/// Special tokens, in id order; `<image>` is id 3 (the config's `image_token_index`).
pub const SPECIAL: [&str; 5] = ["<unk>", "<s>", "</s>", "<image>", "<pad>"];
/// Ids of the special tokens.
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
pub const IMAGE: u32 = 3;
pub const PAD: u32 = 4;

/// The instruction that asks for a description.
pub const DESCRIBE: &str = "describe the image in detail .";

const NUMBERS: [&str; 6] = ["zero", "one", "two", "three", "four", "five"];

/// What a question asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The whole scene, tens of words.
    Description,
    /// One word or two.
    Short,
}

/// A question, its reference answer, and its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qa {
    pub question: String,
    pub answer: String,
    pub kind: Kind,
    /// For answer tokens that name something about one object: (the token's index in the
    /// answer, the object's grid cell). Training scaffolding: it says where the model
    /// should look when predicting that token (see `train::focus_loss`).
    pub focus: Vec<(usize, usize)>,
    /// For answer tokens read from one object: (the token's index in the answer, the words
    /// earlier in the conversation that name that object: its cell's row and column words,
    /// or its colour and shape words, or the colour counted). Training scaffolding like
    /// `focus`: it says which words the first layer should carry to the position that
    /// predicts the token (see `train::cue_loss`).
    pub cues: Vec<(usize, Vec<Cue>)>,
}

/// A word that names what an answer token is about, by its index among the whitespace
/// separated words of the turn's question or answer (the demo tokenizer gives every such
/// word one token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cue {
    Question(usize),
    Answer(usize),
}

/// "there are three objects . top left : a large red circle . center : ..."
pub fn describe(scene: &Scene) -> String {
    let mut out = format!("there are {} objects .", NUMBERS[scene.objects.len()]);
    for o in &scene.objects {
        out += &format!(" {} : a {} .", CELLS[o.cell], o.noun_phrase());
    }
    out
}

/// The description request.
pub fn description(scene: &Scene) -> Qa {
    // "there are N objects ." then per object "CELL : a SIZE COLOUR SHAPE .": the size,
    // colour and shape words are read from the object's cell.
    let mut focus = Vec::new();
    let mut cues = Vec::new();
    let mut word = 5;
    for o in &scene.objects {
        let cell_words = CELLS[o.cell].split_whitespace().count();
        let named: Vec<Cue> = (word..word + cell_words).map(Cue::Answer).collect();
        word += cell_words + 2;
        focus.extend((word..word + 3).map(|i| (i, o.cell)));
        cues.extend((word..word + 3).map(|i| (i, named.clone())));
        word += 4;
    }
    Qa {
        question: DESCRIBE.into(),
        answer: describe(scene),
        kind: Kind::Description,
        focus,
        cues,
    }
}

/// The short-question templates, in the order of [`QuestionMix`]'s weights.
pub const TEMPLATES: [&str; 6] = ["count", "colour", "shape", "size", "where", "count colour"];

/// Relative weights of the six short-question templates ([`TEMPLATES`] order). Held-out
/// data is always drawn [`QuestionMix::UNIFORM`]; training may lean toward the templates
/// that are learned last.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuestionMix(pub [f64; 6]);

impl Default for QuestionMix {
    fn default() -> Self {
        Self::UNIFORM
    }
}

impl QuestionMix {
    pub const UNIFORM: Self = Self([1.0; 6]);

    /// The template index that `u` in [0, 1) falls on.
    fn pick(&self, u: f64) -> usize {
        let total: f64 = self.0.iter().sum();
        let mut edge = 0.0;
        for (i, w) in self.0.iter().enumerate() {
            edge += w / total;
            if u < edge {
                return i;
            }
        }
        self.0.iter().rposition(|&w| w > 0.0).unwrap_or(0)
    }

    /// Checks that the weights are finite, non-negative and not all zero.
    pub fn validate(&self) -> Result<(), String> {
        if let Some((i, w)) = self
            .0
            .iter()
            .enumerate()
            .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
        {
            return Err(format!(
                "question weight for `{}` is {w}; it must be finite and at least 0",
                TEMPLATES[i]
            ));
        }
        if self.0.iter().sum::<f64>() <= 0.0 {
            return Err("question weights are all zero".into());
        }
        Ok(())
    }
}

/// A short question drawn uniformly from six templates.
pub fn short_question(scene: &Scene, rng: &mut SeededRng) -> Qa {
    short_question_from(scene, rng, &QuestionMix::UNIFORM)
}

/// A short question whose template is drawn with `mix`'s weights.
pub fn short_question_from(scene: &Scene, rng: &mut SeededRng, mix: &QuestionMix) -> Qa {
    let pick = |rng: &mut SeededRng, n: usize| ((rng.next_f64() * n as f64) as usize).min(n - 1);
    let object = scene.objects[pick(rng, scene.objects.len())];
    let at = CELLS[object.cell];
    let question_kind = mix.pick(rng.next_f64());
    let focus = match question_kind {
        1..=3 => vec![(0, object.cell)],
        4 => (0..at.split_whitespace().count())
            .map(|i| (i, object.cell))
            .collect(),
        _ => Vec::new(),
    };
    let (question, answer) = match question_kind {
        0 => (
            "how many objects are there ?".to_string(),
            NUMBERS[scene.objects.len()].to_string(),
        ),
        1 => (
            format!("what colour is the object at the {at} ?"),
            COLOURS[object.colour].0.to_string(),
        ),
        2 => (
            format!("what shape is the object at the {at} ?"),
            SHAPES[object.shape].to_string(),
        ),
        3 => (
            format!("what size is the object at the {at} ?"),
            SIZES[object.size].to_string(),
        ),
        4 => (
            format!(
                "where is the {} {} ?",
                COLOURS[object.colour].0, SHAPES[object.shape]
            ),
            at.to_string(),
        ),
        _ => {
            let colour = pick(rng, COLOURS.len());
            let n = scene.objects.iter().filter(|o| o.colour == colour).count();
            (
                format!("how many {} objects are there ?", COLOURS[colour].0),
                NUMBERS[n].to_string(),
            )
        }
    };
    // The words of the question that name the object: "... at the ROW COLUMN ?", "where
    // is the COLOUR SHAPE ?", "how many COLOUR objects are there ?".
    let words = question.split_whitespace().count();
    let named: Vec<Cue> = match question_kind {
        1..=3 => vec![Cue::Question(words - 3), Cue::Question(words - 2)],
        4 => vec![Cue::Question(3), Cue::Question(4)],
        5 => vec![Cue::Question(2)],
        _ => Vec::new(),
    };
    let cues = if named.is_empty() {
        Vec::new()
    } else {
        (0..answer.split_whitespace().count())
            .map(|i| (i, named.clone()))
            .collect()
    };
    Qa {
        question,
        answer,
        kind: Kind::Short,
        focus,
        cues,
    }
}

/// The template a question was drawn from: `describe`, `count`, `colour`, `shape`, `size`,
/// `where` or `count colour` (for figures per kind of question).
pub fn template_of(question: &str) -> &'static str {
    let words: Vec<&str> = question.split_whitespace().take(3).collect();
    match words.as_slice() {
        ["describe", ..] => "describe",
        ["how", "many", "objects"] => "count",
        ["how", "many", _] => "count colour",
        ["what", "colour", ..] => "colour",
        ["what", "shape", ..] => "shape",
        ["what", "size", ..] => "size",
        ["where", ..] => "where",
        _ => "other",
    }
}

/// Every word the task uses, special tokens first, then the chat format's words, then the
/// task's words in a fixed order.
pub fn vocabulary() -> Vec<String> {
    let mut words: Vec<String> = SPECIAL.iter().map(|s| s.to_string()).collect();
    let mut seen: BTreeSet<String> = words.iter().cloned().collect();
    let mut text = String::from("USER : ASSISTANT : ");
    text += &format!("{DESCRIBE} there are objects a . : ? ");
    text += "how many what colour shape size is the object at where ";
    text += &NUMBERS.join(" ");
    for list in [&SHAPES[..], &SIZES[..], &CELLS[..]] {
        text += " ";
        text += &list.join(" ");
    }
    for (c, _) in COLOURS {
        text += " ";
        text += c;
    }
    for w in text.split_whitespace() {
        if seen.insert(w.to_string()) {
            words.push(w.to_string());
        }
    }
    words
}

/// Builds and writes the word-level `tokenizer.json`: whitespace and punctuation split,
/// BOS prepended, `<image>` and the other specials never split.
pub fn write_tokenizer(path: &Path) -> Result<(), DemoError> {
    let vocab: HashMap<String, u32> = vocabulary()
        .into_iter()
        .enumerate()
        .map(|(i, w)| (w, i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .map_err(|e| DemoError::Tokenizer(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    let template = TemplateProcessing::builder()
        .try_single("<s> $A")
        .and_then(|b| b.try_pair("<s> $A $B"))
        .map_err(|e| DemoError::Tokenizer(e.to_string()))?
        .special_tokens(vec![("<s>", BOS)])
        .build()
        .map_err(|e| DemoError::Tokenizer(e.to_string()))?;
    tokenizer.with_post_processor(Some(template));
    let specials: Vec<AddedToken> = SPECIAL
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    tokenizer
        .save(path, true)
        .map_err(|e| DemoError::Tokenizer(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecache_model::{PromptTokenizer, chat_prompt};

    #[test]
    fn every_question_and_answer_encodes_without_unknown_words() {
        let dir = std::env::temp_dir().join(format!("ecache-demo-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_tokenizer(&dir.join("tokenizer.json")).unwrap();
        let tok = PromptTokenizer::load(&dir, IMAGE).unwrap();
        let mut rng = SeededRng::new(1);
        let mut answers = BTreeSet::new();
        for _ in 0..300 {
            let scene = Scene::generate(&mut rng);
            for qa in [description(&scene), short_question(&scene, &mut rng)] {
                let ids = tok.encode_prompt(&chat_prompt(&qa.question), true).unwrap();
                assert_eq!(ids[0], BOS);
                assert_eq!(ids.iter().filter(|&&i| i == IMAGE).count(), 1);
                let answer = tok.encode_answer(&qa.answer).unwrap();
                assert!(!ids.contains(&0) && !answer.contains(&0), "{qa:?}");
                assert_eq!(tok.decode(&answer).unwrap(), qa.answer, "decodes back");
                if qa.kind == Kind::Short {
                    answers.insert(qa.answer.clone());
                }
            }
        }
        assert!(answers.len() > 20, "short answers vary: {answers:?}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn focus_points_at_the_attribute_words_of_the_object_in_that_cell() {
        let mut rng = SeededRng::new(3);
        for _ in 0..50 {
            let scene = Scene::generate(&mut rng);
            let mut qas = vec![description(&scene)];
            qas.extend((0..6).map(|_| short_question(&scene, &mut rng)));
            for qa in qas {
                let words: Vec<&str> = qa.answer.split_whitespace().collect();
                for &(i, cell) in &qa.focus {
                    let o = scene.at(cell).expect("an object in the focused cell");
                    let attributes = [SIZES[o.size], COLOURS[o.colour].0, SHAPES[o.shape]];
                    let named = attributes.contains(&words[i])
                        || CELLS[cell].split_whitespace().any(|w| w == words[i]);
                    assert!(
                        named,
                        "{:?} word {i} ({}) about {}",
                        qa, words[i], CELLS[cell]
                    );
                }
                let expected = match template_of(&qa.question) {
                    "describe" => 3 * scene.objects.len(),
                    "colour" | "shape" | "size" => 1,
                    "where" => words.len(),
                    _ => 0,
                };
                assert_eq!(qa.focus.len(), expected, "{qa:?}");
            }
        }
    }

    #[test]
    fn cues_name_the_object_that_each_answer_token_is_about() {
        let mut rng = SeededRng::new(11);
        let mut seen = BTreeSet::new();
        for _ in 0..400 {
            let scene = Scene::generate(&mut rng);
            for qa in [description(&scene), short_question(&scene, &mut rng)] {
                let question: Vec<&str> = qa.question.split_whitespace().collect();
                let answer: Vec<&str> = qa.answer.split_whitespace().collect();
                let kind = template_of(&qa.question);
                for (i, named) in &qa.cues {
                    assert!(*i < answer.len(), "{qa:?}");
                    let words: Vec<&str> = named
                        .iter()
                        .map(|cue| match *cue {
                            Cue::Question(w) => question[w],
                            Cue::Answer(w) => {
                                assert!(w < *i, "an answer cue precedes the token: {qa:?}");
                                answer[w]
                            }
                        })
                        .collect();
                    // The object the token is about, and the words that must name it.
                    let expected: Vec<String> = match kind {
                        "count colour" => vec![question[2].to_string()],
                        "where" => {
                            let o = scene
                                .objects
                                .iter()
                                .find(|o| CELLS[o.cell] == qa.answer)
                                .unwrap();
                            vec![COLOURS[o.colour].0.into(), SHAPES[o.shape].into()]
                        }
                        _ => {
                            let focus = qa.focus.iter().find(|f| f.0 == *i).unwrap();
                            CELLS[focus.1]
                                .split_whitespace()
                                .map(String::from)
                                .collect()
                        }
                    };
                    assert_eq!(words, expected, "{qa:?}");
                }
                let expected = match kind {
                    "describe" => 3 * scene.objects.len(),
                    "count" => 0,
                    _ => answer.len(),
                };
                assert_eq!(qa.cues.len(), expected, "{qa:?}");
                seen.insert(kind);
            }
        }
        assert_eq!(seen.len(), 7, "every template checked: {seen:?}");
    }

    #[test]
    fn a_weighted_mix_draws_templates_in_proportion_and_never_a_zero_weight() {
        let mix = QuestionMix([0.0, 3.0, 3.0, 1.0, 2.0, 1.0]);
        let mut rng = SeededRng::new(5);
        let mut counts = [0usize; 6];
        for _ in 0..6000 {
            let scene = Scene::generate(&mut rng);
            let qa = short_question_from(&scene, &mut rng, &mix);
            let i = TEMPLATES
                .iter()
                .position(|t| *t == template_of(&qa.question))
                .unwrap();
            counts[i] += 1;
        }
        assert_eq!(counts[0], 0, "{counts:?}");
        for (i, w) in mix.0.iter().enumerate() {
            let share = counts[i] as f64 / 6000.0;
            assert!(
                (share - w / 10.0).abs() < 0.02,
                "{} drawn {share}, weight {w}/10",
                TEMPLATES[i]
            );
        }
        assert!(QuestionMix([0.0; 6]).validate().is_err());
        assert!(
            QuestionMix([1.0, f64::NAN, 1.0, 1.0, 1.0, 1.0])
                .validate()
                .unwrap_err()
                .contains("colour")
        );
        assert!(mix.validate().is_ok());
    }

    #[test]
    fn descriptions_name_every_object_in_reading_order() {
        let mut rng = SeededRng::new(2);
        let scene = Scene::generate(&mut rng);
        let text = describe(&scene);
        let words = text.split_whitespace().count();
        assert!(words >= 4 + 6 * scene.objects.len(), "{text}");
        let mut from = 0;
        for o in &scene.objects {
            let at = text[from..].find(&o.noun_phrase()).expect("object named") + from;
            from = at;
        }
    }
}
