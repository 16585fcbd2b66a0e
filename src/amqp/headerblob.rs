//! Headers a stream keeps as they are.
//!
//! The dead-letter store is a RabbitMQ stream, which stores messages in
//! AMQP 1.0 form. RabbitMQ 3.10 converts an AMQP 0-9-1 publisher's headers
//! into application properties, which hold only simple values: arrays and
//! tables (`x-death`, `x-imattr-failed-accounts`) are dropped, and a decimal
//! closes the publisher's connection. So before a copy goes to the store,
//! every header that is not a boolean, an integer or a UTF-8 string moves
//! into one JSON text header, [`H_HEADERS`]; readers put them back.

use lapin::types::{AMQPValue, FieldTable, LongString};

/// The header holding, as JSON, the headers a stream would not keep.
pub const H_HEADERS: &str = "x-imattr-headers";

/// Whether a stream keeps this value as it is.
fn simple(v: &AMQPValue) -> bool {
    match v {
        AMQPValue::Boolean(_)
        | AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortShortUInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::ShortUInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongUInt(_)
        | AMQPValue::LongLongInt(_)
        | AMQPValue::ShortString(_) => true,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).is_ok(),
        _ => false,
    }
}

/// The headers to publish into a stream: the simple ones as they are, the
/// others in [`H_HEADERS`] (absent when there are none). A header already
/// named [`H_HEADERS`] (a copy of a copy) is folded in first, so nothing nests.
pub fn for_stream(headers: &FieldTable) -> FieldTable {
    let headers = restore(headers);
    let mut kept = FieldTable::default();
    let mut moved = FieldTable::default();
    for (k, v) in headers.inner() {
        if simple(v) {
            kept.insert(k.clone(), v.clone());
        } else {
            moved.insert(k.clone(), v.clone());
        }
    }
    if !moved.inner().is_empty() {
        // FieldTable's serde form is lossless (every value tagged with its type).
        if let Ok(json) = serde_json::to_string(&moved) {
            kept.insert(
                H_HEADERS.into(),
                AMQPValue::LongString(LongString::from(json)),
            );
        }
    }
    kept
}

/// The headers as they were before [`for_stream`]: [`H_HEADERS`] unfolded
/// (its values win over a header of the same name) and removed. Headers
/// without it come back unchanged; an unreadable one is kept as it is.
pub fn restore(headers: &FieldTable) -> FieldTable {
    let Some(AMQPValue::LongString(blob)) = headers.inner().get(H_HEADERS) else {
        return headers.clone();
    };
    let Ok(moved) = serde_json::from_slice::<FieldTable>(blob.as_bytes()) else {
        return headers.clone();
    };
    let mut out = FieldTable::default();
    for (k, v) in headers.inner() {
        if k.as_str() != H_HEADERS {
            out.insert(k.clone(), v.clone());
        }
    }
    for (k, v) in moved.inner() {
        out.insert(k.clone(), v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, DecimalValue, FieldArray};

    fn sample() -> FieldTable {
        let mut death = FieldTable::default();
        death.insert("reason".into(), AMQPValue::LongString("expired".into()));
        death.insert("count".into(), AMQPValue::LongLongInt(2));
        let mut t = FieldTable::default();
        t.insert("s".into(), AMQPValue::LongString("text".into()));
        t.insert("n".into(), AMQPValue::LongLongInt(-5));
        t.insert("b".into(), AMQPValue::Boolean(true));
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        t.insert(
            "d".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 314,
            }),
        );
        t.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert("f".into(), AMQPValue::Double(0.5));
        t.insert(
            "raw".into(),
            AMQPValue::LongString(LongString::from(vec![0xff, 0x00])),
        );
        t.insert(
            "bytes".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2])),
        );
        t.insert("void".into(), AMQPValue::Void);
        t
    }

    #[test]
    fn only_simple_values_stay_headers() {
        let s = for_stream(&sample());
        let mut names: Vec<&str> = s.inner().keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["b", "n", "s", H_HEADERS]);
    }

    #[test]
    fn restore_gives_back_every_header_with_its_type() {
        assert_eq!(restore(&for_stream(&sample())), sample());
    }

    #[test]
    fn simple_headers_need_no_blob() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::LongString("x".into()));
        let s = for_stream(&t);
        assert_eq!(s, t);
        assert_eq!(restore(&s), t);
    }

    #[test]
    fn a_copy_of_a_copy_does_not_nest() {
        let twice = for_stream(&for_stream(&sample()));
        assert_eq!(twice, for_stream(&sample()));
        assert_eq!(restore(&twice), sample());
    }

    #[test]
    fn an_unreadable_blob_is_kept_as_it_is() {
        let mut t = FieldTable::default();
        t.insert(H_HEADERS.into(), AMQPValue::LongString("{not json".into()));
        assert_eq!(restore(&t), t);
    }
}
