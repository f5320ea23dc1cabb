"""FlowSampler.step's eager fast path (a call with the tensors of the previous eager C++-twin call
replays its arguments after a cheap layout check) and the twin's merged dense rows: every change
that the full validation would catch is still caught, and results equal the reference."""

import pytest
import torch

import spar_kernels as sk
from spar_kernels import flow_sampler as sp_mod

from conftest import record_ops

pytest.importorskip("spar_kernels._C_cpu")


@pytest.fixture(autouse=True, params=["torch", "portable"])
def guard_form(request, monkeypatch):
    """Every test runs with both forms of the replay's layout guard (_op.layout_guard): torch's
    C++ tensor check where this torch has it, and the portable is_set_to form."""
    from spar_kernels import _op

    if request.param == "portable":
        monkeypatch.setattr(_op, "_TENSOR_GUARDS", None)
    elif _op._TENSOR_GUARDS is None:
        pytest.skip("this torch has no usable C++ tensor check")
    return request.param


def _pair(method="euler", **kw):
    kw = dict(num_steps=6, shift=3.0, guidance=4.0, **kw)
    return sk.FlowSampler(method, **kw), sk.FlowSampler(method, **kw)


def _ref_step(s, x, *vs, out=None):
    with sk.backend("reference"):
        return s.step(x, *vs, out=out)


@pytest.mark.parametrize("method", ["euler", "heun", "dpmsolver++2m"])
def test_same_tensors_new_values_match_reference(method):
    # the fast path replays pointers: values written in place between calls are read
    a, b = _pair(method)
    shape = (1, 4, 6, 10)
    x, vc, vu, out = (torch.randn(shape) for _ in range(4))
    xb = x.clone()
    for _ in range(a.num_evals):
        vc.copy_(torch.randn(shape))
        vu.copy_(torch.randn(shape))
        got = a.step(x, vc, vu, out=out)
        assert got is out and (a._fast is not None) == (a._host_step > 1)  # built on the second call
        want = _ref_step(b, xb, vc, vu)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        x.copy_(out)
        xb = want
    assert int(a.counter) == a.num_evals == a._host_step
    with pytest.raises(ValueError, match="stepping past the last step"):
        a.step(x, vc, vu, out=out)


def test_resized_restrided_or_replaced_tensors_are_validated_again():
    s = sk.FlowSampler("euler", num_steps=20, guidance=4.0)
    shape = (1, 4, 6, 10)
    x, vc, vu, out = (torch.randn(shape) for _ in range(4))
    s.step(x, vc, vu, out=out)
    vc.resize_(1, 4, 6, 11)  # same object, new shape
    with pytest.raises(ValueError, match="v_cond: expected x's shape"):
        s.step(x, vc, vu, out=out)
    vc.resize_(shape)
    out.as_strided_(shape, (240, 1, 40, 4))  # same object and shape, not contiguous any more
    with pytest.raises(ValueError, match="out: expected a contiguous tensor"):
        s.step(x, vc, vu, out=out)
    out = torch.empty(shape)
    s.step(x, vc, vu, out=out)
    vu.data = torch.randn(shape, dtype=torch.float64)  # same object, another dtype
    with pytest.raises(ValueError, match="v_uncond: expected dtype"):
        s.step(x, vc, vu, out=out)
    vu.data = torch.randn(shape)
    x.data = torch.randn(1, 24, 10)  # same object, another layout (and a different [B, P, Q])
    with pytest.raises(ValueError, match="x: this sampler's state"):
        s.step(x, vc.view(1, 24, 10), vu.view(1, 24, 10), out=out.view(1, 24, 10))
    assert s._host_step == 2  # the failed calls took no step


def test_new_out_and_moved_storage_give_the_reference_result():
    a, b = _pair("dpmsolver++2m")
    shape = (2, 3, 50)
    x, vc, vu = (torch.randn(shape) for _ in range(3))
    out1, out2 = torch.empty(shape), torch.empty(shape)
    for k, out in enumerate([out1, out1, out2, out1]):
        if k == 3:
            vc.set_(torch.randn(shape))  # same object, new storage
        got = a.step(x, vc, vu, out=out)
        assert got is out
        torch.testing.assert_close(got, _ref_step(b, x, vc, vu), atol=1e-6, rtol=1e-6)


def test_a_branch_needed_from_the_next_evaluation_on_is_checked():
    # guidance turns on at the third evaluation: the replayed call (no v_uncond) must stop there
    s = sk.FlowSampler("euler", sigmas=[1.0, 0.9, 0.6, 0.3, 0.0], guidance=3.0, guidance_interval=(0.0, 0.7))
    x, vc, out = torch.randn(1, 8, 16), torch.randn(1, 8, 16), torch.empty(1, 8, 16)
    s.step(x, vc, out=out)
    s.step(x, vc, out=out)
    with pytest.raises(ValueError, match="v_uncond: guidance=3.0 > 1 is on at evaluation 2"):
        s.step(x, vc, out=out)


def test_backend_and_dispatch_modes_are_honoured_after_a_fast_call(monkeypatch):
    s = sk.FlowSampler("heun", num_steps=5, guidance=2.0)
    x, vc, vu, out = (torch.randn(1, 8, 16) for _ in range(4))
    s.step(x, vc, vu, out=out)
    s.step(x, vc, vu, out=out)  # replayed
    calls = []
    ref = sp_mod._IMPLS["reference"]
    monkeypatch.setitem(sp_mod._IMPLS, "reference", lambda *a: (calls.append(1), ref(*a)))
    with sk.backend("reference"):
        s.step(x, vc, vu, out=out)
    assert calls == [1]

    with record_ops() as rec:
        s.step(x, vc, vu, out=out)
    assert any("flow_sampler_step" in o for o in rec.ops), rec.ops


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("method,renorm,shape", [
    ("heun", None, (1, 3, 40, 30)),              # one merged row of 3,600: update chunks and a tail
    ("dpmsolver++2m", None, (2, 1300)),           # [T, C]: rows longer than an update chunk
    ("euler", "global", (2, 5, 7, 61)),           # per-sample sums over merged rows, partial chunks
    ("euler", "global", (300, 64)),               # BAGEL's packed [T, C]
    ("euler", "global", (300, 256)),              # from 65,536 elements: threads when there are several
])
def test_dense_inputs_merged_rows_match_reference(monkeypatch, isa, method, renorm, shape):
    monkeypatch.setenv("SPAR_CPU_ISA", isa)
    kw = dict(image_guidance=1.5, renorm=renorm, renorm_min=0.1)
    for dtype in (torch.float32, torch.bfloat16):
        a, b = _pair(method, **kw)
        x = torch.randn(shape).to(dtype)
        for _ in range(3):
            vs = [torch.randn(shape).to(dtype) for _ in range(3)]
            xa = a.step(x, *vs)
            xb = _ref_step(b, x, *vs)
            tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
            torch.testing.assert_close(xa.float(), xb.float(), atol=tol, rtol=tol)
            x = xa


def test_no_replay_without_out_or_after_a_branch_dies():
    a, b = _pair()
    shape = (1, 8, 16)
    x, vc = torch.randn(shape), torch.randn(shape)
    first = a.step(x, vc, torch.randn(shape))  # a fresh out each call: nothing kept to replay
    assert a._fast is None
    second = a.step(x, vc, torch.randn(shape))
    assert second is not first and second.data_ptr() != 0
    out, vu = torch.empty(shape), torch.randn(shape)
    a.step(x, vc, vu, out=out)
    assert a._fast is None  # built on a repeat only
    a.step(x, vc, vu, out=out)
    assert a._fast is not None
    del vu  # the branch dies: the entry goes, so a later call without it is validated in full
    assert a._fast is None
    with pytest.raises(ValueError, match="v_uncond: guidance=4.0 > 1 is on"):
        a.step(x, vc, out=out)
    vu = torch.randn(shape)
    for _ in range(4):  # a's four steps so far
        _ref_step(b, x, vc, torch.randn(shape))
    torch.testing.assert_close(a.step(x, vc, vu, out=out), _ref_step(b, x, vc, vu), atol=1e-6, rtol=1e-6)


def test_layout_check_sees_dtype_views_and_transposes_that_keep_the_strides():
    # the fast path's layout guard compares each tensor's dtype, sizes and strides (and data
    # pointer); these changes keep the pointer, the numel and the strides
    s = sk.FlowSampler("euler", num_steps=20, guidance=4.0)
    x, vc, vu, out = (torch.randn(8, 1) for _ in range(4))     # [T, C] with C = 1: strides (1, 1)
    s.step(x, vc, vu, out=out)
    s.step(x, vc, vu, out=out)
    assert s._fast is not None
    vc.t_()                                                      # (1, 8), strides still (1, 1)
    assert vc.stride() == (1, 1) and vc.data_ptr() == vc.data_ptr()
    with pytest.raises(ValueError, match="v_cond: expected x's shape"):
        s.step(x, vc, vu, out=out)
    vc.t_()
    s.step(x, vc, vu, out=out)                                   # valid again: validated, then replayed
    s.step(x, vc, vu, out=out)
    assert s._fast is not None
    vu.data = vu.view(torch.int32)                               # same storage, sizes and strides
    with pytest.raises(ValueError, match="v_uncond: expected dtype"):
        s.step(x, vc, vu, out=out)
    vu.data = vu.view(torch.float32)
    x.unsqueeze_(0).squeeze_(0)                                  # back to the same layout: replays
    got = s.step(x, vc, vu, out=out)
    assert got is out and s._fast is not None
    assert s._host_step == 5


def test_fresh_branch_views_each_step_build_no_entry():
    """The runtime passes v[:B], v[B:] of a new DiT output each step: fresh objects, often at the
    ids of the views that just died. No fast entry is built for them (it would never replay), and
    the steps match the reference."""
    a, b = _pair()
    shape = (1, 4, 6, 10)
    x, out = torch.randn(shape), torch.empty(shape)
    for _ in range(4):
        v = torch.randn((2,) + shape[1:])
        got = a.step(x, v[:1], v[1:], out=out)
        assert a._fast is None
        torch.testing.assert_close(got, _ref_step(b, x, v[:1], v[1:]), atol=1e-6, rtol=1e-6)
        x.copy_(got)  # x and out stay the same objects: only the branch views are fresh


def test_step_bumps_out_version_on_every_path():
    """The twin writes out through a pointer; the version counter is bumped on the full call and
    on the replay, as the dispatcher does, so autograd notices an overwritten saved tensor."""
    a, _ = _pair()
    shape = (1, 4, 6, 10)
    x, vc, vu, out = (torch.randn(shape) for _ in range(4))
    for _ in range(3):  # the second and third calls replay
        v = out._version
        a.step(x, vc, vu, out=out)
        assert out._version > v
    w = torch.ones(shape, requires_grad=True)
    y = (w * out).sum()
    a.step(x, vc, vu, out=out)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_inputs_requiring_grad_warn_once_and_record_nothing(backend):
    """As for every op: with grad mode on and an input requiring grad, one "has no backward"
    warning, and neither the output nor the sampler's history requires grad (the reference
    backend's torch ops used to record a graph that grew across steps)."""
    import warnings

    from spar_kernels import _op

    s = sk.FlowSampler("dpmsolver++2m", num_steps=4, guidance=2.0)
    x, vc, vu = (torch.randn(1, 4, 3, 5) for _ in range(3))
    _op.REGISTRY["flow_sampler_step"]._warned_grad = False
    with sk.backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [s.step(x.clone().requires_grad_(), vc, vu) for _ in range(2)] + [s.step(x, vc, vu)]
    assert sum("flow_sampler_step has no backward" in str(c.message) for c in caught) == 1
    assert not any(o.requires_grad for o in outs) and not s._h1.requires_grad


def _grow_and_back(t):
    shape = t.shape
    t.resize_(t.numel() * 4)
    t.resize_(shape)


@pytest.mark.parametrize("which", ["x", "v_cond", "v_uncond", "v_img_uncond", "out"])
@pytest.mark.parametrize("move", [lambda t: t.share_memory_(), _grow_and_back,
                                  lambda t: t.untyped_storage().resize_(t.untyped_storage().nbytes() * 4)],
                         ids=["share_memory_", "resize_grow_and_back", "storage_resize_"])
def test_a_storage_moved_to_new_memory_is_validated_again(move, which):
    """share_memory_, a growing resize_ and a storage resize_ move a storage's bytes to a new
    allocation inside the same storage object (the layout is unchanged, and the portable guard's
    detached alias moves too, so is_set_to still holds): the replay compares the data pointers
    as well, and never touches the freed memory. Each of the five tensors in turn (BAGEL's three
    branches, global renorm)."""
    s, r = _pair("euler", image_guidance=2.0, renorm="global")
    shape = (1, 4, 8, 8)
    ts = dict(zip(["x", "v_cond", "v_uncond", "v_img_uncond", "out"], (torch.randn(shape) for _ in range(5))))
    for i in range(4):
        if i == 2:
            move(ts[which])
        ts["v_cond"].copy_(torch.randn(shape))
        x, vc, vu, vi, out = ts.values()
        want = _ref_step(r, x.clone(), vc.clone(), vu.clone(), vi.clone())
        got = s.step(x, vc, vu, vi, out=out)
        assert got is ts["out"]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        x.copy_(got)


def test_out_sharing_memory_through_another_storage_is_refused():
    """Two torch.from_numpy views of one array are two storages over the same bytes."""
    import numpy as np

    buf = np.random.default_rng(0).standard_normal(3 * 40).astype(np.float32)
    x = torch.randn(1, 4, 10)
    vc = torch.from_numpy(buf[:40]).view(1, 4, 10)
    out = torch.from_numpy(buf[20:60]).view(1, 4, 10)   # overlaps vc's second half
    s, _ = _pair()
    with pytest.raises(ValueError, match="out: must not share memory with v_cond"):
        s.step(x, vc, torch.randn(1, 4, 10), out=out)


def test_state_made_in_inference_mode_serves_later_steps_and_errors_leave_counters_equal(monkeypatch):
    """The sampler's counter and history are normal tensors even when made under inference_mode
    (an inference tensor cannot be written outside it, which broke the torch backends); and a
    step that raises leaves the host and device counters equal."""
    with torch.inference_mode():
        s = sk.FlowSampler("dpmsolver++2m", num_steps=6, guidance=3.0)
        x, vc, vu = (torch.randn(1, 4, 8, 8) for _ in range(3))
        s.step(x, vc, vu, out=x.clone())
    s.reset()
    x, vc, vu = x.clone(), vc.clone(), vu.clone()
    with sk.backend("reference"):
        s.step(x, vc, vu)
    s.step(x, vc, vu)
    assert s._host_step == int(s.counter) == 2
    from spar_kernels import _op

    def broken(*args):
        raise RuntimeError("backend failed")

    monkeypatch.setitem(_op.REGISTRY["flow_sampler_step"].impls, "reference", broken)
    with sk.backend("reference"), pytest.raises(RuntimeError, match="backend failed"):
        s.step(x, vc, vu)
    assert s._host_step == int(s.counter) == 2
    monkeypatch.undo()
    with sk.backend("reference"):
        s.step(x, vc, vu)
    assert s._host_step == int(s.counter) == 3


@pytest.mark.parametrize("method", ["euler", "dpmsolver++2m"])
def test_a_deep_copy_mid_run_steps_on_its_own_state(method):
    """copy.deepcopy after a step (diffusers' from_scheduler does one) copies the state and history
    but not the cached raw pointers into the original's: each then steps independently."""
    import copy

    a, b = _pair(method)
    x, vc, vu = (torch.randn(1, 4, 4, 4) for _ in range(3))
    out = torch.empty_like(x)
    a.step(x, vc, vu, out=out)
    a.step(x, vc, vu, out=out)          # the twin's tail and a fast entry are cached
    c = copy.deepcopy(a)
    for _ in range(2):
        _ref_step(b, x, vc, vu)
    want = _ref_step(b, x, vc, vu)      # the third evaluation
    got_c = c.step(x, vc, vu, out=torch.empty_like(x))
    assert int(a.counter) == a._host_step == 2 and int(c.counter) == c._host_step == 3
    got_a = a.step(x, vc, vu, out=out)
    torch.testing.assert_close(got_c, got_a, atol=0, rtol=0)
    torch.testing.assert_close(got_a, want, atol=1e-5, rtol=1e-5)


def test_packed_entry_point_errors_and_large_replays():
    """The replay's entry point is a plain CPython function: a bad address or argument is a
    Python error, an unsupported dtype code in the packed array a ValueError naming it; a step of
    64Ki elements or more (the GIL is released around it) matches the reference."""
    import numpy as np

    from spar_kernels import _ext

    fn = _ext.cpu_twin("flow_sampler_step_packed")
    with pytest.raises(ValueError, match="got 0"):
        fn(0)
    with pytest.raises(TypeError):
        fn("x")
    s = sk.FlowSampler("euler", num_steps=4, guidance=3.0)
    x, vc, vu, out = (torch.randn(1, 4, 8, 8) for _ in range(4))
    s.step(x, vc, vu, out=out)
    s.step(x, vc, vu, out=out)
    bad = s._fast[8].copy()
    bad[0] = 99  # no such dtype code
    with pytest.raises(ValueError, match="unsupported dtype code 99"):
        fn(bad.__array_interface__["data"][0])

    a, b = _pair("dpmsolver++2m")
    shape = (1, 16, 64, 72)  # 73728 elements
    x, vc, vu, out = (torch.randn(shape) for _ in range(4))
    for _ in range(3):
        want = _ref_step(b, x.clone(), vc, vu)
        got = a.step(x, vc, vu, out=out)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        x.copy_(got)
    assert a._fast is not None and isinstance(a._fast[8], np.ndarray)


@pytest.mark.parametrize("move", ["counter", "table", "queue"])
def test_the_samplers_own_tensors_moving_to_shared_memory_is_seen(move):
    """The twin reaches the counter, the table and the history by pointer. counter.share_memory_()
    or table.share_memory_() (public attributes) move their bytes in place; a torch.multiprocessing
    pickler would move every tensor the sampler's state gives it (the state now gives copies).
    Stepping on, the full path and the replay use the new memory: results and counters equal the
    reference's (the twin used to write the freed counter)."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers the pickler's tensor reductions)

    s, r = _pair("dpmsolver++2m")
    shape = (1, 4, 8, 8)
    x, vc, vu, out = (torch.randn(shape) for _ in range(4))
    for i in range(5):
        if i == 2:
            if move == "queue":
                ForkingPickler.dumps(s)
            else:
                getattr(s, move).share_memory_()
        want = _ref_step(r, x.clone(), vc, vu)
        got = s.step(x, vc, vu, out=out)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert int(s.counter) == int(r.counter) == s._host_step == i + 1
        x.copy_(got)


def test_pickled_sampler_keeps_its_counter_a_view_of_its_state():
    import pickle

    s = sk.FlowSampler("euler", num_steps=6, guidance=3.0)
    x, vc, vu, out = (torch.randn(1, 4, 5) for _ in range(4))
    s.step(x, vc, vu, out=out)
    c = pickle.loads(pickle.dumps(s))
    for _ in range(2):
        c.step(x, vc, vu, out=out)
    assert int(c.counter) == c._host_step == 3 and int(s.counter) == 1
    torch.testing.assert_close(c.current_timestep(), c.timesteps[3:4])


def test_a_write_that_cannot_happen_raises_before_the_step_runs():
    """An inference-mode `out` given normal storage by `.data =` keeps a disabled version counter:
    the version bump raises. It now comes first, as in the dispatcher, so nothing is written and
    the host and device counters stay equal on the full path and the replay alike."""
    shape = (5, 7)
    for replay in (False, True):
        s = sk.FlowSampler("euler", num_steps=6, guidance=4.0)
        x, vc, vu = (torch.randn(shape) for _ in range(3))
        with torch.inference_mode():
            out = torch.empty(shape)
        out.data = torch.zeros(shape)
        with torch.inference_mode():
            s.step(x, vc, vu, out=out)
            s.step(x, vc, vu, out=out)
        if not replay:
            s._fast = s._last = None
        before = out.clone()
        with pytest.raises(RuntimeError, match="inference"):
            s.step(x, vc, vu, out=out)
        assert torch.equal(out, before) and int(s.counter) == s._host_step == 2


def test_grad_mode_turned_on_after_the_entry_was_built_still_warns():
    import warnings

    from spar_kernels import _op

    _op.REGISTRY["flow_sampler_step"]._warned_grad = False
    s = sk.FlowSampler("euler", num_steps=4, guidance=2.0)
    x, vu, out = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.empty(1, 4, 8)
    vc = torch.randn(1, 4, 8, requires_grad=True)
    with torch.no_grad():
        s.step(x, vc, vu, out=out)
        s.step(x, vc, vu, out=out)
    assert s._fast is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s.step(x, vc, vu, out=out)
    assert sum("has no backward" in str(c.message) for c in caught) == 1
    assert not out.requires_grad


def test_the_counter_version_advances_with_every_step():
    """The twin advances the public counter in place: its version is bumped too (on the full path
    and the replay), so a graph that saved it refuses backward, as with the reference backend."""
    s = sk.FlowSampler("euler", num_steps=6, guidance=3.0)
    x, vc, vu, out = (torch.randn(1, 4, 5) for _ in range(4))
    for _ in range(3):  # full, full (builds the entry), replay
        v = s.counter._version
        s.step(x, vc, vu, out=out)
        assert s.counter._version > v
    emb = torch.randn(8, 3, requires_grad=True)
    y = emb.index_select(0, s.counter).sum()  # saves the int32 counter itself for backward
    s.step(x, vc, vu, out=out)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
