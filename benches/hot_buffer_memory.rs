//! Hot buffer memory per active series, measured by a counting allocator (every byte
//! the buffer holds, Arrow buffers' spare capacity and hash tables' empty slots
//! included), not estimated.
//!
//! `cargo bench --bench hot_buffer_memory` — `FLEETLAKE_BENCH_SERIES` series (default
//! 1,000,000: 50,000 accounts × 4 Lambda functions × 5 metrics) from the load
//! generator's fleet, one datapoint each, decoded from Metric Streams JSON in
//! requests of 10,000 datapoints exactly as the Firehose endpoint decodes them, and
//! inserted into a hot buffer. Reported: the live bytes the buffer holds after the
//! minute is in (rows, keys, per-series maxima and watermarks), after a second
//! minute, and what stays once both are flushed (the per-series watermarks).

#[path = "../src/bin/fleetlake-loadgen/fleet.rs"]
#[allow(dead_code, unreachable_pub)]
mod fleet;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use fleetlake_aggregate::buffer::{HotBuffer, latest_per_series};
use fleetlake_ingest::{Decoder, Format};
use fleetlake_model::Table;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const REQUEST: u64 = 10_000;

/// Inserts minute `minute` of every series, a request's worth at a time.
fn insert_minute(buffer: &mut HotBuffer, fleet: &fleet::Fleet, minute: u64, seq: &mut u64) {
    let per_minute = fleet.per_minute();
    let mut g = minute * per_minute;
    while g < (minute + 1) * per_minute {
        let end = (g + REQUEST).min((minute + 1) * per_minute);
        let mut decoder = Decoder::new("bench", Format::MetricsJson, None);
        let mut s = g;
        while s < end {
            let e = (s + 20).min(end);
            decoder.push_record(&fleet.json_record(s..e), "r", 0);
            s = e;
        }
        for (table, batch) in decoder.finish() {
            if table == Table::Metrics {
                *seq += 1;
                let outcome = buffer.insert(*seq, &batch);
                assert_eq!(outcome.visible as u64, end - g);
            }
        }
        g = end;
    }
}

fn main() {
    let series: u64 = std::env::var("FLEETLAKE_BENCH_SERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let accounts = (series / 20).max(1) as usize;
    let fleet = fleet::Fleet::new(1, accounts, 4, 4, 1_700_000_040_000, 0, 0.0);
    let series = fleet.per_minute();
    let per = |bytes: isize| bytes as f64 / series as f64;

    let base = live();
    let mut buffer = HotBuffer::new(Table::Metrics, None);
    let mut seq = 0;
    insert_minute(&mut buffer, &fleet, 0, &mut seq);
    let one = live() - base;
    let counted = buffer.bytes();
    insert_minute(&mut buffer, &fleet, 1, &mut seq);
    let two = live() - base;
    // The flush writes both minutes; what stays is the watermark of every series. (The
    // service also keeps the written rows queryable for 10 s after the commit, for
    // queries that loaded the lake just before it; not counted here.)
    let job = buffer.begin_flush().expect("rows to flush");
    let latest = latest_per_series(Table::Metrics, &job.batches);
    drop(job);
    buffer.complete_flush_known(1, Vec::new(), latest);
    let after = live() - base;

    println!("series                               {series}");
    println!(
        "one minute in the buffer             {:>8.1} MiB  {:>6.1} bytes/series  (the buffer's own count of its rows: {:.1} bytes/series)",
        one as f64 / 1048576.0,
        per(one),
        counted as f64 / series as f64
    );
    println!(
        "two minutes in the buffer            {:>8.1} MiB  {:>6.1} bytes/series",
        two as f64 / 1048576.0,
        per(two)
    );
    println!(
        "after the flush (series watermarks)  {:>8.1} MiB  {:>6.1} bytes/series",
        after as f64 / 1048576.0,
        per(after)
    );
}
