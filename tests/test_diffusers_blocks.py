"""The diffusers host's training forwards of FLUX's blocks (``hosts.diffusers_blocks``): the same
gradients as diffusers' own blocks (float64 reference), less kept for backward, fewer ops, and
diffusers' own forward wherever they do not apply."""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from metalora_core.formats.prior import make_prior
from metalora_core.hosts import diffusers_blocks
from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, FluxTextCond
from metalora_core.hosts.tiny import TINY_T5_LEN, TinyFluxConfig, build_tiny_flux_pipeline
from metalora_core.lora.flow import add_noise, flow_loss, velocity_target
from metalora_core.lora.layers import FluxDims
from metalora_core.train.profile import OpCounter, SavedTensors
from metalora_core.train.recipe import build_adapters
from metalora_core.hosts.diffusers_flux import encode_prompt
from test_core import _randomize_up, assert_matches_float64


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0, config=TinyFluxConfig(num_double=2, num_single=2))


@pytest.fixture(scope="module")
def cond(pipe) -> FluxTextCond:
    return encode_prompt(pipe, "a photo of a woman", max_sequence_length=TINY_T5_LEN)


def _adapters(pipe, preset="all", seed=0):
    dims = FluxDims.from_diffusers_config(pipe.transformer.config)
    prior = make_prior(dims, r1=8, preset=preset, generator=torch.Generator().manual_seed(3))
    adapters = build_adapters(dims, prior, rank=2, seed=seed)
    _randomize_up(adapters, scale=0.1)
    return adapters


def _data(batch: int):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(batch, 16, 8, 8, generator=g), torch.randn(batch, 16, 8, 8, generator=g),
            torch.tensor([0.6, 0.3][:batch]))


def _step(host, adapters, x0, noise, sigma, cond, *, measure=False):
    """(loss, saved bytes, OpCounter) of one training step, backward included; with ``measure``, of
    a second step (the first compares the blocks once)."""
    exclude = list(host.transformer.parameters()) + list(adapters.parameters())
    with host.training(), torch.enable_grad(), host.attach(adapters):
        for _ in range(2 if measure else 1):
            for p in adapters.parameters():
                p.grad = None
            saved, ops = SavedTensors(exclude=exclude), OpCounter()
            with ops if measure else contextlib.nullcontext():
                with saved:
                    loss = flow_loss(host.predict(add_noise(x0, noise, sigma), sigma, cond),
                                     velocity_target(x0, noise))
                loss.backward()
    return loss, saved.nbytes, ops


def _blocks(pipe):
    return [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]


@pytest.mark.parametrize("checkpoint, batch", [("off", 1), ("all", 1), ("2", 1), ("off", 2)])
def test_training_forwards_match_the_float64_reference(pipe, cond, checkpoint, batch):
    """Trained modulation (preset all): loss and every Mid/Up gradient against diffusers' own
    blocks in float64 with the deltas merged into the weights; checkpointed (the first block's
    check runs inside a checkpoint), every 2nd block, and a batch (the recomputing modulated norm)."""
    host = DiffusersFluxHost(pipe.transformer, checkpoint_every={"off": 0, "2": 2}.get(checkpoint, 1))
    adapters = _adapters(pipe)
    x0, noise, sigma = _data(batch)
    ran = []
    real = diffusers_blocks.double_forward, diffusers_blocks.single_forward

    def spy(fn):
        def wrapped(blocks, block, *args):
            ran.append(type(block).__name__)
            return fn(blocks, block, *args)
        return wrapped

    try:
        diffusers_blocks.double_forward, diffusers_blocks.single_forward = spy(real[0]), spy(real[1])
        loss, _, _ = _step(host, adapters, x0, noise, sigma, cond)
    finally:
        diffusers_blocks.double_forward, diffusers_blocks.single_forward = real
    # every block ran the training forward in the step (the check adds one call per kind)
    assert ran.count("FluxTransformerBlock") >= 2 and ran.count("FluxSingleTransformerBlock") >= 2, ran
    assert_matches_float64(pipe.transformer, adapters, loss, x0, noise, sigma, cond)
    assert all("forward" not in b.__dict__ for b in _blocks(pipe))  # diffusers' forward back afterwards


def test_training_forwards_keep_less_and_run_fewer_ops_than_diffusers_blocks(pipe, cond, monkeypatch):
    """Preset all, one sample: diffusers' own blocks, the training forwards without one shared
    modulation projection, and with it. The normalised copies and gated sums are not kept; one
    silu and one Down projection serve every block's modulation Linear."""
    host = DiffusersFluxHost(pipe.transformer)
    x0, noise, sigma = _data(1)
    figures = {}
    with monkeypatch.context() as m:
        m.setattr(diffusers_blocks.TrainingBlocks, "install", lambda self, *a: self)  # diffusers' own forwards
        m.setattr(diffusers_blocks.TrainingBlocks, "every_block", False)
        figures["diffusers"] = _step(host, _adapters(pipe), x0, noise, sigma, cond, measure=True)
    with monkeypatch.context() as m:
        m.setattr(diffusers_blocks.TrainingBlocks, "every_block", False)  # no held modulation group
        figures["own"] = _step(host, _adapters(pipe), x0, noise, sigma, cond, measure=True)
    figures["own_held"] = _step(host, _adapters(pipe), x0, noise, sigma, cond, measure=True)
    losses = [float(f[0].detach()) for f in figures.values()]
    assert max(losses) - min(losses) <= 1e-6 * abs(losses[0]), losses
    (_, b_d, k_d), (_, b_o, k_o), (_, b_h, k_h) = figures.values()
    # Not kept: per double block and stream the normalised copy of each of its two norms, the
    # gated sum and the attention output projection's output (computed again from the attention
    # kernel's output, which SDPA keeps anyway), per single block one normalised copy, (tokens,
    # width) float32 each; but the first block's inputs need no gradient, so its first norms keep
    # their input instead of the copy. (LayerNorm's per-token statistics make up the rest: 2
    # floats per token and norm.)
    tokens, width = 16 + TINY_T5_LEN, pipe.transformer.inner_dim
    rows = 2 * 4 * tokens + 2 * tokens - tokens
    assert abs((b_d - b_o) - rows * width * 4) <= 2 * 4 * 4 * tokens, (b_d, b_o, rows * width * 4)
    assert k_o.kernels < k_d.kernels and k_h.kernels < k_o.kernels, (k_d.kernels, k_o.kernels, k_h.kernels)
    # one silu(temb) for the step instead of one per modulation Linear (2 per double block, 1 per single)
    modulations = 2 * 2 + 2
    assert k_d.by_op["silu"] - k_o.by_op["silu"] == modulations - 1, (k_d.by_op["silu"], k_o.by_op["silu"])
    # one Down projection for every modulation Linear instead of one each
    assert k_o.by_op["mm"] + k_o.by_op["addmm"] - k_h.by_op["mm"] - k_h.by_op["addmm"] == modulations - 1


def test_a_block_that_computes_differently_keeps_diffusers_forward(pipe, cond, monkeypatch, caplog):
    """Another diffusers whose block code differs: the first training call compares, warns and runs
    diffusers' forward for the rest of the run, so the step is the one diffusers' blocks give."""
    host = DiffusersFluxHost(pipe.transformer)
    x0, noise, sigma = _data(1)
    with monkeypatch.context() as m:
        m.setattr(diffusers_blocks.TrainingBlocks, "install", lambda self, *a: self)
        ref, _, _ = _step(host, _adapters(pipe), x0, noise, sigma, cond)
    real = diffusers_blocks.double_forward

    def off(blocks, block, *args):
        txt, img = real(blocks, block, *args)
        return txt, img * 1.01

    monkeypatch.setattr(diffusers_blocks, "double_forward", off)
    with caplog.at_level(logging.WARNING, logger=diffusers_blocks.__name__):
        loss, _, _ = _step(host, _adapters(pipe), x0, noise, sigma, cond)
    assert "double block computes differently" in caplog.text and "hidden_states" in caplog.text
    assert "single block" not in caplog.text
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


def test_sampling_runs_diffusers_forward_and_the_blocks_get_it_back(pipe, cond, monkeypatch):
    """Without autograd the attached blocks compute what diffusers' forward computes, bit for bit."""
    host = DiffusersFluxHost(pipe.transformer)
    x0, noise, sigma = _data(1)
    xt = add_noise(x0, noise, sigma)
    adapters = _adapters(pipe)
    outs = []
    for install in (False, True):
        with monkeypatch.context() as m:
            if not install:
                m.setattr(diffusers_blocks.TrainingBlocks, "install", lambda self, *a: self)
            with torch.no_grad(), host.attach(adapters):
                assert all(("forward" in b.__dict__) == install for b in _blocks(pipe))
                outs.append(host.predict(xt, sigma, cond))
    assert torch.equal(outs[0], outs[1])
    assert all("forward" not in b.__dict__ for b in _blocks(pipe))


def test_a_block_with_a_wrapped_forward_keeps_it(pipe, cond):
    """A block whose forward someone else wraps (offloading hooks) is left alone."""
    block = pipe.transformer.single_transformer_blocks[0]
    mine = block.forward
    block.forward = lambda *a, **kw: mine(*a, **kw)
    wrapped = block.forward
    try:
        host = DiffusersFluxHost(pipe.transformer)
        x0, noise, sigma = _data(1)
        with host.training(), torch.enable_grad(), host.attach(_adapters(pipe)):
            assert block.forward is wrapped
            assert "forward" in pipe.transformer.single_transformer_blocks[1].__dict__
        assert block.forward is wrapped
    finally:
        del block.forward


def test_cached_tensors_are_the_frozen_downs_and_an_eager_step_saves_none_of_them(pipe, cond):
    """``cached_tensors`` (what the bench leaves out of a compiled step's saved bytes, as it does
    the weights): the Downs in the compute dtype, held for the run; eager steps never save them."""
    host = DiffusersFluxHost(pipe.transformer)
    adapters = _adapters(pipe)
    x0, noise, sigma = _data(1)
    keys = set()

    def pack(t):
        keys.add(t.untyped_storage().data_ptr())
        return t

    with host.training(), torch.enable_grad(), host.attach(adapters) as handle:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = flow_loss(host.predict(add_noise(x0, noise, sigma), sigma, cond), velocity_target(x0, noise))
        loss.backward()
        cached = handle.cached_tensors()
        assert cached and all(not t.requires_grad and t.dtype == torch.float32 for t in cached)
        rows = sum(t.shape[0] for t in cached)
        # every adapter's own Down, and its group's stack where layers share an input
        assert rows >= sum(a.down.shape[0] for _, a in adapters.items())
        assert not keys & {t.untyped_storage().data_ptr() for t in cached}
    assert handle.cached_tensors() == []


def test_each_block_kind_is_compared_once_per_host(pipe, cond, monkeypatch):
    """Stage-1 attaches once per bucket visit: the comparison runs at the host's first, not at each."""
    calls = []
    check = diffusers_blocks.TrainingBlocks.check

    def spy(self, kind, block, args):
        calls.append(kind)
        check(self, kind, block, args)

    monkeypatch.setattr(diffusers_blocks.TrainingBlocks, "check", spy)
    x0, noise, sigma = _data(1)
    host = DiffusersFluxHost(pipe.transformer)
    for _ in range(2):
        _step(host, _adapters(pipe), x0, noise, sigma, cond)
    assert sorted(calls) == ["double", "single"], calls
    _step(DiffusersFluxHost(pipe.transformer), _adapters(pipe), x0, noise, sigma, cond)
    assert sorted(calls) == ["double", "double", "single", "single"], calls


def test_a_block_class_whose_forward_takes_other_arguments_keeps_its_forward(pipe, monkeypatch):
    """A diffusers whose block forward takes other arguments would call the training forward with
    them: such blocks keep their own forward."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    real = FluxTransformerBlock.forward

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                joint_attention_kwargs=None, modulation_cache=None):
        return real(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs)

    monkeypatch.setattr(FluxTransformerBlock, "forward", forward)
    with DiffusersFluxHost(pipe.transformer).attach(_adapters(pipe)):
        assert not any("forward" in b.__dict__ for b in pipe.transformer.transformer_blocks)
        assert all("forward" in b.__dict__ for b in pipe.transformer.single_transformer_blocks)


def _grads(adapters) -> dict:
    return {n: (a.mid.grad.clone(), a.up.grad.clone()) for n, a in adapters.items()}


def test_a_projection_with_another_hook_keeps_its_output_for_the_gates(pipe, cond, monkeypatch):
    """An attention output projection that someone else hooks (here: doubling its output) is not
    computed again in backward (that would leave the hook out): the gradients are those of
    diffusers' own blocks with the same hook."""
    block = pipe.transformer.transformer_blocks[0]
    hook = block.attn.to_out[0].register_forward_hook(lambda m, a, o: o * 2)
    x0, noise, sigma = _data(1)
    host = DiffusersFluxHost(pipe.transformer)
    results = {}
    try:
        for own in (False, True):
            adapters = _adapters(pipe)
            with monkeypatch.context() as m:
                if not own:
                    m.setattr(diffusers_blocks.TrainingBlocks, "install", lambda self, *a: self)
                loss, _, _ = _step(host, adapters, x0, noise, sigma, cond)
            results[own] = (float(loss.detach()), _grads(adapters))
    finally:
        hook.remove()
    (ref_loss, ref), (loss, got) = results[False], results[True]
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    worst = max(float((g - r).norm() / r.norm().clamp_min(1e-30))
                for n in ref for g, r in zip(got[n], ref[n]))
    assert worst < 1e-4, worst


def test_projections_are_computed_again_only_in_a_joint_attention_after_a_deterministic_dropout(pipe):
    """``to_out[1]`` is FLUX's dropout of 0; a dropout that draws (p > 0 while training) would draw
    again in backward, so its block keeps the projections' outputs."""
    from torch import nn

    block = pipe.transformer.transformer_blocks[0]
    drop, kv = block.attn.to_out[1], block.attn.added_kv_proj_dim
    with DiffusersFluxHost(pipe.transformer).attach(_adapters(pipe)) as handle:
        assert diffusers_blocks._projections_again(block, handle)
        try:
            block.attn.to_out[1] = nn.Dropout(0.1).train()
            assert not diffusers_blocks._projections_again(block, handle)
            block.attn.to_out[1].eval()
            assert diffusers_blocks._projections_again(block, handle)
            block.attn.added_kv_proj_dim = None  # no text projections: not FLUX's joint attention
            assert not diffusers_blocks._projections_again(block, handle)
        finally:
            block.attn.to_out[1] = drop
            block.attn.added_kv_proj_dim = kv


def test_a_block_with_another_attention_processor_runs_it(pipe, cond):
    """The double block runs ``FluxAttnProcessor``'s code itself only where that is the processor;
    another (IP-Adapter, a user's own) is called as diffusers calls it."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    calls = []

    class Recording(FluxAttnProcessor):
        def __call__(self, *args, **kwargs):
            calls.append(torch.is_grad_enabled())
            return super().__call__(*args, **kwargs)

    attn = pipe.transformer.transformer_blocks[1].attn
    real = attn.processor
    attn.processor = Recording()
    try:
        x0, noise, sigma = _data(1)
        host = DiffusersFluxHost(pipe.transformer)
        adapters = _adapters(pipe)
        loss, _, _ = _step(host, adapters, x0, noise, sigma, cond)
    finally:
        attn.processor = real
    assert calls and all(calls)
    assert_matches_float64(pipe.transformer, adapters, loss, x0, noise, sigma, cond)


def test_an_output_computed_again_has_the_forward_bits(pipe, cond):
    """``AttachHandle.output_again``: an adapted Linear's output from the step's factors, as its
    forward computed it, bit for bit (so the recomputed gated sum is the forward's too)."""
    host = DiffusersFluxHost(pipe.transformer)
    adapters = _adapters(pipe)
    name = "transformer_blocks.0.attn.to_out.0"
    module = pipe.transformer.get_submodule(name)
    x = torch.randn(1, 16, module.in_features, generator=torch.Generator().manual_seed(8), requires_grad=True)
    with host.training(), torch.enable_grad(), host.attach(adapters) as handle:
        x0, noise, sigma = _data(1)
        host.predict(add_noise(x0, noise, sigma), sigma, cond)  # a step: its factors are built
        y = module(x)
        again = handle.output_again(name, module, x.detach())
    assert not again.requires_grad and torch.equal(again, y.detach())
