//! Decoders against payloads made by real producer libraries (the fixtures under
//! `tests/fixtures/formats/`, made by `make_fixtures.py` there), as snapshots of the
//! decoded rows; and property tests that no decoder panics on arbitrary bytes.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use arrow::util::pretty::pretty_format_batches;
use proptest::prelude::*;

use crate::decode::{Decoder, Format};
use crate::kpl::{self, Deaggregated};
use fleetlake_model::schema::Table;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../tests/fixtures/formats/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Decodes `records` (each one record) and renders every table's rows as text.
fn decode(format: Format, region: Option<&str>, records: &[Vec<u8>]) -> (Decoder, String) {
    let mut decoder = Decoder::new("fixture", format, region);
    for (i, record) in records.iter().enumerate() {
        decoder.push_kinesis_record(record, &format!("record {i}"), 1_764_000_000_000);
    }
    let rows = decoder.finish();
    let mut text = String::new();
    for (table, batch) in &rows {
        text.push_str(&format!("{table}:\n{}\n", render(batch)));
    }
    (decoder, text)
}

fn render(batch: &RecordBatch) -> String {
    // Pretty printing knows offsets, not zone names: show UTC as +00:00.
    let columns = batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Timestamp(unit, Some(_)) => {
                cast(c, &DataType::Timestamp(*unit, Some("+00:00".into()))).expect("cast")
            }
            _ => c.clone(),
        })
        .collect();
    let batch = RecordBatch::try_new_with_options(
        Arc::new(Schema::new(
            batch
                .schema()
                .fields()
                .iter()
                .zip(&columns)
                .map(|(f, c): (_, &ArrayRef)| {
                    f.as_ref().clone().with_data_type(c.data_type().clone())
                })
                .collect::<Vec<_>>(),
        )),
        columns,
        &Default::default(),
    )
    .expect("same shape");
    pretty_format_batches(std::slice::from_ref(&batch))
        .expect("renders")
        .to_string()
}

#[test]
fn otel_1_0_from_opentelemetry_proto() {
    let (decoder, text) = decode(Format::Otel1, None, &[fixture("otel10.bin")]);
    let stats = decoder.stats();
    assert_eq!(stats.datapoints, 4);
    assert_eq!(stats.dead_letters, 0);
    insta::assert_snapshot!(text);
}

#[test]
fn otel_0_7_gives_the_same_rows_as_1_0() {
    let (decoder, text07) = decode(Format::Otel07, None, &[fixture("otel07.bin")]);
    assert_eq!(decoder.stats().datapoints, 4);
    let (_, text10) = decode(Format::Otel1, None, &[fixture("otel10.bin")]);
    assert_eq!(text07, text10);
}

#[test]
fn otel_with_the_wrong_version_loses_dimensions_not_datapoints() {
    // Field 1 vs 7 is the only difference on the wire: the version is configuration.
    let (decoder, text) = decode(Format::Otel07, None, &[fixture("otel10.bin")]);
    assert_eq!(decoder.stats().datapoints, 4);
    assert!(!text.contains("FunctionName"), "{text}");
}

#[test]
fn cloudwatch_logs_documented_example() {
    let (decoder, text) = decode(
        Format::CloudWatchLogs,
        Some("us-east-1"),
        &[fixture("cwlogs_data.json.gz")],
    );
    assert_eq!(decoder.stats().log_events, 3);
    insta::assert_snapshot!(text);
}

#[test]
fn cloudwatch_logs_members_objects_control_and_account_policy() {
    let (decoder, text) = decode(
        Format::CloudWatchLogs,
        Some("eu-central-1"),
        &[
            fixture("cwlogs_control.json.gz"),
            fixture("cwlogs_two_members.gz"),
            fixture("cwlogs_two_objects.json.gz"),
            fixture("cwlogs_account_policy.json.gz"),
        ],
    );
    let stats = decoder.stats();
    assert_eq!(stats.control_messages, 2);
    assert_eq!(stats.log_events, 3 + 1 + 2);
    assert_eq!(stats.dead_letters, 0);
    insta::assert_snapshot!(text);
}

#[test]
fn kpl_aggregate_from_aws_kinesis_agg() {
    let data = fixture("kpl_metrics.bin");
    let Deaggregated::Aggregated(records) = kpl::deaggregate(&data) else {
        panic!("not recognised as an aggregate");
    };
    let keys: Vec<_> = records
        .iter()
        .map(|r| (r.sub_sequence, r.partition_key.clone().unwrap_or_default()))
        .collect();
    assert_eq!(
        keys,
        vec![(0, "pk-a".into()), (1, "pk-b".into()), (2, "pk-a".into())]
    );
    let (decoder, text) = decode(Format::MetricsJson, None, &[data]);
    assert_eq!(decoder.stats().datapoints, 3);
    insta::assert_snapshot!(text);
}

#[test]
fn kpl_bad_md5_and_plain_records_pass_through() {
    let bad = fixture("kpl_bad_md5.bin");
    assert_eq!(kpl::deaggregate(&bad), Deaggregated::Plain(&bad));
    let plain = fixture("kpl_plain.bin");
    assert_eq!(kpl::deaggregate(&plain), Deaggregated::Plain(&plain));
    let (decoder, _) = decode(Format::MetricsJson, None, &[plain]);
    assert_eq!(decoder.stats().datapoints, 1);
    // A corrupt aggregate is an undecodable plain record: its bytes are dead letters
    // (one per line of binary), nothing is decoded from it and nothing is lost.
    let (decoder, text) = decode(Format::MetricsJson, None, std::slice::from_ref(&bad));
    assert_eq!(decoder.stats().datapoints, 0);
    assert!(decoder.stats().dead_letters >= 1);
    assert!(text.starts_with("dead_letters:"), "{text}");
}

#[test]
fn dead_letters_keep_the_undecodable_otel_message() {
    let mut record = fixture("otel10.bin");
    // Corrupt the first byte of the second message (474 bytes, the last in the file).
    let second = record.len() - 474;
    record[second] = 0xff;
    let mut decoder = Decoder::new("fixture", Format::Otel1, None);
    decoder.push_record(&record, "file f", 0);
    assert_eq!(decoder.stats().datapoints, 3);
    assert_eq!(decoder.stats().dead_letters, 1);
    let rows = decoder.finish();
    assert_eq!(rows[1].0, Table::DeadLetters);
}

fn decode_all_formats(bytes: &[u8]) {
    for format in Format::ALL {
        let mut decoder = Decoder::new("prop", format, None);
        decoder.push_kinesis_record(bytes, "p", 0);
        decoder.push_record(bytes, "p", i64::MAX);
        let stats = decoder.stats();
        let rows = decoder.finish();
        let total: usize = rows.iter().map(|(_, b)| b.num_rows()).sum();
        assert_eq!(
            total,
            stats.datapoints + stats.log_events + stats.dead_letters
        );
    }
    let _ = crate::firehose::decode_request(bytes, "prop", Format::MetricsJson, None, "h");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn no_decoder_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all_formats(&bytes);
    }

    #[test]
    fn no_decoder_panics_on_mutated_fixtures(
        which in 0usize..6,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let name = ["otel10.bin", "otel07.bin", "kpl_metrics.bin", "cwlogs_data.json.gz",
                    "cwlogs_two_members.gz", "cwlogs_account_policy.json.gz"][which];
        let mut bytes = fixture(name);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        let keep = cut.index(bytes.len() + 1);
        bytes.truncate(keep.max(bytes.len() / 2));
        decode_all_formats(&bytes);
    }
}
