//! Checks of request parameters against the server's limits, with TGI's rules and messages where
//! they overlap, turning the client's [`GenerateParameters`] into the engine's [`GenerateParams`].
//! Every violation is a [`Error::Validation`] (422) naming the parameter.

use super::RequestLimits;
use super::types::{GenerateParameters, Labels};
use crate::engine::generate::GenerateParams;
use crate::error::{Error, Result};

/// `max_new_tokens` when the client does not say.
const DEFAULT_MAX_NEW_TOKENS: usize = 20;

fn invalid(msg: String) -> Error {
    Error::Validation(msg)
}

/// A count parameter that must be at least 1.
fn positive(name: &str, value: Option<i64>) -> Result<Option<usize>> {
    match value {
        Some(v) if v < 1 => Err(invalid(format!("`{name}` must be >= 1 (got {v})"))),
        Some(v) => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
        None => Ok(None),
    }
}

/// `top_k` of `/v1/sentiment`: how many labels to return (all by default).
pub fn sentiment_top_k(top_k: Option<i64>) -> Result<usize> {
    Ok(positive("top_k", top_k)?.unwrap_or(usize::MAX))
}

/// `candidate_labels` of `/v1/sentiment`, within the server's count and length limits.
pub fn candidate_labels(labels: Labels, limits: &RequestLimits) -> Result<Vec<String>> {
    let names: Vec<String> = labels.0.into_iter().map(|l| l.0).collect();
    if names.len() < 2 || names.len() > limits.max_candidate_labels {
        return Err(invalid(format!(
            "`candidate_labels` must have 2 to {} labels (got {})",
            limits.max_candidate_labels,
            names.len()
        )));
    }
    if let Some(long) = names
        .iter()
        .find(|n| n.chars().count() > limits.max_label_length)
    {
        return Err(invalid(format!(
            "`candidate_labels`: `{long}` is longer than {} characters",
            limits.max_label_length
        )));
    }
    Ok(names)
}

/// The generation parameters of a request whose input has `input_tokens` tokens.
pub fn generate_params(
    p: &GenerateParameters,
    input_tokens: usize,
    limits: &RequestLimits,
) -> Result<GenerateParams> {
    let room = limits.max_total_tokens.saturating_sub(input_tokens);
    let max_new_tokens = match positive("max_new_tokens", p.max_new_tokens)? {
        Some(n) if n > limits.max_new_tokens => {
            return Err(invalid(format!(
                "`max_new_tokens` must be <= {} (got {n})",
                limits.max_new_tokens
            )));
        }
        Some(n) if n > room => {
            return Err(invalid(format!(
                "`inputs` tokens + `max_new_tokens` must be <= {}. Given: {input_tokens} `inputs` \
                 tokens and {n} `max_new_tokens`",
                limits.max_total_tokens
            )));
        }
        Some(n) => n,
        None if room == 0 => {
            return Err(invalid(format!(
                "`inputs` has {input_tokens} tokens, which leaves no room to generate within \
                 max_total_tokens ({})",
                limits.max_total_tokens
            )));
        }
        None => DEFAULT_MAX_NEW_TOKENS.min(limits.max_new_tokens).min(room),
    };
    for (name, value) in [
        ("temperature", p.temperature),
        ("repetition_penalty", p.repetition_penalty),
    ] {
        if let Some(v) = value
            && !(v.is_finite() && v > 0.0)
        {
            return Err(invalid(format!(
                "`{name}` must be strictly positive (got {v})"
            )));
        }
    }
    if let Some(v) = p.top_p
        && !(v > 0.0 && v < 1.0)
    {
        return Err(invalid(format!(
            "`top_p` must be > 0.0 and < 1.0 (got {v})"
        )));
    }
    let top_k = positive("top_k", p.top_k)?;
    let seed = match p.seed {
        Some(s) => {
            Some(u64::try_from(s).map_err(|_| invalid(format!("`seed` must be >= 0 (got {s})")))?)
        }
        None => None,
    };
    let stop: Vec<String> = p.stop.iter().flatten().map(|s| s.0.clone()).collect();
    if stop.len() > limits.max_stop_sequences {
        return Err(invalid(format!(
            "`stop` supports up to {} stop sequences. Given: {}",
            limits.max_stop_sequences,
            stop.len()
        )));
    }
    for s in &stop {
        let chars = s.chars().count();
        if chars == 0 || chars > limits.max_stop_length {
            return Err(invalid(format!(
                "`stop` sequences must have 1 to {} characters (got {chars})",
                limits.max_stop_length
            )));
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
        stop,
    })
}

/// `truncate` of `/v1/generate`: keep at most this many input tokens.
pub fn generate_truncate(truncate: Option<i64>) -> Result<Option<usize>> {
    positive("truncate", truncate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::types::StopSequence;

    fn limits() -> RequestLimits {
        RequestLimits {
            max_new_tokens: 64,
            max_total_tokens: 100,
            max_stop_sequences: 2,
            max_stop_length: 5,
            ..RequestLimits::default()
        }
    }

    fn stops(s: &[&str]) -> Option<Vec<StopSequence>> {
        Some(s.iter().map(|s| StopSequence(s.to_string())).collect())
    }

    #[test]
    fn rejects_out_of_range_parameters_naming_them() {
        let bad = [
            (
                "max_new_tokens",
                GenerateParameters {
                    max_new_tokens: Some(0),
                    ..Default::default()
                },
            ),
            (
                "max_new_tokens",
                GenerateParameters {
                    max_new_tokens: Some(65),
                    ..Default::default()
                },
            ),
            (
                "temperature",
                GenerateParameters {
                    temperature: Some(0.0),
                    ..Default::default()
                },
            ),
            (
                "top_p",
                GenerateParameters {
                    top_p: Some(1.0),
                    ..Default::default()
                },
            ),
            (
                "top_k",
                GenerateParameters {
                    top_k: Some(0),
                    ..Default::default()
                },
            ),
            (
                "repetition_penalty",
                GenerateParameters {
                    repetition_penalty: Some(-1.0),
                    ..Default::default()
                },
            ),
            (
                "seed",
                GenerateParameters {
                    seed: Some(-1),
                    ..Default::default()
                },
            ),
            (
                "stop",
                GenerateParameters {
                    stop: stops(&[""]),
                    ..Default::default()
                },
            ),
            (
                "stop",
                GenerateParameters {
                    stop: stops(&["a", "b", "c"]),
                    ..Default::default()
                },
            ),
            (
                "stop",
                GenerateParameters {
                    stop: stops(&["toolong"]),
                    ..Default::default()
                },
            ),
        ];
        for (name, p) in bad {
            let e = generate_params(&p, 10, &limits()).unwrap_err().to_string();
            assert!(e.contains(&format!("`{name}`")), "{name}: {e}");
        }
        let ok = GenerateParameters {
            max_new_tokens: Some(64),
            top_k: Some(5),
            stop: stops(&["été!", "ab"]),
            ..Default::default()
        };
        let p = generate_params(&ok, 10, &limits()).unwrap();
        assert_eq!((p.max_new_tokens, p.top_k), (64, Some(5)));
    }

    #[test]
    fn max_total_tokens_bounds_input_plus_new_tokens() {
        let asked = GenerateParameters {
            max_new_tokens: Some(50),
            ..Default::default()
        };
        assert!(generate_params(&asked, 50, &limits()).is_ok());
        let e = generate_params(&asked, 51, &limits())
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be <= 100"), "{e}");
        // Unasked, the default shrinks to what is left, and fails only when nothing is.
        let unasked = GenerateParameters::default();
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
}
