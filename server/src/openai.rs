//! The OpenAI wire format: request bodies as clients send them (tolerant: unknown fields
//! ignored, `null` accepted for every optional field) and the response shapes they expect.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<WireMessage>,
    #[serde(flatten)]
    pub sampling: WireSampling,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default, deserialize_with = "whole::option")]
    pub top_logprobs: Option<i64>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub tools: Option<Vec<WireTool>>,
    /// `"none" | "auto" | "required" | {"type": "function", "function": {"name"}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub template: WireTemplateOptions,
    /// Fields that would change what the answer is, which this server cannot honour:
    /// refused by name rather than ignored (`validate::refuse_unsupported`).
    #[serde(flatten)]
    pub unsupported: UnsupportedChatFields,
    #[serde(flatten)]
    pub other_constraints: OtherConstraintFields,
}

/// How the chat template renders the conversation (vLLM's extensions).
#[derive(Debug, Default, Deserialize)]
pub struct WireTemplateOptions {
    /// Open the assistant's turn after the messages (default true).
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    /// Leave the final (assistant) message open, so the answer continues it.
    #[serde(default)]
    pub continue_final_message: Option<bool>,
    /// More variables for the template (Qwen3's `enable_thinking`, ...).
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

/// Whether a field was sent with a value (absent and `null` are alike: not given).
pub fn given(field: &Option<Value>) -> bool {
    field.as_ref().is_some_and(|v| !v.is_null())
}

/// Chat fields asking for what this server does not do: audio, web search, reasoning,
/// the deprecated `functions`/`function_call` (superseded by `tools`), and vLLM's chat
/// `echo` (the last message repeated before the answer).
#[derive(Debug, Default, Deserialize)]
pub struct UnsupportedChatFields {
    #[serde(default)]
    pub echo: Option<Value>,
    #[serde(default)]
    pub modalities: Option<Value>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub web_search_options: Option<Value>,
    #[serde(default)]
    pub reasoning_effort: Option<Value>,
    #[serde(default)]
    pub functions: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
}

/// Other servers' ways of asking for constrained output: vLLM's `guided_*` and
/// `structured_outputs`, llama.cpp's `json_schema`, SGLang's `regex`. A JSON schema, a
/// regular expression or a choice of strings is enforced as vLLM enforces it; a grammar
/// is refused by name (`validate::guided`). In both endpoints' requests.
#[derive(Debug, Default, Deserialize)]
pub struct OtherConstraintFields {
    #[serde(default)]
    pub guided_json: Option<Value>,
    #[serde(default)]
    pub guided_regex: Option<Value>,
    #[serde(default)]
    pub guided_choice: Option<Value>,
    #[serde(default)]
    pub guided_grammar: Option<Value>,
    #[serde(default)]
    pub structured_outputs: Option<Value>,
    #[serde(default)]
    pub json_schema: Option<Value>,
    #[serde(default)]
    pub grammar: Option<Value>,
    #[serde(default)]
    pub regex: Option<Value>,
}

/// `{"type": "function", "function": {name, description, parameters, strict}}`.
#[derive(Debug, Deserialize)]
pub struct WireTool {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub function: Option<WireFunction>,
}

#[derive(Debug, Deserialize)]
pub struct WireFunction {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub parameters: Option<Value>,
    /// Always enforced here: every call follows its schema.
    #[serde(default)]
    pub strict: Option<bool>,
}

/// A call in an assistant message of the history.
#[derive(Debug, Deserialize)]
pub struct WireToolCall {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub function: WireCalledFunction,
}

#[derive(Debug, Deserialize)]
pub struct WireCalledFunction {
    pub name: String,
    /// The arguments as JSON text (an object is taken as it is).
    #[serde(default)]
    pub arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptInput,
    #[serde(flatten)]
    pub sampling: WireSampling,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, deserialize_with = "whole::option")]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub suffix: Option<String>,
    /// Only 1 (the default) is served: one sample per choice, not the best of several.
    #[serde(default, deserialize_with = "whole::option")]
    pub best_of: Option<i64>,
    /// Chat's fields, which a completion does not take: refused, not ignored.
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub tools: Option<Value>,
    #[serde(flatten)]
    pub other_constraints: OtherConstraintFields,
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct WireSampling {
    #[serde(default, deserialize_with = "whole::option")]
    pub max_tokens: Option<i64>,
    #[serde(default, deserialize_with = "whole::option")]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default, deserialize_with = "whole::option")]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f64>,
    #[serde(default, deserialize_with = "whole::option")]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopInput>,
    #[serde(default)]
    pub include_stop_str_in_output: Option<bool>,
    #[serde(default, deserialize_with = "whole::option")]
    pub n: Option<i64>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) → bias in [-100, 100].
    #[serde(default)]
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    #[serde(default, deserialize_with = "whole::option")]
    pub min_tokens: Option<i64>,
    #[serde(default)]
    pub stop_token_ids: Option<Vec<i64>>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// vLLM's: with `include_usage`, every chunk carries the usage so far.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of strings")]
pub enum StopInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, a list of strings, a list of token ids or a list of such lists"
)]
pub enum PromptInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Assistant turns: the calls they made.
    #[serde(default)]
    pub tool_calls: Option<Vec<WireToolCall>>,
    /// Tool turns: the call they answer.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Assistant turns: a thinking model's reasoning, as this server returned it.
    #[serde(default)]
    pub reasoning_content: Option<String>,
    /// The same, as some servers and clients name it (`reasoning_content` wins).
    #[serde(default)]
    pub reasoning: Option<String>,
    /// Assistant turns: a refusal, as the API returns one beside `content: null`.
    #[serde(default)]
    pub refusal: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of content parts")]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
    /// An assistant's `refusal` part.
    #[serde(default)]
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    /// Absent only in a stream's running usage, before the cached share is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// A thinking model's (absent for other models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CompletionTokensDetails {
    /// Completion tokens that were the thinking block (its tags included).
    pub reasoning_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens }),
            completion_tokens_details: None,
        }
    }

    /// A stream's usage so far (vLLM's continuous usage): how many prompt tokens the
    /// prefix cache served is said only at the end.
    pub fn running(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens_details: None,
            ..Self::new(prompt_tokens, completion_tokens, 0)
        }
    }

    /// Prompt tokens the prefix cache served (0 where not known).
    pub fn cached_tokens(&self) -> usize {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }

    /// With `reasoning_tokens` more of the completion tokens counted as reasoning.
    pub fn with_reasoning(mut self, reasoning_tokens: usize) -> Self {
        let before = self
            .completion_tokens_details
            .map_or(0, |d| d.reasoning_tokens);
        self.completion_tokens_details = Some(CompletionTokensDetails {
            reasoning_tokens: before + reasoning_tokens,
        });
        self
    }
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<Value>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the answer is only calls.
    pub content: Option<String>,
    /// A thinking model's reasoning (absent for other models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// A call in a response.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionOut {
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

impl From<crate::tools::ToolCall> for ToolCallOut {
    fn from(c: crate::tools::ToolCall) -> Self {
        Self {
            id: c.id,
            kind: "function",
            function: FunctionOut {
                name: c.name,
                arguments: c.arguments,
            },
        }
    }
}

/// One call's part of a streamed chunk: the first carries `id`, `type`, the name and
/// empty arguments; later ones only argument text.
#[derive(Debug, Serialize)]
pub struct ToolCallDelta {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// One streamed chunk of `/v1/chat/completions`.
#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice<'a>>,
    /// Present (as `null` or the usage) only when the client asked for usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
}

/// `choices[].logprobs` of a chat completion (or chunk).
#[derive(Debug, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// `choices[].logprobs` of a (legacy) completion.
#[derive(Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// `null` for the first token of an echoed prompt (nothing precedes it).
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Integer fields as clients compute them: `5` or `5.0`. Python's `json` writes any float
/// with its fraction (`max_tokens = ctx * 0.5` goes out as `1024.0`), and vLLM's fields
/// (pydantic) and llama.cpp take a float with no fraction as the integer it is.
pub mod whole {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer};
    use serde_json::Number;

    /// `#[serde(default, deserialize_with = "whole::option")]` on an `Option<i64>`.
    pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        Option::<Number>::deserialize(d)?
            .map(|n| integer(&n).map_err(D::Error::custom))
            .transpose()
    }

    fn integer(n: &Number) -> Result<i64, String> {
        if let Some(i) = n.as_i64() {
            return Ok(i);
        }
        match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() != 0.0 => {
                Err(format!("expected an integer, got `{n}`"))
            }
            // `i64::MAX as f64` is 2^63, and every whole double below it converts exactly.
            Some(f) if n.is_f64() && f.abs() < i64::MAX as f64 => Ok(f as i64),
            _ => Err(format!("`{n}` is out of range (a 64-bit integer)")),
        }
    }

    #[cfg(test)]
    mod tests {
        use serde::Deserialize;
        use serde_json::json;

        #[derive(Debug, Deserialize)]
        struct Fields {
            #[serde(default, deserialize_with = "super::option")]
            n: Option<i64>,
        }

        fn read(v: serde_json::Value) -> Result<Option<i64>, String> {
            serde_json::from_value::<Fields>(v)
                .map(|f| f.n)
                .map_err(|e| e.to_string())
        }

        #[test]
        fn whole_floats_are_integers_and_fractions_are_refused() {
            assert_eq!(read(json!({"n": 5})), Ok(Some(5)));
            assert_eq!(read(json!({"n": -3})), Ok(Some(-3)));
            assert_eq!(read(json!({"n": 5.0})), Ok(Some(5)));
            assert_eq!(read(json!({"n": 1e2})), Ok(Some(100)));
            assert_eq!(read(json!({"n": -0.0})), Ok(Some(0)));
            assert_eq!(read(json!({"n": null})), Ok(None));
            assert_eq!(read(json!({})), Ok(None));
            assert!(read(json!({"n": 5.5}))
                .unwrap_err()
                .contains("expected an integer"));
            assert!(read(json!({"n": 1e19}))
                .unwrap_err()
                .contains("out of range"));
            assert!(read(json!({"n": u64::MAX}))
                .unwrap_err()
                .contains("out of range"));
            assert!(read(json!({"n": "5"})).is_err());
            assert!(read(json!({"n": true})).is_err());
        }
    }
}
