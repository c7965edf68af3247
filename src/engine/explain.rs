//! Occlusion explanations (`explain`): a word's attribution to a label is how much the label's
//! probability falls when the word is removed from the text. A word is a maximal run of
//! non-whitespace characters; removing it also removes the whitespace after it (before it, for
//! the last word), so the rest of the text is re-joined exactly as it was written. Every
//! occluded text is scored like any other text, in the same engine batches: exact by
//! construction.

use std::ops::Range;

/// Byte ranges of `text`'s whitespace-separated words.
pub fn words(text: &str) -> Vec<Range<usize>> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                words.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push(s..text.len());
    }
    words
}

/// The byte range that removing `words[i]` cuts from the text.
pub fn cut(text: &str, words: &[Range<usize>], i: usize) -> Range<usize> {
    match (
        words.get(i + 1),
        i.checked_sub(1).and_then(|p| words.get(p)),
    ) {
        (Some(next), _) => words[i].start..next.start,
        (None, Some(prev)) => prev.end..text.len().max(words[i].end),
        (None, None) => 0..text.len(),
    }
}

/// `text` without the bytes `cut`.
pub fn without(text: &str, cut: &Range<usize>) -> String {
    [&text[..cut.start], &text[cut.end..]].concat()
}

/// Where byte offset `b` (outside `cut`) of the text lands once `cut` is removed.
pub fn shift(b: usize, cut: &Range<usize>) -> usize {
    if b >= cut.end { b - cut.len() } else { b }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_a_word_keeps_the_rest_as_written() {
        let text = "Profit  rose\tto EUR 13.1 mn .";
        let w = words(text);
        let texts: Vec<String> = (0..w.len())
            .map(|i| without(text, &cut(text, &w, i)))
            .collect();
        assert_eq!(texts[0], "rose\tto EUR 13.1 mn .");
        assert_eq!(texts[1], "Profit  to EUR 13.1 mn .");
        assert_eq!(texts[6], "Profit  rose\tto EUR 13.1 mn");
        assert_eq!(w.len(), 7);
        assert_eq!(without("alone", &cut("alone", &words("alone"), 0)), "");
        let c = 3..6;
        assert_eq!((shift(2, &c), shift(6, &c), shift(9, &c)), (2, 3, 6));
    }
}
