//! CPU reference for `topk_gating` (to be written).
