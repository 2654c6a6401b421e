//! Policy name to constructor. Each policy crate exports a `register` function that adds
//! itself; the core knows no policy by name.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use crate::config::PolicyConfig;
use crate::error::{Error, Result};
use crate::policy::CachePolicy;

/// Builds a policy from its `[policy]` config section (name, budget, params).
pub type PolicyConstructor = fn(&PolicyConfig) -> Result<Box<dyn CachePolicy>>;

/// The known policies.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    constructors: BTreeMap<String, PolicyConstructor>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a policy under `name`; a name may be registered once.
    pub fn register(&mut self, name: &str, constructor: PolicyConstructor) -> Result<()> {
        if self.constructors.contains_key(name) {
            return Err(Error::DuplicatePolicy {
                name: name.to_string(),
            });
        }
        self.constructors.insert(name.to_string(), constructor);
        Ok(())
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.constructors.keys().cloned().collect()
    }

    /// Builds the policy a config section names. Unknown names fail with the known list;
    /// bad parameters fail naming the key.
    pub fn build(&self, config: &PolicyConfig) -> Result<Box<dyn CachePolicy>> {
        crate::budget::check_fraction(config.budget)?;
        let constructor =
            self.constructors
                .get(&config.name)
                .ok_or_else(|| Error::UnknownPolicy {
                    name: config.name.clone(),
                    known: self.names(),
                })?;
        constructor(config)
    }
}

/// Deserialises a policy's parameter table into its own struct. Use
/// `#[serde(deny_unknown_fields)]` on `T` so that a key the policy does not take is an
/// error naming the key.
pub fn parse_params<T: DeserializeOwned>(policy: &str, params: &toml::Table) -> Result<T> {
    serde_path_to_error::deserialize(toml::Value::Table(params.clone())).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().trim().to_string();
        Error::PolicyParam {
            policy: policy.to_string(),
            message: if path == "." {
                format!("bad parameter: {message}")
            } else {
                format!("bad parameter `{path}`: {message}")
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::Decision;
    use crate::policy::{LayerView, Needs};

    struct Nothing;
    impl CachePolicy for Nothing {
        fn name(&self) -> &str {
            "nothing"
        }
        fn needs(&self) -> Needs {
            Needs::default()
        }
        fn decide(&self, _: &LayerView<'_>) -> Decision {
            Decision::KeepAll
        }
        fn target(&self, _: crate::TargetAt) -> Option<usize> {
            None
        }
    }

    fn build_nothing(config: &PolicyConfig) -> Result<Box<dyn CachePolicy>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Params {
            #[serde(default)]
            level: u32,
        }
        let _: Params = parse_params("nothing", &config.params)?;
        Ok(Box::new(Nothing))
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let mut r = Registry::new();
        r.register("nothing", build_nothing).unwrap();
        let err = r
            .build(&PolicyConfig::new("missing", 0.5))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("unknown policy `missing`") && err.contains("nothing"),
            "{err}"
        );
        assert!(r.register("nothing", build_nothing).is_err());
    }

    #[test]
    fn bad_parameters_name_the_key() {
        let mut r = Registry::new();
        r.register("nothing", build_nothing).unwrap();
        let mut c = PolicyConfig::new("nothing", 0.5);
        c.set_param("colour", "3").unwrap();
        let err = r.build(&c).err().unwrap().to_string();
        assert!(err.contains("colour"), "{err}");
        let mut c = PolicyConfig::new("nothing", 0.5);
        c.set_param("level", "\"high\"").unwrap();
        let err = r.build(&c).err().unwrap().to_string();
        assert!(err.contains("string") || err.contains("level"), "{err}");
        let err = r
            .build(&PolicyConfig::new("nothing", 1.5))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("1.5"), "{err}");
    }
}
