//! A step-time target (`--max-step-ms`): how many budget units the next step may take so
//! that it ends within the target. Every step's duration is observed against what it
//! cost (its [`Plan::cost`](crate::scheduler::Plan)), a line `ms = fixed + per_unit ×
//! units` is fitted to the recent steps (least squares, older steps weighing less), and
//! the next budget is what that line says fits in the target. It follows the machine,
//! the model and what else runs on the cores, with no calibration step.

/// Weight of a step one step older than another (about 30 steps remembered).
const DECAY: f64 = 0.97;
/// Steps observed before the fitted line is trusted.
const WARMUP: usize = 8;

#[derive(Debug, Clone)]
pub struct StepBudget {
    target_ms: f64,
    max_units: usize,
    observed: usize,
    // Exponentially weighted sums of 1, x, y, x², xy (x: units, y: milliseconds).
    w: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
}

impl StepBudget {
    /// A target of `target_ms` per step, never more than `max_units` (`--max-batch-tokens`).
    pub fn new(target_ms: u64, max_units: usize) -> Self {
        Self {
            target_ms: target_ms as f64,
            max_units: max_units.max(1),
            observed: 0,
            w: 0.0,
            sx: 0.0,
            sy: 0.0,
            sxx: 0.0,
            sxy: 0.0,
        }
    }

    /// A step that cost `units` took `ms`.
    pub fn observe(&mut self, units: usize, ms: f64) {
        if units == 0 || !ms.is_finite() || ms < 0.0 {
            return;
        }
        let x = units as f64;
        self.w = self.w * DECAY + 1.0;
        self.sx = self.sx * DECAY + x;
        self.sy = self.sy * DECAY + ms;
        self.sxx = self.sxx * DECAY + x * x;
        self.sxy = self.sxy * DECAY + x * ms;
        self.observed += 1;
    }

    /// The fitted `(fixed_ms, ms_per_unit)`, once enough steps were seen.
    pub fn line(&self) -> Option<(f64, f64)> {
        if self.observed < WARMUP {
            return None;
        }
        let (mx, my) = (self.sx / self.w, self.sy / self.w);
        let var = self.sxx / self.w - mx * mx;
        let cov = self.sxy / self.w - mx * my;
        // Steps of (nearly) one size, or noise that makes bigger steps look cheaper: no
        // slope to trust, so the whole time is taken as proportional to the cost.
        let (fixed, slope) = match var > 1.0 && cov > 0.0 {
            true => {
                let slope = cov / var;
                let fixed = my - slope * mx;
                match fixed >= 0.0 {
                    true => (fixed, slope),
                    false => (0.0, my / mx),
                }
            }
            false => (0.0, my / mx),
        };
        (slope > 0.0 && slope.is_finite()).then_some((fixed, slope))
    }

    /// Units the next step may take: what fits in the target by the fitted line (all of
    /// `--max-batch-tokens` until the line is known, 1 when even the fixed part is over).
    pub fn units(&self) -> usize {
        match self.line() {
            None => self.max_units,
            Some((fixed, slope)) => {
                // (A hair over, so that a fit landing a rounding error under a whole unit counts it.)
                let fits = ((self.target_ms - fixed) / slope + 1e-9).floor();
                if fits < 1.0 {
                    1
                } else {
                    (fits as usize).min(self.max_units)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StepBudget;

    #[test]
    fn full_budget_until_warm() {
        let mut b = StepBudget::new(100, 128);
        for _ in 0..7 {
            b.observe(10, 500.0);
        }
        assert_eq!(b.units(), 128);
        b.observe(10, 500.0);
        assert!(b.units() < 128);
    }

    #[test]
    fn recovers_a_line_and_budgets_by_it() {
        // 20 ms fixed, 2 ms a unit: 100 ms fit 40 units.
        let mut b = StepBudget::new(100, 128);
        for i in 0..40 {
            let x = 8 + (i * 13) % 100;
            b.observe(x, 20.0 + 2.0 * x as f64);
        }
        let (fixed, slope) = b.line().expect("a line");
        assert!(
            (fixed - 20.0).abs() < 1e-6 && (slope - 2.0).abs() < 1e-9,
            "{fixed} {slope}"
        );
        assert_eq!(b.units(), 40);
    }

    #[test]
    fn one_step_size_is_taken_as_proportional() {
        let mut b = StepBudget::new(100, 128);
        for _ in 0..20 {
            b.observe(50, 250.0);
        }
        let (fixed, slope) = b.line().expect("a line");
        assert!(
            fixed == 0.0 && (slope - 5.0).abs() < 1e-9,
            "{fixed} {slope}"
        );
        assert_eq!(b.units(), 20);
    }

    #[test]
    fn budget_stays_within_bounds() {
        let mut slow = StepBudget::new(10, 128);
        let mut fast = StepBudget::new(10_000, 128);
        for i in 0..20 {
            slow.observe(10 + i, 1000.0 + i as f64);
            fast.observe(10 + i, 1.0 + i as f64);
        }
        assert_eq!(slow.units(), 1);
        assert_eq!(fast.units(), 128);
    }

    #[test]
    fn recent_steps_weigh_more() {
        // The machine gets twice as slow (another process took a core).
        let mut b = StepBudget::new(100, 128);
        for i in 0..100 {
            b.observe(10 + i % 30, 1.0 * (10 + i % 30) as f64);
        }
        let before = b.units();
        for i in 0..100 {
            b.observe(10 + i % 30, 2.0 * (10 + i % 30) as f64);
        }
        assert_eq!(before, 100);
        assert!((48..=52).contains(&b.units()), "{}", b.units());
    }
}
