"""Memory and dispatch of the adapters: what autograd keeps for backward, how many casts run.

Byte counts and op counts are deterministic (timings are not), so these assert on them.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from metalora_core.formats.prior import make_prior
from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, FluxTextCond
from metalora_core.hosts.tiny import build_tiny_flux_pipeline
from metalora_core.lora.adapter import LoRAAdapter, attach_adapters, AdapterSet
from metalora_core.lora.fused import _DownProject
from metalora_core.lora.flow import add_noise, flow_loss, velocity_target
from metalora_core.train.profile import OpCounter, SavedTensors
from metalora_core.train.recipe import build_adapters
from references import merged_float64


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_flux_pipeline(seed=0)


def _step_saved(transformer, adapters) -> tuple[int, int]:
    """(bytes saved for backward, kernels) of one frozen-base step; adapters None: the bare step
    with an input that requires grad (the least any adapter training needs)."""
    host = DiffusersFluxHost(transformer)
    g = torch.Generator().manual_seed(0)
    x0, noise, s = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 16, 16, 16, generator=g), torch.tensor([.5])
    cond = FluxTextCond(torch.randn(1, 32, 32, generator=g), torch.randn(1, 32, generator=g), torch.zeros(32, 3))
    xt = add_noise(x0, noise, s)
    if adapters is None:
        xt.requires_grad_(True)
    exclude = list(transformer.parameters()) + (list(adapters.parameters()) if adapters is not None else [])
    saved, ops = SavedTensors(exclude=exclude), OpCounter()
    with host.training(), torch.enable_grad(), ops:
        handle = host.attach(adapters) if adapters is not None else None
        try:
            with saved:
                loss = flow_loss(host.predict(xt, s, cond), velocity_target(x0, noise))
            loss.backward()
        finally:
            if handle is not None:
                handle.remove()
    return saved.nbytes, ops.kernels


@pytest.mark.parametrize("dtype, meta_max, plain_max", [(torch.float32, 1.15, 1.6), (torch.bfloat16, 1.25, 1.6)])
def test_adapters_do_not_keep_a_float32_copy_of_each_input(pipe, dtype, meta_max, plain_max):
    """Saved-for-backward bytes with adapters over the bare step's.

    Keeping the float32 input of every adapted Linear measured 1.52x (float32) and 2.29x (bf16)
    here for Meta-LoRA, 1.51x / 2.28x for plain LoRA; the three-factor form keeps the r1-wide
    ``x @ Down^T`` instead (frozen Down; with it the per-step (out, r1) factors ``Up @ Mid``), and a
    trainable Down keeps x in its own dtype.
    """
    tr = pipe.transformer.to(dtype)
    try:
        prior = make_prior(DiffusersFluxHost(tr).dims, r1=8, preset="attn_mlp", generator=torch.Generator().manual_seed(0))
        bare, _ = _step_saved(tr, None)
        meta, _ = _step_saved(tr, build_adapters(DiffusersFluxHost(tr).dims, prior, rank=1))
        plain, _ = _step_saved(tr, build_adapters(DiffusersFluxHost(tr).dims, None, rank=1, preset="attn_mlp"))
    finally:
        pipe.transformer.to(torch.float32)
    assert bare > 0
    assert meta / bare <= meta_max, (meta, bare)
    assert plain / bare <= plain_max, (plain, bare)


class _Block(nn.Module):
    """q, k and v reading one input, and an out projection, under canonical FLUX names."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q, self.attn.to_k, self.attn.to_v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)
        self.attn.to_out = nn.ModuleList([nn.Linear(40, 16)])

    def forward(self, x):
        a = self.attn
        return a.to_out[0](torch.cat([a.to_q(x), a.to_k(x), a.to_v(x)], -1))


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_Block()])

    def forward(self, x):
        return self.transformer_blocks[0](x)


_NAMES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0")


def _block_adapters(model, g, *, rank=1, scale=1.0):
    ads = AdapterSet({f"transformer_blocks.0.{n}": LoRAAdapter(m.in_features, m.out_features, rank=rank, r1=4,
                                                               scale=scale, generator=g)
                      for n in _NAMES for m in [model.transformer_blocks[0].get_submodule(n)]}, mode="meta", preset=None)
    ads.freeze_down(True)
    with torch.no_grad():
        for _, a in ads.items():
            a.up.normal_(generator=g)
    return ads


def _merged(model, ads, x):
    """Out-of-place reference: float64, deltas merged into the weights, no hooks."""
    ref, ad64 = merged_float64(model, ads)
    x64 = x.detach().double().requires_grad_(True)
    return ref(x64), ad64, x64


class _Ops(TorchDispatchMode):
    """Records (op name, input shapes) of every aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func.overloadpacket.__name__, tuple(tuple(a.shape) for a in args if torch.is_tensor(a))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_input_is_projected_once_without_casts(dtype):
    """q, k and v read one x: one matmul against their stacked Downs (in x's dtype, no cast of x),
    one addmm per Linear, and in backward one addmm adds the low-rank input gradient to x's."""
    torch.manual_seed(0)
    model = _Model().to(dtype).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ads = _block_adapters(model, g, rank=2, scale=0.5)
    x = torch.randn(3, 5, 16, generator=g).to(dtype).requires_grad_(True)
    ops = _Ops()
    with attach_adapters(model, ads), ops:
        y = model(x)
        y.float().square().sum().backward()
    assert not [o for o in ops.ops if o[0] == "_to_copy" and o[1] == (3, 5, 16)]  # x never cast
    assert ops.ops.count(("mm", ((15, 16), (16, 12)))) == 1  # one projection for q, k and v (3 x r1 = 12)
    assert sum(1 for o in ops.ops if o[0] == "addmm" and o[1][1:] == ((15, 12), (12, 16))) == 1  # x's gradient
    ref, ad64, x64 = _merged(model, ads, x)
    ref.square().sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(y.double(), ref, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    for (_, a), (_, r) in zip(ads.items(), ad64.items()):
        for p, q in ((a.mid, r.mid), (a.up, r.up)):
            err = float((p.grad.double() - q.grad).norm() / q.grad.norm())
            assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
    assert all(a.down.grad is None for _, a in ads.items())


def test_trainable_down_keeps_its_input_in_its_own_dtype():
    torch.manual_seed(0)
    model = _Model().to(torch.bfloat16).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ads = _block_adapters(model, g)
    ads.freeze_down(False)  # a trainable Down (Stage-1) keeps bf16 x and casts per use
    x = torch.randn(3, 5, 16, generator=g).to(torch.bfloat16).requires_grad_(True)
    with attach_adapters(model, ads):
        with SavedTensors(exclude=list(model.parameters()) + list(ads.parameters())) as saved:
            model(x).float().sum().backward()
    assert saved.by_dtype.get("float32", 0) <= len(ads.names) * 15 * 4 * 4  # the r1-wide x @ Down^T only
    assert saved.by_dtype.get("bfloat16", 0) >= x.numel() * 2
    assert all(a.down.grad is not None for _, a in ads.items())


def test_step_factors_follow_the_parameters():
    """Up @ Mid is built once per forward of the root and again whenever a Mid or Up changed, a
    backward spent it, or the grad mode differs; a parameter changed before backward raises."""
    model = _Model().requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    ads = _block_adapters(model, g, rank=2)
    x = torch.randn(2, 16, generator=g, requires_grad=True)
    q = model.transformer_blocks[0].attn.to_q
    with attach_adapters(model, ads):
        for _ in range(2):  # a step, an optimizer-like in-place update, the next step
            y = model(x)
            ref, *_ = _merged(model, ads, x)
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
            y.sum().backward()
            with torch.no_grad():
                for p in ads.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * 0.1)
        # calls of a submodule alone, without the root's forward: a backward each, no update between
        x_q = x.detach().requires_grad_(True)
        for _ in range(2):
            q(x_q).sum().backward()
        with torch.no_grad():
            ads["transformer_blocks.0.attn.to_q"].up.mul_(2)
            expect = q.weight @ x_q[0] + q.bias + ads["transformer_blocks.0.attn.to_q"].up @ (
                ads["transformer_blocks.0.attn.to_q"].mid @ (ads["transformer_blocks.0.attn.to_q"].down @ x_q[0]))
            torch.testing.assert_close(q(x_q)[0], expect, rtol=1e-5, atol=1e-6)
        y = model(x)
        with torch.no_grad():
            ads["transformer_blocks.0.attn.to_k"].mid.add_(1)
        with pytest.raises(RuntimeError, match="modified in place"):
            y.sum().backward()


def test_stacked_downs_follow_a_down_changed_in_place_or_replaced():
    """The Downs stacked in the compute dtype are held for the run, like weights, and stacked again
    when a Down changes in place (a prior loaded into the same adapters) or gets new storage."""
    model = _Model().requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    ads = _block_adapters(model, g, rank=2)
    x = torch.randn(2, 16, generator=g, requires_grad=True)
    q = ads["transformer_blocks.0.attn.to_q"]  # in the q/k/v group: one stacked Down for the three
    with attach_adapters(model, ads) as handle:
        model(x).sum().backward()
        held = handle.cached_tensors()
        for change in ("in place", "new storage"):
            with torch.no_grad():
                if change == "in place":
                    q.down.mul_(-2)
                else:
                    q.down.data = torch.randn(q.down.shape, generator=g)
            y = model(x)
            ref, *_ = _merged(model, ads, x)
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6, msg=change)
            y.sum().backward()
        assert len(handle.cached_tensors()) == len(held)  # replaced, not accumulated


def test_shared_projection_is_not_reused_for_another_input():
    """A group member reading another tensor (or the same one changed in place) gets its own projection."""

    class Chain(_Model):
        def forward(self, x):
            a = self.transformer_blocks[0].attn
            h = a.to_q(x)
            x.mul_(2)
            v = a.to_v(x)  # v reads x changed in place
            k = a.to_k(h)  # k reads q's output, not x
            return a.to_out[0](torch.cat([h, k, v], -1))

    model = Chain().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    ads = _block_adapters(model, g)
    x = torch.randn(4, 16, generator=g)
    with torch.no_grad():
        with attach_adapters(model, ads):
            got = model(x.clone())
        xx = x.clone()
        a, blk = dict(ads.items()), model.transformer_blocks[0].attn

        def lin(name, mod, v):
            ad = a[f"transformer_blocks.0.{name}"]
            return mod(v) + v @ ad.down.T @ ad.mid.T @ ad.up.T

        h = lin("attn.to_q", blk.to_q, xx)
        xx.mul_(2)
        v = lin("attn.to_v", blk.to_v, xx)
        k = lin("attn.to_k", blk.to_k, h)
        expect = lin("attn.to_out.0", blk.to_out[0], torch.cat([h, k, v], -1))
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)


def test_down_project_gradients_match_autograd():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    down = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(_DownProject.apply, (x, down))
    # bf16 input, float32 Down: same gradients as plain autograd on the cast
    xb = x.detach().to(torch.bfloat16).requires_grad_(True)
    d32 = down.detach().float().requires_grad_(True)
    u = _DownProject.apply(xb, d32)
    w = torch.randn(u.shape, generator=g).float()
    gx, gd = torch.autograd.grad((u * w).sum(), (xb, d32))
    xb2, d2 = xb.detach().clone().requires_grad_(True), d32.detach().clone().requires_grad_(True)
    rx, rd = torch.autograd.grad((torch.nn.functional.linear(xb2.float(), d2) * w).sum(), (xb2, d2))
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gd, rd)


def _plain_modulated_norm(norm, x, shift, scale):
    return torch.addcmul(shift, norm(x), 1 + scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modulated_norm_keeps_no_normalised_copy_and_computes_the_same(dtype):
    """Trained modulation (preset "all"): the normalised x is recomputed in backward, not kept.
    Same forward bits and gradients as the plain ops; saves exactly one (tokens x width) less."""
    from metalora_core.lora.modulation import modulated_norm

    g = torch.Generator().manual_seed(0)
    norm = nn.LayerNorm(32, elementwise_affine=False, eps=1e-6)
    base = (torch.randn(2, 10, 32, generator=g) * 3 + 1).to(dtype)
    mod = torch.randn(2, 1, 64, generator=g).to(dtype)
    upstream = torch.randn(2, 10, 32, generator=g).to(dtype)
    results = {}
    for name, fn in (("fused", modulated_norm), ("plain", _plain_modulated_norm)):
        x = base.clone().requires_grad_(True)
        m = mod.clone().requires_grad_(True)
        shift, scale = m.chunk(2, dim=-1)  # views of one modulation output, as in FLUX blocks
        saved = SavedTensors()
        with saved:
            y = fn(norm, x * 1, shift, scale)  # x * 1: an activation, as a block's residual stream is
        y.backward(upstream)
        results[name] = (y.detach(), x.grad, m.grad, saved.nbytes)
    (y, gx, gm, nbytes), (y0, gx0, gm0, nbytes0) = results["fused"], results["plain"]
    assert torch.equal(y, y0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx0, **tol)
    torch.testing.assert_close(gm, gm0, **tol)
    assert nbytes0 - nbytes == base.numel() * base.element_size(), (nbytes0, nbytes)


def test_modulated_norm_gradients_match_finite_differences():
    from metalora_core.lora.modulation import modulated_norm

    g = torch.Generator().manual_seed(1)
    norm = nn.LayerNorm(8, elementwise_affine=False, eps=1e-6)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: modulated_norm(norm, a, b, c), (x, shift, scale))
    # only some inputs needing gradients (the bare step's modulation, a frozen stream)
    assert torch.autograd.gradcheck(lambda a, c: modulated_norm(norm, a, shift.detach(), c), (x, scale))


def test_modulated_norm_falls_back_to_the_plain_ops():
    """A norm with weights, or (a batch) an x or scale that needs no gradient, runs the plain ops
    (nothing to save)."""
    from metalora_core.lora import modulation

    x, shift, scale = torch.randn(2, 4, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8, requires_grad=True)
    affine = nn.LayerNorm(8)
    assert modulation.plain_layer_norm(affine) is None
    assert modulation.plain_layer_norm(nn.LayerNorm(8, elementwise_affine=False)) == 1e-5
    with torch.no_grad():
        affine.weight.mul_(2.0)
    out = modulation.modulated_norm(affine, x, shift, scale)
    assert out.grad_fn.name() == "AddcmulBackward0"
    torch.testing.assert_close(out, torch.addcmul(shift, affine(x), 1 + scale))
    plain = nn.LayerNorm(8, elementwise_affine=False)
    assert modulation.modulated_norm(plain, x, shift, scale.detach()).grad_fn is None
    assert modulation.modulated_norm(plain, x, shift, scale).grad_fn.name() == "AddcmulBackward0"  # x: no grad
    fused = modulation.modulated_norm(plain, x.clone().requires_grad_(True), shift, scale)
    assert fused.grad_fn.name() == "_ModulatedNormBackward"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_samples_modulated_norm_is_one_layer_norm_each_way(dtype):
    """One sample's modulation is a LayerNorm's weight (1 + scale) and bias (shift): one op forward
    and one backward, their gradients its weight and bias gradients, nothing kept beyond x and
    the per-token statistics. Holds with and without trained modulation."""
    from metalora_core.lora import modulation

    g = torch.Generator().manual_seed(3)
    norm = nn.LayerNorm(32, elementwise_affine=False, eps=1e-6)
    base = (torch.randn(1, 10, 32, generator=g) * 3 + 1).to(dtype)
    mod = torch.randn(1, 1, 64, generator=g).to(dtype)
    upstream = torch.randn(1, 10, 32, generator=g).to(dtype)
    for trained in (True, False):
        results = {}
        for name, fn in (("one", modulation.modulated_norm), ("plain", _plain_modulated_norm)):
            x, m = base.clone().requires_grad_(True), mod.clone().requires_grad_(trained)
            shift, scale = m.chunk(2, dim=-1)
            with OpCounter() as ops:
                with SavedTensors() as saved:
                    y = fn(norm, x * 1, shift, scale)
                y.backward(upstream)
            results[name] = (y.detach(), x.grad, m.grad, saved.nbytes, ops.by_op)
        (y, gx, gm, nbytes, ops), (y0, gx0, gm0, nbytes0, ops0) = results["one"], results["plain"]
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
        torch.testing.assert_close(y, y0, **tol)
        torch.testing.assert_close(gx, gx0, **tol)
        if trained:
            torch.testing.assert_close(gm, gm0, **tol)
        assert ops["native_layer_norm"] == ops["native_layer_norm_backward"] == 1 and "addcmul" not in ops, ops
        assert sum(ops.values()) < sum(ops0.values()), (ops, ops0)
        # plain, trained: the normalised copy; here the bias, a view that keeps the modulation output
        normalised = base.numel() * base.element_size() if trained else 0
        assert nbytes <= nbytes0 - normalised + mod.numel() * mod.element_size(), (nbytes, nbytes0)
    x = torch.randn(1, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    shift, scale = (torch.randn(1, 1, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    norm8 = nn.LayerNorm(8, elementwise_affine=False, eps=1e-6)
    assert modulation.modulated_norm(norm8, x, shift, scale).grad_fn.name() == "NativeLayerNormBackward0"
    assert torch.autograd.gradcheck(lambda a, b, c: modulation.modulated_norm(norm8, a, b, c), (x, shift, scale))
    assert torch.autograd.gradcheck(lambda b, c: modulation.modulated_norm(norm8, x.detach(), b, c), (shift, scale))


def test_gated_residual_matches_autograd_in_fewer_ops():
    from metalora_core.lora.modulation import gated_residual

    g = torch.Generator().manual_seed(2)
    r, gate, out = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 6, 8), (2, 1, 8), (2, 6, 8)))
    for needs in ((True, True, True), (False, True, True), (True, False, True), (False, True, False)):
        args = [t.clone().requires_grad_(n) for t, n in zip((r, gate, out), needs)]
        assert torch.autograd.gradcheck(gated_residual, args), needs
    torch.testing.assert_close(gated_residual(r, gate, out), r + gate * out)
    counts = {}
    for name, fn in (("fused", gated_residual), ("plain", lambda a, b, c: a + b * c)):
        a, b, c = (t.float().requires_grad_(True) for t in (r, gate, out))
        ops = OpCounter()
        with ops:
            fn(a * 1, b * 1, c * 1).backward(torch.ones(2, 6, 8))
        counts[name] = ops.kernels
    assert counts["fused"] < counts["plain"], counts  # 1 + 3 ops against 2 + 3


def test_profiled_kernels_count_the_eager_ops_and_the_kernels_of_a_compiled_graph():
    """``OpCounter`` sees nothing of a compiled graph; ``ProfiledKernels`` counts its C++ kernels."""
    from torch._inductor import config as inductor_config

    from metalora_core.train.profile import ProfiledKernels

    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 32, generator=g).requires_grad_(True)
    b, c = torch.randn(32, 32, generator=g), torch.randn(32, generator=g)

    def step(x):
        return nn.functional.gelu(x @ b + c).sum()

    compiled = torch.compile(step)
    counts = {}
    # inductor's config.patch, not monkeypatch: undoing a monkeypatch deletes the entry, and a
    # deleted entry reads as missing in every later compile of the process
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        try:
            for name, fn in (("eager", step), ("compiled", compiled)):
                fn(a).backward()  # compiles; warm
                with ProfiledKernels() as k:
                    fn(a).backward()
                counts[name] = k
        finally:
            torch._dynamo.reset()
    eager, comp = counts["eager"], counts["compiled"]
    with OpCounter() as ops:
        step(a).backward()
    assert "<inductor>" not in eager.by_name and eager.by_name["aten::mm"] == 2  # forward and input gradient
    assert abs(eager.kernels - ops.kernels) <= 2, (dict(eager.by_name), dict(ops.by_op))
    # the add and gelu forward, gelu's backward: fused into inductor's kernels; the matmuls stay
    assert comp.by_name["<inductor>"] >= 1 and comp.by_name["aten::mm"] == 2
    assert "aten::gelu" not in comp.by_name and "aten::gelu_backward" not in comp.by_name
    assert comp.kernels < eager.kernels, (dict(comp.by_name), dict(eager.by_name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_modulated_norm_keeps_no_gated_sum_and_computes_the_same(dtype):
    """A double block between attention and MLP: y = r + gate * out, then y's modulated LayerNorm.
    With trained gates y is recomputed in backward from r (kept by the block's first LayerNorm) and
    out (kept for the gate's gradient): one (tokens x width) activation fewer, same forward bits."""
    from metalora_core.lora.modulation import gated_modulated_norm, gated_residual, modulated_norm

    def composed(norm, r, gate, out, shift, scale):
        y = gated_residual(r, gate, out)
        return y, modulated_norm(norm, y, shift, scale)

    g = torch.Generator().manual_seed(4)
    norm = nn.LayerNorm(32, elementwise_affine=False, eps=1e-6)
    base = (torch.randn(1, 10, 32, generator=g) * 3 + 1).to(dtype)
    mod = torch.randn(1, 1, 160, generator=g).to(dtype)
    up_y, up_n = (torch.randn(1, 10, 32, generator=g).to(dtype) for _ in range(2))
    for trained in (True, False):
        results = {}
        for name, fn in (("fused", gated_modulated_norm), ("composed", composed)):
            x, m = base.clone().requires_grad_(True), mod.clone().requires_grad_(trained)
            sh1, sc1, gate, sh2, sc2 = m.chunk(5, dim=-1)  # views of one modulation output
            with SavedTensors() as saved:
                r = x * 1  # the residual stream
                out = modulated_norm(norm, r, sh1, sc1) * 2  # keeps r, as the block's first LayerNorm does
                y, n = fn(norm, r, gate, out, sh2, sc2)
            torch.autograd.backward((y, n), (up_y, up_n))
            results[name] = (y.detach(), n.detach(), x.grad, m.grad, saved.nbytes, y.grad_fn.name())
        (y, n, gx, gm, nbytes, node), (y0, n0, gx0, gm0, nbytes0, node0) = results["fused"], results["composed"]
        assert torch.equal(y, y0) and torch.equal(n, n0)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
        torch.testing.assert_close(gx, gx0, **tol)
        if trained:
            torch.testing.assert_close(gm, gm0, **tol)
            assert node == "_GatedNormBackward" and nbytes0 - nbytes == base.numel() * base.element_size()
        else:  # untrained gates keep nothing of out: there is nothing to recompute y from
            assert node == node0 and nbytes == nbytes0
    x = torch.randn(1, 5, 8, generator=g, dtype=torch.float64)
    gate, shift, scale = (torch.randn(1, 1, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = torch.randn(1, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    norm8 = nn.LayerNorm(8, elementwise_affine=False, eps=1e-6)
    for r in (x.clone().requires_grad_(True), x):  # the first block's residual needs no gradient

        def both(*args, r=r):
            return torch.cat([t.flatten() for t in gated_modulated_norm(norm8, r, *args)])

        assert torch.autograd.gradcheck(both, (gate, out, shift, scale))
        assert torch.autograd.gradcheck(lambda r_, o: torch.cat([t.flatten() for t in gated_modulated_norm(
            norm8, r_, gate, o, shift, scale)]), (x.clone().requires_grad_(True), out))


@pytest.mark.parametrize("form", ["gated_residual", "gated_modulated_norm_one_sample", "gated_modulated_norm_batch"])
def test_a_gated_output_computed_again_in_backward_is_not_kept(form):
    """``Recompute``: ``out = source @ w^T`` (an attention output projection), computed again from
    ``source`` (which something else keeps: here the test holds it) for the gate's gradient. The
    gradients are autograd's (float64 gradcheck) and ``out`` is not kept."""
    from metalora_core.lora.modulation import Recompute, gated_modulated_norm, gated_residual

    g = torch.Generator().manual_seed(6)
    batch = 2 if form.endswith("batch") else 1
    norm = nn.LayerNorm(8, elementwise_affine=False, eps=1e-6)
    w = torch.randn(8, 12, generator=g, dtype=torch.float64)
    r = torch.randn(batch, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    source = torch.randn(batch, 5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    mod = torch.randn(batch, 1, 24, generator=g, dtype=torch.float64, requires_grad=True)
    calls = []

    def project(s):
        calls.append(torch.is_grad_enabled())
        return s @ w.T

    def fn(r, source, mod, again=True):
        gate, shift, scale = mod.chunk(3, dim=-1)
        out = source @ w.T
        a = Recompute(source, project) if again else None
        if form == "gated_residual":
            return gated_residual(r, gate, out, a)
        return gated_modulated_norm(norm, r, gate, out, shift, scale, a)

    assert torch.autograd.gradcheck(fn, (r, source, mod))
    assert calls and not any(calls)  # computed again in backward, without autograd
    kept = {}
    for again in (True, False):
        with SavedTensors(exclude=[r, source, mod, w]) as saved:
            res = fn(r, source, mod, again)
        kept[again] = saved.nbytes
        torch.autograd.backward(res, [torch.ones_like(t) for t in (res if isinstance(res, tuple) else (res,))])
    out_bytes = batch * 5 * 8 * 8
    assert kept[False] - kept[True] == out_bytes, (kept, out_bytes)
