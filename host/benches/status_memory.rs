//! Memory of status tracking: one million devices in heartbeat mode, counted
//! by the allocator itself, and the time to observe and to expire them.
//!
//! Run with: `cargo bench -p sluice --bench status_memory`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use sluice::status::{StatusMode, StatusTracker};

/// The system allocator, counting bytes in use.
struct Counting;

static IN_USE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged and only
// adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        IN_USE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        IN_USE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        IN_USE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const DEVICES: usize = 1_000_000;

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let ids: Vec<String> = (0..DEVICES).map(|i| format!("device-{i:07}")).collect();
        let mode = StatusMode::Heartbeat {
            interval: Duration::from_secs(60),
        };
        let start = tokio::time::Instant::now();
        let before = IN_USE.load(Ordering::Relaxed);
        let mut tracker = StatusTracker::new(start, 0, Duration::from_millis(100));
        let began = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            // Spread the reports over a minute, as real devices would.
            let at = start + Duration::from_micros(60 * i as u64);
            tracker.observe(id, mode, None, at, 0);
        }
        let observe = began.elapsed();
        let used = IN_USE.load(Ordering::Relaxed) - before;
        let began = Instant::now();
        for (i, id) in ids.iter().enumerate() {
            let at = start + Duration::from_secs(30) + Duration::from_micros(60 * i as u64);
            tracker.observe(id, mode, None, at, 0);
        }
        let refresh = began.elapsed();
        let began = Instant::now();
        let expired = tracker.expire(start + Duration::from_secs(200), 0);
        let expire = began.elapsed();
        assert_eq!(expired.len(), DEVICES);
        println!("status tracker, {DEVICES} devices in heartbeat mode (ids of 14 bytes):");
        println!(
            "  memory: {used} bytes = {:.1} bytes per device",
            used as f64 / DEVICES as f64
        );
        println!(
            "  first message of each: {:.0} ns per device",
            observe.as_nanos() as f64 / DEVICES as f64
        );
        println!(
            "  a refresh of each:     {:.0} ns per device",
            refresh.as_nanos() as f64 / DEVICES as f64
        );
        println!(
            "  expiring all:          {:.0} ns per device",
            expire.as_nanos() as f64 / DEVICES as f64
        );
    });
}
