//! AI answers validated in place: `response_schema` runs on a simd-json tape of the answer
//! (one flat `Vec` of nodes whose strings point into a copy of the body) instead of a
//! `serde_json::Value` tree (a `String` per key and string, a `BTreeMap` per object, each
//! freed again after the check). `jsonschema` validates any representation that implements
//! its `json` traits; this module is that glue, nothing more: the parser is simd-json's and
//! every keyword is jsonschema's.
//!
//! The parse buffers (the body copy, simd-json's stage buffers and the tape) are kept per
//! thread and reused, so a check allocates nothing once warm.

use std::borrow::Cow;
use std::cell::RefCell;

use jsonschema::json::{Array, Json, JsonNumber, Node, NodeIdentity, Object};
use jsonschema::JsonType;
use simd_json::Node as T;
use simd_json::StaticNode;

/// The nesting a checked answer may have, as `serde_json` allows: `Value`-like recursion in
/// the validator stays far from the stack's end.
const MAX_DEPTH: usize = 128;

/// The representation marker for `jsonschema::options_for::<Tape>()`.
#[derive(Debug)]
pub struct Tape;

/// One value: its slice of the tape (the node and everything nested in it).
#[derive(Clone, Copy)]
pub struct TapeNode<'a>(&'a [T<'a>]);

/// An object's slice of the tape.
#[derive(Clone, Copy)]
pub struct TapeObject<'a>(&'a [T<'a>]);

/// An array's slice of the tape.
#[derive(Clone, Copy)]
pub struct TapeArray<'a>(&'a [T<'a>]);

/// A number as simd-json parsed it.
#[derive(Clone, Copy, Debug)]
pub enum TapeNumber {
    I64(i64),
    U64(u64),
    F64(f64),
}

/// Tape nodes a value takes: itself and everything nested in it (a container's `count`
/// leaves itself out).
fn span(node: &T<'_>) -> usize {
    match node {
        T::Object { count, .. } | T::Array { count, .. } => count + 1,
        _ => 1,
    }
}

/// The value starting at `at`.
fn value_at<'a>(tape: &'a [T<'a>], at: usize) -> Option<&'a [T<'a>]> {
    let n = span(tape.get(at)?);
    tape.get(at..at + n)
}

impl Json for Tape {
    type Node<'a> = TapeNode<'a>;
    type PreparedKey = String;
    type StringBuffer = ();

    fn prepare_key(key: &str) -> String {
        key.to_owned()
    }

    /// `propertyNames` only: a one-node tape holding the name.
    fn with_string_node<R>((): &mut (), string: &str, f: impl FnOnce(TapeNode<'_>) -> R) -> R {
        let tape = [T::String(string)];
        f(TapeNode(&tape))
    }
}

impl JsonNumber for TapeNumber {
    fn as_u64(&self) -> Option<u64> {
        match *self {
            TapeNumber::U64(n) => Some(n),
            TapeNumber::I64(n) => u64::try_from(n).ok(),
            TapeNumber::F64(_) => None,
        }
    }

    fn as_i64(&self) -> Option<i64> {
        match *self {
            TapeNumber::I64(n) => Some(n),
            TapeNumber::U64(n) => i64::try_from(n).ok(),
            TapeNumber::F64(_) => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            TapeNumber::I64(n) => n as f64,
            TapeNumber::U64(n) => n as f64,
            TapeNumber::F64(n) => n,
        })
    }

    fn as_str(&self) -> Cow<'_, str> {
        Cow::Owned(match *self {
            TapeNumber::I64(n) => n.to_string(),
            TapeNumber::U64(n) => n.to_string(),
            TapeNumber::F64(n) => n.to_string(),
        })
    }

    fn to_number(&self) -> Cow<'_, serde_json::Number> {
        Cow::Owned(match *self {
            TapeNumber::I64(n) => serde_json::Number::from(n),
            TapeNumber::U64(n) => serde_json::Number::from(n),
            // simd-json refuses NaN and infinities: every parsed float is finite.
            TapeNumber::F64(n) => {
                serde_json::Number::from_f64(n).unwrap_or_else(|| serde_json::Number::from(0))
            }
        })
    }

    fn is_integer(&self) -> bool {
        match *self {
            TapeNumber::I64(_) | TapeNumber::U64(_) => true,
            TapeNumber::F64(n) => n.fract() == 0.0,
        }
    }

    /// simd-json keeps `1.0` and `1e2` as floats: only an integer literal is an integer.
    fn is_written_as_integer(&self) -> bool {
        matches!(self, TapeNumber::I64(_) | TapeNumber::U64(_))
    }
}

impl<'a> Node<'a, Tape> for TapeNode<'a> {
    type Object = TapeObject<'a>;
    type Array = TapeArray<'a>;
    type Number = TapeNumber;

    fn as_object(&self) -> Option<TapeObject<'a>> {
        matches!(self.0.first(), Some(T::Object { .. })).then_some(TapeObject(self.0))
    }

    fn as_array(&self) -> Option<TapeArray<'a>> {
        matches!(self.0.first(), Some(T::Array { .. })).then_some(TapeArray(self.0))
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        match self.0.first()? {
            T::String(s) => Some(Cow::Borrowed(*s)),
            _ => None,
        }
    }

    /// A string of `b` bytes has between `b / 4` (rounded up) and `b` code points: most
    /// `minLength` / `maxLength` checks are decided by its byte length without counting.
    fn string_length_within(&self, min: u64, max: u64) -> Option<bool> {
        let s = match self.0.first()? {
            T::String(s) => *s,
            _ => return None,
        };
        let bytes = s.len() as u64;
        let fewest = bytes.div_ceil(4);
        if bytes < min || fewest > max {
            return Some(false);
        }
        if fewest >= min && bytes <= max {
            return Some(true);
        }
        let chars = s.chars().count() as u64;
        Some((min..=max).contains(&chars))
    }

    fn as_number(&self) -> Option<TapeNumber> {
        match self.0.first()? {
            T::Static(StaticNode::I64(n)) => Some(TapeNumber::I64(*n)),
            T::Static(StaticNode::U64(n)) => Some(TapeNumber::U64(*n)),
            T::Static(StaticNode::F64(n)) => Some(TapeNumber::F64(*n)),
            _ => None,
        }
    }

    fn as_boolean(&self) -> Option<bool> {
        match self.0.first()? {
            T::Static(StaticNode::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        matches!(self.0.first(), Some(T::Static(StaticNode::Null)))
    }

    fn json_type(&self) -> JsonType {
        match self.0.first() {
            Some(T::Object { .. }) => JsonType::Object,
            Some(T::Array { .. }) => JsonType::Array,
            Some(T::String(_)) => JsonType::String,
            Some(T::Static(StaticNode::Bool(_))) => JsonType::Boolean,
            Some(T::Static(StaticNode::Null)) | None => JsonType::Null,
            Some(T::Static(_)) => JsonType::Number,
        }
    }

    /// Cold paths only: error messages, `const` / `enum`, `uniqueItems`.
    fn to_value(&self) -> Cow<'a, serde_json::Value> {
        Cow::Owned(to_value(*self))
    }

    /// The node's place on the tape: stable while the tape lives, distinct per node.
    fn identity(&self) -> Option<NodeIdentity> {
        Some(NodeIdentity::new(self.0.as_ptr() as usize))
    }
}

fn to_value(node: TapeNode<'_>) -> serde_json::Value {
    use serde_json::Value;
    if let Some(o) = node.as_object() {
        return Value::Object(
            o.members()
                .map(|(k, v)| (k.to_string(), to_value(v)))
                .collect(),
        );
    }
    if let Some(a) = node.as_array() {
        return Value::Array(a.elements().map(to_value).collect());
    }
    if let Some(s) = node.as_string() {
        return Value::String(s.into_owned());
    }
    if let Some(b) = node.as_boolean() {
        return Value::Bool(b);
    }
    match node.as_number() {
        Some(n) => Value::Number(n.to_number().into_owned()),
        None => Value::Null,
    }
}

/// The members of an object, in document order.
pub struct Members<'a> {
    tape: &'a [T<'a>],
    at: usize,
    left: usize,
}

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, TapeNode<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let T::String(key) = self.tape.get(self.at)? else {
            return None;
        };
        let value = value_at(self.tape, self.at + 1)?;
        self.at += 1 + value.len();
        Some((key, TapeNode(value)))
    }
}

impl<'a> Object<'a, Tape> for TapeObject<'a> {
    type Node = TapeNode<'a>;
    type MemberName = &'a str;
    type MembersIter = Members<'a>;

    fn len(&self) -> usize {
        match self.0.first() {
            Some(T::Object { len, .. }) => *len,
            _ => 0,
        }
    }

    fn get(&self, key: &String) -> Option<TapeNode<'a>> {
        self.members()
            .find(|(k, _)| *k == key.as_str())
            .map(|(_, v)| v)
    }

    fn members(&self) -> Members<'a> {
        Members {
            tape: self.0,
            at: 1,
            left: self.len(),
        }
    }
}

/// The elements of an array, in order.
pub struct Elements<'a> {
    tape: &'a [T<'a>],
    at: usize,
    left: usize,
}

impl<'a> Iterator for Elements<'a> {
    type Item = TapeNode<'a>;
    fn next(&mut self) -> Option<TapeNode<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let value = value_at(self.tape, self.at)?;
        self.at += value.len();
        Some(TapeNode(value))
    }
}

impl<'a> Array<'a, Tape> for TapeArray<'a> {
    type Node = TapeNode<'a>;
    type ElementsIter = Elements<'a>;

    fn len(&self) -> usize {
        match self.0.first() {
            Some(T::Array { len, .. }) => *len,
            _ => 0,
        }
    }

    fn elements(&self) -> Elements<'a> {
        Elements {
            tape: self.0,
            at: 1,
            left: self.len(),
        }
    }
}

/// The parse buffers of one thread, reused from answer to answer.
#[derive(Default)]
struct Scratch {
    input: Vec<u8>,
    buffers: Option<simd_json::Buffers>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Parses `body` onto a tape and runs `f` on its root; `Err` says why it is not JSON (or
/// nests deeper than 128 levels).
pub fn with_tape<R>(body: &[u8], f: impl FnOnce(TapeNode<'_>) -> R) -> Result<R, String> {
    SCRATCH.with(|cell| {
        // A re-entrant call (never made today) parses with buffers of its own.
        let mut own = Scratch::default();
        let mut guard = cell.try_borrow_mut();
        let scratch = match guard.as_deref_mut() {
            Ok(s) => s,
            Err(_) => &mut own,
        };
        scratch.input.clear();
        scratch.input.extend_from_slice(body);
        let buffers = scratch
            .buffers
            .get_or_insert_with(|| simd_json::Buffers::new(body.len()));
        let tape = simd_json::to_tape_with_buffers(&mut scratch.input, buffers)
            .map_err(|e| e.to_string())?;
        check_depth(&tape.0)?;
        Ok(f(TapeNode(&tape.0)))
    })
}

/// `validator`'s verdict on `body`: `Err` names the first error's instance and schema
/// paths (never the answer's values, which may reach the client and the logs), or why the
/// body is not JSON. `is_valid` takes jsonschema's fast paths (no locations kept, early
/// exits); only an invalid answer is walked again for the path of its first error.
pub fn check(validator: &jsonschema::Validator<Tape>, body: &[u8]) -> Result<(), String> {
    with_tape(body, |root| {
        if validator.is_valid(root) {
            return Ok(());
        }
        validator.validate(root).map_err(|e| {
            format!(
                "at \"{}\" (schema rule \"{}\")",
                e.instance_path(),
                e.schema_path()
            )
        })
    })
    .map_err(|e| format!("not JSON: {e}"))
    .and_then(|verdict| verdict)
}

fn check_depth(tape: &[T<'_>]) -> Result<(), String> {
    // Where each open container ends, innermost last (on the stack: no allocation).
    let mut ends = [0usize; MAX_DEPTH];
    let mut open = 0;
    for (i, node) in tape.iter().enumerate() {
        if let T::Object { count, .. } | T::Array { count, .. } = node {
            while open > 0 && ends[open - 1] <= i {
                open -= 1;
            }
            if open == MAX_DEPTH {
                return Err(format!("nested deeper than {MAX_DEPTH} levels"));
            }
            ends[open] = i + count + 1;
            open += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_tape_meets_jsonschemas_representation_contract() {
        let doc = jsonschema::json::conformance::document().to_string();
        with_tape(doc.as_bytes(), |root| {
            jsonschema::json::conformance::assert_conformance::<Tape>(&root)
        })
        .unwrap();
    }

    /// The same verdict (and the same first error path) as the serde_json representation,
    /// on schemas that use every kind of keyword an answer schema does.
    #[test]
    fn verdicts_match_the_serde_json_representation() {
        let schemas = [
            std::fs::read_to_string("config/schemas/recommendations.json").unwrap(),
            json!({"type": "integer"}).to_string(),
            json!({"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer"}).to_string(),
            json!({"enum": [1, "a", {"b": [true, null]}]}).to_string(),
            json!({"const": {"x": 1.5}}).to_string(),
            json!({"type": "array", "uniqueItems": true, "items": {"type": "number", "multipleOf": 0.5}}).to_string(),
            json!({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}, "minProperties": 1, "maxProperties": 2}).to_string(),
            json!({"type": "string", "minLength": 2, "maxLength": 3}).to_string(),
            json!({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "additionalProperties": false}}, "$ref": "#/$defs/n"}).to_string(),
        ];
        let instances = [
            r#"{"model":{"version":"rec-v7"},"items":[{"course":"CS-101","score":0.5}]}"#,
            r#"{"model":{"version":"rec-v7"},"items":[{"course":"CS-101","email":"a@b.c"}]}"#,
            r#"{"model":{"version":"rec-v7"},"items":[{"course":"cs 101"}]}"#,
            r#"{"model":{},"items":[]}"#,
            r#"{"items":[]}"#,
            "1",
            "1.0",
            "1e2",
            "-3",
            "18446744073709551615",
            "2.5",
            "\"a\"",
            "\"ab\"",
            "\"\\u00e9t\\u00e9\"",
            "\"abcd\"",
            // Multi-byte strings: the byte length alone does not decide min/maxLength.
            r#""\u00e9\u00e9\u00e9\u00e9""#,
            r#""\ud83d\ude00""#,
            r#""\ud83d\ude00\ud83d\ude00""#,
            r#""a\ud83d\ude00\ud83d\ude00""#,
            "true",
            "null",
            "[]",
            "[1, 1]",
            "[0.5, 1.5]",
            "[0.3]",
            r#"{"b":[true,null]}"#,
            r#"{"x":1.5}"#,
            r#"{"abc":1}"#,
            r#"{"Abc":1}"#,
            r#"{"a":1,"b":2,"c":3}"#,
            r#"{"next":{"next":{}}}"#,
            r#"{"next":{"next":{"other":1}}}"#,
            r#"{"n\u00e4me":1}"#,
        ];
        for schema in &schemas {
            let schema: serde_json::Value = serde_json::from_str(schema).unwrap();
            let serde = jsonschema::validator_for(&schema).unwrap();
            let tape = jsonschema::options_for::<Tape>().build(&schema).unwrap();
            for instance in instances {
                let value: serde_json::Value = serde_json::from_str(instance).unwrap();
                let want = serde
                    .validate(&value)
                    .map_err(|e| e.instance_path().to_string());
                let got = with_tape(instance.as_bytes(), |root| {
                    tape.validate(root)
                        .map_err(|e| e.instance_path().to_string())
                })
                .unwrap();
                assert_eq!(got, want, "schema {schema} on {instance}");
                // The request path's check (is_valid first) gives the same verdict.
                assert_eq!(
                    check(&tape, instance.as_bytes()).is_ok(),
                    want.is_ok(),
                    "check(): schema {schema} on {instance}"
                );
            }
        }
    }

    #[test]
    fn not_json_and_too_deep_are_errors_and_the_buffers_are_reused() {
        assert!(with_tape(b"{\"a\":", |_| ()).is_err());
        assert!(with_tape(b"", |_| ()).is_err());
        let deep = format!("{}{}", "[".repeat(129), "]".repeat(129));
        let err = with_tape(deep.as_bytes(), |_| ()).unwrap_err();
        assert!(err.contains("deeper than 128"), "{err}");
        let ok = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(with_tape(ok.as_bytes(), |_| ()).is_ok());
        // A large answer after a small one, and a small one again, on the same buffers.
        let big = json!({"items": vec!["x".repeat(100); 1000]}).to_string();
        for body in ["{}", big.as_str(), "[1]"] {
            let len = with_tape(body.as_bytes(), |root| match root.as_object() {
                Some(o) => o.len(),
                None => root.as_array().map_or(0, |a| a.len()),
            })
            .unwrap();
            assert_eq!(len, if body == "{}" { 0 } else { 1 });
        }
    }
}
