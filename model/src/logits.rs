//! What happens to a row of logits between the model and the draw: the request's logit
//! bias and repetition penalties, and the log-probabilities reported back.

use std::collections::HashMap;

use crate::sampling::SamplingParams;

/// What a sequence has seen, for penalties: how often it generated each token, and which
/// tokens its prompt holds (repetition penalty only).
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    generated: HashMap<u32, u32>,
    prompt: Vec<u32>,
}

impl TokenHistory {
    /// `prompt` is kept only when `params` has a repetition penalty.
    pub fn new(prompt: &[u32], params: &SamplingParams) -> Self {
        let mut prompt = match params.repetition_penalty != 1.0 {
            true => prompt.to_vec(),
            false => Vec::new(),
        };
        prompt.sort_unstable();
        prompt.dedup();
        Self {
            generated: HashMap::new(),
            prompt,
        }
    }

    pub fn push(&mut self, token: u32) {
        *self.generated.entry(token).or_default() += 1;
    }
}

/// Whether `p` changes logits at all (so the row must be adjusted before sampling).
pub fn adjusts(p: &SamplingParams) -> bool {
    p.presence_penalty != 0.0
        || p.frequency_penalty != 0.0
        || p.repetition_penalty != 1.0
        || !p.logit_bias.is_empty()
}

/// Applies, in order: logit bias (added, as OpenAI does), the repetition penalty over
/// prompt and generated tokens (vLLM's: positive logits divided by it, negative ones
/// multiplied), then OpenAI's frequency and presence penalties over generated tokens
/// (`logit -= count * frequency + presence`).
pub fn adjust(logits: &mut [f32], p: &SamplingParams, h: &TokenHistory) {
    for &(token, bias) in &p.logit_bias {
        if let Some(l) = logits.get_mut(token as usize) {
            *l += bias;
        }
    }
    if p.repetition_penalty != 1.0 {
        let r = p.repetition_penalty;
        let seen = h.prompt.iter().chain(
            h.generated
                .keys()
                .filter(|t| h.prompt.binary_search(t).is_err()),
        );
        for &token in seen {
            if let Some(l) = logits.get_mut(token as usize) {
                // A penalty near 0 (a subnormal passes `> 0`) would divide to
                // infinity, and infinity minus infinity is NaN downstream: the
                // largest finite logit is as certain a pick.
                *l = if *l > 0.0 {
                    (*l / r).min(f32::MAX)
                } else {
                    *l * r
                };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        for (&token, &count) in &h.generated {
            if let Some(l) = logits.get_mut(token as usize) {
                *l -= count as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }
}

/// Sets the logits of `tokens` to minus infinity (they cannot be drawn).
pub fn ban(logits: &mut [f32], tokens: &[u32]) {
    for &t in tokens {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Where a log-probability is minus infinity (a banned token), what is reported: JSON has
/// no infinities, and OpenAI reports this value.
pub const LOGPROB_FLOOR: f32 = -9999.0;

/// The log-probability of `token`, and the `top` most likely tokens with theirs (most
/// likely first, lower id first among equals), under the distribution the draw uses:
/// softmax of the adjusted logits at the request's temperature (at temperature 0, the
/// temperature-1 distribution whose most likely token greedy decoding takes).
pub fn logprobs(
    logits: &[f32],
    temperature: f32,
    token: u32,
    top: usize,
) -> (f32, Vec<(u32, f32)>) {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .map(|&l| f64::from(((l - max) / t).exp()))
        .sum();
    let lse = sum.ln() as f32;
    let lp = |l: f32| {
        let v = (l - max) / t - lse;
        if v.is_finite() {
            v
        } else {
            LOGPROB_FLOOR
        }
    };
    let chosen = logits.get(token as usize).map_or(LOGPROB_FLOOR, |&l| lp(l));
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(ids.len());
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if top > 0 && top < ids.len() {
        ids.select_nth_unstable_by(top - 1, by_logit);
    }
    ids.truncate(top);
    ids.sort_unstable_by(by_logit);
    let best = ids.iter().map(|&i| (i, lp(logits[i as usize]))).collect();
    (chosen, best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn logprobs_are_a_distribution_and_rank_the_top() {
        let logits = [2.0, 1.0, 0.5, -1.0, 3.0];
        let (chosen, top) = logprobs(&logits, 1.0, 1, 5);
        let total: f32 = top.iter().map(|x| x.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert_eq!(top.iter().map(|x| x.0).collect::<Vec<_>>(), [4, 0, 1, 2, 3]);
        assert!((chosen - top[2].1).abs() < 1e-7);
        // Temperature 2 flattens the distribution the draw uses.
        let (hot, _) = logprobs(&logits, 2.0, 4, 0);
        let (cold, _) = logprobs(&logits, 1.0, 4, 0);
        assert!(hot < cold);
    }

    #[test]
    fn a_banned_token_reports_the_floor() {
        let mut logits = vec![1.0, 2.0, 3.0];
        ban(&mut logits, &[2]);
        let (lp, top) = logprobs(&logits, 1.0, 2, 3);
        assert_eq!(lp, LOGPROB_FLOOR);
        assert_eq!(top[2], (2, LOGPROB_FLOOR));
    }

    #[test]
    fn penalties_follow_openai_and_vllm() {
        let mut p = params();
        p.frequency_penalty = 0.5;
        p.presence_penalty = 1.0;
        let mut h = TokenHistory::new(&[0], &p);
        h.push(1);
        h.push(1);
        let mut logits = vec![1.0, 1.0, 1.0];
        adjust(&mut logits, &p, &h);
        // Token 1 generated twice: 1 - 2 * 0.5 - 1; the prompt's token 0 is untouched.
        assert_eq!(logits, [1.0, -1.0, 1.0]);

        let mut p = params();
        p.repetition_penalty = 2.0;
        let mut h = TokenHistory::new(&[0], &p);
        h.push(1);
        let mut logits = vec![4.0, -4.0, 4.0];
        adjust(&mut logits, &p, &h);
        assert_eq!(logits, [2.0, -8.0, 4.0]);

        let mut p = params();
        p.logit_bias = vec![(2, -100.0), (0, 5.0)];
        let mut logits = vec![0.0, 0.0, 0.0];
        adjust(&mut logits, &p, &TokenHistory::new(&[], &p));
        assert_eq!(logits, [5.0, 0.0, -100.0]);
        assert!(adjusts(&p));
        assert!(!adjusts(&params()));
    }

    /// A penalty so small that dividing by it overflows (1e-40, a subnormal above 0)
    /// leaves logits finite: the seen token is the certain pick and log-probabilities
    /// stay numbers (they were NaN, reported as -9999 for the token drawn).
    #[test]
    fn a_tiny_repetition_penalty_stays_finite() {
        let mut p = params();
        p.repetition_penalty = 1e-40;
        let h = TokenHistory::new(&[1], &p);
        let mut logits = vec![3.0, 2.0, -1.0];
        adjust(&mut logits, &p, &h);
        assert!(logits.iter().all(|l| l.is_finite()), "{logits:?}");
        let (chosen, top) = logprobs(&logits, 0.7, 1, 2);
        assert_eq!(chosen, 0.0);
        assert_eq!(top[0], (1, 0.0));
    }
}
