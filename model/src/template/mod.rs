//! The chat template: the model's own `tokenizer.chat_template` (a Jinja template),
//! rendered with minijinja plus its Python-compatibility methods (`.strip()`, `.items()`…)
//! and what transformers adds to Jinja ([`python`]), the way Hugging Face's
//! `apply_chat_template` renders it.

mod python;

pub use python::civil_from_days;

use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

use crate::error::{ModelError, Result};

use crate::config::Arch;

const TEMPLATE_NAME: &str = "chat";

/// ChatML, for models that ship no template (most chat models use it).
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Gemma's turn format: roles `user` and `model`, system text folded into the next user
/// turn, or a user turn of its own where a model turn (or none) follows it: never words
/// the model is shown to have said.
const GEMMA: &str = "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\\n\\n' %}{% else %}{% if ns.system and m['role'] != 'user' %}{{ '<start_of_turn>user\\n' + ns.system | trim + '<end_of_turn>\\n' }}{% set ns.system = '' %}{% endif %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + ns.system + (m['content'] | trim) + '<end_of_turn>\\n' }}{% set ns.system = '' %}{% endif %}{% endfor %}{% if ns.system %}{{ '<start_of_turn>user\\n' + ns.system | trim + '<end_of_turn>\\n' }}{% endif %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}";

/// The template to use when a model file carries none.
pub fn fallback_template(arch: Arch) -> &'static str {
    match arch {
        Arch::Gemma3 => GEMMA,
        _ => CHATML,
    }
}

/// One message as the template sees it (the fields Hugging Face chat templates read).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's function calls in OpenAI's shape
    /// (`[{id, type, function: {name, arguments}}]`, `arguments` an object).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A tool turn: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool turn: the function's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's reasoning, apart from its `content` (thinking models'
    /// templates, such as Qwen3's, render it in a `<think>` block where they keep one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template's own text (which tool-call format it speaks is read from it).
    source: String,
}

impl ChatTemplate {
    /// Compiles `source`; a template that does not parse is an error here, at load time.
    pub fn new(source: String, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        // The settings of transformers' chat-template environment.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_filter("tojson", python::tojson);
        env.add_function("strftime_now", python::strftime_now);
        env.set_formatter(python::format);
        // A template runs on every request: one that loops for ever must end, as an error.
        env.set_fuel(Some(RENDER_FUEL));
        env.add_template_owned(TEMPLATE_NAME, python::generation_blocks(&source))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            source,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template renders a `tools` list itself (as `apply_chat_template`
    /// passes it).
    pub fn knows_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, add_generation_prompt, None)
    }

    /// As [`Self::render`], with the functions the model may call (OpenAI's
    /// `[{type: "function", function: {name, description, parameters}}]`) in the
    /// template's `tools` variable, as `apply_chat_template(tools=...)` passes them.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        self.render_with(messages, add_generation_prompt, tools, None)
    }

    /// As [`Self::render_with_tools`], with `extra` variables (an object: vLLM's
    /// `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`) beside the template's own,
    /// which take precedence.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
        extra: Option<&serde_json::Value>,
    ) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME)?;
        let none = serde_json::Value::Object(serde_json::Map::new());
        let mut out = Bounded(Vec::new());
        let rendered = template.render_captured_to(
            context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
                ..minijinja::Value::from_serialize(extra.unwrap_or(&none))
            },
            &mut out,
        );
        match rendered {
            Ok(_) => String::from_utf8(out.0)
                .map_err(|_| ModelError::Template("the template wrote invalid UTF-8".into())),
            Err(_) if out.0.len() >= MAX_RENDERED_BYTES => Err(ModelError::Template(format!(
                "the template rendered more than {} MiB",
                MAX_RENDERED_BYTES >> 20
            ))),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(ModelError::Template(format!(
                "the template did not finish within {RENDER_FUEL} steps"
            ))),
            Err(e) => Err(e.into()),
        }
    }
}

/// Template instructions one render may run: far above what a conversation as large as
/// a request body may be takes (about 30 a message), far below a loop that never ends.
const RENDER_FUEL: u64 = 50_000_000;

/// Most bytes one render may write: far beyond any context, short of what would
/// exhaust the memory.
const MAX_RENDERED_BYTES: usize = 64 << 20;

/// A writer that refuses to grow past [`MAX_RENDERED_BYTES`], which ends the render.
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            self.0.resize(MAX_RENDERED_BYTES, 0);
            return Err(std::io::Error::other("the rendered prompt is too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod bounds {
    use super::*;

    /// A template that would loop for ever, or write gigabytes, ends as an error.
    #[test]
    fn a_render_is_bounded_in_steps_and_bytes() {
        let hi = [ChatMessage::new("user", "hi")];
        for source in [
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "{% for a in range(100000) %}{% for b in range(1000) %}{{ 'x' * 1000 }}\
             {% endfor %}{% endfor %}",
        ] {
            let t = ChatTemplate::new(source.into(), "", "").expect("compiles");
            let e = t.render(&hi, true).expect_err("bounded");
            assert!(matches!(e, ModelError::Template(_)), "{e}");
        }
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.content }}{% endfor %}".into(),
            "",
            "",
        )
        .expect("compiles");
        let many = vec![ChatMessage::new("user", "x"); 200_000];
        assert_eq!(
            t.render(&many, false).expect("within the fuel").len(),
            200_000
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A template in transformers' dialect loads and renders: a `{% generation %}` block
    /// (it stopped the server from starting), `strftime_now` (an unknown function) and
    /// `tojson`'s `json.dumps` arguments (unknown keyword arguments).
    #[test]
    fn transformers_additions_render() {
        let source = "{{ strftime_now('%Y') }}{% for m in messages %}{% if m.role == 'assistant' %}\
                      {% generation %}{{ m.content }}{% endgeneration %}{% else %}\
                      {{ m | tojson(ensure_ascii=False, separators=(',', ':')) }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(source.into(), "", "").expect("loads");
        let year = python::strftime_now("%Y".into()).expect("year");
        let rendered = t
            .render(
                &[
                    ChatMessage::new("user", "é"),
                    ChatMessage::new("assistant", "ok"),
                ],
                false,
            )
            .expect("renders");
        assert_eq!(
            rendered,
            format!("{year}{{\"role\":\"user\",\"content\":\"é\"}}ok")
        );
    }

    /// Gemma's turns have no system role: system text opens the next user turn, and
    /// system text with no user turn next is a user turn of its own (with no turn after
    /// it, it was dropped; before a model turn, it was shown as the model's words).
    #[test]
    fn gemma_keeps_system_text_wherever_it_is() {
        let t = ChatTemplate::new(GEMMA.into(), "<bos>", "<eos>").expect("template");
        let rendered = t
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi"),
                    ChatMessage::new("system", "Answer in French."),
                ],
                true,
            )
            .expect("render");
        assert_eq!(
            rendered,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
             <start_of_turn>user\nAnswer in French.<end_of_turn>\n<start_of_turn>model\n"
        );
        let rendered = t
            .render(
                &[
                    ChatMessage::new("user", "Hi"),
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("assistant", "Hello"),
                    ChatMessage::new("user", "Bye"),
                ],
                true,
            )
            .expect("render");
        assert_eq!(
            rendered,
            "<bos><start_of_turn>user\nHi<end_of_turn>\n\
             <start_of_turn>user\nBe brief.<end_of_turn>\n\
             <start_of_turn>model\nHello<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    fn render(source: &str, tools: serde_json::Value) -> String {
        let t = ChatTemplate::new(source.into(), "", "").expect("template");
        t.render_with_tools(&[ChatMessage::new("user", "hi")], false, Some(&tools))
            .expect("render")
    }

    /// As transformers' `tojson`: Python's separators, keys in order, no HTML escapes.
    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let tools = serde_json::json!([{"name": "f<b>", "b": [1, 2.5, true, null], "a": {}}]);
        assert_eq!(
            render("{{ tools[0] | tojson }}", tools.clone()),
            r#"{"name": "f<b>", "b": [1, 2.5, true, null], "a": {}}"#
        );
        assert_eq!(
            render("{{ tools[0] | tojson(indent=2) }}", tools),
            "{\n  \"name\": \"f<b>\",\n  \"b\": [\n    1,\n    2.5,\n    true,\n    null\n  ],\n  \"a\": {}\n}"
        );
    }
}
