"""Data-parallel runs under ``torchrun``: the process group and the few collectives Stage-1 needs.

``torchrun`` starts one process per device and sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``
(plus the rendezvous address). ``from_env`` reads them; without them (a plain ``python`` or
``metalora`` call) there is no process group and nothing here is used, so a single-process run is
exactly what it was. A ``WORLD_SIZE`` of 1 is a single process too.

Two groups: the default one (NCCL when training on CUDA, gloo on the CPU) carries the per-step
gradient all-reduce on the training device; a gloo group on the CPU carries the Python objects of
the rare control and bank traffic (errors, checkpoints, identity layers at a bucket change), so
that no large CPU-side state is staged on a GPU.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
TORCHRUN_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process stands in a ``torchrun`` launch (read from the environment)."""

    world_size: int
    rank: int
    local_rank: int

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def from_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The torchrun launch this process belongs to, or None for a plain single-process run.

    Raises:
        ValueError: some but not all of WORLD_SIZE/RANK/LOCAL_RANK are set, or a value is not a
            non-negative integer with RANK < WORLD_SIZE (names the variable and the value).
    """
    env = os.environ if environ is None else environ
    present = [k for k in TORCHRUN_VARS if env.get(k, "").strip()]
    if not present:
        return None
    if len(present) != len(TORCHRUN_VARS):
        missing = [k for k in TORCHRUN_VARS if k not in present]
        raise ValueError(f"the environment sets {', '.join(present)} but not {', '.join(missing)}; launch with "
                         "torchrun (it sets all three) or unset them for a single-process run")
    values = {}
    for k in TORCHRUN_VARS:
        raw = env[k].strip()
        try:
            values[k] = int(raw)
        except ValueError:
            raise ValueError(f"{k}={raw!r} is not an integer; launch with torchrun, which sets it") from None
        if values[k] < 0:
            raise ValueError(f"{k}={raw!r} must be >= 0; launch with torchrun, which sets it")
    if values["WORLD_SIZE"] < 1 or values["RANK"] >= values["WORLD_SIZE"]:
        raise ValueError(f"RANK={values['RANK']} does not fit WORLD_SIZE={values['WORLD_SIZE']} (need 0 <= RANK < "
                         "WORLD_SIZE >= 1); launch with torchrun, which sets both")
    if values["WORLD_SIZE"] == 1:
        return None
    return LaunchEnv(world_size=values["WORLD_SIZE"], rank=values["RANK"], local_rank=values["LOCAL_RANK"])


def launch_device(launch: LaunchEnv, requested: str | None) -> str:
    """The training device of this rank: ``cuda:LOCAL_RANK`` when CUDA is there, else the CPU.

    Args:
        launch: this process's place in the launch.
        requested: the ``--device`` value (None: automatic; ``cuda`` or ``cpu`` choose the kind).

    Raises:
        ValueError: a device with an index (each rank picks its own GPU from LOCAL_RANK), or
            CUDA asked for but LOCAL_RANK names no visible GPU.
    """
    want = (requested or "").strip().lower()
    if want not in ("", "cuda", "cpu"):
        raise ValueError(f"--device {requested!r} cannot be used under torchrun: each process trains on "
                         "cuda:LOCAL_RANK; pass --device cuda, --device cpu or leave it out")
    if want == "cpu" or (want == "" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; leave --device out to train on the CPU")
    n = torch.cuda.device_count()
    if launch.local_rank >= n:
        raise ValueError(f"LOCAL_RANK={launch.local_rank} but only {n} GPU(s) are visible on this node; pass "
                         f"--nproc_per_node {n} (at most one process per GPU)")
    return f"cuda:{launch.local_rank}"


@dataclass
class ProcessGroup:
    """This process's membership of a data-parallel run (see the module docstring).

    ``backend`` is ``nccl`` when ``device`` is a CUDA device, else ``gloo``.
    """

    launch: LaunchEnv
    device: torch.device
    backend: str
    _cpu_group: Any = field(default=None, repr=False)

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def is_root(self) -> bool:
        return self.launch.is_root

    # -- collectives ---------------------------------------------------------------------------

    def all_reduce_sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sums ``tensors`` (on the training device) over all ranks in place, in one collective."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset: offset + n].view_as(t))
            offset += n

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (CPU group)."""
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self._cpu_group)
        return out

    def gather_to_root(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0; None on the other ranks (CPU group)."""
        out: list[Any] | None = [None] * self.world_size if self.is_root else None
        torch.distributed.gather_object(obj, out, dst=0, group=self._cpu_group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (CPU group)."""
        box = [obj if self.is_root else None]
        torch.distributed.broadcast_object_list(box, src=0, group=self._cpu_group)
        return box[0]

    def scatter(self, objs: Sequence[Any] | None) -> Any:
        """Rank r receives ``objs[r]`` of rank 0's list (CPU group)."""
        box: list[Any] = [None]
        torch.distributed.scatter_object_list(box, list(objs) if self.is_root else None, src=0,
                                              group=self._cpu_group)
        return box[0]

    def root_only(self, fn: Callable[[], T]) -> T | None:
        """Runs ``fn`` on rank 0 only and returns its result there (None on the other ranks); its
        exception is raised on every rank, so no rank waits for a partner that has failed."""
        if self.is_root:
            try:
                result = fn()
            except Exception as e:
                self.broadcast(("error", _picklable(e)))
                raise
            self.broadcast(("ok", None))
            return result
        status = self.broadcast(None)
        if status[0] == "error":
            raise status[1]
        return None

    def root_first(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on rank 0, then (if it succeeded) on the other ranks; e.g. to fill a shared
        cache once. Rank 0's exception is raised on every rank."""
        result = self.root_only(fn)
        return result if self.is_root else fn()  # type: ignore[return-value]

    def check_same(self, what: str, value: Any, fix: str) -> None:
        """Raises on every rank when ranks disagree on ``value`` (names the ranks and the fix)."""
        values = self.all_gather(value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise ValueError(f"the processes of this run disagree on {what} (rank 0 vs rank(s) {odd}: "
                             f"{_short(values[0])} vs {_short(values[odd[0]])}); {fix}")

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


def init_process_group(launch: LaunchEnv, device: str | torch.device, *,
                       timeout_s: float = 1800.0) -> ProcessGroup:
    """Joins the run torchrun launched: NCCL on a CUDA ``device``, gloo on the CPU.

    The rendezvous (MASTER_ADDR/MASTER_PORT) comes from the environment torchrun sets.
    """
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout, "rank": launch.rank,
                              "world_size": launch.world_size}
    if dev.type == "cuda":
        kwargs["device_id"] = dev
    torch.distributed.init_process_group(**kwargs)
    cpu_group = None if backend == "gloo" else torch.distributed.new_group(backend="gloo", timeout=timeout)
    log.debug("rank %d of %d joined (%s on %s)", launch.rank, launch.world_size, backend, dev)
    return ProcessGroup(launch=launch, device=dev, backend=backend, _cpu_group=cpu_group)


def split_rows(n: int, world_size: int, rank: int) -> list[int]:
    """The rows of an ``n``-item batch that ``rank`` computes: contiguous, as even as possible
    (the first ``n % world_size`` ranks take one more; a rank may get none when n < world_size)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (1 if rank < extra else 0)))
