//! The JSON text at a JSON Pointer (RFC 6901) inside an answer, found without building a
//! `serde_json::Value` tree: each level is scanned once by serde_json, members and elements
//! before the one wanted are skipped (`IgnoredAny`), and what is returned borrows the
//! answer's own bytes. Reading a model version or comparing a shadow answer at a pointer
//! then costs a scan of the answer, not a `String` per key and a map per object.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// `Err(())`: `doc` is not JSON. `Ok(None)`: it is, but nothing is at `pointer` (or the
/// pointer is malformed). `Ok(Some(raw))`: the value there, as it is written in `doc`.
/// The first level's scan covers the whole document and is what checks it is JSON; deeper
/// levels scan only the value found above them.
#[allow(clippy::result_unit_err)]
pub fn raw_at<'a>(doc: &'a [u8], pointer: &str) -> Result<Option<&'a RawValue>, ()> {
    let Some(tokens) = pointer.strip_prefix('/') else {
        if pointer.is_empty() {
            return serde_json::from_slice(doc).map(Some).map_err(|_| ());
        }
        return serde_json::from_slice::<IgnoredAny>(doc)
            .map(|_| None)
            .map_err(|_| ());
    };
    let mut tokens = tokens.split('/');
    let first = unescape(tokens.next().unwrap_or(""));
    let mut de = serde_json::Deserializer::from_slice(doc);
    let found = step(&mut de, first_byte(doc), &first).map_err(|_| ())?;
    de.end().map_err(|_| ())?;
    let Some(mut current) = found else {
        return Ok(None);
    };
    for token in tokens {
        let text = current.get();
        let mut de = serde_json::Deserializer::from_str(text);
        // `text` is JSON already (it was scanned above): an error cannot happen here.
        match step(&mut de, first_byte(text.as_bytes()), &unescape(token)) {
            Ok(Some(next)) => current = next,
            _ => return Ok(None),
        }
    }
    Ok(Some(current))
}

fn first_byte(text: &[u8]) -> Option<u8> {
    text.iter().copied().find(|b| !b.is_ascii_whitespace())
}

/// One pointer token into the value `de` reads (which starts with `first`): the member or
/// element named, the rest of the value consumed (and so checked) either way.
fn step<'de, R: serde_json::de::Read<'de>>(
    de: &mut serde_json::Deserializer<R>,
    first: Option<u8>,
    token: &str,
) -> Result<Option<&'de RawValue>, serde_json::Error> {
    match (first, index(token)) {
        (Some(b'{'), _) => de.deserialize_map(Member(token)),
        (Some(b'['), Some(i)) => de.deserialize_seq(Element(i)),
        _ => serde::Deserialize::deserialize(&mut *de).map(|IgnoredAny| None),
    }
}

/// Whether two answers agree at `pointer` (the whole document without one). JSON is
/// compared as values (key order and spacing do not matter); a body that is not JSON is
/// compared byte for byte when there is no pointer, and disagrees when there is one.
pub fn agree_at(primary: &[u8], candidate: &[u8], pointer: Option<&str>) -> bool {
    match (
        raw_at(primary, pointer.unwrap_or("")),
        raw_at(candidate, pointer.unwrap_or("")),
    ) {
        // The same text agrees without a parse; else the two values are compared (they
        // are usually the small part of the answers a pointer names).
        (Ok(Some(a)), Ok(Some(b))) => {
            a.get() == b.get()
                || match (
                    serde_json::from_str::<serde_json::Value>(a.get()),
                    serde_json::from_str::<serde_json::Value>(b.get()),
                ) {
                    (Ok(x), Ok(y)) => x == y,
                    _ => false,
                }
        }
        (Ok(None), Ok(None)) => true,
        (Err(()), Err(())) if pointer.is_none() => primary == candidate,
        _ => false,
    }
}

/// `~1` is `/` and `~0` is `~`, in that order (RFC 6901, section 4).
fn unescape(token: &str) -> Cow<'_, str> {
    if token.contains('~') {
        token.replace("~1", "/").replace("~0", "~").into()
    } else {
        token.into()
    }
}

/// An array index as RFC 6901 writes it: digits, no leading zero (but `0` itself).
fn index(token: &str) -> Option<usize> {
    let digits = !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit());
    if !digits || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    token.parse().ok()
}

/// Finds one member of an object, skipping (and consuming) the rest.
struct Member<'t>(&'t str);

impl<'de> Visitor<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            if found.is_none() && key == self.0 {
                found = Some(map.next_value::<&'de RawValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// An object key, borrowed from the answer unless it has escapes (serde's own `Cow`
/// always copies).
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Finds one element of an array, skipping (and consuming) the rest.
struct Element(usize);

impl<'de> Visitor<'de> for Element {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        let mut i = 0;
        loop {
            if i == self.0 {
                match seq.next_element::<&'de RawValue>()? {
                    Some(raw) => found = Some(raw),
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i += 1;
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The same answer as `serde_json::Value::pointer` on every pointer into a document
    /// with nesting, escapes, arrays and odd spacing.
    #[test]
    fn agrees_with_value_pointer() {
        let doc = r#" { "model" : {"version":"rec-v7","n":7}, "items":[ {"a":1}, [2, {"b":null}] ],
            "a/b":{"m~n":"x"}, "": 0, "esc\u0061ped": "y", "dup": 1, "dup": 2 } "#;
        let value: serde_json::Value = serde_json::from_str(doc).unwrap();
        for p in [
            "",
            "/model",
            "/model/version",
            "/model/n",
            "/model/missing",
            "/items",
            "/items/0",
            "/items/0/a",
            "/items/1/1/b",
            "/items/2",
            "/items/01",
            "/items/-",
            "/items/x",
            "/a~1b/m~0n",
            "/",
            "/escaped",
            "/model/version/0",
            "model",
            "/dup",
        ] {
            let want = value.pointer(p).cloned();
            let got = raw_at(doc.as_bytes(), p)
                .unwrap()
                .map(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).unwrap());
            // serde_json keeps the last of duplicate keys; the first is found here. Both
            // are JSON; answers with duplicate keys are not what this reads.
            if p == "/dup" {
                assert_eq!(got, Some(json!(1)));
                continue;
            }
            assert_eq!(got, want, "pointer {p:?}");
        }
    }

    #[test]
    fn not_json_is_an_error_and_the_raw_text_is_the_answers_own() {
        assert!(raw_at(b"not json", "/a").is_err());
        assert!(raw_at(br#"{"a":1"#, "").is_err());
        assert!(raw_at(br#"{"a":1} x"#, "/a").is_err());
        // Broken after the member wanted, or deeper than the pointer reaches: still not JSON.
        assert!(raw_at(br#"{"a":1,"b":}"#, "/a").is_err());
        assert!(raw_at(br#"{"a":{"b":1},"c":[1,]}"#, "/a/b").is_err());
        assert!(raw_at(b"[1,", "/x").is_err());
        assert!(raw_at(b"{", "x").is_err());
        assert!(matches!(raw_at(b"[1]", "/x"), Ok(None)));
        assert!(matches!(raw_at(b" 7 ", "/x"), Ok(None)));
        assert!(matches!(raw_at(b"{}", "x"), Ok(None)));
        let raw = raw_at(br#"{"a": [1, 2 ]}"#, "/a").unwrap().unwrap();
        assert_eq!(raw.get(), "[1, 2 ]");
    }
}
