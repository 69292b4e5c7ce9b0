//! `fleetlake replay`: files of records straight into the lake.
//!
//! Each file is read (gzip detected by its magic bytes and decompressed as a stream)
//! and decoded on a thread of its own while the previous piece is made durable, then
//! the hot buffer is committed to the lake. Inputs, by format:
//! - `json` (default): newline-separated Metric Streams JSON, read in chunks of lines;
//! - `otel1` / `otel07`: length-delimited `ExportMetricsServiceRequest` messages, read
//!   in chunks of whole messages;
//! - `cwlogs`: CloudWatch Logs subscription objects, back to back, read in chunks of
//!   whole objects;
//! - a saved Firehose request body (`{"requestId":…,"records":[…]}`) in any of those
//!   formats, recognised by its first key.
//!
//! Undecodable input becomes dead letters (`replay:<file>`, with line or byte
//! positions) dated with the file's modification time, so replaying a file twice
//! stores its rows and its dead letters once.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use fleetlake_aggregate::{AggregateConfig, Aggregator};
use fleetlake_ingest::{DecodeStats, Decoder, Format};
use fleetlake_model::{RowSink, SinkError, Table};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::mpsc;

use crate::config::Config;

/// Bytes of input decoded into one write.
const CHUNK_BYTES: usize = 8 * 1024 * 1024;
/// Largest piece waited for when no whole line, message or object has ended yet.
const MAX_PIECE_BYTES: usize = 64 * 1024 * 1024;
/// Decoded writes waiting for the write-ahead log.
const PIPELINE: usize = 4;

pub(crate) fn run(config: &Config, format: Format, files: &[PathBuf]) -> anyhow::Result<()> {
    crate::serve::init_tracing("warn,buoyant_kernel=off,deltalake_core=warn");
    for file in files {
        if !file.is_file() {
            bail!("{}: no such file", file.display());
        }
    }
    config.prepare_dirs()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let summary = runtime.block_on(replay(config, format, files))?;
    println!("{summary}");
    Ok(())
}

struct Piece {
    rows: Vec<(Table, RecordBatch)>,
    read_bytes: u64,
}

async fn replay(config: &Config, format: Format, files: &[PathBuf]) -> anyhow::Result<String> {
    let aggregator = open_for_batch(config).await?;

    let total: u64 = files
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
        )
        .expect("valid template"),
    );

    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel::<Piece>(PIPELINE);
    let inputs = files.to_vec();
    let decoder_thread = std::thread::Builder::new()
        .name("fleetlake-replay".into())
        .spawn(move || -> anyhow::Result<DecodeStats> {
            let mut stats = DecodeStats::default();
            for file in &inputs {
                stats += decode_file(file, format, &tx)
                    .with_context(|| format!("reading {}", file.display()))?;
            }
            Ok(stats)
        })
        .context("starting the decoder thread")?;

    let mut written = DecodeStats::default();
    while let Some(piece) = rx.recv().await {
        for (table, batch) in &piece.rows {
            match table {
                Table::Metrics => written.datapoints += batch.num_rows(),
                Table::Logs => written.log_events += batch.num_rows(),
                Table::DeadLetters => written.dead_letters += batch.num_rows(),
            }
        }
        write(&aggregator, piece.rows).await?;
        bar.inc(piece.read_bytes);
        bar.set_message(format!(
            "{} datapoints, {} log events, {} dead letters",
            written.datapoints, written.log_events, written.dead_letters
        ));
    }
    let stats = decoder_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the decoder thread panicked"))??;
    bar.set_message("committing to the lake");
    aggregator
        .flush()
        .await
        .context("committing to the lake (the write-ahead log keeps the data)")?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let rate = (stats.datapoints + stats.log_events) as f64 / secs.max(1e-9);
    Ok(format!(
        "replayed {} file(s) as {format} in {secs:.2}s: {} records, {} datapoints, {} log events, {} control messages dropped, {} dead letters ({rate:.0} rows/s)",
        files.len(),
        stats.records,
        stats.datapoints,
        stats.log_events,
        stats.control_messages,
        stats.dead_letters,
    ))
}

/// The aggregate stage for a batch command (replay, backfill) on the data directory:
/// commits come from the row limit and the final flush, not a timer, and nothing is
/// compacted (`fleetlake compact` does, afterwards).
pub(crate) async fn open_for_batch(config: &Config) -> anyhow::Result<Aggregator> {
    Aggregator::open(AggregateConfig {
        flush_interval: Duration::from_secs(3600),
        compaction: None,
        rollup_interval: None,
        ..config.aggregate_config()?
    })
    .await
    .context("opening the data directory")
}

/// Writes one piece, waiting while the hot buffer is full (a flush is under way).
async fn write(aggregator: &Aggregator, rows: Vec<(Table, RecordBatch)>) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    loop {
        match aggregator.write(rows.clone()).await {
            Ok(()) => return Ok(()),
            Err(SinkError::Overloaded(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e @ SinkError::Unavailable(_)) => return Err(e.into()),
        }
    }
}

/// Counts the bytes read from the file (before decompression), for the progress bar.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A file's content, decompressed if gzip, with a count of the file bytes read.
struct Input {
    reader: Box<dyn Read + Send>,
    read: Arc<AtomicU64>,
}

impl Input {
    fn read_so_far(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }
}

fn open_input(path: &Path) -> anyhow::Result<Input> {
    let mut file = File::open(path)?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic)?;
    let read = Arc::new(AtomicU64::new(n as u64));
    let raw = Counting {
        inner: std::io::Cursor::new(magic[..n].to_vec()).chain(file),
        read: Arc::clone(&read),
    };
    let buffered = BufReader::with_capacity(1 << 20, raw);
    let reader: Box<dyn Read + Send> = if magic[..n] == [0x1f, 0x8b] {
        Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::read::MultiGzDecoder::new(buffered),
        ))
    } else {
        Box::new(buffered)
    };
    read.store(0, Ordering::Relaxed);
    Ok(Input { reader, read })
}

/// Whether (decompressed) input starts like a Firehose request body: a JSON object
/// whose first key is one of the envelope's.
fn is_firehose_body(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(&head[..head.len().min(256)]);
    let rest = text.trim_start();
    let Some(rest) = rest.strip_prefix('{') else {
        return false;
    };
    let rest = rest.trim_start();
    ["\"requestId\"", "\"records\"", "\"timestamp\""]
        .iter()
        .any(|key| rest.starts_with(key))
}

fn file_time_ms(path: &Path) -> i64 {
    path.metadata()
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Reads into `buf` until it holds at least `want` bytes or the input ends; returns
/// whether the input ended.
fn fill(reader: &mut dyn Read, buf: &mut Vec<u8>, want: usize) -> std::io::Result<bool> {
    let mut chunk = vec![0u8; 1 << 20];
    while buf.len() < want {
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            return Ok(true);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(false)
}

fn decode_file(
    path: &Path,
    format: Format,
    tx: &mpsc::Sender<Piece>,
) -> anyhow::Result<DecodeStats> {
    let source = format!("replay:{}", path.display());
    let name = path.display().to_string();
    let time_ms = file_time_ms(path);
    let mut input = open_input(path)?;
    let mut decoder = Decoder::new(&source, format, None);
    let mut reported = 0u64;
    let mut send = |decoder: &mut Decoder, counted: u64| -> anyhow::Result<()> {
        let piece = Piece {
            rows: decoder.finish(),
            read_bytes: counted - reported,
        };
        reported = counted;
        tx.blocking_send(piece)
            .map_err(|_| anyhow::anyhow!("the writer stopped"))
    };
    let mut buf = Vec::with_capacity(CHUNK_BYTES * 2);
    let mut ended = fill(&mut input.reader, &mut buf, 4096)?;
    if is_firehose_body(&buf) {
        // A saved request body: at most 64 MiB, decoded whole like a delivery.
        input.reader.read_to_end(&mut buf)?;
        let decoded =
            fleetlake_ingest::firehose::decode_request(&buf, &source, format, None, &name)
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let stats = decoded.stats;
        tx.blocking_send(Piece {
            rows: decoded.rows,
            read_bytes: input.read_so_far(),
        })
        .map_err(|_| anyhow::anyhow!("the writer stopped"))?;
        return Ok(stats);
    }
    // Pieces of whole lines, messages or objects; at the end of the input, a broken
    // tail goes to the decoder, which dead-letters it.
    let whole: fn(&[u8]) -> usize = match format {
        Format::MetricsJson => |buf| buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1),
        Format::Otel1 | Format::Otel07 => fleetlake_ingest::otel::whole_messages_len,
        Format::CloudWatchLogs => fleetlake_ingest::cwlogs::whole_objects_len,
    };
    let (mut lines_before, mut bytes_before) = (0, 0);
    loop {
        if !ended {
            ended = fill(&mut input.reader, &mut buf, CHUNK_BYTES)?;
        }
        let mut cut = if ended { buf.len() } else { whole(&buf) };
        if cut == 0 {
            if ended {
                // The previous piece ended exactly where the input does.
                break;
            }
            if buf.len() < MAX_PIECE_BYTES {
                // One line, message or object longer than a chunk: read on.
                let want = buf.len() + CHUNK_BYTES;
                ended = fill(&mut input.reader, &mut buf, want)?;
                continue;
            }
            // Longer than any record can be: kept (as a dead letter) in pieces.
            cut = buf.len();
        }
        let piece: Vec<u8> = buf.drain(..cut).collect();
        if piece.is_empty() {
            break;
        }
        decoder.set_offsets(lines_before, bytes_before);
        decoder.push_record(&piece, &name, time_ms);
        lines_before += piece.iter().filter(|b| **b == b'\n').count();
        bytes_before += piece.len();
        send(&mut decoder, input.read_so_far())?;
        if ended && buf.is_empty() {
            break;
        }
    }
    Ok(decoder.stats())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Input that ends exactly where a piece does (a whole chunk of whole lines) ends
    /// the file; it once made the reader wait for more input forever.
    #[test]
    fn input_ending_on_a_piece_boundary_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exact.json");
        let line = r#"{"account_id":"111111111111","region":"eu-west-1","namespace":"AWS/Lambda","metric_name":"Errors","dimensions":{},"timestamp":1700000040000,"value":{"count":1.0,"sum":1.0,"max":1.0,"min":1.0},"unit":"Count"}"#;
        let mut text = String::new();
        while text.len() + 2 * (line.len() + 1) <= CHUNK_BYTES {
            text.push_str(line);
            text.push('\n');
        }
        // The last line padded with spaces so the file is exactly one chunk.
        let pad = CHUNK_BYTES - text.len() - line.len() - 1;
        text.push_str(line);
        text.push_str(&" ".repeat(pad));
        text.push('\n');
        assert_eq!(text.len(), CHUNK_BYTES);
        std::fs::write(&path, &text).unwrap();
        let lines = text.lines().count();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (tx, mut rx) = mpsc::channel(1024);
            let stats = decode_file(&path, Format::MetricsJson, &tx);
            drop(tx);
            let mut rows = 0;
            while let Ok(piece) = rx.try_recv() {
                rows += piece.rows.iter().map(|(_, b)| b.num_rows()).sum::<usize>();
            }
            let _ = done_tx.send((stats.map(|s| s.datapoints), rows));
        });
        let (stats, rows) = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("decode_file returns at the end of the input");
        assert_eq!(stats.unwrap(), lines);
        assert_eq!(rows, lines);
    }

    #[test]
    fn firehose_bodies_are_recognised_by_their_first_key() {
        assert!(is_firehose_body(br#" {"requestId":"x","records":[]}"#));
        assert!(is_firehose_body(br#"{ "records": []}"#));
        assert!(!is_firehose_body(br#"{"metric_stream_name":"s"}"#));
        assert!(!is_firehose_body(br#"{"messageType":"DATA_MESSAGE"}"#));
        assert!(!is_firehose_body(b"\x0a\x10"));
    }
}
