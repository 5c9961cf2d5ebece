//! [`RedisTarget`]: the Redis node sluice talks to, either the one a
//! `redis://` URL names or the master a set of Sentinels names
//! (`redis+sentinel://`). With Sentinels it follows failovers: the
//! connection every command shares is replaced by one to the new master,
//! and subscriber loops reconnect when told the master moved.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Client, RedisError};
use tokio::sync::watch;

/// How often the Sentinels are asked which node is the master.
const SENTINEL_POLL: Duration = Duration::from_millis(500);

/// The first wait of a loop that lost its connection of its own.
const FIRST_RETRY: Duration = Duration::from_millis(100);

/// What a loop holding a connection of its own to the master (a
/// subscriber, a blocking reader) keeps between tries: a backoff that
/// doubles up to [`RETRY_MAX`](crate::bus::RETRY_MAX) after each loss and
/// starts over once connected, and the moves of the master, which cut a
/// wait short and end a connection to the old master.
#[derive(Debug)]
pub struct Reconnect {
    target: RedisTarget,
    backoff: Duration,
    moves: watch::Receiver<u64>,
}

impl Reconnect {
    /// For a loop on `target`'s master.
    pub fn new(target: &RedisTarget) -> Self {
        Reconnect {
            target: target.clone(),
            backoff: FIRST_RETRY,
            moves: target.moves(),
        }
    }

    /// A client of the current master: a move after this is noticed by
    /// [`Reconnect::moved`].
    pub fn client(&mut self) -> Client {
        self.moves.mark_unchanged();
        self.target.client()
    }

    /// The loop is connected (and subscribed): the next loss waits the
    /// first backoff again.
    pub fn connected(&mut self) {
        self.backoff = FIRST_RETRY;
    }

    /// How long [`Reconnect::pause`] waits next.
    pub fn backoff(&self) -> Duration {
        self.backoff
    }

    /// Resolves when the master moved since [`Reconnect::client`], with
    /// the error the loop reconnects on.
    pub async fn moved(&mut self) -> RedisError {
        if self.moves.changed().await.is_err() {
            // The target is gone: nothing will move again.
            std::future::pending::<()>().await;
        }
        moved()
    }

    /// Waits the backoff before the next try (not at all if the master
    /// moved) and doubles it; false at `shutdown`.
    pub async fn pause(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let backoff = self.backoff;
        self.backoff = (backoff * 2).min(crate::bus::RETRY_MAX);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => true,
            _ = self.moved() => true,
            _ = shutdown.changed() => false,
        }
    }
}

/// The Redis node of the bus, shared by everything that talks to it.
#[derive(Clone)]
pub struct RedisTarget {
    inner: Arc<Inner>,
}

struct Inner {
    sentinels: Option<Sentinels>,
    settings: ConnectionManagerConfig,
    timeout: Duration,
    /// Whether writes that wait for replicas have a connection of their own.
    separate_writes: bool,
    node: RwLock<Node>,
    /// Counts the times the master moved.
    moves: watch::Sender<u64>,
}

#[derive(Clone)]
struct Node {
    address: String,
    client: Client,
    connection: ConnectionManager,
    /// The connection status changes, alerts and events are written on:
    /// `connection` itself, or one of its own when they wait for replicas
    /// (a `WAIT` holds up everything sent after it on its connection).
    writes: ConnectionManager,
}

/// A `redis+sentinel://` URL taken apart.
#[derive(Debug, Clone, PartialEq)]
struct Sentinels {
    /// `host:port` of each Sentinel, asked in order.
    addresses: Vec<String>,
    /// The name the Sentinels monitor the master by.
    master: String,
    /// `user:password@` (as written, percent-encoded), or empty.
    credentials: String,
    /// The database number.
    db: i64,
    /// The user and password the Sentinels are asked with, if any.
    auth: Option<SentinelAuth>,
}

/// How the Sentinels are asked: `[bus.redis] sentinel_username` and
/// `sentinel_password`.
#[derive(Clone, PartialEq)]
struct SentinelAuth {
    username: Option<String>,
    password: String,
}

impl std::fmt::Debug for SentinelAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTarget")
            .field("address", &self.address())
            .field("sentinels", &self.inner.sentinels.is_some())
            .finish_non_exhaustive()
    }
}

fn read_lock(node: &RwLock<Node>) -> std::sync::RwLockReadGuard<'_, Node> {
    node.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn moved() -> RedisError {
    RedisError::from((redis::ErrorKind::Io, "the Redis master moved"))
}

impl RedisTarget {
    /// Connects to the node `config.url` names (`redis://`, `rediss://`),
    /// or to the master the Sentinels of a `redis+sentinel://` URL name
    /// (asked with `sentinel_username` and `sentinel_password`); with
    /// `wait_replicas`, [`RedisTarget::writes`] is a connection of its own.
    pub async fn connect(config: &crate::config::RedisConfig) -> Result<Self, RedisError> {
        let (url, timeout) = (config.url.as_str(), config.timeout);
        let separate_writes = config.wait_replicas > 0;
        let settings = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let sentinels = match parse_sentinel_url(url) {
            Some(parsed) => {
                let mut sentinels = parsed.map_err(|reason| {
                    RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "bad Sentinel URL",
                        reason,
                    ))
                })?;
                sentinels.auth = config
                    .sentinel_password
                    .as_ref()
                    .map(|password| SentinelAuth {
                        username: config.sentinel_username.clone(),
                        password: password.clone(),
                    });
                Some(sentinels)
            }
            None => None,
        };
        let node = match &sentinels {
            None => {
                let client = open_client(url, config)?;
                open_node(without_credentials(url), client, &settings, separate_writes).await?
            }
            Some(sentinels) => {
                let address = sentinels.master_address(timeout).await?;
                sentinels
                    .open_master(address, &settings, separate_writes)
                    .await?
            }
        };
        tracing::info!(address = %node.address, sentinels = sentinels.is_some(), "connected to Redis");
        Ok(RedisTarget {
            inner: Arc::new(Inner {
                sentinels,
                settings,
                timeout,
                separate_writes,
                node: RwLock::new(node),
                moves: watch::channel(0).0,
            }),
        })
    }

    /// A client of the current master, for connections of their own
    /// (subscribers, blocking reads).
    pub fn client(&self) -> Client {
        read_lock(&self.inner.node).client.clone()
    }

    /// The connection every command shares (clones share it).
    pub fn connection(&self) -> ConnectionManager {
        read_lock(&self.inner.node).connection.clone()
    }

    /// The connection status changes, alerts and events are written on,
    /// with a receiver of [`RedisTarget::moves`] that tells when that
    /// connection's master is no longer the master.
    pub fn writes(&self) -> (ConnectionManager, watch::Receiver<u64>) {
        // Under the lock a move is made in: the receiver's mark is this
        // connection's master.
        let node = read_lock(&self.inner.node);
        (node.writes.clone(), self.inner.moves.subscribe())
    }

    /// Where the current master is: its URL, or `host:port` through
    /// Sentinels.
    pub fn address(&self) -> String {
        read_lock(&self.inner.node).address.clone()
    }

    /// Changes each time the master moves: a connection of its own made
    /// before the change is to the old master.
    pub fn moves(&self) -> watch::Receiver<u64> {
        self.inner.moves.subscribe()
    }

    /// With Sentinels: asks them which node is the master every
    /// [`SENTINEL_POLL`] and moves to it when it changed, until
    /// `shutdown`. With one node it only waits for `shutdown`.
    pub async fn follow_master(self, mut shutdown: watch::Receiver<bool>) {
        let Some(sentinels) = self.inner.sentinels.clone() else {
            let _ = shutdown.changed().await;
            return;
        };
        let mut ticker = tokio::time::interval(SENTINEL_POLL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            let address = match sentinels.master_address(self.inner.timeout).await {
                Ok(address) => address,
                Err(error) => {
                    metrics::counter!("sluice_bus_errors_total", "op" => "sentinel").increment(1);
                    tracing::warn!(%error, "no Sentinel answered which node is the Redis master");
                    continue;
                }
            };
            if address == self.address() {
                continue;
            }
            match sentinels
                .open_master(
                    address.clone(),
                    &self.inner.settings,
                    self.inner.separate_writes,
                )
                .await
            {
                Ok(node) => {
                    let old = {
                        let mut current = self
                            .inner
                            .node
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        self.inner.moves.send_modify(|count| *count += 1);
                        std::mem::replace(&mut *current, node)
                    };
                    metrics::counter!("sluice_bus_failovers_total").increment(1);
                    tracing::warn!(from = %old.address, to = %address, "the Redis master moved; following it");
                }
                Err(error) => {
                    metrics::counter!("sluice_bus_errors_total", "op" => "sentinel").increment(1);
                    tracing::warn!(%error, %address, "cannot use the master the Sentinels name yet");
                }
            }
        }
    }
}

/// A client of the node `url` names; for `rediss://`, with the CA and
/// client certificate of `config` when given (else the system's roots).
fn open_client(url: &str, config: &crate::config::RedisConfig) -> Result<Client, RedisError> {
    if !url.starts_with("rediss://") {
        return Client::open(url);
    }
    // Ring is the one crypto rustls is built with; installed once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |file: &std::path::Path| {
        std::fs::read(file).map_err(|error| {
            RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "cannot read a TLS file",
                format!("{}: {error}", file.display()),
            ))
        })
    };
    let client_tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read(cert)?,
            client_key: read(key)?,
        }),
        _ => None,
    };
    let root_cert = config.tls_ca_file.as_deref().map(read).transpose()?;
    Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
}

async fn open_node(
    address: String,
    client: Client,
    settings: &ConnectionManagerConfig,
    separate_writes: bool,
) -> Result<Node, RedisError> {
    let mut connection =
        ConnectionManager::new_with_config(client.clone(), settings.clone()).await?;
    refuse_cluster(&mut connection, &address).await?;
    let writes = if separate_writes {
        ConnectionManager::new_with_config(client.clone(), settings.clone()).await?
    } else {
        connection.clone()
    };
    Ok(Node {
        address,
        client,
        connection,
        writes,
    })
}

/// A node of a Redis Cluster is refused: the keys of one script call lie
/// in many slots, which a cluster serves from different nodes. A user
/// that may not run `INFO` (ACL `-@dangerous`) is not asked.
async fn refuse_cluster(
    connection: &mut ConnectionManager,
    address: &str,
) -> Result<(), RedisError> {
    let info: Result<String, RedisError> = redis::cmd("INFO")
        .arg("cluster")
        .query_async(connection)
        .await;
    let info = match info {
        Ok(info) => info,
        Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
            return Ok(());
        }
        Err(error) => return Err(error),
    };
    if info.lines().any(|line| line.trim() == "cluster_enabled:1") {
        return Err(RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "Redis Cluster is not supported",
            format!(
                "{address} is a node of a Redis Cluster; give [bus.redis] url a standalone Redis (or a master through redis+sentinel://)"
            ),
        )));
    }
    Ok(())
}

impl Sentinels {
    /// The master's `host:port` as the first Sentinel that knows it says.
    async fn master_address(&self, timeout: Duration) -> Result<String, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let mut last = None;
        for sentinel in &self.addresses {
            let asked = async {
                let client = Client::open(self.connection_info(sentinel)?)?;
                let mut connection = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&self.master)
                    .query_async::<Option<(String, u16)>>(&mut connection)
                    .await
            };
            match asked.await {
                Ok(Some((host, port))) => return Ok(format_address(&host, port)),
                Ok(None) => {
                    last = Some(RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "a Sentinel does not monitor this master",
                        format!("{sentinel} knows no master named {:?}", self.master),
                    )));
                }
                Err(error) => last = Some(error),
            }
        }
        let asked = self.addresses.join(", ");
        Err(match last {
            Some(error) => RedisError::from((
                error.kind(),
                "no Sentinel named the master",
                format!(
                    "asked {asked} for {:?}; the last said: {error}",
                    self.master
                ),
            )),
            None => RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Sentinel given")),
        })
    }

    /// How to connect to `sentinel` (`host:port`), with the credentials
    /// the Sentinels are asked with.
    fn connection_info(&self, sentinel: &str) -> Result<redis::ConnectionInfo, RedisError> {
        let info = redis::IntoConnectionInfo::into_connection_info(format!("redis://{sentinel}/"))?;
        let Some(auth) = &self.auth else {
            return Ok(info);
        };
        let mut settings = info.redis_settings().clone().set_password(&auth.password);
        if let Some(username) = &auth.username {
            settings = settings.set_username(username);
        }
        Ok(info.set_redis_settings(settings))
    }

    /// Connects to `address` and checks it is a master: a Sentinel's
    /// answer may be older than a failover that is under way.
    async fn open_master(
        &self,
        address: String,
        settings: &ConnectionManagerConfig,
        separate_writes: bool,
    ) -> Result<Node, RedisError> {
        let client = Client::open(format!("redis://{}{address}/{}", self.credentials, self.db))?;
        let mut node = open_node(address, client, settings, separate_writes).await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut node.connection).await?;
        match role.first() {
            Some(redis::Value::BulkString(role)) if role == b"master" => Ok(node),
            _ => Err(RedisError::from((
                redis::ErrorKind::Io,
                "the node the Sentinels name is not a master (yet)",
                node.address,
            ))),
        }
    }
}

/// `url` without its `user:password@`, for logs.
fn without_credentials(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://{host}"),
        _ => url.to_owned(),
    }
}

fn format_address(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `redis+sentinel://[user[:password]@]host:port[,host:port…]/master[/db]`
/// taken apart; `None` when `url` is not a Sentinel URL.
fn parse_sentinel_url(url: &str) -> Option<Result<Sentinels, String>> {
    let rest = url.strip_prefix("redis+sentinel://")?;
    Some(parse_sentinels(rest))
}

fn parse_sentinels(rest: &str) -> Result<Sentinels, String> {
    let (authority, path) = rest
        .split_once('/')
        .ok_or("expected redis+sentinel://host:port[,host:port…]/master[/db]")?;
    let (credentials, hosts) = match authority.rsplit_once('@') {
        Some((credentials, hosts)) => (format!("{credentials}@"), hosts),
        None => (String::new(), authority),
    };
    let mut addresses = Vec::new();
    for host in hosts.split(',') {
        let (name, port) = host
            .rsplit_once(':')
            .ok_or_else(|| format!("expected host:port for each Sentinel, got {host:?}"))?;
        if name.is_empty() || port.parse::<u16>().is_err() {
            return Err(format!(
                "expected host:port for each Sentinel, got {host:?}"
            ));
        }
        addresses.push(host.to_owned());
    }
    let mut parts = path.trim_end_matches('/').splitn(2, '/');
    let master = parts.next().unwrap_or_default();
    if master.is_empty() {
        return Err("expected the master's name after the Sentinels: …/mymaster".into());
    }
    let db = match parts.next() {
        None | Some("") => 0,
        Some(db) => db
            .parse::<i64>()
            .map_err(|_| format!("expected a database number after the master, got {db:?}"))?,
    };
    Ok(Sentinels {
        addresses,
        master: master.to_owned(),
        credentials,
        db,
        auth: None,
    })
}

/// Checks a `[bus.redis] url`: a node's URL or a Sentinel URL.
pub fn check_url(url: &str) -> Result<(), String> {
    if let Some(parsed) = parse_sentinel_url(url) {
        return parsed.map(drop);
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return Ok(());
    }
    Err("expected a redis://, rediss:// or redis+sentinel:// URL".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_name_sentinels_master_and_database() {
        let parsed =
            parse_sentinels(":s3cret@10.0.0.1:26379,10.0.0.2:26380/fleet/2").expect("a valid URL");
        assert_eq!(
            parsed,
            Sentinels {
                addresses: vec!["10.0.0.1:26379".into(), "10.0.0.2:26380".into()],
                master: "fleet".into(),
                credentials: ":s3cret@".into(),
                db: 2,
                auth: None,
            }
        );
        let plain = parse_sentinels("localhost:26379/mymaster").expect("a valid URL");
        assert_eq!(plain.db, 0);
        assert_eq!(plain.credentials, "");
    }

    #[test]
    fn bad_sentinel_urls_say_what_is_wrong() {
        for (url, says) in [
            ("localhost:26379", "expected redis+sentinel://"),
            ("localhost/mymaster", "host:port"),
            ("localhost:port/mymaster", "host:port"),
            ("localhost:26379/", "master's name"),
            ("localhost:26379/mymaster/zero", "database number"),
        ] {
            let error = parse_sentinels(url).expect_err(url);
            assert!(error.contains(says), "{url}: {error}");
        }
        assert!(check_url("redis+sentinel://a:1/m").is_ok());
        assert!(check_url("redis://localhost/").is_ok());
        assert!(check_url("http://localhost/").is_err());
        assert_eq!(
            without_credentials("redis://:pw@127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
    }
}
