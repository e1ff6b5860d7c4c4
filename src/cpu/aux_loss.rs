//! CPU reference for `aux_loss` (to be written).
