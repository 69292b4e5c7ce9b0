//! The write-ahead log: what makes a Firehose 200 safe before the lake commit.
//!
//! Segment files `<first sequence>.wal` under one directory hold records
//!
//! ```text
//! [payload length u32 LE][crc32 of seq+payload u32 LE][sequence u64 LE][payload]
//! ```
//!
//! where the payload holds the rows of one write, for one or more tables:
//!
//! ```text
//! [0x02][table count u8] then per table: [table index u8][length u32 LE][Arrow IPC stream]
//! ```
//!
//! (a payload that is a bare Arrow IPC stream, as written before tables other than
//! `metrics` existed, is one `metrics` batch). A
//! single writer thread appends every queued batch, fsyncs once for all of them (group
//! commit) and only then lets their writers go. On open, a torn or corrupt tail of the
//! last segment (a crash mid-append) is detected by its checksum and cut off; a corrupt
//! record anywhere else is an error, never replayed as data.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use fleetlake_model::schema::Table;
use tracing::{info, warn};

const HEADER_LEN: usize = 16;
/// Largest payload a record may declare; anything larger is a corrupt header.
const MAX_PAYLOAD: usize = 1 << 31;

/// Errors of the write-ahead log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Reading or writing a segment failed.
    #[error("write-ahead log {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A record in the middle of the log does not match its checksum.
    #[error("write-ahead log {path} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Byte offset of the bad record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A payload is not a valid Arrow IPC batch.
    #[error("write-ahead log record {seq} is not an Arrow batch: {source}")]
    Payload {
        /// Sequence number of the record.
        seq: u64,
        /// The decoding error.
        #[source]
        source: arrow::error::ArrowError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// First byte of a payload holding rows of several tables.
const ROWS_PAYLOAD: u8 = 0x02;

/// Encodes one batch as an Arrow IPC stream (a bare stream is read back as `metrics`).
pub fn encode_batch(batch: &RecordBatch) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let mut out = Vec::with_capacity(batch.get_array_memory_size() + 1024);
    write_ipc(&mut out, batch)?;
    Ok(out)
}

fn write_ipc(out: &mut Vec<u8>, batch: &RecordBatch) -> Result<(), arrow::error::ArrowError> {
    let mut writer = StreamWriter::try_new(out, &batch.schema())?;
    writer.write(batch)?;
    writer.finish()
}

/// Encodes the rows of one write (batches of several tables) as the payload of a WAL
/// record.
pub fn encode_rows(rows: &[(Table, RecordBatch)]) -> Result<Vec<u8>, arrow::error::ArrowError> {
    let size: usize = rows.iter().map(|(_, b)| b.get_array_memory_size()).sum();
    let mut out = Vec::with_capacity(size + 1024);
    out.push(ROWS_PAYLOAD);
    out.push(u8::try_from(rows.len()).map_err(|_| {
        arrow::error::ArrowError::InvalidArgumentError("too many parts in one write".into())
    })?);
    for (table, batch) in rows {
        out.push(table.index() as u8);
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        write_ipc(&mut out, batch)?;
        let len = u32::try_from(out.len() - at - 4).map_err(|_| {
            arrow::error::ArrowError::InvalidArgumentError(format!(
                "{} rows of {table} encode to over 4 GiB, more than one write can hold",
                batch.num_rows()
            ))
        })?;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    if u32::try_from(out.len()).is_err() {
        return Err(arrow::error::ArrowError::InvalidArgumentError(
            "one write encodes to over 4 GiB, more than a write-ahead log record holds".into(),
        ));
    }
    Ok(out)
}

fn decode_rows(seq: u64, payload: &[u8]) -> Result<Vec<(Table, RecordBatch)>, WalError> {
    let bad = |reason: &str| WalError::Payload {
        seq,
        source: arrow::error::ArrowError::IpcError(reason.to_string()),
    };
    if payload.first() != Some(&ROWS_PAYLOAD) {
        return Ok(vec![(Table::Metrics, decode_batch(seq, payload)?)]);
    }
    let count = *payload.get(1).ok_or_else(|| bad("truncated rows header"))? as usize;
    let mut rest = &payload[2..];
    let mut rows = Vec::with_capacity(count);
    for _ in 0..count {
        if rest.len() < 5 {
            return Err(bad("truncated table header"));
        }
        let table = Table::from_index(rest[0] as usize).ok_or_else(|| bad("unknown table"))?;
        let len = u32::from_le_bytes(rest[1..5].try_into().expect("4 bytes")) as usize;
        let body = rest
            .get(5..5 + len)
            .ok_or_else(|| bad("truncated table rows"))?;
        rows.push((table, decode_batch(seq, body)?));
        rest = &rest[5 + len..];
    }
    Ok(rows)
}

fn decode_batch(seq: u64, payload: &[u8]) -> Result<RecordBatch, WalError> {
    let payload_err = |source| WalError::Payload { seq, source };
    let mut reader = StreamReader::try_new(payload, None).map_err(payload_err)?;
    match reader.next() {
        Some(batch) => batch.map_err(payload_err),
        None => Err(payload_err(arrow::error::ArrowError::IpcError(
            "empty stream".into(),
        ))),
    }
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.wal"))
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>, WalError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().and_then(|e| e.to_str()) != Some("wal") {
            continue;
        }
        if let Ok(first_seq) = stem.parse::<u64>() {
            segments.push(Segment { first_seq, path });
        }
    }
    segments.sort_by_key(|s| s.first_seq);
    Ok(segments)
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// One record read back from the log.
#[derive(Debug)]
pub struct Replayed {
    /// Its sequence number.
    pub seq: u64,
    /// Its rows, per table.
    pub rows: Vec<(Table, RecordBatch)>,
}

/// The append side of the log. Not thread-safe by itself: the aggregate stage owns it
/// from its one writer thread.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    sealed: Vec<Segment>,
    active: Segment,
    file: File,
    active_len: u64,
    next_seq: u64,
    /// Length the active segment must be cut back to before the next append: a write
    /// or fsync failed after that point and the cut itself has not succeeded yet.
    pending_cut: Option<u64>,
}

/// Where the log ended at some moment (see [`Wal::mark`] and [`Wal::rollback`]).
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    first_seq: u64,
    len: u64,
}

impl Wal {
    /// Opens (or creates) the log in `dir`, returning it with every record whose sequence
    /// number is greater than `after`, in order. Sequence numbers continue after the
    /// largest one found (or after `after`, whichever is larger).
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        after: u64,
    ) -> Result<(Self, Vec<Replayed>), WalError> {
        Self::open_continuing(dir, segment_bytes, after, after)
    }

    /// As [`Wal::open`], but sequence numbers continue after `continue_after` if that
    /// is larger than every sequence found: with several tables, the log is replayed
    /// after the least committed sequence and continues after the greatest, so a new
    /// record is never taken for one a table already committed.
    pub fn open_continuing(
        dir: &Path,
        segment_bytes: u64,
        after: u64,
        continue_after: u64,
    ) -> Result<(Self, Vec<Replayed>), WalError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut segments = list_segments(dir)?;
        let mut replayed = Vec::new();
        let mut last_seq = after;
        let count = segments.len();
        for (index, segment) in segments.iter().enumerate() {
            let is_last = index + 1 == count;
            let valid_len = read_segment(segment, is_last, after, &mut replayed, &mut last_seq)?;
            if is_last {
                let len = fs::metadata(&segment.path)
                    .map_err(io_err(&segment.path))?
                    .len();
                if valid_len < len {
                    warn!(
                        path = %segment.path.display(),
                        valid_len,
                        cut = len - valid_len,
                        "cutting torn tail of write-ahead log"
                    );
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&segment.path)
                        .map_err(io_err(&segment.path))?;
                    f.set_len(valid_len).map_err(io_err(&segment.path))?;
                    f.sync_all().map_err(io_err(&segment.path))?;
                }
            }
        }
        let next_seq = last_seq.max(continue_after) + 1;
        // Always start a fresh segment: the tail of an old one may sit after a cut.
        let active = Segment {
            first_seq: next_seq,
            path: segment_path(dir, next_seq),
        };
        if let Some(pos) = segments.iter().position(|s| s.first_seq == next_seq) {
            // An empty segment left by a previous run with the same first sequence.
            let stale = segments.remove(pos);
            fs::remove_file(&stale.path).map_err(io_err(&stale.path))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&active.path)
            .map_err(io_err(&active.path))?;
        sync_dir(dir)?;
        if !replayed.is_empty() {
            info!(records = replayed.len(), after, "replaying write-ahead log");
        }
        Ok((
            Self {
                dir: dir.to_path_buf(),
                segment_bytes,
                sealed: segments,
                active,
                file,
                active_len: 0,
                next_seq,
                pending_cut: None,
            },
            replayed,
        ))
    }

    /// Appends one record without syncing; returns its sequence number.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, WalError> {
        self.apply_cut()?;
        if self.active_len >= self.segment_bytes {
            self.rotate()?;
        }
        let seq = self.next_seq;
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&seq.to_le_bytes());
        crc.update(payload);
        header[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
        header[8..16].copy_from_slice(&seq.to_le_bytes());
        let path = &self.active.path;
        self.file.write_all(&header).map_err(io_err(path))?;
        self.file.write_all(payload).map_err(io_err(path))?;
        self.active_len += (HEADER_LEN + payload.len()) as u64;
        self.next_seq += 1;
        Ok(seq)
    }

    /// Makes every appended record durable.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.file.sync_data().map_err(io_err(&self.active.path))
    }

    /// Where the log ends now, for a later [`Wal::rollback`].
    pub fn mark(&self) -> Mark {
        Mark {
            first_seq: self.active.first_seq,
            len: self.active_len,
        }
    }

    /// Cuts everything appended after `mark` off the active segment: records of a group
    /// whose write or fsync failed (a full disk, an I/O error) were never acknowledged,
    /// and a partial record must not sit in front of later ones, where replay would
    /// take it for corruption. Sequence numbers are not reused (a gap is harmless).
    /// If the cut fails too, it is retried before the next append, which fails until
    /// it succeeds.
    pub fn rollback(&mut self, mark: Mark) -> Result<(), WalError> {
        // A rotation during the group sealed the marked segment, synced and whole;
        // the records after it are all in the new active one.
        let len = if self.active.first_seq == mark.first_seq {
            mark.len
        } else {
            0
        };
        self.pending_cut = Some(len);
        self.apply_cut()
    }

    fn apply_cut(&mut self) -> Result<(), WalError> {
        if let Some(len) = self.pending_cut {
            self.file.set_len(len).map_err(io_err(&self.active.path))?;
            self.active_len = len;
            self.pending_cut = None;
        }
        Ok(())
    }

    /// Sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn rotate(&mut self) -> Result<(), WalError> {
        self.sync()?;
        let next = Segment {
            first_seq: self.next_seq,
            path: segment_path(&self.dir, self.next_seq),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&next.path)
            .map_err(io_err(&next.path))?;
        sync_dir(&self.dir)?;
        self.sealed.push(std::mem::replace(&mut self.active, next));
        self.file = file;
        self.active_len = 0;
        Ok(())
    }

    /// Deletes sealed segments all of whose records have sequence numbers `<= seq`
    /// (they are committed to the lake). Rotates first if the active segment is
    /// entirely committed, so a quiet log does not keep old data around.
    pub fn remove_through(&mut self, seq: u64) -> Result<usize, WalError> {
        if self.active_len > 0 && self.next_seq <= seq + 1 {
            self.rotate()?;
        }
        let mut removed = 0;
        while !self.sealed.is_empty() {
            let next_first = self
                .sealed
                .get(1)
                .map_or(self.active.first_seq, |s| s.first_seq);
            if next_first > seq + 1 {
                break;
            }
            let segment = self.sealed.remove(0);
            fs::remove_file(&segment.path).map_err(io_err(&segment.path))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }
}

/// Reads one segment, pushing records after `after`; returns the length of its valid
/// prefix. A bad record ends a last segment (torn tail) and fails any other.
fn read_segment(
    segment: &Segment,
    is_last: bool,
    after: u64,
    out: &mut Vec<Replayed>,
    last_seq: &mut u64,
) -> Result<u64, WalError> {
    let path = &segment.path;
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut offset = 0u64;
    let mut payload = Vec::new();
    loop {
        if offset == len {
            return Ok(offset);
        }
        let bad = |reason: String| -> Result<u64, WalError> {
            if is_last {
                Ok(offset)
            } else {
                Err(WalError::Corrupt {
                    path: path.clone(),
                    offset,
                    reason,
                })
            }
        };
        let mut header = [0u8; HEADER_LEN];
        if len - offset < HEADER_LEN as u64 {
            return bad("truncated record header".into());
        }
        reader.read_exact(&mut header).map_err(io_err(path))?;
        let payload_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if payload_len > MAX_PAYLOAD || len - offset - (HEADER_LEN as u64) < payload_len as u64 {
            return bad(format!("record of {payload_len} bytes runs past the end"));
        }
        payload.resize(payload_len, 0);
        reader.read_exact(&mut payload).map_err(io_err(path))?;
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&seq.to_le_bytes());
        hasher.update(&payload);
        if hasher.finalize() != crc {
            return bad("checksum mismatch".into());
        }
        if seq > after {
            out.push(Replayed {
                seq,
                rows: decode_rows(seq, &payload)?,
            });
        }
        *last_seq = (*last_seq).max(seq);
        offset += (HEADER_LEN + payload_len) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn batch(v: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![v]))]).unwrap()
    }

    fn values(records: &[Replayed]) -> Vec<(u64, i64)> {
        records
            .iter()
            .map(|r| {
                let col = r.rows[0]
                    .1
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap();
                (r.seq, col.value(0))
            })
            .collect()
    }

    #[test]
    fn replays_after_the_committed_sequence_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, replayed) = Wal::open(dir.path(), 100, 0).unwrap();
        assert!(replayed.is_empty());
        for v in 1..=5 {
            wal.append(&encode_batch(&batch(v)).unwrap()).unwrap();
        }
        wal.sync().unwrap();
        drop(wal);
        let (wal, replayed) = Wal::open(dir.path(), 100, 2).unwrap();
        assert_eq!(values(&replayed), vec![(3, 3), (4, 4), (5, 5)]);
        assert_eq!(wal.next_seq(), 6);
        assert!(
            list_segments(dir.path()).unwrap().len() > 2,
            "small segments rotate"
        );
    }

    #[test]
    fn torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        wal.append(&encode_batch(&batch(1)).unwrap()).unwrap();
        wal.append(&encode_batch(&batch(2)).unwrap()).unwrap();
        wal.sync().unwrap();
        let path = wal.active.path.clone();
        drop(wal);
        // Tear the last record: drop its final bytes, then garbage after a good record.
        let len = fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let (mut wal, replayed) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(values(&replayed), vec![(1, 1)]);
        assert_eq!(wal.next_seq(), 2);
        wal.append(&encode_batch(&batch(20)).unwrap()).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, replayed) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(values(&replayed), vec![(1, 1), (2, 20)]);
    }

    /// Appends record 1, then a group that failed half-way (record 2 whole, then part
    /// of the next: what a full disk leaves), cuts it back, appends record 3; returns
    /// the log's directory and the active segment's length right after the cut.
    fn failed_group_then_record(segment_bytes: u64) -> (tempfile::TempDir, u64) {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), segment_bytes, 0).unwrap();
        wal.append(&encode_batch(&batch(1)).unwrap()).unwrap();
        wal.sync().unwrap();
        let mark = wal.mark();
        wal.append(&encode_batch(&batch(2)).unwrap()).unwrap();
        wal.file.write_all(&[7u8; 11]).unwrap();
        wal.rollback(mark).unwrap();
        let cut_len = fs::metadata(&wal.active.path).unwrap().len();
        wal.append(&encode_batch(&batch(3)).unwrap()).unwrap();
        wal.sync().unwrap();
        (dir, cut_len)
    }

    #[test]
    fn a_failed_group_is_cut_so_later_records_replay() {
        let (dir, _) = failed_group_then_record(1 << 20);
        let (_, replayed) = Wal::open(dir.path(), 1 << 20, 0).unwrap();
        assert_eq!(values(&replayed), vec![(1, 1), (3, 3)]);
    }

    #[test]
    fn a_failed_group_across_a_rotation_is_cut_from_the_new_segment() {
        // Every record fills a segment: each append after the first rotates.
        let (dir, cut_len) = failed_group_then_record(10);
        assert_eq!(cut_len, 0);
        let (_, replayed) = Wal::open(dir.path(), 10, 0).unwrap();
        assert_eq!(values(&replayed), vec![(1, 1), (3, 3)]);
    }

    #[test]
    fn flipped_bit_in_a_sealed_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 10, 0).unwrap();
        for v in 1..=3 {
            wal.append(&encode_batch(&batch(v)).unwrap()).unwrap();
        }
        wal.sync().unwrap();
        drop(wal);
        let first = &list_segments(dir.path()).unwrap()[0];
        let mut bytes = fs::read(&first.path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&first.path, bytes).unwrap();
        let err = Wal::open(dir.path(), 10, 0).unwrap_err();
        assert!(matches!(err, WalError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn committed_segments_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), 10, 0).unwrap();
        for v in 1..=4 {
            wal.append(&encode_batch(&batch(v)).unwrap()).unwrap();
        }
        wal.sync().unwrap();
        wal.remove_through(2).unwrap();
        drop(wal);
        let (_, replayed) = Wal::open(dir.path(), 10, 2).unwrap();
        assert_eq!(values(&replayed), vec![(3, 3), (4, 4)]);
        let (mut wal, _) = Wal::open(dir.path(), 10, 4).unwrap();
        wal.remove_through(4).unwrap();
        let left: Vec<_> = list_segments(dir.path()).unwrap();
        assert_eq!(
            left.len(),
            1,
            "only the empty active segment stays: {left:?}"
        );
    }
}
