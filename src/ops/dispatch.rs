//! `dispatch` (to be written).
