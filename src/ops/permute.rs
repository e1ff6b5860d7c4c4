//! `permute` (to be written).
