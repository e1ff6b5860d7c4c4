//! Raw memory handed over from Python: `(data_ptr, numel)` pairs, checked before any
//! slice is made.
//!
//! Every function of this module takes its tensors as `(data_ptr, numel)` tuples, where
//! `data_ptr` is `torch.Tensor.data_ptr()` (it already includes the storage offset) and
//! `numel` is the tensor's element count. The Python layer (`moe_router/ops.py`) passes
//! only contiguous CPU tensors of the dtype the argument needs, keeps them alive for the
//! whole call, and allocates every output fresh. What can still be checked here is
//! checked ([`check_bufs`]): a non-empty buffer has a non-null, aligned pointer, its byte
//! size fits `isize`, its range does not wrap, and no output overlaps any other buffer;
//! the op bindings then check every element count against the sizes passed in before
//! calling the core crate, whose `*_into` functions check them again. A wrong call is a
//! `ValueError`, not undefined behaviour.

use std::marker::PhantomData;

use pyo3::PyResult;

use crate::error::{dtype_error, internal_error, value_error};

/// `(data_ptr, numel)` of a contiguous tensor, as passed from Python.
pub(crate) type RawBuf = (u64, usize);

/// A buffer of `T` received from Python, not yet turned into a slice.
pub(crate) struct Buf<T> {
    name: &'static str,
    ptr: u64,
    len: usize,
    mutable: bool,
    _t: PhantomData<T>,
}

impl<T> Buf<T> {
    /// A buffer the op only reads.
    pub(crate) fn input(name: &'static str, raw: RawBuf) -> Self {
        Buf {
            name,
            ptr: raw.0,
            len: raw.1,
            mutable: false,
            _t: PhantomData,
        }
    }

    /// A buffer the op writes (and may read back).
    pub(crate) fn output(name: &'static str, raw: RawBuf) -> Self {
        Buf {
            name,
            ptr: raw.0,
            len: raw.1,
            mutable: true,
            _t: PhantomData,
        }
    }

    /// Element count as passed in.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The address as passed in (a device address for the CUDA bindings, which never
    /// dereference it on the host).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn addr(&self) -> u64 {
        self.ptr
    }

    /// `ValueError` unless the buffer has exactly `expected` elements; `shape` describes
    /// the expected shape for the message.
    pub(crate) fn expect_len(
        &self,
        op: &str,
        expected: usize,
        shape: impl std::fmt::Display,
    ) -> PyResult<()> {
        if self.len != expected {
            return Err(value_error(
                op,
                format_args!(
                    "argument `{}` has {} elements, expected {shape} = {expected} elements",
                    self.name, self.len
                ),
            ));
        }
        Ok(())
    }

    /// The checked description used by [`check_bufs`].
    pub(crate) fn span(&self) -> Span {
        Span {
            name: self.name,
            ptr: self.ptr,
            len: self.len,
            elem: std::mem::size_of::<T>(),
            align: std::mem::align_of::<T>(),
            mutable: self.mutable,
        }
    }

    /// The buffer as a shared slice.
    ///
    /// # Safety
    /// [`check_bufs`] accepted this buffer together with every other buffer of the call,
    /// and the caller guarantees that `[ptr, ptr + len * size_of::<T>())` is one live
    /// allocation holding `len` initialised values of `T`, that stays alive and is not
    /// written by anyone else for `'a`. (`T` here is always a type for which every bit
    /// pattern is valid: `f32`, `half::f16`, `half::bf16`, `i32`, `i64`, `u8`.)
    pub(crate) unsafe fn as_slice<'a>(&self) -> &'a [T] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: non-null, aligned and `len * size_of::<T>() <= isize::MAX` were checked
        // by `check_bufs`; validity and lifetime are the caller's contract above.
        unsafe { std::slice::from_raw_parts(self.ptr as usize as *const T, self.len) }
    }

    /// The buffer as an exclusive slice.
    ///
    /// # Safety
    /// As [`Buf::as_slice`], and in addition the buffer was created with
    /// [`Buf::output`] (so `check_bufs` proved that it overlaps no other buffer of the
    /// call) and no one else reads or writes it for `'a`.
    pub(crate) unsafe fn as_mut_slice<'a>(&self) -> &'a mut [T] {
        debug_assert!(self.mutable);
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as `as_slice`; exclusivity within this call from the overlap check in
        // `check_bufs`, and outside it from the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as usize as *mut T, self.len) }
    }
}

impl Buf<u8> {
    /// A `bool` mask stored one byte per element (torch.bool). Bytes other than 0 / 1
    /// are not valid `bool`s, so they are read as `byte != 0` into a copy; the common case
    /// (all 0 / 1) is borrowed.
    ///
    /// # Safety
    /// As [`Buf::as_slice`].
    pub(crate) unsafe fn as_bools<'a>(&self) -> std::borrow::Cow<'a, [bool]> {
        // SAFETY: forwarded to the caller.
        let bytes: &'a [u8] = unsafe { self.as_slice() };
        if bytes.iter().all(|&b| b <= 1) {
            // SAFETY: `bool` has size 1 and alignment 1 and every byte is 0 or 1, which are
            // exactly the valid `bool` values; the lifetime is the byte slice's.
            std::borrow::Cow::Borrowed(unsafe {
                std::slice::from_raw_parts(bytes.as_ptr() as *const bool, bytes.len())
            })
        } else {
            std::borrow::Cow::Owned(bytes.iter().map(|&b| b != 0).collect())
        }
    }

    /// An output `bool` mask stored one byte per element: zero-filled (so every byte is a
    /// valid `bool`) and handed out as `&mut [bool]`.
    ///
    /// # Safety
    /// As [`Buf::as_mut_slice`].
    pub(crate) unsafe fn as_mut_bools<'a>(&self) -> &'a mut [bool] {
        // SAFETY: forwarded to the caller.
        let bytes: &'a mut [u8] = unsafe { self.as_mut_slice() };
        bytes.fill(0);
        // SAFETY: every byte is now 0 (`false`); `bool` has size 1 and alignment 1; any
        // value the core writes through the `&mut [bool]` is a valid byte for torch.bool.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut bool, bytes.len()) }
    }
}

/// What [`check_bufs`] needs to know about one buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    name: &'static str,
    ptr: u64,
    len: usize,
    elem: usize,
    align: usize,
    mutable: bool,
}

impl Span {
    fn bytes(&self) -> usize {
        self.len * self.elem // checked in `check_bufs` before use
    }
}

/// Check every buffer of one call: a non-empty buffer has a non-null pointer aligned for
/// its element type, a byte size that fits `isize` and an address range that does not
/// wrap; and no output overlaps another buffer of the call. Empty buffers are never
/// dereferenced and skip the checks (torch may give them a null pointer).
pub(crate) fn check_bufs(op: &str, spans: &[Span]) -> PyResult<()> {
    for s in spans {
        if s.len == 0 {
            continue;
        }
        if s.ptr == 0 {
            return Err(value_error(
                op,
                format_args!(
                    "argument `{}` has {} elements but a null data pointer",
                    s.name, s.len
                ),
            ));
        }
        if (s.ptr as usize as u64) != s.ptr {
            return Err(value_error(op, format_args!("argument `{}` has a data pointer that does not fit this platform's address space", s.name)));
        }
        if s.ptr % s.align as u64 != 0 {
            return Err(value_error(
                op,
                format_args!("argument `{}` has a data pointer {:#x} not aligned to {} bytes; pass a freshly allocated or `.clone()`d tensor", s.name, s.ptr, s.align),
            ));
        }
        let bytes = s
            .len
            .checked_mul(s.elem)
            .filter(|&b| b <= isize::MAX as usize);
        let end = bytes.and_then(|b| (s.ptr as usize).checked_add(b));
        if end.is_none() {
            return Err(value_error(
                op,
                format_args!(
                    "argument `{}` has {} elements, more than the address space holds",
                    s.name, s.len
                ),
            ));
        }
    }
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            if !(a.mutable || b.mutable) || a.len == 0 || b.len == 0 {
                continue;
            }
            let (a0, b0) = (a.ptr as usize, b.ptr as usize);
            if a0 < b0 + b.bytes() && b0 < a0 + a.bytes() {
                return Err(value_error(
                    op,
                    format_args!("output `{}` overlaps argument `{}`; outputs must be separate, freshly allocated tensors", if a.mutable { a.name } else { b.name }, if a.mutable { b.name } else { a.name }),
                ));
            }
        }
    }
    Ok(())
}

/// Element type of logits / hidden states, from the dtype string the Python layer passes
/// (`"f32"`, `"f16"`, `"bf16"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Float {
    F32,
    F16,
    BF16,
}

/// Parse a float dtype string, or `TypeError`.
pub(crate) fn parse_float(op: &str, arg: &str, dtype: &str) -> PyResult<Float> {
    match dtype {
        "f32" | "float32" => Ok(Float::F32),
        "f16" | "float16" => Ok(Float::F16),
        "bf16" | "bfloat16" => Ok(Float::BF16),
        _ => Err(dtype_error(op, arg, dtype, "\"f32\", \"f16\", \"bf16\"")),
    }
}

/// `a * b` for sizes, or a `ValueError` naming what overflowed.
pub(crate) fn mul(op: &str, what: &str, a: usize, b: usize) -> PyResult<usize> {
    a.checked_mul(b)
        .ok_or_else(|| value_error(op, format_args!("{what} = {a} * {b} overflows usize")))
}

/// Copy `src` into the output buffer `dst` (same length, or an internal error).
pub(crate) fn copy_out<T: Copy>(op: &str, name: &str, src: &[T], dst: &mut [T]) -> PyResult<()> {
    if src.len() != dst.len() {
        return Err(internal_error(
            op,
            format_args!(
                "`{name}` has {} elements, the core returned {}",
                dst.len(),
                src.len()
            ),
        ));
    }
    dst.copy_from_slice(src);
    Ok(())
}

/// Run `f` with the GIL released, turning a panic (never expected: every input is
/// validated first) into a `RuntimeError` instead of letting it unwind into Python.
pub(crate) fn run<R: Send>(
    py: pyo3::Python<'_>,
    op: &str,
    f: impl FnOnce() -> PyResult<R> + Send,
) -> PyResult<R> {
    let out = py.detach(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".to_string())
        })
    });
    match out {
        Ok(r) => r,
        Err(msg) => Err(internal_error(op, format_args!("panic: {msg}"))),
    }
}
