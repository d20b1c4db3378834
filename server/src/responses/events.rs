//! A streamed response as OpenAI's typed events, each numbered by `sequence_number`:
//!
//! `response.created`, `response.in_progress`; per output item `response.output_item.added`,
//! for a message `response.content_part.added`, `response.output_text.delta`...,
//! `response.output_text.done`, `response.content_part.done`, for a call
//! `response.function_call_arguments.delta` and `.done`, then `response.output_item.done`;
//! last `response.completed` (or `response.incomplete`), or `response.failed`.
//!
//! Text is sent as it comes once it is known not to be a call; calls are sent whole when
//! the answer ends (the constraint held them to their schemas). A stored response is
//! written before its last event, so a client that saw `response.completed` can chain on
//! it at once; a stream cut short (client gone, server killed) is never stored.

use std::sync::Arc;

use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::wire::{Item, Part, ReasoningText, ResponseError, ResponseObject};
use super::{finish, keep, output, Keep};
use crate::engine::Event;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::reasoning::{Splitter, Start};
use crate::sse::named_frame;
use crate::tools::{CallReader, Decision};

/// What a stream needs besides the engine's events.
pub struct Streamed {
    pub response: ResponseObject,
    pub reader: Option<CallReader>,
    /// A thinking model's: where the answer starts relative to its block.
    pub thinking: Option<Start>,
    pub keep: Option<Keep>,
    pub metrics: Arc<Metrics>,
}

struct State {
    s: Streamed,
    first: Option<Event>,
    rx: UnboundedReceiver<Event>,
    sequence: u64,
    started: bool,
    ended: bool,
    /// The whole answer so far.
    text: String,
    /// Bytes of `text` already sent as deltas.
    sent: usize,
    decision: Option<Decision>,
    /// The message item's id, made when it is first needed: when the item opens, or
    /// when the answer ends with text held back (a client's SDK checks that an item's
    /// id stays the same from `output_item.added` to `output_item.done`).
    message_id: Option<String>,
    /// Whether the message item's opening events were sent.
    message_open: bool,
    /// A thinking model's reasoning told from its answer (whose text is `text`).
    splitter: Option<Splitter>,
    /// The reasoning item, once opened: its id, its text so far, whether it is closed.
    reasoning: Option<Reasoning>,
}

struct Reasoning {
    id: String,
    text: String,
    closed: bool,
}

impl Reasoning {
    /// The item as streamed so far.
    fn item(&self) -> Item {
        Item::reasoning(self.id.clone(), self.text.clone())
    }
}

impl State {
    /// One event of `kind` with `body`'s fields, numbered.
    fn event(&mut self, kind: &str, body: Value) -> String {
        let mut map = serde_json::Map::new();
        map.insert("type".into(), json!(kind));
        map.insert("sequence_number".into(), json!(self.sequence));
        if let Value::Object(fields) = body {
            map.extend(fields);
        }
        self.sequence += 1;
        named_frame(kind, &map)
    }

    fn response_event(&mut self, kind: &str) -> String {
        let response = serde_json::to_value(&self.s.response).unwrap_or(Value::Null);
        self.event(kind, json!({"response": response}))
    }

    /// The message item's id, the same every time.
    fn message_id(&mut self) -> String {
        self.message_id
            .get_or_insert_with(|| super::wire::new_id("msg"))
            .clone()
    }

    /// The answer's first output index: after the reasoning item, if there is one.
    fn answer_index(&self) -> usize {
        usize::from(self.reasoning.is_some())
    }

    /// Opens the reasoning item (once) and sends `delta` of it.
    fn send_reasoning(&mut self, delta: &str) -> String {
        let mut out = String::new();
        let id = match &mut self.reasoning {
            Some(r) => {
                r.text.push_str(delta);
                r.id.clone()
            }
            None => {
                let id = super::wire::new_id("rs");
                self.reasoning = Some(Reasoning {
                    id: id.clone(),
                    text: delta.to_string(),
                    closed: false,
                });
                let item = json!({"id": id, "type": "reasoning", "summary": [], "content": []});
                out.push_str(&self.event(
                    "response.output_item.added",
                    json!({"output_index": 0, "item": item}),
                ));
                out.push_str(&self.event(
                    "response.content_part.added",
                    json!({"item_id": id, "output_index": 0, "content_index": 0,
                           "part": ReasoningText { text: String::new() }}),
                ));
                id
            }
        };
        out.push_str(&self.event(
            "response.reasoning_text.delta",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "delta": delta}),
        ));
        out
    }

    /// The closing events of the reasoning item, once.
    fn close_reasoning(&mut self) -> String {
        let Some(r) = self.reasoning.as_mut().filter(|r| !r.closed) else {
            return String::new();
        };
        r.closed = true;
        let item = r.item();
        let (id, text) = (r.id.clone(), r.text.clone());
        let mut out = self.event(
            "response.reasoning_text.done",
            json!({"item_id": id, "output_index": 0, "content_index": 0, "text": text}),
        );
        out.push_str(&self.event(
            "response.content_part.done",
            json!({"item_id": id, "output_index": 0, "content_index": 0,
                   "part": ReasoningText { text }}),
        ));
        out.push_str(&self.event(
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
        ));
        out
    }

    /// Opens the message item (once, after closing the reasoning) and sends the text
    /// not sent yet.
    fn send_text(&mut self) -> String {
        let mut out = self.close_reasoning();
        let id = self.message_id();
        let index = self.answer_index();
        if !self.message_open {
            self.message_open = true;
            let item = json!({"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []});
            out.push_str(&self.event(
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            ));
            out.push_str(&self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                       "part": Part::output_text(String::new())}),
            ));
        }
        if self.sent < self.text.len() {
            let delta = self.text[self.sent..].to_string();
            self.sent = self.text.len();
            out.push_str(&self.event(
                "response.output_text.delta",
                json!({"item_id": id, "output_index": index, "content_index": 0,
                       "delta": delta, "logprobs": []}),
            ));
        }
        out
    }

    /// The closing events of each output item.
    fn close_items(&mut self, items: &[Item]) -> String {
        let mut out = String::new();
        for (index, item) in items.iter().enumerate() {
            match item {
                Item::Message { id, content, .. } => {
                    out.push_str(&self.send_text());
                    let text = content.first().map_or("", Part::text);
                    out.push_str(&self.event(
                        "response.output_text.done",
                        json!({"item_id": id, "output_index": index, "content_index": 0,
                               "text": text, "logprobs": []}),
                    ));
                    out.push_str(&self.event(
                        "response.content_part.done",
                        json!({"item_id": id, "output_index": index, "content_index": 0,
                               "part": content.first()}),
                    ));
                }
                Item::FunctionCall {
                    id,
                    call_id,
                    name,
                    arguments,
                    ..
                } => {
                    out.push_str(&self.close_reasoning());
                    let opened = json!({"id": id, "type": "function_call", "status": "in_progress",
                                        "call_id": call_id, "name": name, "arguments": ""});
                    out.push_str(&self.event(
                        "response.output_item.added",
                        json!({"output_index": index, "item": opened}),
                    ));
                    out.push_str(&self.event(
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": index, "delta": arguments}),
                    ));
                    out.push_str(&self.event(
                        "response.function_call_arguments.done",
                        json!({"item_id": id, "output_index": index, "name": name,
                               "arguments": arguments}),
                    ));
                }
                // Streamed as it came, and closed before the answer's first item.
                Item::Reasoning { .. } => {
                    out.push_str(&self.close_reasoning());
                    continue;
                }
                Item::FunctionCallOutput { .. } => {}
            }
            out.push_str(&self.event(
                "response.output_item.done",
                json!({"output_index": index, "item": item}),
            ));
        }
        out
    }

    /// `response.failed`, after closing the message item the client saw open (as
    /// `incomplete`, with the text it was sent), so that every item it was told of ends
    /// and the failed response's `output` holds what was streamed.
    fn fail(&mut self, e: ApiError) -> String {
        let mut out = String::new();
        if self.s.response.output.is_empty() {
            let reasoning = self.reasoning.as_ref().map(Reasoning::item);
            let message = self.message_open.then(|| Item::Message {
                id: self.message_id(),
                status: "incomplete".into(),
                role: "assistant".into(),
                content: vec![Part::output_text(self.text[..self.sent].to_string())],
            });
            let items: Vec<Item> = reasoning.into_iter().chain(message).collect();
            out = self.close_items(&items);
            self.s.response.output = items;
        }
        self.ended = true;
        self.s.response.status = "failed".into();
        // Failed responses are not stored.
        self.s.response.store = false;
        self.s.response.error = Some(ResponseError {
            code: error_code(&e).into(),
            message: e.to_string(),
        });
        out.push_str(&self.response_event("response.failed"));
        out
    }
}

/// A failure's code among those OpenAI's `ResponseError` lists.
fn error_code(e: &ApiError) -> &'static str {
    match e {
        ApiError::Overloaded { .. } => "rate_limit_exceeded",
        // The request's fault (a schema the grammar engine gave up on mid-answer).
        ApiError::BadRequest { .. }
        | ApiError::BadField { .. }
        | ApiError::ContextLength { .. } => "invalid_prompt",
        _ => "server_error",
    }
}

/// The events of one streamed response; `first` is the engine's first event, read
/// before the headers were sent.
pub fn stream(
    streamed: Streamed,
    first: Event,
    rx: UnboundedReceiver<Event>,
) -> impl Stream<Item = String> {
    let state = State {
        first: Some(first),
        rx,
        sequence: 0,
        started: false,
        ended: false,
        text: String::new(),
        sent: 0,
        decision: None,
        message_id: None,
        message_open: false,
        splitter: streamed.thinking.map(Splitter::new),
        reasoning: None,
        s: streamed,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.ended {
            return None;
        }
        if !st.started {
            st.started = true;
            let mut out = st.response_event("response.created");
            out.push_str(&st.response_event("response.in_progress"));
            return Some((out, st));
        }
        let out = next(&mut st).await;
        Some((out, st))
    })
}

async fn next(st: &mut State) -> String {
    let event = match st.first.take() {
        Some(event) => Some(event),
        None => st.rx.recv().await,
    };
    match event {
        Some(Event::Text { text, tokens, .. }) => {
            let (out, text) = match &mut st.splitter {
                Some(splitter) => {
                    let parts = splitter.push_counted(&text, tokens);
                    (reasoned(st, &parts.reasoning), parts.content)
                }
                None => (String::new(), text),
            };
            out + &answer_text(st, &text)
        }
        Some(Event::Prompt { .. }) => String::new(),
        Some(Event::Done {
            finish: f,
            mut usage,
            ..
        }) => {
            let mut out = String::new();
            if let Some(splitter) = st.splitter.as_mut() {
                let parts = splitter.finish();
                usage = usage.with_reasoning(splitter.reasoning_tokens(usage.completion_tokens));
                out.push_str(&reasoned(st, &parts.reasoning));
                out.push_str(&answer_text(st, &parts.content));
            }
            let message_id = st.message_id();
            let reasoning = st.reasoning.as_ref().map(Reasoning::item);
            let answer = output(
                st.s.reader.as_ref(),
                reasoning,
                st.text.clone(),
                f,
                Some(message_id),
            );
            out.push_str(&st.close_items(&answer.0));
            finish(&mut st.s.response, answer, usage, &st.s.metrics);
            if let Some(k) = &st.s.keep {
                keep(k, &mut st.s.response).await;
            }
            st.ended = true;
            let last = match st.s.response.status.as_str() {
                "incomplete" => "response.incomplete",
                _ => "response.completed",
            };
            out.push_str(&st.response_event(last));
            out
        }
        Some(Event::Error(failure)) => st.fail(failure.into()),
        None => st.fail(crate::stream::inference_stopped()),
    }
}

/// Reasoning streamed as it comes (nothing when empty).
fn reasoned(st: &mut State, delta: &str) -> String {
    match delta.is_empty() {
        true => String::new(),
        false => st.send_reasoning(delta),
    }
}

/// A piece of the answer: sent once it is known not to be a call.
fn answer_text(st: &mut State, text: &str) -> String {
    if text.is_empty() {
        return String::new();
    }
    st.text.push_str(text);
    if let Some(reader) = &st.s.reader {
        if st.decision != Some(Decision::Text) {
            st.decision = Some(reader.decide(&st.text));
        }
        if st.decision != Some(Decision::Text) {
            return String::new();
        }
    }
    st.send_text()
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    fn started() -> ResponseObject {
        serde_json::from_value(json!({
            "id": "resp_1", "object": "response", "created_at": 0, "status": "in_progress",
            "error": null, "incomplete_details": null, "instructions": null,
            "max_output_tokens": null, "model": "m", "output": [], "parallel_tool_calls": true,
            "previous_response_id": null, "store": false, "temperature": null, "top_p": null,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "truncation": "disabled", "usage": null, "metadata": {}, "user": null
        }))
        .expect("a response object")
    }

    fn text(t: &str) -> Event {
        Event::Text {
            index: 0,
            text: t.into(),
            logprobs: Vec::new(),
            tokens: 1,
        }
    }

    async fn run(streamed: Streamed, first: Event, rx: UnboundedReceiver<Event>) -> Vec<Value> {
        let frames = stream(streamed, first, rx)
            .collect::<Vec<_>>()
            .await
            .concat();
        frames
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).expect("JSON event"))
            .collect()
    }

    /// A thinking model's block is a reasoning item, streamed and closed before the
    /// message opens (at output index 1), and first in the response's output.
    #[tokio::test]
    async fn reasoning_streams_as_its_own_item_before_the_answer() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for t in ["pon", "der\n</th", "ink>\n\nHi"] {
            tx.send(text(t)).expect("open channel");
        }
        let usage = crate::openai::Usage::new(3, 4, 0);
        let done = Event::Done {
            index: 0,
            finish: crate::engine::FinishReason::Stop,
            usage,
        };
        tx.send(done).expect("open channel");
        let streamed = Streamed {
            response: started(),
            reader: None,
            thinking: Some(Start::Free),
            keep: None,
            metrics: Arc::new(Metrics::new("m")),
        };
        let events = run(streamed, text("<think>\n"), rx).await;
        let kinds: Vec<(&str, Option<u64>)> = events
            .iter()
            .map(|e| (e["type"].as_str().unwrap_or(""), e["output_index"].as_u64()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("response.created", None),
                ("response.in_progress", None),
                ("response.output_item.added", Some(0)),
                ("response.content_part.added", Some(0)),
                ("response.reasoning_text.delta", Some(0)),
                ("response.reasoning_text.delta", Some(0)),
                ("response.reasoning_text.done", Some(0)),
                ("response.content_part.done", Some(0)),
                ("response.output_item.done", Some(0)),
                ("response.output_item.added", Some(1)),
                ("response.content_part.added", Some(1)),
                ("response.output_text.delta", Some(1)),
                ("response.output_text.done", Some(1)),
                ("response.content_part.done", Some(1)),
                ("response.output_item.done", Some(1)),
                ("response.completed", None),
            ]
        );
        assert_eq!(events[2]["item"]["type"], "reasoning");
        assert_eq!(events[6]["text"], "ponder");
        let output = &events[15]["response"]["output"];
        assert_eq!(output[0]["type"], "reasoning");
        assert_eq!(output[0]["content"][0]["text"], "ponder");
        assert_eq!(output[0]["id"], events[2]["item"]["id"]);
        assert_eq!(output[1]["content"][0]["text"], "Hi");
        assert_eq!(output[1]["id"], events[9]["item"]["id"]);
    }

    #[test]
    fn a_failure_the_request_caused_is_not_a_server_error() {
        let schema = ApiError::bad("text", "`text` cannot be enforced");
        assert_eq!(error_code(&schema), "invalid_prompt");
        assert_eq!(error_code(&ApiError::Internal("x".into())), "server_error");
    }

    /// The engine stops mid-answer: the message item the client saw open is closed, as
    /// incomplete and with the text it was sent, before `response.failed` holds it.
    #[tokio::test]
    async fn a_failed_stream_closes_the_message_it_opened() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(text(" world")).expect("open channel");
        drop(tx);
        let streamed = Streamed {
            response: started(),
            reader: None,
            thinking: None,
            keep: None,
            metrics: Arc::new(Metrics::new("m")),
        };
        let events = run(streamed, text("Hello"), rx).await;
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.failed",
            ]
        );
        let added = &events[2]["item"]["id"];
        let done = &events[8]["item"];
        assert_eq!(&done["id"], added);
        assert_eq!(done["status"], "incomplete");
        assert_eq!(events[6]["text"], "Hello world");
        let failed = &events[9]["response"];
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["error"]["code"], "server_error");
        assert_eq!(failed["output"][0], *done);
        let numbers: Vec<u64> = events
            .iter()
            .filter_map(|e| e["sequence_number"].as_u64())
            .collect();
        assert_eq!(numbers, (0..10).collect::<Vec<u64>>());
    }
}
