//! `input` read into items, and a conversation's items turned into the chat messages the
//! template renders (the same path `/v1/chat/completions` takes from there).

use std::collections::HashSet;

use serde_json::Value;

use super::wire::{new_id, CallOutput, Item, Part, ReasoningText};
use crate::error::ApiError;
use crate::openai::{MessageContent, WireCalledFunction, WireMessage, WireToolCall};
use crate::tools::{Broken, Ledger};

const ROLES: [&str; 4] = ["user", "system", "developer", "assistant"];

/// The longest item `id` or `call_id` taken (OpenAI's are ~30-50 bytes).
const MAX_ID_BYTES: usize = 256;

/// `input` as items, each with an id (given ones kept), in the order given.
pub fn read(input: Option<Value>) -> Result<Vec<Item>, ApiError> {
    match input {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(text)) => Ok(vec![message("user", vec![Part::InputText { text }])]),
        Some(Value::Array(values)) => values
            .into_iter()
            .enumerate()
            .map(|(i, v)| item(i, v))
            .collect(),
        Some(_) => Err(bad("`input` must be a string or a list of items".into())),
    }
}

fn bad(message: String) -> ApiError {
    ApiError::bad("input", message)
}

fn message(role: &str, content: Vec<Part>) -> Item {
    Item::Message {
        id: new_id("msg"),
        status: "completed".into(),
        role: role.into(),
        content,
    }
}

fn item(i: usize, v: Value) -> Result<Item, ApiError> {
    let Value::Object(map) = v else {
        return Err(bad(format!("`input[{i}]` must be an object")));
    };
    let str_field = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_string);
    // Identifiers are not part of the prompt, so its limit does not bound them: they are
    // bounded here, as every later turn of the conversation reads them back.
    for key in ["id", "call_id"] {
        if map.get(key).is_some_and(|v| !v.is_null() && !v.is_string()) {
            return Err(bad(format!("`input[{i}].{key}` must be a string")));
        }
        if str_field(key).is_some_and(|v| v.len() > MAX_ID_BYTES) {
            return Err(bad(format!(
                "`input[{i}].{key}` is longer than {MAX_ID_BYTES} bytes"
            )));
        }
    }
    if map
        .get("type")
        .is_some_and(|t| !t.is_null() && !t.is_string())
    {
        return Err(bad(format!("`input[{i}].type` must be a string")));
    }
    let kind = str_field("type");
    let id = |prefix: &str| str_field("id").unwrap_or_else(|| new_id(prefix));
    let required = |key: &str| {
        str_field(key).filter(|v| !v.is_empty()).ok_or_else(|| {
            bad(format!(
                "`input[{i}].{key}` is required (a non-empty string)"
            ))
        })
    };
    match kind.as_deref() {
        None | Some("message") => {
            let role = required("role")?;
            if !ROLES.contains(&role.as_str()) {
                return Err(bad(format!(
                    "`input[{i}].role` must be one of {ROLES:?}, got {role:?}"
                )));
            }
            let content = match map.get("content") {
                Some(Value::String(text)) if role == "assistant" => {
                    vec![Part::output_text(text.clone())]
                }
                Some(Value::String(text)) => vec![Part::InputText { text: text.clone() }],
                // Stored as the role's kind of part (an assistant's `output_text`, the
                // others' `input_text`), whichever the client wrote, as the SDK's
                // types of the items listed back have them.
                Some(Value::Array(parts)) => parts
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        let text = text_part(&format!("input[{i}].content[{j}]"), p)?;
                        Ok(match (role.as_str(), text) {
                            ("assistant", Part::InputText { text }) => Part::output_text(text),
                            ("assistant", part) => part,
                            (_, Part::Refusal { .. }) => {
                                return Err(bad(format!(
                                    "`input[{i}].content[{j}]`: only assistant messages carry a refusal"
                                )))
                            }
                            (_, part) => Part::InputText {
                                text: part.text().to_string(),
                            },
                        })
                    })
                    .collect::<Result<_, ApiError>>()?,
                _ => {
                    return Err(bad(format!(
                        "`input[{i}].content` must be a string or a list of text parts"
                    )))
                }
            };
            Ok(Item::Message {
                id: id("msg"),
                status: "completed".into(),
                role,
                content,
            })
        }
        Some("function_call") => {
            let arguments = match map.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                None | Some(Value::Null) => "{}".into(),
                Some(v) => v.to_string(),
            };
            // Checked here, where the item's place is known: the chat messages it becomes
            // sit after the instructions and the stored history.
            if !arguments.trim().is_empty() {
                if let Err(e) = crate::tools::prompt::arguments_value(&arguments) {
                    return Err(bad(format!("`input[{i}].arguments` is not JSON: {e}")));
                }
            }
            Ok(Item::FunctionCall {
                id: id("fc"),
                call_id: required("call_id")?,
                name: required("name")?,
                arguments,
                status: "completed".into(),
            })
        }
        Some("function_call_output") => {
            let output = match map.get("output") {
                Some(Value::String(s)) => CallOutput::Text(s.clone()),
                Some(Value::Array(parts)) => CallOutput::Parts(
                    parts
                        .iter()
                        .enumerate()
                        .map(|(j, p)| text_part(&format!("input[{i}].output[{j}]"), p))
                        .collect::<Result<_, _>>()?,
                ),
                _ => {
                    return Err(bad(format!(
                        "`input[{i}].output` must be a string or a list of text parts"
                    )))
                }
            };
            Ok(Item::FunctionCallOutput {
                id: id("fco"),
                call_id: required("call_id")?,
                output,
                status: "completed".into(),
            })
        }
        // A thinking model's reasoning, sent back as it came: the template shows it
        // where it keeps reasoning (in the assistant turn that follows).
        Some("reasoning") => {
            // Each part as sent, once it is known to carry its text.
            let parts = |key: &str| -> Result<Vec<Value>, ApiError> {
                match map.get(key) {
                    None | Some(Value::Null) => Ok(Vec::new()),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .enumerate()
                        .map(|(j, p)| match p.get("text").and_then(Value::as_str) {
                            Some(_) => Ok(p.clone()),
                            None => Err(bad(format!(
                                "`input[{i}].{key}[{j}]` must be a part with a `text` field"
                            ))),
                        })
                        .collect(),
                    Some(_) => Err(bad(format!("`input[{i}].{key}` must be a list of parts"))),
                }
            };
            let summary = parts("summary")?;
            let content = parts("content")?
                .iter()
                .map(|p| ReasoningText {
                    text: p["text"].as_str().unwrap_or_default().to_string(),
                })
                .collect();
            Ok(Item::Reasoning {
                id: id("rs"),
                summary,
                content,
            })
        }
        Some(other) => Err(bad(format!(
            "`input[{i}]` has type {other:?}; this server takes \"message\", \"function_call\", \"function_call_output\" and \"reasoning\" items"
        ))),
    }
}

/// Checks `items` (the request's `input`, which errors index) against the conversation
/// so far, `history`:
/// - every item id is new: ids name items in `input_items` pages (a repeated one would
///   send a page cursor back), and an item resent from the history would be seen twice;
/// - every call of the previous response's output (`previous`, the end of `history`) is
///   answered in `items`, as OpenAI requires of a turn that continues one that ended in
///   calls;
/// - as in chat's messages, the outputs right after a run of calls answer each of them
///   once, before the next message or run of calls, and no two calls share a `call_id`.
pub fn check_items(history: &[Item], previous: &[Item], items: &[Item]) -> Result<(), ApiError> {
    let mut ids: HashSet<&str> = history.iter().map(Item::id).collect();
    for (i, item) in items.iter().enumerate() {
        if !ids.insert(item.id()) {
            return Err(bad(format!(
                "`input[{i}]`: duplicate item id {:?} (already in this input or in the previous responses)",
                item.id()
            )));
        }
    }
    let answered = |call_id: &str| {
        items
            .iter()
            .any(|i| matches!(i, Item::FunctionCallOutput { call_id: c, .. } if c == call_id))
    };
    let open = previous.iter().find_map(|i| match i {
        Item::FunctionCall { call_id, .. } if !answered(call_id) => Some(call_id),
        _ => None,
    });
    if let Some(open) = open {
        return Err(bad(format!(
            "no function_call_output for the previous response's function_call with call_id {open:?}"
        )));
    }
    // Errors index `input`; the history's items were checked when they were sent.
    let at = |i: usize| match i.checked_sub(history.len()) {
        Some(i) => format!("`input[{i}]`"),
        None => "the stored conversation (previous_response_id)".to_string(),
    };
    let unanswered = |open: &[String]| {
        format!(
            "has no function_call_output for the function_call with call_id {:?} before it",
            open[0]
        )
    };
    // A run of calls is one turn: the outputs after it answer each of them.
    let mut calls = Ledger::default();
    let mut in_calls = false;
    for (i, item) in history.iter().chain(items).enumerate() {
        match item {
            Item::FunctionCall { call_id, name, .. } => {
                if !in_calls && !calls.open().is_empty() {
                    return Err(bad(format!("{} {}", at(i), unanswered(calls.open()))));
                }
                if calls.call(call_id.clone(), name.clone()).is_err() {
                    return Err(bad(format!(
                        "{}: call_id {call_id:?} is an earlier function_call's: an output could not say which it answers",
                        at(i)
                    )));
                }
                in_calls = true;
            }
            Item::FunctionCallOutput { call_id, .. } => {
                in_calls = false;
                match calls.answer(call_id) {
                    Ok(_) => {}
                    Err(Broken::Answered) => {
                        return Err(bad(format!(
                            "{}: function_call_output with call_id {call_id:?} answers a call that is already answered, or not of the last run of calls",
                            at(i)
                        )))
                    }
                    Err(_) => {
                        return Err(bad(format!(
                            "{}: function_call_output with call_id {call_id:?} answers no earlier function_call",
                            at(i)
                        )))
                    }
                }
            }
            Item::Message { .. } => {
                if !calls.open().is_empty() {
                    return Err(bad(format!("{} {}", at(i), unanswered(calls.open()))));
                }
                in_calls = false;
            }
            // Reasoning leads to the next message or run of calls.
            Item::Reasoning { .. } => {
                if !in_calls && !calls.open().is_empty() {
                    return Err(bad(format!("{} {}", at(i), unanswered(calls.open()))));
                }
            }
        }
    }
    if let Some(open) = calls.open().first() {
        return Err(bad(format!(
            "no function_call_output for the function_call with call_id {open:?}: every call in `input` must be answered"
        )));
    }
    Ok(())
}

/// A text content part (`input_text`, `output_text` or `text`), or an assistant's
/// `refusal` (what it said, as chat reads one).
fn text_part(at: &str, p: &Value) -> Result<Part, ApiError> {
    let kind = p.get("type").and_then(Value::as_str);
    let field = |name: &str| p.get(name).and_then(Value::as_str).map(str::to_string);
    match (kind, field("text"), field("refusal")) {
        (Some("input_text" | "text"), Some(text), _) => Ok(Part::InputText { text }),
        (Some("output_text"), Some(text), _) => Ok(Part::output_text(text)),
        (Some("refusal"), _, Some(refusal)) => Ok(Part::Refusal { refusal }),
        (kind, _, _) => Err(bad(format!(
            "`{at}`: only text parts (\"input_text\", \"output_text\") with a `text` field, or an assistant's \"refusal\", are supported, got type {}",
            kind.map_or_else(|| "nothing".to_string(), |k| format!("{k:?}"))
        ))),
    }
}

/// The conversation as chat messages: `instructions` first as the system turn, then every
/// item in order. A run of function calls is one assistant turn; each output a tool turn.
pub fn messages<'a>(
    instructions: Option<&str>,
    items: impl IntoIterator<Item = &'a Item>,
) -> Vec<WireMessage> {
    let mut out: Vec<WireMessage> = Vec::new();
    if let Some(text) = instructions.filter(|t| !t.is_empty()) {
        out.push(wire_message("system", text.to_string()));
    }
    // Reasoning goes with the assistant turn it led to (the next message or run of
    // calls). Reasoning that led to none (an answer cut off while thinking, sent back
    // before the next user turn) is an assistant turn of its own, with no text.
    let mut reasoning: Option<String> = None;
    for item in items {
        let leads_to = match item {
            Item::Message { role, .. } => role == "assistant",
            Item::FunctionCall { .. } => true,
            Item::Reasoning { .. } | Item::FunctionCallOutput { .. } => false,
        };
        if let Some(text) = reasoning.take_if(|_| !leads_to) {
            out.push(WireMessage {
                reasoning_content: Some(text),
                ..wire_message("assistant", String::new())
            });
        }
        match item {
            Item::Reasoning {
                summary, content, ..
            } => {
                // The reasoning itself, else its summary (what other servers return).
                let text: Vec<&str> = match content.is_empty() {
                    false => content.iter().map(|p| p.text.as_str()).collect(),
                    true => summary.iter().filter_map(|p| p["text"].as_str()).collect(),
                };
                reasoning = Some(text.join("\n"));
                continue;
            }
            Item::Message { role, content, .. } => {
                out.push(WireMessage {
                    reasoning_content: reasoning.take(),
                    ..wire_message(role, Part::joined(content))
                });
            }
            Item::FunctionCall {
                call_id,
                name,
                arguments,
                ..
            } => {
                let call = WireToolCall {
                    id: Some(call_id.clone()),
                    kind: Some("function".into()),
                    function: WireCalledFunction {
                        name: name.clone(),
                        arguments: Some(Value::String(arguments.clone())),
                    },
                };
                // A run of calls is one turn, unless reasoning came between them.
                match out.last_mut() {
                    Some(last)
                        if last.role == "assistant"
                            && last.tool_calls.is_some()
                            && reasoning.is_none() =>
                    {
                        last.tool_calls.get_or_insert_with(Vec::new).push(call);
                    }
                    _ => out.push(WireMessage {
                        tool_calls: Some(vec![call]),
                        reasoning_content: reasoning.take(),
                        ..wire_message("assistant", String::new())
                    }),
                }
            }
            Item::FunctionCallOutput {
                call_id, output, ..
            } => out.push(WireMessage {
                tool_call_id: Some(call_id.clone()),
                ..wire_message("tool", output.text())
            }),
        }
    }
    if let Some(text) = reasoning {
        out.push(WireMessage {
            reasoning_content: Some(text),
            ..wire_message("assistant", String::new())
        });
    }
    out
}

fn wire_message(role: &str, text: String) -> WireMessage {
    WireMessage {
        role: role.to_string(),
        content: Some(MessageContent::Text(text)),
        tool_calls: None,
        tool_call_id: None,
        name: None,
        reasoning_content: None,
        reasoning: None,
        refusal: None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_string_is_one_user_message() {
        let items = read(Some(json!("hi"))).unwrap();
        assert!(matches!(&items[..], [Item::Message { role, content, .. }]
            if role == "user" && content == &[Part::InputText { text: "hi".into() }]));
    }

    #[test]
    fn items_in_every_form_clients_send() {
        let items = read(Some(json!([
            {"role": "user", "content": "weather?"},
            {"type": "message", "role": "assistant", "id": "msg_1",
             "content": [{"type": "output_text", "text": "checking", "annotations": []}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": {"city": "Rome"}},
            {"type": "function_call_output", "call_id": "c1", "output": "rain"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "sun"}]},
        ])))
        .unwrap();
        assert_eq!(items.len(), 6);
        assert_eq!(items[1].id(), "msg_1");
        let wire = messages(Some("be brief"), &items);
        let roles: Vec<&str> = wire.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant", "assistant", "tool", "tool"]
        );
        let calls = wire[3].tool_calls.as_ref().unwrap();
        assert_eq!(calls.len(), 2, "a run of calls is one turn");
        assert_eq!(
            calls[1].function.arguments,
            Some(Value::String("{\"city\":\"Rome\"}".into()))
        );
        assert_eq!(wire[5].tool_call_id.as_deref(), Some("c2"));
        assert!(matches!(&wire[5].content, Some(MessageContent::Text(t)) if t == "sun"));
    }

    /// A function call's output sent as a list of parts is listed back as that list (it
    /// came back as one string), and the model reads the parts' text a line each; an
    /// output stored as a string before still reads as one.
    #[test]
    fn a_call_output_of_parts_is_kept_as_parts() {
        let items = read(Some(json!([
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": [
                {"type": "input_text", "text": "line one"},
                {"type": "input_text", "text": "line two"},
            ]},
        ])))
        .unwrap();
        let listed = serde_json::to_value(&items[1]).unwrap();
        assert_eq!(
            listed["output"],
            json!([
                {"type": "input_text", "text": "line one"},
                {"type": "input_text", "text": "line two"},
            ])
        );
        let wire = messages(None, &items);
        assert!(
            matches!(&wire[1].content, Some(MessageContent::Text(t)) if t == "line one\nline two")
        );
        let back: Item = serde_json::from_value(listed).unwrap();
        assert_eq!(back, items[1]);
        let stored = json!({"type": "function_call_output", "id": "fco_1", "call_id": "c1",
                            "output": "rain", "status": "completed"});
        let stored: Item = serde_json::from_value(stored).unwrap();
        assert!(
            matches!(stored, Item::FunctionCallOutput { output: CallOutput::Text(t), .. } if t == "rain")
        );
    }

    /// A message's text parts stay apart, a newline between them, as chat's do (they
    /// were joined with nothing: "Repeat exactly:" and "apple" read "Repeat exactly:apple").
    #[test]
    fn text_parts_are_joined_by_a_newline() {
        let items = read(Some(json!([{"role": "user", "content": [
            {"type": "input_text", "text": "Repeat exactly:"},
            {"type": "input_text", "text": "apple"},
        ]}])))
        .unwrap();
        let wire = messages(None, &items);
        assert!(
            matches!(&wire[0].content, Some(MessageContent::Text(t)) if t == "Repeat exactly:\napple")
        );
    }

    /// An assistant's refusal in a history sent back (as OpenAI returned it) is what it
    /// said, kept as a refusal part; another role's is refused where it was written.
    #[test]
    fn an_assistants_refusal_is_what_it_said() {
        let items = read(Some(json!([
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
            {"role": "user", "content": "Why?"},
        ])))
        .unwrap();
        assert!(matches!(&items[0], Item::Message { content, .. }
            if content == &[Part::Refusal { refusal: "I can't.".into() }]));
        let wire = messages(None, &items);
        assert!(matches!(&wire[0].content, Some(MessageContent::Text(t)) if t == "I can't."));
        let e = read(Some(json!([
            {"role": "user", "content": [{"type": "refusal", "refusal": "no"}]},
        ])))
        .unwrap_err();
        assert!(e.to_string().contains("`input[0].content[0]`"), "{e}");
    }

    #[test]
    fn an_empty_call_id_is_refused_where_it_was_written() {
        let e = read(Some(json!([
            {"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"},
        ])))
        .unwrap_err();
        assert!(e.to_string().contains("`input[0].call_id`"), "{e}");
    }

    #[test]
    fn reasoning_goes_with_the_turn_it_led_to_or_is_one_of_its_own() {
        let thought = |t: &str| {
            json!({"type": "reasoning", "id": format!("rs_{t}"), "summary": [],
                                       "content": [{"type": "reasoning_text", "text": t}]})
        };
        let items = read(Some(json!([
            {"role": "user", "content": "weather?"},
            thought("a"),
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            thought("b"),
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "rain"},
            {"type": "function_call_output", "call_id": "c2", "output": "sun"},
            thought("cut off"),
            {"role": "user", "content": "go on"},
            thought("c"),
            {"role": "assistant", "content": "fine"},
            thought("d"),
            thought("last"),
        ])))
        .unwrap();
        let wire = messages(None, &items);
        let turns: Vec<(&str, Option<&str>, usize)> = wire
            .iter()
            .map(|m| {
                let calls = m.tool_calls.as_ref().map_or(0, Vec::len);
                (m.role.as_str(), m.reasoning_content.as_deref(), calls)
            })
            .collect();
        assert_eq!(
            turns,
            [
                ("user", None, 0),
                ("assistant", Some("a"), 1),
                ("assistant", Some("b"), 1),
                ("tool", None, 0),
                ("tool", None, 0),
                ("assistant", Some("cut off"), 0),
                ("user", None, 0),
                ("assistant", Some("c"), 0),
                ("assistant", Some("d"), 0),
                ("assistant", Some("last"), 0),
            ]
        );
        assert!(matches!(&wire[5].content, Some(MessageContent::Text(t)) if t.is_empty()));
    }

    /// A reasoning item is listed back as it was sent (its summary parts too), and the
    /// template gets its reasoning, else its summary.
    #[test]
    fn reasoning_is_kept_as_sent_and_read_from_its_summary_without_content() {
        let summary = json!([{"type": "summary_text", "text": "think"}, {"type": "summary_text", "text": "more"}]);
        let items = read(Some(json!([
            {"type": "reasoning", "id": "rs_1", "summary": summary.clone()},
            {"role": "assistant", "content": "ok"},
            {"type": "reasoning", "id": "rs_2", "summary": summary.clone(),
             "content": [{"type": "reasoning_text", "text": "whole"}]},
            {"role": "assistant", "content": "fine"},
        ])))
        .unwrap();
        let listed = serde_json::to_value(&items[0]).unwrap();
        assert_eq!(listed["summary"], summary, "{listed}");
        assert_eq!(listed["content"], json!([]), "{listed}");
        let wire = messages(None, &items);
        let reasoning: Vec<Option<&str>> = wire
            .iter()
            .map(|m| m.reasoning_content.as_deref())
            .collect();
        assert_eq!(reasoning, [Some("think\nmore"), Some("whole")]);
    }

    #[test]
    fn parts_take_their_role_s_kind() {
        let items = read(Some(json!([
            {"role": "user", "content": [{"type": "output_text", "text": "a"}]},
            {"role": "assistant", "content": [{"type": "input_text", "text": "b"}]},
        ])))
        .unwrap();
        let kinds: Vec<Value> = items
            .iter()
            .map(|i| serde_json::to_value(i).unwrap()["content"][0]["type"].clone())
            .collect();
        assert_eq!(kinds, [json!("input_text"), json!("output_text")]);
    }

    #[test]
    fn ids_are_unique_and_calls_answered() {
        let first = read(Some(json!([
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}"},
        ])))
        .unwrap();
        let items = |v: Value| read(Some(v)).unwrap();
        let output = json!({"type": "function_call_output", "call_id": "c1", "output": "x"});
        // `first` as a stored response's output (its input empty).
        check_items(&first, &first, &items(json!([output.clone()]))).unwrap();
        // A call in an earlier turn's input must be answered before the next message too
        // (OpenAI: "No tool output found for function call").
        let e = check_items(
            &first,
            &[],
            &items(json!([{"role": "user", "content": "hi"}])),
        )
        .expect_err("refused");
        assert!(
            e.to_string().contains(
                "`input[0]` has no function_call_output for the function_call with call_id \"c1\""
            ),
            "{e}"
        );
        let answer = |i: usize| json!({"type": "function_call_output", "call_id": format!("c{i}"), "output": "x"});
        let call = |i: usize| json!({"type": "function_call", "call_id": format!("c{i}"), "name": "f", "arguments": "{}"});
        // Calls answered in any order right after their run, then a message: accepted.
        check_items(
            &[],
            &[],
            &items(
                json!([call(1), call(2), answer(2), answer(1), {"role": "user", "content": "ok"}]),
            ),
        )
        .unwrap();
        let refused_alone = [
            (json!([call(1), call(2), answer(1)]), "no function_call_output for the function_call with call_id \"c2\""),
            (json!([call(1), {"role": "user", "content": "ok"}, answer(1)]), "`input[1]` has no function_call_output"),
            (json!([call(1), answer(1), answer(1)]), "`input[2]`: function_call_output with call_id \"c1\" answers a call that is already answered"),
            (json!([call(1), call(1), answer(1)]), "`input[1]`: call_id \"c1\" is an earlier function_call's"),
            (json!([call(1), call(2), answer(1), call(3), answer(2), answer(3)]), "`input[3]` has no function_call_output for the function_call with call_id \"c2\""),
        ];
        for (input, needle) in refused_alone {
            let e = check_items(&[], &[], &items(input.clone())).expect_err("refused");
            assert!(e.to_string().contains(needle), "{input}: {e}");
        }
        let refused = [
            // The call is left unanswered.
            (
                json!([{"role": "user", "content": "and?"}]),
                "call_id \"c1\"",
            ),
            // An id of the history again.
            (
                json!([output.clone(), {"type": "function_call", "id": "fc_1", "call_id": "c2", "name": "f"}]),
                "duplicate item id \"fc_1\"",
            ),
            // An id twice in the input.
            (
                json!([output, {"id": "m", "role": "user", "content": "a"}, {"id": "m", "role": "user", "content": "b"}]),
                "`input[2]`: duplicate",
            ),
        ];
        for (input, needle) in refused {
            let e = check_items(&first, &first, &items(input.clone())).expect_err("refused");
            assert!(e.to_string().contains(needle), "{input}: {e}");
        }
    }

    #[test]
    fn unsupported_items_are_named() {
        let cases = [
            (json!(5), "a string or a list"),
            (
                json!([{"type": "web_search_call", "status": "completed"}]),
                "\"web_search_call\"",
            ),
            (
                json!([{"type": "reasoning", "summary": [{"type": "summary_text"}]}]),
                "`input[0].summary[0]` must be a part with a `text` field",
            ),
            (json!([{"role": "wizard", "content": "x"}]), "wizard"),
            (
                json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
                "input_image",
            ),
            (json!([{"type": "function_call", "name": "f"}]), "call_id"),
            (
                json!([{"role": "user", "content": "hi"},
                       {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{bad"}]),
                "`input[1].arguments` is not JSON",
            ),
            (
                json!([{"type": "function_call_output", "call_id": "c"}]),
                "output",
            ),
            (
                json!([{"id": "m".repeat(300), "role": "user", "content": "x"}]),
                "`input[0].id` is longer than 256 bytes",
            ),
        ];
        for (input, needle) in cases {
            let e = read(Some(input.clone())).expect_err("refused");
            assert!(e.to_string().contains(needle), "{input}: {e}");
            assert!(
                matches!(
                    e,
                    ApiError::BadRequest {
                        param: Some("input"),
                        ..
                    }
                ),
                "{input}"
            );
        }
    }
}
