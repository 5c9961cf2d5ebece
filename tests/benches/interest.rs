//! The interest gate: deciding, per message, whether anyone watches its
//! device. sluice's local mirror against the seed design's `EXISTS
//! ws:sub:{device}` per message, against one real redis-server, in one
//! process. One million devices report; ten are watched; a watched
//! device's message is published in both modes.
//!
//! Run with: `cargo bench -p sluice-tests --bench interest`

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice::bus::Interest;
use sluice_tests::servers::RedisServer;

const DEVICES: u64 = 1_000_000;
const WATCHED: u64 = 10;

/// The device of message `i`: every device once per million messages; the
/// watched ones are spread through the range.
fn device(i: u64) -> String {
    format!("dev-{}", (i * 7919) % DEVICES)
}

fn watched(n: u64) -> String {
    device(n * (DEVICES / WATCHED))
}

/// Runs `pass` (one pass over a message stream) `iterations` times on
/// `runtime` and returns the time it took.
fn timed<F: Future<Output = ()>>(
    runtime: &tokio::runtime::Runtime,
    iterations: u64,
    mut pass: impl FnMut() -> F,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iterations {
        let started = Instant::now();
        runtime.block_on(pass());
        total += started.elapsed();
    }
    total
}

async fn publish(connection: &mut redis::aio::MultiplexedConnection, device: &str) {
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("ws:device:{device}"))
        .arg("{}")
        .query_async(connection)
        .await
        .expect("PUBLISH");
}

fn interest_gate(c: &mut Criterion) {
    let redis = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let connection = runtime
        .block_on(redis.client().get_multiplexed_async_connection())
        .expect("Redis answers");
    runtime.block_on(async {
        for n in 0..WATCHED {
            redis.watch(&watched(n)).await;
        }
    });
    let interest = Interest::new();
    for n in 0..WATCHED {
        interest.set(&watched(n), true);
    }

    let mut group = c.benchmark_group("interest-gate");
    group.sample_size(10);

    // The local mirror: one in-memory lookup per message.
    group.throughput(Throughput::Elements(DEVICES));
    group.bench_function("local-mirror/1M-messages", |b| {
        b.iter_custom(|iterations| {
            timed(&runtime, iterations, || {
                let mut connection = connection.clone();
                let interest = &interest;
                async move {
                    let mut published = 0;
                    for i in 0..DEVICES {
                        let device = device(i);
                        if interest.is_watched(&device) {
                            publish(&mut connection, &device).await;
                            published += 1;
                        }
                    }
                    assert_eq!(published, WATCHED);
                }
            })
        })
    });

    // The seed design: EXISTS per message, then PUBLISH when watched. A
    // sample of the stream (with the watched devices in it) keeps the run short.
    const SAMPLE: u64 = 20_000;
    group.throughput(Throughput::Elements(SAMPLE));
    group.bench_function("exists-per-message/20k-messages", |b| {
        b.iter_custom(|iterations| {
            timed(&runtime, iterations, || {
                let mut connection = connection.clone();
                async move {
                    for i in 0..SAMPLE {
                        let device = if i % (SAMPLE / WATCHED) == 0 {
                            watched(i / (SAMPLE / WATCHED))
                        } else {
                            device(i)
                        };
                        let exists: i64 = redis::cmd("EXISTS")
                            .arg(format!("ws:sub:{device}"))
                            .query_async(&mut connection)
                            .await
                            .expect("EXISTS");
                        if exists == 1 {
                            publish(&mut connection, &device).await;
                        }
                    }
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, interest_gate);
criterion_main!(benches);
