//! `z_loss` (to be written).
