//! The load tool: starts redis-server, mosquitto and `sluice` processes
//! itself, drives them as devices and dashboards would, and prints what it
//! measured. One mode per question:
//!
//! - `delivery` (the default): reports through MQTT → sluice → Redis →
//!   WebSocket at a fixed rate; frames per second, end-to-end latency,
//!   server RSS per connection;
//! - `subscribe`: how long one connection takes to subscribe to
//!   `--devices` devices that have all reported, with Redis on loopback;
//! - `lag`: the server's memory while one client stops reading a
//!   `--rate` stream, and when it is closed;
//! - `qos1`: messages per second through one MQTT QoS 1 session, each
//!   acknowledged only after its effects reached the bus;
//! - `lateness`: how late after its deadline a silent device's offline
//!   comes, with two instances sharing deadlines in Redis;
//! - `commands`: the round trip of a command (HTTP on one instance →
//!   MQTT to a simulated device → its answer ingested by another instance
//!   → Redis → the caller), `--messages` of them one after another;
//! - `recovery`: a client that missed `--messages` alerts resumes with
//!   `since`; time to replay them, and one page of the history API.
//!
//! ```sh
//! # 10k msg/s, 100 clients each watching one of 100 devices
//! cargo run --release -p sluice-tests --bin sluice-load -- --clients 100 --devices 100 --rate 10000
//! # fan-out: 1,000 clients all watching the same 100 devices
//! cargo run --release -p sluice-tests --bin sluice-load -- --clients 1000 --devices 100 --watch all --rate 200
//! # 10,000 idle connections (raise the descriptor limit first)
//! ulimit -n 65536 && cargo run --release -p sluice-tests --bin sluice-load -- --clients 10000 --rate 0
//! # one connection subscribing to 100,000 devices
//! cargo run --release -p sluice-tests --bin sluice-load -- --mode subscribe --devices 100000
//! # the same devices as one group: one count and one channel
//! cargo run --release -p sluice-tests --bin sluice-load -- --mode subscribe --devices 100000 --by-group
//! # memory with one client lagging behind 10,000 msg/s
//! cargo run --release -p sluice-tests --bin sluice-load -- --mode lag --devices 1000 --rate 10000
//! # one QoS 1 session, with mosquitto's max_inflight_messages at 1000
//! cargo run --release -p sluice-tests --bin sluice-load -- --mode qos1 --inflight 1000
//! # offline lateness, 2 s heartbeat, 200 devices
//! cargo run --release -p sluice-tests --bin sluice-load -- --mode lateness --devices 200
//! # 2,000 command round trips through mosquitto and Redis
//! cargo run --release -p sluice-tests --bin sluice-load -- --mode commands --messages 2000
//! # a client resuming after 1,000 missed alerts (add --memory-bus for the in-process bus)
//! cargo run --release -p sluice-tests --bin sluice-load -- --mode recovery --messages 1000
//! # the same with a replica that must confirm each batch (WAIT)
//! cargo run --release -p sluice-tests --bin sluice-load -- --mode recovery --messages 10000 --wait-replicas 1
//! # a Sentinel failover under traffic, with 1,000 alerts raised during it
//! cargo run --release -p sluice-tests --bin sluice-load -- --mode failover --messages 1000 --wait-replicas 1
//! ```

mod commands;
mod delivery;
mod failover;
mod lag;
mod lateness;
mod qos1;
mod recovery;
mod subscribe;

use clap::{Parser, ValueEnum};

/// What a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Delivery rate, latency and memory per connection.
    Delivery,
    /// Time to subscribe one connection to many devices.
    Subscribe,
    /// Memory while one client stops reading.
    Lag,
    /// Messages per second through one MQTT QoS 1 session.
    Qos1,
    /// Lateness of offline transitions across two instances.
    Lateness,
    /// Round trips of device commands across two instances.
    Commands,
    /// A client resuming after missed alerts.
    Recovery,
    /// A Sentinel failover under traffic.
    Failover,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Watch {
    /// Client `i` watches device `i % devices`.
    One,
    /// Every client watches every device.
    All,
}

#[derive(Debug, Parser)]
#[command(about = "Drive sluice as devices and dashboards would, and measure it")]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Delivery)]
    mode: Mode,
    /// WebSocket clients (`delivery`).
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Devices reporting (or subscribed to).
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// What each client watches (`delivery`).
    #[arg(long, value_enum, default_value_t = Watch::One)]
    watch: Watch,
    /// Reports per second (`delivery`, `lag`; 0: idle connections only).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of traffic measured (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// mosquitto's `max_inflight_messages` (`qos1`).
    #[arg(long, default_value_t = 20)]
    inflight: u32,
    /// Messages sent (`qos1`), or commands (`commands`).
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Use the in-process bus instead of Redis (`qos1`, `recovery`).
    #[arg(long)]
    memory_bus: bool,
    /// Subscribe by the one group every device is in (`subscribe`).
    #[arg(long)]
    by_group: bool,
    /// The channel subscribed to (`subscribe`): `telemetry` or `status`.
    #[arg(long, default_value = "telemetry")]
    channel: String,
    /// `wait_replicas` (`recovery`: with this many replicas started;
    /// `failover`: of the two replicas).
    #[arg(long, default_value_t = 0)]
    wait_replicas: usize,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match args.mode {
        Mode::Delivery => delivery::run(&args).await,
        Mode::Subscribe => subscribe::run(&args).await,
        Mode::Lag => lag::run(&args).await,
        Mode::Qos1 => qos1::run(&args).await,
        Mode::Lateness => lateness::run(&args).await,
        Mode::Commands => commands::run(&args).await,
        Mode::Recovery => recovery::run(&args).await,
        Mode::Failover => failover::run(&args).await,
    }
}
