//! De-aggregation of Kinesis Producer Library (KPL) aggregated records
//! (`formats.md` §5), the layer every Kinesis-delivered record goes through.
//!
//! ```text
//! [0xF3 0x89 0x9A 0xC2][protobuf AggregatedRecord][16-byte MD5 of the protobuf bytes]
//! ```
//!
//! As the KCL does, a record that is too short, has other magic bytes, a wrong MD5 or
//! a protobuf that does not parse passes through unchanged as one plain user record.
//! Each user record keeps the outer sequence number and gets a sub-sequence number,
//! its index in the aggregate.

use md5::{Digest, Md5};
use prost::Message;

/// The four bytes that start a KPL aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_LEN: usize = 16;

#[derive(Clone, PartialEq, prost::Message)]
struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    records: Vec<Record>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Record {
    #[prost(uint64, required, tag = "1")]
    partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    data: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Tag {
    #[prost(string, required, tag = "1")]
    key: String,
    #[prost(string, optional, tag = "2")]
    value: Option<String>,
}

/// One user record of a Kinesis record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Its index inside the aggregate (0 for a plain record).
    pub sub_sequence: u64,
    /// Its partition key, if it came from an aggregate (a plain record's partition key
    /// is the Kinesis record's own).
    pub partition_key: Option<String>,
    /// Its data.
    pub data: Vec<u8>,
}

/// How a Kinesis record was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deaggregated<'a> {
    /// Not an aggregate (or an invalid one, which the KCL also passes through): the
    /// record's bytes are the one user record.
    Plain(&'a [u8]),
    /// A valid aggregate and its user records, in order.
    Aggregated(Vec<UserRecord>),
}

impl Deaggregated<'_> {
    /// The user records, a plain record being the only one with sub-sequence 0.
    pub fn into_records(self) -> Vec<UserRecord> {
        match self {
            Deaggregated::Plain(data) => vec![UserRecord {
                sub_sequence: 0,
                partition_key: None,
                data: data.to_vec(),
            }],
            Deaggregated::Aggregated(records) => records,
        }
    }
}

/// Splits a Kinesis record into its user records (see the module docs).
pub fn deaggregate(data: &[u8]) -> Deaggregated<'_> {
    if data.len() < MAGIC.len() + DIGEST_LEN || data[..MAGIC.len()] != MAGIC {
        return Deaggregated::Plain(data);
    }
    let body = &data[MAGIC.len()..data.len() - DIGEST_LEN];
    let digest = &data[data.len() - DIGEST_LEN..];
    if Md5::digest(body).as_slice() != digest {
        return Deaggregated::Plain(data);
    }
    let Ok(aggregate) = AggregatedRecord::decode(body) else {
        return Deaggregated::Plain(data);
    };
    let records = aggregate
        .records
        .into_iter()
        .enumerate()
        .map(|(index, record)| UserRecord {
            sub_sequence: index as u64,
            partition_key: aggregate
                .partition_key_table
                .get(record.partition_key_index as usize)
                .cloned(),
            data: record.data,
        })
        .collect();
    Deaggregated::Aggregated(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aggregate(records: &[(&str, &[u8])]) -> Vec<u8> {
        let agg = AggregatedRecord {
            partition_key_table: records.iter().map(|(pk, _)| pk.to_string()).collect(),
            explicit_hash_key_table: vec![],
            records: records
                .iter()
                .enumerate()
                .map(|(i, (_, data))| Record {
                    partition_key_index: i as u64,
                    explicit_hash_key_index: None,
                    data: data.to_vec(),
                    tags: vec![],
                })
                .collect(),
        };
        let body = agg.encode_to_vec();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&body);
        out.extend_from_slice(&Md5::digest(&body));
        out
    }

    #[test]
    fn splits_an_aggregate() {
        let data = aggregate(&[("a", b"one"), ("b", b"two")]);
        let Deaggregated::Aggregated(records) = deaggregate(&data) else {
            panic!("not de-aggregated");
        };
        assert_eq!(records.len(), 2);
        assert_eq!(records[1].sub_sequence, 1);
        assert_eq!(records[1].partition_key.as_deref(), Some("b"));
        assert_eq!(records[1].data, b"two");
    }

    #[test]
    fn invalid_aggregates_pass_through() {
        let mut data = aggregate(&[("a", b"one")]);
        let last = data.len() - 1;
        data[last] ^= 1;
        assert_eq!(deaggregate(&data), Deaggregated::Plain(&data));
        assert_eq!(deaggregate(b"short"), Deaggregated::Plain(b"short"));
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&[0xff; 4]);
        garbage.extend_from_slice(&Md5::digest([0xffu8; 4]));
        assert_eq!(deaggregate(&garbage), Deaggregated::Plain(&garbage));
    }
}
