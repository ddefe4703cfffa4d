//! Integration tests: each runs the real `flow` binary on a temporary folder.

mod chunk;
mod engine;
mod eval;
mod harness;
mod llm;
mod local;
#[path = "../support/openai_server.rs"]
mod openai_server;
mod schedule;
mod train;
mod validate;
