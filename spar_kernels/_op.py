"""The one way a spar op is defined: custom op, fake, backend table and eager fast path.

    def _impl_triton(x, w, out): ...
    def _impl_cpu(x, w, out): ...

    @spar_op("my_op", mutates_args=("out",), impls={"triton": _impl_triton, "cpu": _impl_cpu,
                                                     "reference": _impl_reference})
    def _my_op(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None: ...

The decorated function only declares the schema (its annotations); the returned :class:`SparOp`

- registers ``torch.ops.spar.my_op`` (a ``torch.library`` custom op whose body selects a backend
  for the device of the first tensor argument and runs it) and its fake (by default: select the
  backend as a GPU run would, tell the :func:`on_fake_dispatch` hooks which one, write nothing);
- when called from eager code (nothing compiling, no ``TorchDispatchMode`` active, plain tensors)
  calls the selected implementation directly, after checking that no tensor it writes shares
  memory with another argument (byte ranges, whatever storages; the same elements as an input
  only where ``inplace`` declares the pair) or overlaps itself and bumping the written tensors'
  version counters as the dispatcher's ADInplaceOrView kernel would. The custom-op dispatcher
  costs about 30 us per call on a CPU, more than several of spar's CPU kernels take; the fast
  path about 1.6 us with nothing written, 3.1 us for three tensor arguments with one written and
  4.9 us for five with two written (a no-op implementation, one thread, the Xeon of
  docs/measurements/cpu-avx512-2026-12-01.md). Under ``torch.compile``, ``make_fx``,
  ``FakeTensorMode`` or any dispatch mode the call goes through ``torch.ops.spar.my_op`` so
  tracers and recorders see one op.

Every op returns None and writes into tensors it lists in ``mutates_args`` (outputs are passed
in, so nothing allocates inside a captured CUDA graph). Ops are inference-only: no op has a
backward, and on both paths their outputs never require grad (the fast path runs the
implementation under ``torch.no_grad()`` when grad mode is on and an argument requires grad,
and warns once per op then).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Callable, Mapping, Sequence

import torch

from ._backend import _current, select

__all__ = ["SparOp", "spar_op", "device_guard", "on_fake_dispatch", "is_tracing"]

_len_dispatch_stack = torch._C._len_torch_dispatch_stack
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_current_backend = _current.get  # the name of the backend in force (a ContextVar)
_set_grad_enabled = torch._C._set_grad_enabled
_Tensor = torch.Tensor
_increment_version = torch._C._increment_version  # takes a sequence of tensors (~0.4 us a call)
# True when any argument is a tensor that requires grad (others ignored); ~0.4 us against ~0.9 for
# the generator expression it replaces where torch has it
_any_requires_grad = getattr(torch._C, "_any_requires_grad", None) or (
    lambda *args: any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))

# Callbacks (op_name, backend_name, device) run by the default fake of every op: the simulated
# GPU (spar_kernels.testing.fake_cuda) counts launches and backends through them.
# Every op defined with spar_op, by name (tests check each has a CPU path).
REGISTRY: dict[str, "SparOp"] = {}

_FAKE_HOOKS: list[Callable[[str, str, torch.device], None]] = []


@contextlib.contextmanager
def on_fake_dispatch(hook: Callable[[str, str, torch.device], None]):
    """Call ``hook(op_name, backend, device)`` whenever a spar op runs its fake implementation."""
    _FAKE_HOOKS.append(hook)
    try:
        yield
    finally:
        _FAKE_HOOKS.remove(hook)


def byte_span(v: torch.Tensor) -> tuple[int, int]:
    """[first byte, last byte + 1) of the elements of v (numel > 0)."""
    lo = v.data_ptr()
    if v.is_contiguous():
        return lo, lo + v.nbytes
    return lo, lo + (sum((n - 1) * st for n, st in zip(v.shape, v.stride())) + 1) * v.element_size()


def is_tracing(t: torch.Tensor | None = None) -> bool:
    """True when a call must go through the dispatcher: torch.compile / dynamo is tracing, a
    ``TorchDispatchMode`` (FakeTensorMode, make_fx, a profiler of ops) is active, or ``t`` is a
    tensor subclass (FakeTensor, FunctionalTensor, DTensor, ...)."""
    return (_is_compiling() or _len_dispatch_stack() > 0
            or (t is not None and type(t) is not torch.Tensor))


def normal_tensors():
    """A context in which new tensors are normal tensors even inside ``torch.inference_mode``: for
    state that later calls write in place (a sampler's counter, a KV cache), since an inference
    tensor cannot be written outside inference mode and the first call's mode must not decide
    the later ones'. A null context when not in inference mode, and while compiling (dynamo
    cannot trace the query)."""
    if not _is_compiling() and torch.is_inference_mode_enabled():
        return torch.inference_mode(False)
    return contextlib.nullcontext()


class _AliasGuard:
    """layout_guard's portable form: a detached alias of each tensor (``is_set_to``: the same
    storage, offset, sizes and strides, in one call), its dtype and requires_grad. It holds the
    storages while it lives."""

    __slots__ = ("_a",)

    def __init__(self, *ts: torch.Tensor):
        self._a = tuple((t.detach(), t.dtype, t.requires_grad) for t in ts)

    def check(self, *ts: torch.Tensor) -> bool:
        a = self._a
        if len(ts) != len(a):
            raise TypeError(f"layout guard: built for {len(a)} tensors, checked with {len(ts)}")
        return all(t.is_set_to(al) and t.dtype is d and t.requires_grad is r for t, (al, d, r) in zip(ts, a))


def _dynamo_tensor_guards():
    """torch's C++ tensor check (TorchDynamo's ``TensorGuards``: one call compares each tensor's
    dispatch keys, dtype, device, requires_grad, sizes and strides with those it was built from,
    about 0.2 us a tensor against 0.8 for ``is_set_to`` + dtype + requires_grad), when this torch
    has it with the signature used here and it passes a self-test; else None. It is a private
    API, so nothing relies on it being there."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        a, b = torch.zeros(2, 3), torch.zeros(3, 2)
        g = TensorGuards(a, b, dynamic_dims_sizes=None, dynamic_dims_strides=None)
        ok = (g.check(a, b) is True and g.check(torch.ones(2, 3), b.clone()) is True  # by layout, not identity
              and g.check(b.t(), b) is False and g.check(a, a.t()) is False              # strides / sizes
              and g.check(a.double(), b) is False and g.check(a, b.requires_grad_()) is False)
    except Exception:  # noqa: BLE001 - absent or changed: the portable guard is used
        return None
    if not ok:
        return None
    return lambda *ts: TensorGuards(*ts, dynamic_dims_sizes=None, dynamic_dims_strides=None)


_TENSOR_GUARDS = _dynamo_tensor_guards()


def layout_guard(*ts: torch.Tensor, portable: bool = False):
    """An object whose ``check(*ts2)`` is True when each of ``ts2`` (as many as ``ts``, plain
    tensors) has the dtype, device, sizes, strides, requires_grad (and, with torch's C++ check,
    dispatch keys) that the tensor in its place had here. For fast paths that replay a validated
    call: together with a data-pointer comparison (which neither form makes; a ``share_memory_``
    moves the bytes) it says that the call would read and write the same memory the same way.
    ``portable``: the ``is_set_to`` form even where torch's C++ check is available (tests)."""
    if _TENSOR_GUARDS is not None and not portable:
        return _TENSOR_GUARDS(*ts)
    return _AliasGuard(*ts)


def device_guard(t: torch.Tensor):
    """Make t's CUDA device current for a kernel launch (a null context for CPU tensors)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _backend_name(impls: Mapping[str, Callable], fn: Callable) -> str:
    for name, f in impls.items():
        if f is fn:
            return name
    return "?"


class SparOp:
    """A defined spar op: call it like the schema function; see the module docstring."""

    def __init__(self, name: str, impls: dict[str, Callable], op, device_arg: int, mutated: Sequence[int] = (),
                 arg_names: Sequence[str] = (), inplace: Sequence[tuple[int, int]] = ()):
        self.name = name
        self.mutated = tuple(mutated)  # positions of the arguments the op writes
        self.arg_names = tuple(arg_names)
        self.inplace = frozenset(inplace)  # (written, read) positions that may be the same elements
        self.impls = impls  # backend name -> implementation (same arguments as the op)
        self.op = op        # the torch.library custom op (torch.ops.spar.<name>)
        self.device_arg = device_arg
        self._warned_grad = False  # the no-backward warning is given once per op

    def select(self, device: torch.device) -> Callable:
        """The implementation that runs for tensors on ``device`` under the current backend."""
        return select(self.name, device, self.impls)

    def backend_for(self, device: torch.device) -> str:
        """The name of the backend that runs for tensors on ``device``."""
        return _backend_name(self.impls, self.select(device))

    def __call__(self, *args):
        t = args[self.device_arg]
        if _is_compiling() or _len_dispatch_stack() or type(t) is not torch.Tensor or t.is_meta:
            return self.op(*args)  # tracers and recorders see one op; meta tensors take the fake
        impls = self.impls
        if t.is_cpu and _current_backend() == "auto":
            # select()'s CPU order ("cpu", "reference"), inline: the per-call path is short
            impl = impls.get("cpu") or impls.get("reference") or select(self.name, t.device, impls)
        else:
            impl = select(self.name, t.device, impls)
        if self.mutated:
            self._check_disjoint(args)
            # the versions first, as the dispatcher's ADInplaceOrView kernel bumps them before the
            # kernel runs: a tensor that cannot take the write raises with nothing written
            self._written(args)
        if _grad_enabled() and _any_requires_grad(*args):
            # as through the dispatcher (no autograd kernel): nothing is recorded, the outputs do
            # not require grad. Without this, a backend written with torch ops would record a
            # graph that in-place writes break at backward with an unrelated-looking error. (An
            # op on inputs none of which requires grad records nothing in any grad mode.)
            self.warn_no_backward(stacklevel=4)
            _set_grad_enabled(False)  # torch.no_grad() without the context manager's ~1 us
            try:
                impl(*args)
            finally:
                _set_grad_enabled(True)
        else:
            impl(*args)

    def warn_no_backward(self, stacklevel: int = 3) -> None:
        """The once-per-op warning for a call with grad mode on and an input requiring grad (also
        given by callers that run a backend themselves, such as FlowSampler's twin calls)."""
        if not self._warned_grad:
            self._warned_grad = True
            warnings.warn(f"spar_kernels' {self.name} has no backward: its outputs do not require grad "
                          "(an input requires grad and grad mode is on); run inference under "
                          "torch.inference_mode() or torch.no_grad()", stacklevel=stacklevel)

    def _check_disjoint(self, args) -> None:
        """ValueError when a tensor the op writes shares memory with another tensor argument (the
        backends read and write in an order of their choosing), other than exactly (the same
        elements: an in-place update) with an input, or overlaps itself (an expanded view). Byte
        ranges, whatever storages the tensors belong to; the public functions' own checks name
        the argument first where they have one. One pass for the ranges, then integers only."""
        spans = [(j, a.data_ptr(), a.nbytes if a.is_contiguous() else -1) for j, a in enumerate(args)
                 if type(a) is _Tensor]
        for i, o0, on in spans:
            if i not in self.mutated:
                continue
            o1 = o0 + on if on >= 0 else self._end(args[i])
            if o1 <= o0:
                continue
            for j, a0, an in spans:
                if j != i and a0 < o1:
                    a1 = a0 + an if an >= 0 else self._end(args[j])
                    if o0 < a1 and a0 < a1:
                        self._overlap(args, i, j)
            o = args[i]
            if on < 0 and torch._debug_has_internal_overlap(o) == 1:
                raise ValueError(f"{self.name}: {self.arg_names[i]} overlaps itself (an expanded or "
                                 f"self-overlapping view), strides {o.stride()}")

    @staticmethod
    def _end(t) -> int:
        """The end of a non-contiguous tensor's byte range (its start when empty)."""
        return byte_span(t)[1] if t.numel() else t.data_ptr()

    def _overlap(self, args, i: int, j: int) -> None:
        """_check_disjoint's verdict on written tensor ``args[i]`` whose bytes meet ``args[j]``'s."""
        o, a = args[i], args[j]
        if a.device != o.device:
            return  # two address spaces
        if ((i, j) in self.inplace and a.data_ptr() == o.data_ptr() and a.dtype == o.dtype and a.shape == o.shape
                and a.stride() == o.stride()):
            return  # the same elements: a documented in-place update
        raise ValueError(f"{self.name}: {self.arg_names[i]} shares memory with {self.arg_names[j]} (pass a "
                         "separate buffer, or the input itself where an in-place update is documented)")

    def _written(self, args) -> None:
        """Bump the version counters of the tensors the op wrote, as the dispatcher's
        ADInplaceOrView kernel does: a backend writing through pointers does not, and autograd
        would then use an overwritten saved tensor without an error."""
        m = self.mutated
        if len(m) == 1:
            t = args[m[0]]
            if t is not None:
                _increment_version((t,))
            return
        ts = [args[i] for i in m if args[i] is not None]
        if ts:
            _increment_version(ts)


def spar_op(name: str, *, mutates_args: Sequence[str], impls: Mapping[str, Callable], device_arg: int = 0,
            fake: Callable | None = None, inplace: Sequence[tuple[str, str]] = ()) -> Callable[[Callable], SparOp]:
    """Define ``torch.ops.spar.<name>`` from a schema function; see the module docstring.

    Args:
        name: the op name (``spar::<name>``).
        mutates_args: the argument names the op writes (its outputs and workspaces).
        impls: backend name (``"triton"``, ``"cuda"``, ``"cpu"``, ``"reference"``) -> function
            taking the op's arguments. The dict is kept (not copied): a backend added later
            (e.g. only when a compiled symbol exists) is seen by later calls.
        device_arg: index of the tensor argument whose device selects the backend.
        fake: optional fake implementation; the default selects the backend, reports it to the
            :func:`on_fake_dispatch` hooks and writes nothing.
        inplace: ``(written, read)`` argument names that may be the very same elements (an
            in-place update the op supports); any other sharing of memory with a written argument
            is refused on the eager path.
    """
    if not isinstance(impls, dict):
        impls = dict(impls)

    def deco(schema_fn: Callable) -> SparOp:
        schema = torch.library.infer_schema(schema_fn, mutates_args=tuple(mutates_args))

        def body(*args):
            select(name, args[device_arg].device, impls)(*args)

        op = torch.library.custom_op(f"spar::{name}", body, mutates_args=tuple(mutates_args), schema=schema)

        def default_fake(*args):
            device = args[device_arg].device
            backend = _backend_name(impls, select(name, device, impls))
            for hook in list(_FAKE_HOOKS):
                hook(name, backend, device)
            return None

        op.register_fake(fake if fake is not None else default_fake)
        names = list(inspect.signature(schema_fn).parameters)
        REGISTRY[name] = SparOp(name, impls, op, device_arg, [names.index(m) for m in mutates_args], names,
                                [(names.index(w), names.index(r)) for w, r in inplace])
        return REGISTRY[name]

    return deco
