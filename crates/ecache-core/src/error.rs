//! The one error type of the core. Every variant names the file, field or value at fault.

use std::path::PathBuf;

/// Errors from configuration, the registry, policy decisions and cache operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A configuration file is empty.
    #[error(
        "config file {origin} is empty: it needs at least a [policy] section with `name` and `budget`"
    )]
    ConfigEmpty { origin: String },
    /// A configuration could not be parsed or has an unknown key or ill-typed value.
    #[error("invalid config {origin}: {message}")]
    ConfigParse { origin: String, message: String },
    /// A configuration value is out of its allowed range.
    #[error("invalid config value `{field}` = {value}: {expected}")]
    ConfigValue {
        field: String,
        value: String,
        expected: String,
    },
    /// A budget outside (0, 1].
    #[error("budget {value} is outside (0, 1]: it is the fraction of slots kept (1 = full cache)")]
    InvalidBudget { value: f64 },
    /// A policy name that no registered crate provides.
    #[error("unknown policy `{name}`; known policies: {}", known.join(", "))]
    UnknownPolicy { name: String, known: Vec<String> },
    /// Two constructors registered under one name.
    #[error("policy `{name}` is registered twice")]
    DuplicatePolicy { name: String },
    /// A policy parameter that the policy does not take, or of the wrong type or range.
    #[error("policy `{policy}`: {message}")]
    PolicyParam { policy: String, message: String },
    /// A policy returned a decision the cache cannot apply.
    #[error("policy `{policy}` made an invalid decision at layer {layer}: {reason}")]
    InvalidDecision {
        policy: String,
        layer: usize,
        reason: String,
    },
    /// Attention rows, scores or tensors that do not match the cache.
    #[error("shape mismatch in {what}: expected {expected}, got {actual}")]
    Shape {
        what: String,
        expected: String,
        actual: String,
    },
    /// A batch index outside the cache's batch.
    #[error("sequence {index} is outside the batch of {batch}")]
    Sequence { index: usize, batch: usize },
}

/// Shorthand for results carrying [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl std::fmt::Display,
        actual: impl std::fmt::Display,
    ) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }
}
