//! CPU reference for `expert_choice` (to be written).
