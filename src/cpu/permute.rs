//! CPU reference for `permute` (to be written).
