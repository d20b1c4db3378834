//! Function calling, shared by every endpoint that takes tools: which functions a request
//! offers and how it lets the model use them ([`ToolRequest`]), how the conversation's
//! earlier calls and results reach the model ([`prompt`]), the constraint that makes
//! every call parse and follow its function's schema ([`format`]), how the generated
//! text is read back into calls ([`read`]), and the rule that a conversation's calls are
//! answered ([`answers`]).
//!
//! Formats: templates that render `tools` themselves get their model's own call syntax
//! when it is one we know (Hermes `<tool_call>` as Qwen2.5/Qwen3 use, Llama 3.x JSON);
//! every other model gets one generic JSON form, `{"tool_calls": [{"name", "arguments"}]}`,
//! described to it in the system turn.

pub mod answers;
pub mod format;
pub mod prompt;
pub mod read;

use serde_json::{json, Value};

use crate::error::ApiError;

pub use answers::{Broken, Ledger};
pub use format::CallFormat;
pub use read::{CallReader, Decision, ToolCall};

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionSpec {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema for the arguments object (`{"type": "object", ...}`).
    pub parameters: Value,
}

impl FunctionSpec {
    /// OpenAI's Chat Completions shape, which chat templates read.
    pub fn to_openai(&self) -> Value {
        let mut function = serde_json::Map::new();
        function.insert("name".into(), json!(self.name));
        if let Some(d) = &self.description {
            function.insert("description".into(), json!(d));
        }
        function.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": function})
    }
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// No call is possible.
    None,
    /// The model answers in text or calls.
    Auto,
    /// The model must call (one of the functions).
    Required,
    /// The model must call this function.
    Named(String),
}

/// Which endpoint's shapes a request's tools come in (errors describe them as sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// `{"type": "function", "function": {"name", "parameters"}}`.
    Chat,
    /// `{"type": "function", "name", "parameters"}`.
    Responses,
}

impl Shape {
    /// The field of the `i`th function's `parameters`, as the endpoint spells it.
    pub fn parameters(self, i: usize) -> String {
        match self {
            Shape::Chat => format!("`tools[{i}].function.parameters`"),
            Shape::Responses => format!("`tools[{i}].parameters`"),
        }
    }

    fn named_choice(self) -> &'static str {
        match self {
            Shape::Chat => "{\"type\": \"function\", \"function\": {\"name\": ...}}",
            Shape::Responses => "{\"type\": \"function\", \"name\": ...}",
        }
    }
}

/// What a request offers the model to call, validated.
#[derive(Debug, Clone)]
pub struct ToolRequest {
    pub functions: Vec<FunctionSpec>,
    pub choice: Choice,
    /// More than one call in one answer (`parallel_tool_calls`, default true).
    pub parallel: bool,
    /// Most calls in one answer when several are allowed (`--max-tool-calls`).
    pub max_calls: usize,
    /// The endpoint's shapes, to name a function's fields as the client sent them.
    pub shape: Shape,
}

impl ToolRequest {
    /// Reads `tools`, `tool_choice` and `parallel_tool_calls` of a request; `None` when
    /// it offers no tools. `functions` are `(name, description, parameters)` as the
    /// endpoint's wire shape (`shape`) holds them.
    pub fn new(
        shape: Shape,
        functions: Vec<FunctionSpec>,
        tool_choice: Option<&Value>,
        parallel: Option<bool>,
        max_calls: usize,
    ) -> Result<Option<Self>, ApiError> {
        let bad = |m: String| ApiError::bad("tool_choice", m);
        if functions.is_empty() {
            return match tool_choice {
                None | Some(Value::Null) => Ok(None),
                // Nothing to call either way (and what every response reports back
                // when it offered no tools, so a client resending it is not refused).
                Some(Value::String(s)) if s == "none" || s == "auto" => Ok(None),
                Some(_) => Err(bad(
                    "`tool_choice` \"required\" or a named function requires `tools`".into(),
                )),
            };
        }
        for (i, f) in functions.iter().enumerate() {
            check_name(&f.name)
                .map_err(|m| ApiError::bad("tools", format!("`tools[{i}]`: {m}")))?;
            if functions[..i].iter().any(|g| g.name == f.name) {
                return Err(ApiError::bad(
                    "tools",
                    format!("`tools[{i}]`: the function name {:?} is used twice", f.name),
                ));
            }
            if !f.parameters.is_object() {
                return Err(ApiError::bad(
                    "tools",
                    format!("{} must be a JSON schema object", shape.parameters(i)),
                ));
            }
            // Arguments are a JSON object (OpenAI's rule); a schema of another type could
            // never be read back as a call.
            if let Some(t) = f.parameters.get("type").filter(|t| *t != "object") {
                return Err(ApiError::bad(
                    "tools",
                    format!(
                        "{} must be a schema of `\"type\": \"object\"`, not {t}",
                        shape.parameters(i)
                    ),
                ));
            }
        }
        for (i, f) in functions.iter().enumerate() {
            // As the call grammar holds it: objects closed to their declared properties.
            let mut parameters = f.parameters.clone();
            format::close_objects(&mut parameters, false);
            crate::schema_check::check(&parameters)
                .map_err(|m| ApiError::bad("tools", format!("{}: {m}", shape.parameters(i))))?;
        }
        // Every function's schema goes in one grammar, where their `$id`s are one
        // namespace: a shared one would resolve one function's references in another's.
        if let Some(id) = crate::schema_check::shared_id(functions.iter().map(|f| &f.parameters)) {
            return Err(ApiError::bad(
                "tools",
                format!("two functions' `parameters` declare the `$id` {id:?}; give each its own"),
            ));
        }
        let choice = match tool_choice {
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(bad(format!(
                    "`tool_choice` must be \"none\", \"auto\", \"required\" or {}, got {other:?}",
                    shape.named_choice()
                )))
                }
            },
            Some(v) if v.get("type").and_then(Value::as_str) == Some("allowed_tools") => {
                return Err(bad(
                    "`tool_choice` of type \"allowed_tools\" is not supported: offer only the allowed functions in `tools`".into(),
                ));
            }
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .or_else(|| v.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        bad(format!(
                            "`tool_choice` must name a function: {}",
                            shape.named_choice()
                        ))
                    })?;
                if !functions.iter().any(|f| f.name == name) {
                    return Err(bad(format!(
                        "`tool_choice` names {name:?}, which is not among `tools`"
                    )));
                }
                Choice::Named(name.to_string())
            }
        };
        Ok(Some(Self {
            functions,
            choice,
            parallel: parallel.unwrap_or(true),
            max_calls: max_calls.max(1),
            shape,
        }))
    }

    /// Whether a call can be made at all.
    pub fn active(&self) -> bool {
        self.choice != Choice::None
    }

    /// The functions a call may name.
    pub fn callable(&self) -> impl Iterator<Item = &FunctionSpec> {
        self.functions.iter().filter(move |f| match &self.choice {
            Choice::Named(n) => &f.name == n,
            _ => true,
        })
    }

    /// Most calls in one answer.
    pub fn most_calls(&self) -> usize {
        match !self.parallel || matches!(self.choice, Choice::Named(_)) {
            true => 1,
            false => self.max_calls,
        }
    }
}

/// OpenAI's rule for function names: `[a-zA-Z0-9_-]{1,64}`.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "function names are 1 to 64 letters, digits, `_` or `-`, got {name:?}"
        )),
    }
}

/// A new call id, as OpenAI forms them.
pub fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() & ((1u128 << 96) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> FunctionSpec {
        FunctionSpec {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }
    }

    fn param(e: ApiError) -> Option<&'static str> {
        match e {
            ApiError::BadRequest { param, .. } => param,
            _ => None,
        }
    }

    #[test]
    fn tool_choice_forms() {
        let forms = [
            (None, Choice::Auto),
            (Some(json!("none")), Choice::None),
            (Some(json!("auto")), Choice::Auto),
            (Some(json!("required")), Choice::Required),
            (
                Some(json!({"type": "function", "function": {"name": "get_weather"}})),
                Choice::Named("get_weather".into()),
            ),
        ];
        for (given, want) in forms {
            let t = ToolRequest::new(Shape::Chat, vec![weather()], given.as_ref(), None, 8)
                .unwrap()
                .unwrap();
            assert_eq!(t.choice, want);
            assert!(t.parallel);
        }
    }

    #[test]
    fn bad_tools_name_the_field() {
        let named = |n: &str| json!({"type": "function", "function": {"name": n}});
        let cases = [
            (vec![], Some(json!("required")), "tool_choice"),
            (vec![weather()], Some(named("nope")), "tool_choice"),
            (vec![weather()], Some(json!("sometimes")), "tool_choice"),
            (vec![weather(), weather()], None, "tools"),
            (
                vec![FunctionSpec {
                    name: "bad name".into(),
                    ..weather()
                }],
                None,
                "tools",
            ),
            (
                vec![FunctionSpec {
                    parameters: json!("a string"),
                    ..weather()
                }],
                None,
                "tools",
            ),
            (
                vec![FunctionSpec {
                    parameters: json!({"type": "string"}),
                    ..weather()
                }],
                None,
                "tools",
            ),
            (
                vec![FunctionSpec {
                    parameters: json!({"type": ["object", "null"]}),
                    ..weather()
                }],
                None,
                "tools",
            ),
        ];
        for (functions, choice, field) in cases {
            let e = ToolRequest::new(Shape::Chat, functions, choice.as_ref(), None, 8)
                .expect_err("refused");
            assert_eq!(param(e), Some(field));
        }
        // No tools and no choice (or "none"): nothing to do.
        assert!(ToolRequest::new(Shape::Chat, vec![], None, None, 8)
            .unwrap()
            .is_none());
        assert!(
            ToolRequest::new(Shape::Chat, vec![], Some(&json!("none")), None, 8)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn call_ids_look_like_openai_ones() {
        let id = call_id();
        assert!(id.starts_with("call_") && id.len() == 29, "{id}");
        assert_ne!(call_id(), id);
    }
}
