//! # ecache-cli
//!
//! The `ecache` binary's building blocks: the registry of built-in policies and the
//! commands' input and output formats. No numerics live here.

pub mod alloc;
pub mod args;
pub mod backend;
pub mod bench;
pub mod bench_serve;
pub mod dataset;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod machine;
pub mod policies;
pub mod records;
pub mod report;
pub mod rouge;
pub mod serve;
pub mod shard;
pub mod trace;

/// An error caused by what the user gave (a file, a flag, a value): `ecache` exits with 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);
