//! The rule a conversation's calls keep, as OpenAI's: the results right after a turn's
//! calls answer each of them once, before anything else comes, and no two calls share
//! an id (a result could not say which it answers). Chat's messages and Responses'
//! items keep it alike; each names its own positions in its errors.

/// The calls made so far, with their function's names, and those still unanswered.
#[derive(Debug, Default)]
pub struct Ledger {
    calls: Vec<(String, String)>,
    open: Vec<String>,
}

/// How a call or a result breaks the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// A call with an earlier call's id.
    SharedId,
    /// A result for a call already answered, or not of the last turn.
    Answered,
    /// A result for no call made.
    Unknown,
}

impl Ledger {
    /// The calls made and not yet answered: nothing but their results may come next.
    pub fn open(&self) -> &[String] {
        &self.open
    }

    /// A call of function `name` made.
    pub fn call(&mut self, id: String, name: String) -> Result<(), Broken> {
        if self.calls.iter().any(|(c, _)| *c == id) {
            return Err(Broken::SharedId);
        }
        self.open.push(id.clone());
        self.calls.push((id, name));
        Ok(())
    }

    /// A result for call `id`; the name of the function it answers.
    pub fn answer(&mut self, id: &str) -> Result<&str, Broken> {
        let Some((_, name)) = self.calls.iter().find(|(c, _)| c == id) else {
            return Err(Broken::Unknown);
        };
        let at = (self.open.iter().position(|c| c == id)).ok_or(Broken::Answered)?;
        self.open.remove(at);
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_answer_each_call_once() {
        let mut l = Ledger::default();
        l.call("a".into(), "f".into()).unwrap();
        l.call("b".into(), "g".into()).unwrap();
        assert_eq!(l.call("a".into(), "f".into()), Err(Broken::SharedId));
        assert_eq!(l.open(), ["a", "b"]);
        assert_eq!(l.answer("b"), Ok("g"));
        assert_eq!(l.answer("b"), Err(Broken::Answered));
        assert_eq!(l.answer("z"), Err(Broken::Unknown));
        assert_eq!(l.answer("a"), Ok("f"));
        assert!(l.open().is_empty());
    }
}
