//! Integration tests: each runs the real `flow` binary on a temporary folder.

mod chunk;
mod engine;
mod harness;
mod validate;
