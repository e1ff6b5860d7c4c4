//! Option parsing shared by several bindings (strings from Python → the core's enums).

use pyo3::PyResult;

use crate::error::value_error;
use moe_router::ScoreFunction;

/// `"softmax"` / `"sigmoid"` → [`ScoreFunction`], or `ValueError`.
pub(crate) fn score_function(op: &str, s: &str) -> PyResult<ScoreFunction> {
    match s {
        "softmax" => Ok(ScoreFunction::Softmax),
        "sigmoid" => Ok(ScoreFunction::Sigmoid),
        _ => Err(value_error(
            op,
            format_args!(
                "invalid `score_function` = {s:?}: valid values are \"softmax\", \"sigmoid\""
            ),
        )),
    }
}

/// Dispatch a generic function over the float dtype string: `float_dispatch!(OP, "logits",
/// dtype, f::<T>(args..))` calls `f::<f32>`, `f::<half::f16>` or `f::<half::bf16>`.
macro_rules! float_dispatch {
    ($op:expr, $arg:expr, $dtype:expr, $f:ident ( $($a:expr),* $(,)? )) => {
        match $crate::tensor::parse_float($op, $arg, $dtype)? {
            $crate::tensor::Float::F32 => $f::<f32>($($a),*),
            $crate::tensor::Float::F16 => $f::<half::f16>($($a),*),
            $crate::tensor::Float::BF16 => $f::<half::bf16>($($a),*),
        }
    };
}
pub(crate) use float_dispatch;
