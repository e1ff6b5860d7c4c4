//! The crate's one error type.
//!
//! Every message starts with the op name, then names the argument, the value it had
//! and what would have been valid, so that a user can fix the call from the message
//! alone. The same variants serve every backend (CPU now, CUDA behind the `cuda`
//! feature), because validation is done once, in [`crate::ops`], before any backend
//! runs.

/// Errors returned by every op in this crate.
///
/// `#[non_exhaustive]`: new variants may be added (the CUDA backend adds driver and
/// compiler errors) without a breaking change.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// An argument has the wrong length or shape.
    #[error("{op}: argument `{arg}` has shape {got}, expected {expected}")]
    Shape {
        /// The op that rejected its input.
        op: &'static str,
        /// The argument at fault.
        arg: &'static str,
        /// The shape or length that would be valid.
        expected: String,
        /// What was passed.
        got: String,
    },
    /// An argument has a value outside its valid range, or options that contradict
    /// each other.
    #[error("{op}: invalid `{arg}` = {value}: {valid}")]
    InvalidArgument {
        /// The op that rejected its input.
        op: &'static str,
        /// The argument at fault.
        arg: &'static str,
        /// The value that was passed.
        value: String,
        /// What would be valid.
        valid: String,
    },
    /// An array is not in the (row-major, contiguous) layout the op needs.
    #[error("{op}: argument `{arg}` is not contiguous in row-major order; pass a standard-layout array (`.as_standard_layout()`)")]
    Layout {
        /// The op that rejected its input.
        op: &'static str,
        /// The argument at fault.
        arg: &'static str,
    },
    /// Sizes whose product does not fit the op's index type (`i32` rows).
    #[error("{op}: {what} = {value} overflows the i32 row index (max {max}); split the batch")]
    Overflow {
        /// The op that rejected its input.
        op: &'static str,
        /// The size that overflowed.
        what: &'static str,
        /// Its value.
        value: u128,
        /// The largest value the index type holds.
        max: i64,
    },
    /// Strict mode found non-finite logits.
    #[error("{op}: argument `{arg}` holds {count} non-finite value(s) (NaN or ±Inf) and strict mode is on; fix the producer of `{arg}` or turn strict mode off")]
    NonFinite {
        /// The op that rejected its input.
        op: &'static str,
        /// The argument at fault.
        arg: &'static str,
        /// How many non-finite values were found.
        count: u64,
    },
    /// A feature this build or device does not provide.
    #[error("{op}: {what}")]
    Unsupported {
        /// The op.
        op: &'static str,
        /// What is not supported, and what to do instead.
        what: String,
    },
    /// A CUDA driver call failed (out of memory, launch failure, ...).
    #[cfg(feature = "cuda")]
    #[error("CUDA driver error: {0}")]
    Driver(String),
    /// NVRTC could not compile a kernel module; `log` is the compiler's log.
    #[cfg(feature = "cuda")]
    #[error("NVRTC failed to compile kernel module `{module}`:\n{log}")]
    Compile {
        /// The kernel module (`cuda/<module>.cu`).
        module: &'static str,
        /// NVRTC's log (or what else went wrong).
        log: String,
    },
    /// No usable CUDA device (no driver library, or no device).
    #[cfg(feature = "cuda")]
    #[error("no CUDA device: {0}")]
    NoDevice(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub(crate) fn invalid(
        op: &'static str,
        arg: &'static str,
        value: impl std::fmt::Display,
        valid: impl Into<String>,
    ) -> Self {
        Error::InvalidArgument {
            op,
            arg,
            value: value.to_string(),
            valid: valid.into(),
        }
    }

    /// Shorthand for [`Error::Shape`].
    pub(crate) fn shape(
        op: &'static str,
        arg: &'static str,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::Shape {
            op,
            arg,
            expected: expected.into(),
            got: got.into(),
        }
    }
}
