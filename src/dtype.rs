//! Element types accepted for logits and hidden states.
//!
//! Logits and hidden states may be `f32`, `f16` or `bf16` ([`half::f16`],
//! [`half::bf16`]). All router math runs in `f32`: values are widened on load and
//! rounded (round-to-nearest-even) only on the final store.

use half::{bf16, f16};

/// Runtime tag of a [`RouterFloat`] type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16 ([`half::f16`]).
    F16,
    /// bfloat16 ([`half::bf16`]).
    BF16,
}

impl DType {
    /// The suffix used in kernel and bench names: `f32`, `f16`, `bf16`.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A floating-point element type the router accepts: `f32`, `f16` or `bf16`.
///
/// Sealed: the kernels exist for exactly these three.
pub trait RouterFloat:
    sealed::Sealed
    + Copy
    + Send
    + Sync
    + Default
    + PartialEq
    + std::fmt::Debug
    + bytemuck::Pod
    + 'static
{
    /// This type's runtime tag.
    const DTYPE: DType;
    /// Widen to `f32` (exact for every type here).
    fn to_f32(self) -> f32;
    /// Round from `f32` (round-to-nearest-even; exact for `f32`).
    fn from_f32(v: f32) -> Self;
}

impl RouterFloat for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl RouterFloat for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl RouterFloat for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// `"{root}_{dtype}"`, the name of a kernel entry point for element type `T`
/// (for example `kernel_name::<half::bf16>("permute_fwd") == "permute_fwd_bf16"`).
pub fn kernel_name<T: RouterFloat>(root: &str) -> String {
    format!("{root}_{}", T::DTYPE.as_str())
}
