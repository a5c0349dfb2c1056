//! A simulated vLLM (v1 engine) model server, wire-identical on HTTP, Prometheus and KV events, timing-faithful per
//! GPU profile.
//!
//! weir has no GPU to develop on, so every routing, admission and scaling claim rests on this crate. The engine model
//! ([`engine`]) is pure and deterministic given a seed and the times passed in; it is driven either in real time on
//! tokio (the HTTP server) or in virtual time by a discrete-event runner that plays a trace through a fleet as fast
//! as the CPU allows. This crate is linked into production paths only through the `weir` binary's `sim` command.

pub mod des;
pub mod driver;
pub mod elastic;
pub mod engine;
pub mod faults;
pub mod fleet;
pub mod metrics;
pub mod precise;
pub mod profile;
pub mod server;
pub mod workload;
pub mod zmq;
