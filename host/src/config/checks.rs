//! Range checks of every duration, size and count in the configuration, so
//! a value that would stall or crash a task (a zero interval, a keep-alive
//! the MQTT client refuses) fails at start with the file and the key.

use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;

use super::load::ConfigError;
use super::model::Config;
use crate::script::Limits;

/// The longest duration any key takes: longer ones overflow the clocks
/// the timers run on.
const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Checks values of one file, naming the key of the first bad one.
struct Checks<'a> {
    file: &'a Path,
}

impl Checks<'_> {
    fn bad(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.file, key, reason)
    }

    /// A duration within `min..=LONGEST`.
    fn duration(
        &self,
        key: impl Into<String>,
        value: Duration,
        min: Duration,
    ) -> Result<(), ConfigError> {
        if value < min {
            let expected = if min.is_zero() {
                "a duration".to_owned()
            } else if min == Duration::from_nanos(1) {
                "a positive duration".to_owned()
            } else {
                format!("a duration of at least {}", humantime::format_duration(min))
            };
            return Err(self.bad(
                key,
                format!(
                    "expected {expected}, got {}",
                    humantime::format_duration(value)
                ),
            ));
        }
        if value > LONGEST {
            return Err(self.bad(key, "expected a duration of at most 100 years"));
        }
        Ok(())
    }

    fn positive(&self, key: impl Into<String>, value: Duration) -> Result<(), ConfigError> {
        self.duration(key, value, Duration::from_nanos(1))
    }

    /// A size within `min..=max`.
    fn size(
        &self,
        key: impl Into<String>,
        value: ByteSize,
        min: ByteSize,
        max: ByteSize,
    ) -> Result<(), ConfigError> {
        if value < min || value > max {
            return Err(self.bad(
                key,
                format!("expected a size from {min} to {max}, got {value}"),
            ));
        }
        Ok(())
    }

    /// A count of at least `min`.
    fn count(&self, key: impl Into<String>, value: u64, min: u64) -> Result<(), ConfigError> {
        if value < min {
            return Err(self.bad(key, format!("expected at least {min}, got {value}")));
        }
        Ok(())
    }

    fn limits(&self, key: &str, limits: &Limits) -> Result<(), ConfigError> {
        self.positive(format!("{key}.deadline"), limits.deadline)?;
        self.size(
            format!("{key}.memory"),
            limits.memory,
            ByteSize::kib(64),
            ByteSize::gib(4),
        )?;
        self.size(
            format!("{key}.output"),
            limits.output,
            ByteSize::b(1),
            ByteSize::gib(1),
        )?;
        self.count(format!("{key}.max_outputs"), limits.max_outputs as u64, 1)?;
        self.count(format!("{key}.max_fields"), limits.max_fields as u64, 1)?;
        self.count(
            format!("{key}.snapshot_keys"),
            limits.snapshot_keys as u64,
            1,
        )?;
        self.size(
            format!("{key}.state_per_device"),
            limits.state_per_device,
            ByteSize::b(0),
            ByteSize::mib(64),
        )?;
        self.positive(format!("{key}.timestamp_past"), limits.timestamp_past)?;
        self.duration(
            format!("{key}.timestamp_future"),
            limits.timestamp_future,
            Duration::ZERO,
        )
    }
}

/// The shortest JWT secret accepted (HS256 wants at least its hash size).
pub(super) const MIN_SECRET_BYTES: usize = 32;
/// The shortest API key accepted.
pub(super) const MIN_API_KEY_CHARS: usize = 16;

/// Checks what cannot be unsafe: `[auth]` has a credential, secrets and
/// keys are long enough, scopes exist, and only admin keys lack a tenant;
/// the metrics listener is loopback only.
pub(super) fn check_auth(config: &Config, file: &Path) -> Result<(), ConfigError> {
    let c = Checks { file };
    if let Some(metrics) = config.server.metrics_listen
        && !metrics.ip().is_loopback()
    {
        return Err(c.bad(
            "server.metrics_listen",
            format!("expected a loopback address (it serves /metrics without credentials), got {metrics}"),
        ));
    }
    let Some(auth) = &config.auth else {
        return Ok(());
    };
    if auth.jwt_secret.is_none() && auth.api_keys.0.is_empty() {
        return Err(c.bad(
            "auth",
            "expected jwt_secret or api_keys: an [auth] section with no credential lets nobody in",
        ));
    }
    if let Some(secret) = &auth.jwt_secret
        && secret.len() < MIN_SECRET_BYTES
    {
        return Err(c.bad(
            "auth.jwt_secret",
            format!(
                "expected a secret of at least {MIN_SECRET_BYTES} bytes, got {} (generate one with `openssl rand -base64 48`)",
                secret.len()
            ),
        ));
    }
    if auth.leeway > Duration::from_secs(3600) {
        return Err(c.bad("auth.leeway", "expected at most 1h"));
    }
    for (key, entry) in &auth.api_keys.0 {
        // The key itself never goes into an error message.
        let name = format!("auth.api_keys.<key of {} characters>", key.chars().count());
        if key.chars().count() < MIN_API_KEY_CHARS {
            return Err(c.bad(
                name,
                format!("expected an API key of at least {MIN_API_KEY_CHARS} characters"),
            ));
        }
        match entry {
            crate::config::ApiKey::Tenant(tenant) if tenant.is_empty() => {
                return Err(c.bad(name, "expected a tenant"));
            }
            crate::config::ApiKey::Tenant(_) => {}
            crate::config::ApiKey::Scoped(scoped) => {
                let mut admin = false;
                for scope in &scoped.scopes {
                    match crate::gateway::auth::Scope::parse(scope) {
                        Some(crate::gateway::auth::Scope::Admin) => admin = true,
                        Some(_) => {}
                        None => {
                            return Err(c.bad(
                                format!("{name}.scopes"),
                                format!("unknown scope {scope:?} (read, ingest, command or admin)"),
                            ));
                        }
                    }
                }
                if scoped.scopes.is_empty() {
                    return Err(c.bad(format!("{name}.scopes"), "expected at least one scope"));
                }
                if scoped.tenant.as_deref().is_none_or(str::is_empty) && !admin {
                    return Err(c.bad(
                        format!("{name}.tenant"),
                        "expected a tenant (only an admin key may have none)",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Checks every duration, size and count of `config`.
pub(super) fn check_ranges(config: &Config, file: &Path) -> Result<(), ConfigError> {
    let c = Checks { file };
    let ms = Duration::from_millis;

    c.positive("scripts.settle", config.scripts.settle)?;
    c.duration(
        "scripts.unload_grace",
        config.scripts.unload_grace,
        Duration::ZERO,
    )?;
    let tick = config.scripts.engine.deadline_tick;
    c.duration("scripts.deadline_tick", tick, Duration::from_micros(100))?;
    if tick > Duration::from_secs(1) {
        return Err(c.bad("scripts.deadline_tick", "expected at most 1s"));
    }
    c.count(
        "scripts.pool_instances",
        u64::from(config.scripts.engine.pool_instances),
        1,
    )?;

    c.count("workers.queue", config.workers.queue as u64, 1)?;
    c.count("workers.batch", config.workers.batch as u64, 1)?;
    c.duration(
        "workers.drain_timeout",
        config.workers.drain_timeout,
        Duration::ZERO,
    )?;

    if let Some(redis) = &config.bus.redis {
        c.positive("bus.redis.resync", redis.resync)?;
        c.positive("bus.redis.flush", redis.flush)?;
        c.positive("bus.redis.timeout", redis.timeout)?;
        let sentinel = redis.url.starts_with("redis+sentinel://");
        if !sentinel && (redis.sentinel_username.is_some() || redis.sentinel_password.is_some()) {
            let key = if redis.sentinel_username.is_some() {
                "bus.redis.sentinel_username"
            } else {
                "bus.redis.sentinel_password"
            };
            return Err(c.bad(key, "only a redis+sentinel:// url asks Sentinels"));
        }
        let tls_files = [
            ("bus.redis.tls_ca_file", &redis.tls_ca_file),
            ("bus.redis.tls_cert_file", &redis.tls_cert_file),
            ("bus.redis.tls_key_file", &redis.tls_key_file),
        ];
        for (key, file) in tls_files {
            if file.is_some() && !redis.url.starts_with("rediss://") {
                return Err(c.bad(key, "only a rediss:// url uses TLS"));
            }
        }
        if redis.tls_cert_file.is_some() != redis.tls_key_file.is_some() {
            return Err(c.bad(
                "bus.redis.tls_cert_file",
                "expected tls_cert_file and tls_key_file together",
            ));
        }
        if redis.sentinel_username.is_some() && redis.sentinel_password.is_none() {
            return Err(c.bad(
                "bus.redis.sentinel_username",
                "expected a sentinel_password with it",
            ));
        }
    }

    // Deadlines are counted in ticks of 32 bits: at 10 ms that is over a
    // year of uptime; the default of 100 ms, thirteen years.
    c.duration("status.tick", config.status.tick, ms(10))?;
    if config.status.tick > Duration::from_secs(60) {
        return Err(c.bad("status.tick", "expected at most 1m"));
    }

    c.count("deadletter.capacity", config.deadletter.capacity as u64, 1)?;
    c.count("history.max_entries", config.history.max_entries as u64, 1)?;
    c.count("history.max_replay", config.history.max_replay as u64, 1)?;
    c.duration(
        "history.max_age",
        config.history.max_age,
        Duration::from_secs(1),
    )?;
    if let Some(stream) = &config.records.redis_stream {
        c.count("records.redis_stream.maxlen", stream.maxlen as u64, 1)?;
    }

    for (name, product) in &config.products {
        let key = format!("products.{name}");
        if let Some(deadline) = product.status.deadline() {
            if deadline < config.status.tick {
                return Err(c.bad(
                    format!("{key}.status"),
                    format!(
                        "expected a deadline of at least status.tick ({})",
                        humantime::format_duration(config.status.tick)
                    ),
                ));
            }
            c.positive(format!("{key}.status"), deadline)?;
        }
        c.limits(&format!("{key}.limits"), &product.limits)?;
        if let Some(commands) = &product.commands {
            commands
                .check()
                .map_err(|reason| c.bad(format!("{key}.commands"), reason))?;
        }
    }

    let commands = &config.commands;
    c.positive("commands.timeout", commands.timeout)?;
    c.duration(
        "commands.max_timeout",
        commands.max_timeout,
        commands.timeout,
    )?;
    c.positive("commands.expiry", commands.expiry)?;
    c.duration("commands.max_expiry", commands.max_expiry, commands.expiry)?;
    c.count("commands.queue", commands.queue as u64, 1)?;
    c.count("commands.keep", commands.keep as u64, 1)?;
    c.positive("commands.retain", commands.retain)?;

    for (i, mqtt) in config.sources.mqtt.iter().enumerate() {
        let key = format!("sources.mqtt[{i}]");
        // The MQTT client refuses shorter keep-alives.
        c.duration(
            format!("{key}.keep_alive"),
            mqtt.keep_alive,
            Duration::from_secs(5),
        )?;
        if mqtt.keep_alive > Duration::from_secs(u64::from(u16::MAX)) {
            return Err(c.bad(
                format!("{key}.keep_alive"),
                "expected at most 65535s (MQTT's limit)",
            ));
        }
        c.positive(format!("{key}.reconnect_max"), mqtt.reconnect_max)?;
        // Four times the limit must stay within MQTT's largest packet.
        c.size(
            format!("{key}.max_packet_size"),
            mqtt.max_packet_size,
            ByteSize::kib(1),
            ByteSize::mib(64),
        )?;
        c.count(
            format!("{key}.max_inflight"),
            u64::from(mqtt.max_inflight),
            1,
        )?;
    }
    for (i, kafka) in config.sources.kafka.iter().enumerate() {
        let key = format!("sources.kafka[{i}]");
        c.positive(format!("{key}.commit_interval"), kafka.commit_interval)?;
        c.size(
            format!("{key}.max_message_size"),
            kafka.max_message_size,
            ByteSize::kib(1),
            ByteSize::gib(1),
        )?;
    }
    let http = &config.sources.http;
    c.size(
        "sources.http.max_body",
        http.max_body,
        ByteSize::b(1),
        ByteSize::gib(1),
    )?;
    c.count("sources.http.max_batch", http.max_batch as u64, 1)?;
    c.positive("sources.http.enqueue_timeout", http.enqueue_timeout)?;

    let ws = &config.websocket;
    c.count("websocket.max_connections", ws.max_connections as u64, 1)?;
    c.size(
        "websocket.max_frame",
        ws.max_frame,
        ByteSize::kib(1),
        ByteSize::mib(64),
    )?;
    c.count(
        "websocket.max_subscriptions",
        ws.max_subscriptions as u64,
        1,
    )?;
    c.count("websocket.max_devices", ws.max_devices as u64, 1)?;
    c.count("websocket.send_queue", ws.send_queue as u64, 1)?;
    c.size(
        "websocket.send_buffer",
        ws.send_buffer,
        ByteSize::kib(64),
        ByteSize::gib(1),
    )?;
    c.positive("websocket.write_timeout", ws.write_timeout)?;
    c.positive("websocket.auth_timeout", ws.auth_timeout)?;
    c.positive("websocket.ping_interval", ws.ping_interval)?;
    if ws.idle_timeout <= ws.ping_interval {
        return Err(c.bad(
            "websocket.idle_timeout",
            format!(
                "expected more than websocket.ping_interval ({}): a client answers pings only as often as they come",
                humantime::format_duration(ws.ping_interval)
            ),
        ));
    }
    c.positive("websocket.idle_timeout", ws.idle_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_text;

    fn check(text: &str) -> Result<(), ConfigError> {
        let file = Path::new("sluice.toml");
        let config: Config = parse_text(text, file, &|_| None)?;
        config.validate(file)
    }

    #[test]
    fn the_defaults_pass() {
        check("").unwrap();
    }

    #[test]
    fn auth_that_could_be_unsafe_is_refused_naming_the_key() {
        let secret = "s".repeat(32);
        let key = "k".repeat(16);
        for (text, key_named) in [
            ("[auth]\n".to_owned(), "auth"),
            ("[auth]\njwt_secret = \"\"".to_owned(), "auth.jwt_secret"),
            (
                "[auth]\njwt_secret = \"short\"".to_owned(),
                "auth.jwt_secret",
            ),
            (
                "[auth.api_keys]\nk1 = \"acme\"".to_owned(),
                "auth.api_keys.<key of 2 characters>",
            ),
            (
                format!("[auth.api_keys]\n{key} = {{ scopes = [\"read\"] }}"),
                "auth.api_keys.<key of 16 characters>.tenant",
            ),
            (
                format!("[auth.api_keys]\n{key} = {{ tenant = \"a\", scopes = [\"root\"] }}"),
                "auth.api_keys.<key of 16 characters>.scopes",
            ),
            (
                format!(
                    "[auth]\njwt_secret = \"{secret}\"\n[server]\nmetrics_listen = \"0.0.0.0:9090\""
                ),
                "server.metrics_listen",
            ),
        ] {
            let error = check(&text).expect_err(&text).to_string();
            assert!(
                error.contains(&format!("key `{key_named}`")),
                "{text}: {error}"
            );
            assert!(!error.contains(&key), "the key is not shown: {error}");
        }
        check(&format!("[auth]\njwt_secret = \"{secret}\"")).unwrap();
        check(&format!(
            "[auth.api_keys]\n{key} = {{ scopes = [\"admin\"] }}"
        ))
        .unwrap();
        let error = check(&format!("[auth.api_keys]\n{key} = \"a\"\n{key} = \"b\""))
            .unwrap_err()
            .to_string();
        assert!(error.contains("duplicate key"), "{error}");
        let json = parse_text::<Config>(
            &format!("{{\"auth\": {{\"api_keys\": {{\"{key}\": \"a\", \"{key}\": \"b\"}}}}}}"),
            Path::new("sluice.json"),
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(json.contains("a key twice"), "{json}");
        assert!(!json.contains(&key), "{json}");
    }

    #[test]
    fn zero_and_huge_durations_name_their_key() {
        for (text, key) in [
            ("[status]\ntick = \"0s\"", "status.tick"),
            (
                "[websocket]\nping_interval = \"0s\"",
                "websocket.ping_interval",
            ),
            (
                "[websocket]\nwrite_timeout = \"0s\"",
                "websocket.write_timeout",
            ),
            (
                "[websocket]\nidle_timeout = \"10s\"",
                "websocket.idle_timeout",
            ),
            (
                "[bus.redis]\nurl = \"redis://x\"\nflush = \"0ms\"",
                "bus.redis.flush",
            ),
            (
                "[bus.redis]\nurl = \"redis://x\"\nresync = \"0s\"",
                "bus.redis.resync",
            ),
            (
                "[bus.redis]\nurl = \"redis://x\"\nsentinel_password = \"pw\"",
                "bus.redis.sentinel_password",
            ),
            (
                "[bus.redis]\nurl = \"redis+sentinel://a:1/m\"\nsentinel_username = \"u\"",
                "bus.redis.sentinel_username",
            ),
            (
                "[bus.redis]\nurl = \"redis://x\"\ntls_ca_file = \"ca.crt\"",
                "bus.redis.tls_ca_file",
            ),
            (
                "[bus.redis]\nurl = \"rediss://x\"\ntls_cert_file = \"c.crt\"",
                "bus.redis.tls_cert_file",
            ),
            ("[scripts]\nsettle = \"0s\"", "scripts.settle"),
            ("[scripts]\ndeadline_tick = \"0s\"", "scripts.deadline_tick"),
            (
                "[[sources.mqtt]]\nurl = \"mqtt://b\"\nkeep_alive = \"1s\"",
                "sources.mqtt[0].keep_alive",
            ),
            (
                "[[sources.mqtt]]\nurl = \"mqtt://b\"\nmax_packet_size = \"0B\"",
                "sources.mqtt[0].max_packet_size",
            ),
            (
                "[[sources.kafka]]\nbrokers = \"b\"\ntopics = [\"t\"]\ncommit_interval = \"0s\"",
                "sources.kafka[0].commit_interval",
            ),
            (
                "[products.p.limits]\ndeadline = \"0s\"",
                "products.p.limits.deadline",
            ),
            (
                "[products.p.limits]\nmemory = \"1KiB\"",
                "products.p.limits.memory",
            ),
            (
                "[products.p]\nstatus = { mode = \"heartbeat\", interval = \"1000000years\" }",
                "products.p.status",
            ),
            (
                "[sources.http]\nenqueue_timeout = \"0s\"",
                "sources.http.enqueue_timeout",
            ),
        ] {
            let error = check(text).expect_err(text).to_string();
            assert!(error.contains(&format!("key `{key}`")), "{text}: {error}");
        }
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::config::parse_text;

    /// Values that have broken configurations before: zero and negative
    /// durations, huge numbers, empty and odd strings, wrong types.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"0s\"".to_owned()),
            Just("\"1ms\"".to_owned()),
            Just("\"-1s\"".to_owned()),
            Just("\"1000000000years\"".to_owned()),
            Just("\"5s\"".to_owned()),
            Just("\"0B\"".to_owned()),
            Just("\"1 PiB\"".to_owned()),
            Just("\"\"".to_owned()),
            Just("\"mqtt://\"".to_owned()),
            Just("\"redis://x\"".to_owned()),
            Just("\"devices/{product}/{device}/#\"".to_owned()),
            Just("0".to_owned()),
            Just("-1".to_owned()),
            Just("18446744073709551615".to_owned()),
            Just("1e308".to_owned()),
            Just("true".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
            "\"[a-z{}/#+ ]{0,12}\"",
        ]
    }

    fn section() -> impl Strategy<Value = (&'static str, Vec<&'static str>)> {
        prop_oneof![
            Just(("server", vec!["listen"])),
            Just((
                "scripts",
                vec![
                    "dir",
                    "watch",
                    "settle",
                    "unload_grace",
                    "deadline_tick",
                    "pool_instances"
                ]
            )),
            Just(("workers", vec!["count", "queue", "batch", "drain_timeout"])),
            Just(("bus.redis", vec!["url", "resync", "flush", "timeout"])),
            Just(("status", vec!["topic", "tick"])),
            Just((
                "[sources.mqtt]",
                vec![
                    "url",
                    "keep_alive",
                    "max_packet_size",
                    "max_inflight",
                    "reconnect_max",
                    "qos",
                    "protocol",
                    "shared_group"
                ]
            )),
            Just((
                "[sources.kafka]",
                vec!["brokers", "topics", "commit_interval", "max_message_size"]
            )),
            Just((
                "sources.http",
                vec!["max_body", "max_batch", "enqueue_timeout"]
            )),
            Just((
                "websocket",
                vec![
                    "max_connections",
                    "max_frame",
                    "send_queue",
                    "send_buffer",
                    "write_timeout",
                    "ping_interval",
                    "idle_timeout",
                    "auth_timeout",
                    "max_devices"
                ]
            )),
            Just((
                "products.p.limits",
                vec![
                    "deadline",
                    "memory",
                    "output",
                    "max_outputs",
                    "max_fields",
                    "snapshot_keys",
                    "timestamp_past",
                    "timestamp_future"
                ]
            )),
            Just(("products.p", vec!["status"])),
            Just(("[routes]", vec!["topic", "product"])),
            Just(("registry", vec!["max_unregistered", "file"])),
            Just(("deadletter", vec!["capacity"])),
            Just(("history", vec!["max_entries", "max_age", "max_replay"])),
        ]
    }

    fn document() -> impl Strategy<Value = String> {
        prop::collection::vec(
            (
                section(),
                prop::collection::vec((any::<prop::sample::Index>(), value()), 0..5),
            ),
            0..6,
        )
        .prop_map(|sections| {
            let mut text = String::new();
            for ((name, keys), entries) in sections {
                // `[routes]` as a name gives `[[routes]]`, an array of tables.
                text.push_str(&format!("[{name}]\n"));
                for (index, value) in entries {
                    text.push_str(&format!("{} = {value}\n", keys[index.index(keys.len())]));
                }
            }
            text
        })
    }

    proptest! {
        #[test]
        fn any_configuration_loads_or_names_a_key(text in document()) {
            let file = Path::new("sluice.toml");
            let Ok(config) = parse_text::<Config>(&text, file, &|_| None) else {
                return Ok(());
            };
            if config.validate(file).is_ok() {
                // What the running process builds from a valid file.
                for mqtt in &config.sources.mqtt {
                    prop_assert!(mqtt.address().is_ok());
                }
                prop_assert!(
                    crate::route::Router::new(&config.routes, config.status.topic.as_deref()).is_ok()
                );
            }
        }

        #[test]
        fn any_text_is_a_configuration_or_an_error(text in ".{0,300}") {
            let file = Path::new("sluice.toml");
            if let Ok(config) = parse_text::<Config>(&text, file, &|_| None) {
                let _ = config.validate(file);
            }
        }
    }
}
