//! Real servers for the tests: `redis-server` and `mosquitto`, each on an
//! ephemeral loopback port, stopped when dropped, restartable on the same
//! port.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago, and that this process has
/// not handed out before: the OS may give the same free port to two tests
/// running at once, and the second server to bind it would fail.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("the OS gives out a loopback port")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.insert(port) {
            return port;
        }
    }
}

/// A child process that is killed, with every process in its group when it
/// leads one, as soon as it is dropped: on a panic too, so no test leaves
/// a server or browser running.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    group: bool,
}

impl ChildGuard {
    /// Starts `command`; with `group`, in a process group of its own, so
    /// whatever it starts (a browser) ends with it.
    pub fn spawn(command: &mut Command, group: bool) -> std::io::Result<Self> {
        if group {
            std::os::unix::process::CommandExt::process_group(command, 0);
        }
        Ok(ChildGuard {
            child: command.spawn()?,
            group,
        })
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited, and how.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.group {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_port(port: u16, child: &mut ChildGuard, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return;
        }
        if let Some(status) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not listen on port {port} within 10 s");
}

fn require(binary: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{binary} is not installed; ./tests/run.sh installs it from Debian's packages"
    );
}

/// A `redis-server` of its own.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<ChildGuard>,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts one on a free port with more arguments (such as
    /// `--replicaof 127.0.0.1 6379`).
    pub fn start_with(args: &[&str]) -> Self {
        require("redis-server");
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        server.restart();
        server
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A client for the test's own commands.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a valid Redis URL")
    }

    /// Marks `device` watched as a gateway does: INCR and EXPIRE its
    /// `ws:sub:` count, then announce it on `sluice:interest`.
    pub async fn watch(&self, device: &str) {
        let mut connection = self
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("Redis answers");
        let key = format!("ws:sub:{device}");
        let event = serde_json::json!({"device": device, "watched": true}).to_string();
        redis::pipe()
            .cmd("INCR")
            .arg(&key)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(300)
            .ignore()
            .cmd("PUBLISH")
            .arg("sluice:interest")
            .arg(event)
            .ignore()
            .query_async::<()>(&mut connection)
            .await
            .expect("Redis takes the watch");
    }

    /// Stops it (as a crash would: no cleanup by clients).
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.stop();
        let mut child = ChildGuard::spawn(
            Command::new("redis-server")
                .args([
                    "--port",
                    &self.port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--dir")
                .arg(self.dir.path())
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            false,
        )
        .expect("redis-server starts");
        wait_for_port(self.port, &mut child, "redis-server");
        self.child = Some(child);
    }
}

/// A CA, and a server and a client certificate it signed (for
/// `127.0.0.1`), made by the `openssl` command in a directory of their own.
#[derive(Debug)]
pub struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    /// Makes them.
    pub fn generate() -> Self {
        require("openssl");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let run = |args: &[&str]| {
            let output = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl runs");
            assert!(
                output.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=sluice test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        std::fs::write(
            dir.path().join("san.ext"),
            "subjectAltName = IP:127.0.0.1, DNS:localhost\n",
        )
        .expect("write san.ext");
        for name in ["server", "client"] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=sluice test {name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.ext",
                "-out",
                &format!("{name}.crt"),
            ]);
        }
        TlsFiles { dir }
    }

    /// The path of `name` (`ca.crt`, `server.key`, `client.crt`, …).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Starts a `redis-server` that also takes TLS, with `files`' server
/// certificate, on a port of its own; clients must show a certificate of
/// the CA. Returns it and that port.
pub fn redis_with_tls(files: &TlsFiles) -> (RedisServer, u16) {
    let tls_port = free_port();
    let path = |name: &str| files.path(name).display().to_string();
    let server = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &path("server.crt"),
        "--tls-key-file",
        &path("server.key"),
        "--tls-ca-cert-file",
        &path("ca.crt"),
        "--tls-auth-clients",
        "yes",
    ]);
    (server, tls_port)
}

/// Waits until `replicas` replicas are in sync with `master`.
pub async fn wait_for_replicas(master: &RedisServer, replicas: usize) {
    let mut connection = master
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("the master answers");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut connection)
            .await
            .expect("INFO");
        let online = info
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count();
        if online >= replicas {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{replicas} replicas did not sync within 30 s: {info}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Redis Cluster of its own: masters in cluster mode, each a
/// `redis-server` of its own, the slots spread over them by
/// `redis-cli --cluster create`.
#[derive(Debug)]
pub struct RedisCluster {
    /// The masters.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` masters (at least three) and waits until every one
    /// says the cluster is ok.
    pub async fn start(masters: usize) -> Self {
        require("redis-cli");
        let nodes: Vec<RedisServer> = (0..masters)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ])
            })
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &nodes {
            let mut connection = node
                .client()
                .get_multiplexed_async_connection()
                .await
                .expect("a cluster node answers");
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut connection)
                    .await
                    .expect("CLUSTER INFO");
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster was not ok within 30 s: {info}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        RedisCluster { nodes }
    }
}

/// The name the Sentinels of a [`SentinelSet`] monitor their master by.
pub const SENTINEL_MASTER: &str = "sluice";

/// A master, its replicas and three Sentinels (quorum two) watching them,
/// each a `redis-server` of its own; a failover takes a few seconds.
#[derive(Debug)]
pub struct SentinelSet {
    /// The data nodes, the first of them the master at the start.
    pub nodes: Vec<RedisServer>,
    sentinels: Vec<(u16, ChildGuard)>,
    /// The Sentinels' `requirepass`, if they have one.
    password: Option<String>,
    _dir: tempfile::TempDir,
}

impl SentinelSet {
    /// Starts a master with `replicas` replicas and three Sentinels, and
    /// waits until the Sentinels know every replica and each other.
    pub async fn start(replicas: usize) -> Self {
        Self::start_with_password(replicas, None).await
    }

    /// The same, with Sentinels that answer only clients (and each other)
    /// giving `password`.
    pub async fn start_with_password(replicas: usize, password: Option<&str>) -> Self {
        let master = RedisServer::start();
        let master_port = master.port.to_string();
        let mut nodes = vec![master];
        for _ in 0..replicas {
            nodes.push(RedisServer::start_with(&[
                "--replicaof",
                "127.0.0.1",
                &master_port,
            ]));
        }
        // Sentinels learn of replicas from the master: they must be there.
        wait_for_replicas(&nodes[0], replicas).await;
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut sentinels = Vec::new();
        for i in 0..3 {
            let port = free_port();
            // Sentinels rewrite their configuration: each has its own file.
            let config = dir.path().join(format!("sentinel-{i}.conf"));
            let auth = password.map_or_else(String::new, |password| {
                format!("requirepass {password}\nsentinel sentinel-pass {password}\n")
            });
            std::fs::write(
                &config,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {dir}\n{auth}\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                    dir = dir.path().display()
                ),
            )
            .expect("write a Sentinel's config");
            let mut child = ChildGuard::spawn(
                Command::new("redis-server")
                    .arg(&config)
                    .arg("--sentinel")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
                false,
            )
            .expect("a Sentinel starts");
            wait_for_port(port, &mut child, "redis-server --sentinel");
            sentinels.push((port, child));
        }
        let set = SentinelSet {
            nodes,
            sentinels,
            password: password.map(str::to_owned),
            _dir: dir,
        };
        set.wait_until_known(replicas).await;
        set
    }

    /// The `redis+sentinel://` URL of the set.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+sentinel://{}/{SENTINEL_MASTER}", hosts.join(","))
    }

    /// The port of the node the Sentinels name master now.
    pub async fn master_port(&self) -> u16 {
        let (_, port): (String, u16) = self
            .ask(0, &["get-master-addr-by-name", SENTINEL_MASTER])
            .await
            .expect("the Sentinel names a master");
        port
    }

    /// The data node with `port`.
    pub fn node(&self, port: u16) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// Kills the current master (as a crash would) and waits until the
    /// Sentinels name another node, whose port it returns.
    pub async fn fail_over(&mut self) -> u16 {
        let old = self.master_port().await;
        self.nodes
            .iter_mut()
            .find(|n| n.port == old)
            .expect("the master is one of the nodes")
            .stop();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = self.master_port().await;
            if now != old {
                let mut connection = self
                    .node(now)
                    .client()
                    .get_multiplexed_async_connection()
                    .await
                    .expect("the new master answers");
                let role: Vec<redis::Value> = redis::cmd("ROLE")
                    .query_async(&mut connection)
                    .await
                    .expect("ROLE");
                if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                    return now;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the Sentinels did not fail over within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ask<T: redis::FromRedisValue>(
        &self,
        sentinel: usize,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let auth = self
            .password
            .as_ref()
            .map_or_else(String::new, |password| format!(":{password}@"));
        let client = redis::Client::open(format!(
            "redis://{auth}127.0.0.1:{}/",
            self.sentinels[sentinel].0
        ))?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("SENTINEL")
            .arg(args)
            .query_async(&mut connection)
            .await
    }

    async fn wait_until_known(&self, replicas: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut ready = true;
            for sentinel in 0..self.sentinels.len() {
                let known_replicas: Vec<redis::Value> = self
                    .ask(sentinel, &["replicas", SENTINEL_MASTER])
                    .await
                    .unwrap_or_default();
                let others: Vec<redis::Value> = self
                    .ask(sentinel, &["sentinels", SENTINEL_MASTER])
                    .await
                    .unwrap_or_default();
                ready &= known_replicas.len() == replicas && others.len() == 2;
            }
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Sentinels did not learn of every replica and each other within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A `mosquitto` broker of its own.
#[derive(Debug)]
pub struct Mosquitto {
    port: u16,
    config: PathBuf,
    _dir: tempfile::TempDir,
    child: Option<ChildGuard>,
}

impl Mosquitto {
    /// Starts one on a free port, anonymous access on loopback.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts one on a free port with `extra` lines of configuration
    /// (such as `max_inflight_messages 1000`).
    pub fn start_with(extra: &str) -> Self {
        require("mosquitto");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let port = free_port();
        let config = dir.path().join("mosquitto.conf");
        std::fs::write(
            &config,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\n{extra}\n"),
        )
        .expect("write the broker config");
        let mut broker = Mosquitto {
            port,
            config,
            _dir: dir,
            child: None,
        };
        broker.restart();
        broker
    }

    /// Its URL for sluice's configuration.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops it abruptly.
    pub fn stop(&mut self) {
        self.child = None;
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        let mut child = ChildGuard::spawn(
            Command::new("mosquitto")
                .arg("-c")
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            false,
        )
        .expect("mosquitto starts");
        wait_for_port(self.port, &mut child, "mosquitto");
        self.child = Some(child);
    }
}
