//! Real servers for the tests: `redis-server` and `mosquitto`, each on an
//! ephemeral loopback port, stopped when dropped, restartable on the same
//! port.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("the OS gives out a loopback port")
        .port()
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
    child: Option<ChildGuard>,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> Self {
        require("redis-server");
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        };
        server.restart();
        server
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
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            false,
        )
        .expect("redis-server starts");
        wait_for_port(self.port, &mut child, "redis-server");
        self.child = Some(child);
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
