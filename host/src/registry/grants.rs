//! Operator grants: a capability a manifest asks for takes effect only if the operator
//! grants it, in the host's configuration (`evhost serve --grant [PLUGIN=]CAP`) or with
//! one load (`evhost plugin load --grant CAP`, a `grants` part in an upload). A load that
//! asks for something not granted is refused with a message naming it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::plugin::{Capabilities, Manifest, PluginConfig};

/// Capabilities granted to a plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    /// Hosts (`host:port`, lower-case) it may call over HTTP.
    #[serde(default)]
    pub http: BTreeSet<String>,
    /// A clock.
    #[serde(default)]
    pub clock: bool,
    /// Randomness.
    #[serde(default)]
    pub random: bool,
}

impl Grants {
    /// Parses one capability: `http:HOST:PORT`, `clock` or `random`.
    pub fn parse_one(cap: &str) -> Result<Grants, String> {
        let mut g = Grants::default();
        g.add(cap)?;
        Ok(g)
    }

    /// Adds one capability (`http:HOST:PORT`, `clock` or `random`).
    pub fn add(&mut self, cap: &str) -> Result<(), String> {
        match cap {
            "clock" => self.clock = true,
            "random" => self.random = true,
            _ => match cap.strip_prefix("http:") {
                Some(host) if valid_authority(host) => {
                    self.http.insert(host.to_ascii_lowercase());
                }
                _ => {
                    return Err(format!(
                        "{cap:?} is not a capability: grant http:HOST:PORT, clock or random"
                    ));
                }
            },
        }
        Ok(())
    }

    /// Everything in `self` or `other`.
    pub fn union(&self, other: &Grants) -> Grants {
        Grants {
            http: self.http.union(&other.http).cloned().collect(),
            clock: self.clock || other.clock,
            random: self.random || other.random,
        }
    }

    /// The capabilities `asks` wants that these grants leave out, each as it would be
    /// granted (`http:HOST:PORT`, `clock`, `random`).
    pub fn missing(&self, asks: &Capabilities) -> Vec<String> {
        let mut out: Vec<String> = asks
            .http
            .iter()
            .filter(|h| !self.http.contains(&h.to_ascii_lowercase()))
            .map(|h| format!("http:{h}"))
            .collect();
        if asks.clock && !self.clock {
            out.push("clock".into());
        }
        if asks.random && !self.random {
            out.push("random".into());
        }
        out
    }

    /// The grants as capability strings.
    pub fn to_caps(&self) -> Vec<String> {
        let mut out: Vec<String> = self.http.iter().map(|h| format!("http:{h}")).collect();
        if self.clock {
            out.push("clock".into());
        }
        if self.random {
            out.push("random".into());
        }
        out
    }
}

/// `host:port` with a non-empty host and a numeric port.
fn valid_authority(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains('/')
                && !host.contains('@')
                && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

/// The grants of the host's configuration: for every plugin, and per plugin name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrantTable {
    /// Granted to every plugin.
    pub all: Grants,
    /// Granted to the plugin of that name.
    pub per_plugin: BTreeMap<String, Grants>,
}

impl GrantTable {
    /// Parses `--grant` values: `CAP` for every plugin, `PLUGIN=CAP` for one.
    pub fn parse(values: &[String]) -> Result<GrantTable, String> {
        let mut t = GrantTable::default();
        for v in values {
            let (target, cap) = match v.split_once('=') {
                Some((plugin, _)) if !crate::plugin::valid_name(plugin) => {
                    return Err(format!(
                        "--grant {v}: {plugin:?} is not a plugin name (1 to 64 lower-case \
                         letters, digits or '-')"
                    ));
                }
                Some((plugin, cap)) => (t.per_plugin.entry(plugin.to_owned()).or_default(), cap),
                None => (&mut t.all, v.as_str()),
            };
            target
                .add(cap)
                .map_err(|e| format!("--grant {v}: {e} (PLUGIN=CAP grants one plugin)"))?;
        }
        Ok(t)
    }

    /// What the host grants the plugin `name`.
    pub fn for_plugin(&self, name: &str) -> Grants {
        match self.per_plugin.get(name) {
            Some(g) => self.all.union(g),
            None => self.all.clone(),
        }
    }
}

/// What an operator gives with one load beside the manifest and the component: config
/// overrides and grants. Kept with an upload so that it loads the same at the next start.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadOptions {
    /// Values over the manifest's `[config]`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Capabilities granted to this load.
    #[serde(default)]
    pub grants: Grants,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Config values may be secrets: only their keys are shown.
        f.debug_struct("LoadOptions")
            .field("config", &self.config.keys().collect::<Vec<_>>())
            .field("grants", &self.grants)
            .finish()
    }
}

impl LoadOptions {
    /// Refuses `m` when it asks for a capability neither `host` nor this load grants.
    pub fn admit(&self, m: &Manifest, host: &GrantTable) -> Result<(), String> {
        let granted = host.for_plugin(&m.name).union(&self.grants);
        let missing = granted.missing(&m.capabilities);
        if !missing.is_empty() {
            return Err(format!(
                "plugin {} asks for {}, which the operator has not granted: a capability takes \
                 effect only when the manifest asks for it and the operator grants it; grant \
                 it at start (evhost serve --grant {}={}) or with the load (evhost plugin load \
                 --grant {})",
                m.id(),
                missing.join(", "),
                m.name,
                missing[0],
                missing[0]
            ));
        }
        Ok(())
    }

    /// The manifest's configuration with this load's overrides.
    pub fn config(&self, m: &Manifest) -> Result<PluginConfig, String> {
        PluginConfig::resolve(m, &self.config).map_err(|e| format!("plugin {}: {e}", m.id()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(caps: &str) -> Manifest {
        Manifest::parse(&format!(
            "name = \"t\"\nversion = \"1\"\nkind = \"tool\"\n[capabilities]\n{caps}"
        ))
        .unwrap()
    }

    #[test]
    fn a_capability_takes_effect_only_when_asked_and_granted() {
        let m = manifest("http = [\"127.0.0.1:9000\"]\nclock = true\nrandom = true\n");
        let none = LoadOptions::default();
        let e = none.admit(&m, &GrantTable::default()).unwrap_err();
        for cap in ["http:127.0.0.1:9000", "clock", "random"] {
            assert!(e.contains(cap), "{e}");
        }
        let host = GrantTable::parse(&["t=http:127.0.0.1:9000".into(), "clock".into()]).unwrap();
        let e = none.admit(&m, &host).unwrap_err();
        assert!(e.contains("random") && !e.contains("clock,"), "{e}");
        let load = LoadOptions {
            grants: Grants::parse_one("random").unwrap(),
            ..Default::default()
        };
        assert!(load.admit(&m, &host).is_ok());
        // A grant for another plugin is not this one's.
        let other = GrantTable::parse(&["u=http:127.0.0.1:9000".into()]).unwrap();
        assert!(
            LoadOptions::default()
                .admit(&manifest("http = [\"127.0.0.1:9000\"]\n"), &other)
                .is_err()
        );
        // Asking for nothing needs no grant.
        assert!(none.admit(&manifest(""), &GrantTable::default()).is_ok());
    }

    #[test]
    fn bad_grants_are_refused_with_the_forms() {
        for bad in [
            "http:",
            "http:host",
            "http:h:notaport",
            "files",
            "http:a/b:1",
        ] {
            let e = Grants::parse_one(bad).unwrap_err();
            assert!(e.contains("http:HOST:PORT, clock or random"), "{bad}: {e}");
        }
        assert!(GrantTable::parse(&["x=nope".into()]).is_err());
        for bad in ["Http-Get=clock", "=clock"] {
            let e = GrantTable::parse(&[bad.into()]).unwrap_err();
            assert!(e.contains("is not a plugin name"), "{e}");
        }
    }
}
