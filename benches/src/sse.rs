//! A server-sent-events parser that takes the body in whatever pieces the network hands
//! over (a piece may end mid-line, mid-`\r\n`, mid-UTF-8 character) and yields each
//! complete event's data.

/// Incremental SSE decoder: feed bytes, get the `data` of every event they complete.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the line not yet terminated.
    line: Vec<u8>,
    /// `data:` lines of the event being read, joined with `\n` per the SSE spec.
    data: Option<String>,
    /// The previous piece ended in `\r`, so a leading `\n` belongs to that line end.
    after_cr: bool,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes `bytes`; returns the data of each event they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut events = Vec::new();
        for &b in bytes {
            let after_cr = std::mem::take(&mut self.after_cr);
            match b {
                b'\n' if after_cr => {}
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.end_line(&line) {
                        events.push(event);
                    }
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    /// Handles one complete line; a blank line dispatches the event read so far.
    fn end_line(&mut self, line: &[u8]) -> Option<String> {
        if line.is_empty() {
            return self.data.take();
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
        // `event:`, `id:`, `retry:` and comments carry nothing a completion client needs.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "data: {\"a\":\"h\u{e9}llo \u{1f600}\"}\n\n: keep-alive\n\ndata: {\"b\":2}\r\n\r\nevent: x\ndata: one\ndata: two\n\ndata: [DONE]\n\n";
    const EVENTS: [&str; 4] = [
        "{\"a\":\"h\u{e9}llo \u{1f600}\"}",
        "{\"b\":2}",
        "one\ntwo",
        "[DONE]",
    ];

    #[test]
    fn whole_body_in_one_piece() {
        assert_eq!(SseParser::new().push(BODY.as_bytes()), EVENTS);
    }

    #[test]
    fn split_at_every_byte_gives_the_same_events() {
        let bytes = BODY.as_bytes();
        for cut in 0..=bytes.len() {
            let mut p = SseParser::new();
            let mut events = p.push(&bytes[..cut]);
            events.extend(p.push(&bytes[cut..]));
            assert_eq!(events, EVENTS, "split at byte {cut}");
        }
    }

    #[test]
    fn byte_by_byte() {
        let mut p = SseParser::new();
        let events: Vec<String> = BODY.bytes().flat_map(|b| p.push(&[b])).collect();
        assert_eq!(events, EVENTS);
    }

    #[test]
    fn unterminated_event_is_not_emitted() {
        assert!(SseParser::new().push(b"data: {\"partial\":").is_empty());
        assert!(SseParser::new().push(b"data: x\n").is_empty());
    }
}
