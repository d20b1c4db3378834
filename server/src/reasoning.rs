//! A thinking model's reasoning, told apart from its answer. Models such as Qwen3,
//! QwQ and DeepSeek-R1 write `<think>…</think>` before they answer; their chat templates
//! say so (they write or strip such blocks), and that is how a model is known to think
//! (`--reasoning-format auto`). Its reasoning is then returned beside the answer
//! (`reasoning_content` in chat, a `reasoning` item in Responses), never inside it, and a
//! constraint (structured output, function calls) holds the answer after the block, not
//! the reasoning.
//!
//! Where the block starts is read from the prompt: a template that ends its generation
//! prompt with `<think>` (DeepSeek-R1, Qwen3's thinking-only models), or a continued
//! message with a block still open, starts the answer inside it ([`Start::Thinking`]);
//! otherwise the answer may open one as its first text ([`Start::Free`]).

/// The tags around a thinking block.
pub const OPEN: &str = "<think>";
pub const CLOSE: &str = "</think>";

/// Whether a chat template is a thinking model's: it writes its blocks' tags.
pub fn detect(template_source: &str) -> bool {
    template_source.contains(OPEN) && template_source.contains(CLOSE)
}

/// Why a request's reasoning effort (chat's `reasoning_effort`, Responses' `reasoning`)
/// is refused: a model that does not think has none but "none"; a thinking model's
/// thinking is its template's to turn off, not a level to set.
pub fn effort_refused(thinking: bool) -> &'static str {
    match thinking {
        false => "no reasoning effort is set here (only \"none\" is accepted)",
        true => "this model's thinking is not set by an effort: its chat template decides (Qwen3's is turned off by `chat_template_kwargs: {\"enable_thinking\": false}`)",
    }
}

/// Where the answer starts relative to a thinking block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The answer may open a block as its first text (after whitespace), or not think.
    Free,
    /// The prompt opened a block: the answer starts inside it.
    Thinking,
    /// The answer has begun (a continued message with text after its block, or none):
    /// no block follows.
    Answer,
}

impl Start {
    /// After a rendered prompt that ends with a generation prompt: inside a block when
    /// the template ended it with `<think>` (and blank space).
    pub fn of_prompt(rendered: &str) -> Start {
        match rendered.trim_end().ends_with(OPEN) {
            true => Start::Thinking,
            false => Start::Free,
        }
    }

    /// After a continued message's `text`: inside a block when its last `<think>` comes
    /// after its last `</think>`; else the answer has begun where it holds more than
    /// blank space after its block.
    pub fn after(text: &str) -> Start {
        match (text.rfind(OPEN), text.rfind(CLOSE)) {
            (Some(open), Some(close)) if open > close => Start::Thinking,
            (Some(_), None) => Start::Thinking,
            (_, Some(close)) if text[close + CLOSE.len()..].trim().is_empty() => Start::Free,
            _ if text.trim().is_empty() => Start::Free,
            _ => Start::Answer,
        }
    }

    /// The rules (llguidance's Lark) that put an optional thinking block (or the rest of
    /// the open one) before `answer`, the rule of the constrained answer that `rules`
    /// define. The reasoning inside is free text: only what follows is held.
    ///
    /// The block may follow blank space, in its tag's lexeme: free text may start with
    /// blank space too, and llguidance's lexer takes the longest match without going
    /// back, so a separate lexeme of blank space would never end where the tag begins.
    /// A text answer must neither open a block nor start with blank space (which the
    /// block's `NL` takes): `CallFormat::rules` with `thinks`.
    pub fn grammar(self, rules: &str) -> String {
        let close = serde_json::to_string(CLOSE).unwrap_or_default();
        let start = match self {
            Start::Free => "start: (think NL?)? answer\nthink: THINK thought\nTHINK: /[ \\t\\r\\n]{0,8}<think>/\n",
            Start::Thinking => "start: thought NL? answer\n",
            Start::Answer => return format!("start: answer\n{rules}"),
        };
        format!("{start}thought[suffix={close}]: /(?s:.*)/\nNL: /\\n+/\n{rules}")
    }
}

/// One piece of an answer, split.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parts {
    pub reasoning: String,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the answer's start, which may open a block.
    Opening,
    /// Inside a block; `begun` once its first non-blank text was seen (the blank lines
    /// after the tag are not reasoning).
    Thinking { begun: bool },
    /// After a block (its leading blank lines dropped once `begun`), or an answer that
    /// did not think (`begun` from the start: its text is kept as written).
    Answer { begun: bool },
}

/// Splits an answer's text, as it streams, into reasoning and content. Text that may
/// be the start of a tag (or blank space that may end the reasoning) is held until the
/// next piece says which it is, so a tag split across tokens is never sent.
///
/// It also counts the block's tokens (`usage`'s `reasoning_tokens`) from the tokens of
/// each piece: those of pieces inside the block, and of the pieces that open and close it.
#[derive(Debug, Clone)]
pub struct Splitter {
    state: State,
    held: String,
    /// A block was opened by the answer's first text.
    opened: bool,
    /// Tokens pushed while the answer's start was undecided: the block's if it opens one.
    undecided_tokens: usize,
    reasoning_tokens: usize,
}

impl Splitter {
    pub fn new(start: Start) -> Self {
        let state = match start {
            Start::Free => State::Opening,
            Start::Thinking => State::Thinking { begun: false },
            Start::Answer => State::Answer { begun: true },
        };
        Self {
            state,
            held: String::new(),
            opened: false,
            undecided_tokens: 0,
            reasoning_tokens: 0,
        }
    }

    /// A whole answer, split.
    pub fn split(start: Start, text: &str) -> Parts {
        Self::split_counted(start, text, &[(text.len(), 0)], 0).0
    }

    /// A whole answer of `tokens` tokens, received as `pieces` (where each piece of
    /// `text` ends, and its tokens), split; with how many of the tokens were reasoning.
    pub fn split_counted(
        start: Start,
        text: &str,
        pieces: &[(usize, usize)],
        tokens: usize,
    ) -> (Parts, usize) {
        let mut s = Self::new(start);
        let mut parts = Parts::default();
        let mut from = 0;
        for &(end, n) in pieces {
            let piece = s.push_counted(text.get(from..end).unwrap_or_default(), n);
            parts.reasoning.push_str(&piece.reasoning);
            parts.content.push_str(&piece.content);
            from = end;
        }
        let rest = s.push(text.get(from..).unwrap_or_default());
        let end = s.finish();
        for p in [rest, end] {
            parts.reasoning.push_str(&p.reasoning);
            parts.content.push_str(&p.content);
        }
        (parts, s.reasoning_tokens(tokens))
    }

    /// The next piece of the answer, and how many tokens it is.
    pub fn push_counted(&mut self, text: &str, tokens: usize) -> Parts {
        let before = self.state;
        let parts = self.push(text);
        match before {
            State::Opening => {
                self.undecided_tokens += tokens;
                if self.opened {
                    self.reasoning_tokens += std::mem::take(&mut self.undecided_tokens);
                } else if self.state != State::Opening {
                    self.undecided_tokens = 0;
                }
            }
            State::Thinking { .. } => self.reasoning_tokens += tokens,
            State::Answer { .. } => {}
        }
        parts
    }

    /// How many of an answer's `tokens` were reasoning: all of them while its block is
    /// still open (tokens whose text was never pushed, cut by the end, included).
    pub fn reasoning_tokens(&self, tokens: usize) -> usize {
        match self.state {
            State::Thinking { .. } => tokens,
            _ => self.reasoning_tokens.min(tokens),
        }
    }

    /// The next piece of the answer; returns what is known of each part.
    pub fn push(&mut self, text: &str) -> Parts {
        let mut out = Parts::default();
        if let State::Answer { begun: true } = self.state {
            out.content.push_str(text);
            return out;
        }
        self.held.push_str(text);
        loop {
            match self.state {
                State::Opening => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.held = rest.to_string();
                        self.opened = true;
                        self.state = State::Thinking { begun: false };
                    } else if OPEN.starts_with(trimmed) {
                        return out;
                    } else {
                        self.state = State::Answer { begun: true };
                        out.content.push_str(&std::mem::take(&mut self.held));
                        return out;
                    }
                }
                State::Thinking { begun } => {
                    if !begun {
                        let trimmed = self.held.trim_start();
                        if trimmed.is_empty() {
                            self.held.clear();
                            return out;
                        }
                        self.held = trimmed.to_string();
                        self.state = State::Thinking { begun: true };
                    }
                    if let Some(at) = self.held.find(CLOSE) {
                        out.reasoning.push_str(self.held[..at].trim_end());
                        self.held = self.held[at + CLOSE.len()..].to_string();
                        self.state = State::Answer { begun: false };
                        continue;
                    }
                    let cut = releasable(&self.held);
                    out.reasoning.push_str(&self.held[..cut]);
                    self.held.drain(..cut);
                    return out;
                }
                State::Answer { begun: false } => {
                    let trimmed = self.held.trim_start();
                    if !trimmed.is_empty() {
                        out.content.push_str(trimmed);
                        self.state = State::Answer { begun: true };
                    }
                    self.held.clear();
                    return out;
                }
                State::Answer { begun: true } => {
                    out.content.push_str(&std::mem::take(&mut self.held));
                    return out;
                }
            }
        }
    }

    /// The answer ended: what was held is released (an unfinished tag as the text it
    /// is; a block left open stays reasoning, without its trailing blank space).
    pub fn finish(&mut self) -> Parts {
        let held = std::mem::take(&mut self.held);
        let mut out = Parts::default();
        match self.state {
            State::Opening => out.content = held,
            State::Thinking { .. } => out.reasoning = held.trim_end().to_string(),
            State::Answer { .. } => {}
        }
        out
    }
}

/// How much of `held` (reasoning with no closing tag in it) can be sent: all but a
/// trailing start of the tag and the blank space before it.
fn releasable(held: &str) -> usize {
    let tag_start = held
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| held.len() - i < CLOSE.len() && CLOSE.starts_with(&held[i..]))
        .unwrap_or(held.len());
    held[..tag_start].trim_end().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every way of cutting `text` in two, and one piece per character, give `split`'s
    /// parts.
    fn streamed_as_whole(start: Start, text: &str) -> Parts {
        let whole = Splitter::split(start, text);
        let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        for &cut in &bounds {
            let mut s = Splitter::new(start);
            let mut got = s.push(&text[..cut]);
            for p in [s.push(&text[cut..]), s.finish()] {
                got.reasoning.push_str(&p.reasoning);
                got.content.push_str(&p.content);
            }
            assert_eq!(got, whole, "cut at {cut} of {text:?}");
        }
        let mut s = Splitter::new(start);
        let mut got = Parts::default();
        for c in text.chars() {
            let p = s.push(&c.to_string());
            got.reasoning.push_str(&p.reasoning);
            got.content.push_str(&p.content);
        }
        let p = s.finish();
        got.reasoning.push_str(&p.reasoning);
        got.content.push_str(&p.content);
        assert_eq!(got, whole, "char by char: {text:?}");
        whole
    }

    fn parts(reasoning: &str, content: &str) -> Parts {
        Parts {
            reasoning: reasoning.into(),
            content: content.into(),
        }
    }

    #[test]
    fn a_block_at_the_start_is_reasoning_and_the_rest_the_answer() {
        let got = streamed_as_whole(
            Start::Free,
            "<think>\nThe user greets me.\n</think>\n\nHello!",
        );
        assert_eq!(got, parts("The user greets me.", "Hello!"));
    }

    #[test]
    fn an_answer_that_does_not_open_a_block_is_kept_as_written() {
        for text in [
            "  Hello <think>x</think>",
            "\n\n",
            "<thi",
            "<b>bold</b>",
            "",
        ] {
            assert_eq!(streamed_as_whole(Start::Free, text), parts("", text));
        }
    }

    #[test]
    fn a_prompt_that_opened_the_block_makes_the_answer_start_inside_it() {
        let got = streamed_as_whole(Start::Thinking, "Two and two.\n</think>\n\n4");
        assert_eq!(got, parts("Two and two.", "4"));
        // Cut short: all reasoning, a partial tag included as the text it is.
        let got = streamed_as_whole(Start::Thinking, "Still thinking </thi");
        assert_eq!(got, parts("Still thinking </thi", ""));
    }

    #[test]
    fn only_the_first_closing_tag_ends_the_block() {
        let got = streamed_as_whole(Start::Free, "<think>a < b </ c</think>x </think> y");
        assert_eq!(got, parts("a < b </ c", "x </think> y"));
    }

    #[test]
    fn blank_space_is_held_until_known_to_be_inside_the_reasoning() {
        let mut s = Splitter::new(Start::Thinking);
        assert_eq!(s.push("one \n"), parts("one", ""));
        assert_eq!(s.push(" two"), parts(" \n two", ""));
        assert_eq!(s.push("</"), parts("", ""));
        assert_eq!(s.push("think>é"), parts("", "é"));
        assert_eq!(s.finish(), parts("", ""));
    }

    #[test]
    fn the_start_is_read_from_the_text_the_answer_follows() {
        assert_eq!(
            Start::of_prompt("<|im_start|>assistant\n<think>\n"),
            Start::Thinking
        );
        // A user's unclosed tag earlier in the prompt is not the template's.
        assert_eq!(
            Start::of_prompt("<think>\n<|im_start|>assistant\n"),
            Start::Free
        );
        assert_eq!(
            Start::of_prompt("assistant\n<think>\n\n</think>\n\n"),
            Start::Free
        );
        assert_eq!(Start::after("<think>a</think>b<think>c"), Start::Thinking);
        assert_eq!(Start::after("<think>a</think>\n\n"), Start::Free);
        // An answer begun after its block, or without one, opens none.
        assert_eq!(Start::after("<think>a</think>\n\nDo"), Start::Answer);
        assert_eq!(Start::after("Sure"), Start::Answer);
        assert_eq!(
            Splitter::split(Start::Answer, "<think>x</think>y"),
            parts("", "<think>x</think>y")
        );
    }

    #[test]
    fn templates_that_write_both_tags_think() {
        assert!(detect(
            "{{ '<think>\\n' }}{{ content.split('</think>')[-1] }}"
        ));
        assert!(!detect("{{ '<|im_start|>assistant\\n' }}"));
    }

    /// Pieces of one token each, streamed: the block's tokens are counted, the tags'
    /// included, the answer's not; split whole from the same pieces counts the same.
    #[test]
    fn reasoning_tokens_are_the_blocks() {
        let cases: [(Start, &[&str], usize); 5] = [
            (
                Start::Free,
                &[
                    "<", "think", ">\n", "abc", "\n</", "think>", "\n\n", "Done.",
                ],
                6,
            ),
            (Start::Free, &["<think>ab</think>Done", "."], 1),
            (Start::Free, &["Hello", " <", "think>"], 0),
            (Start::Thinking, &["abc", "</think>", "\n", "x"], 2),
            (Start::Answer, &["<think>", "a", "</think>"], 0),
        ];
        for (start, pieces, want) in cases {
            let mut s = Splitter::new(start);
            for p in pieces {
                s.push_counted(p, 1);
            }
            s.finish();
            assert_eq!(s.reasoning_tokens(pieces.len()), want, "{pieces:?}");
            let text = pieces.concat();
            let ends: Vec<(usize, usize)> = (pieces.iter())
                .scan(0, |end, p| {
                    *end += p.len();
                    Some((*end, 1))
                })
                .collect();
            let (parts, n) = Splitter::split_counted(start, &text, &ends, pieces.len());
            assert_eq!(parts, Splitter::split(start, &text), "{pieces:?}");
            assert_eq!(n, want, "{pieces:?}");
        }
        // A block still open at the end: every token was reasoning, those of text
        // never pushed (cut by the end) too.
        let mut s = Splitter::new(Start::Free);
        s.push_counted("<think>", 2);
        s.push_counted("ab", 1);
        assert_eq!(s.reasoning_tokens(5), 5);
    }
}
