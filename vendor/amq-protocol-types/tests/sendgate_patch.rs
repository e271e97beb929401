//! What the sendgate patch (`sendgate.patch`, `UPSTREAM.md`) changes: two
//! inputs RabbitMQ accepts from any publisher parse instead of failing the
//! frame. Unpatched, both tests fail: the first with a UTF-8 error, the
//! second with a stack overflow.

use amq_protocol_types::{
    parsing::{parse_field_table, parse_short_string},
    *,
};

/// A short string as on the wire: its length byte, then its bytes.
fn short(bytes: &[u8]) -> Vec<u8> {
    let mut wire = vec![u8::try_from(bytes.len()).expect("a short string")];
    wire.extend_from_slice(bytes);
    wire
}

#[test]
fn a_short_string_that_is_not_utf8_reads_lossily_within_255_bytes() {
    // "é" cut after its first byte, as a key cut at 255 bytes would be.
    let wire = short(b"key-\xc3");
    let (rest, read) = parse_short_string(wire.as_slice()).expect("parses");
    assert!(rest.is_empty());
    assert_eq!(read.as_str(), "key-\u{fffd}");

    // 255 bad bytes become 255 / 3 replacement characters, not 765 bytes.
    let wire = short(&[0xff; 255]);
    let (_, read) = parse_short_string(wire.as_slice()).expect("parses");
    assert!(read.as_str().len() <= 255);
    assert!(read.as_str().chars().all(|c| c == '\u{fffd}'));
}

#[test]
fn a_table_nested_deeper_than_32_levels_is_skipped_not_recursed() {
    // 10,000 tables, each the only value of the one above it.
    let mut table: Vec<u8> = 0u32.to_be_bytes().to_vec();
    for _ in 0..10_000 {
        let mut entry = short(b"t");
        entry.push(b'F');
        entry.extend_from_slice(&table);
        let mut outer = u32::try_from(entry.len()).expect("fits").to_be_bytes().to_vec();
        outer.extend_from_slice(&entry);
        table = outer;
    }
    let (rest, read) = parse_field_table(table.as_slice()).expect("parses");
    assert!(rest.is_empty());

    let mut depth = 0;
    let mut level = read;
    while let Some(AMQPValue::FieldTable(inner)) = level.inner().get("t").cloned() {
        depth += 1;
        level = inner;
    }
    assert_eq!(depth, 32, "the levels past 32 read as one empty table");
}
