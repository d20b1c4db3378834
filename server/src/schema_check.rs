//! What a JSON schema must not hold before the grammar engine compiles it. llguidance
//! reads schema numbers as 64-bit floats and bounds as 64-bit integers: a `const` of
//! 2^53 + 1 is enforced as 2^53, bounds past ±2^63 are clamped (and some, near -2^63,
//! recurse without end), so such numbers are refused here rather than enforced wrongly.
//! It also compiles `$ref`s recursively: a long chain of them would overflow the
//! thread's stack and abort the process, so the nesting a schema reaches through its
//! references is bounded. And one grammar can hold several functions' schemas, whose
//! `$id`s then share one namespace.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

/// The largest magnitude up to which every integer is a 64-bit float.
const EXACT: f64 = 9_007_199_254_740_992.0;

/// Schema levels (objects and arrays, each `$ref` followed counting as one) a schema
/// may nest. A plain request body is already held to 128 levels; the grammar engine's
/// stack overflowed past about 800 in a chain of references.
pub const MAX_DEPTH: usize = 256;

/// Keywords whose numbers the grammar engine enforces.
const NUMERIC: [&str; 7] = [
    "const",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];

/// Checks `schema`; the error says what and where (a JSON pointer into the schema).
pub fn check(schema: &Value) -> Result<(), String> {
    numbers(schema, &mut String::new())?;
    let mut walk = Walk {
        root: schema,
        open: HashSet::new(),
        known: HashMap::new(),
    };
    walk.depth(schema, 0).map(|_| ())
}

/// The `$id`s `schema` declares, for telling whether schemas compiled together clash.
pub fn ids(schema: &Value) -> Vec<&str> {
    let mut out = Vec::new();
    let mut stack = vec![schema];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(map) => {
                if let Some(id) = map.get("$id").and_then(Value::as_str) {
                    out.push(id);
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    out
}

/// The first `$id` that two of `schemas` both declare.
pub fn shared_id<'a>(schemas: impl IntoIterator<Item = &'a Value>) -> Option<&'a str> {
    let mut seen = HashSet::new();
    for schema in schemas {
        let own: HashSet<&str> = ids(schema).into_iter().collect();
        if let Some(id) = own.iter().find(|id| seen.contains(*id)) {
            return Some(id);
        }
        seen.extend(own);
    }
    None
}

/// Refuses a number the grammar engine would change, under a numeric keyword.
fn numbers(v: &Value, at: &mut String) -> Result<(), String> {
    let (Value::Object(_) | Value::Array(_)) = v else {
        return Ok(());
    };
    let entries: Vec<(String, &Value)> = match v {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => Vec::new(),
    };
    for (key, value) in entries {
        let len = at.len();
        at.push('/');
        at.push_str(&key.replace('~', "~0").replace('/', "~1"));
        if NUMERIC.contains(&key.as_str()) && v.is_object() {
            if let Some(n) = inexact(value) {
                return Err(format!(
                    "`{key}` at {at:?} holds {n}, beyond ±2^53 (9007199254740992): the grammar engine cannot enforce a number that large exactly"
                ));
            }
        }
        numbers(value, at)?;
        at.truncate(len);
    }
    Ok(())
}

/// The first number in `v` whose magnitude is past what a float holds exactly.
fn inexact(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => {
            let big = match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => i.unsigned_abs() > EXACT as u64,
                (None, Some(u)) => u > EXACT as u64,
                (None, None) => n.as_f64().is_some_and(|f| f.abs() > EXACT),
            };
            big.then(|| n.to_string())
        }
        Value::Array(items) => items.iter().find_map(inexact),
        Value::Object(map) => map.values().find_map(inexact),
        _ => None,
    }
}

/// The deepest nesting reachable from a node, `$ref`s followed; a reference back into
/// one being walked is recursion, which the grammar engine compiles lazily (so it adds
/// nothing).
struct Walk<'a> {
    root: &'a Value,
    /// The targets of the references being walked.
    open: HashSet<*const Value>,
    /// Depths of the targets already walked.
    known: HashMap<*const Value, usize>,
}

impl<'a> Walk<'a> {
    fn depth(&mut self, v: &'a Value, level: usize) -> Result<usize, String> {
        if level > MAX_DEPTH {
            return Err(format!(
                "the schema nests deeper than {MAX_DEPTH} levels (counting each `$ref` it follows)"
            ));
        }
        let children: Vec<&'a Value> = match v {
            Value::Object(map) => map.values().collect(),
            Value::Array(items) => items.iter().collect(),
            _ => return Ok(0),
        };
        let mut below = 0;
        if let Some(target) = v
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| self.resolve(r))
        {
            let key = target as *const Value;
            let reached = match self.known.get(&key) {
                Some(&d) => d,
                None if self.open.contains(&key) => 0,
                None => {
                    self.open.insert(key);
                    let d = self.depth(target, level + 1);
                    self.open.remove(&key);
                    let d = d?;
                    self.known.insert(key, d);
                    d
                }
            };
            if level + 1 + reached > MAX_DEPTH {
                return Err(format!(
                    "the schema nests deeper than {MAX_DEPTH} levels (counting each `$ref` it follows)"
                ));
            }
            below = reached + 1;
        }
        for child in children {
            below = below.max(self.depth(child, level + 1)? + 1);
        }
        Ok(below)
    }

    /// A reference within the schema (`#`, `#/$defs/x`); others are left to the engine.
    fn resolve(&self, reference: &str) -> Option<&'a Value> {
        let pointer = reference.strip_prefix('#')?;
        let decoded = percent_decoded(pointer)?;
        self.root.pointer(&decoded)
    }
}

/// `%xx` escapes (which a URI fragment may hold) decoded; `None` if they are not UTF-8.
fn percent_decoded(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = || std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok();
        match (bytes[i], hex().and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_past_two_to_the_53_are_refused_where_enforced() {
        for bad in [
            json!({"type": "integer", "const": 9007199254740993u64}),
            json!({"enum": [1, -9007199254740993i64]}),
            json!({"type": "integer", "minimum": -1e19, "maximum": -1e19}),
            json!({"properties": {"n": {"maximum": 12345678901234567890u64}}}),
            json!({"const": {"deep": [9007199254740993u64]}}),
        ] {
            let e = check(&bad).expect_err(&bad.to_string());
            assert!(e.contains("2^53"), "{e}");
        }
        for good in [
            json!({"type": "integer", "minimum": -9007199254740992i64, "maximum": 9007199254740992u64}),
            json!({"type": "number", "maximum": 1.5e3, "const": 0.1}),
            // Not enforced: a default, and a property that happens to be named `enum`.
            json!({"default": 1e30, "properties": {"enum": {"type": "string"}}}),
        ] {
            assert_eq!(check(&good), Ok(()), "{good}");
        }
        let e = check(&json!({"properties": {"a/b": {"const": 1e20}}})).unwrap_err();
        assert!(e.contains("/properties/a~1b/const"), "{e}");
    }

    fn chain(links: usize) -> Value {
        let mut defs = serde_json::Map::new();
        for i in 0..links {
            defs.insert(
                format!("d{i}"),
                json!({"$ref": format!("#/$defs/d{}", i + 1)}),
            );
        }
        defs.insert(format!("d{links}"), json!({"type": "integer"}));
        json!({"$defs": defs, "$ref": "#/$defs/d0"})
    }

    #[test]
    fn a_long_chain_of_references_is_refused() {
        assert_eq!(check(&chain(50)), Ok(()));
        let e = check(&chain(1000)).unwrap_err();
        assert!(e.contains("deeper than 256"), "{e}");
    }

    /// Recursion is not depth: a tree type refers to itself, and many siblings refer to
    /// one definition, without being refused (or walked more than once).
    #[test]
    fn recursion_and_shared_definitions_pass() {
        let tree = json!({"$defs": {"node": {"type": "object", "properties": {
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
            "$ref": "#/$defs/node"});
        assert_eq!(check(&tree), Ok(()));
        assert_eq!(check(&json!({"$ref": "#"})), Ok(()));
        let mut props = serde_json::Map::new();
        for i in 0..5000 {
            props.insert(format!("p{i}"), json!({"$ref": "#/$defs/x"}));
        }
        let wide = json!({"$defs": {"x": {"type": "string"}}, "properties": props});
        assert_eq!(check(&wide), Ok(()));
    }

    #[test]
    fn ids_shared_between_schemas_are_found() {
        let a = json!({"$id": "urn:same", "$defs": {"X": {"type": "integer"}}});
        let b = json!({"$id": "urn:same", "$defs": {"X": {"type": "string"}}});
        let c = json!({"$id": "urn:other"});
        assert_eq!(shared_id([&a, &c]), None);
        assert_eq!(shared_id([&a, &c, &b]), Some("urn:same"));
        // One schema may repeat its own id.
        let twice = json!({"$id": "urn:x", "properties": {"p": {"$id": "urn:x"}}});
        assert_eq!(shared_id([&twice]), None);
    }
}
