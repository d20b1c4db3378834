//! Stop strings matched on decoded text, across token boundaries.
//!
//! Text that could still become the start of a stop string is held back until it either
//! completes a stop string (then it is dropped, with everything after it) or cannot any more
//! (then it is released). The stop string itself is never returned.

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released.
    pending: String,
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
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stops,
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return StopOutcome {
                text: std::mem::take(&mut self.pending),
                stopped: false,
            };
        }
        // The earliest stop string found wins.
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_match {
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome {
                text,
                stopped: true,
            };
        }
        let keep = self.held_suffix_len();
        let split = self.pending.len() - keep;
        let text = self.pending[..split].to_string();
        self.pending.drain(..split);
        StopOutcome {
            text,
            stopped: false,
        }
    }

    /// Releases what is still held back (generation ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let pending = self.pending.as_str();
        let mut best = 0;
        for stop in &self.stops {
            let max = (stop.len() - 1).min(pending.len());
            for len in (best + 1..=max).rev() {
                let start = pending.len() - len;
                if pending.is_char_boundary(start) && stop.starts_with(&pending[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
