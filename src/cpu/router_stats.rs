//! CPU reference for `router_stats` (to be written).
