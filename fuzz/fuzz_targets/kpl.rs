//! KPL de-aggregation of Kinesis records: any bytes, and any bytes wrapped as an
//! aggregate (magic prefix, MD5 trailer) so the protobuf decoder behind the checksum is
//! reached, give the record itself or its user records, never a panic.
#![no_main]

use fleetlake_ingest::kpl::{MAGIC, deaggregate};
use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};

fuzz_target!(|data: &[u8]| {
    let plain = deaggregate(data).into_records();
    assert!(!plain.is_empty());
    let mut wrapped = MAGIC.to_vec();
    wrapped.extend_from_slice(data);
    wrapped.extend_from_slice(&Md5::digest(data));
    for (index, record) in deaggregate(&wrapped).into_records().iter().enumerate() {
        assert_eq!(record.sub_sequence, index as u64);
    }
});
