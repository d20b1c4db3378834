//! The Responses wire format: the request as clients send it (tolerant: unknown fields
//! ignored, `null` for every optional one) and the response object and its items, which
//! are also what the store keeps.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Deserialize)]
pub struct ResponsesRequest {
    #[serde(default)]
    pub model: Option<String>,
    /// A string (one user message) or a list of items.
    #[serde(default)]
    pub input: Option<Value>,
    #[serde(default)]
    pub instructions: Option<String>,
    /// Flat function tools: `{"type": "function", "name", "description", "parameters", "strict"}`.
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "crate::openai::whole::option")]
    pub max_output_tokens: Option<i64>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`.
    #[serde(default)]
    pub text: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub user: Option<String>,
    /// Accepted: "disabled" (the default) or "auto", which here also refuses a
    /// conversation that does not fit rather than dropping its start.
    #[serde(default)]
    pub truncation: Option<String>,
    /// Extra data to return; none is supported, so only an empty list is accepted.
    #[serde(default)]
    pub include: Option<Vec<String>>,
    // Fields with no support here: a request that sets one is refused by name.
    #[serde(default)]
    pub background: Option<bool>,
    #[serde(default)]
    pub reasoning: Option<Value>,
    #[serde(default)]
    pub conversation: Option<Value>,
    #[serde(default)]
    pub prompt: Option<Value>,
    #[serde(default, deserialize_with = "crate::openai::whole::option")]
    pub top_logprobs: Option<i64>,
    #[serde(default, deserialize_with = "crate::openai::whole::option")]
    pub max_tool_calls: Option<i64>,
}

/// One item of a conversation: what `input` holds once read, what `output` holds, and
/// what `input_items` lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Item {
    Message {
        id: String,
        status: String,
        role: String,
        content: Vec<Part>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        /// JSON text.
        arguments: String,
        status: String,
    },
    FunctionCallOutput {
        id: String,
        call_id: String,
        output: CallOutput,
        status: String,
    },
    /// A thinking model's reasoning, before the answer it led to.
    Reasoning {
        id: String,
        /// The summary parts (`summary_text`) as a client sent them; empty in the
        /// reasoning this server writes, which gives it whole in `content`.
        summary: Vec<Value>,
        content: Vec<ReasoningText>,
    },
}

/// The text of a reasoning item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "reasoning_text")]
pub struct ReasoningText {
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    InputText {
        text: String,
    },
    OutputText {
        text: String,
        annotations: Vec<Value>,
        logprobs: Vec<Value>,
    },
    /// An assistant's refusal, as OpenAI returns it (in a history sent back).
    Refusal {
        refusal: String,
    },
}

/// A function call's output as the client sent it: text, or a list of text parts, which
/// `input_items` lists back as a list and the model reads joined by newlines (as a
/// message's parts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CallOutput {
    Text(String),
    Parts(Vec<Part>),
}

impl CallOutput {
    /// What the model reads.
    pub fn text(&self) -> String {
        match self {
            CallOutput::Text(text) => text.clone(),
            CallOutput::Parts(parts) => Part::joined(parts),
        }
    }
}

impl Part {
    /// The parts' text, a newline between them, as chat joins a message's parts (and
    /// vLLM does).
    pub fn joined(parts: &[Part]) -> String {
        parts.iter().map(Part::text).collect::<Vec<_>>().join("\n")
    }

    pub fn text(&self) -> &str {
        match self {
            Part::InputText { text } | Part::OutputText { text, .. } => text,
            Part::Refusal { refusal } => refusal,
        }
    }

    pub fn output_text(text: String) -> Self {
        Part::OutputText {
            text,
            annotations: Vec::new(),
            logprobs: Vec::new(),
        }
    }
}

impl Item {
    pub fn id(&self) -> &str {
        match self {
            Item::Message { id, .. }
            | Item::FunctionCall { id, .. }
            | Item::FunctionCallOutput { id, .. }
            | Item::Reasoning { id, .. } => id,
        }
    }

    /// A reasoning item with one text part.
    pub fn reasoning(id: String, text: String) -> Self {
        Item::Reasoning {
            id,
            summary: Vec::new(),
            content: vec![ReasoningText { text }],
        }
    }

    /// An assistant message with one text part.
    pub fn answer(text: String, status: &str) -> Self {
        Item::Message {
            id: new_id("msg"),
            status: status.into(),
            role: "assistant".into(),
            content: vec![Part::output_text(text)],
        }
    }
}

/// The response object, as returned, streamed in events, and stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseObject {
    pub id: String,
    pub object: String,
    pub created_at: u64,
    /// When it completed (Unix seconds); `null` until then, and for one that ended
    /// otherwise. Absent in responses stored before it.
    #[serde(default)]
    pub completed_at: Option<u64>,
    /// `in_progress`, `completed`, `incomplete` or `failed`.
    pub status: String,
    pub error: Option<ResponseError>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u64>,
    /// As requested: at most this many function calls in the answer (with
    /// `--max-tool-calls` the tighter bound). Absent in responses stored before it.
    #[serde(default)]
    pub max_tool_calls: Option<u64>,
    pub model: String,
    pub output: Vec<Item>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub store: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// `{"format": {...}}` as requested (`{"type": "text"}` by default).
    pub text: Value,
    pub tool_choice: Value,
    pub tools: Vec<Value>,
    pub truncation: String,
    pub usage: Option<ResponseUsage>,
    pub metadata: Map<String, Value>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncompleteDetails {
    pub reason: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResponseUsage {
    pub input_tokens: usize,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: usize,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct InputTokensDetails {
    pub cached_tokens: usize,
    /// OpenAI's count of tokens written to its cache; the prefix cache here keeps every
    /// prompt's blocks without a charge, so 0 (responses stored before it was sent lack it).
    #[serde(default)]
    pub cache_write_tokens: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: usize,
}

impl From<crate::openai::Usage> for ResponseUsage {
    fn from(u: crate::openai::Usage) -> Self {
        Self {
            input_tokens: u.prompt_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: u.cached_tokens(),
                cache_write_tokens: 0,
            },
            output_tokens: u.completion_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: u
                    .completion_tokens_details
                    .map_or(0, |d| d.reasoning_tokens),
            },
            total_tokens: u.total_tokens,
        }
    }
}

/// `{"object": "list", "data": [...]}` of `GET /v1/responses/{id}/input_items`.
#[derive(Debug, Serialize)]
pub struct ItemList {
    pub object: &'static str,
    pub data: Vec<Item>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// `POST /v1/responses/input_tokens`.
#[derive(Debug, Serialize)]
pub struct InputTokens {
    pub object: &'static str,
    pub input_tokens: usize,
}

/// `DELETE /v1/responses/{id}`.
#[derive(Debug, Serialize)]
pub struct Deleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// A new id with OpenAI's prefix (`resp`, `msg`, `fc`, ...) and 48 random hex digits.
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}_{:032x}{:016x}",
        rand::random::<u128>(),
        rand::random::<u64>()
    )
}
