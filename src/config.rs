//! `tally.toml`: where the source, the target, the transport and the view
//! definitions are. Environment variables (`TALLY_SOURCE_URL`, …) override
//! the file so secrets need not be written into it.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source}. Pass an existing file with --config (see `tally --help`)."
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{key} is not set: {fix}")]
    Missing {
        key: &'static str,
        fix: &'static str,
    },
    #[error("environment variable {var}={value:?} is invalid: {fix}")]
    BadEnv {
        var: &'static str,
        value: String,
        fix: &'static str,
    },
}

/// The transports a config may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    #[default]
    Embedded,
    Nats,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub url: Option<String>,
}

/// How events travel from capture to apply.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// `embedded` (one process: `tally run`) or `nats` (JetStream).
    pub kind: TransportKind,
    /// The NATS server, e.g. `nats://127.0.0.1:4222`.
    pub url: Option<String>,
    /// The JetStream stream: one per source database.
    pub stream: String,
    /// The durable consumer all `tally apply` processes share.
    pub consumer: String,
    /// How long a delivery may stay unacknowledged before JetStream gives it
    /// to another applier (an applier that died holds it this long).
    pub ack_wait_seconds: u64,
    /// Deliveries after which an event is dead-lettered instead of tried.
    pub max_deliveries: u64,
    /// Shuffle, duplicate and delay deliveries (tests and the demo).
    pub chaos: Option<ChaosConfig>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            kind: TransportKind::Embedded,
            url: None,
            stream: "TALLY".into(),
            consumer: "tally-apply".into(),
            ack_wait_seconds: 30,
            max_deliveries: 20,
            chaos: None,
        }
    }
}

/// Deliberate disorder in delivery, reproducible from its seed.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChaosConfig {
    pub seed: u64,
    /// Share of deliveries also delivered a second time.
    pub duplicate: f64,
    /// Share of deliveries held back for a while.
    pub delay: f64,
    /// The longest hold-back, in milliseconds.
    pub max_delay_ms: u64,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        ChaosConfig {
            seed: 1,
            duplicate: 0.2,
            delay: 0.3,
            max_delay_ms: 300,
        }
    }
}

/// Tuning of the apply stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApplyConfig {
    /// Events per target transaction at most. Bigger batches coalesce more
    /// and amortise the commit; smaller ones lower latency.
    pub batch_size: usize,
    /// After a batch's first event, how long an applier waits for more
    /// before it writes. A few milliseconds turn a busy source's stream of
    /// one-row transactions into fewer, bigger target transactions (much
    /// less CPU on the target per change); 0 writes at once.
    pub linger_ms: u64,
}

/// The most `[apply] linger_ms` may be: every change waits up to this long.
pub const MAX_LINGER_MS: u64 = 1000;

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            batch_size: 4000,
            linger_ms: 5,
        }
    }
}

/// Where capture reads the source's changes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// The logical replication slot: the source keeps WAL for it until
    /// Tally confirms, so nothing is lost across restarts.
    pub slot: String,
    /// The publication listing the tables whose changes are captured.
    pub publication: String,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            slot: "tally".into(),
            publication: "tally".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    views: Option<PathBuf>,
    #[serde(default)]
    source: Endpoint,
    #[serde(default)]
    target: Endpoint,
    #[serde(default)]
    transport: TransportConfig,
    #[serde(default)]
    apply: ApplyConfig,
    #[serde(default)]
    capture: CaptureConfig,
}

/// A complete, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source_url: String,
    pub target_url: String,
    pub transport: TransportConfig,
    /// The views file, resolved relative to the config file's folder.
    pub views: PathBuf,
    pub apply: ApplyConfig,
    pub capture: CaptureConfig,
}

impl Config {
    /// Reads `path`, then applies environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, path, base, &|name| std::env::var(name).ok())
    }

    /// Parses config text; `env` looks up overrides (a parameter so tests
    /// need not touch the process environment).
    pub fn from_toml(
        text: &str,
        path: &Path,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|err| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "{}. Valid keys: views, [source] url, [target] url, [transport] kind (\"embedded\" or \"nats\"), url, stream, consumer, ack_wait_seconds, max_deliveries and [transport.chaos] seed, duplicate, delay, max_delay_ms, [apply] batch_size, linger_ms, [capture] slot and publication.",
                err.message()
            ),
        })?;
        if let Some(url) = env("TALLY_SOURCE_URL") {
            raw.source.url = Some(url);
        }
        if let Some(url) = env("TALLY_TARGET_URL") {
            raw.target.url = Some(url);
        }
        if let Some(url) = env("TALLY_TRANSPORT_URL") {
            raw.transport.url = Some(url);
        }
        if let Some(views) = env("TALLY_VIEWS") {
            raw.views = Some(PathBuf::from(views));
        }
        if let Some(kind) = env("TALLY_TRANSPORT_KIND") {
            raw.transport.kind = match kind.as_str() {
                "embedded" => TransportKind::Embedded,
                "nats" => TransportKind::Nats,
                _ => {
                    return Err(ConfigError::BadEnv {
                        var: "TALLY_TRANSPORT_KIND",
                        value: kind,
                        fix: "use \"embedded\" or \"nats\"",
                    });
                }
            };
        }
        if let Some(seed) = env("TALLY_CHAOS_SEED") {
            let seed = seed.parse().map_err(|_| ConfigError::BadEnv {
                var: "TALLY_CHAOS_SEED",
                value: seed.clone(),
                fix: "use a whole number (the seed of the shuffling)",
            })?;
            raw.transport.chaos = Some(ChaosConfig {
                seed,
                ..raw.transport.chaos.unwrap_or_default()
            });
        }
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        if raw.transport.kind == TransportKind::Nats && raw.transport.url.is_none() {
            return Err(ConfigError::Missing {
                key: "[transport] url",
                fix: "with kind = \"nats\", set url = \"nats://host:4222\" in [transport] or TALLY_TRANSPORT_URL",
            });
        }
        for (key, name, default) in [
            ("stream", &raw.transport.stream, "TALLY"),
            ("consumer", &raw.transport.consumer, "tally-apply"),
        ] {
            let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
            if name.is_empty() || !name.chars().all(valid) {
                return Err(invalid(format!(
                    "[transport] {key} = {name:?}: use letters, digits, '_' or '-' (default \"{default}\")"
                )));
            }
        }
        if raw.transport.ack_wait_seconds == 0 {
            return Err(invalid(
                "[transport] ack_wait_seconds must be at least 1 (default 30)".into(),
            ));
        }
        if raw.transport.max_deliveries == 0 {
            return Err(invalid(
                "[transport] max_deliveries must be at least 1 (default 20)".into(),
            ));
        }
        if let Some(chaos) = &raw.transport.chaos {
            for (key, share) in [("duplicate", chaos.duplicate), ("delay", chaos.delay)] {
                if !(0.0..=1.0).contains(&share) {
                    return Err(invalid(format!(
                        "[transport.chaos] {key} = {share}: use a share between 0 and 1"
                    )));
                }
            }
        }
        if raw.apply.batch_size == 0 {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "[apply] batch_size must be at least 1 (default 4000)".into(),
            });
        }
        if raw.apply.linger_ms > MAX_LINGER_MS {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!(
                    "[apply] linger_ms = {}: at most {MAX_LINGER_MS}, since every change may wait that long (default 5; 0 writes at once)",
                    raw.apply.linger_ms
                ),
            });
        }
        let source_url = raw.source.url.ok_or(ConfigError::Missing {
            key: "[source] url",
            fix: "set it in tally.toml (url = \"postgres://user@host/db\") or TALLY_SOURCE_URL",
        })?;
        let target_url = raw.target.url.ok_or(ConfigError::Missing {
            key: "[target] url",
            fix: "set it in tally.toml (url = \"postgres://user@host/db\") or TALLY_TARGET_URL",
        })?;
        let views = raw.views.ok_or(ConfigError::Missing {
            key: "views",
            fix: "add views = \"views.sql\" at the top of tally.toml (a file of CREATE MATERIALIZED VIEW statements) or set TALLY_VIEWS",
        })?;
        Ok(Config {
            source_url,
            target_url,
            transport: raw.transport,
            views: base_dir.join(views),
            apply: raw.apply,
            capture: raw.capture,
        })
    }
}

/// Hides the password in a connection URL or key/value connection string so
/// it can be logged: `postgres://u:secret@h/db` → `postgres://u:***@h/db`.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                );
            }
        }
        return url.to_string();
    }
    // key=value form: password=secret
    url.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_toml(
            text,
            Path::new("conf/tally.toml"),
            Path::new("conf"),
            &move |name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
        )
    }

    const GOOD: &str = r#"
views = "views.sql"
[source]
url = "postgres://a@h/src"
[target]
url = "postgres://a@h/dst"
"#;

    #[test]
    fn reads_a_complete_file() {
        let config = parse(GOOD, &[]).unwrap();
        assert_eq!(config.source_url, "postgres://a@h/src");
        assert_eq!(config.views, Path::new("conf/views.sql"));
        assert_eq!(config.transport.kind, TransportKind::Embedded);
        assert_eq!(config.apply.batch_size, 4000);
        assert_eq!(config.apply.linger_ms, 5);
    }

    #[test]
    fn linger_is_bounded() {
        let config = parse(&format!("{GOOD}\n[apply]\nlinger_ms = 0\n"), &[]).unwrap();
        assert_eq!(config.apply.linger_ms, 0);
        let err = parse(&format!("{GOOD}\n[apply]\nlinger_ms = 5000\n"), &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("linger_ms = 5000"), "{text}");
        assert!(text.contains("at most 1000"), "{text}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let config = parse(GOOD, &[("TALLY_TARGET_URL", "postgres://b@h/other")]).unwrap();
        assert_eq!(config.target_url, "postgres://b@h/other");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&format!("{GOOD}\n[apply]\nbatch_sise = 3\n"), &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("batch_sise"), "{text}");
        assert!(text.contains("batch_size"), "{text}");
    }

    #[test]
    fn missing_url_says_how_to_fix() {
        let err = parse("views = \"v.sql\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("TALLY_SOURCE_URL"), "{err}");
    }

    #[test]
    fn bad_transport_kind_is_refused() {
        let err = parse(&format!("{GOOD}\n[transport]\nkind = \"kafka\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("kafka"), "{err}");
    }

    #[test]
    fn nats_needs_a_url_and_sane_settings() {
        let err = parse(&format!("{GOOD}\n[transport]\nkind = \"nats\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("[transport] url"), "{err}");
        let config = parse(
            &format!("{GOOD}\n[transport]\nkind = \"nats\"\nurl = \"nats://h:4222\"\n"),
            &[],
        )
        .unwrap();
        assert_eq!(config.transport.stream, "TALLY");
        assert_eq!(config.transport.max_deliveries, 20);
        let err = parse(&format!("{GOOD}\n[transport]\nstream = \"a.b\"\n"), &[]).unwrap_err();
        assert!(err.to_string().contains("stream"), "{err}");
        let err = parse(
            &format!("{GOOD}\n[transport.chaos]\nduplicate = 1.5\n"),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("duplicate"), "{err}");
    }

    #[test]
    fn chaos_seed_from_the_environment() {
        let config = parse(GOOD, &[("TALLY_CHAOS_SEED", "7")]).unwrap();
        assert_eq!(config.transport.chaos.map(|c| c.seed), Some(7));
        assert!(parse(GOOD, &[("TALLY_CHAOS_SEED", "x")]).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://user:s3cret@host:5432/db?sslmode=require"),
            "postgres://user:***@host:5432/db?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://user@host/db"),
            "postgres://user@host/db"
        );
        assert_eq!(
            redact_url("host=h user=u password=s3cret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
    }
}
