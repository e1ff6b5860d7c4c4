//! `router_stats` (to be written).
