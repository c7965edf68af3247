//! Entity-level sentiment: whose sentiment a score is about. A target is a name (every
//! whole-word, case-sensitive occurrence of it in the text) or a character span; the model sees
//! it through the variant's [`TargetTemplate`], which marks the mentions in the text and names
//! the target, as the adapter was trained (`finserve train` writes the template beside it).

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::prompt::Template;
use super::sentiment::{LabelScores, softmax};
use crate::error::{Error, Field, Limit, Result};

/// The file `finserve train` writes beside an adapter and `finserve serve` reads from there.
pub const FILE_NAME: &str = "target_template.json";

/// What a request asks about in one text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every whole-word, case-sensitive occurrence of this name.
    Name(String),
    /// Characters `start..end` (Unicode code points, end exclusive).
    Span { start: usize, end: usize },
}

/// A target located in its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The name, or the span's text.
    pub name: String,
    /// Its mentions in characters (end exclusive), in text order.
    pub spans: Vec<(usize, usize)>,
}

/// Locates each target in `text`; refuses more than `max` targets, a blank or absent name, and a
/// span that is empty, blank or outside the text.
pub fn locate(text: &str, targets: &[Target], max: usize) -> Result<Vec<Located>> {
    if targets.is_empty() {
        return Err(Error::invalid(
            Field::Targets,
            "an input's target list is empty",
        ));
    }
    if targets.len() > max {
        return Err(Error::over_limit(
            Field::Targets,
            Limit::MaxTargetsPerInput,
            max,
            format!("{} targets for one input is more than {max}", targets.len()),
        ));
    }
    let chars: Vec<char> = text.chars().collect();
    targets
        .iter()
        .map(|target| match target {
            Target::Name(name) => {
                if super::is_blank(name) || name.trim() != name {
                    return Err(Error::invalid(
                        Field::Targets,
                        format!("target name {name:?} is blank or starts or ends with whitespace"),
                    ));
                }
                let spans = occurrences(&chars, name);
                if spans.is_empty() {
                    return Err(Error::invalid(
                        Field::Targets,
                        format!(
                            "`{name}` does not occur in the input as a whole word (names match \
                             case-sensitively; give a span for anything else)"
                        ),
                    ));
                }
                Ok(Located {
                    name: name.clone(),
                    spans,
                })
            }
            &Target::Span { start, end } => {
                if start >= end || end > chars.len() {
                    return Err(Error::invalid(
                        Field::Targets,
                        format!(
                            "span [{start}, {end}) is empty or outside the input's {} characters",
                            chars.len()
                        ),
                    ));
                }
                let name: String = chars[start..end].iter().collect();
                if super::is_blank(&name) || name.trim() != name {
                    return Err(Error::invalid(
                        Field::Targets,
                        format!(
                            "span [{start}, {end}) ({name:?}) is blank or starts or ends with \
                             whitespace"
                        ),
                    ));
                }
                Ok(Located {
                    name,
                    spans: vec![(start, end)],
                })
            }
        })
        .collect()
}

/// Character spans where `name` occurs with no letter or digit right before or after it,
/// leftmost first and never overlapping ("ABC ABC" in "ABC ABC ABC" once).
fn occurrences(chars: &[char], name: &str) -> Vec<(usize, usize)> {
    let needle: Vec<char> = name.chars().collect();
    let word = |i: usize| chars.get(i).is_some_and(|c| c.is_alphanumeric());
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for i in 0..chars.len() {
        let free = spans.last().is_none_or(|&(_, end)| i >= end);
        if free
            && chars[i..].starts_with(&needle)
            && (i == 0 || !word(i - 1))
            && !word(i + needle.len())
        {
            spans.push((i, i + needle.len()));
        }
    }
    spans
}

/// How a target is shown to the model: `template` holds `{text}` once (the text with each
/// mention wrapped in `mark`) and `{target}` at least once (the target's name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetTemplate {
    pub template: String,
    /// What goes before and after each mention.
    pub mark: (String, String),
    /// Show only this many words on each side of a mention (stretches between mentions that
    /// are further apart are replaced by ` ... `); `None`: the whole text. A small model that
    /// cannot learn where a mention is from its position (the demo's) reads its neighbourhood.
    #[serde(default)]
    pub context_words: Option<usize>,
    /// Words that look like names (their first letter or digit is an upper-case letter, or
    /// they hold none: `Morgan`, `<JPM.N>`, `&`) are shown but not counted in `context_words`,
    /// so that a list of companies does not use up a mention's context before the news about
    /// them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub context_skips_names: bool,
    /// Words a context stops at, left out (compared without case and without the punctuation
    /// around them: `while` stops at `, while` and `While`): clause boundaries such as `while`
    /// and `but`, beyond which the news is usually about someone else.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub context_stops: Vec<String>,
    /// How much the whole text's own scores count in a target's, `w` in `[0, 1)`: the target's
    /// label probabilities are `p_target^(1-w) · p_text^w`, renormalised (log-likelihoods
    /// `(1-w)·target + w·text`). A model that sees only a mention's neighbourhood misses news
    /// told further away, which the whole text's reading holds. `finserve train` learns entity
    /// rows through these pooled scores, so the target's view learns to outweigh the text's
    /// where they differ. `None`: the target's scores alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_weight: Option<f64>,
}

impl TargetTemplate {
    pub fn new(
        template: &str,
        mark: (String, String),
        context_words: Option<usize>,
    ) -> Result<Self> {
        let t = Self {
            template: template.to_string(),
            mark,
            context_words,
            context_skips_names: false,
            context_stops: Vec::new(),
            text_weight: None,
        };
        t.check()?;
        Ok(t)
    }

    /// Reads and checks a `target_template.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let t: Self = serde_json::from_str(&text)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        t.check()
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        Ok(t)
    }

    fn check(&self) -> Result<()> {
        if self.template.matches("{text}").count() != 1 || !self.template.contains("{target}") {
            return Err(Error::InvalidArgument(format!(
                "a target template needs `{{text}}` exactly once and `{{target}}` at least once \
                 (got {:?})",
                self.template
            )));
        }
        if self.context_words.is_none()
            && (self.context_skips_names || !self.context_stops.is_empty())
        {
            return Err(Error::InvalidArgument(
                "a target template's `context_skips_names` and `context_stops` shape a \
                 `context_words` context: set `context_words` too"
                    .to_string(),
            ));
        }
        if let Some(stop) = self.context_stops.iter().find(|w| {
            w.is_empty()
                || w.trim_matches(|c: char| !c.is_alphanumeric()) != *w
                || w.contains(char::is_whitespace)
        }) {
            return Err(Error::InvalidArgument(format!(
                "a target template's `context_stops` are single words that begin and end with a \
                 letter or digit, matched without the punctuation around a word of the text \
                 (got {stop:?})"
            )));
        }
        if let Some(w) = self.text_weight
            && !(0.0..1.0).contains(&w)
        {
            return Err(Error::InvalidArgument(format!(
                "a target template's `text_weight` must be at least 0 and below 1 (got {w}; at 1 \
                 the target would not count)"
            )));
        }
        Ok(())
    }

    /// A target's scores with the text's weighed in (see `text_weight`).
    pub fn pool(&self, target: &LabelScores, text: &LabelScores) -> LabelScores {
        let Some(w) = self.text_weight else {
            return target.clone();
        };
        let mix = |a: &[f64], b: &[f64], f: fn(f64) -> f64| -> Vec<f64> {
            a.iter()
                .zip(b)
                .map(|(&a, &b)| (1.0 - w) * f(a) + w * f(b))
                .collect()
        };
        LabelScores {
            log_probs: mix(&target.log_probs, &text.log_probs, |x| x),
            probs: softmax(&mix(&target.probs, &text.probs, f64::ln), 1.0),
        }
    }

    /// Whether a target's scores need the whole text's.
    pub fn weighs_text(&self) -> bool {
        self.text_weight.is_some()
    }

    /// The prompt template for one target: its name in place of `{target}`, `{text}` left for
    /// the marked text (a name that itself holds `{text}` stays literal).
    pub fn prompt(&self, name: &str) -> Template {
        let (before, after) = self
            .template
            .split_once("{text}")
            .unwrap_or((&self.template, ""));
        Template::from_parts(
            before.replace("{target}", name),
            after.replace("{target}", name),
        )
    }

    /// `text` with each of `spans` (bytes, sorted, disjoint) wrapped in the marks (and cut to
    /// their context), and the byte range of each marked mention (marks included) in the result.
    pub fn mark(&self, text: &str, spans: &[Range<usize>]) -> (String, Vec<Range<usize>>) {
        let (marked, ranges) = self.wrap(text, spans);
        match self.context_words {
            Some(k) => self.context(&marked, &ranges, k),
            None => (marked, ranges),
        }
    }

    /// `text` cut to `k` words on each side of each of `mentions` (byte ranges, sorted), the
    /// cut stretches replaced by ` ... `, and where the mentions lie in the result.
    fn context(
        &self,
        text: &str,
        mentions: &[Range<usize>],
        k: usize,
    ) -> (String, Vec<Range<usize>>) {
        let words = super::explain::words(text);
        if words.is_empty() {
            return (text.to_string(), mentions.to_vec());
        }
        // Inclusive word-index ranges to keep, merged where they touch.
        let mut keep: Vec<(usize, usize)> = Vec::new();
        for m in mentions {
            let first = words.iter().position(|w| w.end > m.start).unwrap_or(0);
            let last = words.iter().rposition(|w| w.start < m.end).unwrap_or(first);
            let lo = self
                .reach(text, &words, (0..first).rev(), k)
                .unwrap_or(first);
            let hi = self
                .reach(text, &words, last + 1..words.len(), k)
                .unwrap_or(last);
            match keep.last_mut() {
                Some(prev) if lo <= prev.1 + 1 => prev.1 = prev.1.max(hi),
                _ => keep.push((lo, hi)),
            }
        }
        let mut out = String::new();
        let mut ranges = Vec::with_capacity(mentions.len());
        for (i, &(lo, hi)) in keep.iter().enumerate() {
            if i > 0 {
                out.push_str(" ... ");
            }
            let (start, end) = (words[lo].start, words[hi].end);
            let at = out.len();
            out.push_str(&text[start..end]);
            ranges.extend(
                mentions
                    .iter()
                    .filter(|m| m.start >= start && m.end <= end)
                    .map(|m| m.start - start + at..m.end - start + at),
            );
        }
        (out, ranges)
    }

    /// The furthest of `steps` (word indices walking away from a mention) the context keeps:
    /// `k` counted words, none past a stop word; `None` when it keeps none.
    fn reach(
        &self,
        text: &str,
        words: &[Range<usize>],
        steps: impl Iterator<Item = usize>,
        k: usize,
    ) -> Option<usize> {
        let mut counted = 0;
        let mut furthest = None;
        for i in steps {
            if counted == k {
                break;
            }
            let word = &text[words[i].clone()];
            if self.is_stop(word) {
                break;
            }
            furthest = Some(i);
            if !(self.context_skips_names && looks_like_a_name(word)) {
                counted += 1;
            }
        }
        furthest
    }

    fn is_stop(&self, word: &str) -> bool {
        if self.context_stops.is_empty() {
            return false;
        }
        let bare = word
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        self.context_stops
            .iter()
            .any(|stop| stop.to_lowercase() == bare)
    }

    fn wrap(&self, text: &str, spans: &[Range<usize>]) -> (String, Vec<Range<usize>>) {
        let mut marked = String::with_capacity(text.len() + spans.len() * 8);
        let mut ranges = Vec::with_capacity(spans.len());
        let mut last = 0;
        for span in spans {
            marked.push_str(&text[last..span.start]);
            let start = marked.len();
            marked.push_str(&self.mark.0);
            marked.push_str(&text[span.clone()]);
            marked.push_str(&self.mark.1);
            ranges.push(start..marked.len());
            last = span.end;
        }
        marked.push_str(&text[last..]);
        (marked, ranges)
    }
}

/// Whether a word is shown but not counted when a template's context skips names.
fn looks_like_a_name(word: &str) -> bool {
    word.chars()
        .find(|c| c.is_alphanumeric())
        .is_none_or(char::is_uppercase)
}

impl Located {
    /// Its mentions as byte ranges of `text`.
    pub fn byte_spans(&self, text: &str) -> Vec<Range<usize>> {
        let byte = |c: usize| text.char_indices().nth(c).map_or(text.len(), |(b, _)| b);
        self.spans.iter().map(|&(s, e)| byte(s)..byte(e)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "Siemens rallied while Huhtamaki fell; Siemens AG and Siemensstadt did not.";

    #[test]
    fn names_match_whole_words_case_sensitively() {
        let t = locate(TEXT, &[Target::Name("Siemens".into())], 4).unwrap();
        assert_eq!(t[0].spans, vec![(0, 7), (38, 45)]);
        assert!(locate(TEXT, &[Target::Name("siemens".into())], 4).is_err());
        assert!(locate(TEXT, &[Target::Name("Huhta".into())], 4).is_err());
        assert!(locate(TEXT, &[Target::Name("Siemens ".into())], 4).is_err());
        let t = locate("ABC ABC ABC", &[Target::Name("ABC ABC".into())], 1).unwrap();
        assert_eq!(t[0].spans, vec![(0, 7)]);
        let span = locate(TEXT, &[Target::Span { start: 22, end: 31 }], 4).unwrap();
        assert_eq!(span[0].name, "Huhtamaki");
    }

    #[test]
    fn spans_are_code_points_and_bad_ones_are_refused() {
        let text = "Ökofonds € gains";
        let t = locate(text, &[Target::Span { start: 0, end: 8 }], 1).unwrap();
        assert_eq!(t[0].name, "Ökofonds");
        for bad in [(3, 3), (5, 2), (0, 17), (8, 9), (0, 9)] {
            let target = Target::Span {
                start: bad.0,
                end: bad.1,
            };
            assert!(locate(text, &[target], 1).is_err(), "{bad:?}");
        }
        let two = [Target::Name("gains".into()), Target::Name("gains".into())];
        assert!(matches!(
            locate(text, &two, 1),
            Err(Error::Invalid {
                limit: Some((Limit::MaxTargetsPerInput, 1)),
                ..
            })
        ));
    }

    #[test]
    fn the_template_marks_every_mention_and_names_the_target() {
        let t = TargetTemplate::new("{target}: {text}", ("<<".into(), ">>".into()), None).unwrap();
        let located = locate(TEXT, &[Target::Name("Siemens".into())], 1).unwrap();
        let (marked, ranges) = t.mark(TEXT, &located[0].byte_spans(TEXT));
        assert!(marked.starts_with("<<Siemens>> rallied"));
        assert!(marked.contains("; <<Siemens>> AG"));
        assert!(ranges.iter().all(|r| &marked[r.clone()] == "<<Siemens>>"));
        let (prompt, at) = t.prompt("Siemens").place(&marked);
        assert_eq!(at, "Siemens: ".len());
        assert!(prompt.starts_with("Siemens: <<Siemens>>"));
        let marks = || ("[".to_string(), "]".to_string());
        assert!(TargetTemplate::new("{text}", marks(), None).is_err());
        assert!(TargetTemplate::new("{target}", marks(), None).is_err());
    }

    #[test]
    fn context_keeps_the_words_around_each_mention() {
        let t = TargetTemplate::new("{target}: {text}", ("<".into(), ">".into()), Some(1)).unwrap();
        let text = "a b Acme c d e f g h Acme i";
        let located = locate(text, &[Target::Name("Acme".into())], 1).unwrap();
        let (shown, ranges) = t.mark(text, &located[0].byte_spans(text));
        assert_eq!(shown, "b <Acme> c ... h <Acme> i");
        assert!(ranges.iter().all(|r| &shown[r.clone()] == "<Acme>"));
        let near = "x Acme y Acme z";
        let located = locate(near, &[Target::Name("Acme".into())], 1).unwrap();
        assert_eq!(
            t.mark(near, &located[0].byte_spans(near)).0,
            "x <Acme> y <Acme> z"
        );
    }

    #[test]
    fn context_can_skip_names_and_stop_at_clause_boundaries() {
        let t = TargetTemplate {
            context_skips_names: true,
            context_stops: vec!["while".into(), "But".into()],
            ..TargetTemplate::new("{target}: {text}", ("<".into(), ">".into()), Some(2)).unwrap()
        };
        let list = "Shares of Acme <ACM.N>, Bolt Corp & Co and Cargo fell 3% today.";
        let located = locate(list, &[Target::Name("Acme".into())], 1).unwrap();
        assert_eq!(
            t.mark(list, &located[0].byte_spans(list)).0,
            "Shares of <Acme> <ACM.N>, Bolt Corp & Co and Cargo fell"
        );
        let two = "Siemens rallied on orders, while Huhtamaki fell; but Acme rose.";
        let located = locate(two, &[Target::Name("Huhtamaki".into())], 1).unwrap();
        assert_eq!(
            t.mark(two, &located[0].byte_spans(two)).0,
            "<Huhtamaki> fell;"
        );
        let bad = |skips: bool, stops: &[&str], words: Option<usize>| TargetTemplate {
            context_skips_names: skips,
            context_stops: stops.iter().map(|s| s.to_string()).collect(),
            ..TargetTemplate::new("{target}: {text}", ("<".into(), ">".into()), words).unwrap()
        };
        for t in [
            bad(true, &[], None),
            bad(false, &["while"], None),
            bad(false, &["so that"], Some(2)),
            bad(false, &[""], Some(2)),
            bad(false, &["but,"], Some(2)),
            bad(false, &[";"], Some(2)),
        ] {
            assert!(t.check().is_err(), "{t:?}");
        }
    }
}
