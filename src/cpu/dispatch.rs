//! CPU reference for `dispatch` (to be written).
