"""Stage-2 loop speed features: read-back every N steps, device noise, partial checkpointing,
float8 storage through backward, and the GPU benchmark's CPU smoke run."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from metalora_core.formats.prior import make_prior
from metalora_core.hosts import diffusers_blocks
from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, FluxTextCond, encode_prompt
from metalora_core.hosts.tiny import TINY_T5_LEN, TinyFluxConfig, build_tiny_flux_pipeline
from metalora_core.lora.adapter import LoRAAdapter
from metalora_core.lora.flow import add_noise, flow_loss, velocity_target
from metalora_core.lora.fp8 import store_linears_fp8
from metalora_core.lora.layers import FluxDims
from metalora_core.train.profile import SavedTensors
from metalora_core.train.recipe import build_adapters
from metalora_core.train.stage2 import Stage2Config, personalize
from references import load_script
from test_core import _latents, _loss_hooked_backward, _randomize_up, assert_matches_float64


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def cond(pipe) -> FluxTextCond:
    return encode_prompt(pipe, "a photo of a woman", max_sequence_length=TINY_T5_LEN)


@pytest.fixture(scope="module")
def prior(pipe):
    dims = FluxDims.from_diffusers_config(pipe.transformer.config)
    return make_prior(dims, r1=8, preset="attn_mlp", generator=torch.Generator().manual_seed(3))


def _run(pipe, prior, cond, config, callback=None):
    host = DiffusersFluxHost(pipe.transformer)
    adapters = build_adapters(host.dims, prior, rank=1, seed=config.seed)
    return personalize(host, adapters, _latents(3), cond, config, callback)


def test_read_back_every_n_steps_keeps_losses_and_callback_every_step(pipe, prior, cond):
    every1 = _run(pipe, prior, cond, Stage2Config(steps=9, seed=4, sync_every=1))
    seen = []
    every4 = _run(pipe, prior, cond, Stage2Config(steps=9, seed=4, sync_every=4), lambda s, v: seen.append((s, v)))
    assert every4.losses == every1.losses  # same values, read in fewer copies
    assert [s for s, _ in seen] == list(range(1, 10))  # cancel still lands within one step
    read = {1, 5, 9}  # step 1, every 4 steps after it, the last
    for s, v in seen:
        expect = every1.losses[s - 1] if s in read else every1.losses[max(r for r in read if r <= s) - 1]
        assert v == expect, (s, v)
    sd1, sd4 = every1.adapters.state_dict(), every4.adapters.state_dict()
    assert all(torch.equal(sd1[k], sd4[k]) for k in sd1)


class _NanFrom(DiffusersFluxHost):
    """The real host whose prediction turns NaN from the ``k``-th call on."""

    def __init__(self, transformer, k: int) -> None:
        super().__init__(transformer)
        self.k, self.calls = k, 0

    def predict(self, x_t, sigma, cond):
        self.calls += 1
        out = super().predict(x_t, sigma, cond)
        return out * float("nan") if self.calls >= self.k else out


def test_nan_between_read_backs_names_its_step(pipe, prior, cond):
    host = _NanFrom(pipe.transformer, 3)
    adapters = build_adapters(host.dims, prior, rank=1, seed=0)
    with pytest.raises(RuntimeError, match="loss became nan at step 3"):
        personalize(host, adapters, _latents(2), cond, Stage2Config(steps=8, sync_every=10))
    assert host.calls == 8  # found at the last step's read-back, not before


def test_noise_device_modes_equal_on_cpu_and_config_guards(pipe, prior, cond):
    a = _run(pipe, prior, cond, Stage2Config(steps=3, seed=2, noise_device="cpu"))
    b = _run(pipe, prior, cond, Stage2Config(steps=3, seed=2, noise_device="device"))
    assert a.losses == b.losses  # a CPU host's device generator is the seeded CPU stream
    with pytest.raises(ValueError, match="noise_device must be 'device' or 'cpu', got 'gpu'"):
        Stage2Config(noise_device="gpu")
    with pytest.raises(ValueError, match="sync_every must be >= 1, got 0"):
        Stage2Config(sync_every=0)
    with pytest.raises(ValueError, match="checkpoint_every must be an int >= 0 .*got -1"):
        DiffusersFluxHost(pipe.transformer, checkpoint_every=-1)


def _saved_bytes(host, adapters, x0, noise, sigma, cond) -> int:
    exclude = list(host.transformer.parameters()) + list(adapters.parameters())
    with host.training(), torch.enable_grad(), host.attach(adapters), SavedTensors(exclude) as saved:
        flow_loss(host.predict(add_noise(x0, noise, sigma), sigma, cond), velocity_target(x0, noise))
    return saved.nbytes


def test_every_kth_block_checkpointing_matches_float64_reference(pipe, prior, cond):
    g = torch.Generator().manual_seed(5)
    x0, noise, sigma = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6])
    host = DiffusersFluxHost(pipe.transformer, checkpoint_every=2)
    adapters = build_adapters(host.dims, prior, rank=2, seed=0)
    _randomize_up(adapters, scale=0.1)
    with host.training(), torch.enable_grad():
        loss = _loss_hooked_backward(host, adapters, x0, noise, sigma, cond)
    assert_matches_float64(pipe.transformer, adapters, loss, x0, noise, sigma, cond)
    sizes = [_saved_bytes(DiffusersFluxHost(pipe.transformer, checkpoint_every=k), adapters, x0, noise, sigma, cond)
             for k in (0, 2, 1)]
    assert sizes[0] > sizes[1] > sizes[2], sizes  # off > every 2nd block > all


def test_fp8_storage_stays_fp8_through_backward(pipe, prior, cond):
    """Mid/Up gradients equal those of the same fp8-rounded weights held in bf16, and no bf16
    copy of any weight is kept for backward."""
    rounded = copy.deepcopy(pipe.transformer).to(torch.bfloat16)
    stored = copy.deepcopy(pipe.transformer).to(torch.bfloat16)
    n = store_linears_fp8(stored)
    with torch.no_grad():
        for (name, p), (_, q) in zip(rounded.named_parameters(), stored.named_parameters()):
            p.copy_(q.to(torch.bfloat16))  # the fp8 values, held in bf16
    assert n == sum(1 for k, m in stored.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks." in k)
    g = torch.Generator().manual_seed(5)
    x0, noise, sigma = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6])
    grads, saved = [], []
    for model in (rounded, stored):
        host = DiffusersFluxHost(model)
        adapters = build_adapters(host.dims, prior, rank=1, seed=0)
        _randomize_up(adapters, scale=0.1)
        saved.append(_saved_bytes(host, adapters, x0, noise, sigma, cond))
        with host.training(), torch.enable_grad():
            _loss_hooked_backward(host, adapters, x0, noise, sigma, cond)
        grads.append(torch.cat([p.grad.flatten() for p in adapters.trainable_parameters()]))
        assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert saved[1] == saved[0]  # stored: only the (excluded) fp8 weights, nothing cast
    with pytest.raises(ValueError, match="stores float8 weights; got torch.bfloat16"):
        store_linears_fp8(rounded, dtype=torch.bfloat16)


def test_fp8_storage_stays_fp8_through_backward_when_compiled():
    """Compiled, the cast sits in an opaque op (``fp8._compiled_op``): the graph keeps the stored
    fp8 weights (excluded, as weights are), not a bf16 copy of each, and the input gradient is
    the one of the same fp8-rounded weights held in bf16."""
    from torch import nn

    class Blocks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer_blocks = nn.ModuleList(nn.Linear(64, 64) for _ in range(3))

        def forward(self, x):
            for lin in self.transformer_blocks:
                x = nn.functional.gelu(lin(x))
            return x

    torch.manual_seed(0)
    stored = Blocks().to(torch.bfloat16).requires_grad_(False)
    store_linears_fp8(stored)
    rounded = copy.deepcopy(stored)
    for lin in rounded.transformer_blocks:  # the fp8 values, held in bf16, plain Linears
        lin.weight = nn.Parameter(lin.weight.to(torch.bfloat16), requires_grad=False)
        del lin.forward
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    saved, grads = [], []
    try:
        for model in (rounded, stored):
            fn = torch.compile(model)
            xi = x.clone().requires_grad_(True)
            fn(xi).sum().backward()  # compiles
            xi.grad = None
            with SavedTensors(exclude=list(model.parameters())) as s:
                y = fn(xi)
            y.sum().backward()
            saved.append(s.nbytes)
            grads.append(xi.grad)
    finally:
        torch._dynamo.reset()
    activations = 3 * x.numel() * x.element_size()  # each gelu keeps its input
    assert saved == [activations, activations], saved
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def _trained(host, prior, cond, latents):
    adapters = build_adapters(host.dims, prior, rank=1, seed=0)
    _randomize_up(adapters, scale=0.1)  # every adapter in the gradient from the first step
    out = personalize(host, adapters, latents, cond, Stage2Config(steps=2, seed=1))
    return torch.tensor(out.losses), torch.cat([p.detach().flatten() for p in out.adapters.trainable_parameters()])


def _bare_step(host, cond) -> None:
    g = torch.Generator().manual_seed(2)
    x0, noise, sigma = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.5])
    with host.training(), torch.enable_grad():
        flow_loss(host.predict(add_noise(x0, noise, sigma).requires_grad_(True), sigma, cond),
                  velocity_target(x0, noise)).backward()


def test_compile_blocks_trains_as_eager_and_never_runs_a_graph_traced_without_the_adapters(monkeypatch):
    """torch.compile does not guard on module hooks: a graph traced without the adapters (a compiled
    bare step, the caller's own compiled blocks) would run the model without them. Compiled, the
    frozen-Down adapters read the step's prebuilt factors, never the general three-factor path."""
    pipe = build_tiny_flux_pipeline(seed=0, config=TinyFluxConfig(num_double=3, num_single=3))
    cond = encode_prompt(pipe, "a photo of a woman", max_sequence_length=TINY_T5_LEN)
    dims = FluxDims.from_diffusers_config(pipe.transformer.config)
    prior_all = make_prior(dims, r1=8, preset="all", generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(16, 8, 8, generator=g) for _ in range(2)]
    eager_losses, eager_params = _trained(DiffusersFluxHost(pipe.transformer), prior_all, cond, latents)
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    stats = torch._dynamo.utils.counters["stats"]
    try:
        _bare_step(DiffusersFluxHost(pipe.transformer, compile_blocks=True), cond)  # graphs without hooks
        graphs = stats["unique_graphs"]

        def general(self, base, x):
            raise AssertionError("a compiled Stage-2 adapter took the general path")

        checked = {}
        check = diffusers_blocks.TrainingBlocks.check

        def spy(self, kind, block, args):  # runs eagerly before the compiled call, never traced
            check(self, kind, block, args)
            checked[kind] = self.own[kind]

        with monkeypatch.context() as m:
            m.setattr(LoRAAdapter, "add_to", general)
            m.setattr(diffusers_blocks.TrainingBlocks, "check", spy)
            losses, params = _trained(DiffusersFluxHost(pipe.transformer, compile_blocks=True), prior_all, cond,
                                      latents)
        assert checked == {"double": True, "single": True}, checked  # so the training forwards compiled
        # compiled, and blocks of one kind share graphs: two per kind (the first double block's
        # input needs no gradient; diffusers hands the single blocks after the first a strided
        # view), none per block (a graph that specialised on a block would compile for each)
        assert graphs < stats["unique_graphs"] <= graphs + 4, (graphs, stats["unique_graphs"])
        torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=0)
        torch.testing.assert_close(params, eager_params, rtol=1e-4, atol=1e-6)
        assert all("_compiled_call_impl" not in b.__dict__ for b in blocks)  # eager again afterwards
        for b in blocks:  # the caller's own compiled blocks, traced without the adapters
            b.compile()
        _bare_step(DiffusersFluxHost(pipe.transformer), cond)
        theirs = [b._compiled_call_impl for b in blocks]
        losses, params = _trained(DiffusersFluxHost(pipe.transformer), prior_all, cond, latents)
        torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=0)
        torch.testing.assert_close(params, eager_params, rtol=1e-6, atol=0)
        assert all(b._compiled_call_impl is t for b, t in zip(blocks, theirs))  # given back
    finally:
        for b in blocks:
            b.__dict__.pop("_compiled_call_impl", None)
        torch._dynamo.reset()


def _bench_module():
    return load_script("bench/gpu_stage2.py", register=True)


def test_flop_model_reproduces_the_issue_figures():
    bench = _bench_module()
    for (res, ck), expect in bench.ISSUE_TFLOP.items():
        f = bench.flop_model(bench.Shape(), (res // 16) ** 2, 512, bench.checkpointed(57, ck))
        assert abs(f["tflop"] - expect) / expect < 0.005, (res, ck, f["tflop"], expect)
    assert bench.checkpointed(57, "2") == 29 and bench.checkpointed(57, "off") == 0


def test_gpu_bench_tiny_runs_on_cpu_and_prints_json_lines(capsys):
    bench = _bench_module()
    bench.main(["--tiny", "--compile", "off", "--hosts", "core"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    model, info, rows = lines[0], lines[1], lines[2:]
    assert model["512_ckpt_off_tflop"] == pytest.approx(44.7, rel=5e-3)
    assert info["device"] == "cpu" and (info["width"], info["double"], info["single"]) == (256, 1, 2)
    assert not [r for r in rows if "error" in r or "skipped" in r]
    got = {(r["weights"], r["mode"], r["checkpoint"]) for r in rows}
    assert got == {("bf16", "bare", "off"), ("bf16", "metalora", "off"), ("bf16", "metalora", "2"),
                   ("bf16", "metalora", "all"), ("fp8", "bare", "off"), ("fp8", "metalora", "off"),
                   ("fp8", "metalora", "all")}
    for r in rows:
        assert r["s_per_step"] > 0 and r["saved_bytes"] > 0 and r["kernels"] > 0 and r["tflop"] > 0
        assert r["projected_375_s"] == pytest.approx(375 * r["s_per_step"], abs=0.1)
        assert r["projected_stage1_h"] == pytest.approx(200_000 * r["s_per_step"] / 3600, rel=1e-3)
    by = {(r["weights"], r["mode"], r["checkpoint"]): r for r in rows}
    meta = by[("bf16", "metalora", "off")]
    assert meta["saved_bytes_ratio_to_bare"] < 1.25  # was 2.3 with a float32 input copy per Linear
    assert meta["kernels"] > by[("bf16", "bare", "off")]["kernels"]
    # preset "all": the modulation Linears make backward reach the time embedding's branch too
    assert meta["kernels_ratio_to_bare"] <= 1.45  # 1.83 with matmuls and casts per adapter and call
    assert by[("bf16", "metalora", "all")]["saved_bytes"] < by[("bf16", "metalora", "2")]["saved_bytes"] < meta["saved_bytes"]
    assert by[("bf16", "metalora", "all")]["tflop"] > meta["tflop"]  # recompute counted
    assert by[("fp8", "bare", "off")]["saved_bytes"] == by[("bf16", "bare", "off")]["saved_bytes"]  # no bf16 weights kept


@pytest.mark.parametrize("preset", ["attn_mlp", "all"])
def test_gpu_bench_at_flux_depth_kernels_and_composed_figures(capsys, preset):
    """Ops that compute (CUDA kernels on a GPU) of one Stage-2 step over the bare frozen step's, at
    FLUX.1-dev's depth (19 double + 38 single blocks; counts do not depend on the width), bf16:
    shared Down projections per input, Up @ Mid once per step per shape, one addmm per call, the
    low-rank input gradient fused into the Linear's, and the training forwards of the blocks
    (attention + MLP layers: measured 1.16x, 1.22x with diffusers' own block code; every layer,
    modulation included, 1.24x, 1.34x with diffusers' blocks: the modulation's gradients are work the
    bare step does not do). Saved bytes at this width: 1.05x and 1.10x (1.25x for all with
    diffusers' blocks, 1.12x with the attention projections' outputs kept for the gates)."""
    bench = _bench_module()
    common = ["--tiny", "--compile", "off", "--hosts", "core", "--weights", "bf16", "--preset", preset,
              "--repeats", "0", "--warmup", "0", "--checkpoints", "off"]
    bench.main(common + ["--depth", "19", "--single-depth", "38"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert (lines[1]["double"], lines[1]["single"]) == (19, 38)  # explicit shape options hold under --tiny
    by = {(r["mode"], r["checkpoint"]): r for r in lines[2:]}
    assert set(by) == {("bare", "off"), ("metalora", "off")}
    meta = by[("metalora", "off")]
    assert meta["blocks"] == 57 and meta["adapted_layers"] == {"attn_mlp": 418, "all": 494}[preset]
    assert meta["kernels_ratio_to_bare"] <= 1.25, (meta["kernels"], by[("bare", "off")]["kernels"])
    assert meta["saved_bytes_ratio_to_bare"] <= 1.1
    # --compose (the full depth from 1+2, 2+2 and 1+3 blocks, for widths whose whole depth does not
    # fit) gives the figures measured at the whole depth
    bench.main(common + ["--compose", "19,38"])
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert {tuple(r["shape"]) for r in rows if "shape" in r} == {(1, 2), (2, 2), (1, 3)}
    composed = {r["mode"]: r for r in rows if "composed" in r}
    assert set(composed) == {"bare", "metalora"}
    for mode, r in composed.items():
        assert (r["kernels"], r["saved_bytes"]) == (by[(mode, "off")]["kernels"], by[(mode, "off")]["saved_bytes"]), mode
    with pytest.raises(SystemExit, match="at least 1 double and 2 single"):
        bench.main(common + ["--compose", "19,1"])
