//! Binding of `capacity` (pure integer arithmetic; no buffers).

use pyo3::prelude::*;

use crate::error::to_py_err;
use crate::tensor::Opts;
use moe_router::CapacityConfig;

/// `ceil((num_tokens * topk / num_experts) * capacity_factor)` in float64, then
/// `max(.., min_capacity)`, then rounded up to a multiple of `capacity_multiple` if given.
/// Arguments are converted with the package's rules (`TypeError` for a wrong type,
/// `ValueError` naming the argument for an out-of-range int).
#[pyfunction]
#[pyo3(signature = (num_tokens, num_experts, topk, capacity_factor, min_capacity=None, capacity_multiple=None))]
pub(crate) fn capacity(
    num_tokens: &Bound<'_, PyAny>,
    num_experts: &Bound<'_, PyAny>,
    topk: &Bound<'_, PyAny>,
    capacity_factor: &Bound<'_, PyAny>,
    min_capacity: Option<&Bound<'_, PyAny>>,
    capacity_multiple: Option<&Bound<'_, PyAny>>,
) -> PyResult<usize> {
    let o = Opts::new("capacity", None);
    let opt = |name, v: Option<&Bound<'_, PyAny>>| -> PyResult<Option<usize>> {
        v.filter(|v| !v.is_none())
            .map(|v| o.arg(name, v, "an int >= 0"))
            .transpose()
    };
    let cfg = CapacityConfig {
        capacity_factor: o.arg("capacity_factor", capacity_factor, "a float > 0")?,
        min_capacity: opt("min_capacity", min_capacity)?.unwrap_or(0),
        capacity_multiple: opt("capacity_multiple", capacity_multiple)?,
    };
    moe_router::capacity(
        o.arg("num_tokens", num_tokens, "an int >= 0")?,
        o.arg("num_experts", num_experts, "an int >= 1")?,
        o.arg("topk", topk, "an int >= 1")?,
        &cfg,
    )
    .map_err(to_py_err)
}

/// Register this file's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(capacity, m)?)?;
    Ok(())
}
