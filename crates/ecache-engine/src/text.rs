//! From tokens to streamed text: incremental detokenisation and stop strings.
//!
//! Decoding all of an answer's tokens at every step costs quadratic time; decoding a token
//! alone loses the space a SentencePiece piece carries at its start. [`TextStream`] decodes
//! a short window instead (the tokens since the last emitted text, after one token of
//! context) and emits what the window adds, holding back a trailing replacement character
//! (a multi-byte character split over tokens). Stop strings are matched on the text: the
//! answer ends before the first one, and text that may be the start of one is held back
//! until it is known not to be.

/// Text produced by one token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delta {
    /// Text released to the client (possibly empty).
    pub text: String,
    /// A stop string was completed: the answer has ended.
    pub stopped: bool,
}

/// The streamed text of one answer.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    stops: Vec<String>,
    tokens: Vec<u32>,
    /// Window start: one token of context before the text not yet decoded.
    prefix: usize,
    /// Tokens whose text is already in `text`.
    read: usize,
    /// The answer's text so far, as decoded.
    text: String,
    /// Bytes of `text` released to the client.
    emitted: usize,
    /// Where a stop string began, once one was found.
    cut: Option<usize>,
}

impl TextStream {
    /// A stream ending at any of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Self::default()
        }
    }

    /// Adds a token; `decode` turns ids into text (special tokens skipped).
    pub fn push<E>(
        &mut self,
        token: u32,
        decode: impl Fn(&[u32]) -> Result<String, E>,
    ) -> Result<Delta, E> {
        if self.cut.is_some() {
            return Ok(Delta {
                text: String::new(),
                stopped: true,
            });
        }
        self.tokens.push(token);
        let before = decode(&self.tokens[self.prefix..self.read])?;
        let after = decode(&self.tokens[self.prefix..])?;
        if after.len() > before.len()
            && after.starts_with(before.as_str())
            && !after.ends_with('\u{FFFD}')
        {
            self.text.push_str(&after[before.len()..]);
            self.prefix = self.read;
            self.read = self.tokens.len();
        } else if !after.starts_with(before.as_str()) && !after.ends_with('\u{FFFD}') {
            // The window's text changed shape (a tokenizer that rewrites earlier text when
            // more follows): decode the whole answer again.
            self.text = decode(&self.tokens)?;
            self.prefix = self.tokens.len().saturating_sub(1);
            self.read = self.tokens.len();
        }
        Ok(self.release())
    }

    /// The text not yet released, at the end of the answer (EOS or the token limit).
    pub fn finish(&mut self) -> String {
        let end = self.cut.unwrap_or(self.text.len()).max(self.emitted);
        let rest = self.text[self.emitted..end].to_string();
        self.emitted = end;
        rest
    }

    /// The whole answer: the text before the first stop string, or all of it.
    pub fn answer(&self) -> &str {
        &self.text[..self.cut.unwrap_or(self.text.len())]
    }

    fn release(&mut self) -> Delta {
        if let Some(at) = self.first_stop() {
            self.cut = Some(at);
            let text = self.text[self.emitted..at.max(self.emitted)].to_string();
            self.emitted = at.max(self.emitted);
            return Delta {
                text,
                stopped: true,
            };
        }
        let safe = self.text.len() - self.held_back();
        let text = self.text[self.emitted..safe.max(self.emitted)].to_string();
        self.emitted = safe.max(self.emitted);
        Delta {
            text,
            stopped: false,
        }
    }

    fn first_stop(&self) -> Option<usize> {
        self.stops.iter().filter_map(|s| self.text.find(s)).min()
    }

    /// Bytes at the end of the text that are the start of some stop string.
    fn held_back(&self) -> usize {
        let text = self.text.as_str();
        self.stops
            .iter()
            .filter_map(|stop| {
                (1..stop.len())
                    .rev()
                    .filter(|&n| stop.is_char_boundary(n) && n <= text.len())
                    .find(|&n| text.ends_with(&stop[..n]))
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece-like vocabulary: pieces starting with `▁` carry a leading space
    /// that is dropped at the very start of a decode, and two byte pieces that only make
    /// a character together.
    fn decode(ids: &[u32]) -> Result<String, ()> {
        let pieces = [
            "▁the", "▁cat", "▁sat", ".", "▁on", "\u{c3}", "\u{a9}", "▁STOP", "S",
        ];
        let mut bytes: Vec<u8> = Vec::new();
        for &id in ids {
            match pieces[id as usize] {
                "\u{c3}" => bytes.push(0xC3),
                "\u{a9}" => bytes.push(0xA9),
                p => bytes.extend(p.replace('▁', " ").as_bytes()),
            }
        }
        let text = String::from_utf8_lossy(&bytes).to_string();
        Ok(text.strip_prefix(' ').unwrap_or(&text).to_string())
    }

    fn stream(ids: &[u32], stops: &[&str]) -> (Vec<String>, String, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(&stops);
        let mut deltas = Vec::new();
        let mut stopped = false;
        for &id in ids {
            let d = s.push(id, decode).unwrap();
            deltas.push(d.text);
            if d.stopped {
                stopped = true;
                break;
            }
        }
        deltas.push(s.finish());
        (
            deltas,
            s.answer().to_string(),
            decode(ids).unwrap(),
            stopped,
        )
    }

    #[test]
    fn streamed_text_is_the_whole_decode() {
        let ids = [0, 1, 2, 5, 6, 3, 4];
        let (deltas, answer, whole, stopped) = stream(&ids, &[]);
        assert_eq!(deltas.concat(), whole);
        assert_eq!(answer, whole);
        assert_eq!(whole, "the cat sat\u{e9}. on");
        assert_eq!(deltas[0], "the");
        assert_eq!(deltas[1], " cat");
        assert_eq!(deltas[3], "", "half a character is held back");
        assert_eq!(deltas[4], "\u{e9}");
        assert!(!stopped);
    }

    #[test]
    fn a_stop_string_ends_the_answer_before_it_and_is_never_streamed() {
        // " STOP" arrives as one piece; "sat ST" could start "sat STOP" and is held.
        let (deltas, answer, _, stopped) = stream(&[0, 1, 7, 2], &[" STOP"]);
        assert!(stopped);
        assert_eq!(answer, "the cat");
        assert_eq!(deltas.concat(), "the cat");
        // A stop string spread over tokens: "." then " on" makes ". on".
        let (deltas, answer, _, stopped) = stream(&[0, 3, 4, 1], &[". on"]);
        assert!(stopped);
        assert_eq!(answer, "the");
        assert_eq!(deltas[1], "", "'.' may start the stop string");
        assert_eq!(deltas.concat(), "the");
        // Text that starts a stop string but does not finish it is released at the end.
        let (deltas, answer, _, stopped) = stream(&[0, 3], &[". on"]);
        assert!(!stopped);
        assert_eq!((deltas.concat(), answer), ("the.".into(), "the.".into()));
    }

    #[test]
    fn held_back_text_is_released_once_it_diverges() {
        let (deltas, _, whole, stopped) = stream(&[0, 3, 1, 8], &[". on"]);
        assert!(!stopped);
        assert_eq!(deltas[1], "");
        assert_eq!(deltas[2], ". cat");
        assert_eq!(deltas.concat(), whole);
    }
}
