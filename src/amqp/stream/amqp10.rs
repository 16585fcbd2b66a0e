//! The AMQP 1.0 message of a stream entry, read back as the AMQP 0-9-1
//! message RabbitMQ 3.10 converted it from: application-properties are the
//! headers (less `x-basic-type` and `x-basic-app-id`, which are properties),
//! the properties and the `x-basic-*` message annotations are the properties,
//! the data sections the body. Strings are kept as bytes: a 0-9-1 header may
//! hold any.

use lapin::types::{AMQPValue, ByteArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum Amqp10Error {
    #[error("the AMQP 1.0 message ends inside a value")]
    Truncated,
    #[error("unknown AMQP 1.0 type code {0:#04x}")]
    UnknownCode(u8),
    #[error("an AMQP 1.0 section is not a described value (code {0:#04x})")]
    NotASection(u8),
}

/// The 0-9-1 view of an entry.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    pub headers: FieldTable,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

const HEADER: u64 = 0x70;
const MESSAGE_ANNOTATIONS: u64 = 0x72;
const PROPERTIES: u64 = 0x73;
const APPLICATION_PROPERTIES: u64 = 0x74;
const DATA: u64 = 0x75;

/// One AMQP 1.0 value, borrowing its bytes.
#[derive(Debug, Clone, PartialEq)]
enum Value<'a> {
    Null,
    Bool(bool),
    UByte(u8),
    UShort(u16),
    UInt(u32),
    ULong(u64),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    Char(u32),
    TimestampMs(i64),
    Uuid(&'a [u8]),
    Binary(&'a [u8]),
    Str(&'a [u8]),
    Symbol(&'a [u8]),
    /// A list or map: how many values (a map counts keys and values) and their bytes.
    Compound(u32, &'a [u8]),
    /// What this reader has no use for (arrays, decimals, described values).
    Other,
}

struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Amqp10Error> {
        if self.b.len() < n {
            return Err(Amqp10Error::Truncated);
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Amqp10Error> {
        Ok(self.take(1)?[0])
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Amqp10Error> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, Amqp10Error> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn value(&mut self) -> Result<Value<'a>, Amqp10Error> {
        let code = self.u8()?;
        Ok(match code {
            0x00 => {
                self.value()?;
                self.value()?;
                Value::Other
            }
            0x40 => Value::Null,
            0x41 => Value::Bool(true),
            0x42 => Value::Bool(false),
            0x56 => Value::Bool(self.u8()? != 0),
            0x50 => Value::UByte(self.u8()?),
            0x60 => Value::UShort(u16::from_be_bytes(self.array()?)),
            0x70 => Value::UInt(self.u32()?),
            0x52 => Value::UInt(u32::from(self.u8()?)),
            0x43 => Value::UInt(0),
            0x80 => Value::ULong(u64::from_be_bytes(self.array()?)),
            0x53 => Value::ULong(u64::from(self.u8()?)),
            0x44 => Value::ULong(0),
            0x51 => Value::Byte(self.u8()? as i8),
            0x61 => Value::Short(i16::from_be_bytes(self.array()?)),
            0x71 => Value::Int(i32::from_be_bytes(self.array()?)),
            0x54 => Value::Int(i32::from(self.u8()? as i8)),
            0x81 => Value::Long(i64::from_be_bytes(self.array()?)),
            0x55 => Value::Long(i64::from(self.u8()? as i8)),
            0x72 => Value::Float(f32::from_be_bytes(self.array()?)),
            0x82 => Value::Double(f64::from_be_bytes(self.array()?)),
            0x73 => Value::Char(self.u32()?),
            0x83 => Value::TimestampMs(i64::from_be_bytes(self.array()?)),
            0x98 => Value::Uuid(self.take(16)?),
            0xa0 => {
                let n = self.u8()?;
                Value::Binary(self.take(n.into())?)
            }
            0xb0 => {
                let n = self.u32()?;
                Value::Binary(self.take(n as usize)?)
            }
            0xa1 => {
                let n = self.u8()?;
                Value::Str(self.take(n.into())?)
            }
            0xb1 => {
                let n = self.u32()?;
                Value::Str(self.take(n as usize)?)
            }
            0xa3 => {
                let n = self.u8()?;
                Value::Symbol(self.take(n.into())?)
            }
            0xb3 => {
                let n = self.u32()?;
                Value::Symbol(self.take(n as usize)?)
            }
            0x45 => Value::Compound(0, &[]),
            0xc0 | 0xc1 => {
                let size = usize::from(self.u8()?);
                let body = self.take(size)?;
                let count = *body.first().ok_or(Amqp10Error::Truncated)?;
                Value::Compound(count.into(), &body[1..])
            }
            0xd0 | 0xd1 => {
                let size = self.u32()? as usize;
                let body = self.take(size)?;
                let count = body.get(..4).ok_or(Amqp10Error::Truncated)?;
                let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]);
                Value::Compound(count, &body[4..])
            }
            // Other fixed and variable widths, by the width class of the code's high nibble.
            _ => {
                let skip = match code >> 4 {
                    0x4 => 0,
                    0x5 => 1,
                    0x6 => 2,
                    0x7 => 4,
                    0x8 => 8,
                    0x9 => 16,
                    0xa | 0xc | 0xe => usize::from(self.u8()?),
                    0xb | 0xd | 0xf => self.u32()? as usize,
                    _ => return Err(Amqp10Error::UnknownCode(code)),
                };
                self.take(skip)?;
                Value::Other
            }
        })
    }
}

/// Decodes one entry.
pub fn decode(entry: &[u8]) -> Result<Decoded, Amqp10Error> {
    let mut out = Decoded::default();
    let mut props = BasicProperties::default();
    let mut c = Cursor { b: entry };
    while !c.b.is_empty() {
        let code = c.u8()?;
        if code != 0x00 {
            return Err(Amqp10Error::NotASection(code));
        }
        let descriptor = match c.value()? {
            Value::ULong(d) => d,
            _ => u64::MAX,
        };
        let value = c.value()?;
        match (descriptor, value) {
            (DATA, Value::Binary(b)) => out.body.extend_from_slice(b),
            (HEADER, Value::Compound(n, items)) => {
                let mut items = Cursor { b: items };
                if n > 0 {
                    if let Value::Bool(durable) = items.value()? {
                        if props.delivery_mode().is_none() {
                            props = props.with_delivery_mode(if durable { 2 } else { 1 });
                        }
                    }
                }
            }
            (PROPERTIES, Value::Compound(n, items)) => {
                props = properties(props, n, items)?;
            }
            (MESSAGE_ANNOTATIONS, Value::Compound(n, items)) => {
                let mut items = Cursor { b: items };
                for _ in 0..n / 2 {
                    let key = items.value()?;
                    let value = items.value()?;
                    let Value::Symbol(key) = key else { continue };
                    props = match (key, value) {
                        // The annotation is what 3.10 writes; it wins over a header section.
                        (b"x-basic-delivery-mode", Value::UByte(m)) => props.with_delivery_mode(m),
                        (b"x-basic-priority", Value::UByte(p)) => props.with_priority(p),
                        (b"x-basic-expiration", Value::Str(e)) => match short(e) {
                            Some(e) => props.with_expiration(e),
                            None => props,
                        },
                        _ => props,
                    };
                }
            }
            (APPLICATION_PROPERTIES, Value::Compound(n, items)) => {
                let mut items = Cursor { b: items };
                for _ in 0..n / 2 {
                    let key = items.value()?;
                    let value = items.value()?;
                    let Value::Str(key) = key else { continue };
                    match (key, &value) {
                        (b"x-basic-type", Value::Str(t)) => {
                            if let Some(t) = short(t) {
                                props = props.with_type(t);
                            }
                        }
                        (b"x-basic-app-id", Value::Str(a)) => {
                            if let Some(a) = short(a) {
                                props = props.with_app_id(a);
                            }
                        }
                        _ => {
                            if let (Some(key), Some(value)) = (short(key), header_value(&value)) {
                                out.headers.insert(key, value);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out.properties = props;
    Ok(out)
}

/// The properties list: message-id, user-id, to, subject, reply-to,
/// correlation-id, content-type, content-encoding, absolute-expiry-time,
/// creation-time, then group fields this reader does not map.
fn properties(
    mut props: BasicProperties,
    n: u32,
    items: &[u8],
) -> Result<BasicProperties, Amqp10Error> {
    let mut items = Cursor { b: items };
    for i in 0..n.min(10) {
        let v = items.value()?;
        props = match (i, v) {
            (0, v) => match id_text(&v) {
                Some(id) => props.with_message_id(id),
                None => props,
            },
            (1, Value::Binary(u)) => match short(u) {
                Some(u) => props.with_user_id(u),
                None => props,
            },
            (4, Value::Str(r)) => match short(r) {
                Some(r) => props.with_reply_to(r),
                None => props,
            },
            (5, v) => match id_text(&v) {
                Some(id) => props.with_correlation_id(id),
                None => props,
            },
            (6, Value::Symbol(t)) => match short(t) {
                Some(t) => props.with_content_type(t),
                None => props,
            },
            (7, Value::Symbol(e)) => match short(e) {
                Some(e) => props.with_content_encoding(e),
                None => props,
            },
            // 0-9-1 timestamps are seconds; RabbitMQ multiplied by 1000.
            (9, Value::TimestampMs(ms)) if ms >= 0 => props.with_timestamp((ms / 1000) as u64),
            _ => props,
        };
    }
    Ok(props)
}

/// A message or correlation id as 0-9-1's short string.
fn id_text(v: &Value) -> Option<ShortString> {
    match v {
        Value::Str(s) | Value::Binary(s) => short(s),
        Value::ULong(n) => short(n.to_string().as_bytes()),
        Value::Uuid(u) => {
            let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
            let text = format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            );
            short(text.as_bytes())
        }
        _ => None,
    }
}

/// A 0-9-1 short string (at most 255 bytes, text); None past that.
fn short(bytes: &[u8]) -> Option<ShortString> {
    ShortString::try_new(String::from_utf8_lossy(bytes).into_owned()).ok()
}

/// The 0-9-1 header value RabbitMQ converted to `v` (its `from_091` table
/// read backwards); lists and maps have no counterpart here (3.10 drops
/// array and table headers anyway).
fn header_value(v: &Value) -> Option<AMQPValue> {
    Some(match *v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(b),
        Value::UByte(n) => AMQPValue::ShortShortUInt(n),
        Value::UShort(n) => AMQPValue::ShortUInt(n),
        Value::UInt(n) => AMQPValue::LongUInt(n),
        Value::ULong(n) => match i64::try_from(n) {
            Ok(n) => AMQPValue::LongLongInt(n),
            Err(_) => AMQPValue::LongString(LongString::from(n.to_string())),
        },
        Value::Byte(n) => AMQPValue::ShortShortInt(n),
        Value::Short(n) => AMQPValue::ShortInt(n),
        Value::Int(n) => AMQPValue::LongInt(n),
        Value::Long(n) => AMQPValue::LongLongInt(n),
        Value::Float(x) => AMQPValue::Float(x),
        Value::Double(x) => AMQPValue::Double(x),
        Value::Char(c) => AMQPValue::LongString(LongString::from(
            char::from_u32(c)
                .unwrap_or(char::REPLACEMENT_CHARACTER)
                .to_string(),
        )),
        Value::TimestampMs(ms) => AMQPValue::Timestamp((ms.max(0) / 1000) as u64),
        Value::Uuid(_) => AMQPValue::LongString(LongString::from(id_text(v)?.to_string())),
        Value::Binary(b) => AMQPValue::ByteArray(ByteArray::from(b)),
        Value::Str(s) | Value::Symbol(s) => AMQPValue::LongString(LongString::from(s.to_vec())),
        Value::Compound(..) | Value::Other => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as RabbitMQ 3.10 writes a 0-9-1 message: properties,
    /// application-properties, message-annotations, data.
    fn entry(data_sections: &[&[u8]]) -> Vec<u8> {
        let mut e = Vec::new();
        // properties: message-id "m1", null user-id, to, subject, reply-to,
        // correlation-id "c1", content-type sym "application/json",
        // content-encoding null, absolute-expiry null, creation-time 1700000000123 ms.
        let mut list = vec![10u8];
        list.extend([0xa1, 2, b'm', b'1']);
        list.extend([0x40, 0x40, 0x40, 0x40]);
        list.extend([0xa1, 2, b'c', b'1']);
        list.push(0xa3);
        list.push(16);
        list.extend(b"application/json");
        list.extend([0x40, 0x40]);
        list.push(0x83);
        list.extend(1_700_000_000_123i64.to_be_bytes());
        e.extend([0x00, 0x53, 0x73, 0xc0, list.len() as u8]);
        e.extend(&list);
        // message-annotations: x-basic-delivery-mode 2
        let mut map = vec![2u8, 0xa3, 21];
        map.extend(b"x-basic-delivery-mode");
        map.extend([0x50, 2]);
        e.extend([0x00, 0x53, 0x72, 0xc1, map.len() as u8]);
        e.extend(&map);
        // application-properties: "a" -> utf8 with a non-UTF-8 byte, "n" -> long -5,
        // "b" -> true, "x-basic-type" -> "t".
        let mut map = vec![8u8];
        map.extend([0xa1, 1, b'a', 0xa1, 2, 0xff, b'z']);
        map.extend([0xa1, 1, b'n', 0x55, 0xfb]);
        map.extend([0xa1, 1, b'b', 0x41]);
        map.extend([0xa1, 12]);
        map.extend(b"x-basic-type");
        map.extend([0xa1, 1, b't']);
        e.extend([0x00, 0x53, 0x74, 0xc1, map.len() as u8]);
        e.extend(&map);
        for d in data_sections {
            e.extend([0x00, 0x53, 0x75, 0xb0]);
            e.extend((d.len() as u32).to_be_bytes());
            e.extend(*d);
        }
        e
    }

    #[test]
    fn a_converted_0_9_1_message_reads_back() {
        let d = decode(&entry(&[b"ab\xff", b"cd"])).expect("decodes");
        assert_eq!(d.body, b"ab\xffcd");
        let p = &d.properties;
        assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("m1"));
        assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("c1"));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*p.timestamp(), Some(1_700_000_000));
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("t"));
        let h = d.headers.inner();
        assert_eq!(
            h.get("a"),
            Some(&AMQPValue::LongString(b"\xffz".to_vec().into()))
        );
        assert_eq!(h.get("n"), Some(&AMQPValue::LongLongInt(-5)));
        assert_eq!(h.get("b"), Some(&AMQPValue::Boolean(true)));
        assert_eq!(h.len(), 3, "x-basic-type is a property, not a header");
    }

    #[test]
    fn a_cut_entry_is_an_error_not_a_panic() {
        let e = entry(&[b"body"]);
        for cut in 1..e.len() {
            let _ = decode(&e[..cut]);
        }
        assert_eq!(decode(&e[..e.len() - 1]), Err(Amqp10Error::Truncated));
    }
}
