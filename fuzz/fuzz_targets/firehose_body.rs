//! The Firehose HTTP body parser: any bytes as a (decompressed) request body, for each
//! record format. It must answer with an error or decoded rows, never panic, and every
//! row must have its table's schema.
#![no_main]

use fleetlake_ingest::Format;
use fleetlake_ingest::firehose::decode_request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let format = Format::ALL[selector as usize % Format::ALL.len()];
    if let Ok(decoded) = decode_request(body, "fuzz", format, Some("us-east-1"), "header-id") {
        for (table, batch) in &decoded.rows {
            assert_eq!(batch.schema(), table.schema());
        }
        assert!(decoded.stats.dead_letters <= decoded.rows.iter().map(|(_, b)| b.num_rows()).sum());
    }
});
