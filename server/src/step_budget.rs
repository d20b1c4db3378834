//! A step-time target (`--max-step-ms`): how many budget units the next step may take so
//! that it ends within the target. Every step's duration is observed against what its
//! decoding streams and its prefill chunks cost (in [`Plan`](crate::scheduler::Plan)
//! units), a plane `ms = fixed + per_decode × decode + per_prefill × prefill` is fitted
//! to the recent steps (least squares, older steps weighing less), and prefill gets what
//! that plane says fits beside the decoders. The two slopes differ: a decoding row reads
//! its whole history alone, where a prefill chunk's rows share each block they read. It
//! follows the machine, the model and what else runs on the cores, with no calibration.
//!
//! Where the decoders alone take a good part of the target (many streams, a slow
//! machine), a fixed target would leave prompts a sliver of each step and they would
//! queue. So a step may also take `ratio` times what its decoders alone take
//! (`--max-step-ratio`): prefill always gets at least `ratio - 1` times the decoders'
//! time, and a pause stays within a few ordinary inter-token gaps.

/// Weight of a step one step older than another (about 30 steps remembered).
const DECAY: f64 = 0.97;
/// Steps observed before the fitted plane is trusted.
const WARMUP: usize = 8;
/// Steps are planned this many standard deviations of the fit's error under the target
/// (steps land around the plan, and it is the slow ones a reader sees), ...
const MARGIN_SIGMAS: f64 = 2.0;
/// ... but never under this share of it.
const MIN_AIM: f64 = 0.5;
#[derive(Debug, Clone)]
pub struct StepBudget {
    target_ms: f64,
    /// A step may take this many times its decoders' own time (0: never past the target).
    ratio: f64,
    max_units: usize,
    observed: usize,
    // Exponentially weighted sums of the products of (1, decode, prefill, ms).
    sums: [[f64; 4]; 4],
    // Exponentially weighted squared errors of the fit's predictions, and their weight.
    missed: f64,
    missed_weight: f64,
}

/// A fitted step time: `fixed + per_decode × decode units + per_prefill × prefill units`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCost {
    pub fixed: f64,
    pub per_decode: f64,
    pub per_prefill: f64,
}

impl StepBudget {
    /// A target of `target_ms` per step, never more than `max_units` (`--max-batch-tokens`).
    pub fn new(target_ms: u64, max_units: usize) -> Self {
        Self {
            target_ms: target_ms as f64,
            ratio: 0.0,
            max_units: max_units.max(1),
            observed: 0,
            sums: [[0.0; 4]; 4],
            missed: 0.0,
            missed_weight: 0.0,
        }
    }

    /// Lets a step take `ratio` times what its decoders alone take, when that is more
    /// than the target (0 or 1: never more than the target).
    pub fn with_ratio(mut self, ratio: f64) -> Self {
        self.ratio = if ratio.is_finite() {
            ratio.max(0.0)
        } else {
            0.0
        };
        self
    }

    /// A step whose decoders cost `decode` units and prefill chunks `prefill` took `ms`.
    pub fn observe(&mut self, decode: usize, prefill: usize, ms: f64) {
        if decode + prefill == 0 || !ms.is_finite() || ms < 0.0 {
            return;
        }
        if let Some(c) = self.cost() {
            let predicted = c.fixed + c.per_decode * decode as f64 + c.per_prefill * prefill as f64;
            self.missed = self.missed * DECAY + (ms - predicted).powi(2);
            self.missed_weight = self.missed_weight * DECAY + 1.0;
        }
        let v = [1.0, decode as f64, prefill as f64, ms];
        for (row, &a) in self.sums.iter_mut().zip(&v) {
            for (s, &b) in row.iter_mut().zip(&v) {
                *s = *s * DECAY + a * b;
            }
        }
        self.observed += 1;
    }

    /// The fitted step time, once enough steps were seen. When the steps seen do not tell
    /// decode and prefill apart (all of one kind, or always in one proportion), or noise
    /// makes a slope non-positive, both are priced alike by a line through all units.
    pub fn cost(&self) -> Option<StepCost> {
        if self.observed < WARMUP {
            return None;
        }
        self.plane().or_else(|| self.line())
    }

    /// Least squares on `(1, decode, prefill)`, by the normal equations.
    fn plane(&self) -> Option<StepCost> {
        let m = &self.sums;
        let a = [
            [m[0][0], m[0][1], m[0][2]],
            [m[1][0], m[1][1], m[1][2]],
            [m[2][0], m[2][1], m[2][2]],
        ];
        let b = [m[0][3], m[1][3], m[2][3]];
        let det = det3(&a);
        // Relative to the scale of the sums: a near-singular system has no trusted slope.
        let scale = a[0][0] * a[1][1] * a[2][2];
        if det.is_nan() || det.abs() <= 1e-6 * scale {
            return None;
        }
        let solve = |col: usize| {
            let mut a = a;
            for (row, &b) in a.iter_mut().zip(&b) {
                row[col] = b;
            }
            det3(&a) / det
        };
        let cost = StepCost {
            fixed: solve(0).max(0.0),
            per_decode: solve(1),
            per_prefill: solve(2),
        };
        (cost.per_decode > 0.0 && cost.per_prefill > 0.0).then_some(cost)
    }

    /// One slope for every unit: `ms = fixed + slope × (decode + prefill)`.
    fn line(&self) -> Option<StepCost> {
        let m = &self.sums;
        let w = m[0][0];
        // x = decode + prefill, y = ms.
        let sx = m[0][1] + m[0][2];
        let sy = m[0][3];
        let sxx = m[1][1] + 2.0 * m[1][2] + m[2][2];
        let sxy = m[1][3] + m[2][3];
        let (mx, my) = (sx / w, sy / w);
        let (var, cov) = (sxx / w - mx * mx, sxy / w - mx * my);
        let (fixed, slope) = match var > 1.0 && cov > 0.0 {
            true => {
                let slope = cov / var;
                match my - slope * mx {
                    fixed if fixed >= 0.0 => (fixed, slope),
                    _ => (0.0, my / mx),
                }
            }
            false => (0.0, my / mx),
        };
        (slope > 0.0 && slope.is_finite()).then_some(StepCost {
            fixed,
            per_decode: slope,
            per_prefill: slope,
        })
    }

    /// The prefill units one target-long step holds with nothing decoding, once the fit
    /// is known: how many steps a prompt would fill alone.
    pub fn prefill_units(&self) -> Option<usize> {
        let c = self.cost()?;
        let units = ((self.target_ms - c.fixed) / c.per_prefill + 1e-9).floor();
        Some((units.max(1.0) as usize).min(self.max_units))
    }

    /// How far steps have landed from what the fit predicted for them (root mean
    /// square, recent steps weighing more): the machine's noise and the fit's own error.
    pub fn error(&self) -> f64 {
        match self.missed_weight > 0.0 {
            true => (self.missed / self.missed_weight).sqrt(),
            false => 0.0,
        }
    }

    /// The next step's budget, given what its decoding streams cost: those units plus
    /// the prefill units that fit beside them in the step's target less twice the fit's
    /// error (the scheduler caps the sum at `--max-batch-tokens`). The step's target is
    /// the larger of the target and `ratio` times the decoders' time. As without a
    /// target (all of `--max-batch-tokens`) while nothing decodes (nobody waits between
    /// tokens), while the fit is not known yet, and when the decoders alone take the
    /// step's target or more (only without a ratio): it cannot be met then, and holding
    /// prompts back would only delay first tokens (at 32 streams on 2 cores that
    /// doubled the TTFT p99, benches/RESULTS.md).
    pub fn units(&self, decode: usize) -> usize {
        let Some(c) = self.cost().filter(|_| decode > 0) else {
            return self.max_units;
        };
        let decoders = c.fixed + c.per_decode * decode as f64;
        let target = self.target_ms.max(self.ratio * decoders);
        if decoders >= target {
            return self.max_units;
        }
        let aim = (target - MARGIN_SIGMAS * self.error()).max(MIN_AIM * target);
        let room = (aim - decoders).max(0.0);
        // (A hair over, so that a fit landing a rounding error under a whole unit counts it.)
        let prefill = (room / c.per_prefill + 1e-9).floor();
        (decode + prefill as usize).min(self.max_units)
    }
}

fn det3(a: &[[f64; 3]; 3]) -> f64 {
    a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps of several mixes: `decode` from 4 to 12 units, `prefill` from 0 to 60.
    fn mixes() -> impl Iterator<Item = (usize, usize)> {
        (0..60).map(|i| (4 + i % 9, (i * 13) % 61))
    }

    #[test]
    fn full_budget_until_warm_or_when_nothing_decodes() {
        let mut b = StepBudget::new(100, 128);
        for _ in 0..7 {
            b.observe(10, 10, 50.0);
        }
        assert_eq!(b.units(10), 128);
        b.observe(10, 10, 50.0);
        assert!(b.units(1) < 128);
        assert_eq!(b.units(0), 128);
    }

    #[test]
    fn recovers_both_slopes_and_budgets_prefill_by_its_own() {
        // 10 ms fixed, 5 ms a decode unit, 2 ms a prefill unit.
        let mut b = StepBudget::new(150, 128);
        for (d, p) in mixes() {
            b.observe(d, p, 10.0 + 5.0 * d as f64 + 2.0 * p as f64);
        }
        let c = b.cost().expect("a fit");
        assert!(
            (c.fixed - 10.0).abs() < 1e-6
                && (c.per_decode - 5.0).abs() < 1e-6
                && (c.per_prefill - 2.0).abs() < 1e-6,
            "{c:?}"
        );
        // 8 decode units take 50 ms: 100 ms left, less twice the error of the first
        // predictions (before the steps seen told the slopes apart), at 2 ms a unit.
        assert!(b.error() < 5.0, "{}", b.error());
        let want = (100.0 - 2.0 * b.error()) / 2.0;
        assert!(
            (b.units(8) as f64 - 8.0 - want).abs() <= 1.0,
            "{} vs {want}",
            b.units(8)
        );
        // Alone, a 150 ms step holds 70 prefill units past its 10 fixed ms.
        assert_eq!(b.prefill_units(), Some(70));
    }

    #[test]
    fn one_kind_of_step_is_priced_by_one_line() {
        let mut b = StepBudget::new(300, 128);
        for _ in 0..20 {
            b.observe(50, 0, 250.0);
        }
        let c = b.cost().expect("a fit");
        assert!(
            c.fixed == 0.0 && (c.per_decode - 5.0).abs() < 1e-9 && c.per_prefill == c.per_decode,
            "{c:?}"
        );
        // 10 decode units: 50 ms, 250 ms left at 5 a unit.
        assert_eq!(b.units(10), 60);
    }

    #[test]
    fn decoders_over_the_target_leave_the_budget_as_without_it() {
        let mut b = StepBudget::new(150, 128);
        for (d, p) in mixes() {
            b.observe(d, p, 10.0 + 5.0 * d as f64 + 2.0 * p as f64);
        }
        // 28 decode units take the whole target, 30 more than it.
        assert!(b.units(27) < 128);
        assert_eq!(b.units(28), 128);
        assert_eq!(b.units(30), 128);
        // Never more than --max-batch-tokens in all.
        let mut fast = StepBudget::new(10_000, 128);
        for (d, p) in mixes() {
            fast.observe(d, p, 1.0 + d as f64 + p as f64);
        }
        assert_eq!(fast.units(8), 128);
    }

    /// With a ratio, slow decoders stretch the step instead of starving prompts: 28
    /// decode units take 150 ms, so at a ratio of 3 the step may take 450, and prefill
    /// gets the 300 ms beside them rather than nothing or everything.
    #[test]
    fn a_ratio_stretches_the_target_with_the_decoders() {
        let mut b = StepBudget::new(150, 1024).with_ratio(3.0);
        for (d, p) in mixes() {
            b.observe(d, p, 10.0 + 5.0 * d as f64 + 2.0 * p as f64);
        }
        assert!(b.error() < 5.0, "{}", b.error());
        let prefill = |decode: usize| b.units(decode) - decode;
        // 8 units: 50 ms, under a third of the target: the target stands (100 ms left).
        let want = (100.0 - 2.0 * b.error()) / 2.0;
        assert!((prefill(8) as f64 - want).abs() <= 1.0, "{}", prefill(8));
        // 28 units: 150 ms; the step may take 450.
        let want = (450.0 - 2.0 * b.error() - 150.0) / 2.0;
        assert!((prefill(28) as f64 - want).abs() <= 1.0, "{}", prefill(28));
        // 40 units: 210 ms; 630 in all, twice the decoders' time for prefill.
        let want = (630.0 - 2.0 * b.error() - 210.0) / 2.0;
        assert!((prefill(40) as f64 - want).abs() <= 1.0, "{}", prefill(40));
        // A ratio of 1 is no ratio: decoders over the target leave it as without one.
        let mut one = StepBudget::new(150, 1024).with_ratio(1.0);
        for (d, p) in mixes() {
            one.observe(d, p, 10.0 + 5.0 * d as f64 + 2.0 * p as f64);
        }
        assert_eq!(one.units(30), 1024);
    }

    #[test]
    fn recent_steps_weigh_more() {
        // The machine gets twice as slow (another process took a core).
        let mut b = StepBudget::new(100, 128);
        for (d, p) in mixes().chain(mixes()) {
            b.observe(d, p, (d + p) as f64);
        }
        let before = b.units(10);
        for (d, p) in mixes().chain(mixes()) {
            b.observe(d, p, 2.0 * (d + p) as f64);
        }
        assert_eq!(before, 10 + 90);
        // 2 ms a unit now: 20 ms for the decoders, 80 left (less twice the error the
        // change made while the fit caught up).
        let c = b.cost().expect("a fit");
        assert!((1.9..2.1).contains(&c.per_prefill), "{c:?}");
        let after = b.units(10) - 10;
        let want = (80.0 - 2.0 * b.error()) / c.per_prefill;
        assert!((after as f64 - want).abs() <= 2.0, "{after} vs {want}");
    }

    /// Steps that land ±10 ms around the plane are planned 20 ms under the target: the
    /// slow half of them then stays under it too.
    #[test]
    fn noisy_steps_are_planned_under_the_target() {
        let mut b = StepBudget::new(150, 128);
        for (i, (d, p)) in mixes().chain(mixes()).chain(mixes()).enumerate() {
            let noise = if i % 2 == 0 { 10.0 } else { -10.0 };
            b.observe(d, p, 10.0 + 5.0 * d as f64 + 2.0 * p as f64 + noise);
        }
        assert!((b.error() - 10.0).abs() < 1.0, "{}", b.error());
        // 8 decode units take 50 ms: 150 - 20 - 50 = 80 ms left, 40 prefill units.
        assert!((39..=41).contains(&(b.units(8) - 8)), "{}", b.units(8));
    }
}
