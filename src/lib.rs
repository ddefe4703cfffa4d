//! flow: a workflow engine that turns a team's own documents into a better retriever.
//! The library holds everything; the `flow` binary only parses arguments and prints.

pub mod beir;
pub mod bert;
pub mod corpus;
pub mod dag;
pub mod diag;
pub mod digest;
pub mod engine;
pub mod error;
pub mod eval;
pub mod llm;
pub mod models;
pub mod progress;
pub mod prompt;
pub mod rank;
pub mod report;
pub mod retriever;
pub mod schedule;
pub mod serve;
pub mod stages;
pub mod store;
pub mod text;
pub mod train;
pub mod workflow;

pub use error::{Error, Result};
