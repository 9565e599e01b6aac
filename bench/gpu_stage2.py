"""Stage-2 speed and memory on a FLUX.1-dev-shaped transformer: one JSON line per config.

A ``FluxTransformer2DModel`` with FLUX.1-dev's shape (19 double + 38 single blocks, hidden
3072 = 24 heads x 128, T5 width 4096, pooled 768) and random weights, built directly on the
device (meta-device init, ``to_empty``, in-place init: seconds, nothing downloaded). For each
config it measures the Stage-2 trainer (``train.stage2.personalize`` on the diffusers host; with
``COMFYUI_PATH`` set, also on the ComfyUI host) and the bare frozen forward+backward:

- ``s_per_step``: median of CUDA-synchronised step times after warm-up; ``projected_375_s``;
  ``projected_stage1_h``: the paper's Stage-1 (q_total 50,000 steps of batch 4) on one device at
  this per-step figure, counting a batch-4 step as four batch-1 steps (an upper bound: a larger
  batch uses the device better) and leaving out Down's own gradient (r1 x in per layer, well
  under 1 % of the work); under torchrun with P devices divide by P (batch 4 allows P <= 4).
- ``max_memory_allocated`` (CUDA), ``saved_bytes``: bytes autograd keeps for backward in one
  step (``saved_tensors_hooks``; weights and adapter parameters excluded).
- ``kernels``: CUDA kernels per step (torch.profiler); on the CPU, aten ops that compute
  (``TorchDispatchMode``; views apart; None for a compiled step, which runs eagerly under a
  dispatch mode). ``profiled_kernels`` (CPU, when ``--compile`` includes on): the compute events
  in torch.profiler's trace, inductor's C++ kernels included (``train.profile.ProfiledKernels``);
  a compiled step's ratio is to the compiled bare step.
- ``tflop``: the FLOP model's work per step (frozen weights: input gradients only; the
  recompute of checkpointed blocks counted); ``tflops`` achieved and ``utilisation`` of
  ``--peak-tflops``; ratios to the bare step of the same resolution and weights.

The first line is the FLOP model at FLUX.1-dev's shape for 512 and 1024 (no checkpointing / all
blocks checkpointed). Configs: resolution x weights (bf16, fp8 = float8_e4m3fn storage) x
checkpointing (off, every k-th block, all) x compile (off, on); ``--matrix quick`` (default)
runs a subset that fits a few minutes on one H100/H200, ``full`` the whole product.

    python bench/gpu_stage2.py                       # GPU, FLUX.1-dev shape
    python bench/gpu_stage2.py --tiny                # CPU smoke run in seconds (the tests run it)
    python bench/gpu_stage2.py --device cpu --depth 1 --width 3072 --resolutions 512 --repeats 1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import statistics
import sys
import time
from dataclasses import dataclass

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from metalora_core.formats.prior import make_prior  # noqa: E402
from metalora_core.hosts.diffusers_flux import DiffusersFluxHost, FluxTextCond  # noqa: E402
from metalora_core.lora.flow import add_noise, flow_loss, velocity_target  # noqa: E402
from metalora_core.lora.fp8 import store_linears_fp8  # noqa: E402
from metalora_core.lora.layers import DEFAULT_PRESET, FluxDims  # noqa: E402
from metalora_core.train.profile import OpCounter, ProfiledKernels, SavedTensors  # noqa: E402
from metalora_core.train.recipe import build_adapters  # noqa: E402
from metalora_core.train.stage2 import Stage2Config, flow_step_loss, personalize  # noqa: E402

GIB = 1024**3
ISSUE_TFLOP = {(512, "off"): 44.7, (512, "all"): 66.1, (1024, "off"): 163.7, (1024, "all"): 238.1}


# ----------------------------------------------------------------------------- FLOP model


@dataclass(frozen=True)
class Shape:
    hidden: int = 3072
    mlp: int = 12288
    num_double: int = 19
    num_single: int = 38
    joint: int = 4096  # T5 width (context embedder input)
    in_channels: int = 64  # packed latent channels


def flop_model(shape: Shape, img_tokens: int, txt_tokens: int, checkpointed_blocks: int = 0) -> dict:
    """FLOPs of one Stage-2 step with frozen base weights (2 FLOPs per multiply-add).

    Forward: per block ``2 L (12 h^2)`` for the Linears (double: q, k, v, out and the MLP per
    stream, each token in one stream; single: linear1 = 3h + mlp wide, linear2 back from h + mlp)
    plus ``4 L^2 h`` for attention (Q K^T and P V over the joint sequence), the embedders and the
    final layer. Backward needs input gradients only: the Linears once more (dX = dY W), the
    attention twice (dV, dP, dQ, dK). Checkpointing adds the blocks' forward again.
    """
    h, m, L = shape.hidden, shape.mlp, img_tokens + txt_tokens
    dbl_lin = 2 * L * (4 * h * h + 2 * h * m)  # q, k, v, proj + MLP in + MLP out
    sgl_lin = 2 * L * (h * (3 * h + m) + (h + m) * h)
    attn = 4 * L * L * h
    mod = 2 * (2 * h * 6 * h) * shape.num_double + 2 * h * 3 * h * shape.num_single  # per sample
    blocks_fwd = shape.num_double * (dbl_lin + attn) + shape.num_single * (sgl_lin + attn) + mod
    embed = 2 * txt_tokens * shape.joint * h + 2 * img_tokens * shape.in_channels * h
    final = 2 * img_tokens * h * shape.in_channels
    forward = blocks_fwd + embed + final
    n_blocks = shape.num_double + shape.num_single
    backward = (shape.num_double * dbl_lin + shape.num_single * sgl_lin) + 2 * n_blocks * attn + final
    per_block_fwd = blocks_fwd / n_blocks
    recompute = checkpointed_blocks * per_block_fwd
    total = forward + backward + recompute
    return {"forward_tflop": forward / 1e12, "backward_tflop": backward / 1e12, "recompute_tflop": recompute / 1e12,
            "tflop": total / 1e12, "attention_share": (3 * n_blocks * attn) / total}


def _every(checkpoint: str) -> int:
    """A host's checkpoint_every for the --checkpoint choice: off 0, all 1, k every k-th block."""
    return {"off": 0, "all": 1}.get(checkpoint) if checkpoint in ("off", "all") else int(checkpoint)


def checkpointed(n_blocks: int, checkpoint: str) -> int:
    k = _every(checkpoint)
    return len(range(0, n_blocks, k)) if k else 0


# ----------------------------------------------------------------------------- model


def build_transformer(args, device: torch.device, dtype: torch.dtype):
    """FLUX-shaped diffusers transformer with random weights made on ``device`` (no CPU copy)."""
    from diffusers import FluxTransformer2DModel

    head_dim = 128  # ComfyUI's FLUX assumes 128-wide heads (--tiny: 2 heads)
    cfg = dict(patch_size=1, in_channels=64, num_layers=args.depth, num_single_layers=args.single_depth,
               attention_head_dim=head_dim, num_attention_heads=args.width // head_dim,
               joint_attention_dim=args.joint, pooled_projection_dim=args.pooled, guidance_embeds=True,
               axes_dims_rope=(16, 56, 56))
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg).to(dtype)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:  # fan-in scaled, so activations stay O(1) through the depth
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for b in model.buffers():
            b.zero_()
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- hosts


class CoreBench:
    """The diffusers host with ``train.stage2.personalize``."""

    name = "core"

    def __init__(self, transformer, args, device):
        self.transformer, self.args, self.device = transformer, args, device
        self.dims = FluxDims.from_diffusers_config(transformer.config)

    def host(self, checkpoint: str, compile_on: bool):
        return DiffusersFluxHost(self.transformer, checkpoint_every=_every(checkpoint),
                                 compile_blocks=compile_on)

    def cond(self, g: torch.Generator):
        a = self.args
        return FluxTextCond(torch.randn(1, a.text_tokens, a.joint, generator=g), torch.randn(1, a.pooled, generator=g),
                            torch.zeros(a.text_tokens, 3))

    def weights(self):
        return list(self.transformer.parameters())

    def to_fp8(self) -> int:
        return store_linears_fp8(self.transformer)

    def bare(self, host):
        """Makes ``host`` run the frozen model; returns what to remove afterwards (or None)."""
        return None

    def adapters(self):
        """Meta-LoRA adapters on a random prior (Down frozen), as the Stage-2 recipe builds them."""
        prior = make_prior(self.dims, r1=self.args.r1, preset=self.args.preset, generator=torch.Generator().manual_seed(0))
        return build_adapters(self.dims, prior, rank=self.args.r2)


class ComfyBench(CoreBench):
    """The ComfyUI host (nodes/comfy_host.py) on ComfyUI's own FLUX built from the same weights."""

    name = "comfy"

    def __init__(self, transformer, args, device, weights: str):
        comfy_path = pathlib.Path(os.environ["COMFYUI_PATH"])
        if str(comfy_path) not in sys.path:
            sys.path.insert(0, str(comfy_path))
        if "comfy.cli_args" not in sys.modules:
            import comfy.options

            comfy.options.enable_args_parsing()
            argv, sys.argv = sys.argv, [str(comfy_path / "main.py"), "--disable-api-nodes"]
            if device.type == "cpu":  # and the attention ComfyUI runs on an NVIDIA GPU (its CPU default differs)
                sys.argv += ["--cpu", "--use-pytorch-cross-attention"]
            try:
                import comfy.cli_args  # noqa: F401
            finally:
                sys.argv = argv
        import comfy.sd

        spec = importlib.util.spec_from_file_location("metalora_pack", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules["metalora_pack"] = pack
        spec.loader.exec_module(pack)
        from metalora_pack.nodes import comfy_host

        from metalora_pack.metalora_core.formats.prior import make_prior as pack_make_prior
        from metalora_pack.metalora_core.train.recipe import build_adapters as pack_build_adapters

        self.comfy_host = comfy_host
        self._make_prior, self._build_adapters = pack_make_prior, pack_build_adapters  # the pack's own classes
        dtype = torch.float8_e4m3fn if weights == "fp8" else torch.bfloat16
        sd = transformer.state_dict()  # diffusers keys: ComfyUI converts them itself
        self.model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
        if self.model is None:
            raise RuntimeError("ComfyUI did not recognise the FLUX state dict")
        if args.comfy_compute == "bf16":  # what ComfyUI computes in on a GPU (on a CPU it picks float32)
            self.model.model.manual_cast_dtype = torch.bfloat16
        del sd
        self.args, self.device = args, device
        self.dims = comfy_host.flux_dims(self.model)

    def host(self, checkpoint: str, compile_on: bool):
        if compile_on:
            raise RuntimeError("compile is not wired into the ComfyUI host")
        return self.comfy_host.ComfyFluxHost(self.model, checkpoint_every=_every(checkpoint))

    def cond(self, g: torch.Generator):
        a = self.args
        return self.comfy_host.ComfyFluxCond(torch.randn(1, a.text_tokens, a.joint, generator=g),
                                             torch.randn(1, a.pooled, generator=g), 1.0)

    def weights(self):
        return list(self.model.model.diffusion_model.parameters())

    def to_fp8(self) -> int:
        raise RuntimeError("the ComfyUI host loads fp8 weights itself")

    def bare(self, host):
        """The host's out-of-place blocks with the adapters switched off (ComfyUI's own math)."""
        handle = host.attach(self.adapters())
        host._blocks.adapters_on = False
        return handle

    def adapters(self):
        prior = self._make_prior(self.dims, r1=self.args.r1, preset=self.args.preset,
                                 generator=torch.Generator().manual_seed(0))
        return self._build_adapters(self.dims, prior, rank=self.args.r2)


# ----------------------------------------------------------------------------- measuring


def measure_step(bench, host, adapters, latents, cond, device, *, count_kernels: bool, profile_cpu: bool = False,
                 saved_tensors=SavedTensors):
    """(saved bytes, kernels, profiled kernels) of one step: the bare frozen step when ``adapters`` is None.

    On the CPU ``kernels`` is ``OpCounter``'s count (None for a compiled step: under a dispatch mode
    torch.compile runs eagerly) and, with ``profile_cpu``, ``profiled`` is ``ProfiledKernels``'
    count (compiled graphs included); on CUDA ``kernels`` counts CUDA kernels and ``profiled`` is None.
    ``saved_tensors(exclude=...)`` makes the saved-bytes counter (``SavedTensors`` or one that also
    sees a host's own saved-tensor hooks).
    """
    g = torch.Generator().manual_seed(1)
    saved = None  # made inside training(): the host may move the weights there
    kernels = profiled = None

    def step():
        if adapters is None:
            x0 = torch.stack(latents[:1]).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            sigma = torch.tensor([0.5], device=device)
            xt = add_noise(x0, noise, sigma).requires_grad_(True)
            with saved:
                loss = flow_loss(host.predict(xt, sigma, cond), velocity_target(x0, noise))
        else:
            with saved:
                loss = flow_step_loss(host, latents[:1], cond, g, sigma_mode="logit_normal", use_shift=False)
        loss.backward()

    if adapters is not None:
        adapters.to(device)
    handle = host.attach(adapters) if adapters is not None else bench.bare(host)
    try:
        with host.training(), torch.enable_grad():
            saved = saved_tensors(exclude=saved_exclude(bench, adapters, handle))
            if count_kernels and device.type == "cuda":
                from torch.profiler import ProfilerActivity, profile

                step()  # warm (allocator, cuBLAS handles)
                clear_grads(adapters)  # the trainer starts each step with no gradients
                saved = saved_tensors(exclude=saved_exclude(bench, adapters, handle))
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step()
                    sync(device)
                kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
            elif count_kernels or profile_cpu:
                step()  # warm, as on CUDA: what is built once per run (cached Downs) is not a per-step cost
                clear_grads(adapters)
                saved = saved_tensors(exclude=saved_exclude(bench, adapters, handle))
                if profile_cpu:
                    with ProfiledKernels() as prof:
                        step()
                    profiled = prof.kernels
                    clear_grads(adapters)
                if count_kernels:
                    saved = saved_tensors(exclude=saved_exclude(bench, adapters, handle))
                    counter = OpCounter()
                    with counter:
                        step()
                    kernels = counter.kernels
            else:
                step()
    finally:
        if handle is not None:
            handle.remove()
        if adapters is not None:
            adapters.to("cpu")
            clear_grads(adapters)
    return saved.nbytes, kernels, profiled


def clear_grads(adapters) -> None:
    if adapters is not None:
        for p in adapters.parameters():
            p.grad = None


def saved_exclude(bench, adapters, handle):
    """What a step's saved tensors do not cost: the weights, the adapters' parameters and what the
    attachment caches for the whole run (``cached_tensors``: the frozen Downs a compiled graph saves)."""
    cached = getattr(handle, "cached_tensors", lambda: [])()
    return bench.weights() + (list(adapters.parameters()) if adapters is not None else []) + cached


def time_bare(host, latents, cond, device, n: int) -> list[float]:
    g = torch.Generator().manual_seed(2)
    x0 = torch.stack(latents[:1]).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    sigma = torch.tensor([0.5], device=device)
    times = []
    with host.training(), torch.enable_grad():
        for _ in range(n):
            xt = add_noise(x0, noise, sigma).requires_grad_(True)
            sync(device)
            t = time.perf_counter()
            flow_loss(host.predict(xt, sigma, cond), velocity_target(x0, noise)).backward()
            sync(device)
            times.append(time.perf_counter() - t)
    return times


def time_trainer(host, adapters, latents, cond, device, n: int) -> list[float]:
    """Step times of ``personalize`` itself, synchronised in its per-step callback."""
    marks: list[float] = []

    def cb(step: int, loss: float) -> None:
        sync(device)
        marks.append(time.perf_counter())

    sync(device)
    t0 = time.perf_counter()
    personalize(host, adapters, latents, cond, Stage2Config(steps=n, seed=0), cb)
    return [b - a for a, b in zip([t0, *marks[:-1]], marks)]


def configs(args) -> list[tuple[str, str, str, bool]]:
    """(weights, mode, checkpoint, compile) in run order: bf16 first (fp8 conversion is one-way)."""
    out = []
    every = str(args.checkpoint_every)
    for weights in args.weights:
        out.append((weights, "bare", "off", False))
        if True in args.compile and (args.matrix == "full" or weights == "bf16"):
            out.append((weights, "bare", "off", True))  # what a compiled step is measured against
        if args.matrix == "full":
            for ck in ("off", every, "all"):
                for comp in args.compile:
                    out.append((weights, "metalora", ck, comp))
        else:
            for ck in (("off", every, "all") if weights == "bf16" else ("off", "all")):
                out.append((weights, "metalora", ck, False))
            if weights == "bf16" and True in args.compile:
                out.append((weights, "metalora", "off", True))
    keep = {"off": "off", "k": every, "all": "all"}
    chosen = {keep[c] for c in args.checkpoints} if args.checkpoints else set(keep.values())
    return [c for c in out if (c[3] in args.compile and c[2] in chosen) or c[1] == "bare"]


def run_host(host_name, args, device, peak, emit):
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    shape = Shape(hidden=args.width, mlp=4 * args.width, num_double=args.depth, num_single=args.single_depth,
                  joint=args.joint)
    transformer = build_transformer(args, device, dtype)
    bench = CoreBench(transformer, args, device) if host_name == "core" else None
    current_weights = None
    baseline: dict[tuple, dict] = {}
    t_start = time.perf_counter()
    for weights, mode, ck, comp in configs(args):
        if time.perf_counter() - t_start > args.max_seconds:
            emit({"host": host_name, "weights": weights, "mode": mode, "checkpoint": ck, "compile": comp,
                  "skipped": f"--max-seconds {args.max_seconds} reached"})
            continue
        try:
            if weights != current_weights:
                if host_name == "comfy":
                    if bench is not None:  # the previous ComfyUI model leaves the card first
                        import comfy.model_management

                        bench = None
                        comfy.model_management.unload_all_models()
                        comfy.model_management.soft_empty_cache()
                    bench = ComfyBench(transformer, args, device, weights)
                elif weights == "fp8":
                    bench.to_fp8()
                current_weights = weights
        except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
            emit({"host": host_name, "weights": weights, "error": f"{type(e).__name__}: {e}"})
            continue
        for res in args.resolutions:
            rec = {"host": host_name, "mode": mode, "resolution": res, "weights": weights, "dtype": args.dtype,
                   "checkpoint": ck, "compile": comp}
            try:
                rec.update(run_config(bench, args, device, shape, res, mode, ck, comp, peak))
                if mode == "bare":
                    baseline[(weights, res, comp)] = rec
                base = baseline.get((weights, res, comp))  # the bare step with the same compile setting
                if base is not None and mode != "bare":
                    for k in ("s_per_step", "saved_bytes", "kernels", "profiled_kernels"):
                        if rec.get(k) is not None and base.get(k):
                            rec[f"{k}_ratio_to_bare"] = round(rec[k] / base[k], 4)
            except Exception as e:  # noqa: BLE001
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            emit(rec)


STAGE1_ITEMS = 50_000 * 4  # the paper's Stage-1: q_total 50,000 steps, batch 4


def run_config(bench, args, device, shape, res, mode, ck, comp, peak) -> dict:
    side = res // 8  # VAE latent side; FLUX packs 2x2 latent pixels per token
    img_tokens = (side // 2) ** 2
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(16, side, side, generator=g) for _ in range(3)]
    cond = bench.cond(g)
    host = bench.host(ck, comp)
    n_blocks = bench.dims.num_double + bench.dims.num_single
    flops = flop_model(shape, img_tokens, args.text_tokens, checkpointed(n_blocks, ck))
    adapters = None
    if mode == "metalora":
        adapters = bench.adapters()
    saved, kernels, profiled = measure_step(bench, host, adapters, latents, cond, device,
                                            count_kernels=not (comp and device.type != "cuda"),
                                            profile_cpu=device.type == "cpu" and True in args.compile)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n = args.warmup + args.repeats
    times: list[float] = []
    if n == 0:  # --repeats 0 --warmup 0: memory and kernels only (a CPU at full width)
        pass
    elif mode == "bare":
        handle = bench.bare(host)
        try:
            times = time_bare(host, latents, cond, device, n)
        finally:
            if handle is not None:
                handle.remove()
    else:
        times = time_trainer(host, adapters, latents, cond, device, n)
    med = statistics.median(times[args.warmup:] or times) if times else None
    out = {"compute_dtype": str(host.dtype).replace("torch.", ""),
           "image_tokens": img_tokens, "text_tokens": args.text_tokens, "blocks": n_blocks,
           "checkpointed_blocks": checkpointed(n_blocks, ck), "repeats": len(times[args.warmup:] or times),
           "s_per_step": None if med is None else round(med, 5),
           "projected_375_s": None if med is None else round(375 * med, 1),
           "projected_stage1_h": None if med is None else _sig(STAGE1_ITEMS * med / 3600, 4),
           "max_memory_allocated": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
           "saved_bytes": saved, "saved_gib": round(saved / GIB, 4), "kernels": kernels,
           "profiled_kernels": profiled,
           "tflop": _sig(flops["tflop"]), "tflops": None if med is None else _sig(flops["tflop"] / med),
           "utilisation": _sig(flops["tflop"] / med / peak) if peak and med else None}
    if adapters is not None:
        out["adapted_layers"] = len(adapters.names)
    return out


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny widths on the CPU: a smoke run in seconds")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--width", type=int, default=None,
                    help="hidden width, a multiple of 128 (heads x 128); default 3072 (--tiny: 256)")
    ap.add_argument("--depth", type=int, default=None, help="double blocks; default 19 (--tiny: 1)")
    ap.add_argument("--single-depth", type=int, default=None, help="default: 2 x --depth (FLUX: 38)")
    ap.add_argument("--resolutions", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="default 512,1024 (--tiny: 128)")
    ap.add_argument("--text-tokens", type=int, default=None, help="default 512 (--tiny: 16)")
    ap.add_argument("--weights", type=lambda s: s.split(","), default=["bf16", "fp8"])
    ap.add_argument("--compile", type=lambda s: [x == "on" for x in s.split(",")], default=[False, True],
                    help="off,on")
    ap.add_argument("--checkpoint-every", type=int, default=2, help="k of the every-k-th-block config")
    ap.add_argument("--compose", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                    metavar="DOUBLE,SINGLE", help="measure 1+2, 2+2 and 1+3 blocks and compose the figures at "
                    "DOUBLE+SINGLE blocks (e.g. 19,38: FLUX.1-dev at a width whose whole depth does not fit)")
    ap.add_argument("--checkpoints", type=lambda s: s.split(","), default=None,
                    help="checkpointing configs to run, of off,k,all (default: all three)")
    ap.add_argument("--matrix", choices=["quick", "full"], default="quick")
    ap.add_argument("--hosts", type=lambda s: s.split(","), default=None, help="core,comfy (comfy needs COMFYUI_PATH)")
    ap.add_argument("--comfy-compute", choices=["auto", "bf16"], default="auto",
                    help="the ComfyUI host's compute dtype: ComfyUI's choice (float32 on a CPU), or bf16 as on a GPU")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--r1", type=int, default=16)
    ap.add_argument("--r2", type=int, default=1)
    ap.add_argument("--preset", default=DEFAULT_PRESET)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; default 989 on CUDA")
    ap.add_argument("--max-seconds", type=float, default=240,
                    help="per host: configs not started after this many seconds are reported as skipped")
    args = ap.parse_args(argv)
    # what is not given explicitly: FLUX.1-dev's shape, or with --tiny a smoke-run shape
    for name, flux, tiny in (("width", 3072, 256), ("depth", 19, 1), ("resolutions", [512, 1024], [128]),
                             ("text_tokens", 512, 16)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else flux)
    if args.tiny:
        args.device = args.device or "cpu"
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
        args.r1 = min(args.r1, 4)
        args.max_seconds = 1e9 if args.max_seconds == 240 else args.max_seconds  # a smoke run does all
    args.joint, args.pooled = (32, 32) if args.tiny else (4096, 768)
    args.single_depth = 2 * args.depth if args.single_depth is None else args.single_depth
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.width % 128:
        raise SystemExit(f"--width must be a multiple of 128 (FLUX heads are 128 wide), got {args.width}")
    if args.checkpoints and not set(args.checkpoints) <= {"off", "k", "all"}:
        raise SystemExit(f"--checkpoints takes off,k,all; got {args.checkpoints}")
    if args.weights and not set(args.weights) <= {"bf16", "fp8"}:
        raise SystemExit(f"--weights takes bf16,fp8; got {args.weights}")
    if device.type == "cpu" and True in args.compile:  # inductor's C++ kernels show in the profiler
        from torch._inductor import config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if device.type == "cuda" else None)
    hosts = args.hosts or (["core", "comfy"] if os.environ.get("COMFYUI_PATH") else ["core"])
    if "comfy" in hosts and not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("--hosts comfy needs COMFYUI_PATH (a ComfyUI checkout)")

    def emit(rec: dict) -> None:
        print(json.dumps(rec), flush=True)

    flux = Shape()
    model = {"flop_model": "FLUX.1-dev, frozen weights (input gradients only), 512 text tokens"}
    for res in (512, 1024):
        img = (res // 16) ** 2
        for ck in ("off", "all"):
            f = flop_model(flux, img, 512, checkpointed(57, ck))
            model[f"{res}_ckpt_{ck}_tflop"] = round(f["tflop"], 2)
            model[f"{res}_ckpt_{ck}_issue_tflop"] = ISSUE_TFLOP[(res, ck)]
    emit(model)
    emit({"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
          "torch": torch.__version__, "width": args.width, "double": args.depth, "single": args.single_depth,
          "dtype": args.dtype, "hosts": hosts, "peak_tflops": peak, "threads": torch.get_num_threads()})
    if args.compose is not None and (len(args.compose) != 2 or args.compose[0] < 1 or args.compose[1] < 2):
        raise SystemExit(f"--compose takes DOUBLE,SINGLE with at least 1 double and 2 single blocks; got {args.compose}")
    if args.compose is None:
        for h in hosts:
            run_host(h, args, device, peak, emit)
        return
    measured: dict[tuple, dict] = {}

    def collect(rec: dict) -> None:
        rec["shape"] = [args.depth, args.single_depth]
        emit(rec)
        if "error" not in rec and "skipped" not in rec:
            measured[(rec["host"], rec["weights"], rec["mode"], rec["checkpoint"], rec["compile"], rec["resolution"],
                      args.depth, args.single_depth)] = rec

    for d, s in COMPOSE_SHAPES:
        args.depth, args.single_depth = d, s
        for h in hosts:
            run_host(h, args, device, peak, collect)
    for rec in compose(measured, *args.compose):
        emit(rec)


# (double, single) shapes measured for --compose. The first block is unlike the others (with
# adapters its input needs no gradient, unlike the bare step's) and so are the first and the last
# single block: the shapes vary a double block and a single block in the middle.
COMPOSE_SHAPES = ((1, 2), (2, 2), (1, 3))
COMPOSED = ("saved_bytes", "kernels", "profiled_kernels", "s_per_step")


def compose(measured: dict[tuple, dict], double: int, single: int) -> list[dict]:
    """Figures at ``double`` + ``single`` blocks (double >= 1, single >= 2) from the ``COMPOSE_SHAPES``
    runs, per config: f(1,2) + (double - 1) * [f(2,2) - f(1,2)] + (single - 2) * [f(1,3) - f(1,2)].
    Only without checkpointing or with every block checkpointed (every k-th block does not compose)."""
    out, bare = [], {}
    keys = sorted({k[:6] for k in measured}, key=lambda k: (k[2] != "bare", str(k)))
    for key in keys:
        host, weights, mode, ck, comp, res = key
        runs = [measured.get(key + shape) for shape in COMPOSE_SHAPES]
        if None in runs or ck not in ("off", "all"):
            continue
        one, two_double, two_single = runs
        rec = {"host": host, "mode": mode, "resolution": res, "weights": weights, "checkpoint": ck, "compile": comp,
               "composed": [double, single], "from_shapes": [list(s) for s in COMPOSE_SHAPES]}
        for f in COMPOSED:
            if all(r.get(f) is not None for r in runs):
                value = one[f] + (double - 1) * (two_double[f] - one[f]) + (single - 2) * (two_single[f] - one[f])
                rec[f] = _sig(value) if f == "s_per_step" else int(value)
        if mode == "bare":
            bare[(host, weights, res, comp)] = rec
        base = bare.get((host, weights, res, comp))
        if base is not None and mode != "bare":
            for f in COMPOSED:
                if rec.get(f) is not None and base.get(f):
                    rec[f"{f}_ratio_to_bare"] = round(rec[f] / base[f], 4)
        if rec.get("saved_bytes") is not None:
            rec["saved_gib"] = round(rec["saved_bytes"] / GIB, 4)
        out.append(rec)
    return out


if __name__ == "__main__":
    main()
