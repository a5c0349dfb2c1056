//! Pure types and decision functions shared across weir.
//!
//! This crate holds what more than one part of weir must agree on bit for bit: how text becomes token ids
//! ([`tokens`]), how token ids become chained KV-block hashes ([`blocks`]), the OpenAI / vLLM error bodies
//! ([`errors`]), and the admission decisions: tenant policies and their CRD ([`tenant`]), tiered weighted-fair queuing
//! ([`fair`]), how many requests a pool may take now ([`room`]) and rate limits ([`gcra`]). It must never depend on tokio, an HTTP stack, a
//! Kubernetes client or Redis (kube appears only through its `derive` feature, for the CRD type), and never read a
//! clock or global randomness: callers pass `now` and an RNG in, so every decision is deterministic under test.

pub mod blocks;
pub mod crd;
pub mod decision;
pub mod endpoint;
pub mod errors;
pub mod fair;
pub mod gcra;
pub mod hf_tokenizer;
pub mod kv_events;
pub mod openai;
pub mod pick;
pub mod pool;
pub mod prefix;
pub mod promtext;
pub mod room;
pub mod tenant;
#[cfg(test)]
mod testkit;
pub mod tokens;
