//! Binding of `capacity` (pure integer arithmetic; no buffers).

use pyo3::prelude::*;

use crate::error::to_py_err;
use moe_router::CapacityConfig;

/// `ceil((num_tokens * topk / num_experts) * capacity_factor)` in float64, then
/// `max(.., min_capacity)`, then rounded up to a multiple of `capacity_multiple` if given.
#[pyfunction]
#[pyo3(signature = (num_tokens, num_experts, topk, capacity_factor, min_capacity=0, capacity_multiple=None))]
pub(crate) fn capacity(
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    capacity_factor: f64,
    min_capacity: usize,
    capacity_multiple: Option<usize>,
) -> PyResult<usize> {
    let cfg = CapacityConfig {
        capacity_factor,
        min_capacity,
        capacity_multiple,
    };
    moe_router::capacity(num_tokens, num_experts, topk, &cfg).map_err(to_py_err)
}

/// Register this file's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(capacity, m)?)?;
    Ok(())
}
