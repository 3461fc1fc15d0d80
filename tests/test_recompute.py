"""Selective gradient checkpointing (train/recompute.py): what the backward pass recomputes, and that it changes
no number."""

import json
from collections import Counter

import pytest
import torch
from conftest import run_ldm
from torch.utils._python_dispatch import TorchDispatchMode

from ldm_cli.train import recompute
from ldm_cli.train.config import TrainConfig
from ldm_cli.train.loop import train

aten = torch.ops.aten


class Ops(TorchDispatchMode):
    """How many times each aten operation ran while it was on."""

    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[func] += 1
        return func(*args, **(kwargs or {}))


def step(unet, mode: str):
    """One forward and backward of `unet` with checkpointing `mode`: (the ops its backward ran, the loss, the
    gradients)."""
    recompute.enable(unet, mode == "all", mode == "selective")
    unet.train().zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    loss = unet(x, torch.tensor([10, 500]), ctx).sample.square().mean()
    with Ops() as ops:
        loss.backward()
    return ops.seen, loss.item(), [p.grad.clone() for p in unet.parameters()]


def test_selective_checkpointing_recomputes_norms_and_pointwise_ops_not_convolutions_or_matmuls(unet):
    """Without checkpointing the backward pass reruns no forward op; with all of it recomputed it reruns the
    convolutions, matmuls and norms; selective reruns the GroupNorms and activations, and no more convolutions or
    matmuls than the gradients' own (a linear layer's gradient is itself a matmul). The loss and every gradient are
    the same to the bit in all three."""
    heavy = (aten.convolution.default, aten.mm.default, aten.addmm.default, aten.bmm.default)
    cheap = (aten.native_group_norm.default, aten.silu.default)
    ran = {mode: step(unet, mode) for mode in ("none", "all", "selective")}
    none, every, selective = (ran[m][0] for m in ("none", "all", "selective"))
    assert none[aten.convolution.default] == 0 and all(none[op] == 0 for op in cheap)
    assert every[aten.convolution.default] > 0 and sum(every[op] for op in heavy) > sum(none[op] for op in heavy)
    assert all(selective[op] == none[op] for op in heavy)
    assert all(selective[op] == every[op] > 0 for op in cheap)
    assert aten.convolution.default in recompute.KEPT and aten.native_group_norm.default not in recompute.KEPT
    for mode in ("all", "selective"):
        assert ran[mode][1] == ran["none"][1]
        assert all(torch.equal(a, b) for a, b in zip(ran[mode][2], ran["none"][2]))


def test_selective_checkpointing_trains_as_without_and_is_exclusive_with_the_full_one(shapes, tiny_model, tmp_path):
    base = dict(data_dir=str(shapes), model=str(tiny_model), max_steps=3, batch_size=2, lr=1e-3, seed=4,
                device="cpu", cache_dir=str(tmp_path / "cache"))
    runs = {}
    for name, kw in (("none", {}), ("selective", {"selective_checkpointing": True})):
        out = tmp_path / name
        train(TrainConfig(out_dir=str(out), **kw, **base))
        runs[name] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(runs["none"]) == 3 and runs["selective"] == runs["none"]
    assert "selective_checkpointing = true" in (tmp_path / "selective" / "config.toml").read_text()
    done = run_ldm("train", shapes, "--out", tmp_path / "both", "--gradient-checkpointing",
                   "--selective-checkpointing", "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == ["ldm: error: give --gradient-checkpointing (all recomputed) or "
                                                "--selective-checkpointing (norms and pointwise ops recomputed), "
                                                "not both"]
    assert not (tmp_path / "both").exists()


def compiled_step(unet, budget: float):
    """step(unet, "none") compiled under ldm's compile_limits with `budget`: (bytes the forward saved for the
    backward, loss, gradients). Through AOTAutograd's min-cut partitioner, as inductor partitions, without
    inductor's code generation (a minute a graph on 2 cores)."""
    from ldm_cli.train import fast

    torch._dynamo.reset()  # a fresh compile: the budget is read when the graph is partitioned
    unet.compile(backend="aot_eager_decomp_partition")
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if not isinstance(t, torch.nn.Parameter) else 0)
        return t

    with fast.compile_limits(budget), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss, grads = step(unet, "none")
    return sum(saved), loss, grads


@pytest.mark.slow
def test_selective_checkpointing_compiled_is_the_compilers_memory_budget(unet):
    """Compiled, selective checkpointing is the partitioner's activation memory budget: the compiled forward saves
    less for the backward than at the default budget, and the loss and gradients are the eager ones to float32
    rounding."""
    import copy

    eager = copy.deepcopy(unet)
    _, loss, grads = step(eager, "none")
    assert recompute.compiled_budget(False) == 1.0 and recompute.compiled_budget(True) == recompute.MEMORY_BUDGET < 1
    kept = {}
    for budget in (1.0, recompute.MEMORY_BUDGET):
        kept[budget], compiled_loss, compiled_grads = compiled_step(copy.deepcopy(unet), budget)
        assert compiled_loss == pytest.approx(loss, rel=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(compiled_grads, grads))
    assert 0 < kept[recompute.MEMORY_BUDGET] < 0.8 * kept[1.0]
    torch._dynamo.reset()


def test_eager_selective_checkpointing_on_cuda_says_what_was_measured_and_what_pays():
    """Eager on CUDA, the op policy measured no faster than checkpointing all (host-bound): the run says so once,
    naming both ways out; compiled, on a CPU or without the flag it says nothing."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    note = recompute.eager_note(True, False, cuda)
    assert note.startswith("note: --selective-checkpointing") and "--gradient-checkpointing" in note
    assert "--compile full" in note
    assert [recompute.eager_note(*args) for args in ((True, True, cuda), (True, False, cpu), (False, False, cuda))] \
        == [None, None, None]
