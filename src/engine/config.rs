//! The engine's settings: how it batches, and what one request may ask of it.

use std::time::Duration;

/// Limits on what one request may ask. `/info` reports them and the served OpenAPI document
/// states them as schema bounds.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLimits {
    pub max_new_tokens: usize,
    /// Input tokens plus `max_new_tokens` of one generation.
    pub max_total_tokens: usize,
    pub max_stop_sequences: usize,
    /// In characters.
    pub max_stop_length: usize,
    /// Texts in one request.
    pub max_client_batch_size: usize,
    pub max_candidate_labels: usize,
    /// In characters.
    pub max_label_length: usize,
    /// Input tokens shared by consecutive windows of a long input.
    pub chunk_overlap: usize,
    pub max_chunks_per_input: usize,
    /// Targets of one text (entity-level sentiment).
    pub max_targets_per_input: usize,
    /// Words of one text that `explain` occludes, one scored variant each.
    pub max_explain_words: usize,
    /// Sentences of one text in `sentences` mode.
    pub max_sentences_per_input: usize,
    /// Windows one scoring request may need, over all its texts, targets, sentences, chunks and
    /// explained words: the bound on one request's work.
    pub max_windows_per_request: usize,
}

impl Default for RequestLimits {
    /// The `finserve serve` defaults.
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            max_total_tokens: 768,
            max_stop_sequences: 4,
            max_stop_length: 128,
            max_client_batch_size: 64,
            max_candidate_labels: 10,
            max_label_length: 64,
            chunk_overlap: 32,
            max_chunks_per_input: 16,
            max_targets_per_input: 16,
            max_explain_words: 64,
            max_sentences_per_input: 256,
            max_windows_per_request: 1024,
        }
    }
}

/// Limits and batching knobs of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_batch_size: usize,
    /// Upper bound on padded encoder tokens (longest input x batch size) per batch.
    pub max_batch_tokens: usize,
    pub max_batch_wait: Duration,
    /// Requests that may wait in the queue before new ones are refused.
    pub queue_capacity: usize,
    pub max_input_tokens: usize,
    pub prompt_template: String,
    pub limits: RequestLimits,
    /// Decode slots of each variant that batch-priority generations may not take, so that an
    /// interactive generation finds room however large a backfill is.
    pub interactive_slots: usize,
    /// Most inputs of a sentiment batch of batch-priority work: an interactive request that
    /// arrives while one runs waits for it, so it is kept short.
    pub backfill_batch_size: usize,
}

impl Default for EngineConfig {
    /// The `finserve serve` defaults.
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_batch_tokens: 16384,
            max_batch_wait: Duration::ZERO,
            queue_capacity: 512,
            max_input_tokens: 512,
            prompt_template: "{text}".into(),
            limits: RequestLimits::default(),
            interactive_slots: 8,
            backfill_batch_size: 2,
        }
    }
}
