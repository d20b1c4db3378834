//! The call syntaxes, and the grammar that holds the model to one: a call's `name` is
//! one of the offered functions' (the named one's, with a named `tool_choice`) and its
//! arguments follow that function's `parameters` schema, enforced token by token by
//! llguidance. With `tool_choice: "auto"` the answer is either free text (which does not
//! start like a call) or calls; once a call starts, it is held to the schema.

use serde_json::{json, Map, Value};

use super::{Choice, ToolRequest};
use crate::grammar::compact;

/// How a model writes its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call
    /// (Hermes; Qwen2.5, Qwen3).
    Hermes,
    /// `{"name": ..., "parameters": {...}}`, one call (Llama 3.1-3.3).
    Llama3Json,
    /// `{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}`: every other model, told
    /// so in its system turn.
    Generic,
}

impl CallFormat {
    /// The format a chat template speaks, read from the template itself (not from the
    /// model's name): `<tool_call>` tags, or Llama 3's `"parameters"` JSON with its
    /// `ipython` role. Templates that do not render tools get the generic form.
    pub fn detect(template_source: &str) -> Self {
        if !template_source.contains("tools") {
            return CallFormat::Generic;
        }
        if template_source.contains("<tool_call>") {
            return CallFormat::Hermes;
        }
        let llama3 =
            template_source.contains("ipython") || template_source.contains("<|python_tag|>");
        if llama3 && template_source.contains("parameters") {
            return CallFormat::Llama3Json;
        }
        CallFormat::Generic
    }

    /// The key of a call's arguments in this format.
    pub fn arguments_key(self) -> &'static str {
        match self {
            CallFormat::Llama3Json => "parameters",
            _ => "arguments",
        }
    }

    /// Whether text that starts with `trimmed` (leading whitespace removed) can be a call:
    /// `Some(true)` it is one, `Some(false)` it is not, `None` not known yet.
    /// `json_answer`: a text answer is JSON too (structured output beside tools), told
    /// from a JSON call by how the call grammar writes a call's start: its first key and
    /// then one of the `functions` by name. An answer object may use the key
    /// `tool_calls` itself (models imitate the calls the prompt describes): it is a call
    /// only once it names a function that can be called.
    pub fn starts_call(
        self,
        trimmed: &str,
        json_answer: bool,
        functions: &[String],
    ) -> Option<bool> {
        let opener = match (self, json_answer) {
            (CallFormat::Hermes, _) => "<tool_call>",
            (CallFormat::Generic, true) => "{\"tool_calls\": [{\"name\": ",
            (CallFormat::Llama3Json, true) => "{\"name\": ",
            (CallFormat::Llama3Json | CallFormat::Generic, false) => "{",
        };
        if self == CallFormat::Hermes || !json_answer {
            return starts_with(trimmed, opener);
        }
        let mut undecided = false;
        for name in functions {
            let name = serde_json::to_string(name).unwrap_or_default();
            match starts_with(trimmed, &format!("{opener}{name}")) {
                Some(true) => return Some(true),
                Some(false) => {}
                None => undecided = true,
            }
        }
        (!undecided).then_some(false)
    }

    /// The grammar (llguidance's Lark) of an answer to `tools` in this format; with
    /// `tool_choice: "auto"`, a text answer is free or, given `answer`, JSON following
    /// that schema (a JSON call is then told apart by its first key: a schema whose
    /// answer starts with the same key would be read as a call).
    pub fn grammar(self, tools: &ToolRequest, answer: Option<&Value>) -> String {
        self.rules(tools, answer, "start", false)
    }

    /// [`Self::grammar`] with its top rule named `root`, for a thinking model's answer
    /// (`thinks`: a thinking block goes before it, so a text answer does not open one).
    pub fn rules(
        self,
        tools: &ToolRequest,
        answer: Option<&Value>,
        root: &str,
        thinks: bool,
    ) -> String {
        let (call, defs) = self.call_schema(tools);
        let calls = match self {
            CallFormat::Generic => {
                let array = json!({
                    "type": "array",
                    "minItems": 1,
                    "maxItems": tools.most_calls(),
                    "items": call,
                });
                json!({
                    "type": "object",
                    "properties": {"tool_calls": array},
                    "required": ["tool_calls"],
                    "additionalProperties": false,
                })
            }
            _ => call,
        };
        let mut calls = compact(calls);
        if let Some(obj) = calls.as_object_mut() {
            obj.insert("$defs".into(), Value::Object(defs));
        }
        let (calls_rule, opener) = match self {
            CallFormat::Hermes => {
                let body = format!("%json {calls} \"\\n</tool_call>\"");
                // One call, then up to `most_calls - 1` more, each after a newline. The
                // first may follow blank space (models write a newline before it): in
                // its opening tag's lexeme, which free text (that may start with blank
                // space too) cannot be, so the two are told apart at the tag's end.
                let mut more = String::new();
                for _ in 1..tools.most_calls() {
                    more = format!("(\"\\n\" call {more})?");
                }
                let rule = format!(
                    "calls: first {more}\nfirst: FIRST {body}\ncall: \"<tool_call>\\n\" {body}\nFIRST: /[ \\t\\r\\n]{{0,8}}<tool_call>\\n/\n"
                );
                (rule, "<tool_call>")
            }
            CallFormat::Llama3Json | CallFormat::Generic => {
                (format!("calls: %json {calls}\n"), "\\{")
            }
        };
        // Free text is not a call: it does not start like one (after blank space). For a
        // thinking model, nor like a block (which would take the calls with it), and it
        // starts with no blank space: what follows a block is the grammar's own lexeme
        // (llguidance's lexer takes the longest match without going back, so blank
        // space that text could also begin with would never end before a call).
        let text = match thinks {
            true => format!("/(?s:([^ \\t\\r\\n].*)?)/ & ~/(?s:({opener}|<think>).*)/"),
            false => format!("/(?s:.*)/ & ~/(?s:[ \\t\\r\\n]*{opener}.*)/"),
        };
        match (&tools.choice, answer) {
            (Choice::Auto, Some(schema)) => format!(
                "{root}: calls | text\n{calls_rule}text: %json {}\n",
                compact(schema.clone())
            ),
            (Choice::Auto, None) => {
                format!("{root}: calls | text\n{calls_rule}text: TEXT\nTEXT: {text}\n")
            }
            _ => format!("{root}: calls\n{calls_rule}"),
        }
    }

    /// One call: `{"name": <one of the callable functions>, <arguments key>: <its schema>}`,
    /// and the functions' `parameters`, which the calls refer to, to be put under the
    /// root's `$defs`.
    fn call_schema(self, tools: &ToolRequest) -> (Value, Map<String, Value>) {
        let key = self.arguments_key();
        let mut defs = Map::new();
        let options: Vec<Value> = tools
            .callable()
            .enumerate()
            .map(|(i, f)| {
                // Only the declared properties, as OpenAI's strict mode has it, unless the
                // schema says otherwise (left free, a small model invents keys forever).
                // A schema that names no type (`{}`, or properties alone) is an object's:
                // arguments are a JSON object.
                let mut parameters = f.parameters.clone();
                if let Some(obj) = parameters.as_object_mut() {
                    obj.entry("type").or_insert(json!("object"));
                    // A function that declares no properties takes `{}`; not beside a
                    // root `$ref` or combinator (as pydantic writes a recursive model),
                    // which says what the arguments hold.
                    let composed = ["$ref", "allOf", "anyOf", "oneOf", "required"]
                        .iter()
                        .any(|k| obj.contains_key(*k));
                    if !obj.contains_key("properties") && !composed {
                        obj.entry("additionalProperties").or_insert(json!(false));
                    }
                }
                close_objects(&mut parameters, false);
                let name = format!("function{i}");
                reroot(&mut parameters, &format!("#/$defs/{name}"));
                defs.insert(name.clone(), parameters);
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": f.name},
                        key: {"$ref": format!("#/$defs/{name}")},
                    },
                    "required": ["name", key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let call = match options.len() {
            1 => options.into_iter().next().unwrap_or_default(),
            _ => json!({"anyOf": options}),
        };
        (call, defs)
    }
}

/// A grammar compile error as a client can read it, on one line: without the Lark
/// position, the listing of the internal grammar that follows, or the path where the
/// call grammar keeps the function's schema. A first line that ends in `:` has its
/// reason on the next ones (a regex error: the pattern, carets under it, `error: ..`).
pub fn explain(error: &str) -> String {
    let mut lines = error.lines();
    let first = lines.next().unwrap_or_default();
    let mut line = match first.split_once("): ") {
        Some((at, rest)) if at.starts_with("at ") => rest,
        _ => first,
    }
    .to_string();
    if line.ends_with(':') {
        let listing = |l: &str| {
            l.split_once(" |")
                .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        for next in lines.map(str::trim) {
            if next.is_empty() || listing(next) {
                break;
            }
            if !next.bytes().all(|b| b == b'^') {
                line.push(' ');
                line.push_str(next);
            }
        }
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line.as_str();
    while let Some(i) = rest.find("/$defs/function") {
        out.push_str(&rest[..i]);
        rest = rest[i + "/$defs/function".len()..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    if out.starts_with("panic: ") {
        // An internal assertion (a grammar of more than 65,535 symbols): its text would
        // tell a client nothing.
        return "the grammar engine could not compile it: the schema is too large".into();
    }
    open_at_once(&out).unwrap_or(out)
}

/// The engine's limit on the alternatives open at once, said in a schema's terms (its
/// own words advise on a grammar's recursion, which a client does not write).
fn open_at_once(error: &str) -> Option<String> {
    let (_, rest) = error.split_once("Current row has ")?;
    let (items, rest) = rest.split_once(" items; max is ")?;
    let max = rest.split(|c: char| !c.is_ascii_digit()).next()?;
    Some(format!(
        "the grammar engine gave up on it: it leaves {items} alternatives open at once, more than the engine's {max} (an object with hundreds of optional properties, or an `anyOf` or `enum` of thousands)"
    ))
}

/// Re-roots a function's local references (`#`, `#/$defs/..`, `#/definitions/..`,
/// `#/properties/..`), written against its `parameters` as their own document, at `root`,
/// where the call grammar keeps that schema; pydantic's nested models and recursive
/// schemas refer to themselves this way. Values that are data, not schemas (`const`,
/// `enum`, `default`, `examples`), are left as they are, and so are anchors (`#name`)
/// and everything under an `$id`, whose references resolve against that resource.
fn reroot(schema: &mut Value, root: &str) {
    match schema {
        Value::Object(obj) if obj.contains_key("$id") => {}
        Value::Object(obj) => {
            for (k, v) in obj.iter_mut() {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) if r == "#" || r.starts_with("#/") => {
                        *r = format!("{root}{}", &r[1..]);
                    }
                    ("const" | "enum" | "default" | "examples", _) => {}
                    // Maps from names (which may be `const` or `$ref`) to schemas.
                    (
                        "properties" | "patternProperties" | "$defs" | "definitions"
                        | "dependentSchemas" | "dependencies",
                        Value::Object(named),
                    ) => named.values_mut().for_each(|v| reroot(v, root)),
                    (_, v) => reroot(v, root),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| reroot(v, root)),
        _ => {}
    }
}

/// Closes every object schema that declares `properties` and says nothing of others to
/// those properties, as OpenAI's strict mode has it, at any depth (nested objects, array
/// items, `anyOf`/`oneOf` branches, `$defs`). Not where that could refuse what the schema
/// allows: beside `$ref` or `allOf` (which may add properties), as a branch of `allOf`
/// (each branch sees every key of the object), or where `required` names a property
/// that is not declared. Data (`const`, `enum`, `default`, `examples`) and the schemas
/// whose meaning closing would turn around (`not`, `if`) are left as they are.
pub fn close_objects(schema: &mut Value, in_all_of: bool) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::Object(properties)) = obj.get("properties") {
        let said = [
            "additionalProperties",
            "patternProperties",
            "unevaluatedProperties",
            "$ref",
            "allOf",
        ]
        .iter()
        .any(|k| obj.contains_key(*k));
        let declared = obj
            .get("required")
            .and_then(Value::as_array)
            .is_none_or(|r| {
                r.iter()
                    .all(|n| n.as_str().is_some_and(|n| properties.contains_key(n)))
            });
        if !said && !in_all_of && declared {
            obj.insert("additionalProperties".into(), json!(false));
        }
    }
    for (key, value) in obj.iter_mut() {
        match (key.as_str(), value) {
            // Maps from names to schemas.
            (
                "properties" | "patternProperties" | "$defs" | "definitions",
                Value::Object(named),
            ) => named.values_mut().for_each(|v| close_objects(v, false)),
            ("items" | "prefixItems" | "anyOf" | "oneOf", Value::Array(schemas)) => {
                schemas.iter_mut().for_each(|v| close_objects(v, false))
            }
            ("items" | "additionalProperties" | "additionalItems", v) => close_objects(v, false),
            // Applied beside the schema they sit in, to the same object.
            ("allOf", Value::Array(branches)) => {
                branches.iter_mut().for_each(|v| close_objects(v, true))
            }
            ("dependentSchemas", Value::Object(named)) => {
                named.values_mut().for_each(|v| close_objects(v, true))
            }
            ("then" | "else", v) => close_objects(v, true),
            _ => {}
        }
    }
}

/// Whether `text` starts with `opener`: `Some(true)` it does, `Some(false)` it does not,
/// `None` it is too short to say (it is the start of `opener`).
fn starts_with(text: &str, opener: &str) -> Option<bool> {
    if text.len() >= opener.len() {
        Some(text.starts_with(opener))
    } else if opener.starts_with(text) {
        None
    } else {
        Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_comes_from_the_template() {
        let qwen = "{%- if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools> <tool_call>{% endif %}";
        assert_eq!(CallFormat::detect(qwen), CallFormat::Hermes);
        let llama = "{%- if tools %}{{- '<|start_header_id|>ipython' }} {\"name\": function name, \"parameters\": dictionary}{% endif %}";
        assert_eq!(CallFormat::detect(llama), CallFormat::Llama3Json);
        let chatml = "{% for message in messages %}<|im_start|>{{ message['role'] }}{% endfor %}";
        assert_eq!(CallFormat::detect(chatml), CallFormat::Generic);
    }

    #[test]
    fn the_engine_s_row_limit_is_said_in_a_schema_s_terms() {
        let e = "the grammar engine gave up on it (Parser Error: Current row has 2003 items; max is 2000; consider making your grammar left-recursive if it's right-recursive)";
        let said = explain(e);
        assert!(
            said.contains("leaves 2003 alternatives open at once, more than the engine's 2000"),
            "{said}"
        );
        assert!(!said.contains("left-recursive"), "{said}");
        assert_eq!(explain("`x`: bad"), "`x`: bad");
        let panic = "panic: assertion failed: grammar.symbols.len() < u16::MAX as usize";
        assert!(explain(panic).ends_with("the schema is too large"));
    }

    #[test]
    fn a_call_is_recognised_by_its_start() {
        let none: &[String] = &[];
        assert_eq!(CallFormat::Hermes.starts_call("<tool", false, none), None);
        let start = CallFormat::Hermes.starts_call("<tool_call>\n{", false, none);
        assert_eq!(start, Some(true));
        assert_eq!(
            CallFormat::Hermes.starts_call("<b>", false, none),
            Some(false)
        );
        assert_eq!(
            CallFormat::Hermes.starts_call("Hello", false, none),
            Some(false)
        );
        let start = CallFormat::Generic.starts_call("{\"tool", false, none);
        assert_eq!(start, Some(true));
        assert_eq!(
            CallFormat::Generic.starts_call("Sure", false, none),
            Some(false)
        );
        assert_eq!(CallFormat::Generic.starts_call("", false, none), None);
    }

    #[test]
    fn beside_a_json_answer_a_call_is_told_by_its_key_and_a_function_name() {
        let functions = ["get_weather".to_string(), "get_time".to_string()];
        let generic = |text| CallFormat::Generic.starts_call(text, true, &functions);
        assert_eq!(generic("{\"tool"), None);
        assert_eq!(generic("{\"city\""), Some(false));
        assert_eq!(generic("{\"tool_calls\": [{\"name\": \"get_"), None);
        assert_eq!(
            generic("{\"tool_calls\": [{\"name\": \"get_time\""),
            Some(true)
        );
        // The answer's own `tool_calls` key, naming no function that can be called.
        assert_eq!(generic("{\"tool_calls\": [{\"name\": \"<func"), Some(false));
        assert_eq!(generic("{\"tool_calls\": []"), Some(false));
        let llama = |text| CallFormat::Llama3Json.starts_call(text, true, &functions);
        assert_eq!(llama("{\"nam"), None);
        assert_eq!(llama("{\"n\":"), Some(false));
        assert_eq!(llama("{\"name\": \"get_weather\""), Some(true));
        assert_eq!(llama("{\"name\": \"Ann\""), Some(false));
    }
}
