"""A simulated CUDA device: run GPU code paths without a GPU and count what they would cost.

    with fake_cuda() as rec, rec.region("norm"):   # spar_kernels.testing.fake_cuda
        x = torch.randn(8, 64, device="cuda")      # a FakeTensor on cuda:0: no data, no memory
        y = spar_kernels.rms_norm(x, torch.ones(64).cuda())  # an H2D copy; backend 'triton'
    rec.ops["spar.rms_norm"], rec.backends["rms_norm"], rec.h2d_bytes, rec.peak_bytes
    rec.assert_no_syncs(region="norm")

What it checks. Tensors on "cuda" are torch ``FakeTensor``s on ``cuda:0``: aten ops give shapes,
dtypes, strides and devices as on a GPU; spar ops select their backend as on a GPU, then run
their fake. Counted for the block and each region (:meth:`FakeCudaRecorder.region`):

- ``ops``: ops that would launch GPU work, by name (aten compute ops, copies, spar ops; views,
  metadata ops and ``empty`` excluded; SDPA as one fused kernel); ``launches``: their total;
- ``backends``: spar op name -> Counter of the backend it selected;
- ``syncs``: what makes the host wait for the GPU, recorded with its Python stack instead of
  failing: ``.item()``, ``.tolist()``, ``int/float/bool(t)``, ``.cpu()`` and other D2H copies,
  ``nonzero`` / ``torch.where(cond)``, boolean masks, ``masked_select``, ``torch.equal``,
  ``torch.cuda.synchronize()``, and H2D copies that block (``non_blocking=False`` or from
  memory not pinned: ``torch.tensor(list, device="cuda")`` is one);
- ``h2d_copies`` / ``h2d_bytes``; ``live_bytes`` / ``peak_bytes`` of CUDA storage (freed when
  its last tensor dies).

Values. A value read back from the simulated GPU is zero: ``.item()`` gives 0 / 0.0 / False,
``.tolist()`` zeros, ``bool(t)`` and ``torch.equal`` False, ``.cpu()`` a zero tensor,
``nonzero`` and boolean masks select nothing. Host work stays real: an op on ordinary CPU
tensors only runs on the CPU as usual, so token ids and host-side index lists keep their values.

Also inside: autograd is off; ``pin_memory=True`` / ``.pin_memory()`` mark host buffers pinned
(a CPU build cannot pin); ``torch.cuda`` answers as one device of compute ``capability``
(``is_available``, ``device_count``, ``current_device``, ``get_device_capability`` / ``_name`` /
``_properties``: an H100's or A100's SM count and memory; ``device(...)``: a no-op,
``synchronize``: a sync). Streams, events, CUDA graphs: not simulated.

It cannot show speed, numerics (nothing computes), races, allocator rounding, what runs inside
a Triton or CUDA kernel (only its fake runs), or paths taken only for nonzero device values.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
import traceback
import types
import weakref
from typing import Any, Callable, Iterator
from unittest import mock

import torch
from torch._subclasses.fake_tensor import (DynamicOutputShapeException, FakeTensor, FakeTensorMode,
                                          unset_fake_temporarily)
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from . import _op

__all__ = ["fake_cuda", "FakeCudaRecorder", "RegionStats", "Sync", "active_recorder"]
aten = torch.ops.aten
_CUDA0 = torch.device("cuda", 0)
_HIDDEN_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.abspath(__file__), contextlib.__file__)
# aten ops that launch nothing on a GPU (besides views, which are known from their schema)
_NO_KERNEL = {
    aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided,
    aten._unsafe_view, aten.lift_fresh, aten.set_, aten.resize_, aten.resize_as_, aten.detach_,
    aten.as_strided_, aten.t_, aten.transpose_, aten.squeeze_, aten.unsqueeze_, aten.is_pinned,
    aten.is_same_size, aten.is_contiguous, aten.sym_size, aten.sym_stride, aten.sym_numel,
    aten.sym_storage_offset, aten._local_scalar_dense, aten.equal, aten.nonzero, aten.masked_select,
}
_ACTIVE: list[FakeCudaRecorder] = []
# the Python-level function being run (set by _FunctionMode): names the syncs found at dispatch
_API: contextvars.ContextVar[str] = contextvars.ContextVar("spar_fake_cuda_api", default="")


class Sync:
    """One host sync: ``op``, the Python function that caused it (``"item"``, ``"cpu"``, ...);
    ``kind`` (``"item"``, ``"d2h copy"``, ``"boolean mask index"``, ``"h2d copy (blocking)"``, ...);
    ``aten_op``; ``regions``; ``stack``: the user code's frames (torch's own removed)."""

    def __init__(self, op: str, kind: str, aten_op: str, regions: tuple[str, ...]):
        self.op, self.kind, self.aten_op, self.regions = op, kind, aten_op, regions
        self.stack = traceback.StackSummary.from_list(
            [f for f in traceback.extract_stack() if not f.filename.startswith(_HIDDEN_DIRS)])

    def format(self) -> str:  # with the last frames of the stack
        return f"{self!r}\n" + "".join(self.stack.format()[-8:])

    def __repr__(self) -> str:
        f = self.stack[-1] if self.stack else None
        where = f"{f.filename}:{f.lineno} in {f.name}" if f else "<unknown>"
        return f"{self.op}{f' ({self.kind})' if self.kind != self.op else ''} at {where}"


class RegionStats:
    """Counts for the whole block or one named region (summed over its ``entries``)."""

    def __init__(self, name: str):
        self.name, self.entries = name, 0
        self.ops: collections.Counter[str] = collections.Counter()
        self.backends: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.syncs: list[Sync] = []
        self.h2d_copies = self.h2d_bytes = self.peak_bytes = 0

    @property
    def launches(self) -> int:  # total ops that would launch GPU work
        return sum(self.ops.values())

    def summary(self) -> dict[str, Any]:  # the counts as JSON-serializable values
        return {"entries": self.entries, "launches": self.launches, "ops": dict(self.ops),
                "backends": {k: dict(v) for k, v in self.backends.items()},
                "syncs": [repr(s) for s in self.syncs], "h2d_copies": self.h2d_copies,
                "h2d_bytes": self.h2d_bytes, "peak_bytes": self.peak_bytes}


class FakeCudaRecorder(RegionStats):
    """What ran inside a :func:`fake_cuda` block; the module docstring describes each count."""

    def __init__(self, capability: tuple[int, int] = (9, 0)):
        super().__init__("<all>")
        self.entries, self.capability, self.live_bytes = 1, capability, 0
        self.regions: dict[str, RegionStats] = {}
        self._active: list[RegionStats] = [self]
        self._live: dict[int, int] = {}      # CUDA storage address -> bytes
        self._pinned: dict[int, None] = {}   # addresses of host storages marked pinned
        self._quiet = 0                      # > 0: inside an op counted as one (SDPA)

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[RegionStats]:
        """Count what runs inside for region ``name`` too. Regions nest; entering a name again
        adds to its counts and ``entries`` (e.g. one region entered once per denoising step)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"region: expected a non-empty string, got {name!r}")
        stats = self.regions.setdefault(name, RegionStats(name))
        stats.entries, stats.peak_bytes = stats.entries + 1, max(stats.peak_bytes, self.live_bytes)
        self._active.append(stats)
        try:
            yield stats
        finally:
            self._active.remove(stats)

    def stats(self, region: str | None = None) -> RegionStats:
        """The counts of ``region`` (of the whole block when None)."""
        if region is not None and region not in self.regions:
            raise ValueError(f"region: no region named {region!r} was entered (have {sorted(self.regions)})")
        return self if region is None else self.regions[region]

    def assert_no_syncs(self, region: str | None = None) -> None:
        """Raise AssertionError listing each host sync recorded in ``region`` (the whole block
        when None) with the stack where it happened."""
        syncs = self.stats(region).syncs
        if syncs:
            where = "the fake_cuda block" if region is None else f"region {region!r}"
            raise AssertionError(f"{len(syncs)} host synchronization(s) in {where}:\n"
                                 + "\n".join(s.format() for s in syncs))

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "live_bytes": self.live_bytes,
                "regions": {k: v.summary() for k, v in self.regions.items()}}

    # recording, called by the modes below
    def _each(self) -> list[RegionStats]:  # the block and each active region, once
        return list(dict.fromkeys(self._active))

    def _sync(self, kind: str, aten_op: str = "") -> None:
        sync = Sync(_API.get() or kind, kind, aten_op, tuple(s.name for s in self._each()[1:]))
        for s in self._each():
            s.syncs.append(sync)

    def _launch(self, name: str) -> None:
        for s in self._each() if not self._quiet else ():
            s.ops[name] += 1

    def _backend(self, op: str, backend: str, device: torch.device) -> None:  # an on_fake_dispatch hook
        for s in self._each() if device.type == "cuda" else ():
            s.backends[op][backend] += 1

    def _h2d(self, src: torch.Tensor, non_blocking: bool) -> None:
        for s in self._each():
            s.h2d_copies += 1
            s.h2d_bytes += src.numel() * src.element_size()
        if not non_blocking:
            self._sync("h2d copy (blocking)", "aten.copy_")
        elif not self._is_pinned(src):
            self._sync("h2d copy (pageable)", "aten.copy_")

    def _track(self, out: Any) -> None:
        """Account the CUDA storages in ``out`` not seen before; forget each when it dies."""
        for t in pytree.tree_leaves(out) if not self._quiet else ():
            s = t.untyped_storage() if isinstance(t, FakeTensor) and t.device.type == "cuda" else None
            if s is None or s._cdata in self._live:
                continue
            self._live[s._cdata] = s.nbytes()
            self.live_bytes += s.nbytes()
            weakref.finalize(s, self._free, s._cdata)
            for st in self._each():
                st.peak_bytes = max(st.peak_bytes, self.live_bytes)

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key, 0)

    def _mark_pinned(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        self._pinned[s._cdata] = None
        weakref.finalize(s, self._pinned.pop, s._cdata, None)
        return t

    def _is_pinned(self, t: torch.Tensor) -> bool:
        return t.untyped_storage()._cdata in self._pinned  # (a real CPU tensor's storage)


def active_recorder() -> FakeCudaRecorder | None:
    """The recorder of the :func:`fake_cuda` block being run, or None outside one."""
    return _ACTIVE[-1] if _ACTIVE else None


def _is_cuda(device: Any) -> bool:
    return device is not None and _resolve(device).type == "cuda"


def _resolve(device: Any) -> torch.device:
    d = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return _CUDA0 if d.type == "cuda" and d.index is None else d


def _zero(dtype: torch.dtype):  # the value a read from the simulated GPU gives
    return False if dtype == torch.bool else 0j if dtype.is_complex else 0.0 if dtype.is_floating_point else 0


def _empty(shape: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return aten.empty.memory_format(shape, dtype=dtype, device=device)


def _is_mask(i: Any) -> bool:
    return isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)


# ---- dispatch level: every aten and spar op -------------------------------------------------

class _Mode:
    def __init__(self, rec: FakeCudaRecorder):
        super().__init__()
        self.rec = rec


class _DispatchMode(_Mode, TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(t, torch.Tensor)]
        if not any(isinstance(t, FakeTensor) for t in tensors) and not _is_cuda(kwargs.get("device")):
            with unset_fake_temporarily():  # host work on ordinary CPU tensors stays real
                return func(*args, **kwargs)
        handler = _DISPATCH_HANDLERS.get(func.overloadpacket)
        try:
            out = handler(self.rec, func, args, kwargs) if handler else func(*args, **kwargs)
        except DynamicOutputShapeException:  # unique, repeat_interleave without output_size, ...
            self.rec._sync(str(func.overloadpacket), str(func))
            raise NotImplementedError(f"fake_cuda: {func} has an output shape that depends on the data "
                                      "(a host sync on a GPU); it is recorded but cannot be simulated") from None
        self.rec._track(out)
        tensors += [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        launches = not func.is_view and func.namespace != "prim" and func.overloadpacket not in _NO_KERNEL
        if launches and any(t.device.type == "cuda" for t in tensors):
            self.rec._launch(str(func.overloadpacket))
        return out


def _read_back(kind: str, value: Callable):  # a sync whose result is read: zero / nothing
    def handler(rec, func, args, kwargs):
        rec._sync(kind, str(func))
        return value(args[0])
    return handler


def _d_index(rec, func, args, kwargs):
    """A boolean mask (a nonzero on a GPU) becomes the empty indices of a mask selecting nothing."""
    x, indices = args[0], list(args[1])
    if any(_is_mask(i) for i in indices):
        rec._sync("boolean mask index", str(func))
        indices = [j for i in indices for j in ([_empty([0], torch.long, x.device)] * i.dim() if _is_mask(i) else [i])]
    return func(x, indices, *args[2:], **kwargs)


def _d_to_copy(rec, func, args, kwargs):
    src, target = args[0], _resolve(kwargs.get("device") or args[0].device)
    if src.device.type == "cuda" and target.type == "cpu":
        rec._sync("d2h copy", str(func))
        with unset_fake_temporarily():
            return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
    if src.device.type == "cpu" and target.type == "cuda":
        rec._h2d(src, bool(kwargs.get("non_blocking", False)))
    return func(*args, **kwargs)


def _d_copy(rec, func, args, kwargs):
    dst, src = args[0], args[1]
    if dst.device.type == "cpu" and src.device.type == "cuda":
        rec._sync("d2h copy", str(func))
        with unset_fake_temporarily():
            return dst if isinstance(dst, FakeTensor) else dst.zero_()
    if dst.device.type == "cuda" and src.device.type == "cpu":
        rec._h2d(src, bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False)))
    return func(*args, **kwargs)


_DISPATCH_HANDLERS: dict[Any, Callable] = {
    aten._local_scalar_dense: _read_back("item", lambda x: _zero(x.dtype)),
    aten.equal: _read_back("equal", lambda x: False),
    aten.nonzero: _read_back("nonzero", lambda x: _empty([0, x.dim()], torch.long, x.device)),
    aten.masked_select: _read_back("masked_select", lambda x: _empty([0], x.dtype, x.device)),
    aten.index: _d_index, aten.index_put: _d_index, aten.index_put_: _d_index,
    aten._to_copy: _d_to_copy, aten.copy_: _d_copy, aten.uniform_: lambda rec, func, args, kwargs: args[0],
}


# ---- Python level: bindings that open a CUDA device guard (failing on a CPU build) -> aten ops

def _to(x, device=None, dtype=None, non_blocking=False, copy=False, memory_format=None):  # Tensor.to
    target = _resolve(device) if device is not None else x.device
    if target == x.device and (dtype or x.dtype) == x.dtype and not copy:
        return x
    return aten._to_copy.default(x, dtype=dtype or x.dtype, device=target, non_blocking=non_blocking,
                                 memory_format=memory_format or torch.preserve_format)


def _f_to(rec, func, args, kwargs):
    parsed = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})
    if not (isinstance(args[0], FakeTensor) or _is_cuda(parsed[0])):
        return func(*args, **kwargs)
    device, dtype, non_blocking, memory_format = parsed
    return _to(args[0], device, dtype, non_blocking, kwargs.get("copy", False), memory_format)


def _f_cuda(rec, func, args, kwargs):
    device = args[1] if len(args) > 1 else kwargs.get("device")
    nb = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    return _to(args[0], _CUDA0 if device is None else _resolve(device), non_blocking=nb)


def _f_tensor(rec, func, args, kwargs):
    """torch.tensor / as_tensor / Tensor.new_tensor onto "cuda": built on the host, then copied
    to the device (a blocking copy from pageable memory, as torch does it)."""
    if func is torch.Tensor.new_tensor:  # its binding opens a guard on self's device
        func, args, kwargs = torch.tensor, args[1:], {"device": args[0].device, "dtype": args[0].dtype, **kwargs}
    if not _is_cuda(kwargs.get("device")) or kwargs.get("pin_memory"):
        return func(*args, **kwargs)
    if isinstance(args[0], torch.Tensor):
        return _to(args[0], kwargs["device"], kwargs.get("dtype"))
    return aten._to_copy.default(torch.tensor(args[0], dtype=kwargs.get("dtype")), device=_resolve(kwargs["device"]))


def _split_index(x: torch.Tensor, idx) -> tuple[torch.Tensor, list]:
    """Apply the basic part of an index (ints, slices, None, ...) with aten view ops; return the
    view and aten.index's list of advanced indices into it ([] when there are none)."""
    idx = tuple(torch.tensor(i) if isinstance(i, list) else i for i in (idx if isinstance(idx, tuple) else (idx,)))
    ndims = lambda i: i.dim() if _is_mask(i) else 1  # noqa: E731 - view dims an index consumes
    used = sum(ndims(i) for i in idx if i is not None and i is not Ellipsis)
    view, dim, adv, covered = x, 0, [], 0
    for i in idx:
        if i is Ellipsis:
            dim += x.dim() - used
        elif i is None:
            view = aten.unsqueeze.default(view, dim)
            dim += 1
        elif isinstance(i, bool) or not (isinstance(i, (slice, torch.Tensor)) or hasattr(i, "__index__")):
            raise TypeError(f"fake_cuda: indexing with {type(i).__name__} is not supported")
        elif not isinstance(i, (slice, torch.Tensor)):  # an int (or numpy int, ...)
            view = aten.select.int(view, dim, i.__index__())
        elif isinstance(i, slice):
            view = aten.slice.Tensor(view, dim, i.start, i.stop, 1 if i.step is None else i.step)
            dim += 1
        else:
            if i.device != x.device:  # a host index is copied to the GPU first (blocking)
                i = aten._to_copy.default(i, device=x.device)
            adv += [None] * (dim - covered) + [i]
            dim += ndims(i)
            covered = dim
    return view, adv


def _f_getitem(rec, func, args, kwargs):
    if not isinstance(args[0], FakeTensor):
        return func(*args, **kwargs)
    view, adv = _split_index(*args)
    return aten.index.Tensor(view, adv) if adv else aten.alias.default(view) if view is args[0] else view


def _f_setitem(rec, func, args, kwargs):
    x, idx, value = args
    if not isinstance(x, FakeTensor):
        return func(*args, **kwargs)
    view, adv = _split_index(x, idx)
    if adv:
        v = value if isinstance(value, torch.Tensor) else torch.scalar_tensor(value, dtype=x.dtype)
        aten.index_put_.default(view, adv, v)
    elif isinstance(value, torch.Tensor):
        aten.copy_.default(view, value)
    else:
        aten.fill_.Scalar(view, value)


def _scalar_read(name: str, convert: Callable):
    def handler(rec, func, args, kwargs):
        x = args[0]
        if not isinstance(x, FakeTensor):
            return func(*args, **kwargs)
        if x.numel() != 1:  # torch's own errors
            raise RuntimeError("Boolean value of Tensor with more than one value is ambiguous" if name == "__bool__"
                               else f"a Tensor with {x.numel()} elements cannot be converted to Scalar")
        rec._sync(name, "aten._local_scalar_dense")
        return convert(_zero(x.dtype))
    return handler


def _f_sdpa(rec, func, args, kwargs):
    if not any(isinstance(t, FakeTensor) for t in pytree.tree_leaves((args, kwargs))):
        return func(*args, **kwargs)
    rec._launch("aten.scaled_dot_product_attention")  # one fused kernel on a GPU, not the math
    rec._quiet += 1                                      # decomposition a CPU build runs
    try:
        out = func(*args, **kwargs)
    finally:
        rec._quiet -= 1
    rec._track(out)
    return out


_FUNCTION_HANDLERS: dict[Any, Callable] = {
    torch.Tensor.to: _f_to, torch.Tensor.cuda: _f_cuda,
    torch.tensor: _f_tensor, torch.as_tensor: _f_tensor, torch.Tensor.new_tensor: _f_tensor,
    torch.Tensor.__getitem__: _f_getitem, torch.Tensor.__setitem__: _f_setitem,
    torch.Tensor.item: _scalar_read("item", lambda v: v), torch.Tensor.__bool__: _scalar_read("__bool__", bool),
    torch.Tensor.__int__: _scalar_read("__int__", int), torch.Tensor.__index__: _scalar_read("__index__", int),
    torch.Tensor.__float__: _scalar_read("__float__", float),
    torch.Tensor.pin_memory: lambda rec, func, args, kwargs: rec._mark_pinned(args[0].clone()),
    torch.Tensor.is_pinned: lambda rec, func, args, kwargs: rec._is_pinned(args[0]) or func(*args, **kwargs),
    torch.nn.functional.scaled_dot_product_attention: _f_sdpa,
}


class _FunctionMode(_Mode, TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        token = _API.set(getattr(func, "__name__", ""))
        try:
            handler = _FUNCTION_HANDLERS.get(func)
            if handler is not None:
                return handler(self.rec, func, args, kwargs)
            if kwargs.get("pin_memory"):  # a CPU build cannot pin: remember which buffers are pinned
                return self.rec._mark_pinned(func(*args, **{**kwargs, "pin_memory": False}))
            try:
                return func(*args, **kwargs)
            except RuntimeError as e:  # a binding opening a CUDA device guard (copy_, contiguous,
                name = getattr(func, "__name__", "")  # uniform_, ...): its aten op does not
                if "not linked with support for cuda" not in str(e) or not hasattr(aten, name):
                    raise
                return getattr(aten, name)(*args, **kwargs)
        finally:
            _API.reset(token)


def _properties(capability: tuple[int, int]) -> types.SimpleNamespace:
    """What ``torch.cuda.get_device_properties`` reports inside: an H100 SXM for (9, 0), else an
    A100 80GB (SM count, memory, L2) with the simulated capability."""
    sms, l2 = (132, 50 << 20) if capability >= (9, 0) else (108, 40 << 20)
    return types.SimpleNamespace(name=f"simulated CUDA device sm_{capability[0]}{capability[1]}",
                                 major=capability[0], minor=capability[1], multi_processor_count=sms,
                                 total_memory=80 << 30, L2_cache_size=l2, warp_size=32, is_integrated=False)


# FakeTensorMode asks torch.cuda.is_available() (True inside) whether to avoid a real device
_FakeMode = type("_FakeMode", (FakeTensorMode,), {"avoid_device_init": True})


@contextlib.contextmanager
def fake_cuda(capability: tuple[int, int] = (9, 0)) -> Iterator[FakeCudaRecorder]:
    """Run the block on a simulated CUDA device (see the module docstring); yields the
    :class:`FakeCudaRecorder`. ``capability``: what ``torch.cuda.get_device_capability()``
    reports inside ((9, 0): an H100; (8, 0): an A100)."""
    if not (isinstance(capability, tuple) and len(capability) == 2 and all(isinstance(v, int) for v in capability)):
        raise ValueError(f"capability: expected a (major, minor) tuple of ints, got {capability!r}")
    if _ACTIVE or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE):
        raise RuntimeError("fake_cuda: cannot run inside another fake_cuda block or FakeTensorMode")
    rec = FakeCudaRecorder(capability)

    def tolist(self):  # FakeTensor.tolist does not reach the function mode
        rec._sync("tolist", "aten._local_scalar_dense")
        with unset_fake_temporarily():
            return torch.zeros(self.shape, dtype=self.dtype).tolist()

    cuda_api = dict(is_available=lambda: True, device_count=lambda: 1, current_device=lambda: 0,
                    get_device_capability=lambda device=None: capability,
                    get_device_name=lambda device=None: f"simulated CUDA device sm_{capability[0]}{capability[1]}",
                    get_device_properties=lambda device=None: _properties(capability),
                    device=lambda device=None: contextlib.nullcontext(),
                    synchronize=lambda device=None: rec._sync("torch.cuda.synchronize"))
    _ACTIVE.append(rec)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.multiple(torch.cuda, **cuda_api))
            stack.enter_context(mock.patch.object(FakeTensor, "tolist", tolist))
            stack.enter_context(_op.on_fake_dispatch(rec._backend))
            stack.enter_context(torch.no_grad())  # autograd on fake CUDA tensors needs a device guard
            stack.enter_context(_FakeMode(allow_non_fake_inputs=True))
            stack.enter_context(_DispatchMode(rec))
            stack.enter_context(_FunctionMode(rec))
            yield rec
    finally:
        _ACTIVE.remove(rec)
