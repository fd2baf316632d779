"""The CUDA copy engines' stream and event logic, run on CPU against a fake `torch.cuda`.

The fake keeps, per device, a compute stream (the device's current stream) and a log of what was queued
on every stream; events complete when the test says so. It checks what a reading of the code claims:
- every stream, event and wait belongs to the runtime's device (`cuda:1` while device 0 is current);
- the copy stream is ordered after the compute stream once, when the engine is made (the slot pool's
  zero fill is queued there just before);
- the stall log stays bounded however long nobody reads the stats, and `reset_stats` drops it;
- the torch engine drives a whole offloaded forward (on CPU tensors) with the original logits;
- with a profiler attached, copies carry timing events read on the host clock (the trace's copy lane), and
  only then: untimed copies cost no timing events.
The same properties are checked on a real GPU by tests/test_gpu.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import m2r2_moe
from conftest import tiny_mixtral
from m2r2_moe.runtime import cuda_compute, cuda_engine, cuda_native
from m2r2_moe.runtime.cuda_compute import MAX_PENDING, StallLog


class FakeStream:
    _ids = itertools.count(1)

    def __init__(self, device=None, name="side", priority=0):
        self.device = torch.device(device) if device is not None else torch.device("cuda", FakeCuda.now.current)
        self.name, self.log, self.cuda_stream, self.priority = name, [], next(self._ids), priority

    def wait_event(self, event):
        self.log.append(("wait_event", event))

    def wait_stream(self, other):
        self.log.append(("wait_stream", other))

    def synchronize(self):
        self.log.append(("synchronize",))

    def __repr__(self):
        return f"<{self.name} stream of {self.device}>"


class FakeEvent:
    """Copy events stay pending (each wait is queued); timing events complete when recorded if
    `complete_on_record` (the device keeps up), else stay pending until the test completes them."""

    clock = itertools.count()
    complete_on_record = False

    def __init__(self, enable_timing=False):
        self.stream, self.at, self.done, self.timing = None, None, False, enable_timing

    def record(self, stream=None):
        self.stream = stream if stream is not None else FakeCuda.now.current_stream()
        self.at = next(self.clock)
        self.done = self.timing and FakeEvent.complete_on_record
        self.stream.log.append(("record", self))

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True

    def elapsed_time(self, end):
        assert self.done and end.done, "elapsed_time of an event not completed would synchronize"
        return float(end.at - self.at)


class FakeCuda:
    """Devices 0 and 1; `current` is the current device; `compute[i]` the current stream of device i."""

    now: "FakeCuda"

    def __init__(self):
        self.current = 0
        self.compute = {i: FakeStream(torch.device("cuda", i), "compute") for i in (0, 1)}

    def current_stream(self, device=None):
        index = None
        if device is not None:
            index = device if isinstance(device, int) else torch.device(device).index
        return self.compute[self.current if index is None else index]

    def stream(self, stream):
        cuda = self

        class Context:  # like torch.cuda.stream: the stream's device is current inside, its stream current
            def __enter__(self):
                self.saved = (cuda.current, cuda.compute[stream.device.index])
                cuda.current, cuda.compute[stream.device.index] = stream.device.index, stream

            def __exit__(self, *exc):
                cuda.current, cuda.compute[stream.device.index] = self.saved[0], self.saved[1]

        return Context()


@pytest.fixture
def fake_cuda(monkeypatch):
    cuda = FakeCuda()
    FakeCuda.now, FakeEvent.complete_on_record = cuda, False
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", cuda.current_stream)
    monkeypatch.setattr(torch.cuda, "stream", cuda.stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: cuda.current)
    return cuda


def test_every_stream_and_event_is_the_runtime_device_s(fake_cuda):
    engine = cuda_engine.CudaCopyEngine(torch.device("cuda:1"))  # device 0 is current
    assert engine.device == torch.device("cuda:1") and engine.stream.device == torch.device("cuda:1")
    compute = fake_cuda.compute[1]
    assert engine.stream.log == [("wait_stream", compute)]  # after the pool's zero fill, before any copy
    src, dst = torch.arange(6.0), torch.zeros(6)
    assert engine.demand_stream.log == [("wait_stream", compute)] and engine.demand_stream.device == engine.device
    t = engine.submit(0, 0, dst, src)
    assert torch.equal(dst, src) and t.event.stream is engine.demand_stream  # a demand load
    assert fake_cuda.current == 0  # restored after the copy
    assert t.wait() == 0.0
    kinds = [entry[0] for entry in compute.log]
    assert kinds == ["record", "wait_event", "record"] and compute.log[1][1] is t.event
    assert fake_cuda.compute[0].log == []  # nothing queued on the current device's stream
    done = engine.compute.done()
    assert done.stream is compute


def test_cuda_without_an_index_is_the_current_device(fake_cuda):
    fake_cuda.current = 1
    assert cuda_engine.CudaCopyEngine(torch.device("cuda")).device == torch.device("cuda:1")
    with pytest.raises(ValueError, match="cuda device"):
        cuda_compute.cuda_device("cpu")


def test_a_ready_copy_queues_no_wait(fake_cuda):
    engine = cuda_engine.CudaCopyEngine(torch.device("cuda:0"))
    t = engine.submit(0, 0, torch.zeros(2), torch.ones(2))
    t.event.done = True
    assert t.wait() == 0.0 and fake_cuda.compute[0].log == [] and not engine.compute.stalls.pending


def _pair(start_at, end_at, done=True):
    start, end = FakeEvent(), FakeEvent()
    start.at, end.at, start.done, end.done = start_at, end_at, done, done
    return start, end


def test_stall_log_folds_completed_waits_as_it_goes():
    log = StallLog()
    for i in range(10 * MAX_PENDING):
        log.add(*_pair(3 * i, 3 * i + 2))  # each wait completed by the next: the log never grows
        assert len(log.pending) <= 1
    assert log.drain() == pytest.approx(10 * MAX_PENDING * 2 / 1e3)
    assert log.drain() == 0.0


def test_stall_log_is_bounded_when_the_oldest_wait_is_on_a_slower_stream():
    log = StallLog()
    stuck = _pair(0, 1000, done=False)
    log.add(*stuck)
    for i in range(3 * MAX_PENDING):
        log.add(*_pair(i, i + 1))
        assert len(log.pending) <= MAX_PENDING + 1
    assert log.drain() == pytest.approx(3 * MAX_PENDING / 1e3)
    stuck[0].done = stuck[1].done = True
    assert log.drain() == pytest.approx(1.0) and not log.pending


def test_stall_log_discard_forgets_completed_and_pending_waits():
    log = StallLog()
    log.add(*_pair(0, 5))
    pending = _pair(10, 20, done=False)
    log.add(*pending)
    log.discard()
    pending[0].done = pending[1].done = True
    assert log.drain() == 0.0 and not log.pending


def _offloaded_on_the_torch_cuda_engine(fake_cuda):
    """A tiny Mixtral offloaded on CPU whose copies go through CudaCopyEngine (real copies on CPU tensors,
    fake streams and events): every demand copy is still in flight when waited for, so each wait queues a
    timed device-side wait."""
    model = tiny_mixtral(torch.bfloat16)
    ids = torch.randint(3, 96, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    m2r2_moe.offload(model, device="cpu", cache_experts=3)
    offloader = m2r2_moe.get_offloader(model)
    offloader.replace_engine(cuda_engine.CudaCopyEngine(torch.device("cuda:1")))
    return model, ids, reference, offloader.engine


def test_the_torch_engine_drives_an_offloaded_forward_and_its_stall_log_stays_bounded(fake_cuda):
    model, ids, reference, engine = _offloaded_on_the_torch_cuda_engine(fake_cuda)
    FakeEvent.complete_on_record = True  # the device keeps up: each wait has completed by the next one
    try:
        with torch.no_grad():
            for _ in range(3):  # nobody reads the stats in between
                assert torch.equal(model(input_ids=ids).logits, reference)
                assert len(engine.compute.stalls.pending) <= 1
        waits = sum(1 for entry in fake_cuda.compute[1].log if entry[0] == "wait_event")
        assert waits > 0 and m2r2_moe.stats(model).stall_seconds == pytest.approx(waits / 1e3)
    finally:
        m2r2_moe.remove_offload(model)


def test_reset_stats_drops_the_stall_timings_still_pending(fake_cuda):
    model, ids, _, engine = _offloaded_on_the_torch_cuda_engine(fake_cuda)
    try:
        with torch.no_grad():
            model(input_ids=ids)
        pending = list(engine.compute.stalls.pending)
        assert pending  # the device has not run them yet
        m2r2_moe.reset_stats(model)
        assert not engine.compute.stalls.pending
        for start, end, _ in pending:  # they complete after the reset: still not counted
            start.done = end.done = True
        assert m2r2_moe.stats(model).stall_seconds == 0.0
    finally:
        m2r2_moe.remove_offload(model)


class FakeNativeEvent:
    def __init__(self):
        self.waited_on = []
        self.handle = id(self)

    def query(self):
        return False

    def wait_on(self, stream_handle):
        self.waited_on.append(stream_handle)


class FakeNativeEngine:
    made = []

    def __init__(self, index, stream_handle):
        self.index, self.stream_handle = index, stream_handle
        FakeNativeEngine.made.append(self)

    def submit(self, dst, src, nbytes, after):
        return FakeNativeEvent()


def test_native_engine_uses_the_runtime_device_too(fake_cuda, monkeypatch):
    monkeypatch.setattr(cuda_native, "available", lambda: "")
    monkeypatch.setattr(cuda_native._ext, "cuda", type("FakeExt", (), {"CopyEngine": FakeNativeEngine}), raising=False)
    monkeypatch.setattr(cuda_native, "_check_pair", lambda dst, src: src.numel() * src.element_size())
    engine = cuda_native.NativeCudaCopyEngine(torch.device("cuda:1"))
    native = FakeNativeEngine.made[-1]
    compute = fake_cuda.compute[1]
    assert native.index == 1 and native.stream_handle == engine.stream.cuda_stream
    assert engine.stream.device == torch.device("cuda:1") and engine.stream.log == [("wait_stream", compute)]
    t = engine.submit(0, 0, torch.zeros(4), torch.ones(4))
    t.wait()
    assert t.event.waited_on == [compute.cuda_stream]
    assert [entry[0] for entry in compute.log] == ["record", "record"] and len(engine.compute.stalls.pending) == 1
    assert fake_cuda.compute[0].log == []


def test_timed_copies_give_the_trace_a_copy_lane(fake_cuda):
    FakeEvent.complete_on_record = True  # the device keeps up: timing events complete when recorded
    engine = cuda_engine.CudaCopyEngine(torch.device("cuda:1"))
    untimed = engine.submit(0, 0, torch.zeros(4), torch.ones(4))
    assert untimed.start is None and not untimed.event.timing and untimed.started_at == 0.0
    engine.time_copies(True)
    timed = engine.submit(1, 1, torch.zeros(4), torch.ones(4))
    records = [entry[1] for entry in engine.demand_stream.log if entry[0] == "record"]
    assert records[-2:] == [timed.start, timed.event]  # start, then the copy, then its event: on the copy stream
    assert engine.clock.host < timed.started_at < timed.finished_at
    assert timed.busy == pytest.approx(timed.finished_at - timed.started_at)
    engine.time_copies(False)
    assert engine.submit(2, 2, torch.zeros(4), torch.ones(4)).start is None


def test_the_recorder_times_cuda_copies(fake_cuda):
    from m2r2_moe.profile import Recorder

    model, ids, reference, engine = _offloaded_on_the_torch_cuda_engine(fake_cuda)
    FakeEvent.complete_on_record = True
    offloader = m2r2_moe.get_offloader(model)
    recorder = Recorder(offloader)
    try:
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, reference)
        assert recorder.copies and all(0 < c.started < c.finished for c in recorder.copies)
        assert recorder.link_busy_seconds() > 0
    finally:
        recorder.detach()
        m2r2_moe.remove_offload(model)
    assert engine.clock is None  # timing stops with the recorder
