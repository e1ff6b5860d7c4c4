//! `aux_loss` (to be written).
