//! Option vocabularies shared by several bindings (strings from Python → the core's
//! enums) and the float-dtype dispatch.

use pyo3::PyResult;

use crate::error::value_error;
use moe_router::ScoreFunction;

/// Valid `score_function` values.
pub(crate) const SCORE_FUNCTIONS: [&str; 2] = ["softmax", "sigmoid"];

/// `"softmax"` / `"sigmoid"` → [`ScoreFunction`], or `ValueError`.
pub(crate) fn score_function(op: &str, s: &str) -> PyResult<ScoreFunction> {
    match s {
        "softmax" => Ok(ScoreFunction::Softmax),
        "sigmoid" => Ok(ScoreFunction::Sigmoid),
        _ => Err(value_error(
            op,
            format_args!("invalid `score_function` = {s:?}: valid values are {SCORE_FUNCTIONS:?}"),
        )),
    }
}

/// Run a generic expression for the float element type of `dtype` (a
/// `moe_router::DType`): `float_dispatch!(dt, T => f::<T>(..))`.
macro_rules! float_dispatch {
    ($dt:expr, $t:ident => $e:expr) => {
        match $dt {
            moe_router::DType::F32 => {
                type $t = f32;
                $e
            }
            moe_router::DType::F16 => {
                type $t = half::f16;
                $e
            }
            moe_router::DType::BF16 => {
                type $t = half::bf16;
                $e
            }
        }
    };
}
pub(crate) use float_dispatch;
