//! Validation: the only way from a wire request to a [`GenRequest`]. The chat template is
//! applied, the prompt tokenized, every sampling field checked with a message that names
//! it, and `max_tokens` clamped to the context that is left.

use chorus_model::{ChatMessage, SamplingParams};
use serde_json::{json, Value};

use crate::engine::{GenRequest, ModelInfo};
use crate::error::ApiError;
use crate::openai::{
    given, ChatCompletionRequest, CompletionRequest, MessageContent, PromptInput, StopInput,
    UnsupportedChatFields, WireMessage, WireSampling, WireTemplateOptions, WireTool,
};
use crate::reasoning::Start;
use crate::tools::{self, Broken, CallReader, FunctionSpec, Ledger, ToolRequest};

mod constraints;

pub use constraints::{guided, json_constraint, response_format, Guided};
use constraints::{guided_constraint, unenforceable_function};

/// Most alternatives `top_logprobs` (chat) or `logprobs` (completions) may ask for.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// Limits that come from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_stop: usize,
    /// `--max-stop-bytes`: longest stop string.
    pub max_stop_bytes: usize,
    /// `--max-prompt-tokens`; the model's context always bounds it too.
    pub max_prompt_tokens: Option<usize>,
    /// `--max-n`: most choices per prompt.
    pub max_n: usize,
    /// `--max-prompts`: most prompts in one completions request.
    pub max_prompts: usize,
    /// `--max-tool-calls`: most function calls in one answer.
    pub max_tool_calls: usize,
}

/// A request that passed every check.
#[derive(Debug)]
pub struct ValidRequest {
    /// One per prompt: chat has one, completions may list several (a batch; prompt `i`'s
    /// choices are numbered from `i · n`, as OpenAI numbers them).
    pub gens: Vec<GenRequest>,
    pub stream: bool,
    pub include_usage: bool,
    /// With `include_usage`, every chunk carries the usage so far (vLLM's
    /// `continuous_usage_stats`).
    pub continuous_usage: bool,
    /// Log-probabilities go into the response.
    pub logprobs: bool,
    /// Completions with `echo`: each prompt as its choices repeat it first (else empty).
    pub echo: Vec<Echo>,
    /// The request offers functions to call: how its answers are read back.
    pub tools: Option<CallReader>,
    /// A thinking model's chat: where each answer starts relative to its block.
    pub thinking: Option<Start>,
}

/// A completions prompt as the response repeats it (`echo`).
#[derive(Debug, Clone)]
pub struct Echo {
    pub text: String,
    /// The prompt's first token is a BOS the server put in front of the text: its
    /// log-probabilities start after it.
    pub skips_bos: bool,
}

const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "developer"];

pub fn chat(
    info: &ModelInfo,
    limits: Limits,
    request_id: String,
    req: ChatCompletionRequest,
) -> Result<ValidRequest, ApiError> {
    check_model(info, req.model.as_deref())?;
    refuse_unsupported(&req.unsupported, info.reasoning)?;
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS).contains(&k) => {
            return Err(ApiError::bad(
                "top_logprobs",
                format!("`top_logprobs` must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
            ))
        }
        (Some(true), k) => Some(k.unwrap_or(0) as usize),
        (_, Some(k)) if k > 0 => {
            return Err(ApiError::bad(
                "top_logprobs",
                "`top_logprobs` requires `logprobs: true`",
            ))
        }
        _ => None,
    };
    let tools = tool_request(
        req.tools,
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
        limits.max_tool_calls,
    )?;
    let mut answer = response_format(req.response_format.as_ref())?.map(|s| ("response_format", s));
    // Another server's constraint: a schema is an answer's schema as `response_format`
    // gives it (beside tools too); a regex or a choice is the whole answer's.
    let mut text_rule = None;
    if let Some((field, guided)) = guided(&req.other_constraints)? {
        if answer.is_some() {
            return Err(ApiError::bad(
                field,
                format!("give either `response_format` or `{field}`"),
            ));
        }
        match guided {
            Guided::Json(schema) => answer = Some((field, schema)),
            _ if tools.as_ref().is_some_and(|t| t.active()) => {
                return Err(ApiError::bad(
                    field,
                    format!("`{field}` constrains the whole answer, which cannot also call `tools`: send `tool_choice: \"none\"`"),
                ))
            }
            other => text_rule = Some((field, other)),
        }
    }
    let stream = req.stream.unwrap_or(false);
    let (include_usage, continuous_usage) = stream_usage(stream, req.stream_options.as_ref())?;
    let rendering = rendering(req.template)?;
    let (mut gen, reader, thinking) = conversation(
        info,
        limits,
        request_id,
        req.messages,
        tools.as_ref(),
        answer,
        &req.sampling,
        &rendering,
        "messages",
    )?;
    if let Some((field, guided)) = text_rule {
        gen.constraint = Some(guided_constraint(info, field, &guided, thinking)?);
    }
    gen.logprobs = logprobs;
    Ok(ValidRequest {
        gens: vec![gen],
        stream,
        include_usage,
        continuous_usage,
        logprobs: logprobs.is_some(),
        echo: Vec::new(),
        tools: reader,
        thinking,
    })
}

/// Chat fields that would change what the answer is, refused by name: ignoring them
/// would answer a different question than the one asked (text for audio, a guess for a
/// web search, a call-less reply to `functions`).
/// `thinking`: the model thinks in `<think>` blocks.
fn refuse_unsupported(f: &UnsupportedChatFields, thinking: bool) -> Result<(), ApiError> {
    if let Some(m) = f.modalities.as_ref().filter(|m| !m.is_null()) {
        if *m != json!(["text"]) {
            return Err(ApiError::bad(
                "modalities",
                format!("`modalities` must be [\"text\"]: this model only writes text, got {m}"),
            ));
        }
    }
    if given(&f.audio) {
        return Err(ApiError::bad(
            "audio",
            "`audio` output is not supported: this model only writes text",
        ));
    }
    if given(&f.web_search_options) {
        return Err(ApiError::bad(
            "web_search_options",
            "web search is not supported; offer a search function in `tools` instead",
        ));
    }
    if let Some(e) = f
        .reasoning_effort
        .as_ref()
        .filter(|e| !e.is_null() && (thinking || e.as_str() != Some("none")))
    {
        return Err(ApiError::bad(
            "reasoning_effort",
            format!(
                "`reasoning_effort` {e} is not supported: {}",
                crate::reasoning::effort_refused(thinking)
            ),
        ));
    }
    if given(&f.echo) && f.echo != Some(json!(false)) {
        return Err(ApiError::bad(
            "echo",
            "`echo` is not supported in chat (a completions field): the answer is the new text alone, with `continue_final_message` the continuation; prepend the last message to it yourself",
        ));
    }
    for (field, value) in [
        ("functions", &f.functions),
        ("function_call", &f.function_call),
    ] {
        if given(value) {
            return Err(ApiError::bad(
                field,
                format!("the deprecated `{field}` is not supported; use `tools` and `tool_choice`"),
            ));
        }
    }
    Ok(())
}

/// A chat-shaped request once its endpoint's own fields are read (`/v1/chat/completions`
/// and `/v1/responses` share it): the conversation rendered with the offered tools and
/// tokenized, the constraint that holds calls to their schemas and a text answer to
/// `answer`'s (the structured-output schema and the field that gave it), and how the
/// answer is read back.
#[allow(clippy::too_many_arguments)]
pub fn conversation(
    info: &ModelInfo,
    limits: Limits,
    request_id: String,
    wire: Vec<WireMessage>,
    tools: Option<&ToolRequest>,
    answer: Option<(&'static str, Value)>,
    sampling: &WireSampling,
    rendering: &Rendering,
    param: &'static str,
) -> Result<(GenRequest, Option<CallReader>, Option<Start>), ApiError> {
    let knows_tools = info.template.knows_tools();
    let format = tools::prompt::format_for(knows_tools, info.template.source());
    let prompt = chat_prompt(
        info,
        limits,
        wire,
        tools,
        answer.is_some(),
        rendering,
        param,
    )?;
    let start = prompt.start;
    let mut reader = None;
    // Compiled alone first, so that a schema that cannot be enforced is blamed on its field.
    let mut constraint = match &answer {
        Some((field, schema)) => Some(json_constraint(info, field, schema.clone(), start)?),
        None => None,
    };
    if let Some(t) = tools.filter(|t| t.active()) {
        if let Some((field, schema)) = &answer {
            let functions = t.callable().map(|f| &f.parameters);
            if let Some(id) = crate::schema_check::shared_id(functions.chain([schema])) {
                return Err(ApiError::bad(
                    field,
                    format!("the schema declares the `$id` {id:?}, as a function's `parameters` does: give each its own"),
                ));
            }
        }
        let grammars = info.grammars.as_ref().map_err(|e| {
            ApiError::bad(
                "tools",
                format!("function calling is unavailable for this model: {e}"),
            )
        })?;
        let field = answer.as_ref().map(|(field, _)| *field);
        let answer = answer.as_ref().map(|(_, schema)| schema);
        let grammar = match start {
            Some(start) => {
                let thinks = start != Start::Answer;
                start.grammar(&format.rules(t, answer, "answer", thinks))
            }
            None => format.grammar(t, answer),
        };
        let combined = grammars.lark("tools", grammar).map_err(|e| {
            let message = unenforceable_function(grammars, t).unwrap_or_else(|| {
                format!(
                    "the functions' `parameters` cannot be enforced together: {}",
                    tools::format::explain(&e)
                )
            });
            ApiError::bad("tools", message)
        })?;
        constraint = Some(combined.beside(field));
        reader = Some(CallReader {
            format,
            choice: t.choice.clone(),
            json_answer: answer.is_some(),
            functions: t.callable().map(|f| f.name.clone()).collect(),
        });
    }
    let mut gen = generation(info, limits, request_id, prompt.ids, sampling, false, param)?;
    gen.constraint = constraint;
    Ok((gen, reader, start))
}

/// The ids of a conversation as the chat endpoint runs it: its messages checked, the
/// offered tools rendered as the template (or the fallback system text) shows them, then
/// [`encode_chat`]. `json_answer`: a structured-output schema is set beside the tools.
pub fn chat_prompt(
    info: &ModelInfo,
    limits: Limits,
    wire: Vec<WireMessage>,
    tools: Option<&ToolRequest>,
    json_answer: bool,
    rendering: &Rendering,
    param: &'static str,
) -> Result<ChatPrompt, ApiError> {
    let messages = chat_messages(wire)?;
    let knows_tools = info.template.knows_tools();
    let (messages, tools_value) = tools::prompt::prepare(knows_tools, tools, json_answer, messages);
    encode_chat(
        info,
        limits,
        &messages,
        tools_value.as_ref(),
        rendering,
        param,
    )
}

/// How a conversation is rendered: the template's generation prompt, or the final
/// assistant message left open to be continued, and the client's extra template
/// variables.
#[derive(Debug, Clone)]
pub struct Rendering {
    pub add_generation_prompt: bool,
    pub continue_final: bool,
    /// An object of variables, their strings escaped as message text is.
    pub kwargs: Option<Value>,
}

impl Default for Rendering {
    fn default() -> Self {
        Self {
            add_generation_prompt: true,
            continue_final: false,
            kwargs: None,
        }
    }
}

/// Names the template gets from the server, which `chat_template_kwargs` cannot replace.
const TEMPLATE_VARIABLES: [&str; 5] = [
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

/// The request's template options, checked.
pub fn rendering(w: WireTemplateOptions) -> Result<Rendering, ApiError> {
    let continue_final = w.continue_final_message.unwrap_or(false);
    if continue_final && w.add_generation_prompt == Some(true) {
        return Err(ApiError::bad(
            "continue_final_message",
            "`continue_final_message` and `add_generation_prompt` cannot both be true: the final message is either continued or answered",
        ));
    }
    if let Some(name) = w
        .chat_template_kwargs
        .iter()
        .flat_map(|k| k.keys())
        .find(|k| TEMPLATE_VARIABLES.contains(&k.as_str()))
    {
        return Err(ApiError::bad(
            "chat_template_kwargs",
            format!("`chat_template_kwargs` cannot set {name:?}: the server sets it (the request's own fields say what it holds)"),
        ));
    }
    Ok(Rendering {
        add_generation_prompt: !continue_final && w.add_generation_prompt.unwrap_or(true),
        continue_final,
        kwargs: w.chat_template_kwargs.map(Value::Object),
    })
}

/// `tools` as the functions they offer, with `tool_choice` and `parallel_tool_calls`.
pub fn tool_request(
    wire: Option<Vec<WireTool>>,
    tool_choice: Option<&Value>,
    parallel: Option<bool>,
    max_calls: usize,
) -> Result<Option<ToolRequest>, ApiError> {
    let mut functions = Vec::new();
    for (i, t) in wire.into_iter().flatten().enumerate() {
        let f = match (t.kind.as_str(), t.function) {
            ("function", Some(f)) => f,
            ("function", None) => {
                return Err(ApiError::bad(
                    "tools",
                    format!("`tools[{i}].function` is required: {{\"type\": \"function\", \"function\": {{\"name\": ..., \"parameters\": ...}}}}"),
                ))
            }
            (kind, _) => {
                return Err(ApiError::bad(
                    "tools",
                    format!("`tools[{i}]` must be {{\"type\": \"function\", \"function\": {{...}}}}, got type {kind:?}"),
                ))
            }
        };
        functions.push(FunctionSpec {
            name: f.name,
            description: f.description,
            parameters: f
                .parameters
                .filter(|p| !p.is_null())
                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        });
    }
    ToolRequest::new(
        tools::Shape::Chat,
        functions,
        tool_choice,
        parallel,
        max_calls,
    )
}

/// The conversation as the template sees it: roles checked, text parts joined, earlier
/// calls with their arguments as objects, and every result answering an earlier call.
pub fn chat_messages(wire: Vec<WireMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if wire.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(wire.len());
    // The tool messages right after an assistant turn answer each of its calls once.
    let mut calls = Ledger::default();
    let unanswered = |at: String, open: &[String]| {
        ApiError::bad(
            "messages",
            format!("an assistant message with `tool_calls` must be followed by tool messages answering each call; {at} the calls {open:?} have none"),
        )
    };
    for (i, m) in wire.into_iter().enumerate() {
        if m.role != "tool" && !calls.open().is_empty() {
            return Err(unanswered(format!("at `messages[{i}]`"), calls.open()));
        }
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::bad(
                "messages",
                format!(
                    "`messages[{i}].role` must be one of {ROLES:?}, got {:?}",
                    m.role
                ),
            ));
        }
        let content = match m.content {
            // An assistant's refusal, as the API returned it (`content: null`).
            None if m.role == "assistant" => m.refusal.unwrap_or_default(),
            None => String::new(),
            Some(MessageContent::Text(t)) if t.is_empty() && m.role == "assistant" => {
                m.refusal.unwrap_or_default()
            }
            Some(MessageContent::Text(t)) => t,
            Some(MessageContent::Parts(parts)) => {
                // Parts are joined by a newline, as vLLM joins them.
                let mut texts = Vec::with_capacity(parts.len());
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text, p.refusal) {
                        ("text", Some(t), _) => texts.push(t),
                        // An assistant's earlier refusal is what it said.
                        ("refusal", _, Some(t)) if m.role == "assistant" => texts.push(t),
                        (kind, _, _) => {
                            return Err(ApiError::bad(
                                "messages",
                                format!("`messages[{i}].content[{j}]`: only parts of type \"text\" with a `text` field are supported, got type {kind:?}"),
                            ))
                        }
                    }
                }
                texts.join("\n")
            }
        };
        // `developer` is the newer name OpenAI gives the system role.
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role
        };
        let mut message = ChatMessage::new(role, content);
        // A participant's name, which templates may show (a tool turn's is set below).
        message.name = m.name.clone().filter(|n| !n.is_empty());
        // Reasoning is an assistant's own; elsewhere it means nothing to a template.
        if message.role == "assistant" {
            message.reasoning_content =
                (m.reasoning_content.or(m.reasoning)).filter(|r| !r.is_empty());
        }
        if let Some(wire_calls) = m.tool_calls.filter(|c| !c.is_empty()) {
            if message.role != "assistant" {
                return Err(ApiError::bad(
                    "messages",
                    format!("`messages[{i}].tool_calls`: only assistant messages make calls"),
                ));
            }
            let mut written = Vec::new();
            for (j, c) in wire_calls.into_iter().enumerate() {
                let arguments = match c.function.arguments {
                    Some(Value::String(s)) if s.trim().is_empty() => json!({}),
                    Some(Value::String(s)) => crate::tools::prompt::arguments_value(&s).map_err(|e| {
                        ApiError::bad(
                            "messages",
                            format!("`messages[{i}].tool_calls[{j}].function.arguments` is not JSON: {e}"),
                        )
                    })?,
                    Some(v) if !v.is_null() => v,
                    _ => json!({}),
                };
                // The tool message that answers the call names it by this id.
                let Some(id) = c.id.filter(|id| !id.is_empty()) else {
                    return Err(ApiError::bad(
                        "messages",
                        format!("`messages[{i}].tool_calls[{j}].id` is required: the tool message answering the call names it"),
                    ));
                };
                if calls.call(id.clone(), c.function.name.clone()).is_err() {
                    return Err(ApiError::bad(
                        "messages",
                        format!("`messages[{i}].tool_calls[{j}].id` {id:?} is the id of an earlier call: a result could not say which it answers"),
                    ));
                }
                let call = json!({
                    "id": id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": arguments},
                });
                written.push(call);
            }
            message.tool_calls = Some(Value::Array(written));
        }
        if message.role == "tool" {
            let Some(id) = m.tool_call_id.filter(|id| !id.is_empty()) else {
                return Err(ApiError::bad(
                    "messages",
                    format!("`messages[{i}].tool_call_id` is required: the id of the call the message answers"),
                ));
            };
            let name = match calls.answer(&id) {
                Ok(name) => name,
                Err(Broken::Answered) => return Err(ApiError::bad(
                    "messages",
                    format!("`messages[{i}].tool_call_id` {id:?} answers a call that is already answered, or not the last assistant message's"),
                )),
                Err(_) => return Err(ApiError::bad(
                    "messages",
                    format!("`messages[{i}].tool_call_id` {id:?} answers no earlier call"),
                )),
            };
            message.name = Some(m.name.unwrap_or_else(|| name.to_string()));
            message.tool_call_id = Some(id);
        }
        messages.push(message);
    }
    if !calls.open().is_empty() {
        return Err(unanswered("at the end".into(), calls.open()));
    }
    Ok(messages)
}

/// Escapes every string in a client-written JSON value, as message text is.
fn escape_strings(info: &ModelInfo, value: &mut Value) {
    match value {
        Value::String(s) => *s = info.tokenizer.escape_content(s),
        Value::Array(items) => items.iter_mut().for_each(|v| escape_strings(info, v)),
        // Keys too: a template's `tojson` writes them as they are. Escaping is one to
        // one, so no two keys become one.
        Value::Object(map) => {
            *map = std::mem::take(map)
                .into_iter()
                .map(|(k, mut v)| {
                    escape_strings(info, &mut v);
                    (info.tokenizer.escape_content(&k), v)
                })
                .collect();
        }
        _ => {}
    }
}

/// The ids of a conversation as the model's template renders it: what clients wrote is
/// plain text (special tokens in it are escaped), only the template's markers are control
/// tokens. A rendering provably too long for the context is refused before tokenizing.
/// `param`: the request field the conversation came from, named in errors.
pub fn encode_chat(
    info: &ModelInfo,
    limits: Limits,
    messages: &[ChatMessage],
    tools: Option<&Value>,
    rendering: &Rendering,
    param: &'static str,
) -> Result<ChatPrompt, ApiError> {
    // Every string a client wrote is escaped here, once, whatever the template does
    // with it (the fallback for templates without tools has already moved calls and
    // results into `content`).
    let escape = |s: &str| info.tokenizer.escape_content(s);
    let mut escaped: Vec<ChatMessage> = messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: escape(&m.content),
            tool_calls: m.tool_calls.clone().map(|mut calls| {
                escape_strings(info, &mut calls);
                calls
            }),
            tool_call_id: m.tool_call_id.as_deref().map(escape),
            name: m.name.as_deref().map(escape),
            reasoning_content: m.reasoning_content.as_deref().map(escape),
        })
        .collect();
    let tools = tools.cloned().map(|mut t| {
        escape_strings(info, &mut t);
        t
    });
    let kwargs = rendering.kwargs.clone().map(|mut k| {
        escape_strings(info, &mut k);
        k
    });
    // Continued: a mark no client can write goes right after the final message's text,
    // and the rendering is cut where the template wrote it. So the cut is inside that
    // message whatever the text (found elsewhere too, or trimmed by the template: the
    // mark keeps trailing spaces, which a continuation needs), and what the template
    // writes after it (the end of turn) goes.
    let mark = rendering.continue_final.then(|| {
        format!(
            "\u{E000}chorus-continue-{:016x}\u{E000}",
            rand::random::<u64>()
        )
    });
    if let Some(mark) = &mark {
        match escaped.last_mut() {
            Some(last) if last.role == "assistant" && !last.content.is_empty() => {
                last.content.push_str(mark);
            }
            _ => {
                return Err(ApiError::bad(
                    "continue_final_message",
                    "`continue_final_message` needs the last message to be an assistant's with text to continue",
                ))
            }
        }
    }
    let mut rendered = info
        .template
        .render_with(
            &escaped,
            rendering.add_generation_prompt,
            tools.as_ref(),
            kwargs.as_ref(),
        )
        .map_err(|e| {
            ApiError::bad(
                param,
                format!("the chat template rejected the conversation: {e}"),
            )
        })?;
    if let Some(mark) = &mark {
        let mut found = rendered.match_indices(mark.as_str()).map(|(at, _)| at);
        let (Some(at), None) = (found.next(), found.next()) else {
            return Err(ApiError::bad(
                "continue_final_message",
                "the chat template does not write the final message's text once as it is, so it cannot be continued",
            ));
        };
        rendered.truncate(at);
    }
    check_prompt_bytes(info, limits, param, rendered.len())?;
    let start = info
        .reasoning
        .then(|| match (rendering.continue_final, messages.last()) {
            (true, Some(last)) => Start::after(&last.content),
            _ if rendering.add_generation_prompt => Start::of_prompt(&rendered),
            _ => Start::Free,
        });
    let prompt = info
        .tokenizer
        .encode_chat(&rendered)
        .map_err(|e| ApiError::Internal(format!("tokenization failed: {e}")))?;
    if prompt.is_empty() {
        return Err(ApiError::bad(
            param,
            "the chat template rendered the conversation to no tokens",
        ));
    }
    Ok(ChatPrompt { ids: prompt, start })
}

/// A conversation's prompt, and, for a thinking model, where its answer starts.
#[derive(Debug)]
pub struct ChatPrompt {
    pub ids: Vec<u32>,
    /// `None`: the model does not think (or `--reasoning-format none`).
    pub start: Option<Start>,
}

/// The most prompt tokens a request may have, and what sets that bound.
fn prompt_bound(info: &ModelInfo, limits: Limits, scoring: bool) -> (usize, String) {
    let context = info.max_seq_tokens;
    // At least one token must be left to generate, unless the prompt is only scored.
    let (leave, and) = match scoring {
        true => (0, ""),
        false => (1, ", and at least one must be left to generate"),
    };
    let mut bound = (
        context.saturating_sub(leave),
        match info.seq_limit {
            Some(flag) => {
                format!("this server holds at most {context} tokens per sequence ({flag}){and}")
            }
            None => format!("this model's context is {context} tokens{and}"),
        },
    );
    if let Some(limit) = limits.max_prompt_tokens.filter(|&l| l < bound.0) {
        bound = (
            limit,
            format!("this server accepts at most {limit} (--max-prompt-tokens {limit})"),
        );
    }
    bound
}

/// Refuses a prompt of `bytes` bytes that cannot fit however it tokenizes, without
/// tokenizing it (a few megabytes of text take seconds to tokenize).
fn check_prompt_bytes(
    info: &ModelInfo,
    limits: Limits,
    param: &'static str,
    bytes: usize,
) -> Result<(), ApiError> {
    // As a prompt only scored may fill the context, which this check does not know of.
    let (bound, why) = prompt_bound(info, limits, true);
    let fewest = info.tokenizer.min_tokens(bytes);
    if fewest > bound {
        return Err(ApiError::ContextLength {
            message: format!("the prompt is {bytes} bytes, so at least {fewest} tokens, but {why}"),
            param: param.into(),
        });
    }
    Ok(())
}

pub fn completion(
    info: &ModelInfo,
    limits: Limits,
    request_id: String,
    req: CompletionRequest,
) -> Result<ValidRequest, ApiError> {
    check_model(info, req.model.as_deref())?;
    let guided = guided(&req.other_constraints)?;
    let text_format = req.response_format.as_ref().and_then(|f| f.get("type"));
    if given(&req.response_format) && text_format != Some(&json!("text")) {
        return Err(ApiError::bad(
            "response_format",
            "a completion's text is not constrained: send `response_format` to /v1/chat/completions",
        ));
    }
    if given(&req.tools) {
        return Err(ApiError::bad(
            "tools",
            "a completion does not call functions: send `tools` to /v1/chat/completions",
        ));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad(
            "suffix",
            "`suffix` (fill-in-the-middle) is not supported by this model",
        ));
    }
    if let Some(b) = req.best_of.filter(|&b| b != 1) {
        return Err(ApiError::bad(
            "best_of",
            format!("`best_of` must be 1 (the best of several samples is not supported), got {b}"),
        ));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::bad(
                "logprobs",
                format!("`logprobs` must be in [0, {MAX_TOP_LOGPROBS}], got {k}"),
            ))
        }
    };
    let echo = req.echo.unwrap_or(false);
    // A list of prompts is a batch: each prompt is its own sequence with `n` choices.
    let prompts: Vec<Result<String, Vec<u32>>> = match req.prompt {
        PromptInput::Text(t) => vec![Ok(t)],
        PromptInput::Texts(v) => v.into_iter().map(Ok).collect(),
        PromptInput::Tokens(ids) => vec![Err(ids)],
        PromptInput::TokenBatches(v) => v.into_iter().map(Err).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::bad(
            "prompt",
            "`prompt` must not be an empty list",
        ));
    }
    if prompts.len() > limits.max_prompts {
        return Err(ApiError::bad(
            "prompt",
            format!(
                "`prompt` lists {} prompts, more than this server takes in one request ({}: --max-prompts, at most --max-running + --max-queue)",
                prompts.len(),
                limits.max_prompts
            ),
        ));
    }
    let batch = prompts.len() > 1;
    let (mut gens, mut echoes) = (Vec::with_capacity(prompts.len()), Vec::new());
    for (i, prompt) in prompts.into_iter().enumerate() {
        let id = match batch {
            true => format!("{request_id}-{i}"),
            false => request_id.clone(),
        };
        let (gen, echoed) =
            completion_prompt(info, limits, id, prompt, &req.sampling, echo, logprobs).map_err(
                |e| match (e, batch) {
                    // Which prompt of a batch is wrong.
                    (
                        ApiError::BadRequest {
                            message,
                            param: Some("prompt"),
                        },
                        true,
                    ) => ApiError::BadField {
                        message,
                        param: format!("prompt[{i}]"),
                    },
                    (ApiError::ContextLength { message, param }, true) if param == "prompt" => {
                        ApiError::ContextLength {
                            message,
                            param: format!("prompt[{i}]"),
                        }
                    }
                    (e, _) => e,
                },
            )?;
        gens.push(gen);
        echoes.extend(echoed);
    }
    // Compiled once; each prompt's sequence gets a copy.
    if let Some((field, guided)) = &guided {
        let constraint = guided_constraint(info, field, guided, None)?;
        for gen in &mut gens {
            gen.constraint = Some(constraint.fork());
        }
    }
    let stream = req.stream.unwrap_or(false);
    let (include_usage, continuous_usage) = stream_usage(stream, req.stream_options.as_ref())?;
    Ok(ValidRequest {
        gens,
        stream,
        include_usage,
        continuous_usage,
        logprobs: logprobs.is_some(),
        echo: echoes,
        tools: None,
        thinking: None,
    })
}

/// One prompt of a completions request: its generation, and with `echo` the prompt as
/// the response repeats it (as sent; token prompts as their text).
fn completion_prompt(
    info: &ModelInfo,
    limits: Limits,
    request_id: String,
    prompt: Result<String, Vec<u32>>,
    sampling: &WireSampling,
    echo: bool,
    logprobs: Option<usize>,
) -> Result<(GenRequest, Option<Echo>), ApiError> {
    let (prompt, prompt_text, added_bos) = match prompt {
        Ok(t) => {
            let (ids, added_bos) = tokenize_prompt(info, limits, &t)?;
            (ids, Some(t), added_bos)
        }
        Err(ids) => (ids, None, false),
    };
    let vocab = info.tokenizer.vocab_size() as u32;
    if let Some(bad) = prompt.iter().find(|&&id| id >= vocab) {
        return Err(ApiError::bad(
            "prompt",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad("prompt", "`prompt` must not be empty"));
    }
    let echo = match (echo, prompt_text) {
        (false, _) => None,
        (true, Some(text)) => Some(text),
        (true, None) => Some(
            info.tokenizer
                .decode(&prompt, false)
                .map_err(|e| ApiError::Internal(format!("detokenization failed: {e}")))?,
        ),
    };
    let score_only = echo.is_some() && logprobs.is_some();
    let mut gen = generation(
        info, limits, request_id, prompt, sampling, score_only, "prompt",
    )?;
    gen.logprobs = logprobs;
    // Echoed prompts carry their tokens' log-probabilities too.
    gen.prompt_logprobs = logprobs.filter(|_| echo.is_some());
    let echo = echo.map(|text| Echo {
        text,
        skips_bos: added_bos,
    });
    Ok((gen, echo))
}

/// A missing or empty `model` means the served one.
pub fn check_model(info: &ModelInfo, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None | Some("") => Ok(()),
        Some(m) if m == info.id => Ok(()),
        Some(m) => Err(ApiError::ModelNotFound(format!(
            "model {m:?} is not served here; available: [{:?}]",
            info.id
        ))),
    }
}

/// A raw completion prompt: with the BOS token the model expects at the start (and
/// whether it was added). Special tokens written in it are parsed: in a raw prompt they
/// are the caller's intent.
fn tokenize_prompt(
    info: &ModelInfo,
    limits: Limits,
    text: &str,
) -> Result<(Vec<u32>, bool), ApiError> {
    check_prompt_bytes(info, limits, "prompt", text.len())?;
    info.tokenizer
        .encode_prompt_marked(text)
        .map_err(|e| ApiError::Internal(format!("tokenization failed: {e}")))
}

/// `stream_options`: whether the usage comes in a last chunk, and whether every chunk
/// also carries it so far (vLLM's `continuous_usage_stats`, with `include_usage` only).
fn stream_usage(
    stream: bool,
    options: Option<&crate::openai::StreamOptions>,
) -> Result<(bool, bool), ApiError> {
    let include = options.and_then(|o| o.include_usage).unwrap_or(false);
    let continuous = options
        .and_then(|o| o.continuous_usage_stats)
        .unwrap_or(false);
    if include && !stream {
        return Err(ApiError::bad(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    Ok((include, include && continuous))
}

/// A sampling field's value as sent, and as the sampler's 32-bit float holds it where
/// that differs in kind (1e-300 is 0 there, 1e39 infinite).
fn sent(raw: Option<f64>, narrowed: f32) -> String {
    let Some(raw) = raw else {
        return narrowed.to_string();
    };
    // Written short: 1e-300, not three hundred digits.
    let raw_text = match raw != 0.0 && !(1e-4..1e16).contains(&raw.abs()) {
        true => format!("{raw:e}"),
        false => raw.to_string(),
    };
    match (narrowed == 0.0 && raw != 0.0) || (narrowed.is_infinite() && raw.is_finite()) {
        true => format!("{raw_text}, which is {narrowed} as the sampler's 32-bit float"),
        false => raw_text,
    }
}

/// `score_only`: the request echoes its prompt with log-probabilities, so it may ask for
/// no new tokens at all.
fn generation(
    info: &ModelInfo,
    limits: Limits,
    request_id: String,
    prompt: Vec<u32>,
    s: &WireSampling,
    score_only: bool,
    prompt_param: &'static str,
) -> Result<GenRequest, ApiError> {
    let context = info.max_seq_tokens;
    let requested: Option<(&'static str, i64)> = match (s.max_completion_tokens, s.max_tokens) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    // A prompt scored alone leaves nothing to generate: it may fill the context, as
    // evaluation harnesses cut their windows to exactly the context.
    let scoring = score_only && matches!(requested, Some((_, 0)));
    let (bound, why) = prompt_bound(info, limits, scoring);
    if prompt.len() > bound {
        return Err(ApiError::ContextLength {
            message: format!("the prompt is {} tokens, but {why}", prompt.len()),
            param: prompt_param.into(),
        });
    }
    let room = context - prompt.len();
    let max_tokens = match requested {
        // Scoring an echoed prompt alone (`echo`, `logprobs`, `max_tokens: 0`).
        Some((_, 0)) if score_only => 0,
        Some((field, n)) if n < 1 => {
            return Err(ApiError::bad(
                field,
                format!("`{field}` must be at least 1, got {n}"),
            ))
        }
        Some((_, n)) => (n as u64).min(room as u64) as usize,
        None => room,
    };

    // Checked as the f32 the sampler uses: 1e-300 is 0 there, and 1e39 infinite.
    let temperature = s.temperature.unwrap_or(1.0) as f32;
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature",
            format!(
                "`temperature` must be in [0, 2], got {}",
                sent(s.temperature, temperature)
            ),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0) as f32;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            "top_p",
            format!("`top_p` must be in (0, 1], got {}", sent(s.top_p, top_p)),
        ));
    }
    let top_k = match s.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::bad(
                "top_k",
                format!("`top_k` must be -1 (off) or positive, got {k}"),
            ))
        }
    };
    let min_p = s.min_p.unwrap_or(0.0) as f32;
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::bad(
            "min_p",
            format!("`min_p` must be in [0, 1], got {}", sent(s.min_p, min_p)),
        ));
    }
    let n = match s.n {
        None => 1,
        Some(n) if n >= 1 && n as u64 <= limits.max_n as u64 => n as usize,
        Some(n) => {
            return Err(ApiError::bad(
                "n",
                format!("`n` must be in [1, {}] (--max-n), got {n}", limits.max_n),
            ))
        }
    };
    let penalties: [(&'static str, Option<f64>); 2] = [
        ("presence_penalty", s.presence_penalty),
        ("frequency_penalty", s.frequency_penalty),
    ];
    for (field, value) in penalties {
        if let Some(v) = value.filter(|v| !(-2.0..=2.0).contains(v)) {
            return Err(ApiError::bad(
                field,
                format!("`{field}` must be in [-2, 2], got {v}"),
            ));
        }
    }
    let repetition_penalty = s.repetition_penalty.unwrap_or(1.0) as f32;
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        return Err(ApiError::bad(
            "repetition_penalty",
            format!(
                "`repetition_penalty` must be a finite number greater than 0, got {}",
                sent(s.repetition_penalty, repetition_penalty)
            ),
        ));
    }
    let vocab = info.tokenizer.vocab_size();
    let token_id = |field: &'static str, raw: &str| -> Result<u32, ApiError> {
        match raw.parse::<u32>() {
            Ok(id) if (id as usize) < vocab => Ok(id),
            _ => Err(ApiError::bad(
                field,
                format!(
                    "`{field}`: {raw:?} is not a token id of this model's vocabulary (0..{vocab})"
                ),
            )),
        }
    };
    let mut logit_bias = Vec::new();
    for (key, value) in s.logit_bias.iter().flatten() {
        let id = token_id("logit_bias", key)?;
        match value.as_f64() {
            Some(b) if (-100.0..=100.0).contains(&b) => logit_bias.push((id, b as f32)),
            _ => {
                return Err(ApiError::bad(
                    "logit_bias",
                    format!("`logit_bias[{key:?}]` must be a number in [-100, 100], got {value}"),
                ))
            }
        }
    }
    let stop_token_ids = s
        .stop_token_ids
        .iter()
        .flatten()
        .map(|&id| match u32::try_from(id) {
            Ok(id) if (id as usize) < vocab => Ok(id),
            _ => Err(ApiError::bad(
                "stop_token_ids",
                format!("`stop_token_ids`: {id} is not a token id of this model's vocabulary (0..{vocab})"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let min_tokens = match s.min_tokens {
        None => 0,
        Some(m) if m >= 0 && m as u64 <= max_tokens as u64 => m as usize,
        Some(m) => {
            // The bound as the client knows it: its own field, or the room it was cut to.
            let bound = match requested {
                Some((field, n)) if n as u64 == max_tokens as u64 => format!("`{field}` {n}"),
                _ => format!("{max_tokens}, the context left after the prompt"),
            };
            return Err(ApiError::bad(
                "min_tokens",
                format!("`min_tokens` must be in [0, {bound}], got {m}"),
            ));
        }
    };
    let stop = match &s.stop {
        None => Vec::new(),
        Some(StopInput::One(s)) => vec![s.clone()],
        Some(StopInput::Many(v)) => v.clone(),
    };
    if stop.len() > limits.max_stop {
        return Err(ApiError::bad(
            "stop",
            format!(
                "`stop` may hold at most {} strings, got {}",
                limits.max_stop,
                stop.len()
            ),
        ));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > limits.max_stop_bytes) {
        return Err(ApiError::bad(
            "stop",
            format!(
                "each stop string may be at most {} bytes (--max-stop-bytes), got one of {}",
                limits.max_stop_bytes,
                long.len()
            ),
        ));
    }
    Ok(GenRequest {
        request_id,
        prompt,
        params: SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            // Negative seeds are valid in OpenAI's API; their bits are the seed.
            seed: s.seed.map(|x| x as u64),
            presence_penalty: s.presence_penalty.unwrap_or(0.0) as f32,
            frequency_penalty: s.frequency_penalty.unwrap_or(0.0) as f32,
            repetition_penalty,
            logit_bias,
        },
        max_tokens,
        stop,
        include_stop: s.include_stop_str_in_output.unwrap_or(false),
        ignore_eos: s.ignore_eos.unwrap_or(false),
        n,
        logprobs: None,
        min_tokens,
        stop_token_ids,
        prompt_logprobs: None,
        constraint: None,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn messages(v: Value) -> Vec<ChatMessage> {
        chat_messages(serde_json::from_value(v).expect("wire messages")).expect("valid")
    }

    /// A participant's `name` reaches the template on every role (it was dropped but on
    /// tool turns), and an assistant's refusal beside `content: null` (the shape the API
    /// returns) is what that turn said (it rendered empty).
    #[test]
    fn names_and_refusals_reach_the_template() {
        let m = messages(json!([
            {"role": "system", "content": "s", "name": "ops"},
            {"role": "user", "content": "hi", "name": "alice"},
            {"role": "assistant", "content": null, "refusal": "I can't"},
            {"role": "user", "content": "why", "name": ""},
            {"role": "assistant", "content": "", "refusal": "Still no."},
            {"role": "user", "content": "ok"},
            {"role": "assistant", "content": "Fine.", "refusal": "ignored"},
        ]));
        assert_eq!(m[0].name.as_deref(), Some("ops"));
        assert_eq!(m[1].name.as_deref(), Some("alice"));
        assert_eq!(m[2].content, "I can't");
        assert_eq!(m[3].name, None);
        assert_eq!(m[4].content, "Still no.");
        assert_eq!(m[6].content, "Fine.");
    }
}
