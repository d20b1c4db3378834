//! How the offered functions, earlier calls and their results reach the model.
//!
//! A template that renders `tools` gets them as `apply_chat_template(tools=...)` passes
//! them, and the conversation as it is (assistant turns with `tool_calls`, `tool` turns
//! with `tool_call_id`). Any other template gets the documented fallback: the functions
//! and the generic call form described at the end of the system turn, earlier calls
//! written in that form as the assistant's text, and each result as a user turn that
//! names the call it answers.

use chorus_model::ChatMessage;
use serde_json::{json, Value};

use super::{CallFormat, Choice, ToolRequest};

/// The messages and `tools` value to render the conversation with.
/// `json_answer`: a text answer is JSON (structured output beside the tools).
pub fn prepare(
    knows_tools: bool,
    tools: Option<&ToolRequest>,
    json_answer: bool,
    messages: Vec<ChatMessage>,
) -> (Vec<ChatMessage>, Option<Value>) {
    let offered = tools.filter(|t| t.active());
    if knows_tools {
        let value = offered.map(|t| Value::Array(t.callable().map(|f| f.to_openai()).collect()));
        return (messages, value);
    }
    let mut messages: Vec<ChatMessage> = messages.into_iter().map(fallback_turn).collect();
    if let Some(t) = offered {
        let text = describe(t, json_answer);
        match messages.first_mut().filter(|m| m.role == "system") {
            Some(system) => {
                system.content.push_str("\n\n");
                system.content.push_str(&text);
            }
            None => messages.insert(0, ChatMessage::new("system", text)),
        }
    }
    (messages, None)
}

/// The system text that tells a model without native tools what it may call and how.
fn describe(tools: &ToolRequest, json_answer: bool) -> String {
    let mut text = String::from("You can call these functions:\n");
    for f in tools.callable() {
        let entry = json!({
            "name": f.name,
            "description": f.description.clone().unwrap_or_default(),
            "parameters": f.parameters,
        });
        text.push_str(&entry.to_string());
        text.push('\n');
    }
    text.push_str(
        "To call functions, reply with only this JSON: {\"tool_calls\": [{\"name\": \"<function name>\", \"arguments\": {<arguments>}}]}",
    );
    if tools.choice == Choice::Auto {
        let form = if json_answer {
            "the JSON the user asked for"
        } else {
            "plain text"
        };
        text.push_str(&format!(
            "\nOtherwise, answer in {form}. Once a function's result is given, answer the user with it in {form}."
        ));
    }
    text
}

/// A turn as a template without tools can show it.
fn fallback_turn(mut m: ChatMessage) -> ChatMessage {
    if let Some(calls) = m.tool_calls.take() {
        let calls: Vec<Value> = calls
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                let f = &c["function"];
                json!({"name": f["name"], "arguments": f["arguments"]})
            })
            .collect();
        let written = json!({ "tool_calls": calls }).to_string();
        m.content = match m.content.is_empty() {
            true => written,
            false => format!("{}\n{written}", m.content),
        };
    }
    if m.role == "tool" {
        let name = m.name.take().unwrap_or_else(|| "the function".into());
        let id = m.tool_call_id.take().unwrap_or_default();
        m.role = "user".into();
        m.content = format!("Result of {name} (call {id}):\n{}", m.content);
    }
    m
}

/// The call syntax the model will be held to.
pub fn format_for(knows_tools: bool, template_source: &str) -> CallFormat {
    match knows_tools {
        true => CallFormat::detect(template_source),
        false => CallFormat::Generic,
    }
}

/// An earlier call's arguments (JSON text) as the value a template renders. A number
/// beyond a double's range (`1e999`, which a call's grammar lets the model write, and
/// which the call returned kept as written) is read as the largest double of its sign,
/// as Python's `json` reads it as an infinity, rather than making the conversation
/// impossible to continue.
pub fn arguments_value(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str(text).or_else(|e| match e.to_string().starts_with("number out of range") {
        true => serde_json::from_str(&clamp_numbers(text)),
        false => Err(e),
    })
}

/// `text` with every number beyond a double's range written as the largest double of
/// its sign; strings and every other number as they were.
fn clamp_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let (mut in_string, mut escaped) = (false, false);
    while let Some(c) = rest.chars().next() {
        let number = !in_string && (c == '-' || c.is_ascii_digit());
        if number {
            let len = rest
                .find(|c: char| !(c.is_ascii_digit() || "+-.eE".contains(c)))
                .unwrap_or(rest.len());
            let written = &rest[..len];
            match written.parse::<f64>() {
                Ok(v) if v.is_infinite() => out.push_str(&format!("{:e}", v.signum() * f64::MAX)),
                _ => out.push_str(written),
            }
            rest = &rest[len..];
            continue;
        }
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, false, '"') => in_string = !in_string,
            _ => {}
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers beyond a double's range do not make arguments unreadable: they become the
    /// largest double of their sign; strings that look like them are left alone.
    #[test]
    fn arguments_beyond_a_double_are_read_clamped() {
        let v = arguments_value(r#"{"x": 1e999, "y": [-2E+400, 3.5], "s": "1e999 \" 1e999"}"#)
            .expect("read");
        assert_eq!(v["x"], f64::MAX);
        assert_eq!(v["y"][0], -f64::MAX);
        assert_eq!(v["y"][1], 3.5);
        assert_eq!(v["s"], "1e999 \" 1e999");
        let huge = format!("{{\"n\": 1{}}}", "0".repeat(400));
        assert_eq!(arguments_value(&huge).expect("read")["n"], f64::MAX);
        assert!(arguments_value("{\"x\": 1e999").is_err());
        assert!(arguments_value("{\"x\": }").is_err());
    }
    use crate::tools::FunctionSpec;

    fn tools(choice: Choice) -> ToolRequest {
        ToolRequest {
            functions: vec![FunctionSpec {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
            }],
            choice,
            parallel: true,
            max_calls: 8,
            shape: crate::tools::Shape::Chat,
        }
    }

    fn history() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                tool_calls: Some(json!([{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }])),
                ..ChatMessage::new("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some("call_1".into()),
                name: Some("get_weather".into()),
                ..ChatMessage::new("tool", "sunny, 21 C")
            },
        ]
    }

    #[test]
    fn a_template_with_tools_gets_them_and_the_history_as_it_is() {
        let (messages, value) = prepare(true, Some(&tools(Choice::Auto)), false, history());
        assert_eq!(messages, history());
        let value = value.expect("tools passed");
        assert_eq!(value[0]["function"]["name"], "get_weather");
        assert_eq!(value[0]["type"], "function");
        // `none`: the model is not shown the tools.
        assert!(prepare(true, Some(&tools(Choice::None)), false, history())
            .1
            .is_none());
    }

    #[test]
    fn the_fallback_writes_calls_and_results_as_text() {
        let (messages, value) = prepare(false, Some(&tools(Choice::Required)), false, history());
        assert!(value.is_none());
        assert_eq!(messages[0].role, "system");
        assert!(messages[0].content.contains("\"name\":\"get_weather\""));
        assert!(messages[0].content.contains("{\"tool_calls\": ["));
        let written: Value = serde_json::from_str(&messages[2].content).expect("JSON");
        assert_eq!(
            written,
            json!({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
        );
        assert!(messages[2].tool_calls.is_none());
        assert_eq!(messages[3].role, "user");
        assert_eq!(
            messages[3].content,
            "Result of get_weather (call call_1):\nsunny, 21 C"
        );
    }
}
