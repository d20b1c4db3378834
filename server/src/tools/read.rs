//! Reading an answer back: is it text or calls, and which calls. The constraint made
//! every call parse, so reading is exact. A call cut short (by `max_tokens` or a stop
//! string) is dropped, not returned as text: its syntax is the server's instruction to
//! the model, not an answer to show or to send back as history. The calls finished
//! before it are kept, with the answer's own finish reason (as OpenAI's `length`).

use std::collections::HashMap;

use serde::de::IgnoredAny;
use serde_json::value::RawValue;

use super::{call_id, CallFormat, Choice};

/// Whether `text` is one whole JSON value. Numbers are not converted (a `1e400` the
/// grammar let through is JSON all the same).
fn is_json(text: &str) -> bool {
    serde_json::from_str::<IgnoredAny>(text).is_ok()
}

/// JSON text without the whitespace between its tokens; strings and numbers as written
/// (a round trip through `f64` would change big integers and drop what overflows it).
fn minified(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if matches!(c, ' ' | '\t' | '\n' | '\r') {
            continue;
        } else if c == '"' {
            in_string = true;
        }
        out.push(c);
    }
    out
}

/// How a run of `<tool_call>` blocks ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// After the last block only whitespace.
    Whole,
    /// In a block (or its tags) that did not finish.
    Cut,
    /// With something that is no block.
    Other,
}

/// The JSON of each `<tool_call>…</tool_call>` block, in order, and how the run ends.
/// The tags are looked for only between values: the same text inside an argument's
/// string is the argument's. Either may be missing (they can be special tokens the
/// decoder skips).
fn hermes_blocks(text: &str) -> (Vec<&RawValue>, Tail) {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut blocks = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return (blocks, Tail::Whole);
        }
        if OPEN.starts_with(rest) {
            return (blocks, Tail::Cut);
        }
        let inner = rest.strip_prefix(OPEN).unwrap_or(rest);
        let mut values = serde_json::Deserializer::from_str(inner).into_iter::<&RawValue>();
        let value = match values.next() {
            Some(Ok(value)) => value,
            None => return (blocks, Tail::Cut),
            Some(Err(e)) if e.is_eof() => return (blocks, Tail::Cut),
            Some(Err(_)) => return (blocks, Tail::Other),
        };
        let after = inner[values.byte_offset()..].trim_start();
        blocks.push(value);
        rest = match after.strip_prefix(CLOSE) {
            Some(next) => next,
            // Cut in the closing tag: the call was written whole, as one whose tag is
            // missing (a special token the decoder skipped) is.
            None if !after.is_empty() && CLOSE.starts_with(after) => {
                return (blocks, Tail::Cut);
            }
            None => after,
        };
    }
}

/// One call the model made, as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments object as JSON text (`"{}"` when the function takes none).
    pub arguments: String,
}

/// How to read a request's answers.
#[derive(Debug, Clone)]
pub struct CallReader {
    pub format: CallFormat,
    pub choice: Choice,
    /// A text answer is JSON (structured output beside tools).
    pub json_answer: bool,
    /// The names a call may have.
    pub functions: Vec<String>,
}

/// What the start of an answer says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Undecided,
    Text,
    Calls,
}

impl CallReader {
    /// Whether every answer is calls (`tool_choice` required or a named function).
    pub fn forced(&self) -> bool {
        matches!(self.choice, Choice::Required | Choice::Named(_))
    }

    /// Whether the answer that starts with `text` is text or calls.
    pub fn decide(&self, text: &str) -> Decision {
        if self.forced() {
            return Decision::Calls;
        }
        match self
            .format
            .starts_call(text.trim_start(), self.json_answer, &self.functions)
        {
            Some(true) => Decision::Calls,
            Some(false) => Decision::Text,
            None => Decision::Undecided,
        }
    }

    /// The calls in a whole answer, or `None` when it is text (or did not finish).
    pub fn calls(&self, text: &str) -> Option<Vec<ToolCall>> {
        if self.decide(text) == Decision::Text {
            return None;
        }
        if self.format == CallFormat::Hermes {
            let (blocks, Tail::Whole) = hermes_blocks(text) else {
                return None;
            };
            let calls = blocks
                .into_iter()
                .map(|b| self.call(b))
                .collect::<Option<Vec<_>>>()?;
            return (!calls.is_empty()).then_some(calls);
        }
        // Only at the start: the same text inside an argument is the argument's.
        let body = text.trim_start();
        let body = body.strip_prefix("<|python_tag|>").unwrap_or(body);
        let mut calls = Vec::new();
        for value in serde_json::Deserializer::from_str(body).into_iter::<&RawValue>() {
            let value = value.ok()?;
            let items: Vec<&RawValue> = match self.format {
                CallFormat::Generic => {
                    let obj: HashMap<String, &RawValue> = serde_json::from_str(value.get()).ok()?;
                    if obj.len() != 1 {
                        return None;
                    }
                    serde_json::from_str(obj.get("tool_calls")?.get()).ok()?
                }
                _ => vec![value],
            };
            for item in items {
                calls.push(self.call(item)?);
            }
        }
        (!calls.is_empty()).then_some(calls)
    }

    /// The calls an answer made: every call of a whole answer (and `true`), or those it
    /// finished before one cut short (and `false`); `None` when it made none.
    pub fn made_calls(&self, text: &str) -> Option<(Vec<ToolCall>, bool)> {
        match self.calls(text) {
            Some(calls) => Some((calls, true)),
            None => Some((self.finished_calls(text)?, false)),
        }
    }

    /// Chat's reading of an answer that made calls: them, and its finish reason, the
    /// calls' own when the answer is whole, else `finish` (the answer's, as OpenAI's
    /// `length`).
    pub fn chat_calls(
        &self,
        text: &str,
        finish: &'static str,
    ) -> Option<(&'static str, Vec<ToolCall>)> {
        let (calls, whole) = self.made_calls(text)?;
        Some((if whole { self.finish_reason() } else { finish }, calls))
    }

    /// The calls an answer finished before it was cut short in the next one (by
    /// `max_tokens` or a stop string); `None` when it was not cut in a call or finished
    /// none. What [`Self::calls`] reads whole is never read here.
    fn finished_calls(&self, text: &str) -> Option<Vec<ToolCall>> {
        if self.decide(text) != Decision::Calls {
            return None;
        }
        let mut calls = Vec::new();
        match self.format {
            CallFormat::Hermes => {
                let (blocks, Tail::Cut) = hermes_blocks(text) else {
                    return None;
                };
                for block in blocks {
                    calls.push(self.call(block)?);
                }
            }
            CallFormat::Generic => {
                if is_json(text) {
                    return None;
                }
                let (head, mut rest) = text.split_once('[')?;
                if head.trim() != r#"{"tool_calls":"# {
                    return None;
                }
                // Each item and the `,` after it; the cut one does not parse.
                loop {
                    let mut items =
                        serde_json::Deserializer::from_str(rest).into_iter::<&RawValue>();
                    let Some(Ok(item)) = items.next() else {
                        break;
                    };
                    let after = rest[items.byte_offset()..].trim_start();
                    calls.push(self.call(item)?);
                    match after.strip_prefix(',') {
                        Some(next) => rest = next,
                        None => break,
                    }
                }
            }
            // One call, cut.
            CallFormat::Llama3Json => {}
        }
        (!calls.is_empty()).then_some(calls)
    }

    /// The text of an answer that holds no calls: `None` when it began a call that did
    /// not finish, also when it was cut in the call's opening (text that can only be
    /// the start of a call). Beside a JSON answer, whole JSON that is not calls is the
    /// answer (whatever its start looked like).
    pub fn text_of(&self, text: String) -> Option<String> {
        let whole_json = || is_json(&text);
        let call = match self.decide(&text) {
            Decision::Calls => true,
            Decision::Undecided => !text.trim().is_empty(),
            Decision::Text => false,
        };
        (!call || (self.json_answer && whole_json())).then_some(text)
    }

    /// One call as the grammar writes it: an object of exactly a callable `name` and
    /// (optionally) the arguments key; anything else is not a call (beside a JSON
    /// answer, it is the answer). The arguments are the model's text, minified.
    fn call(&self, item: &RawValue) -> Option<ToolCall> {
        let key = self.format.arguments_key();
        let obj: HashMap<String, &RawValue> = serde_json::from_str(item.get()).ok()?;
        if obj.keys().any(|k| k != "name" && k != key) {
            return None;
        }
        let name: String = serde_json::from_str(obj.get("name")?.get()).ok()?;
        if !self.functions.contains(&name) {
            return None;
        }
        let arguments = match obj.get(key).map(|a| a.get()) {
            Some(args) if args.starts_with('{') => minified(args),
            None | Some("null") => "{}".to_string(),
            Some(_) => return None,
        };
        Some(ToolCall {
            id: call_id(),
            name,
            arguments,
        })
    }

    /// `finish_reason` of an answer that made calls (OpenAI: `tool_calls`, but `stop`
    /// when the function was named in `tool_choice`).
    pub fn finish_reason(&self) -> &'static str {
        match self.choice {
            Choice::Named(_) => "stop",
            _ => "tool_calls",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(format: CallFormat, choice: Choice) -> CallReader {
        CallReader {
            format,
            choice,
            json_answer: false,
            functions: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn generic_calls_and_text() {
        let r = reader(CallFormat::Generic, Choice::Auto);
        let text = r#"{"tool_calls": [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]}"#;
        let calls = r.calls(text).expect("calls");
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("a", r#"{"x":1}"#)
        );
        assert_eq!(calls[1].arguments, "{}");
        assert_ne!(calls[0].id, calls[1].id);
        assert_eq!(r.calls("It is sunny."), None);
        assert_eq!(r.decide("  "), Decision::Undecided);
        assert_eq!(r.decide(" Sure"), Decision::Text);
        // Cut short by max_tokens: not calls.
        assert_eq!(r.calls(r#"{"tool_calls": [{"name": "a", "argu"#), None);
        assert_eq!(
            r.finished_calls(r#"{"tool_calls": [{"name": "a", "argu"#),
            None
        );
        // Cut in the second call: the first is kept (in the compact form the grammar
        // writes, and with free whitespace).
        for cut in [
            r#"{"tool_calls": [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "argu"#,
            "{\"tool_calls\": [ {\"name\": \"a\", \"arguments\": {\"x\": 1}} ,\n {\"na",
            r#"{"tool_calls": [{"name": "a", "arguments": {"x": 1}}"#,
        ] {
            let kept = r.finished_calls(cut).expect("the first call");
            assert_eq!(kept.len(), 1, "{cut}");
            assert_eq!(
                (kept[0].name.as_str(), kept[0].arguments.as_str()),
                ("a", r#"{"x":1}"#)
            );
        }
        // Whole answers are not read here.
        assert_eq!(r.finished_calls(text), None);
        assert_eq!(r.finished_calls(r#"{"tool_calls": [], "more": 1}"#), None);
        // Not a function offered, or not the call's shape: not calls.
        assert_eq!(r.calls(r#"{"tool_calls": [{"name": "z"}]}"#), None);
        assert_eq!(r.calls(r#"{"tool_calls": [{"name": "a", "x": 1}]}"#), None);
        assert_eq!(r.calls(r#"{"tool_calls": [], "more": 1}"#), None);
    }

    /// Arguments are the model's text, minified: numbers beyond `f64` (which the grammar
    /// lets through) are neither dropped nor rounded, strings stay as written.
    #[test]
    fn arguments_keep_the_numbers_and_strings_written() {
        let r = reader(CallFormat::Generic, Choice::Required);
        let text = r#"{"tool_calls": [{"name": "a", "arguments": {"v": 1e400, "n": 12345678901234567890123, "f": 0.1000000000000000055511151231257827, "s": "a \" b\\", "o": {"k": [1, 2]}}}]}"#;
        let calls = r.calls(text).expect("calls");
        assert_eq!(
            calls[0].arguments,
            r#"{"v":1e400,"n":12345678901234567890123,"f":0.1000000000000000055511151231257827,"s":"a \" b\\","o":{"k":[1,2]}}"#
        );
        let cut =
            r#"{"tool_calls": [{"name": "a", "arguments": {"v": 1e400}}, {"name": "b", "argu"#;
        let kept = r.finished_calls(cut).expect("the first call");
        assert_eq!(kept[0].arguments, r#"{"v":1e400}"#);
    }

    /// Beside a JSON answer, JSON that is not calls is the answer even where it starts
    /// with a call's key; a call cut short is dropped.
    #[test]
    fn a_json_answer_is_told_from_calls() {
        let r = CallReader {
            json_answer: true,
            ..reader(CallFormat::Llama3Json, Choice::Auto)
        };
        // The call's key, but no function's name: the answer, whole or cut short.
        let person = r#"{"name": "Alice", "age": 30}"#;
        assert_eq!(r.decide(person), Decision::Text);
        assert_eq!(r.calls(person), None);
        assert_eq!(r.text_of(person.into()).as_deref(), Some(person));
        let cut = r#"{"name": "Alice", "a"#;
        assert_eq!(r.text_of(cut.into()).as_deref(), Some(cut));
        let call = r#"{"name": "a", "parameters": {}}"#;
        assert_eq!(r.calls(call).expect("a call")[0].name, "a");
        assert_eq!(r.text_of(r#"{"name": "a", "param"#.into()), None);
        assert_eq!(
            r.text_of(r#"{"age": 3"#.into()).as_deref(),
            Some(r#"{"age": 3"#)
        );
    }

    #[test]
    fn hermes_blocks() {
        let r = reader(CallFormat::Hermes, Choice::Required);
        let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": \"y\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
        let calls = r.calls(text).expect("calls");
        assert_eq!(
            calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        // Cut in the second block: the first is kept; a whole answer is not read there.
        let cut = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"argu";
        assert_eq!(r.finished_calls(cut).expect("kept")[0].name, "a");
        assert_eq!(r.finished_calls(text), None);
        assert_eq!(
            r.finished_calls("<tool_call>\n{\"name\": \"a\", \"ar"),
            None
        );
        // The tags may be special tokens the decoder skips: the JSON alone reads the same.
        let bare = "\n{\"name\": \"a\", \"arguments\": {\"x\": \"y\"}}\n";
        assert_eq!(r.calls(bare).expect("calls")[0].arguments, r#"{"x":"y"}"#);
        assert_eq!(r.decide("anything"), Decision::Calls);
        // With tool_choice auto, an answer cut in the opening tag began a call: it is
        // not returned as text (no more than one cut later in the call is).
        let auto = reader(CallFormat::Hermes, Choice::Auto);
        assert_eq!(auto.text_of("\n<tool_ca".into()), None);
        assert_eq!(auto.text_of("<tool_call>\n{\"na".into()), None);
        assert_eq!(auto.text_of("<b>".into()).as_deref(), Some("<b>"));
        assert_eq!(auto.text_of(" ".into()).as_deref(), Some(" "));
    }

    /// The tags' text inside an argument is the argument's (before the fix it was cut
    /// out of the string, and a cut answer was split inside it).
    #[test]
    fn hermes_tags_inside_arguments_stay_there() {
        let r = reader(CallFormat::Hermes, Choice::Required);
        let call = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"h\": \"x</tool_call>y<tool_call>z\"}}\n</tool_call>";
        let calls = r.calls(call).expect("calls");
        assert_eq!(calls[0].arguments, r#"{"h":"x</tool_call>y<tool_call>z"}"#);
        let cut = format!(
            "{call}\n<tool_call>\n{{\"name\": \"b\", \"arguments\": {{\"h\": \"</tool_call>"
        );
        let kept = r.finished_calls(&cut).expect("the first call");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].arguments, calls[0].arguments);
        // Cut inside a closing tag: the call is kept (as one whose tag is missing is),
        // and the answer is not whole.
        let cut = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_";
        assert_eq!(r.calls(cut), None);
        assert_eq!(r.finished_calls(cut).expect("kept")[0].name, "a");
        // Something after the blocks that is not one: neither calls nor a cut.
        let odd = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call> and more";
        assert_eq!(r.calls(odd), None);
        assert_eq!(r.finished_calls(odd), None);
    }

    #[test]
    fn llama3_json() {
        let r = reader(CallFormat::Llama3Json, Choice::Named("a".into()));
        let calls = r
            .calls(r#"{"name": "a", "parameters": {"q": 2}}"#)
            .expect("calls");
        assert_eq!(calls[0].arguments, r#"{"q":2}"#);
        assert_eq!(r.finish_reason(), "stop");
        assert_eq!(
            reader(CallFormat::Generic, Choice::Auto).finish_reason(),
            "tool_calls"
        );
    }
}
