"""Stage-2 step cost per model family in a real ComfyUI, on the CPU: one markdown table and one JSON line.

Small random-weight models of FLUX.1-dev, FLUX.2 and Z-Image, built as ComfyUI builds them (its own
model classes from state dicts with its key names; ``tests/comfy_fixtures.py``), with the pack
loaded as ComfyUI loads a custom node pack. For each family and each ComfyUI path of the Train node:

- ``fast``: the FLUX.1 host with its out-of-place block copy (``nodes/comfy_host.py``), FLUX.1 only;
- ``generic``: ComfyUI's own model code through its weight-adapter bypass (``nodes/generic_host.py``),
  every family;

it measures, with Meta-LoRA attached (a random orthonormal prior, preset ``--preset``, no
checkpointing: what the Train node runs on a CPU):

- ``s_per_step`` (and ``s_min``): median (and least) seconds of a Stage-2 step
  (``train.stage2.personalize``: noise and sigmas, forward, backward, gradient clipping, AdamW on
  Mid and Up) over ``--rounds`` rounds of ``--repeats`` timed steps, each after ``--warmup``
  untimed ones; each round times every path of the family in turn;
- ``saved_bytes``: bytes autograd keeps for backward in one step (weights and adapter parameters
  excluded; ``train.profile.SavedTensors``);
- ``kernels``: aten ops that compute in one step's forward and backward (``train.profile.OpCounter``);

and the same three of the bare step (``path`` ``bare``): ComfyUI's own model forward and backward
with nothing attached and the input needing its gradient, through the generic host, which keeps what
ComfyUI's in-place residual adds would overwrite. Ratios: to the family's bare step and, for FLUX.1's
generic path, to its fast path. The measuring is ``bench/gpu_stage2.py``'s (``measure_step``,
``time_bare``, ``time_trainer``).

ComfyUI runs on the CPU with PyTorch's attention (``--use-pytorch-cross-attention``, what it runs on
an NVIDIA GPU; ``--attention comfy`` keeps its CPU default) in float32, single-threaded by default.

    python bench/families.py            # the table in docs/performance.md (about five minutes)
    python bench/families.py --smoke    # the tiniest models, one timed step: seconds (a test runs it)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass

import torch

HERE = pathlib.Path(__file__).resolve().parent
for _p in (HERE, HERE.parent / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import comfy_fixtures as cf  # noqa: E402
from gpu_stage2 import measure_step, time_bare, time_trainer  # noqa: E402

from metalora_core.train.profile import SavedTensors  # noqa: E402  (gpu_stage2 put the repository on the path)

FAMILIES = ("flux1", "flux2", "zimage")
PATHS = {"flux1": ("fast", "generic"), "flux2": ("generic",), "zimage": ("generic",)}
TITLES = {"flux1": "FLUX.1-dev", "flux2": "FLUX.2", "zimage": "Z-Image"}


@dataclass(frozen=True)
class Size:
    """One run's model and batch sizes (every family at one width)."""

    width: int  # hidden width of every family, heads of 128 (Z-Image in ComfyUI 0.33 needs 256 or more)
    double: int  # FLUX double blocks (FLUX.1, FLUX.2)
    single: int  # FLUX single blocks
    layers: int  # Z-Image main layers (plus one noise and one context refiner layer)
    resolution: int  # image side in pixels: 256 px gives 256 image tokens in every family
    text_tokens: int  # ComfyUI pads FLUX.2's to 512
    text_width: int  # the text states' width (every family's text input at this width)


SIZES = {"full": Size(width=512, double=2, single=4, layers=6, resolution=256, text_tokens=512, text_width=256),
         "smoke": Size(width=256, double=1, single=1, layers=1, resolution=64, text_tokens=8, text_width=32)}


def build_model(family: str, size: Size):
    """A float32 ComfyUI MODEL of ``family`` at ``size``: FLUX.1 and FLUX.2 detected by ComfyUI from
    their weights, Z-Image built from ComfyUI's ``supported_models.ZImage`` (detected at 3840 wide only)."""
    import comfy.sd

    w = size.width
    if family == "flux1":
        sd = cf.tiny_flux_state_dict(0, hidden_size=w, depth=size.double, depth_single_blocks=size.single,
                                     context_in_dim=size.text_width, vec_in_dim=size.text_width)
        return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    if family == "flux2":
        config = dict(cf.TINY_FLUX2_CONFIG, hidden_size=w, num_heads=w // 128, depth=size.double,
                      depth_single_blocks=size.single, context_in_dim=size.text_width)
        sd = cf.comfy_module_state_dict("flux", config, seed=0)
        return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    config = dict(cf.TINY_ZIMAGE_CONFIG, dim=w, n_heads=w // 128, n_kv_heads=w // 128, n_layers=size.layers,
                  n_refiner_layers=1, cap_feat_dim=size.text_width,
                  axes_dims=cf.ZIMAGE_FULL_CONFIG["axes_dims"], axes_lens=[1024, 128, 128])  # Z-Image's 128-wide heads
    return cf.tiny_zimage_model(cf.comfy_module_state_dict("lumina", config, seed=0), config=config)


class KeptForBackward(SavedTensors):
    """``SavedTensors`` that also counts what the generic host keeps for backward. Its copy-on-write
    mode (``CopyOnWriteSaved``) packs saved tensors with hooks of its own, which hide them from
    ``SavedTensors``' hooks, so the tensors it holds are read when each of its forwards ends: what it
    keeps then, the copies it made before ComfyUI's in-place writes included."""

    def __init__(self, copy_on_write: type, exclude=()) -> None:
        super().__init__(exclude)
        self._cow, self._held, self._restore = copy_on_write, [], None

    def __enter__(self) -> "KeptForBackward":
        cow, real_pack, real_active = self._cow, self._cow._pack, self._cow.active

        def pack(mode, t):
            s = real_pack(mode, t)
            self._held.append(weakref.ref(s))
            return s

        @contextlib.contextmanager
        def active(mode):
            with real_active(mode):
                yield
            self._harvest()

        self._restore = (real_pack, real_active)
        cow._pack, cow.active = pack, active
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._cow._pack, self._cow.active = self._restore
        self._harvest()

    def _harvest(self) -> None:
        for ref in self._held:
            s = ref()
            if s is not None:
                self._pack(s.tensor)  # counted once per storage, weights excluded
        self._held.clear()


class _Unattach:
    def __init__(self, host) -> None:
        self.host = host

    def remove(self) -> None:
        self.host.patcher = None


class FamilyBench:
    """One family's ComfyUI MODEL, its batch and its hosts, in the form ``gpu_stage2.measure_step`` takes."""

    def __init__(self, family: str, size: Size, args: argparse.Namespace) -> None:
        self.family, self.args = family, args
        self.comfy_host, self.generic = cf.pack("nodes.comfy_host"), cf.pack("nodes.generic_host")
        self.model = build_model(family, size)
        if family == "flux1":
            self.dims = self.comfy_host.flux_dims(self.model)
        else:
            self.dims = cf.pack("nodes.training").generic_family_dims(self.model)
        expected = getattr(cf.pack("metalora_core.lora.families"), family.upper())  # FLUX1, FLUX2, ZIMAGE
        if self.dims is None or self.dims.family is not expected:
            raise RuntimeError(f"the {TITLES[family]} model was not recognised as {TITLES[family]}: {self.dims}")
        fmt = self.model.model.latent_format
        side = size.resolution // fmt.spacial_downscale_ratio
        g = torch.Generator().manual_seed(0)
        self.latents = [torch.randn(fmt.latent_channels, side, side, generator=g) for _ in range(2)]
        extra = {"pooled_output": torch.randn(1, size.text_width, generator=g)} if family == "flux1" else {}
        self.cond = self.comfy_host.ComfyFluxCond.from_conditioning(
            [[torch.randn(1, size.text_tokens, size.text_width, generator=g) * 0.5, extra]])
        self.image_tokens = (size.resolution // self.dims.family.pixels_per_token) ** 2
        # the text tokens the model reads, as ComfyUI's conditioning makes them (FLUX.2 pads to 512)
        x = torch.stack(self.latents[:1])
        self.text_tokens = int(self.host("generic").model_conds(self.cond, x)["c_crossattn"].shape[1])

    def host(self, path: str):
        if path == "fast":
            return self.comfy_host.ComfyFluxHost(self.model, checkpoint_every=0)
        if self.family == "flux1":  # the host the Train node falls back to on FLUX.1
            return self.generic.ComfyGenericHost.flux(self.model)
        return self.generic.ComfyGenericHost.of_family(self.model, self.dims)

    def weights(self) -> list[torch.Tensor]:
        return list(self.model.model.diffusion_model.parameters())

    def bare(self, host) -> "_Unattach":
        """Makes the generic ``host`` run ComfyUI's own model with nothing attached: a clone of the
        MODEL with no injections, loaded by ``host.training()`` as an attached one is."""
        host.patcher = host.source.clone()
        return _Unattach(host)

    def adapters(self):
        """Meta-LoRA adapters on a random orthonormal prior, the pack's own classes."""
        prior = cf.pack("metalora_core.formats.prior").make_prior(
            self.dims, r1=self.args.r1, preset=self.args.preset, generator=torch.Generator().manual_seed(0))
        return cf.pack("metalora_core.train.recipe").build_adapters(self.dims, prior, rank=self.args.r2)


def counts(bench: FamilyBench, path: str) -> dict:
    """Bytes saved for backward and kernels of one step of ``path`` (the bare step for ``"bare"``)."""
    def saved_tensors(exclude):
        return KeptForBackward(bench.generic.CopyOnWriteSaved, exclude)

    host = bench.host("generic" if path == "bare" else path)
    adapters = None if path == "bare" else bench.adapters()
    saved, kernels, _ = measure_step(bench, host, adapters, bench.latents, bench.cond, torch.device("cpu"),
                                     count_kernels=True, saved_tensors=saved_tensors)
    return {"family": bench.family, "title": TITLES[bench.family], "path": path, "saved_bytes": saved,
            "kernels": kernels, "adapted_layers": 0 if adapters is None else len(adapters.names),
            "image_tokens": bench.image_tokens, "text_tokens": bench.text_tokens, "dims": dict(vars(bench.dims))}


def step_times(bench: FamilyBench, path: str, args: argparse.Namespace, adapters) -> list[float]:
    """Seconds of ``args.repeats`` steps of ``path`` after ``args.warmup`` untimed ones: Stage-2 steps of
    ``personalize``, or bare forward+backward steps of ComfyUI's own model for ``"bare"``."""
    dev, n = torch.device("cpu"), args.warmup + args.repeats
    if path == "bare":
        host = bench.host("generic")
        handle = bench.bare(host)
        try:
            times = time_bare(host, bench.latents, bench.cond, dev, n)
        finally:
            handle.remove()
    else:
        times = time_trainer(bench.host(path), adapters, bench.latents, bench.cond, dev, n)
    return times[args.warmup:]


def measure_family(bench: FamilyBench, args: argparse.Namespace) -> list[dict]:
    """The family's rows: counts once, then ``args.rounds`` rounds of timed steps of every path in turn
    (a burst of load on a shared machine then spreads over the paths instead of landing on one)."""
    paths = ("bare", *PATHS[bench.family])
    rows = {path: counts(bench, path) for path in paths}
    adapters = {path: bench.adapters() for path in paths if path != "bare"}
    times: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(args.rounds):
        for path in paths:
            times[path] += step_times(bench, path, args, adapters.get(path))
    for path, row in rows.items():
        row.update(s_per_step=round(statistics.median(times[path]), 5), s_min=round(min(times[path]), 5),
                   steps_timed=len(times[path]))
    return list(rows.values())


def add_ratios(rows: list[dict]) -> None:
    """Each row's figures over its family's bare step, and FLUX.1 generic's s/step over the fast path's."""
    bare = {r["family"]: r for r in rows if r["path"] == "bare"}
    fast = next((r for r in rows if r["path"] == "fast"), None)
    for r in rows:
        b = bare.get(r["family"])
        for k in ("s_per_step", "saved_bytes", "kernels"):
            r[f"{k}_vs_bare"] = round(r[k] / b[k], 3) if b is not None and r["path"] != "bare" else None
        r["s_per_step_vs_fast"] = (round(r["s_per_step"] / fast["s_per_step"], 3)
                                   if fast is not None and r["family"] == "flux1" and r["path"] == "generic" else None)


def check_rows(rows: list[dict]) -> None:
    """Raises SystemExit naming the first row with a figure that is not a finite positive number."""
    for r in rows:
        for k in ("s_per_step", "saved_bytes", "kernels"):
            v = r.get(k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise SystemExit(f"{r['title']} {r['path']}: {k} is {v!r}, not a finite positive number; the "
                                 "measurement failed (see the table above)")


def table(rows: list[dict]) -> str:
    def x(v) -> str:
        return "" if v is None else f"{v:.2f}x"

    out = ["| family | path | s/step (min) | vs bare | vs fast FLUX.1 | saved for backward | vs bare | kernels | vs bare |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        path = "bare forward+backward" if r["path"] == "bare" else r["path"]
        out.append(f"| {r['title']} | {path} | {r['s_per_step']:.3f} ({r['s_min']:.3f}) | {x(r['s_per_step_vs_bare'])} | "
                   f"{x(r['s_per_step_vs_fast'])} | {r['saved_bytes'] / 2**20:.2f} MiB | {x(r['saved_bytes_vs_bare'])} | "
                   f"{r['kernels']:,} | {x(r['kernels_vs_bare'])} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the tiniest models and one timed step (seconds)")
    ap.add_argument("--families", type=lambda s: s.split(","), default=list(FAMILIES), help="of flux1,flux2,zimage")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each round's timed ones")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per path and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of timed steps, every path in turn")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--attention", choices=["pytorch", "comfy"], default="pytorch",
                    help="PyTorch's attention (what ComfyUI runs on an NVIDIA GPU) or ComfyUI's CPU default")
    ap.add_argument("--preset", default="all")
    ap.add_argument("--r1", type=int, default=16)
    ap.add_argument("--r2", type=int, default=1)
    args = ap.parse_args(argv)
    if not set(args.families) <= set(FAMILIES) or not args.families:
        raise SystemExit(f"--families takes some of {','.join(FAMILIES)}; got {','.join(args.families)}")
    if args.warmup < 0 or args.repeats < 1 or args.rounds < 1:
        raise SystemExit(f"--warmup must be >= 0, --repeats and --rounds >= 1; got {args.warmup}, {args.repeats} "
                         f"and {args.rounds}")
    if cf.comfyui_path() is None:
        raise SystemExit(f"bench/families.py runs in a real ComfyUI: set {cf.COMFYUI_ENV} to a ComfyUI checkout "
                         "(the folder with main.py) and run it with that ComfyUI's Python")
    if args.smoke:
        args.warmup, args.repeats, args.rounds, args.r1 = min(args.warmup, 1), 1, 1, min(args.r1, 4)
    size = SIZES["smoke" if args.smoke else "full"]
    torch.set_num_threads(args.threads)
    base = pathlib.Path(tempfile.mkdtemp(prefix="metalora_families_"))
    comfy_args = ["--use-pytorch-cross-attention"] if args.attention == "pytorch" else []
    cf.load_comfy_in_process(base, custom_node_paths=[cf.REPO], comfy_args=comfy_args)
    load_before = os.getloadavg()
    rows = []
    t0 = time.perf_counter()
    for family in args.families:
        rows += measure_family(FamilyBench(family, size, args), args)
    add_ratios(rows)
    import comfyui_version

    meta = {"bench": "families", "mode": "smoke" if args.smoke else "full", "size": vars(size),
            "preset": args.preset, "r1": args.r1, "r2": args.r2, "warmup": args.warmup, "repeats": args.repeats, "rounds": args.rounds,
            "threads": torch.get_num_threads(), "attention": args.attention,
            "comfyui": comfyui_version.__version__, "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()], "seconds": round(time.perf_counter() - t0, 1)}
    print(f"Stage-2 step per model family, ComfyUI {meta['comfyui']}, CPU ({meta['cpus']} cores, load "
          f"{meta['loadavg_before'][0]} before / {meta['loadavg_after'][0]} after), {meta['threads']} thread(s), "
          f"float32, width {size.width}, " + ", ".join(sorted({f"{r['title']} {r['image_tokens']} image + "
                                                             f"{r['text_tokens']} text tokens" for r in rows})) + ", "
          f"preset {args.preset}, r1 {args.r1}, r2 {args.r2}, "
          f"s/step: median (min) of {args.rounds} x {args.repeats} step(s) after {args.warmup} untimed per round:\n")
    print(table(rows))
    print(json.dumps({**meta, "rows": rows}))
    check_rows(rows)
    return {**meta, "rows": rows}


if __name__ == "__main__":
    main()
