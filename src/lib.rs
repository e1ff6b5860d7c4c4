//! # moe-router
//!
//! Mixture-of-Experts routing with an exact CPU reference (this crate's default
//! build) and CUDA kernels (the `cuda` feature): top-k gating, capacity,
//! capacity-factor dispatch, expert-choice routing, permute / unpermute of hidden
//! states, load-balance and z losses, expert dropout, aux-loss-free bias update and
//! router statistics. The contract every backend follows is `docs/semantics.md`.
//!
//! Every op comes in two forms:
//! - an allocating form over [`ndarray`] views (`topk_gating`, `dispatch`, ...);
//! - a `*_into` form over flat row-major slices with explicit sizes that writes into
//!   caller-owned buffers (what the Python and CUDA layers call).
//!
//! Both validate every argument first and return [`Error`] naming the argument, the
//! value and what would be valid; no input makes library code panic.
//!
//! ```
//! use moe_router::{topk_gating, TopkGatingConfig, ScoreFunction};
//! use ndarray::array;
//!
//! let logits = array![[1.0f32, 3.0, 2.0, 0.0], [0.5, 0.5, 0.1, 0.2]];
//! let cfg = TopkGatingConfig::new(2).score_function(ScoreFunction::Softmax).pre_softmax(true);
//! let out = topk_gating(logits.view(), None, &cfg).unwrap();
//! assert_eq!(out.indices.row(0).to_vec(), vec![1, 2]);
//! assert_eq!(out.indices.row(1).to_vec(), vec![0, 1]); // tie: lower expert index first
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod ops;
pub mod philox;
pub mod select;

pub use dtype::{kernel_name, DType, RouterFloat};
pub use error::{Error, Result};
/// The `ndarray` this crate's array API uses, re-exported so that a program needs no
/// second dependency (and cannot pick a mismatched version): `use moe_router::ndarray`.
pub use ndarray;
pub use ops::*;

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
