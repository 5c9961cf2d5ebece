//! Long-lived tasks under supervision: a task that panics is logged with
//! its name, counted (`sluice_task_restarts_total{task}`) and started again
//! with backoff, so nothing that delivers data dies silently; a task that
//! keeps failing makes `/ready` answer 503 with its name.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Panics within this window count towards "keeps failing".
pub const FAILING_WINDOW: Duration = Duration::from_secs(60);
/// This many panics within [`FAILING_WINDOW`] make a task "failing".
pub const FAILING_PANICS: usize = 3;
/// The first wait before a restart; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Record {
    restarts: u64,
    recent: VecDeque<Instant>,
    last_panic: Option<String>,
}

/// Keeps track of every supervised task of one sluice process.
#[derive(Debug, Default)]
pub struct Supervisor {
    records: Mutex<HashMap<&'static str, Record>>,
}

/// A task that keeps failing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failing {
    /// Its name.
    pub task: &'static str,
    /// Panics within the last minute.
    pub recent_panics: usize,
    /// What the last panic said.
    pub last_panic: String,
}

impl Supervisor {
    /// No task has failed yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Supervisor::default())
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, Record>> {
        // Held for a map update, never across an await.
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that `task` panicked with `message`: logged, counted.
    pub fn panicked(&self, task: &'static str, message: &str) {
        metrics::counter!("sluice_task_restarts_total", "task" => task).increment(1);
        tracing::error!(task, panic = message, "a task panicked; restarting it");
        let now = Instant::now();
        let mut records = self.records();
        let record = records.entry(task).or_default();
        record.restarts += 1;
        record.recent.push_back(now);
        while record
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > FAILING_WINDOW)
        {
            record.recent.pop_front();
        }
        record.last_panic = Some(message.to_owned());
    }

    /// How many times `task` was restarted.
    pub fn restarts(&self, task: &str) -> u64 {
        self.records().get(task).map_or(0, |r| r.restarts)
    }

    /// Tasks that panicked [`FAILING_PANICS`] times or more within the
    /// last [`FAILING_WINDOW`].
    pub fn failing(&self) -> Vec<Failing> {
        let now = Instant::now();
        let mut failing: Vec<Failing> = self
            .records()
            .iter()
            .filter_map(|(task, record)| {
                let recent = record
                    .recent
                    .iter()
                    .filter(|t| now.duration_since(**t) <= FAILING_WINDOW)
                    .count();
                (recent >= FAILING_PANICS).then(|| Failing {
                    task,
                    recent_panics: recent,
                    last_panic: record.last_panic.clone().unwrap_or_default(),
                })
            })
            .collect();
        failing.sort_by_key(|f| f.task);
        failing
    }

    /// Runs the task that `make` starts until it returns; if it panics,
    /// records it and starts a new one after a backoff (doubling from
    /// 100 ms to 30 s, back to 100 ms after a minute without panics).
    /// Ends when the task returns, or at `shutdown` while backing off.
    pub fn spawn<F, Fut>(
        self: &Arc<Self>,
        task: &'static str,
        mut shutdown: watch::Receiver<bool>,
        mut make: F,
    ) -> JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let supervisor = self.clone();
        tokio::spawn(async move {
            let mut backoff = FIRST_BACKOFF;
            loop {
                let started = Instant::now();
                let message = match tokio::spawn(make()).await {
                    Ok(()) => return,
                    Err(error) if error.is_panic() => panic_message(error.into_panic()),
                    // Cancelled: the runtime is going away.
                    Err(_) => return,
                };
                supervisor.panicked(task, &message);
                if started.elapsed() > FAILING_WINDOW {
                    backoff = FIRST_BACKOFF;
                }
                if *shutdown.borrow() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        })
    }
}

/// What a panic payload says.
pub fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => (*text).to_owned(),
            Err(_) => "a panic without a message".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_counted_and_reported() {
        let supervisor = Supervisor::new();
        let (_stop, shutdown) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let handle = {
            let runs = runs.clone();
            supervisor.spawn("flaky", shutdown, move || {
                let runs = runs.clone();
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) < 3 {
                        panic!("run {} fails", runs.load(Ordering::SeqCst));
                    }
                }
            })
        };
        handle.await.unwrap();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            4,
            "restarted until it returned"
        );
        assert_eq!(supervisor.restarts("flaky"), 3);
        let failing = supervisor.failing();
        assert_eq!(failing.len(), 1);
        assert_eq!(failing[0].task, "flaky");
        assert!(failing[0].last_panic.contains("fails"), "{failing:?}");
        tokio::time::advance(FAILING_WINDOW + Duration::from_secs(1)).await;
        assert!(
            supervisor.failing().is_empty(),
            "healthy again after a minute"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_backoff() {
        let supervisor = Supervisor::new();
        let (stop, shutdown) = watch::channel(false);
        let handle = supervisor.spawn("doomed", shutdown, || async { panic!("always") });
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.send(true).unwrap();
        handle.await.unwrap();
        assert!(supervisor.restarts("doomed") >= 3);
    }
}
