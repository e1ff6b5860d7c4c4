//! `capacity` (to be written).
