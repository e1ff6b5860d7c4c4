//! `expert_choice` (to be written).
