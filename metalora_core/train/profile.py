"""Measuring a training step: bytes saved for backward and aten ops dispatched.

Both are deterministic on any device, so tests can assert on them (timings they cannot).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class SavedTensors:
    """Context manager: the tensors autograd saves for backward inside it, counted once per storage.

    Args:
        exclude: tensors (model weights, adapter parameters) whose storage is not counted: they
            exist anyway, saving them costs nothing.

    After the block: ``nbytes`` (unique storages saved, excluded ones left out), ``count``,
    ``by_dtype`` (bytes per dtype name).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen: dict[tuple, tuple[int, str]] = {}
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._exclude and key not in self._seen:
            self._seen[key] = (t.untyped_storage().nbytes(), str(t.dtype).replace("torch.", ""))
        return t

    def __enter__(self) -> "SavedTensors":
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        return sum(n for n, _ in self._seen.values())

    @property
    def count(self) -> int:
        return len(self._seen)

    @property
    def by_dtype(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for n, d in self._seen.values():
            out[d] += n
        return dict(out)


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        s = t.untyped_storage()
        return (t.device.type, t.device.index, s.data_ptr(), s.nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some subclasses)
        return ("id", id(t))


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched inside it (forward and backward), views apart.

    ``kernels``: ops that compute (what a GPU would launch a kernel for, roughly);
    ``views``: view and metadata ops (no kernel); ``by_op``: counts per op name.
    """

    _NO_KERNEL = {"detach", "t", "view", "_unsafe_view", "expand", "permute", "transpose", "select", "slice",
                  "unsqueeze", "squeeze", "split", "split_with_sizes", "chunk", "unbind", "as_strided",
                  "alias", "reshape", "lift_fresh", "_reshape_alias", "unflatten", "narrow", "diagonal"}

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.kernels = 0
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.by_op[name] += 1
        if getattr(func, "is_view", False) or name in self._NO_KERNEL:
            self.views += 1
        else:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


class ProfiledKernels:
    """Context manager: the compute kernels run inside it on the CPU, from torch.profiler's events,
    compiled graphs included (``OpCounter`` cannot see into them: under a dispatch mode
    torch.compile runs the eager code instead).

    An event counts when it computes (an aten op other than a view, an allocation or a metadata
    op, or one of inductor's C++ kernels) and no event below it does: ``aten::linear`` counts as
    the ``addmm`` it runs, a fused C++ kernel as one. Inductor records its C++ kernels only when
    ``torch._inductor.config.cpp.enable_kernel_profile`` was on while it compiled them.

    After the block: ``kernels`` and ``by_name`` (counts per event name; ``<inductor>`` for the
    C++ kernels).
    """

    _NO_KERNEL = OpCounter._NO_KERNEL | {
        "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "resolve_conj", "resolve_neg",
        "result_type", "is_nonzero", "item", "_local_scalar_dense", "lift_fresh_copy", "set_", "contiguous", "to",
        "_to_copy", "clone", "view_as", "flatten", "numpy_T", "zeros", "ones_like", "zeros_like", "full"}

    def __init__(self) -> None:
        self.by_name: Counter[str] = Counter()
        self._profile = None

    @property
    def kernels(self) -> int:
        return sum(self.by_name.values())

    def __enter__(self) -> "ProfiledKernels":
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profile.__exit__(*exc)
        below: dict[int, bool] = {}

        def computes(e) -> bool:
            if "cpp_fused" in e.name:
                return True
            return e.name.startswith("aten::") and e.name[6:] not in self._NO_KERNEL

        def computes_below(e) -> bool:
            key = id(e)
            if key not in below:
                below[key] = any(computes(c) or computes_below(c) for c in e.cpu_children)
            return below[key]

        for e in self._profile.events():
            if computes(e) and not computes_below(e):
                self.by_name["<inductor>" if "cpp_fused" in e.name else e.name] += 1
