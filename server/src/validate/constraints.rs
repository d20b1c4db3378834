//! Constrained output: the fields that ask for it (`response_format`, and other servers'
//! `guided_*`, `structured_outputs`, `json_schema`, `regex`), read into a schema, a
//! regular expression or a list of choices, and compiled into a [`Constraint`] for this
//! vocabulary, with errors that name the field (or the function) at fault.

use serde_json::{json, Value};

use crate::engine::ModelInfo;
use crate::error::ApiError;
use crate::grammar::{Constraint, Grammars};
use crate::openai::OtherConstraintFields;
use crate::reasoning::Start;
use crate::tools::{self, ToolRequest};

/// What another server's constrained-output field asks for.
#[derive(Debug, Clone)]
pub enum Guided {
    /// A JSON schema (`guided_json`, `structured_outputs.json`, llama.cpp's `json_schema`).
    Json(Value),
    /// A regular expression the whole answer matches (`guided_regex`, SGLang's `regex`).
    Regex(String),
    /// One of these strings, exactly (`guided_choice`).
    Choice(Vec<String>),
}

/// The constraint another server's field asks for, and the field; at most one may be
/// given. Grammars (vLLM's `guided_grammar`, llama.cpp's GBNF `grammar`) are refused by
/// name: their dialects are not this server's.
pub fn guided(f: &OtherConstraintFields) -> Result<Option<(&'static str, Guided)>, ApiError> {
    let given: Vec<(&'static str, &Value)> = [
        ("guided_json", &f.guided_json),
        ("guided_regex", &f.guided_regex),
        ("guided_choice", &f.guided_choice),
        ("guided_grammar", &f.guided_grammar),
        ("structured_outputs", &f.structured_outputs),
        ("json_schema", &f.json_schema),
        ("grammar", &f.grammar),
        ("regex", &f.regex),
    ]
    .into_iter()
    .filter_map(|(field, v)| v.as_ref().filter(|v| !v.is_null()).map(|v| (field, v)))
    .collect();
    let Some(&(field, value)) = given.first() else {
        return Ok(None);
    };
    if let Some((other, _)) = given.get(1) {
        return Err(ApiError::bad(
            other,
            format!("give one constraint: `{field}` and `{other}` were both given"),
        ));
    }
    let bad = |message: String| ApiError::bad(field, message);
    let schema = |v: &Value| match v {
        Value::Object(_) => Ok(v.clone()),
        Value::String(s) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                bad(format!(
                    "`{field}` must be a JSON schema (an object, or its text)"
                ))
            }),
        _ => Err(bad(format!(
            "`{field}` must be a JSON schema (an object, or its text)"
        ))),
    };
    let regex = |v: &Value| match v {
        Value::String(s) => Ok(Guided::Regex(s.clone())),
        _ => Err(bad(format!(
            "`{field}` must be a regular expression (a string)"
        ))),
    };
    let choice = |v: &Value| match v.as_array() {
        Some(items) if !items.is_empty() && items.iter().all(Value::is_string) => {
            Ok(Guided::Choice(
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            ))
        }
        _ => Err(bad(format!(
            "`{field}` must be a non-empty list of strings"
        ))),
    };
    let grammar = || {
        bad(format!(
            "`{field}` (a grammar) is not supported: send a JSON schema (`response_format`) or a regular expression (`guided_regex`)"
        ))
    };
    let guided = match field {
        "guided_json" | "json_schema" => Guided::Json(schema(value)?),
        "guided_regex" | "regex" => regex(value)?,
        "guided_choice" => choice(value)?,
        "structured_outputs" => {
            let Some(o) = value.as_object() else {
                return Err(bad("`structured_outputs` must be an object".into()));
            };
            let set: Vec<(&String, &Value)> = o.iter().filter(|(_, v)| !v.is_null()).collect();
            match set.as_slice() {
                [(k, v)] if k.as_str() == "json" => Guided::Json(schema(v)?),
                [(k, v)] if k.as_str() == "regex" => regex(v)?,
                [(k, v)] if k.as_str() == "choice" => choice(v)?,
                [(k, v)] if k.as_str() == "json_object" && **v == json!(true) => {
                    Guided::Json(json!({"type": "object"}))
                }
                [(k, _)] if matches!(k.as_str(), "grammar" | "structural_tag") => {
                    return Err(grammar())
                }
                _ => {
                    return Err(bad(
                        "`structured_outputs` must set one of `json`, `regex`, `choice` or `json_object`".into(),
                    ))
                }
            }
        }
        _ => return Err(grammar()),
    };
    Ok(Some((field, guided)))
}

/// The constraint `guided` asks for, errors naming `field`; after a thinking block when
/// `thinking` says where the answer starts.
pub fn guided_constraint(
    info: &ModelInfo,
    field: &'static str,
    guided: &Guided,
    thinking: Option<Start>,
) -> Result<Constraint, ApiError> {
    let rx = match guided {
        Guided::Json(schema) => return json_constraint(info, field, schema.clone(), thinking),
        Guided::Regex(rx) => rx.clone(),
        Guided::Choice(choices) => choices
            .iter()
            .map(|c| regex_syntax::escape(c))
            .collect::<Vec<_>>()
            .join("|"),
    };
    grammars(info, field)?
        .regex(field, &rx, thinking)
        .map_err(|e| {
            let e = tools::format::explain(&e);
            ApiError::bad(field, format!("`{field}` cannot be enforced: {e}"))
        })
}

/// `response_format`: `text` (no schema), `json_object` (any JSON object) or
/// `json_schema` (`{"json_schema": {"schema": {...}}}`): the schema an answer follows.
pub fn response_format(rf: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(rf) = rf.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = |msg: String| ApiError::bad("response_format", msg);
    let schema = match rf.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => json!({"type": "object"}),
        Some("json_schema") => match rf.get("json_schema").and_then(|j| j.get("schema")) {
            Some(schema) if schema.is_object() => schema.clone(),
            _ => {
                return Err(bad(
                    "`response_format.json_schema.schema` must be a JSON schema object".into(),
                ))
            }
        },
        other => {
            return Err(bad(format!(
            "`response_format.type` must be \"text\", \"json_object\" or \"json_schema\", got {}",
            other.map_or_else(|| "nothing".to_string(), |t| format!("{t:?}"))
        )))
        }
    };
    Ok(Some(schema))
}

/// A JSON schema compiled into a constraint for this vocabulary; errors name `param`.
/// After a thinking block when `thinking` says where the answer starts.
pub fn json_constraint(
    info: &ModelInfo,
    param: &'static str,
    schema: Value,
    thinking: Option<Start>,
) -> Result<Constraint, ApiError> {
    grammars(info, param)?
        .json_schema(param, schema, thinking)
        .map_err(|e| {
            let e = tools::format::explain(&e);
            ApiError::bad(param, format!("the schema cannot be enforced: {e}"))
        })
}

/// Most functions compiled one by one to find the one the engine refuses: past them the
/// error says only that the functions' `parameters` cannot be enforced.
const FUNCTIONS_DIAGNOSED: usize = 32;

/// The first callable function whose `parameters`, alone and closed as the call grammar
/// holds them, cannot be compiled, named as sent with the engine's reason; `None` when
/// each compiles alone. Only asked once the calls' grammar has failed; nothing compiled
/// here is kept in the grammar cache.
pub fn unenforceable_function(grammars: &Grammars, tools: &ToolRequest) -> Option<String> {
    tools
        .functions
        .iter()
        .enumerate()
        .filter(|(_, f)| tools.callable().any(|c| c.name == f.name))
        .take(FUNCTIONS_DIAGNOSED)
        .find_map(|(i, f)| {
            let mut parameters = f.parameters.clone();
            tools::format::close_objects(&mut parameters, false);
            let e = grammars.check_json_schema(parameters).err()?;
            Some(format!(
                "{} (function {:?}) cannot be enforced: {}",
                tools.shape.parameters(i),
                f.name,
                tools::format::explain(&e)
            ))
        })
}

/// This model's grammars, or why it has none (an error naming `param`).
fn grammars<'a>(info: &'a ModelInfo, param: &'static str) -> Result<&'a Grammars, ApiError> {
    info.grammars.as_deref().map_err(|e| {
        ApiError::bad(
            param,
            format!("structured output is unavailable for this model: {e}"),
        )
    })
}
