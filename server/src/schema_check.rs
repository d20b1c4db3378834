//! What a JSON schema must not hold before the grammar engine compiles it. llguidance
//! reads schema numbers as 64-bit floats and bounds as 64-bit integers: a `const` of
//! 2^53 + 1 is enforced as 2^53, bounds past ±2^63 are clamped (and some, near -2^63,
//! recurse without end), so such numbers are refused here rather than enforced wrongly.
//! It compiles references recursively, each target once per path (a reference back into
//! one being compiled is recursion, which it compiles lazily), so the deepest its stack
//! can go is bounded by the schema's own nesting plus, for every distinct target, the
//! target's nesting: that sum is bounded here, and the compile runs on a thread whose
//! stack holds it many times over ([`crate::grammar`]). References are only those within
//! the schema (`#` and JSON pointers), whose targets can be counted. And one grammar can
//! hold several functions' schemas, whose `$id`s then share one namespace.
//!
//! The walk reads the schema as a schema: property names are names, not keywords, and
//! `const`, `enum`, `default` and `examples` hold data, not schemas.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

/// The largest magnitude up to which every integer is a 64-bit float.
const EXACT: f64 = 9_007_199_254_740_992.0;

/// The most nesting a schema may reach with its references followed: its own depth plus,
/// for each distinct target, the target's depth and one. Real schemas (pydantic models,
/// OpenAPI components) sum to a few hundred; the compile stack holds several times this.
pub const MAX_NESTING: usize = 4096;

/// The most properties one object may leave optional. Once the object opens, the engine
/// holds every optional property open at once, about four alternatives each, and gives
/// up past 2,000 (`grammar_failures` pins this bound to the engine): a schema beyond it
/// would fail at its answer's second token, after a compile that grows with the square
/// of its properties (10,000 took 25 s of a core), so it is refused before it compiles.
pub const MAX_OPTIONAL_PROPERTIES: usize = 496;

/// Keywords whose values are bounds the grammar engine enforces.
const BOUNDS: [&str; 5] = [
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
];

/// Keywords whose value is one schema.
const ONE: [&str; 11] = [
    "items",
    "additionalItems",
    "additionalProperties",
    "unevaluatedItems",
    "unevaluatedProperties",
    "propertyNames",
    "contains",
    "not",
    "if",
    "then",
    "else",
];

/// Keywords whose value is a list of schemas.
const LIST: [&str; 4] = ["allOf", "anyOf", "oneOf", "prefixItems"];

/// Keywords whose value maps names to schemas.
const NAMED: [&str; 5] = [
    "properties",
    "patternProperties",
    "$defs",
    "definitions",
    "dependentSchemas",
];

/// Checks `schema`; the error says what and where (a JSON pointer into the schema).
pub fn check(schema: &Value) -> Result<(), String> {
    let mut walk = Walk::default();
    walk.schema(schema, schema, &mut String::new())?;
    let mut nesting = depth(schema);
    for target_depth in walk.targets.into_values() {
        nesting += 1 + target_depth;
        if nesting > MAX_NESTING {
            return Err(format!(
                "the schema nests deeper than {MAX_NESTING} levels with its `$ref`s followed (its own depth, and each referenced schema's depth and one)"
            ));
        }
    }
    Ok(())
}

/// The first `$id` that two of `schemas` both declare (as schemas, not in data).
pub fn shared_id<'a>(schemas: impl IntoIterator<Item = &'a Value>) -> Option<String> {
    let mut seen = HashSet::new();
    for schema in schemas {
        let mut walk = Walk::default();
        if walk.schema(schema, schema, &mut String::new()).is_err() {
            continue;
        }
        if let Some(id) = walk.ids.iter().find(|id| seen.contains(*id)) {
            return Some(id.clone());
        }
        seen.extend(walk.ids);
    }
    None
}

/// What a walk found: reference targets (each once, with its depth) and declared `$id`s.
#[derive(Default)]
struct Walk {
    targets: HashMap<*const Value, usize>,
    ids: HashSet<String>,
}

impl Walk {
    /// Walks one schema node; `resource` is the schema its `#` references resolve in
    /// (the root, or the nearest enclosing schema with an `$id`).
    fn schema<'a>(
        &mut self,
        node: &'a Value,
        resource: &'a Value,
        at: &mut String,
    ) -> Result<(), String> {
        let Value::Object(map) = node else {
            return Ok(());
        };
        let resource = match map.get("$id").and_then(Value::as_str) {
            Some(id) => {
                self.ids.insert(id.to_string());
                node
            }
            None => resource,
        };
        if let Some(reference) = map.get("$ref").and_then(Value::as_str) {
            self.reference(reference, resource, at)?;
        }
        let required: HashSet<&str> = match map.get("required") {
            Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
            _ => HashSet::new(),
        };
        // The engine writes each declared property at most once, but counts undeclared
        // keys as written: `{"a": 1, "a": 2}` is two. Once the required ones are there,
        // one more key makes one more distinct name; a second may repeat it.
        let undeclared = map.get("additionalProperties") != Some(&Value::Bool(false))
            || map.contains_key("patternProperties");
        if let Some(min) = map.get("minProperties").and_then(Value::as_u64) {
            if undeclared && min >= required.len() as u64 + 2 {
                return Err(format!(
                    "`minProperties` {min} at {at:?} cannot be enforced: the grammar engine counts an undeclared key written twice as two; declare the properties (with `additionalProperties: false`), or require all but one of them"
                ));
            }
        }
        if let Some(Value::Object(properties)) = map.get("properties") {
            let optional = properties
                .keys()
                .filter(|k| !required.contains(k.as_str()))
                .count();
            if optional > MAX_OPTIONAL_PROPERTIES {
                return Err(format!(
                    "the object at {at:?} has {optional} optional properties, more than the {MAX_OPTIONAL_PROPERTIES} the grammar engine can hold open at once: list more of them in `required`"
                ));
            }
        }
        for (key, value) in map {
            let len = at.len();
            push(at, key);
            let key = key.as_str();
            if BOUNDS.contains(&key) || key == "const" || key == "enum" {
                if let Some(n) = inexact(value) {
                    return Err(format!(
                        "`{key}` at {at:?} holds {n}, beyond ±2^53 (9007199254740992): the grammar engine cannot enforce a number that large exactly"
                    ));
                }
            } else if ONE.contains(&key) {
                match value {
                    // An older `items` may be a list.
                    Value::Array(items) => self.each(items, resource, at)?,
                    _ => self.schema(value, resource, at)?,
                }
            } else if LIST.contains(&key) {
                if let Value::Array(items) = value {
                    self.each(items, resource, at)?;
                }
            } else if NAMED.contains(&key) {
                if let Value::Object(named) = value {
                    self.named(named, resource, at)?;
                }
            }
            at.truncate(len);
        }
        Ok(())
    }

    fn each<'a>(
        &mut self,
        items: &'a [Value],
        resource: &'a Value,
        at: &mut String,
    ) -> Result<(), String> {
        for (i, item) in items.iter().enumerate() {
            let len = at.len();
            push(at, &i.to_string());
            self.schema(item, resource, at)?;
            at.truncate(len);
        }
        Ok(())
    }

    fn named<'a>(
        &mut self,
        named: &'a Map<String, Value>,
        resource: &'a Value,
        at: &mut String,
    ) -> Result<(), String> {
        for (name, item) in named {
            let len = at.len();
            push(at, name);
            self.schema(item, resource, at)?;
            at.truncate(len);
        }
        Ok(())
    }

    /// Notes the target of a reference within the schema; refuses any other kind (an
    /// anchor, another document), whose target could not be counted.
    fn reference(&mut self, reference: &str, resource: &Value, at: &str) -> Result<(), String> {
        let pointer = match reference.strip_prefix('#') {
            Some(p) if p.is_empty() || p.starts_with('/') => p,
            _ => {
                return Err(format!(
                    "`$ref` {reference:?} at {at:?}: only references within the schema (`#` or a JSON pointer such as `#/$defs/Name`) are supported"
                ))
            }
        };
        // A pointer that resolves nowhere is left to the engine, which refuses it.
        if let Some(target) = percent_decoded(pointer).and_then(|p| resource.pointer(&p)) {
            self.targets
                .entry(target as *const Value)
                .or_insert_with(|| depth(target));
        }
        Ok(())
    }
}

/// `/`-joined path segment, escaped as JSON pointers escape them.
fn push(at: &mut String, segment: &str) {
    at.push('/');
    at.push_str(&segment.replace('~', "~0").replace('/', "~1"));
}

/// How deeply `v` nests (a scalar: 0). The body parser bounds a request's nesting (128),
/// so this recursion is shallow.
fn depth(v: &Value) -> usize {
    match v {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
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
    fn min_properties_that_a_repeated_key_could_meet_are_refused() {
        let open = json!({"type": "object", "additionalProperties": {"type": "integer"},
            "minProperties": 3});
        let e = check(&open).expect_err("two keys could be one repeated");
        assert!(e.contains("`minProperties` 3"), "{e}");
        check(&json!({"type": "object", "minProperties": 1})).expect("one key is one name");
        let required = json!({"type": "object", "minProperties": 3, "required": ["a", "b"]});
        check(&required).expect("the third key is a third name");
        let closed = json!({"type": "object", "minProperties": 3, "additionalProperties": false,
            "properties": {"a": {}, "b": {}, "c": {}, "d": {}}});
        check(&closed).expect("declared properties are written once");
        let patterned = json!({"additionalProperties": false, "minProperties": 2,
            "patternProperties": {"^x": {}}});
        assert!(check(&patterned).is_err());
    }

    #[test]
    fn an_object_of_too_many_optional_properties_is_refused() {
        let names: Vec<String> = (0..=MAX_OPTIONAL_PROPERTIES)
            .map(|i| format!("p{i}"))
            .collect();
        let properties: Map<String, Value> = names
            .iter()
            .map(|n| (n.clone(), json!({"type": "integer"})))
            .collect();
        let open = json!({"items": {"type": "object", "properties": properties}});
        let e = check(&open).expect_err("one optional property too many");
        assert!(
            e.contains("497 optional properties") && e.contains("/items"),
            "{e}"
        );
        // Required, they are written in order: nothing is left open.
        let mut closed = open.clone();
        closed["items"]["required"] = json!(names);
        check(&closed).expect("all required");
        closed["items"]["required"] = json!(names[1..]);
        check(&closed).expect("one optional");
    }

    #[test]
    fn numbers_past_two_to_the_53_are_refused_where_enforced() {
        for bad in [
            json!({"type": "integer", "const": 9007199254740993u64}),
            json!({"enum": [1, -9007199254740993i64]}),
            json!({"type": "integer", "minimum": -1e19, "maximum": -1e19}),
            json!({"properties": {"n": {"maximum": 12345678901234567890u64}}}),
            json!({"const": {"deep": [9007199254740993u64]}}),
            json!({"anyOf": [{"items": {"exclusiveMinimum": -1e300}}]}),
        ] {
            let e = check(&bad).expect_err(&bad.to_string());
            assert!(e.contains("2^53"), "{e}");
        }
        for good in [
            json!({"type": "integer", "minimum": -9007199254740992i64, "maximum": 9007199254740992u64}),
            json!({"type": "number", "maximum": 1.5e3, "const": 0.1}),
            // Not enforced: defaults and examples, and properties that happen to be
            // named like keywords.
            json!({"default": 1e30, "examples": [1e30], "properties": {
                "enum": {"type": "string", "examples": [1e30]},
                "maximum": {"type": "integer", "default": 18446744073709551615u64}}}),
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
        let e = check(&chain(3000)).unwrap_err();
        assert!(e.contains("deeper than 4096"), "{e}");
    }

    /// Every target counts once whatever order the walk meets them in: cycles that link
    /// into each other (which fooled a depth walk that kept depths found while a cycle
    /// was cut short) are refused when their sum is past the bound, whichever key
    /// comes first.
    #[test]
    fn linked_cycles_are_counted_whatever_the_key_order() {
        let mut defs = serde_json::Map::new();
        for c in 0..3 {
            for j in 0..800 {
                let next = format!("#/$defs/d{c}_{}", (j + 1) % 800);
                let node = match (c, j) {
                    (c, 798) if c > 0 => {
                        json!({"anyOf": [{"$ref": next}, {"$ref": format!("#/$defs/d{}_0", c - 1)}]})
                    }
                    _ => json!({"$ref": next}),
                };
                defs.insert(format!("d{c}_{j}"), node);
            }
        }
        let first = json!({"$defs": defs.clone(), "properties": {"b": {"$ref": "#/$defs/d2_0"}}});
        let last = json!({"properties": {"b": {"$ref": "#/$defs/d2_0"}}, "$defs": defs});
        for schema in [first, last] {
            assert!(check(&schema).unwrap_err().contains("deeper than"));
        }
    }

    /// Anchors and other documents' references are refused: their targets could not be
    /// counted (a chain of a thousand `$anchor`s aborted the server).
    #[test]
    fn references_other_than_pointers_are_refused() {
        for reference in ["#a0", "urn:chain:1", "other.json#/x", "d1.json"] {
            let e = check(&json!({"properties": {"b": {"$ref": reference}}})).unwrap_err();
            assert!(e.contains("only references within the schema"), "{e}");
        }
    }

    /// Recursion is not depth, and many siblings referring to one definition count it
    /// once.
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
        let names: Vec<&String> = props.keys().collect();
        let wide = json!({"$defs": {"x": {"type": "string"}}, "properties": props,
            "required": names});
        assert_eq!(check(&wide), Ok(()));
    }

    #[test]
    fn ids_shared_between_schemas_are_found() {
        let a = json!({"$id": "urn:same", "$defs": {"X": {"type": "integer"}}});
        let b = json!({"$id": "urn:same", "$defs": {"X": {"type": "string"}}});
        let c = json!({"$id": "urn:other"});
        assert_eq!(shared_id([&a, &c]), None);
        assert_eq!(shared_id([&a, &c, &b]).as_deref(), Some("urn:same"));
        // One schema may repeat its own id, and an `$id` in data is data.
        let twice = json!({"$id": "urn:x", "properties": {"p": {"$id": "urn:x"}}});
        assert_eq!(shared_id([&twice]), None);
        let data = json!({"properties": {"k": {"const": {"$id": "urn:k"}, "examples": [{"$id": "urn:k"}]}}});
        assert_eq!(shared_id([&data, &data]), None);
    }
}
