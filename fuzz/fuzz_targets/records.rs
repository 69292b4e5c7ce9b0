//! Each record decoder (Metric Streams JSON, OpenTelemetry 1.0 and 0.7, CloudWatch Logs
//! gzip payloads) on any bytes as one record's data: undecodable input becomes dead
//! letters, never a panic, and the rows built have their table's schema.
#![no_main]

use fleetlake_ingest::Format;
use fleetlake_ingest::decode::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, record)) = data.split_first() else {
        return;
    };
    let format = Format::ALL[selector as usize % Format::ALL.len()];
    let mut decoder = Decoder::new("fuzz", format, Some("us-east-1"));
    decoder.push_record(record, "fuzz record", 1_700_000_000_000);
    for (table, batch) in decoder.finish() {
        assert_eq!(batch.schema(), table.schema());
    }
});
