//! `topk_gating` (to be written).
