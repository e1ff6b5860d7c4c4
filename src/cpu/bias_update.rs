//! CPU reference for `bias_update` (to be written).
