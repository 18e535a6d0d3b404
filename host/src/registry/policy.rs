//! The operator's caps on what any plugin may claim, whoever loads it: the hosts a tool may
//! call, its memory, concurrency, time and fuel, and whether plugins may be loaded over
//! the API at all. A manifest asking for more is refused, naming what it asked for and the
//! flag that caps it.

use std::collections::BTreeSet;

use crate::plugin::Manifest;

/// Caps on manifests, set by `evhost serve` flags. The default caps nothing.
#[derive(Debug, Clone)]
pub struct PluginPolicy {
    /// Hosts (`host:port`) a manifest may grant itself (`--plugin-http-allow`); `None`
    /// allows any, an empty set none.
    pub http_hosts: Option<BTreeSet<String>>,
    /// Largest `limits.memory_mb` (`--plugin-max-memory-mb`).
    pub max_memory_mb: Option<u64>,
    /// Largest `limits.concurrency` (`--plugin-max-concurrency`).
    pub max_concurrency: Option<usize>,
    /// Largest `limits.batch_timeout_ms` (`--plugin-max-batch-timeout-ms`).
    pub max_batch_timeout_ms: Option<u64>,
    /// Largest `limits.fuel_per_event` (`--plugin-max-fuel-per-event`); with it set, a
    /// manifest must set a fuel budget.
    pub max_fuel_per_event: Option<u64>,
    /// Whether plugins may be loaded, replaced and unloaded over the API (off with
    /// `--no-hot-load`).
    pub hot_load: bool,
    /// What the host grants plugins (`--grant [PLUGIN=]CAP`): a capability a manifest asks
    /// for takes effect only when granted here or with the load.
    pub grants: super::GrantTable,
    /// Whether a load may carry grants of its own (off with `--no-load-grants`: only the
    /// host's `--grant` then grants anything).
    pub load_grants: bool,
}

impl Default for PluginPolicy {
    fn default() -> Self {
        Self {
            http_hosts: None,
            max_memory_mb: None,
            max_concurrency: None,
            max_batch_timeout_ms: None,
            max_fuel_per_event: None,
            hot_load: true,
            grants: Default::default(),
            load_grants: true,
        }
    }
}

impl PluginPolicy {
    /// Refuses a load of `m` with `options` when its grants fall short: a load's own
    /// grants when the host takes none (`--no-load-grants`) or beyond the HTTP allow-list
    /// (`--plugin-http-allow`), or a capability the manifest asks for that neither the
    /// host's `--grant` nor the load grants.
    pub fn admits_grants(&self, m: &Manifest, options: &super::LoadOptions) -> Result<(), String> {
        if !self.load_grants && options.grants != super::Grants::default() {
            return Err(format!(
                "the load grants {}, but this host takes grants only from its own \
                 configuration (--no-load-grants): ask the operator to start it with --grant",
                options.grants.to_caps().join(", ")
            ));
        }
        let Some(allowed) = &self.http_hosts else {
            return options.admit(m, &self.grants);
        };
        let over: Vec<&String> = options
            .grants
            .http
            .iter()
            .filter(|h| !allowed.contains(*h))
            .collect();
        if !over.is_empty() {
            return Err(format!(
                "the load grants HTTP access to {over:?}, beyond the hosts the operator allows \
                 (--plugin-http-allow)"
            ));
        }
        options.admit(m, &self.grants)
    }

    /// Refuses `m` if it claims more than the caps allow; the message names each claim.
    pub fn admits(&self, m: &Manifest) -> Result<(), String> {
        let mut over = Vec::new();
        if let Some(allowed) = &self.http_hosts {
            for host in &m.capabilities.http {
                if !allowed.contains(&host.to_ascii_lowercase()) {
                    over.push(format!(
                        "capabilities.http grants {host:?}, which is not among the hosts the operator allows (--plugin-http-allow: {})",
                        if allowed.is_empty() {
                            "none".to_owned()
                        } else {
                            allowed.iter().cloned().collect::<Vec<_>>().join(", ")
                        }
                    ));
                }
            }
        }
        let l = &m.limits;
        if let Some(max) = self.max_memory_mb
            && l.memory_mb > max
        {
            over.push(format!(
                "limits.memory_mb is {}, over the cap of {max} (--plugin-max-memory-mb)",
                l.memory_mb
            ));
        }
        if let Some(max) = self.max_concurrency
            && l.concurrency > max
        {
            over.push(format!(
                "limits.concurrency is {}, over the cap of {max} (--plugin-max-concurrency)",
                l.concurrency
            ));
        }
        if let Some(max) = self.max_batch_timeout_ms
            && l.batch_timeout_ms > max
        {
            over.push(format!(
                "limits.batch_timeout_ms is {}, over the cap of {max} (--plugin-max-batch-timeout-ms)",
                l.batch_timeout_ms
            ));
        }
        if let Some(max) = self.max_fuel_per_event {
            match l.fuel_per_event {
                Some(f) if f <= max => {}
                Some(f) => over.push(format!(
                    "limits.fuel_per_event is {f}, over the cap of {max} (--plugin-max-fuel-per-event)"
                )),
                None => over.push(format!(
                    "limits.fuel_per_event is unset (no fuel limit), but the operator caps it at {max} (--plugin-max-fuel-per-event): set it"
                )),
            }
        }
        if over.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "plugin {} asks for more than this host allows: {}",
                m.id(),
                over.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra: &str) -> Manifest {
        Manifest::parse(&format!(
            "name = \"t\"\nversion = \"1\"\nkind = \"tool\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn caps_refuse_what_is_over_them_and_name_it() {
        let open = PluginPolicy::default();
        let greedy = manifest(
            "[limits]\nmemory_mb = 512\nconcurrency = 64\nbatch_timeout_ms = 600000\n[capabilities]\nhttp = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]\n",
        );
        assert!(open.admits(&greedy).is_ok(), "no caps, nothing refused");
        let capped = PluginPolicy {
            http_hosts: Some(["127.0.0.1:9000".to_owned()].into()),
            max_memory_mb: Some(128),
            max_concurrency: Some(8),
            max_batch_timeout_ms: Some(30_000),
            max_fuel_per_event: Some(1_000_000),
            hot_load: true,
            grants: Default::default(),
            load_grants: true,
        };
        let e = capped.admits(&greedy).unwrap_err();
        for part in [
            "\"127.0.0.1:9001\"",
            "memory_mb is 512",
            "concurrency is 64",
            "batch_timeout_ms is 600000",
            "fuel_per_event is unset",
        ] {
            assert!(e.contains(part), "{part} in {e}");
        }
        assert!(!e.contains("\"127.0.0.1:9000\" which"), "{e}");
        let modest = manifest(
            "[limits]\nmemory_mb = 64\nfuel_per_event = 1000\n[capabilities]\nhttp = [\"127.0.0.1:9000\"]\n",
        );
        assert_eq!(capped.admits(&modest), Ok(()));
    }
}
