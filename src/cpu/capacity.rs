//! CPU reference for `capacity` (to be written).
