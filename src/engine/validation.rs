//! Checks of what a request asks against the server's [`RequestLimits`], with TGI's rules where
//! they overlap: [`GenerateOptions`] become the engine's [`GenerateParams`], a request's own labels
//! are counted and measured. Every violation is an [`Error::Invalid`] naming the [`Field`] (and
//! the [`Limit`], when one was crossed).

use super::config::RequestLimits;
use super::generate::GenerateParams;
use crate::error::{Error, Field, Limit, Result};

/// `max_new_tokens` when the request does not say.
const DEFAULT_MAX_NEW_TOKENS: usize = 20;

/// Decoding options as a request gives them, not yet checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: Option<i64>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Vec<String>,
    /// Report each token's log-probability.
    pub logprobs: bool,
}

/// A count that must be at least 1.
pub fn positive(field: Field, value: Option<i64>) -> Result<Option<usize>> {
    match value {
        Some(v) if v < 1 => Err(Error::invalid(field, format!("must be >= 1 (got {v})"))),
        Some(v) => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
        None => Ok(None),
    }
}

/// A request's own labels, within the count and length limits.
pub fn candidate_labels(names: &[String], limits: &RequestLimits) -> Result<()> {
    if names.len() < 2 || names.len() > limits.max_candidate_labels {
        return Err(Error::over_limit(
            Field::Labels,
            Limit::MaxCandidateLabels,
            limits.max_candidate_labels,
            format!(
                "must have 2 to {} labels (got {})",
                limits.max_candidate_labels,
                names.len()
            ),
        ));
    }
    if let Some(long) = names
        .iter()
        .find(|n| n.chars().count() > limits.max_label_length)
    {
        return Err(Error::over_limit(
            Field::Labels,
            Limit::MaxLabelLength,
            limits.max_label_length,
            format!(
                "`{long}` is longer than {} characters",
                limits.max_label_length
            ),
        ));
    }
    Ok(())
}

/// The generation parameters of a request whose input has `input_tokens` tokens.
pub fn generate_params(
    p: &GenerateOptions,
    input_tokens: usize,
    limits: &RequestLimits,
) -> Result<GenerateParams> {
    let room = limits.max_total_tokens.saturating_sub(input_tokens);
    let max_new_tokens = match positive(Field::MaxNewTokens, p.max_new_tokens)? {
        Some(n) if n > limits.max_new_tokens => {
            return Err(Error::over_limit(
                Field::MaxNewTokens,
                Limit::MaxNewTokens,
                limits.max_new_tokens,
                format!("must be <= {} (got {n})", limits.max_new_tokens),
            ));
        }
        Some(n) if n > room => {
            return Err(Error::over_limit(
                Field::MaxNewTokens,
                Limit::MaxTotalTokens,
                limits.max_total_tokens,
                format!(
                    "input tokens + new tokens must be <= {}. Given: {input_tokens} input tokens \
                     and {n} new tokens",
                    limits.max_total_tokens
                ),
            ));
        }
        Some(n) => n,
        None if room == 0 => {
            return Err(Error::over_limit(
                Field::Inputs,
                Limit::MaxTotalTokens,
                limits.max_total_tokens,
                format!(
                    "the input has {input_tokens} tokens, which leaves no room to generate within \
                     {} tokens",
                    limits.max_total_tokens
                ),
            ));
        }
        None => DEFAULT_MAX_NEW_TOKENS.min(limits.max_new_tokens).min(room),
    };
    for (field, value) in [
        (Field::Temperature, p.temperature),
        (Field::RepetitionPenalty, p.repetition_penalty),
    ] {
        if let Some(v) = value
            && !(v.is_finite() && v > 0.0)
        {
            return Err(Error::invalid(
                field,
                format!("must be strictly positive (got {v})"),
            ));
        }
    }
    if let Some(v) = p.top_p
        && !(v > 0.0 && v < 1.0)
    {
        return Err(Error::invalid(
            Field::TopP,
            format!("must be > 0.0 and < 1.0 (got {v})"),
        ));
    }
    let top_k = positive(Field::TopK, p.top_k)?;
    let seed = match p.seed {
        Some(s) => Some(
            u64::try_from(s)
                .map_err(|_| Error::invalid(Field::Seed, format!("must be >= 0 (got {s})")))?,
        ),
        None => None,
    };
    if p.stop.len() > limits.max_stop_sequences {
        return Err(Error::over_limit(
            Field::Stop,
            Limit::MaxStopSequences,
            limits.max_stop_sequences,
            format!(
                "supports up to {} stop sequences. Given: {}",
                limits.max_stop_sequences,
                p.stop.len()
            ),
        ));
    }
    for s in &p.stop {
        let chars = s.chars().count();
        if chars == 0 || chars > limits.max_stop_length {
            return Err(Error::over_limit(
                Field::Stop,
                Limit::MaxStopLength,
                limits.max_stop_length,
                format!(
                    "stop sequences must have 1 to {} characters (got {chars})",
                    limits.max_stop_length
                ),
            ));
        }
    }
    Ok(GenerateParams {
        max_new_tokens,
        do_sample: p.do_sample.unwrap_or(false),
        temperature: p.temperature,
        top_k,
        top_p: p.top_p,
        repetition_penalty: p.repetition_penalty,
        seed,
        stop: p.stop.clone(),
        logprobs: p.logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits {
            max_new_tokens: 64,
            max_total_tokens: 100,
            max_stop_sequences: 2,
            max_stop_length: 5,
            ..RequestLimits::default()
        }
    }

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn field(e: Error) -> Field {
        match e {
            Error::Invalid { field, .. } => field,
            other => panic!("not a refusal: {other}"),
        }
    }

    #[test]
    fn rejects_out_of_range_parameters_naming_them() {
        let o = GenerateOptions::default;
        let bad = [
            (
                Field::MaxNewTokens,
                GenerateOptions {
                    max_new_tokens: Some(0),
                    ..o()
                },
            ),
            (
                Field::MaxNewTokens,
                GenerateOptions {
                    max_new_tokens: Some(65),
                    ..o()
                },
            ),
            (
                Field::Temperature,
                GenerateOptions {
                    temperature: Some(0.0),
                    ..o()
                },
            ),
            (
                Field::TopP,
                GenerateOptions {
                    top_p: Some(1.0),
                    ..o()
                },
            ),
            (
                Field::TopK,
                GenerateOptions {
                    top_k: Some(0),
                    ..o()
                },
            ),
            (
                Field::RepetitionPenalty,
                GenerateOptions {
                    repetition_penalty: Some(-1.0),
                    ..o()
                },
            ),
            (
                Field::Seed,
                GenerateOptions {
                    seed: Some(-1),
                    ..o()
                },
            ),
            (
                Field::Stop,
                GenerateOptions {
                    stop: stops(&[""]),
                    ..o()
                },
            ),
            (
                Field::Stop,
                GenerateOptions {
                    stop: stops(&["a", "b", "c"]),
                    ..o()
                },
            ),
            (
                Field::Stop,
                GenerateOptions {
                    stop: stops(&["toolong"]),
                    ..o()
                },
            ),
        ];
        for (name, p) in bad {
            let e = generate_params(&p, 10, &limits()).unwrap_err();
            assert_eq!(field(e), name);
        }
        let ok = GenerateOptions {
            max_new_tokens: Some(64),
            top_k: Some(5),
            stop: stops(&["été!", "ab"]),
            ..o()
        };
        let p = generate_params(&ok, 10, &limits()).unwrap();
        assert_eq!((p.max_new_tokens, p.top_k), (64, Some(5)));
    }

    #[test]
    fn max_total_tokens_bounds_input_plus_new_tokens() {
        let asked = GenerateOptions {
            max_new_tokens: Some(50),
            ..Default::default()
        };
        assert!(generate_params(&asked, 50, &limits()).is_ok());
        let e = generate_params(&asked, 51, &limits()).unwrap_err();
        assert!(e.to_string().contains("must be <= 100"), "{e}");
        assert!(matches!(
            e,
            Error::Invalid {
                limit: Some((Limit::MaxTotalTokens, _)),
                ..
            }
        ));
        // Unasked, the default shrinks to what is left, and fails only when nothing is.
        let unasked = GenerateOptions::default();
        assert_eq!(
            generate_params(&unasked, 10, &limits())
                .unwrap()
                .max_new_tokens,
            20
        );
        assert_eq!(
            generate_params(&unasked, 95, &limits())
                .unwrap()
                .max_new_tokens,
            5
        );
        assert!(generate_params(&unasked, 100, &limits()).is_err());
    }

    #[test]
    fn candidate_labels_are_counted_and_measured() {
        let l = limits();
        assert!(candidate_labels(&stops(&["a", "b"]), &l).is_ok());
        assert_eq!(
            field(candidate_labels(&stops(&["a"]), &l).unwrap_err()),
            Field::Labels
        );
        let long = vec!["a".to_string(), "x".repeat(l.max_label_length + 1)];
        assert!(matches!(
            candidate_labels(&long, &l),
            Err(Error::Invalid {
                limit: Some((Limit::MaxLabelLength, _)),
                ..
            })
        ));
    }
}
