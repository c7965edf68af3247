//! finserve: an inference server for T5-family (mt0 / mT5) seq2seq models with PEFT LoRA adapters
//! merged into the weights at startup.
//!
//! The layers, from the outside in: [`http`] (axum routes, errors to statuses, metrics endpoint)
//! -> [`engine`] (queue, batching, decoding, label scoring on one model thread) -> [`model`]
//! (loading, [`lora`] merging, the T5 forward pass). [`cli`] wires them together for the
//! `serve`, `merge` ([`export`]), `eval` ([`eval`]) and `train` ([`train`]) commands.

pub mod calibration;
pub mod cli;
pub mod engine;
pub mod error;
pub mod eval;
pub mod export;
pub mod http;
pub mod hub;
pub mod lora;
pub mod metrics;
pub mod model;
pub mod telemetry;
pub mod train;
