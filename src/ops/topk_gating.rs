//! `topk_gating` (to be written).

/// How router logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreFunction { /// softmax over experts
 #[default] Softmax, /// logistic sigmoid per expert (DeepSeek-V3)
 Sigmoid }
