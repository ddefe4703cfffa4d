//! Integration tests: most run the real `flow` binary on a temporary folder; some call the library
//! directly (local models, the loopback server), and `layers` reads the source.

mod batch;
mod branches;
mod chunk;
mod engine;
mod eval;
mod harness;
mod layers;
mod llm;
mod local;
#[path = "../support/openai_server.rs"]
mod openai_server;
mod plan;
mod pull;
mod reliable;
mod robust;
mod schedule;
mod serve;
mod settings;
mod train;
mod validate;
