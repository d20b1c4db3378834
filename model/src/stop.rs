//! Stop strings matched on decoded text, across token boundaries, in time linear in the
//! text: each stop string keeps the length of its longest prefix that the text ends with
//! (a Knuth–Morris–Pratt automaton), so every byte is looked at once per stop string
//! however long the strings are.
//!
//! Text that could still become the start of a stop string is held back until it either
//! completes a stop string (then it is dropped, with everything after it) or cannot any more
//! (then it is released). The stop string itself is never returned.

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<Pattern>,
    /// Text received but not yet released: the longest suffix of the text that is a
    /// proper prefix of some stop string.
    pending: String,
    /// The stop string found ends the text released, rather than being dropped (vLLM's
    /// `include_stop_str_in_output`).
    include: bool,
}

/// One stop string and its matching state.
#[derive(Debug, Clone)]
struct Pattern {
    bytes: Vec<u8>,
    /// `fail[i]`: length of the longest proper prefix of `bytes[..=i]` that is also its
    /// suffix.
    fail: Vec<usize>,
    /// Bytes of this string matched by the end of the text so far.
    matched: usize,
}

impl Pattern {
    fn new(stop: String) -> Self {
        let bytes = stop.into_bytes();
        let mut fail = vec![0; bytes.len()];
        let mut k = 0;
        for i in 1..bytes.len() {
            while k > 0 && bytes[i] != bytes[k] {
                k = fail[k - 1];
            }
            if bytes[i] == bytes[k] {
                k += 1;
            }
            fail[i] = k;
        }
        Self {
            bytes,
            fail,
            matched: 0,
        }
    }

    /// Takes one byte of text; true when the whole string has just been matched.
    fn feed(&mut self, b: u8) -> bool {
        let mut k = self.matched;
        while k > 0 && self.bytes[k] != b {
            k = self.fail[k - 1];
        }
        if self.bytes[k] == b {
            k += 1;
        }
        if k == self.bytes.len() {
            // Matched; what stays matched for an overlapping next occurrence.
            self.matched = self.fail[k - 1];
            return true;
        }
        self.matched = k;
        false
    }
}

/// What one push released.
#[derive(Debug, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text safe to send to the client.
    pub text: String,
    /// A stop string was found: generation must end.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(Pattern::new)
            .collect();
        Self {
            stops,
            pending: String::new(),
            include: false,
        }
    }

    /// The same, releasing the stop string found as the end of the text when `include`.
    pub fn including(self, include: bool) -> Self {
        Self { include, ..self }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.take(text, true)
    }

    /// Takes text that stop strings may not end yet (up to `min_tokens`): a stop string
    /// wholly inside it is released as text, but one it begins is held, and ends the
    /// answer where it began if later text completes it (as vLLM matches a stop string
    /// reaching back across that boundary).
    pub fn observe(&mut self, text: &str) -> String {
        self.take(text, false).text
    }

    fn take(&mut self, text: &str, may_stop: bool) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome {
                text: text.to_string(),
                stopped: false,
            };
        }
        let held = self.pending.len();
        for (i, &b) in text.as_bytes().iter().enumerate() {
            // The first stop string to complete ends the text; of those completing on
            // the same byte, the one that started earliest wins. Held text is always
            // the longest matched prefix, so a stop string starts inside `pending`.
            let end = held + i + 1;
            let start = self
                .stops
                .iter_mut()
                .filter_map(|p| p.feed(b).then(|| end.saturating_sub(p.bytes.len())))
                .min();
            if let (Some(start), true) = (start, may_stop) {
                self.pending.push_str(&text[..i + 1]);
                let cut = if self.include { end } else { start };
                let text = self.pending[..cut].to_string();
                self.pending.clear();
                for p in &mut self.stops {
                    p.matched = 0;
                }
                return StopOutcome {
                    text,
                    stopped: true,
                };
            }
        }
        self.pending.push_str(text);
        // Hold the longest suffix that may still grow into a stop string. A stop string
        // starts on a character boundary, so its matched prefix does too.
        let keep = self.stops.iter().map(|p| p.matched).max().unwrap_or(0);
        let split = self.pending.len() - keep.min(self.pending.len());
        let released = self.pending[..split].to_string();
        self.pending.drain(..split);
        StopOutcome {
            text: released,
            stopped: false,
        }
    }

    /// Releases what is still held back (generation ended for another reason).
    pub fn flush(&mut self) -> String {
        for p in &mut self.stops {
            p.matched = 0;
        }
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text before `min_tokens` cannot stop the answer, yet a stop string it begins is
    /// held, and ends the answer where it began once later text completes it; one
    /// wholly inside it is text.
    #[test]
    fn a_stop_string_may_begin_in_observed_text() {
        let mut m = StopMatcher::new(vec![" 5,".into()]);
        assert_eq!(m.observe(" 4,"), " 4,");
        assert_eq!(m.observe(" "), "");
        assert_eq!(
            m.push("5,"),
            StopOutcome {
                text: String::new(),
                stopped: true
            }
        );
        let mut m = StopMatcher::new(vec![".\n\nThe".into()]);
        assert_eq!(m.observe(" Paris"), " Paris");
        assert_eq!(m.observe("."), "");
        assert_eq!(
            m.push("\n\nThe"),
            StopOutcome {
                text: String::new(),
                stopped: true
            }
        );
        let mut m = StopMatcher::new(vec!["ab".into()]);
        assert_eq!(m.observe("xab"), "xab");
        assert_eq!(
            m.push("cd"),
            StopOutcome {
                text: "cd".into(),
                stopped: false
            }
        );
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.observe("aST"), "a");
        assert_eq!(m.push("ay").text, "STay");
    }

    /// With `include_stop_str_in_output`, the text ends with the stop string found, and
    /// nothing after it.
    #[test]
    fn an_included_stop_string_ends_the_text() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]).including(true);
        assert_eq!(m.push("one\n").text, "one");
        assert_eq!(
            m.push("\ntwo"),
            StopOutcome {
                text: "\n\n".into(),
                stopped: true
            }
        );
        let mut m = StopMatcher::new(vec!["END".into()]).including(true);
        assert_eq!(m.observe("xEN"), "x");
        assert_eq!(
            m.push("Dyz"),
            StopOutcome {
                text: "END".into(),
                stopped: true
            }
        );
    }

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let o = m.push(p);
            out.push_str(&o.text);
            if o.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn no_stops_passes_everything() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn stop_inside_one_piece() {
        assert_eq!(run(&["END"], &["abcENDxyz"]), ("abc".into(), true));
    }

    #[test]
    fn stop_split_across_pieces() {
        assert_eq!(run(&["\n\n"], &["one\n", "\ntwo"]), ("one".into(), true));
        assert_eq!(run(&["STOP"], &["xS", "T", "O", "Py"]), ("x".into(), true));
    }

    #[test]
    fn held_text_is_released_when_it_cannot_match() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abST").text, "ab");
        assert_eq!(m.push("ay").text, "STay");
    }

    #[test]
    fn flush_releases_held_prefix() {
        assert_eq!(run(&["STOP"], &["ab", "ST"]), ("abST".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["c", "b"], &["abc"]), ("a".into(), true));
    }

    #[test]
    fn multibyte_text_near_stop() {
        assert_eq!(run(&["é!"], &["café", "!", "x"]), ("caf".into(), true));
        assert_eq!(
            run(&["日本"], &["こんにちは日", "本"]),
            ("こんにちは".into(), true)
        );
    }

    #[test]
    fn overlapping_prefixes_are_followed() {
        // KMP must fall back inside the string, not restart: "aab" in "aaab".
        assert_eq!(
            run(&["aab"], &["a", "a", "a", "b", "z"]),
            ("a".into(), true)
        );
        assert_eq!(run(&["abab"], &["ababab"]), ("".into(), true));
        assert_eq!(run(&["abac"], &["ababac"]), ("ab".into(), true));
    }

    #[test]
    fn earliest_start_wins_among_strings_completing_together() {
        assert_eq!(run(&["bc", "abc"], &["xabc"]), ("x".into(), true));
    }

    /// A long stop string costs time linear in the text: a megabyte of text that keeps
    /// almost matching a megabyte-long stop string is processed in one pass (the old
    /// matcher re-searched every held suffix per token: quadratic).
    #[test]
    fn a_long_stop_string_holds_only_what_may_still_match() {
        let stop = format!("{}!", "a".repeat(1 << 20));
        let mut m = StopMatcher::new(vec![stop]);
        let mut released = 0;
        for _ in 0..(1 << 12) {
            released += m.push(&"a".repeat(256)).text.len();
        }
        // Every `a` may still be the start of the stop string except the overflow.
        assert_eq!(released, 0);
        assert_eq!(m.pending.len(), 1 << 20);
        let out = m.push("ab");
        assert_eq!(out.text.len(), (1 << 20) + 2);
        assert!(!out.stopped);
        assert!(m.pending.is_empty());
    }

    /// The matcher agrees with a plain search of the whole text on random inputs, the
    /// first pieces observed (up to `min_tokens`): a stop string ending in them does not
    /// count.
    #[test]
    fn agrees_with_searching_the_whole_text() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..4000 {
            let letter = |n: u64| ["a", "b", "é"][(n % 3) as usize];
            let stops: Vec<String> = (0..1 + next() % 3)
                .map(|_| (0..1 + next() % 4).map(|_| letter(next())).collect())
                .collect();
            let pieces: Vec<String> = (0..next() % 8)
                .map(|_| (0..next() % 4).map(|_| letter(next())).collect())
                .collect();
            let observed = (next() % 3) as usize % (pieces.len() + 1);
            let whole: String = pieces.concat();
            let protected: usize = pieces[..observed].iter().map(String::len).sum();
            // The first stop string to end past the observed text wins; of those ending
            // together, the earliest to start.
            let ends = |s: &String| {
                (protected + 1..=whole.len())
                    .find(|&end| whole.is_char_boundary(end) && whole[..end].ends_with(s.as_str()))
            };
            let end = stops.iter().filter_map(ends).min();
            let expected = match end {
                Some(end) => {
                    let start = stops
                        .iter()
                        .filter(|s| whole[..end].ends_with(s.as_str()))
                        .map(|s| end - s.len())
                        .min()
                        .unwrap_or(end);
                    (whole[..start].to_string(), true)
                }
                None => (whole.clone(), false),
            };
            let mut m = StopMatcher::new(stops.clone());
            let mut out = String::new();
            let mut stopped = false;
            for (i, p) in pieces.iter().enumerate() {
                if i < observed {
                    out.push_str(&m.observe(p));
                    continue;
                }
                let o = m.push(p);
                out.push_str(&o.text);
                if o.stopped {
                    stopped = true;
                    break;
                }
            }
            if !stopped {
                out.push_str(&m.flush());
            }
            assert_eq!((out, stopped), expected, "{stops:?} {pieces:?} {observed}");
        }
    }
}
