"""aux_loss, seq_aux_loss, global_aux_loss against the float64 references in reference.py
(values and gradients), HF Mixtral's formula, padding masks, f16/bf16, total_tokens rules;
the checks every loss shares (half precision, zero tokens) run z_loss too."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch

import moe_router as mr
import reference as ref
from conftest import assert_close_f32


def _grads(fn_op, fn_ref, z):
    zo = z.clone().requires_grad_()
    lo = fn_op(zo)
    lo.backward()
    z64 = z.double().requires_grad_()
    lr = fn_ref(z64)
    lr.backward()
    return lo, lr, zo.grad, z64.grad


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_aux_loss_value_and_gradient(score_function, k, masked):
    t, e = 41, 12
    z = ref.tie_free_logits(t, e, seed=k + 10 * masked)
    mask = (torch.arange(t) % 5 == 3) if masked else None
    lo, lr, go, gr = _grads(
        lambda x: mr.aux_loss(x, k, score_function=score_function, coeff=0.01, padding_mask=mask),
        lambda x: ref.aux_loss(x, k, score_function=score_function, coeff=0.01, padding_mask=mask),
        z,
    )
    assert lo.dtype == torch.float32 and lo.shape == ()
    assert_close_f32(lo, lr)
    assert_close_f32(go, gr, rtol=1e-5, atol=1e-8)
    if masked:
        assert (go[mask] == 0).all(), "padding tokens get no gradient"


def test_aux_loss_with_caller_counts_and_total_tokens():
    t, e, k = 16, 8, 2
    z = ref.tie_free_logits(t, e, seed=3)
    counts = torch.tensor([9, 0, 3, 7, 1, 4, 2, 6])
    for total in (None, 100, torch.tensor(100)):
        lo, lr, go, gr = _grads(
            lambda x: mr.aux_loss(x, k, counts=counts, total_tokens=total),
            lambda x: ref.aux_loss(x, k, counts=counts, total_tokens=None if total is None else int(total)),
            z,
        )
        assert_close_f32(lo, lr)
        assert_close_f32(go, gr, rtol=1e-5, atol=1e-8)
    # int32 counts are accepted and mean the same
    assert torch.equal(mr.aux_loss(z, k, counts=counts.int()), mr.aux_loss(z, k, counts=counts))


def test_aux_loss_equals_hf_mixtral_with_coeff_k():
    t, e, k = 30, 8, 2
    z = ref.tie_free_logits(t, e, seed=4)
    attention = torch.arange(t) % 7 != 0
    assert_close_f32(mr.aux_loss(z, k, coeff=float(k)), ref.hf_mixtral_load_balancing(z.double(), k))
    assert_close_f32(
        mr.aux_loss(z, k, coeff=float(k), padding_mask=~attention),
        ref.hf_mixtral_load_balancing(z.double(), k, attention_mask=attention),
    )


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_seq_aux_loss_value_and_gradient(score_function):
    b, s, e, k = 4, 9, 8, 2
    z = ref.tie_free_logits(b * s, e, seed=6)
    mask = torch.zeros(b * s, dtype=torch.bool)
    mask[s : 2 * s] = True  # one sequence entirely padding: excluded from the mean
    mask[-2:] = True
    for m in (None, mask):
        lo, lr, go, gr = _grads(
            lambda x: mr.seq_aux_loss(x, k, s, score_function=score_function, coeff=0.1, padding_mask=m),
            lambda x: ref.seq_aux_loss(x, k, s, score_function=score_function, coeff=0.1, padding_mask=m),
            z,
        )
        assert_close_f32(lo, lr)
        assert_close_f32(go, gr, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_losses_from_half_precision_logits(dtype):
    """The loss is f32 computed from the exact f16/bf16 inputs (f32 tolerance vs the f64
    reference of the same inputs); gradients, rounded to the input dtype, must be within
    2x the error of PyTorch's own computation in that dtype."""
    t, e, k = 24, 8, 2
    z = ref.tie_free_logits(t, e, seed=12, dtype=dtype)
    for op_fn, ref_fn in (
        (lambda x: mr.aux_loss(x, k, coeff=0.5), lambda x: ref.aux_loss(x, k, coeff=0.5)),
        (lambda x: mr.z_loss(x, coeff=0.5), lambda x: ref.z_loss(x, coeff=0.5)),
        (lambda x: mr.seq_aux_loss(x, k, 6), lambda x: ref.seq_aux_loss(x, k, 6)),
    ):
        lo, lr, go, gr = _grads(op_fn, ref_fn, z)
        assert_close_f32(lo, lr)
        assert go.dtype == dtype
        zt = z.clone().requires_grad_()
        ref_fn(zt).backward()
        err_op = (go.double() - gr).abs().max().item()
        err_torch = (zt.grad.double() - gr).abs().max().item()
        assert err_op <= 2 * err_torch + 1e-7, (err_op, err_torch)


def test_losses_of_zero_tokens_are_zero():
    z = torch.zeros(0, 4, requires_grad=True)
    for loss in (mr.aux_loss(z, 2), mr.z_loss(z), mr.seq_aux_loss(z, 2, 3)):
        assert loss.item() == 0.0
        loss.backward()
        assert z.grad.shape == (0, 4)


def test_global_aux_loss_without_process_group_is_aux_loss():
    z = ref.tie_free_logits(10, 8, seed=1)
    assert torch.equal(mr.global_aux_loss(z, 2, coeff=0.3), mr.aux_loss(z, 2, coeff=0.3))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_WORKER = r"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
import moe_router as mr, reference as ref
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
z = ref.tie_free_logits(20, 8, seed=99)  # the same global batch on both ranks
mask = torch.arange(20) % 6 == 5
local = slice(0, 12) if rank == 0 else slice(12, 20)
zl = z[local].clone().requires_grad_()
loss = mr.global_aux_loss(zl, 2, coeff=0.1, padding_mask=mask[local].contiguous())
loss.backward()
out = torch.cat([loss.detach().reshape(1), zl.grad.reshape(-1)])
dist.all_reduce(out[:1])
if rank == 0:
    torch.save({"sum": out[0], "grad0": zl.grad}, sys.argv[4])
else:
    torch.save({"grad1": zl.grad}, sys.argv[4] + ".1")
dist.destroy_process_group()
"""


def test_global_aux_loss_over_two_ranks_sums_to_the_whole_batch_loss(tmp_path):
    """Two gloo ranks on loopback, each with part of one batch: the per-rank losses
    (global counts and token count, local scores) sum to aux_loss of the whole batch,
    and each rank's gradient is that of the whole-batch loss on its tokens."""
    import subprocess

    port = str(_free_port())
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = str(tmp_path / "out.pt")
    here = os.path.dirname(__file__)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, here, out]) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    res, res1 = torch.load(out), torch.load(out + ".1")
    z = ref.tie_free_logits(20, 8, seed=99)
    mask = torch.arange(20) % 6 == 5
    z64 = z.double().requires_grad_()
    whole = ref.aux_loss(z64, 2, coeff=0.1, padding_mask=mask)
    whole.backward()
    assert_close_f32(res["sum"], whole)
    assert_close_f32(torch.cat([res["grad0"], res1["grad1"]]), z64.grad, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------
# Regressions


@pytest.mark.parametrize("total", [1, 6, torch.tensor(1), torch.tensor(600, dtype=torch.int32)], ids=str)
def test_total_tokens_without_counts_is_an_error(total):
    """`total_tokens` is what the caller's `counts` cover. Without counts the loss used this
    batch's own counts with that total (a loss (T / total)**2 off: 36x for these 6 tokens
    and total_tokens=1) and returned it; now the core rejects it, naming both."""
    z = ref.tie_free_logits(6, 8, seed=2)
    with pytest.raises(ValueError, match=r"total_tokens.*requires `counts`"):
        mr.aux_loss(z, 2, total_tokens=total)
    t = torch.tensor(total) if isinstance(total, int) else total
    with pytest.raises(ValueError, match=r"total_tokens.*requires `counts`"):
        torch.ops.moe_router.aux_loss(z, None, None, t.long(), 2, "softmax", 1.0)
    # With counts it is accepted and means what it says.
    counts = torch.tensor([1, 2, 0, 3, 1, 1, 2, 2])
    lo = mr.aux_loss(z, 2, counts=counts, total_tokens=total)
    assert_close_f32(lo, ref.aux_loss(z.double(), 2, counts=counts, total_tokens=int(total)))


def test_global_aux_loss_reads_no_tensor_value_on_the_host(monkeypatch):
    """global_aux_loss's summed T_total is a tensor; the op used to read it with int() (a
    host sync on CUDA). Now it goes to the native call where it lives (the CUDA kernels
    read it in device memory). The Python path is the same on every device, so on the CPU:
    no tensor value may be read in Python during forward and backward."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        z = ref.tie_free_logits(12, 8, seed=4)
        mask = torch.arange(12) % 5 == 2

        def host_read(*args, **kwargs):
            raise AssertionError("a tensor value was read on the host")

        x = z.clone().requires_grad_()
        with monkeypatch.context() as mp:
            for name in ("__int__", "__index__", "__float__", "__bool__", "item", "tolist"):
                mp.setattr(torch.Tensor, name, host_read)
            loss = mr.global_aux_loss(x, 2, coeff=0.2, padding_mask=mask)
            loss.backward()
    finally:
        dist.destroy_process_group()
    # One rank: the global loss is the local one.
    lo, lr, go, gr = _grads(
        lambda y: mr.aux_loss(y, 2, coeff=0.2, padding_mask=mask),
        lambda y: ref.aux_loss(y, 2, coeff=0.2, padding_mask=mask),
        z,
    )
    assert_close_f32(loss.detach(), lr)
    assert_close_f32(x.grad, gr, rtol=1e-5, atol=1e-8)


def test_host_total_tokens_for_device_logits_is_checked_on_the_host():
    # An int total_tokens (carried as a CPU tensor) with logits on another device is filled
    # in there without a copy; the kernels cannot reject a device value below 1, so the
    # host value is checked first, as the CPU path does. ("meta" stands for CUDA here.)
    from moe_router import ops

    dev = torch.device("meta")
    with pytest.raises(ValueError, match="total_tokens"):
        ops._total_tokens("aux_loss", torch.tensor(0), dev)
    t = ops._total_tokens("aux_loss", torch.tensor(7, dtype=torch.int32), dev)
    assert t.device == dev and t.dtype == torch.int64 and t.shape == ()
