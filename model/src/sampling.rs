//! Next-token sampling: greedy at temperature 0, otherwise temperature, top-k, top-p
//! (nucleus) and min-p filtering, then a draw from the request's own RNG, so that a seeded
//! request's output does not depend on what else shares its batch.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::math::exp;

/// Sampling parameters, already validated by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k filter.
    pub top_k: usize,
    /// In (0, 1]; 1 means no nucleus filter.
    pub top_p: f32,
    /// In [0, 1]; 0 means no min-p filter.
    pub min_p: f32,
    pub seed: Option<u64>,
    /// OpenAI's penalties over generated tokens, in [-2, 2]; 0 is off.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// vLLM's penalty over prompt and generated tokens, > 0; 1 is off.
    pub repetition_penalty: f32,
    /// Added to the named tokens' logits.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

/// Below this many candidates the nucleus search just sorts.
const SORT_BELOW: usize = 64;

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch buffers reused across steps: unnormalised probabilities, and the
    /// (token, probability) candidates still in the running.
    weights: Vec<f32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            weights: Vec::new(),
            candidates: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature <= 0.0 || p.top_k == 1 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / p.temperature;
        self.weights.clear();
        self.weights
            .extend(logits.iter().map(|&l| exp((l - max) * inv_t)));
        self.candidates.clear();
        self.candidates.extend(
            self.weights
                .iter()
                .enumerate()
                .map(|(i, &w)| (i as u32, w))
                .filter(|&(_, w)| w > 0.0),
        );
        let c = &mut self.candidates;
        if c.is_empty() {
            return argmax(logits);
        }
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_weight_desc);
            c.truncate(p.top_k);
        }
        if p.min_p > 0.0 {
            // The most likely token has weight exactly 1 (its logit is the max).
            let floor = p.min_p * c.iter().map(|x| x.1).fold(0.0, f32::max);
            c.retain(|x| x.1 >= floor);
        }
        if p.top_p < 1.0 {
            let total: f32 = c.iter().map(|x| x.1).sum();
            nucleus(c, p.top_p * total);
        }
        let total: f32 = c.iter().map(|x| x.1).sum();
        let mut draw = self.rng.random::<f32>() * total;
        for &(id, w) in c.iter() {
            if draw < w {
                return id;
            }
            draw -= w;
        }
        // Rounding left a sliver past the end: the last candidate takes it.
        c.last().map_or_else(|| argmax(logits), |x| x.0)
    }
}

/// Keeps the smallest set of the heaviest candidates whose weights reach `target`
/// (top-p), in an order fixed by the weights alone. Halves the range with linear-time selection instead of
/// sorting the vocabulary, so a flat distribution costs O(n), not O(n log n).
fn nucleus(c: &mut Vec<(u32, f32)>, target: f32) {
    let (mut lo, mut hi, mut need) = (0, c.len(), target);
    // Invariant: c[..lo] is kept and outweighs all of c[lo..hi]; c[hi..] is dropped.
    while hi - lo > SORT_BELOW {
        let mid = lo + (hi - lo) / 2;
        c[lo..hi].select_nth_unstable_by(mid - lo, by_weight_desc);
        let upper: f32 = c[lo..mid].iter().map(|x| x.1).sum();
        if upper >= need {
            hi = mid;
        } else {
            need -= upper;
            lo = mid;
        }
    }
    c[lo..hi].sort_unstable_by(by_weight_desc);
    let mut cum = 0.0;
    let mut end = hi;
    for (i, x) in c[lo..hi].iter().enumerate() {
        cum += x.1;
        if cum >= need {
            end = lo + i + 1;
            break;
        }
    }
    c.truncate(end);
}

/// Heaviest first; the lower token id first among equals, so the order is total.
fn by_weight_desc(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Index of the largest logit; the lowest index wins ties, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn histogram(p: SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut s = Sampler::new(p);
        let mut h = vec![0; logits.len()];
        for _ in 0..draws {
            h[s.sample(logits) as usize] += 1;
        }
        h
    }

    #[test]
    fn greedy_picks_argmax_and_first_of_ties() {
        let mut s = Sampler::new(params(0.0, 0, 1.0, 0.0, 1));
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let a: Vec<u32> = {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, 42));
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, 42));
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let c: Vec<u32> = {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, 43));
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_limits_the_choice() {
        let logits = [1.0, 5.0, 4.0, 3.0, 2.0];
        let h = histogram(params(10.0, 2, 1.0, 0.0, 7), &logits, 2000);
        assert_eq!(h[0] + h[3] + h[4], 0);
        assert!(h[1] > 0 && h[2] > 0);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ≈ [0.643, 0.237, 0.087, 0.032]: top_p 0.8 keeps the first two.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let h = histogram(params(1.0, 0, 0.8, 0.0, 9), &logits, 3000);
        assert_eq!(h[2] + h[3], 0);
        assert!(h[0] > h[1] && h[1] > 0);
    }

    #[test]
    fn top_p_over_a_large_vocabulary() {
        let mut logits = vec![-10.0; 5000];
        logits[4000] = 5.0;
        logits[10] = 4.5;
        let h = histogram(params(1.0, 0, 0.5, 0.0, 3), &logits, 500);
        assert_eq!(h[4000], 500);
    }

    /// The selection-based nucleus holds the same tokens a full sort finds, on a flat
    /// distribution where the nucleus is most of the vocabulary.
    #[test]
    fn nucleus_equals_sorted_prefix() {
        let mut rng = StdRng::seed_from_u64(4);
        for n in [1, 10, 63, 64, 65, 1000, 49152] {
            let c: Vec<(u32, f32)> = (0..n).map(|i| (i, rng.random_range(0.01..1.0))).collect();
            let total: f32 = c.iter().map(|x| x.1).sum();
            for top_p in [0.05, 0.5, 0.95, 0.999] {
                let target = top_p * total;
                let mut sorted = c.clone();
                sorted.sort_by(by_weight_desc);
                let mut cum = 0.0;
                let keep = sorted
                    .iter()
                    .position(|x| {
                        cum += x.1;
                        cum >= target
                    })
                    .map_or(n as usize, |i| i + 1);
                let mut got = c.clone();
                nucleus(&mut got, target);
                got.sort_by(by_weight_desc);
                // Sums in another order may round across the boundary by one token.
                assert!(
                    got.len().abs_diff(keep) <= 1,
                    "n {n}, top_p {top_p}: {} vs {keep}",
                    got.len()
                );
                let common = got.len().min(keep);
                assert_eq!(got[..common], sorted[..common], "n {n}, top_p {top_p}");
            }
        }
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // Relative weights 1, e^-1 ≈ 0.37, e^-3 ≈ 0.05: min_p 0.1 drops the last.
        let logits = [3.0, 2.0, 0.0];
        let h = histogram(params(1.0, 0, 1.0, 0.1, 5), &logits, 3000);
        assert_eq!(h[2], 0);
        assert!(h[1] > 0);
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [1.0, 0.0];
        let hot = histogram(params(2.0, 0, 1.0, 0.0, 1), &logits, 4000);
        let cold = histogram(params(0.25, 0, 1.0, 0.0, 1), &logits, 4000);
        assert!(cold[0] > hot[0]);
        assert!(cold[0] > 3800);
    }
}
