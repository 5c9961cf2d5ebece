//! The configuration tree: one TOML file declares sources, routes,
//! products, the device registry, the bus, workers and limits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::load::{ConfigError, load_file};
use super::sources::SourcesConfig;
use crate::script::{EngineOptions, Limits, Params};
use crate::status::StatusMode;

/// The whole configuration of a sluice process.
///
/// Every section has defaults that run: an empty file starts sluice with
/// the in-process bus, HTTP ingest on `127.0.0.1:8080` and the scripts in
/// `./scripts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP server: ingest, API, metrics.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where scripts live and how they are compiled.
    #[serde(default)]
    pub scripts: ScriptsConfig,
    /// Script workers and their queues.
    #[serde(default)]
    pub workers: WorkersConfig,
    /// The fan-out bus; absent means the in-process bus of a single instance.
    #[serde(default)]
    pub bus: BusConfig,
    /// The device registry file.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Where device messages come from.
    #[serde(default)]
    pub sources: SourcesConfig,
    /// MQTT topic templates that name a message's product and device.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Per-product settings, by product name.
    #[serde(default)]
    pub products: BTreeMap<String, ProductConfig>,
    /// Status detection.
    #[serde(default)]
    pub status: StatusConfig,
    /// The dead-letter store.
    #[serde(default)]
    pub deadletter: DeadLetterConfig,
    /// Optional output of every processed record for storage consumers.
    #[serde(default)]
    pub records: RecordsConfig,
    /// Who may connect to the WebSocket API; absent means nobody is asked
    /// (allowed on a loopback address only).
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// WebSocket limits.
    #[serde(default)]
    pub websocket: WebSocketConfig,
    /// Device commands: timeouts, expiries and bounds.
    #[serde(default)]
    pub commands: CommandsConfig,
    /// How much of each tenant's alerts, events and status transitions is
    /// kept, for clients that resume and for the history API.
    #[serde(default)]
    pub history: HistoryConfig,
}

/// The bounds of each tenant's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Entries kept per tenant, at most (the oldest make room).
    pub max_entries: usize,
    /// How long an entry is kept.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Entries one resuming subscription may replay, at most; a longer gap
    /// is answered `recovered: false`.
    pub max_replay: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            max_entries: 10_000,
            max_age: Duration::from_secs(24 * 3600),
            max_replay: 10_000,
        }
    }
}

impl HistoryConfig {
    /// Its bounds, as the bus takes them.
    pub fn limits(&self) -> crate::bus::history::HistoryLimits {
        crate::bus::history::HistoryLimits {
            max_entries: self.max_entries,
            max_age: self.max_age,
        }
    }
}

/// Bounds and defaults of device commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandsConfig {
    /// How long a two-way command waits for its reply once sent, unless
    /// the caller says otherwise.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The longest reply timeout a caller may ask for.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// How long a persistent command is kept for an offline device, unless
    /// the caller says otherwise.
    #[serde(with = "humantime_serde")]
    pub expiry: Duration,
    /// The longest expiry a caller may ask for.
    #[serde(with = "humantime_serde")]
    pub max_expiry: Duration,
    /// Queued commands per device, at most.
    pub queue: usize,
    /// Commands kept in memory (in-process bus), at most; the oldest
    /// finished ones make room.
    pub keep: usize,
    /// How long a finished command stays readable (`GET
    /// /api/v1/commands/{id}`) with the Redis bus.
    #[serde(with = "humantime_serde")]
    pub retain: Duration,
}

impl Default for CommandsConfig {
    fn default() -> Self {
        CommandsConfig {
            timeout: Duration::from_secs(10),
            max_timeout: Duration::from_secs(300),
            expiry: Duration::from_secs(24 * 3600),
            max_expiry: Duration::from_secs(7 * 24 * 3600),
            queue: 16,
            keep: 100_000,
            retain: Duration::from_secs(3600),
        }
    }
}

/// Authentication of every caller (HTTP API and WebSockets): JWTs signed
/// with a shared secret, API keys, or both. Every credential has a tenant
/// (admin credentials may have none) and scopes: `read`, `ingest`,
/// `command`, `admin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The HS256 secret of JWTs (`sub`, `tenant_id`, `exp`, optional
    /// `nbf`, `iss`, `aud`, and `scope` or `scopes`); at least 32 bytes.
    pub jwt_secret: Option<String>,
    /// When set, a token's `iss` must be this.
    pub jwt_issuer: Option<String>,
    /// When set, a token's `aud` must be (or list) this.
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// API key → its tenant (scope `read`), or `{ tenant, scopes }`.
    pub api_keys: ApiKeys,
    /// Accept `?token=` / `?api_key=` on WebSocket upgrades (browsers
    /// cannot set headers there). Never on other routes.
    pub allow_query_tokens: bool,
    /// Let HTTP ingest create a device the registry does not know; it then
    /// belongs to the caller's tenant. Off: such a device is unknown (404).
    pub accept_unregistered: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: None,
            jwt_issuer: None,
            jwt_audience: None,
            leeway: Duration::from_secs(30),
            api_keys: ApiKeys::default(),
            allow_query_tokens: true,
            accept_unregistered: false,
        }
    }
}

/// One configured API key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ApiKey {
    /// `key = "tenant"`: that tenant, scope `read`.
    Tenant(String),
    /// `key = { tenant = "…", scopes = ["read", "ingest"] }`.
    Scoped(ScopedKey),
}

/// An API key with its scopes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedKey {
    /// Its tenant; only an `admin` key may have none.
    #[serde(default)]
    pub tenant: Option<String>,
    /// What it may do.
    pub scopes: Vec<String>,
}

/// API keys by key. A key given twice is an error at load (TOML refuses
/// it, and so does the loader for JSON files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct ApiKeys(pub BTreeMap<String, ApiKey>);

/// WebSocket limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Connections this instance holds at once; more are refused with 503.
    pub max_connections: usize,
    /// The largest frame a client may send; a larger one gets an error
    /// frame, and one over four times this closes the connection (1009).
    pub max_frame: bytesize::ByteSize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Devices one connection may watch across its subscriptions.
    pub max_devices: usize,
    /// Status, alert, event and reply frames a connection may have waiting
    /// before it is closed as too slow (1013). Telemetry is conflated and
    /// does not count; subscription snapshots wait for the writer instead.
    pub send_queue: usize,
    /// Bytes a connection may have waiting, conflated telemetry included;
    /// over it the client is closed as too slow (1013).
    pub send_buffer: bytesize::ByteSize,
    /// A write the client does not take within this long closes the
    /// connection (1013 when the close frame can still be written,
    /// otherwise the TCP connection is dropped).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// How long a client may take to authenticate.
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// The server pings this often.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection that neither answers the server's pings nor sends a
    /// frame (its own pings do not count) this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_connections: 50_000,
            max_frame: bytesize::ByteSize::kib(64),
            max_subscriptions: 64,
            max_devices: 10_000,
            send_queue: 1024,
            send_buffer: bytesize::ByteSize::mib(8),
            write_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// The HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// A second, loopback-only address serving `GET /metrics` without
    /// credentials, for a scraper on the same host (on `listen`, `/metrics`
    /// needs an admin credential when `[auth]` is on).
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: None,
        }
    }
}

/// Where scripts live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScriptsConfig {
    /// The scripts directory: `<product>.wasm` and `<product>.examples.json`.
    pub dir: PathBuf,
    /// Watch the directory and reload changed scripts.
    pub watch: bool,
    /// A changed file is taken once it has not changed for this long.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// A removed script's product is unloaded after this long, unless the
    /// file comes back (a build that deletes before writing).
    #[serde(with = "humantime_serde")]
    pub unload_grace: Duration,
    /// Engine settings (compiled-script cache, pooling, deadline clock).
    #[serde(flatten)]
    pub engine: EngineOptions,
}

impl Default for ScriptsConfig {
    fn default() -> Self {
        ScriptsConfig {
            dir: PathBuf::from("scripts"),
            watch: true,
            settle: Duration::from_millis(300),
            unload_grace: Duration::from_secs(10),
            engine: EngineOptions::default(),
        }
    }
}

/// Script workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    /// Worker threads; 0 means one per core.
    pub count: usize,
    /// Messages a worker's queue holds before sources must wait.
    pub queue: usize,
    /// Messages of one product passed to a script in one call, at most.
    pub batch: usize,
    /// How long shutdown waits for queued messages to finish.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        WorkersConfig {
            count: 0,
            queue: 1024,
            batch: 32,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl WorkersConfig {
    /// The number of workers to start.
    pub fn effective_count(&self) -> usize {
        if self.count > 0 {
            self.count
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// The fan-out bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// Redis, for several instances; absent means in-process.
    pub redis: Option<RedisConfig>,
}

/// Redis as the bus: pub/sub fan-out, the shared interest table, latest
/// values, status, deadlines and dead letters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`, or through Sentinels
    /// `redis+sentinel://[user:password@]host:port[,host:port…]/master[/db]`.
    pub url: String,
    /// How often the interest mirror is rebuilt from `ws:sub:*`.
    #[serde(default = "defaults::resync", with = "humantime_serde")]
    pub resync: Duration,
    /// How often latest values and deadlines are written behind.
    #[serde(default = "defaults::flush", with = "humantime_serde")]
    pub flush: Duration,
    /// How long a command may take before Redis counts as unreachable.
    #[serde(default = "defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How many replicas must confirm a status change, alert or event
    /// (`WAIT`) before it counts as recorded; 0 does not wait. With
    /// Sentinel, 1 keeps a failover from losing what was recorded.
    #[serde(default)]
    pub wait_replicas: usize,
    /// The user the Sentinels of a `redis+sentinel://` URL are asked as
    /// (Redis 6.2+ ACLs); none: the default user.
    #[serde(default)]
    pub sentinel_username: Option<String>,
    /// The password the Sentinels are asked with (their `requirepass`, or
    /// `sentinel_username`'s); none: they are asked without.
    #[serde(default)]
    pub sentinel_password: Option<String>,
    /// With `rediss://`: the PEM file of the CA the server's certificate
    /// is checked against, instead of the system's roots; relative to the
    /// config file.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// With `rediss://`: this client's PEM certificate, for servers that
    /// check clients (`tls-auth-clients`); with `tls_key_file`.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

/// The device registry file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// A TOML or JSON file with `[[devices]]`; relative to the config file.
    pub file: Option<PathBuf>,
    /// How many devices outside the registry this instance keeps track of
    /// (status, latest values); messages of further unknown devices are
    /// dead letters (`device_limit`).
    pub max_unregistered: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            file: None,
            max_unregistered: 100_000,
        }
    }
}

/// An MQTT topic template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Segments are literals, `+`, `{product}` or `{device}`, e.g.
    /// `devices/{product}/{device}/telemetry`.
    pub topic: String,
    /// The product, when the topic does not name it.
    #[serde(default)]
    pub product: Option<String>,
}

/// Settings of one product.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProductConfig {
    /// The script file; default `<scripts.dir>/<product>.wasm`.
    #[serde(default)]
    pub script: Option<PathBuf>,
    /// How online/offline is decided.
    #[serde(default)]
    pub status: StatusMode,
    /// Parameters the script reads with `param`.
    #[serde(default)]
    pub params: Params,
    /// Per-call limits.
    #[serde(default)]
    pub limits: Limits,
    /// Which other devices this product's outputs may write: `declared`
    /// (the default: devices whose registry entry names the reporting
    /// device as `parent`) or `same_tenant` (also any device of the
    /// reporting device's tenant). Anything else is a `foreign_device` dead
    /// letter.
    #[serde(default)]
    pub children: Children,
    /// How commands reach the product's devices; absent: MQTT on
    /// `devices/{product}/{device}/command` at QoS 1.
    #[serde(default)]
    pub commands: Option<crate::commands::TransportConfig>,
}

/// Which devices a product's outputs may name besides the reporting one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Children {
    /// Only devices declared with `parent = "<reporting device>"`.
    #[default]
    Declared,
    /// Those, and any device of the reporting device's tenant.
    SameTenant,
}

/// Status detection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    /// The MQTT topic of explicit status signals (payload `1` or `0`).
    pub topic: Option<String>,
    /// Deadlines are precise to this.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            topic: Some("devices/status/{device}".into()),
            tick: Duration::from_millis(100),
        }
    }
}

/// The dead-letter store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// How many dead letters are kept (memory ring, or Redis stream length).
    pub capacity: usize,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig { capacity: 10_000 }
    }
}

/// Output of every processed record, for a database writer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RecordsConfig {
    /// A capped Redis stream (needs `[bus.redis]`).
    pub redis_stream: Option<RedisStreamConfig>,
    /// A Kafka topic.
    pub kafka: Option<KafkaRecordsConfig>,
}

/// A capped Redis stream of records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisStreamConfig {
    /// The stream key.
    #[serde(default = "defaults::records_key")]
    pub key: String,
    /// Approximate maximum length.
    #[serde(default = "defaults::records_maxlen")]
    pub maxlen: usize,
}

/// A Kafka topic of records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaRecordsConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// The topic.
    pub topic: String,
    /// Extra librdkafka producer settings.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

mod defaults {
    use std::time::Duration;

    pub(super) fn resync() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn flush() -> Duration {
        Duration::from_millis(200)
    }
    pub(super) fn timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub(super) fn records_key() -> String {
        "sluice:records".into()
    }
    pub(super) fn records_maxlen() -> usize {
        1_000_000
    }
}

/// A configuration with the file it came from, relative paths resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedConfig {
    /// The settings.
    pub config: Config,
    /// The file (or `<embedded defaults>`).
    pub file: PathBuf,
}

impl Config {
    /// Reads, expands, checks and resolves `file`.
    pub fn load(file: &Path) -> Result<LoadedConfig, ConfigError> {
        let mut config: Config = load_file(file)?;
        let base = file.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate(file)?;
        Ok(LoadedConfig {
            config,
            file: file.to_path_buf(),
        })
    }

    /// The embedded defaults, with scripts in `scripts_dir`.
    pub fn embedded(scripts_dir: &Path) -> LoadedConfig {
        let mut config = Config::default();
        config.scripts.dir = scripts_dir.to_path_buf();
        config.routes.push(RouteConfig {
            topic: "devices/{product}/{device}/telemetry".into(),
            product: None,
        });
        LoadedConfig {
            config,
            file: PathBuf::from("<embedded defaults>"),
        }
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.scripts.dir);
        if let Some(dir) = &mut self.scripts.engine.cache_dir {
            resolve(dir);
        }
        if let Some(file) = &mut self.registry.file {
            resolve(file);
        }
        if let Some(redis) = &mut self.bus.redis {
            for file in [
                &mut redis.tls_ca_file,
                &mut redis.tls_cert_file,
                &mut redis.tls_key_file,
            ]
            .into_iter()
            .flatten()
            {
                resolve(file);
            }
        }
        for product in self.products.values_mut() {
            if let Some(script) = &mut product.script {
                resolve(script);
            }
        }
    }

    /// The script file of `product`.
    pub fn script_path(&self, product: &str) -> PathBuf {
        self.products
            .get(product)
            .and_then(|p| p.script.clone())
            .unwrap_or_else(|| self.scripts.dir.join(format!("{product}.wasm")))
    }

    /// Checks what serde cannot: names, templates, ranges and combinations.
    pub fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, reason: String| Err(ConfigError::invalid(file, key, reason));
        for name in self.products.keys() {
            if let Err(reason) = check_name(name) {
                return bad(format!("products.{name}"), reason);
            }
        }
        super::checks::check_ranges(self, file)?;
        super::checks::check_auth(self, file)?;
        for (i, route) in self.routes.iter().enumerate() {
            if let Err(reason) =
                crate::route::TopicTemplate::parse(&route.topic, route.product.as_deref())
            {
                return bad(format!("routes[{i}].topic"), reason);
            }
        }
        if let Some(topic) = &self.status.topic
            && let Err(reason) = crate::route::TopicTemplate::parse_status(topic)
        {
            return bad("status.topic".into(), reason);
        }
        if self.records.redis_stream.is_some() && self.bus.redis.is_none() {
            return bad(
                "records.redis_stream".into(),
                "a Redis stream needs [bus.redis] to be configured".into(),
            );
        }
        if let Some(redis) = &self.bus.redis
            && let Err(reason) = crate::bus::check_redis_url(&redis.url)
        {
            return bad("bus.redis.url".into(), reason);
        }
        self.sources.validate(file)
    }
}

/// Product and device names: non-empty, no spaces, slashes or wildcards,
/// so they fit topics, Redis keys and file names.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("expected a name of 1 to 128 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '/' | '+' | '#' | '{' | '}' | '*'))
    {
        return Err(format!(
            "{name:?} contains {c:?}; names may not contain spaces, '/', '+', '#', '*' or braces"
        ));
    }
    Ok(())
}
