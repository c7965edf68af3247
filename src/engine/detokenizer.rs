//! Incremental detokenization of a generated sequence, for streaming.
//!
//! A token's text is not always a substring of the whole decode: SentencePiece strips the leading
//! space of the first piece, and byte-fallback tokens carry a fraction of a UTF-8 character. So,
//! as TGI does, each step decodes a short window twice, from `prefix` (an already-emitted
//! token, which gives the decoder its context) up to `read` and up to the new token, and emits
//! the difference once it is stable: it does not end in an incomplete character (U+FFFD), and
//! the new token is neither a byte-fallback token (`<0xNN>`) nor a special token skipped in
//! decoding. The last two matter because the ByteFallback decoder turns a whole run of byte
//! tokens into U+FFFDs when any byte of the run is invalid, so bytes that decode cleanly now can
//! decode differently once the run goes on. Work per token is the window, so a whole sequence
//! costs time linear in its length.
//! Whatever is still held back at the end is emitted with the last token, so the streamed texts
//! always concatenate to the decode of the whole sequence.

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    emitted: String,
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .decode(ids, true)
        .map_err(|e| Error::Tokenizer(e.to_string()))
}

impl Detokenizer {
    /// Adds a generated token; returns the text that became stable with it (often empty while
    /// a multi-byte character is incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        if may_continue_a_byte_run(tokenizer, id) {
            return Ok(String::new());
        }
        let before = decode(tokenizer, &self.ids[self.prefix..self.read])?;
        let after = decode(tokenizer, &self.ids[self.prefix..])?;
        let stable = after.len() > before.len()
            && !after.ends_with(char::REPLACEMENT_CHARACTER)
            && after.is_char_boundary(before.len());
        if !stable {
            return Ok(String::new());
        }
        let piece = after[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        self.emitted.push_str(&piece);
        Ok(piece)
    }

    /// The text emitted so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }

    /// Ends the sequence: the whole decoded text and the part of it not emitted yet.
    pub fn finish(&self, tokenizer: &Tokenizer) -> Result<(String, String)> {
        let full = decode(tokenizer, &self.ids)?;
        let rest = full
            .strip_prefix(self.emitted.as_str())
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "streamed text {:?} is not a prefix of the decoded sequence {full:?}",
                    self.emitted
                ))
            })?
            .to_string();
        Ok((full, rest))
    }
}

/// Whether the text of a run of byte tokens may still change after `id`: it is a byte token
/// itself, or a special token that decoding skips (so the run can continue after it).
fn may_continue_a_byte_run(tokenizer: &Tokenizer, id: u32) -> bool {
    tokenizer.id_to_token(id).is_some_and(|t| {
        let byte = t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
        byte || tokenizer.get_added_vocabulary().is_special_token(&t)
    })
}

#[cfg(test)]
mod tests {
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// A SentencePiece-style tokenizer with byte fallback (as Llama's): word pieces with the
    /// `▁` space marker, multilingual pieces, and the 256 `<0xNN>` byte tokens.
    fn byte_fallback_tokenizer() -> Tokenizer {
        let mut vocab = vec![
            serde_json::json!(["<pad>", 0.0]),
            serde_json::json!(["</s>", 0.0]),
            serde_json::json!(["<unk>", 0.0]),
        ];
        for piece in [
            "▁",
            "▁the",
            "▁profit",
            "▁rose",
            "é",
            "▁résultat",
            "日本",
            "語",
            "▁株価",
            "€",
            "s",
            ".",
            "▁12",
            "%",
        ] {
            vocab.push(serde_json::json!([piece, -1.0]));
        }
        for b in 0..=255u8 {
            vocab.push(serde_json::json!([format!("<0x{b:02X}>"), -10.0]));
        }
        let json = serde_json::json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 0, "content": "<pad>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 2, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": false},
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}
            ]},
            "model": {"type": "Unigram", "unk_id": 2, "vocab": vocab, "byte_fallback": true}
        });
        json.to_string().parse().expect("tokenizer json")
    }

    fn stream(tokenizer: &Tokenizer, ids: &[u32]) -> (Vec<String>, String) {
        let mut d = Detokenizer::default();
        let mut pieces: Vec<String> = ids
            .iter()
            .map(|&id| d.push(tokenizer, id).unwrap())
            .collect();
        let (full, rest) = d.finish(tokenizer).unwrap();
        pieces.last_mut().unwrap().push_str(&rest);
        (pieces, full)
    }

    #[test]
    fn random_sequences_stream_exactly_the_full_decode() {
        let tok = byte_fallback_tokenizer();
        let vocab = tok.get_vocab_size(true) as u32;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..500 {
            let len = rng.random_range(1..40);
            // Mostly byte tokens, so split characters, invalid bytes and specials all occur.
            let ids: Vec<u32> = (0..len)
                .map(|_| match rng.random_range(0..10) {
                    0 => rng.random_range(0..3),
                    1..=3 => rng.random_range(3..18),
                    _ => rng.random_range(18..vocab),
                })
                .collect();
            let (pieces, full) = stream(&tok, &ids);
            assert_eq!(pieces.concat(), full, "{ids:?}");
            assert_eq!(full, tok.decode(&ids, true).unwrap());
        }
    }

    #[test]
    fn byte_runs_are_held_back_until_they_end() {
        let tok = byte_fallback_tokenizer();
        let byte = |b: u8| tok.token_to_id(&format!("<0x{b:02X}>")).unwrap();
        // "▁the" then "€" (E2 82 AC) and "😀" (F0 9F 98 80) as byte tokens, then "▁rose".
        let mut ids = vec![tok.token_to_id("▁the").unwrap()];
        ids.extend([0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80].map(byte));
        ids.push(tok.token_to_id("▁rose").unwrap());
        let (pieces, full) = stream(&tok, &ids);
        assert_eq!(pieces, ["the", "", "", "", "", "", "", "", "€😀 rose"]);
        assert_eq!(full, "the€😀 rose");
    }

    #[test]
    fn a_sequence_cut_inside_a_character_ends_with_the_replacement_text() {
        let tok = byte_fallback_tokenizer();
        let ids = vec![
            tok.token_to_id("日本").unwrap(),
            tok.token_to_id("<0xE2>").unwrap(),
        ];
        let (pieces, full) = stream(&tok, &ids);
        assert_eq!(pieces[0], "日本");
        assert_eq!(pieces.concat(), full);
        assert!(full.ends_with(char::REPLACEMENT_CHARACTER));
    }
}
