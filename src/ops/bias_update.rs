//! `bias_update` (to be written).
