//! The policies the `ecache` binary knows: the engine's built-in registry.

pub use ecache_engine::builtin_registry;
