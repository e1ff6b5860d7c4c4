//! Expert dropout: expert masking before selection, assignment dropout after gating.

use crate::error::{Error, Result};

/// Rate and random stream of a dropout-like op (expert masking, assignment dropout).
///
/// Deterministic from `(seed, offset)` (Philox-4x32-10, see [`crate::philox`]): the
/// same config gives the same mask on every backend and thread count. A rate of 0
/// is the identity. Apply it in training only (the Python module does this).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutConfig {
    /// Probability in `[0, 1)` that a candidate / assignment is dropped.
    pub rate: f32,
    /// Generator seed.
    pub seed: u64,
    /// Generator offset (advance it every step).
    pub offset: u64,
}

impl DropoutConfig {
    /// A config with the given rate, seed and offset.
    pub fn new(rate: f32, seed: u64, offset: u64) -> Self {
        DropoutConfig { rate, seed, offset }
    }

    /// `rate` must be finite and in `[0, 1)`.
    pub fn validate(&self, op: &'static str, arg: &'static str) -> Result<()> {
        if !(self.rate.is_finite() && self.rate >= 0.0 && self.rate < 1.0) {
            return Err(Error::invalid(
                op,
                arg,
                format_args!("rate {}", self.rate),
                "the dropout rate must be finite and in [0, 1)",
            ));
        }
        Ok(())
    }
}
