//! Tensors handed over from Python, read through DLPack.
//!
//! Every binding receives `torch.Tensor` objects, never addresses. For each one it asks
//! torch for a DLPack capsule (`torch._C._to_dlpack`, no copy, no stream
//! synchronisation) and reads the tensor's own description from it: data pointer,
//! device, dtype, shape and strides. The capsule keeps the tensor's storage alive until
//! the binding returns. What the binding checks before any memory is touched:
//!
//! - the argument is a tensor with storage (`TypeError` / `ValueError` otherwise);
//! - its dtype and shape are what the op needs for the sizes taken from the op's main
//!   inputs (`TypeError` for a dtype, `ValueError` for a shape), and it is
//!   C-contiguous;
//! - every tensor of the call is on one device (CPU, or one CUDA device);
//! - no output overlaps any other tensor of the call.
//!
//! Only then are slices made (CPU) or device addresses handed to the kernels (CUDA),
//! so no call of `moe_router._native`, whatever its arguments, reads or writes memory
//! that the tensors given to it do not own. (A tensor mutated by another thread while
//! the op runs is a data race, as for any torch op.)

use std::ffi::c_void;
use std::marker::PhantomData;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyCapsule, PyDict};

use crate::error::{internal_error, value_error};

// --------------------------------------------------------------------------------------
// DLPack (v0.8 "dltensor" capsule layout, as `torch._C._to_dlpack` produces it)

#[repr(C)]
#[derive(Clone, Copy)]
struct DlDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DlDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DlTensor {
    data: *mut c_void,
    device: DlDevice,
    ndim: i32,
    dtype: DlDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct DlManagedTensor {
    dl_tensor: DlTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DlManagedTensor)>,
}

const DL_CPU: i32 = 1;
const DL_CUDA: i32 = 2;

/// Element type of a tensor, as far as the bindings care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    F16,
    BF16,
    F64,
    I32,
    I64,
    Bool,
    U8,
    Other,
}

impl Elem {
    fn from_dl(t: DlDataType) -> Self {
        if t.lanes != 1 {
            return Elem::Other;
        }
        match (t.code, t.bits) {
            (2, 32) => Elem::F32,
            (2, 16) => Elem::F16,
            (4, 16) => Elem::BF16,
            (2, 64) => Elem::F64,
            (0, 32) => Elem::I32,
            (0, 64) => Elem::I64,
            (6, 8) => Elem::Bool,
            (1, 8) => Elem::U8,
            _ => Elem::Other,
        }
    }

    /// The torch name, for messages.
    pub(crate) fn torch_name(self) -> &'static str {
        match self {
            Elem::F32 => "torch.float32",
            Elem::F16 => "torch.float16",
            Elem::BF16 => "torch.bfloat16",
            Elem::F64 => "torch.float64",
            Elem::I32 => "torch.int32",
            Elem::I64 => "torch.int64",
            Elem::Bool => "torch.bool",
            Elem::U8 => "torch.uint8",
            Elem::Other => "an unsupported dtype",
        }
    }

    fn size(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 => 4,
            Elem::F16 | Elem::BF16 => 2,
            Elem::F64 | Elem::I64 => 8,
            Elem::Bool | Elem::U8 | Elem::Other => 1,
        }
    }

    /// The float dtypes of logits / hidden states, as the core crate's [`DType`].
    pub(crate) fn float(self) -> Option<moe_router::DType> {
        match self {
            Elem::F32 => Some(moe_router::DType::F32),
            Elem::F16 => Some(moe_router::DType::F16),
            Elem::BF16 => Some(moe_router::DType::BF16),
            _ => None,
        }
    }
}

/// A Rust element type a tensor can be viewed as: every bit pattern is a valid value.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    const ELEM: Elem;
}
impl Element for f32 {
    const ELEM: Elem = Elem::F32;
}
impl Element for half::f16 {
    const ELEM: Elem = Elem::F16;
}
impl Element for half::bf16 {
    const ELEM: Elem = Elem::BF16;
}
impl Element for i32 {
    const ELEM: Elem = Elem::I32;
}
impl Element for i64 {
    const ELEM: Elem = Elem::I64;
}
impl Element for u8 {
    const ELEM: Elem = Elem::Bool;
}

/// Where the tensors of a call live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Device {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

static TENSOR_TYPE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static TO_DLPACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `torch.<path>` (dotted), looked up once per process.
pub(crate) fn torch_attr<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyAny>>,
    path: &str,
) -> PyResult<&'py Bound<'py, PyAny>> {
    cell.get_or_try_init(py, || {
        let mut obj = py.import("torch")?.into_any();
        for part in path.split('.') {
            obj = obj.getattr(part)?;
        }
        Ok::<_, PyErr>(obj.unbind())
    })
    .map(|f| f.bind(py))
}

/// One tensor argument of a call, described by its DLPack capsule (which keeps the
/// storage alive while this value lives).
pub(crate) struct Tensor<'py> {
    name: &'static str,
    _capsule: Bound<'py, PyCapsule>,
    data: u64,
    device: Device,
    elem: Elem,
    shape: Vec<usize>,
    numel: usize,
    output: bool,
}

impl<'py> Tensor<'py> {
    fn new(op: &str, name: &'static str, obj: &Bound<'py, PyAny>, output: bool) -> PyResult<Self> {
        let py = obj.py();
        if !obj.is_instance(torch_attr(py, &TENSOR_TYPE, "Tensor")?)? {
            return Err(PyTypeError::new_err(format!(
                "moe_router.{op}: `{name}` must be a torch.Tensor, got {}",
                obj.get_type().name()?
            )));
        }
        // DLPack carries no negation bit: a lazily negated view (`x._neg_view()`) would be
        // read as its un-negated storage. Such views are refused, not misread.
        if obj.call_method0("is_neg")?.is_truthy()? {
            return Err(value_error(
                op,
                format_args!("`{name}` is a negated view; pass `{name}.resolve_neg()`"),
            ));
        }
        let capsule = torch_attr(py, &TO_DLPACK, "_C._to_dlpack")?
            .call1((obj,))
            .map_err(|e| {
                value_error(
                    op,
                    format_args!(
                    "`{name}` cannot be read as a dense strided tensor ({e}); pass a dense CPU or \
                     CUDA tensor"
                ),
                )
            })?;
        let capsule = capsule.cast_into::<PyCapsule>().map_err(|_| {
            internal_error(
                op,
                format_args!("torch._C._to_dlpack gave no capsule for `{name}`"),
            )
        })?;
        // SAFETY: `capsule` is a live capsule object; `PyCapsule_GetPointer` checks its
        // name and returns null (with an exception set) if it is not "dltensor".
        let ptr =
            unsafe { pyo3::ffi::PyCapsule_GetPointer(capsule.as_ptr(), c"dltensor".as_ptr()) };
        if ptr.is_null() {
            let cause = PyErr::take(py).map(|e| e.to_string()).unwrap_or_default();
            return Err(internal_error(
                op,
                format_args!("`{name}`: torch gave a DLPack capsule that cannot be read ({cause})"),
            ));
        }
        // SAFETY: a "dltensor" capsule holds a `DLManagedTensor*` that stays valid until
        // the capsule's destructor runs (the capsule is owned by the returned value), and
        // its `shape` / `strides` arrays hold `ndim` entries each (`strides` may be null:
        // compact row-major).
        let (data, device, elem, shape, strides) = unsafe {
            let m = &*(ptr as *const DlManagedTensor);
            let t = &m.dl_tensor;
            let ndim = usize::try_from(t.ndim).unwrap_or(0);
            let shape: &[i64] = if ndim == 0 {
                &[]
            } else {
                std::slice::from_raw_parts(t.shape, ndim)
            };
            let strides: Option<&[i64]> = (!t.strides.is_null() && ndim > 0)
                .then(|| std::slice::from_raw_parts(t.strides, ndim));
            (
                (t.data as u64).wrapping_add(t.byte_offset),
                t.device,
                Elem::from_dl(t.dtype),
                shape.to_vec(),
                strides.map(<[i64]>::to_vec),
            )
        };
        let device = match device.device_type {
            DL_CPU => Device::Cpu,
            DL_CUDA => Device::Cuda(usize::try_from(device.device_id).unwrap_or(0)),
            other => {
                return Err(value_error(
                    op,
                    format_args!(
                        "`{name}` is on a device of DLPack type {other}; only CPU and CUDA tensors \
                         are supported"
                    ),
                ))
            }
        };
        let shape: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
        let numel = shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| {
                n.checked_mul(elem.size())
                    .is_some_and(|b| b <= isize::MAX as usize)
            })
            .ok_or_else(|| {
                value_error(
                    op,
                    format_args!("`{name}` has more elements than memory holds"),
                )
            })?;
        if let (Some(strides), true) = (strides, numel > 1) {
            let mut expect = 1i64;
            for (&d, &s) in shape.iter().zip(&strides).rev() {
                if d != 1 && s != expect {
                    return Err(value_error(
                        op,
                        format_args!(
                            "`{name}` is not contiguous (shape {shape:?}, strides {strides:?}); pass \
                             `{name}.contiguous()`"
                        ),
                    ));
                }
                expect = expect.saturating_mul(d as i64);
            }
        }
        if numel > 0 {
            if data == 0 {
                return Err(internal_error(
                    op,
                    format_args!("`{name}` has elements but a null data pointer"),
                ));
            }
            if data % elem.size() as u64 != 0 {
                return Err(value_error(
                    op,
                    format_args!("`{name}` has a data pointer {data:#x} not aligned to its element size; pass `{name}.clone()`"),
                ));
            }
        }
        Ok(Tensor {
            name,
            _capsule: capsule,
            data,
            device,
            elem,
            shape,
            numel,
            output,
        })
    }

    /// The argument's name.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// Element type.
    pub(crate) fn elem(&self) -> Elem {
        self.elem
    }

    /// Shape.
    pub(crate) fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The float dtype of logits / hidden states (`float32`, `float16`, `bfloat16`), or
    /// `TypeError`.
    pub(crate) fn float(&self, op: &str) -> PyResult<moe_router::DType> {
        self.elem.float().ok_or_else(|| {
            PyTypeError::new_err(format!("moe_router.{op}: `{}` has dtype {}; valid dtypes are torch.float32, torch.float16, torch.bfloat16",
                self.name,
                self.elem.torch_name()
            ))
        })
    }

    /// `TypeError` unless the dtype is `elem`.
    pub(crate) fn expect_elem(&self, op: &str, elem: Elem) -> PyResult<()> {
        if self.elem != elem {
            return Err(PyTypeError::new_err(format!(
                "moe_router.{op}: `{}` has dtype {}, expected {}",
                self.name,
                self.elem.torch_name(),
                elem.torch_name()
            )));
        }
        Ok(())
    }

    /// The sizes of a tensor of `N` dimensions, or `ValueError`.
    pub(crate) fn dims<const N: usize>(&self, op: &str) -> PyResult<[usize; N]> {
        <[usize; N]>::try_from(self.shape.as_slice()).map_err(|_| {
            value_error(
                op,
                format_args!(
                    "`{}` has shape {:?}, expected {N} dimension{}",
                    self.name,
                    self.shape,
                    if N == 1 { "" } else { "s" }
                ),
            )
        })
    }

    /// `TypeError` / `ValueError` unless the tensor has dtype `elem` and shape `shape`.
    pub(crate) fn expect(&self, op: &str, elem: Elem, shape: &[usize]) -> PyResult<()> {
        self.expect_elem(op, elem)?;
        if self.shape != shape {
            return Err(value_error(
                op,
                format_args!(
                    "`{}` has shape {:?}, expected {shape:?}",
                    self.name, self.shape
                ),
            ));
        }
        Ok(())
    }

    /// The device address of the data (CUDA calls; the kernels never read past the
    /// shape checked above).
    pub(crate) fn addr(&self) -> u64 {
        if self.numel == 0 {
            0
        } else {
            self.data
        }
    }

    /// The data as a raw-entry buffer (CUDA calls): its address and element count. The
    /// core's raw entries check the count against the sizes of the call with the op's
    /// validator, so a tensor of the wrong size is an error there too, never an
    /// out-of-bounds access.
    pub(crate) fn dev_buf(&self) -> moe_router::cuda::DevBuf {
        moe_router::cuda::DevBuf::new(self.addr(), self.numel)
    }

    fn check_view<T: Element>(&self, op: &str, call: &Call) -> PyResult<()> {
        if call.device != Device::Cpu || !call.host_memory {
            return Err(internal_error(
                op,
                format_args!("`{}` viewed on the host for a CUDA call", self.name),
            ));
        }
        if T::ELEM != self.elem && !(T::ELEM == Elem::Bool && self.elem == Elem::U8) {
            return Err(internal_error(
                op,
                format_args!(
                    "`{}` ({}) viewed as {:?}",
                    self.name,
                    self.elem.torch_name(),
                    T::ELEM
                ),
            ));
        }
        Ok(())
    }

    /// The data as a slice (CPU calls).
    pub(crate) fn slice<T: Element>(&self, op: &str, call: &Call) -> PyResult<&[T]> {
        self.check_view::<T>(op, call)?;
        if self.numel == 0 {
            return Ok(&[]);
        }
        // SAFETY: the DLPack capsule held by `self` describes a live, C-contiguous CPU
        // allocation of `numel` elements of `self.elem` (checked: non-null, aligned, byte
        // size within `isize`), alive while `self` (and so the returned borrow) lives;
        // `T` has the same size and every bit pattern valid. `call` proves that the
        // overlap check ran: no output of the call overlaps this tensor.
        Ok(unsafe { std::slice::from_raw_parts(self.data as usize as *const T, self.numel) })
    }

    /// The data as an exclusive slice (CPU calls; outputs only).
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn slice_mut<T: Element>(&self, op: &str, call: &Call) -> PyResult<&mut [T]> {
        self.check_view::<T>(op, call)?;
        if !self.output {
            return Err(internal_error(
                op,
                format_args!("`{}` is an input, written to", self.name),
            ));
        }
        if self.numel == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as `slice`; in addition `call` proves that this output overlaps no
        // other tensor of the call, and each output is viewed once per call by the
        // bindings, so this is the only reference to these bytes in this process while
        // the op runs.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.data as usize as *mut T, self.numel) })
    }

    /// A bool mask (torch.bool, one byte per element) as `bool`s: bytes other than 0 / 1
    /// are read as `byte != 0` into a copy.
    pub(crate) fn bools(&self, op: &str, call: &Call) -> PyResult<std::borrow::Cow<'_, [bool]>> {
        let bytes: &[u8] = self.slice(op, call)?;
        if bytes.iter().all(|&b| b <= 1) {
            // SAFETY: every byte is 0 or 1, exactly the valid `bool` values; `bool` has
            // size and alignment 1; the lifetime is the byte slice's.
            Ok(std::borrow::Cow::Borrowed(unsafe {
                std::slice::from_raw_parts(bytes.as_ptr() as *const bool, bytes.len())
            }))
        } else {
            Ok(std::borrow::Cow::Owned(
                bytes.iter().map(|&b| b != 0).collect(),
            ))
        }
    }

    /// An output bool mask: zero-filled, then handed out as `&mut [bool]`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn bools_mut(&self, op: &str, call: &Call) -> PyResult<&mut [bool]> {
        let bytes: &mut [u8] = self.slice_mut(op, call)?;
        bytes.fill(0);
        // SAFETY: every byte is now 0 (`false`); `bool` has size and alignment 1.
        Ok(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut bool, bytes.len()) })
    }
}

// --------------------------------------------------------------------------------------
// The tensors of one call

/// Collects the tensors of one call; [`Args::finish`] checks them together.
pub(crate) struct Args<'py> {
    op: &'static str,
    _py: PhantomData<&'py ()>,
    seen: Vec<(&'static str, Device, u64, usize, bool)>,
}

/// Proof that the tensors of a call passed the joint checks, and where the call runs.
pub(crate) struct Call {
    /// The one device of the call's tensors.
    pub(crate) device: Device,
    /// Whether host code may read the tensors' memory (CPU tensors run on the CPU).
    host_memory: bool,
    /// CPU tensors sent down the CUDA branch (emulator tests).
    emulated: bool,
    /// CUDA: the stream to launch on (torch's current stream of the device).
    pub(crate) stream: u64,
}

static EMPTY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

impl Call {
    /// Whether the op runs its CPU reference.
    pub(crate) fn on_cpu(&self) -> bool {
        self.device == Device::Cpu
    }

    /// A scratch tensor of `len` elements of `dtype` (a torch dtype name such as
    /// `"int32"`) on the call's device, from torch's allocator (so it is safe inside a
    /// CUDA graph capture and freed after the work queued on the stream).
    pub(crate) fn scratch<'py>(
        &self,
        py: Python<'py>,
        op: &'static str,
        name: &'static str,
        dtype: &str,
        len: usize,
    ) -> PyResult<Tensor<'py>> {
        let device = match self.device {
            Device::Cuda(i) if !self.host_memory && !self.emulated => format!("cuda:{i}"),
            _ => "cpu".to_string(),
        };
        let kw = PyDict::new(py);
        kw.set_item("dtype", py.import("torch")?.getattr(dtype)?)?;
        kw.set_item("device", device)?;
        let t = torch_attr(py, &EMPTY, "empty")?.call((len,), Some(&kw))?;
        Tensor::new(op, name, &t, true)
    }
}

impl<'py> Args<'py> {
    pub(crate) fn new(op: &'static str) -> Self {
        Args {
            op,
            _py: PhantomData,
            seen: Vec::new(),
        }
    }

    fn add(&mut self, t: &Tensor<'py>) {
        self.seen
            .push((t.name, t.device, t.data, t.numel * t.elem.size(), t.output));
    }

    /// An input tensor.
    pub(crate) fn input(
        &mut self,
        name: &'static str,
        obj: &Bound<'py, PyAny>,
    ) -> PyResult<Tensor<'py>> {
        let t = Tensor::new(self.op, name, obj, false)?;
        self.add(&t);
        Ok(t)
    }

    /// An optional input tensor (`None` passes through).
    pub(crate) fn opt_input(
        &mut self,
        name: &'static str,
        obj: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Option<Tensor<'py>>> {
        obj.filter(|o| !o.is_none())
            .map(|o| self.input(name, o))
            .transpose()
    }

    /// An output tensor: the op writes it (it must overlap no other tensor of the call).
    pub(crate) fn output(
        &mut self,
        name: &'static str,
        obj: &Bound<'py, PyAny>,
    ) -> PyResult<Tensor<'py>> {
        let t = Tensor::new(self.op, name, obj, true)?;
        self.add(&t);
        Ok(t)
    }

    /// Check the tensors together (one device; no output overlapping another tensor)
    /// and say where the call runs.
    pub(crate) fn finish(self, py: Python<'py>) -> PyResult<Call> {
        let op = self.op;
        let mut device: Option<(&str, Device)> = None;
        for &(name, dev, ..) in &self.seen {
            match device {
                None => device = Some((name, dev)),
                Some((first, d)) if d != dev => {
                    return Err(value_error(
                        op,
                        format_args!(
                            "`{name}` is on {dev} but `{first}` is on {d}; put all tensors on one device"
                        ),
                    ))
                }
                _ => {}
            }
        }
        for (i, a) in self.seen.iter().enumerate() {
            for b in &self.seen[i + 1..] {
                if !(a.4 || b.4) || a.3 == 0 || b.3 == 0 {
                    continue;
                }
                let (a0, b0) = (a.2 as u128, b.2 as u128);
                if a0 < b0 + b.3 as u128 && b0 < a0 + a.3 as u128 {
                    let (out, other) = if a.4 { (a.0, b.0) } else { (b.0, a.0) };
                    return Err(value_error(
                        op,
                        format_args!(
                            "output `{out}` overlaps `{other}`; outputs must be separate, freshly allocated tensors"
                        ),
                    ));
                }
            }
        }
        let device = device.map_or(Device::Cpu, |d| d.1);
        call_for(py, op, device)
    }
}

fn call_for(py: Python<'_>, op: &str, device: Device) -> PyResult<Call> {
    match device {
        Device::Cpu if crate::device::emulated_cuda() => Ok(Call {
            device: Device::Cuda(0),
            host_memory: false,
            emulated: true,
            stream: 0,
        }),
        Device::Cpu => Ok(Call {
            device,
            host_memory: true,
            emulated: false,
            stream: 0,
        }),
        Device::Cuda(i) => Ok(Call {
            device,
            host_memory: false,
            emulated: false,
            stream: crate::device::current_stream(py, op, i)?,
        }),
    }
}

// --------------------------------------------------------------------------------------
// Options passed as keyword arguments

/// The keyword options of a call: each read once by name; unknown names are an error.
pub(crate) struct Opts<'py> {
    op: &'static str,
    dict: Option<Bound<'py, PyDict>>,
}

impl<'py> Opts<'py> {
    pub(crate) fn new(op: &'static str, dict: Option<&Bound<'py, PyDict>>) -> Self {
        Opts {
            op,
            dict: dict.cloned(),
        }
    }

    fn take(&self, name: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
        let Some(d) = &self.dict else { return Ok(None) };
        let v = d.get_item(name)?;
        if v.is_some() {
            d.del_item(name)?;
        }
        Ok(v.filter(|v| !v.is_none()))
    }

    fn convert<T: for<'a> FromPyObject<'a, 'py>>(
        &self,
        name: &str,
        v: Bound<'py, PyAny>,
        what: &str,
    ) -> PyResult<T> {
        v.extract::<T>().map_err(|e| {
            let e: PyErr = e.into();
            let shown = v
                .repr()
                .map(|r| r.to_string())
                .unwrap_or_else(|_| "?".into());
            // An int of the right type but outside the target's range is an OverflowError
            // from PyO3: a value error here; anything else (a str, an int for a bool) is a
            // type error.
            if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(v.py()) {
                value_error(
                    self.op,
                    format_args!("`{name}` = {shown} is out of range: expected {what}"),
                )
            } else {
                PyTypeError::new_err(format!(
                    "moe_router.{}: `{name}` must be {what}, got {shown}",
                    self.op
                ))
            }
        })
    }

    /// A positional argument converted with the options' rules (messages name it).
    pub(crate) fn arg<T: for<'a> FromPyObject<'a, 'py>>(
        &self,
        name: &str,
        v: &Bound<'py, PyAny>,
        what: &str,
    ) -> PyResult<T> {
        self.convert(name, v.clone(), what)
    }

    /// A required option.
    pub(crate) fn req<T: for<'a> FromPyObject<'a, 'py>>(
        &self,
        name: &str,
        what: &str,
    ) -> PyResult<T> {
        match self.take(name)? {
            Some(v) => self.convert(name, v, what),
            None => Err(PyTypeError::new_err(format!(
                "moe_router.{}: missing option `{name}` ({what})",
                self.op
            ))),
        }
    }

    /// An optional option (`None` or absent → `None`).
    pub(crate) fn opt<T: for<'a> FromPyObject<'a, 'py>>(
        &self,
        name: &str,
        what: &str,
    ) -> PyResult<Option<T>> {
        self.take(name)?
            .map(|v| self.convert(name, v, what))
            .transpose()
    }

    /// An option with a default.
    pub(crate) fn or<T: for<'a> FromPyObject<'a, 'py>>(
        &self,
        name: &str,
        what: &str,
        default: T,
    ) -> PyResult<T> {
        Ok(self.opt(name, what)?.unwrap_or(default))
    }

    /// `TypeError` if any option was not read.
    pub(crate) fn done(self) -> PyResult<()> {
        if let Some(d) = &self.dict {
            if let Some((k, _)) = d.iter().next() {
                return Err(PyTypeError::new_err(format!(
                    "moe_router.{}: unexpected option `{k}`",
                    self.op
                )));
            }
        }
        Ok(())
    }
}

/// Run `f` with the GIL released, turning a panic (never expected: every input is
/// validated first) into a `RuntimeError` instead of letting it unwind into Python.
pub(crate) fn run<R: Send>(
    py: Python<'_>,
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
