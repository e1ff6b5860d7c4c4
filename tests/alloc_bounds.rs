//! Memory before validation: every argument is checked before any allocation whose
//! size an argument sets, and working memory stays within the outputs.
//!
//! This binary counts the bytes the process has allocated (a counting global
//! allocator) and refuses any single allocation above 1 GiB (the process then aborts
//! with "memory allocation of N bytes failed", a failure, without touching that
//! memory). The tests take one lock, so their peaks do not mix.

use moe_router::*;
use ndarray::Array2;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

const REFUSE_ABOVE: usize = 1 << 30;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, SeqCst) + n;
    PEAK.fetch_max(now, SeqCst);
}

// SAFETY: forwards to the system allocator unchanged (or returns null, which callers
// of `alloc` must handle), only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc`.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc_zeroed`.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract for `dealloc`.
        unsafe { System.dealloc(p, l) };
        CURRENT.fetch_sub(l.size(), SeqCst);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        if new_size > REFUSE_ABOVE {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `realloc`.
        let q = unsafe { System.realloc(p, l, new_size) };
        if !q.is_null() {
            if new_size >= l.size() {
                grew(new_size - l.size());
            } else {
                CURRENT.fetch_sub(l.size() - new_size, SeqCst);
            }
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

static LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` and returns its result and the peak number of bytes it had allocated
/// above what was live when it started.
fn peak_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let base = CURRENT.load(SeqCst);
    PEAK.store(base, SeqCst);
    let r = f();
    (r, PEAK.load(SeqCst).saturating_sub(base))
}

const SMALL: usize = 1 << 20;

#[test]
fn expert_mask_overflow_allocates_nothing() {
    let cfg = DropoutConfig::new(0.5, 1, 2);
    // 2^31 * 2 mask entries: 4 GiB of bools if allocated before the check.
    let (r, peak) = peak_of(|| expert_mask(1 << 31, 2, 1, &cfg));
    assert!(
        matches!(
            r,
            Err(Error::Overflow {
                op: "expert_mask",
                ..
            })
        ),
        "{r:?}"
    );
    assert!(
        peak < SMALL,
        "expert_mask allocated {peak} bytes before failing"
    );
    // The sizing call for callers that allocate the mask themselves.
    let (r, peak) = peak_of(|| expert_mask_len(1 << 31, 2, 1, &cfg));
    assert!(matches!(r, Err(Error::Overflow { .. })), "{r:?}");
    assert!(peak < SMALL);
    assert_eq!(expert_mask_len(4, 8, 2, &cfg), Ok(32));
    let err = expert_mask_len(4, 8, 9, &cfg).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "topk", .. }),
        "{err}"
    );
}

#[test]
fn expert_choice_row_overflow_allocates_nothing() {
    let logits = Array2::<f32>::zeros((4, 8));
    // 8 * 2^28 = 2^31 rows: an overflow of the i32 rows, 16 GiB of outputs if the
    // row buffers were allocated first.
    let (r, peak) = peak_of(|| expert_choice(logits.view(), 1 << 28));
    match r {
        Err(Error::Overflow {
            op: "expert_choice",
            what,
            ..
        }) => assert_eq!(what, "num_experts * capacity"),
        other => panic!("expected an overflow error, got {other:?}"),
    }
    assert!(
        peak < SMALL,
        "expert_choice allocated {peak} bytes before failing"
    );
    let (r, peak) = peak_of(|| expert_choice_num_rows(4, 8, 1 << 28));
    assert!(matches!(r, Err(Error::Overflow { .. })), "{r:?}");
    assert!(peak < SMALL);
    assert_eq!(expert_choice_num_rows(4, 8, 3), Ok(24));
    assert!(matches!(
        expert_choice_num_rows(4, 0, 3),
        Err(Error::InvalidArgument {
            arg: "num_experts",
            ..
        })
    ));
}

#[test]
fn expert_choice_working_memory_is_within_the_outputs() {
    // capacity far above num_tokens: the row buffers are E * capacity (the documented
    // pad-to-capacity layout), and nothing else of that size may be allocated.
    let (t, e, cap) = (4usize, 8usize, 1usize << 20);
    let logits = Array2::from_shape_fn((t, e), |(i, j)| (i * e + j) as f32 * 0.1);
    let (out, peak) = peak_of(|| expert_choice(logits.view(), cap).unwrap());
    let outputs = 2 * t * e * 4 + 2 * e * cap * 4 + (2 * e + 1) * 4;
    assert!(
        peak <= outputs + (64 << 10),
        "expert_choice peaked at {peak} bytes for {outputs} bytes of outputs"
    );
    assert_eq!(out.tokens_per_expert.to_vec(), vec![t as i32; e]);
    assert_eq!(out.row_to_token.len(), e * cap);
    assert!(out
        .row_to_token
        .iter()
        .skip(t)
        .take(cap - t)
        .all(|&x| x == -1));
}

#[test]
fn dispatch_checks_indices_before_allocating_rows() {
    // Regression: `dispatch` allocated `row_to_token` (E * capacity rows, 4 GiB here)
    // before it looked at the indices; a bad index must fail first.
    let (e, cap) = (1usize << 20, 1usize << 10);
    let cfg = DispatchConfig::new(e)
        .capacity(cap)
        .layout(DispatchLayout::PadToCapacity);
    let indices = Array2::from_elem((1, 1), -5i32);
    let weights = Array2::from_elem((1, 1), 1.0f32);
    let (r, peak) = peak_of(|| dispatch(indices.view(), weights.view(), &cfg));
    let err = r.unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "indices", .. }),
        "{err}"
    );
    assert!(
        peak < SMALL,
        "dispatch allocated {peak} bytes before failing"
    );
    // Weights of the wrong length, too.
    let weights = Array2::from_elem((1, 2), 1.0f32);
    let indices = Array2::from_elem((1, 2), 0i32);
    let (r, peak) = peak_of(|| dispatch(indices.view(), weights.view(), &cfg));
    assert!(r.is_err());
    assert!(
        peak < SMALL,
        "dispatch allocated {peak} bytes before failing"
    );
}
