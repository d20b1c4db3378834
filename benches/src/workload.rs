//! Synthetic prompts, reproducible from a seed. Words are common English words, which the
//! tokenizers of today's chat models mostly keep as one token each, so `n` words is close
//! to `n` prompt tokens; the server's `usage.prompt_tokens` reports the exact count.

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

const WORDS: &[&str] = &[
    "the", "river", "mountain", "city", "light", "people", "time", "water", "house", "story",
    "garden", "music", "window", "summer", "winter", "morning", "evening", "friend", "school",
    "book", "road", "market", "bridge", "forest", "ocean", "island", "train", "letter", "dream",
    "history", "science", "animal", "family", "kitchen", "coffee", "paper", "picture", "color",
    "answer", "question", "problem", "number", "language", "country", "village", "doctor",
    "teacher", "student", "planet", "energy", "machine", "computer", "money", "power", "space",
    "journey", "weather", "night", "day", "year", "world", "small", "large", "quiet", "bright",
    "old", "new", "simple", "strong", "happy", "careful", "early", "late", "warm", "cold", "and",
    "with", "under", "over", "through", "about", "after", "before", "near", "far",
];

/// Makes the messages of every request in a run.
#[derive(Debug, Clone)]
pub struct Workload {
    seed: u64,
    prompt_words: usize,
    /// A system prompt every request shares (`--shared-prefix-tokens`), if any.
    system: Option<String>,
}

impl Workload {
    pub fn new(seed: u64, prompt_words: usize, shared_prefix_words: usize) -> Self {
        let system = (shared_prefix_words > 0).then(|| {
            let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed);
            words(&mut rng, shared_prefix_words)
        });
        Self {
            seed,
            prompt_words,
            system,
        }
    }

    /// The user message of request `index` of stream `stream`: distinct for every pair.
    pub fn user_message(&self, stream: usize, index: usize) -> String {
        let mixed = self
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add((stream as u64) << 32)
            .wrapping_add(index as u64);
        let mut rng = StdRng::seed_from_u64(mixed);
        format!(
            "Request {stream}-{index}. Continue this text: {}",
            words(&mut rng, self.prompt_words)
        )
    }

    /// A new conversation: the shared system prompt, if any.
    pub fn conversation(&self) -> Vec<Value> {
        self.system
            .iter()
            .map(|s| json!({"role": "system", "content": s}))
            .collect()
    }
}

fn words(rng: &mut StdRng, n: usize) -> String {
    let picked: Vec<&str> = (0..n)
        .map(|_| *WORDS.choose(rng).unwrap_or(&"the"))
        .collect();
    picked.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_reproducible_and_distinct() {
        let w = Workload::new(7, 50, 0);
        assert_eq!(
            w.user_message(0, 0),
            Workload::new(7, 50, 0).user_message(0, 0)
        );
        assert_ne!(w.user_message(0, 0), w.user_message(0, 1));
        assert_ne!(w.user_message(0, 0), w.user_message(1, 0));
        assert_ne!(
            w.user_message(0, 0),
            Workload::new(8, 50, 0).user_message(0, 0)
        );
        assert!(w.conversation().is_empty());
    }

    #[test]
    fn shared_prefix_is_one_system_prompt() {
        let w = Workload::new(7, 10, 30);
        let conv = w.conversation();
        assert_eq!(conv.len(), 1);
        assert_eq!(conv[0]["role"], "system");
        let text = conv[0]["content"].as_str().unwrap();
        assert_eq!(text.split(' ').count(), 30);
        assert_eq!(conv, Workload::new(7, 99, 30).conversation());
    }
}
