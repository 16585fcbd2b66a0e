//! Message bodies shared by the tests: malformed ones, each with the text its
//! rule puts into `x-imattr-error`, and valid ones. The malformed ones assume
//! the app's attribute names are `sex` and `city`.
#![allow(dead_code)]

/// Malformed bodies and a part of the error each must produce.
pub fn malformed() -> Vec<(Vec<u8>, &'static str)> {
    let mut c: Vec<(Vec<u8>, &'static str)> = Vec::new();
    let valid = br#"{"To_Account":"a","Attrs":{"sex":"m"}}"#;
    // Binary and encoding.
    c.push((vec![0x00, 0x01, 0x02, 0xff], "not UTF-8"));
    c.push((vec![0xff; 64], "not UTF-8"));
    c.push((
        b"{\"To_Account\":\"a\xc3\",\"Attrs\":{\"sex\":\"m\"}}".to_vec(),
        "not UTF-8",
    ));
    c.push((vec![0xef, 0xbb, 0xbf, b'{', b'}'], "not valid JSON"));
    c.push((b"\x1f\x8b\x08\x00gzip".to_vec(), "not UTF-8"));
    // Truncations of a valid body at every few bytes.
    for cut in [1, 5, 12, 20, 28, 35] {
        c.push((valid[..cut].to_vec(), "not valid JSON"));
    }
    // Trailing garbage.
    for tail in [&b" x"[..], b"}", b"{}", b",", b"\x00"] {
        let mut b = valid.to_vec();
        b.extend_from_slice(tail);
        c.push((b, "not valid JSON"));
    }
    // Not JSON at all / wrong top level.
    for (b, rule) in [
        (&b""[..], "not valid JSON"),
        (b"   ", "not valid JSON"),
        (b"null", "neither"),
        (b"true", "neither"),
        (b"42", "neither"),
        (b"\"str\"", "neither"),
        (b"[]", "neither"),
        (
            b"[{\"To_Account\":\"a\",\"Attrs\":{\"sex\":\"m\"}}]",
            "neither",
        ),
        (b"{}", "neither"),
        (
            b"{\"to_account\":\"a\",\"attrs\":{\"sex\":\"m\"}}",
            "neither",
        ),
    ] {
        c.push((b.to_vec(), rule));
    }
    // Deep nesting.
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    c.push((deep.into_bytes(), "neither"));
    let deep_attr = format!(
        r#"{{"To_Account":"a","Attrs":{{"sex":{}"x"{}}}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    c.push((deep_attr.into_bytes(), "Attrs.sex is an array"));
    let deep_obj = format!(
        r#"{{"To_Account":"a","Attrs":{}}}"#,
        "{\"x\":".repeat(200) + "1" + &"}".repeat(200)
    );
    c.push((deep_obj.into_bytes(), "Attrs.x is an object, not a string"));
    // Size.
    let mut big = br#"{"To_Account":"a","Attrs":{"sex":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    big.extend_from_slice(b"\"}}");
    c.push((big, "over the 1048576-byte limit"));
    // Wrong types.
    for (b, rule) in [
        (&br#"{"To_Account":1,"Attrs":{"sex":"m"}}"#[..], "To_Account is a number"),
        (br#"{"To_Account":true,"Attrs":{"sex":"m"}}"#, "To_Account is a boolean"),
        (br#"{"To_Account":["a"],"Attrs":{"sex":"m"}}"#, "To_Account is an array"),
        (br#"{"To_Account":{"a":1},"Attrs":{"sex":"m"}}"#, "To_Account is an object"),
        (br#"{"To_Account":null,"Attrs":{"sex":"m"}}"#, "To_Account is null"),
        (br#"{"To_Account":"a","Attrs":null}"#, "Attrs is null"),
        (br#"{"To_Account":"a","Attrs":"sex=m"}"#, "Attrs is a string"),
        (br#"{"To_Account":"a","Attrs":5}"#, "Attrs is a number"),
        (br#"{"To_Account":"a","Attrs":{"sex":1.5}}"#, "Attrs.sex is a number"),
        (br#"{"To_Account":"a","Attrs":{"sex":false}}"#, "Attrs.sex is a boolean"),
        (br#"{"To_Account":"a","Attrs":{"sex":["m"]}}"#, "Attrs.sex is an array"),
        (br#"{"UserAttrs":"a"}"#, "UserAttrs is a string"),
        (br#"{"UserAttrs":null}"#, "UserAttrs is null"),
        (br#"{"UserAttrs":[null]}"#, "UserAttrs[0] is null"),
        (br#"{"UserAttrs":[[]]}"#, "UserAttrs[0] is an array"),
        (br#"{"UserAttrs":[{"To_Account":"a"}]}"#, "UserAttrs[0].Attrs is missing"),
        (br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"m"}},{"To_Account":"","Attrs":{"sex":"m"}}]}"#, "UserAttrs[1].To_Account is empty"),
    ] {
        c.push((b.to_vec(), rule));
    }
    // Limits in bytes, with multi-byte UTF-8.
    let v51 = "é".repeat(25) + "x";
    c.push((
        format!(r#"{{"To_Account":"a","Attrs":{{"sex":"{v51}"}}}}"#).into_bytes(),
        "Attrs.sex is 51 bytes",
    ));
    let a33 = "账".repeat(11); // 33 bytes
    c.push((
        format!(r#"{{"To_Account":"{a33}","Attrs":{{"sex":"m"}}}}"#).into_bytes(),
        "To_Account is 33 bytes",
    ));
    c.push((
        format!(
            r#"{{"To_Account":"{}","Attrs":{{"sex":"m"}}}}"#,
            "b".repeat(33)
        )
        .into_bytes(),
        "To_Account is 33 bytes",
    ));
    // Unknown attributes and names.
    c.push((
        br#"{"To_Account":"a","Attrs":{"age":"1"}}"#.to_vec(),
        "Attrs.age is not one of",
    ));
    c.push((
        br#"{"To_Account":"a","Attrs":{"Sex":"m"}}"#.to_vec(),
        "Attrs.Sex is not one of",
    ));
    c.push((
        br#"{"To_Account":"a","Attrs":{"":"m"}}"#.to_vec(),
        "empty attribute name",
    ));
    // Duplicate keys.
    c.push((
        br#"{"To_Account":"a","Attrs":{"sex":"m","sex":"f"}}"#.to_vec(),
        "Attrs.sex appears twice",
    ));
    c.push((
        br#"{"To_Account":"a","To_Account":"b","Attrs":{"sex":"m"}}"#.to_vec(),
        "duplicate field `To_Account`",
    ));
    c.push((
        br#"{"To_Account":"a","Attrs":{"sex":"m"},"Attrs":{"sex":"f"}}"#.to_vec(),
        "duplicate field `Attrs`",
    ));
    c.push((
        br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"m"},"Attrs":{}}]}"#.to_vec(),
        "UserAttrs[0].Attrs appears twice",
    ));
    // Shapes mixed or empty.
    c.push((
        br#"{"To_Account":"a","Attrs":{"sex":"m"},"UserAttrs":[]}"#.to_vec(),
        "mixes",
    ));
    c.push((br#"{"UserAttrs":[]}"#.to_vec(), "UserAttrs is empty"));
    c.push((
        br#"{"To_Account":"a","Attrs":{}}"#.to_vec(),
        "Attrs is empty",
    ));
    c
}

/// Valid bodies (with attribute names `sex` and `city`), at and below every limit.
pub fn valid() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = vec![
        br#"{"To_Account":"a","Attrs":{"sex":"m"}}"#.to_vec(),
        br#"{"To_Account":"xiaojun012","Attrs":{"sex":"attr1","city":"attr2"}}"#.to_vec(),
        br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"m"}},{"To_Account":"b","Attrs":{"city":"x"}}]}"#.to_vec(),
        br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":"m"}},{"To_Account":"a","Attrs":{"sex":"f"}}]}"#.to_vec(),
        br#"  {"To_Account":"a","Attrs":{"sex":""},"trace_id":"t-1"} "#.to_vec(),
        br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"city":"x"},"note":1}],"source":"crm"}"#.to_vec(),
        br#"{"To_Account":"a\u00e9","Attrs":{"city":"Shenzhen\n"}}"#.to_vec(),
        "{\"To_Account\":\"账户\",\"Attrs\":{\"city\":\"深圳\"}}".as_bytes().to_vec(),
        // Removals (null), alone and with values, in both shapes.
        br#"{"To_Account":"a","Attrs":{"city":null}}"#.to_vec(),
        br#"{"To_Account":"a","Attrs":{"sex":"m","city":null}}"#.to_vec(),
        br#"{"UserAttrs":[{"To_Account":"a","Attrs":{"sex":null}},{"To_Account":"a","Attrs":{"sex":"f"}}]}"#.to_vec(),
    ];
    let a32 = "a".repeat(32);
    let v50 = "v".repeat(50);
    let e50 = "é".repeat(25);
    v.push(
        format!(r#"{{"To_Account":"{a32}","Attrs":{{"sex":"{v50}","city":"{e50}"}}}}"#)
            .into_bytes(),
    );
    let thousand: Vec<String> = (0..1000)
        .map(|i| format!(r#"{{"To_Account":"u{i}","Attrs":{{"sex":"m"}}}}"#))
        .collect();
    v.push(format!(r#"{{"UserAttrs":[{}]}}"#, thousand.join(",")).into_bytes());
    v
}
