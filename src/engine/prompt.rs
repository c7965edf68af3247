//! Sentiment prompts: an input placed in a prompt template and tokenized as one string (what the
//! model was trained on), with the tokens that came from the input located by their offsets.
//! Truncation and long-document windows then cut only those tokens, so the template's own
//! tokens (an instruction after `{text}`, the final EOS) always survive.

use std::ops::Range;

use tokenizers::Tokenizer;

use crate::error::{Error, Field, Limit, Result};

/// Which end of an over-long input is cut (TEI's `truncation_direction`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TruncationDirection {
    /// Keep the start of the input.
    #[default]
    #[serde(alias = "Right")]
    Right,
    /// Keep the end of the input.
    #[serde(alias = "Left")]
    Left,
}

impl std::str::FromStr for TruncationDirection {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "right" => Ok(Self::Right),
            "left" => Ok(Self::Left),
            other => Err(format!(
                "`{other}` is not a truncation direction (right or left)"
            )),
        }
    }
}

/// A prompt template: text with exactly one `{text}` placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    before: String,
    after: String,
}

impl Template {
    pub fn new(template: &str) -> Result<Self> {
        match template.split_once("{text}") {
            Some((before, after)) if !after.contains("{text}") => Ok(Self {
                before: before.to_string(),
                after: after.to_string(),
            }),
            _ => Err(Error::invalid(
                Field::Template,
                format!("must contain `{{text}}` exactly once (got {template:?})"),
            )),
        }
    }

    /// The template with `before` and `after` around the input (no placeholder search: either
    /// may hold any text).
    pub fn from_parts(before: String, after: String) -> Self {
        Self { before, after }
    }

    pub fn as_string(&self) -> String {
        format!("{}{{text}}{}", self.before, self.after)
    }

    /// The prompt with `text` in place, and the byte offset where `text` starts in it.
    pub fn place(&self, text: &str) -> (String, usize) {
        (
            format!("{}{text}{}", self.before, self.after),
            self.before.len(),
        )
    }
}

/// A tokenized prompt whose input tokens are `ids[input]`.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub input: Range<usize>,
    /// Byte span in the input text of each input token.
    spans: Vec<(usize, usize)>,
}

/// One window of a long input: the prompt ids, the byte span of the input it covers, and how
/// many input tokens it holds (its weight when windows are averaged).
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub ids: Vec<u32>,
    pub span: (usize, usize),
    pub tokens: usize,
}

impl Prompt {
    /// Places `text` in `template` and tokenizes the whole (special tokens added).
    pub fn new(tokenizer: &Tokenizer, template: &Template, text: &str) -> Result<Self> {
        let (prompt, lo) = template.place(text);
        let enc = tokenizer
            .encode(prompt.as_str(), true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let hi = lo + text.len();
        let special = enc.get_special_tokens_mask();
        let is_input = |(i, &(start, end)): (usize, &(usize, usize))| {
            special.get(i) == Some(&0)
                && if start == end {
                    (lo..hi).contains(&start)
                } else {
                    start < hi && end > lo
                }
        };
        let offsets = enc.get_offsets();
        let found: Vec<usize> = offsets
            .iter()
            .enumerate()
            .filter(|&p| is_input(p))
            .map(|(i, _)| i)
            .collect();
        let input = match (found.first(), found.last()) {
            (Some(&a), Some(&b)) => a..b + 1,
            _ => 0..0,
        };
        let spans = offsets[input.clone()]
            .iter()
            .map(|&(s, e)| (s.clamp(lo, hi) - lo, e.clamp(lo, hi) - lo))
            .collect();
        Ok(Self {
            ids: enc.get_ids().to_vec(),
            input,
            spans,
        })
    }

    fn template_tokens(&self) -> usize {
        self.ids.len() - self.input.len()
    }

    /// Input tokens that fit next to the template in `max_tokens`.
    fn room(&self, max_tokens: usize) -> Result<usize> {
        let fixed = self.template_tokens();
        if fixed >= max_tokens {
            return Err(Error::over_limit(
                Field::Template,
                Limit::MaxInputTokens,
                max_tokens,
                format!(
                    "the prompt template alone has {fixed} tokens, which leaves no room for the \
                     input within {max_tokens} tokens"
                ),
            ));
        }
        Ok(max_tokens - fixed)
    }

    /// The prompt with only `keep` (a range of input tokens) of its input.
    fn with_input(&self, keep: Range<usize>) -> Vec<u32> {
        let (a, b) = (self.input.start + keep.start, self.input.start + keep.end);
        let mut ids = self.ids[..self.input.start].to_vec();
        ids.extend_from_slice(&self.ids[a..b]);
        ids.extend_from_slice(&self.ids[self.input.end..]);
        ids
    }

    /// The window of input tokens `keep`.
    fn window(&self, keep: Range<usize>) -> Window {
        let span = match (
            self.spans.get(keep.start),
            keep.end.checked_sub(1).and_then(|e| self.spans.get(e)),
        ) {
            (Some(first), Some(last)) if !keep.is_empty() => (first.0, last.1),
            _ => (0, 0),
        };
        Window {
            ids: self.with_input(keep.clone()),
            span,
            tokens: keep.len(),
        }
    }

    /// The prompt cut to `max_tokens` by dropping input tokens from one end. `None` when it is
    /// longer and `direction` is `None` (the caller did not ask to truncate).
    pub fn fit(
        &self,
        max_tokens: usize,
        direction: Option<TruncationDirection>,
    ) -> Result<Option<Window>> {
        let n = self.input.len();
        if self.ids.len() <= max_tokens {
            return Ok(Some(self.window(0..n)));
        }
        let Some(direction) = direction else {
            return Ok(None);
        };
        let keep = self.room(max_tokens)?;
        Ok(Some(match direction {
            TruncationDirection::Right => self.window(0..keep),
            TruncationDirection::Left => self.window(n - keep..n),
        }))
    }

    /// Windows of the input that each fit `max_tokens` with the template, consecutive ones
    /// sharing `overlap` tokens; at most `max_windows`. An overlap as large as a window is
    /// refused (the windows would never advance).
    pub fn windows(
        &self,
        max_tokens: usize,
        overlap: usize,
        max_windows: usize,
    ) -> Result<Vec<Window>> {
        let n = self.input.len();
        let size = self.room(max_tokens)?.min(n.max(1));
        let count = if n <= size {
            1
        } else if overlap >= size {
            return Err(Error::over_limit(
                Field::Template,
                Limit::ChunkOverlap,
                overlap,
                format!(
                    "the prompt template leaves windows of {size} input tokens, which cannot \
                     overlap by {overlap}"
                ),
            ));
        } else {
            (n - size).div_ceil(size - overlap) + 1
        };
        let stride = size.saturating_sub(overlap);
        if count > max_windows {
            return Err(Error::over_limit(
                Field::Inputs,
                Limit::MaxChunksPerInput,
                max_windows,
                format!(
                    "the input needs {count} windows of {size} tokens, more than {max_windows}"
                ),
            ));
        }
        Ok((0..count)
            .map(|w| {
                let start = (w * stride).min(n.saturating_sub(size));
                self.window(start..(start + size).min(n))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/parity/fixtures/tokenizer.json"
        ))
        .unwrap()
    }

    const TEXT: &str = "the profit rose and the sales fell in the last quarter of the year";

    #[test]
    fn the_input_tokens_are_found_between_the_template_tokens() {
        let tok = tokenizer();
        let template = Template::new("Review: {text} Is this positive?").unwrap();
        let p = Prompt::new(&tok, &template, TEXT).unwrap();
        let whole = tok
            .encode(format!("Review: {TEXT} Is this positive?"), true)
            .unwrap();
        assert_eq!(p.ids, whole.get_ids());
        let input_text = tok.decode(&p.ids[p.input.clone()], true).unwrap();
        assert_eq!(input_text, TEXT);
        assert_eq!(p.spans.first().unwrap().0, 0);
        assert_eq!(p.spans.last().unwrap().1, TEXT.len());
    }

    #[test]
    fn truncation_keeps_the_template_at_both_ends() {
        let tok = tokenizer();
        let template = Template::new("Review: {text} Is this positive?").unwrap();
        let p = Prompt::new(&tok, &template, TEXT).unwrap();
        let max = p.template_tokens() + 5;
        let prefix = &p.ids[..p.input.start];
        let suffix = &p.ids[p.input.end..];
        for (direction, kept) in [
            (
                TruncationDirection::Right,
                &p.ids[p.input.start..p.input.start + 5],
            ),
            (
                TruncationDirection::Left,
                &p.ids[p.input.end - 5..p.input.end],
            ),
        ] {
            let window = p.fit(max, Some(direction)).unwrap().unwrap();
            assert_eq!(window.ids.len(), max);
            assert_eq!(window.ids, [prefix, kept, suffix].concat());
            assert_eq!(window.tokens, 5);
        }
        assert!(p.fit(max, None).unwrap().is_none());
        assert!(
            p.fit(p.template_tokens(), Some(TruncationDirection::Right))
                .is_err()
        );
    }

    #[test]
    fn windows_cover_the_input_with_overlap() {
        let tok = tokenizer();
        let template = Template::new("{text} sentiment:").unwrap();
        let p = Prompt::new(&tok, &template, TEXT).unwrap();
        let n = p.input.len();
        let max = p.template_tokens() + 6;
        let windows = p.windows(max, 2, 100).unwrap();
        assert!(windows.len() > 1);
        let input: Vec<u32> = p.ids[p.input.clone()].to_vec();
        let mut covered = vec![false; n];
        for w in &windows {
            assert!(w.ids.len() <= max);
            assert!(w.ids.ends_with(&p.ids[p.input.end..]));
            let body = &w.ids[..w.ids.len() - (p.ids.len() - p.input.end)];
            let start = input.windows(body.len()).position(|x| x == body).unwrap();
            covered[start..start + body.len()]
                .iter_mut()
                .for_each(|c| *c = true);
            assert!(TEXT.get(w.span.0..w.span.1).is_some());
        }
        assert!(covered.iter().all(|&c| c));
        assert_eq!(windows.first().unwrap().span.0, 0);
        assert_eq!(windows.last().unwrap().span.1, TEXT.len());
        assert!(p.windows(max, 2, 1).is_err());
        assert_eq!(p.windows(p.ids.len(), 2, 1).unwrap().len(), 1);
        // An overlap that leaves no stride is refused, not turned into a stride of 1.
        assert!(matches!(
            p.windows(max, 6, 100),
            Err(Error::Invalid {
                limit: Some((Limit::ChunkOverlap, _)),
                ..
            })
        ));
    }

    #[test]
    fn a_template_needs_exactly_one_placeholder() {
        assert!(Template::new("no placeholder").is_err());
        assert!(Template::new("{text} and {text}").is_err());
        assert_eq!(
            Template::new("a {text} b").unwrap().as_string(),
            "a {text} b"
        );
    }
}
