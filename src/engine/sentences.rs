//! Sentence breakdown of long documents (`long_input: sentences`): Unicode's sentence boundaries
//! (UAX #29, `unicode-segmentation`), with the boundaries that follow a committed list of finance
//! abbreviations (`abbreviations.txt`: "U.S.", "Inc.", "No.") removed, since UAX #29 ends a
//! sentence there whenever a capital letter or a digit follows. Numbers ("EUR 13.1 mn") and
//! PhraseBank's detached final stop ("Q3 2024 .") need nothing: UAX #29 does not break inside a
//! number and keeps a stop with the sentence before it.

use std::sync::LazyLock;

use unicode_segmentation::UnicodeSegmentation;

static ABBREVIATIONS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    include_str!("abbreviations.txt")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
});

/// A name's initial ("D."), which UAX #29 takes for a sentence end before a capital.
fn is_initial(word: &str) -> bool {
    let mut chars = word.chars();
    matches!((chars.next(), chars.next(), chars.next()), (Some(c), Some('.'), None) if c.is_uppercase())
}

/// Byte spans of `text`'s sentences, in order, without surrounding whitespace; blank stretches
/// (blank lines between paragraphs) belong to no sentence.
pub fn split(text: &str) -> Vec<(usize, usize)> {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut joined = false;
    for (start, piece) in text.split_sentence_bound_indices() {
        let end = start + piece.len();
        match spans.last_mut() {
            Some(last) if joined => last.1 = end,
            _ => spans.push((start, end)),
        }
        let last_word = piece.split_whitespace().next_back().unwrap_or("");
        // Only a boundary right after the abbreviation (no line break in between) is undone.
        joined = (ABBREVIATIONS.contains(&last_word) || is_initial(last_word))
            && !piece.trim_end_matches(' ').ends_with('\n');
    }
    spans
        .into_iter()
        .filter_map(|(s, e)| {
            let piece = &text[s..e];
            let lead = piece.len() - piece.trim_start().len();
            let trimmed = piece.trim();
            (!trimmed.is_empty()).then(|| (s + lead, s + lead + trimmed.len()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentences(text: &str) -> Vec<&str> {
        split(text).into_iter().map(|(s, e)| &text[s..e]).collect()
    }

    #[test]
    fn finance_abbreviations_and_numbers_do_not_end_sentences() {
        let text = "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in Q3 2024 . \
                    U.S. Steel Corp. Chief Executive Officer D. Burritt spoke. Acme Inc. \
                    Shares rose 5.2% to No. 3 in the index.\n\nOutlook: weaker.";
        assert_eq!(
            sentences(text),
            vec![
                "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn in Q3 2024 .",
                "U.S. Steel Corp. Chief Executive Officer D. Burritt spoke.",
                "Acme Inc. Shares rose 5.2% to No. 3 in the index.",
                "Outlook: weaker.",
            ]
        );
    }

    #[test]
    fn spans_cover_only_non_blank_text() {
        assert!(split("  \n\n ").is_empty());
        assert_eq!(
            sentences("One. Two?  Three!"),
            vec!["One.", "Two?", "Three!"]
        );
        assert_eq!(sentences("No stop at the end"), vec!["No stop at the end"]);
        assert_eq!(sentences("Pays €5. Then €6."), vec!["Pays €5.", "Then €6."]);
    }
}
