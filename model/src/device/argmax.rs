//! Greedy picks where the logits are. A greedy row whose logits nothing adjusts needs
//! only their argmax: found on the device, it comes back as one id instead of a row of
//! the vocabulary (at 256 rows of a 49k vocabulary, 1 KB a step instead of 50 MB, and
//! no copying of those into rows on the host).

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

/// Each row's argmax as [`crate::sampling::argmax`] finds it on the host: the lowest id
/// among equal maxima, never a NaN. (candle's own `argmax` breaks ties by its
/// reduction's order, and its `max` skips NaN on CUDA but not on the CPU.)
pub(crate) struct Argmax {
    /// `[vocab]` u32: `vocab - id`, largest for the lowest id.
    descending: Tensor,
    /// `[1]` u32: 0.
    zero: Tensor,
    /// `[1]` f32: -inf, what a NaN logit counts as.
    lowest: Tensor,
}

impl Argmax {
    pub fn new(vocab: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            descending: descending(vocab, device)?,
            zero: Tensor::zeros(1, DType::U32, device)?,
            lowest: Tensor::new(&[f32::NEG_INFINITY], device)?,
        })
    }

    /// The argmax of each row of `[n, vocab]` f32 `logits`, copied back. Six kernels;
    /// for the step, besides the logits, two `[n, vocab]` masks (u8), the logits without
    /// NaN (f32) and the scores (u32).
    pub fn tokens(&self, logits: &Tensor) -> Result<Vec<u32>> {
        let (n, vocab) = logits.dims2()?;
        // A head wider than the vocabulary (padded) gets its own table.
        let descending = match self.descending.dim(0)? == vocab {
            true => self.descending.clone(),
            false => descending(vocab, logits.device())?,
        };
        let shape = (n, vocab);
        let logits = logits
            .eq(logits)?
            .where_cond(logits, &self.lowest.broadcast_as(shape)?)?;
        let max = logits.max_keepdim(D::Minus1)?;
        // `vocab - id` where a logit equals its row's max, 0 elsewhere: the row's max
        // is its lowest such id.
        let score = logits.broadcast_eq(&max)?.where_cond(
            &descending.broadcast_as(shape)?,
            &self.zero.broadcast_as(shape)?,
        )?;
        let best = score.max(D::Minus1)?;
        let vocab = vocab as u32;
        // 0: no logit equals the max (none here; defensive), where the host's says 0.
        Ok(best
            .to_vec1::<u32>()?
            .into_iter()
            .map(|b| match b {
                0 => 0,
                b => vocab.saturating_sub(b),
            })
            .collect())
    }
}

/// `[vocab]` u32: `vocab - id`.
fn descending(vocab: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<u32> = (0..vocab).map(|id| (vocab - id) as u32).collect();
    Ok(Tensor::from_vec(values, vocab, device)?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failure here is a test failure

    use super::*;
    use crate::sampling::argmax;

    fn check(rows: &[Vec<f32>]) {
        let vocab = rows[0].len();
        let flat: Vec<f32> = rows.concat();
        let logits = Tensor::from_vec(flat, (rows.len(), vocab), &Device::Cpu).unwrap();
        let want: Vec<u32> = rows.iter().map(|r| argmax(r)).collect();
        // Built for this vocabulary, and for a narrower one (a padded head).
        for built_for in [vocab, vocab - 2] {
            let got = Argmax::new(built_for, &Device::Cpu)
                .unwrap()
                .tokens(&logits)
                .unwrap();
            assert_eq!(got, want, "{rows:?}");
        }
    }

    #[test]
    fn matches_the_hosts_argmax_ties_infinities_and_nan_included() {
        let (inf, vocab) = (f32::INFINITY, 7);
        check(&[
            vec![0.5, 2.0, -1.0, 3.0, 3.0, 1.0, 0.0],
            // Ties: the lowest id, wherever the others lie.
            vec![4.0, 1.0, 4.0, 4.0, -2.0, 0.0, 4.0],
            vec![-1.0, -3.0, -2.0, -5.0, -4.0, -6.0, -1.0],
            // The last id, the first.
            vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0],
            vec![9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            // Banned tokens (-inf), every token banned, an infinite logit.
            vec![-inf, -inf, 1.0, -inf, 1.5, -inf, -inf],
            vec![-inf; vocab],
            vec![0.0, inf, 1.0, inf, 0.0, 0.0, 0.0],
            // NaN never wins; a row of NaN says 0.
            vec![f32::NAN, 1.0, 2.0, f32::NAN, 2.0, 0.0, 0.0],
            vec![f32::NAN; vocab],
        ]);
        // Random rows over a vocabulary the size of the default model's, with a tie
        // planted in every other row.
        let vocab = 49_152;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|r| {
                let mut row: Vec<f32> = (0..vocab)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        (state >> 40) as f32 / (1u64 << 24) as f32 * 20.0 - 10.0
                    })
                    .collect();
                if r % 2 == 0 {
                    let top = argmax(&row) as usize;
                    row[(top + 7919 * (r + 1)) % vocab] = row[top];
                }
                row
            })
            .collect();
        check(&rows);
    }
}
