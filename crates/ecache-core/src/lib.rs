//! # ecache-core
//!
//! The KV cache of the ecache engine and the interface its policies plug into:
//!
//! - [`Budget`] and `target(N)`, defined once;
//! - [`SlotTable`]: per-slot absolute positions, kinds and importance, kept aligned;
//! - [`LayerCache`]: one layer's keys and values for a batch, generic over the burn backend;
//! - [`CachePolicy`], [`Needs`], [`LayerView`], [`Decision`] and the validated [`Plan`];
//! - [`selection`]: the shared top-K step of score-based policies;
//! - [`importance`]: attention column sums, fed blockwise;
//! - [`Registry`] and the TOML [`RunConfig`].
//!
//! A step for one layer of one sequence: the engine appends slots, feeds scores if the
//! policy [`Needs`] them, asks [`SlotTable::decide`] for a [`Plan`] and applies it with
//! [`LayerCache::apply`] (or [`SlotTable::apply`] when no tensors exist, as in `ecache trace`).

pub mod budget;
pub mod config;
pub mod decision;
pub mod error;
pub mod importance;
pub mod kv;
pub mod policy;
pub mod registry;
pub mod rows;
pub mod selection;
pub mod slots;
pub mod trace;

pub use budget::{Budget, LayerBudgets, TargetAt};
pub use config::{BackendKind, PolicyConfig, PositionMode, Precision, RunConfig};
pub use decision::{Decision, MergeWeighting, Plan};
pub use error::{Error, Result};
pub use importance::ImportanceAccumulator;
pub use kv::{CacheShape, LayerCache};
pub use policy::{AttentionRows, CachePolicy, LayerView, Needs, Phase};
pub use registry::{PolicyConstructor, Registry, parse_params};
pub use slots::{SlotKind, SlotTable, StepContext};
