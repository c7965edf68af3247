//! finserve: an inference server for T5-family (mt0 / mT5) seq2seq models with PEFT LoRA adapters
//! merged into the weights at startup.
//!
//! The layers, from the outside in: [`http`] (axum routes, errors to statuses, metrics endpoint)
//! -> [`engine`] (request-level calls, queue, batching, decoding, label scoring on one model
//! thread) -> [`model`] (loading, LoRA merging, the T5 forward pass). [`cli`] parses the command
//! line into jobs: [`server`] runs `serve`, [`eval`], [`export`] (`merge`) and [`train`] the
//! others; [`served`] loads what `serve` and `eval` serve.

pub mod audit;
pub mod calibration;
pub mod classification;
pub mod cli;
pub mod data_file;
pub mod engine;
pub mod entity_data;
pub mod entity_eval;
pub mod error;
pub mod eval;
pub mod export;
pub mod generation_eval;
pub mod generation_metrics;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod model;
pub mod parquet_output;
pub mod predict;
pub mod served;
pub mod server;
pub mod telemetry;
pub mod train;
pub mod variants;
