//! Checks of request parameters against the server's limits, with TGI's rules where they
//! overlap, before anything is queued.

use super::EngineConfig;
use super::generate::GenerateParams;
use crate::error::{Error, Result};

/// Generation parameters as a client sent them; every field optional.
#[derive(Debug, Clone, Default)]
pub struct RawGenerateParams {
    pub max_new_tokens: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// At most this many stop sequences, as in TGI's default.
pub const MAX_STOP_SEQUENCES: usize = 4;

fn invalid(msg: String) -> Error {
    Error::Validation(msg)
}

pub fn validate_generate(raw: RawGenerateParams, cfg: &EngineConfig) -> Result<GenerateParams> {
    let max_new_tokens = match raw.max_new_tokens {
        None => cfg.max_new_tokens.min(20),
        Some(0) => return Err(invalid("`max_new_tokens` must be > 0".into())),
        Some(n) if n as usize > cfg.max_new_tokens => {
            return Err(invalid(format!(
                "`max_new_tokens` must be <= {} (got {n})",
                cfg.max_new_tokens
            )));
        }
        Some(n) => n as usize,
    };
    if let Some(t) = raw.temperature
        && !(t.is_finite() && t > 0.0)
    {
        return Err(invalid(format!(
            "`temperature` must be strictly positive (got {t})"
        )));
    }
    if let Some(p) = raw.repetition_penalty
        && !(p.is_finite() && p > 0.0)
    {
        return Err(invalid(format!(
            "`repetition_penalty` must be strictly positive (got {p})"
        )));
    }
    if let Some(p) = raw.top_p
        && !(p > 0.0 && p < 1.0)
    {
        return Err(invalid(format!(
            "`top_p` must be > 0.0 and < 1.0 (got {p})"
        )));
    }
    let top_k = match raw.top_k {
        Some(k) if k <= 0 => {
            return Err(invalid(format!(
                "`top_k` must be strictly positive (got {k})"
            )));
        }
        Some(k) => Some(k as usize),
        None => None,
    };
    if raw.stop.len() > MAX_STOP_SEQUENCES {
        return Err(invalid(format!(
            "`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences (got {})",
            raw.stop.len()
        )));
    }
    if raw.stop.iter().any(String::is_empty) {
        return Err(invalid("`stop` sequences must not be empty".into()));
    }
    Ok(GenerateParams {
        max_new_tokens,
        do_sample: raw.do_sample.unwrap_or(false),
        temperature: raw.temperature,
        top_k,
        top_p: raw.top_p,
        repetition_penalty: raw.repetition_penalty,
        seed: raw.seed,
        stop: raw.stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg() -> EngineConfig {
        EngineConfig {
            max_batch_size: 8,
            max_batch_tokens: 4096,
            max_batch_wait: Duration::ZERO,
            queue_capacity: 16,
            max_input_tokens: 512,
            max_new_tokens: 64,
            prompt_template: "{text}".into(),
        }
    }

    #[test]
    fn rejects_out_of_range_parameters() {
        let bad = [
            RawGenerateParams {
                max_new_tokens: Some(0),
                ..Default::default()
            },
            RawGenerateParams {
                max_new_tokens: Some(65),
                ..Default::default()
            },
            RawGenerateParams {
                temperature: Some(0.0),
                ..Default::default()
            },
            RawGenerateParams {
                top_p: Some(1.0),
                ..Default::default()
            },
            RawGenerateParams {
                top_k: Some(0),
                ..Default::default()
            },
            RawGenerateParams {
                repetition_penalty: Some(-1.0),
                ..Default::default()
            },
            RawGenerateParams {
                stop: vec![String::new()],
                ..Default::default()
            },
        ];
        for raw in bad {
            assert!(validate_generate(raw.clone(), &cfg()).is_err(), "{raw:?}");
        }
        let ok = validate_generate(
            RawGenerateParams {
                max_new_tokens: Some(64),
                top_k: Some(5),
                ..Default::default()
            },
            &cfg(),
        )
        .unwrap();
        assert_eq!((ok.max_new_tokens, ok.top_k), (64, Some(5)));
    }
}
