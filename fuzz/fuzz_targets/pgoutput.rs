//! The pgoutput decoder reads bytes from the replication connection: any
//! bytes must decode or give an error, never a panic, and no count or length
//! in them may size an allocation beyond the input.
//!
//! A decoded `Relation` is also used to turn a row into JSON both ways
//! capture can (map and streaming writer), with each column's value being
//! its own name, so the fuzzer controls the text each type's conversion
//! sees; the two must agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::capture::pgoutput::{
    PgOutputMessage, Tuple, TupleValue, decode, tuple_to_json, write_tuple_json,
};

fuzz_target!(|data: &[u8]| {
    let Ok(message) = decode(data) else {
        return;
    };
    let PgOutputMessage::Relation(relation) = message else {
        return;
    };
    let tuple = Tuple(
        relation
            .columns
            .iter()
            .enumerate()
            .map(|(index, column)| match index % 5 {
                3 => TupleValue::Null,
                4 => TupleValue::UnchangedToast,
                _ => TupleValue::Text(column.name.as_bytes().to_vec()),
            })
            .collect(),
    );
    let map = tuple_to_json(&relation, &tuple, "__toast");
    let mut written = Vec::new();
    let streamed = write_tuple_json(&relation, &tuple, "__toast", &mut written);
    assert_eq!(map.is_ok(), streamed.is_ok(), "{map:?} vs {streamed:?}");
    let mut names: Vec<&str> = relation.columns.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    // Postgres never sends two columns of one name; only then must the
    // streamed text equal the map's.
    if let Ok(map) = map
        && names.len() == relation.columns.len()
    {
        assert_eq!(serde_json::to_vec(&map).unwrap(), written);
    }
});
