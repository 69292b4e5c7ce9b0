//! Stream positions: which Kinesis records each table's lake holds, as shard key →
//! sequence number (or [`SHARD_END`](fleetlake_model::sink::SHARD_END)).
//!
//! Every table's commit carries the positions its rows cover. After a restart a stream
//! resumes from the least position any table committed ([`least_positions`]); a table
//! that held more keeps its own ([`merge_positions`]), so records read again are
//! de-duplicated rather than counted twice.

use std::collections::BTreeMap;

use fleetlake_model::Table;
use fleetlake_model::sink::sequence_le;

/// Shard key → sequence number.
pub type Positions = BTreeMap<String, String>;

/// Per shard key, the least position of all `tables` tables, for the keys every table
/// committed. A key some table lacks (its first commit failed before a crash) is left
/// out: that table holds nothing of the shard, and the position reached is set only
/// by the records read again.
pub fn least_positions(tables: usize, positions: &[(Table, Positions)]) -> Positions {
    let mut least: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (_, found) in positions {
        for (key, seq) in found {
            let entry = least.entry(key.clone()).or_insert((0, seq.clone()));
            entry.0 += 1;
            if sequence_le(seq, &entry.1) {
                entry.1.clone_from(seq);
            }
        }
    }
    least
        .into_iter()
        .filter(|(_, (n, _))| *n == tables)
        .map(|(key, (_, seq))| (key, seq))
        .collect()
}

/// The positions a table commits: what it committed before, advanced to what the
/// flush covers. A table never moves back, so after a restart (when streams resume
/// from the least position of all tables) a table that held more keeps its own.
pub fn merge_positions(committed: &Positions, reached: &Positions) -> Positions {
    let mut merged = committed.clone();
    advance(
        &mut merged,
        reached.iter().map(|(k, v)| (k.clone(), v.clone())),
    );
    merged
}

/// Moves each position of `to` forward in `positions`, never back: a shard read again
/// from an older position (after a failed hand-over) does not move it back.
pub fn advance(positions: &mut Positions, to: impl IntoIterator<Item = (String, String)>) {
    for (key, seq) in to {
        match positions.get(&key) {
            Some(old) if sequence_le(&seq, old) => {}
            _ => {
                positions.insert(key, seq);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetlake_model::sink::SHARD_END;

    fn p(pairs: &[(&str, &str)]) -> Positions {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn least_takes_the_smallest_by_number_not_text() {
        let found = [
            (Table::Metrics, p(&[("s/1", "100"), ("s/2", "9")])),
            (Table::Logs, p(&[("s/1", "99"), ("s/2", "10")])),
            (
                Table::DeadLetters,
                p(&[("s/1", "1000"), ("s/2", SHARD_END)]),
            ),
        ];
        assert_eq!(
            least_positions(3, &found),
            p(&[("s/1", "99"), ("s/2", "9")])
        );
    }

    #[test]
    fn a_shard_some_table_never_committed_is_left_out() {
        let found = [
            (Table::Metrics, p(&[("s/1", "5"), ("s/2", "7")])),
            (Table::Logs, p(&[("s/1", "6")])),
        ];
        assert_eq!(least_positions(2, &found), p(&[("s/1", "5")]));
        // With a third table that committed nothing at all, nothing is resumed from.
        assert_eq!(least_positions(3, &found), Positions::new());
    }

    #[test]
    fn merge_only_moves_forward_and_keeps_other_shards() {
        let committed = p(&[("s/1", "50"), ("s/2", "7"), ("s/3", SHARD_END)]);
        let reached = p(&[("s/1", "49"), ("s/2", "8"), ("s/3", "1"), ("s/4", "1")]);
        assert_eq!(
            merge_positions(&committed, &reached),
            p(&[
                ("s/1", "50"),
                ("s/2", "8"),
                ("s/3", SHARD_END),
                ("s/4", "1")
            ])
        );
        assert_eq!(merge_positions(&committed, &Positions::new()), committed);
    }

    #[test]
    fn a_longer_sequence_number_is_later() {
        let mut at = p(&[("s", "999")]);
        advance(&mut at, [("s".to_string(), "1000".to_string())]);
        assert_eq!(at, p(&[("s", "1000")]));
        advance(
            &mut at,
            [("s".to_string(), "0999".trim_start_matches('0').to_string())],
        );
        assert_eq!(at, p(&[("s", "1000")]));
        advance(&mut at, [("s".to_string(), SHARD_END.to_string())]);
        advance(&mut at, [("s".to_string(), "5".to_string())]);
        assert_eq!(at, p(&[("s", SHARD_END)]));
    }
}
