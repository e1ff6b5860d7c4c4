//! CPU reference for `z_loss` (to be written).
