"""EnqueueStream holds back a client that sends faster than the node commits: the node reads its
next frame only while it holds less than a batch (4096 messages, and under a byte budget) besides
the batch being stored, so HTTP/2 flow control stops the client. Before, the node read every frame
gRPC delivered into an unbounded list (1.9 GB of RSS after 24 s of 1 MB frames, never given back)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from mqstore import server
from mqstore.proto import queue_pb2, queue_pb2_grpc
from mqstore.security.edge import EdgeInterceptor
from mqstore.testing.secure import InProcessCluster

BATCH = server._STREAM_BATCH_MESSAGES


class SlowWriter:
    """Replaces a node's ``enqueue_many``: each call waits for ``release``, and the batches
    and the ids they got are recorded in order."""

    def __init__(self, leader: Any) -> None:
        self.inner = leader.queue.enqueue_many
        self.release = threading.Event()
        self.started = threading.Event()
        self.batches: list[list[bytes]] = []
        self.ids: list[str] = []
        leader.queue.enqueue_many = self

    def __call__(self, messages: Sequence[Mapping[str, Any]], actor: Any = None) -> list[str]:
        self.started.set()
        assert self.release.wait(60)
        ids: list[str] = self.inner(messages, actor)
        self.batches.append([bytes(m["data"]) for m in messages])
        self.ids += ids
        return ids


class Taken:
    """Counts the messages (and bytes) the node's stream reader has taken from gRPC (through the
    edge, which checks each frame as it is read)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.messages = 0
        self.bytes = 0
        original = EdgeInterceptor._stream_frames
        taken = self

        def counting(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
            for frame in original(self, *args, **kwargs):
                taken.messages += len(frame.messages)
                taken.bytes += frame.ByteSize()
                yield frame

        monkeypatch.setattr(EdgeInterceptor, "_stream_frames", counting)

    def settle(self, at_least: int = 0, limit_s: float = 10.0) -> None:
        """Wait until the reader has taken ``at_least`` messages and then nothing more for half
        a second."""
        deadline = time.monotonic() + limit_s
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if self.messages != last:
                last, since = self.messages, time.monotonic()
            elif self.messages >= at_least and time.monotonic() - since >= 0.5:
                return
            time.sleep(0.05)


def _frames(count: int, per_frame: int, size: int) -> list[Any]:
    frames = []
    for f in range(count):
        messages = [queue_pb2.NewMessage(mail_from="a@example.org", recipients=["b@example.net"],
                                         data=b"%08d" % (f * per_frame + i) + b"x" * size)
                    for i in range(per_frame)]
        frames.append(queue_pb2.EnqueueBatchRequest(messages=messages))
    return frames


def _drain(call: Any, answers: list[str], errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            for response in call:
                answers.extend(response.message_ids)
        except grpc.RpcError as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _check_all_answered_in_order(frames: list[Any], writer: SlowWriter, answers: list[str]) -> None:
    sent = [m.data for f in frames for m in f.messages]
    stored = [d for batch in writer.batches for d in batch]
    assert stored == sent  # every message stored once, in the order sent
    assert answers == writer.ids  # and answered in that order
    assert all(len(batch) <= BATCH for batch in writer.batches)


def test_a_stream_faster_than_commits_is_held_back_by_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = Taken(monkeypatch)
    c = InProcessCluster(tmp_path, ["a"])
    try:
        writer = SlowWriter(c.leader())
        frames = _frames(100, 128, 16)  # 12,800 small messages, sent as fast as gRPC takes them
        with grpc.insecure_channel(c.address(1)) as channel:
            call = queue_pb2_grpc.QueueStub(channel).EnqueueStream(iter(frames), timeout=60)
            answers: list[str] = []
            failed: list[BaseException] = []
            drain = _drain(call, answers, failed)
            assert writer.started.wait(10)
            taken.settle(at_least=BATCH + 128)
            # Nothing is committed yet: the node holds the batch being stored plus under a
            # batch and a frame read ahead (before: every frame the client sent, all 12,800).
            assert not writer.batches
            assert BATCH + 128 <= taken.messages <= 2 * BATCH + 127, taken.messages
            writer.release.set()
            drain.join(30)
            assert not drain.is_alive() and not failed, failed
        _check_all_answered_in_order(frames, writer, answers)
    finally:
        writer.release.set()
        c.close()


def test_a_stream_faster_than_commits_is_held_back_by_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 1 << 20
    monkeypatch.setattr(server, "_STREAM_READ_AHEAD_BYTES_MAX", budget)
    taken = Taken(monkeypatch)
    c = InProcessCluster(tmp_path, ["a"])
    try:
        writer = SlowWriter(c.leader())
        frames = _frames(60, 1, 256 * 1024)  # 15 MiB in frames of one 256 KiB message
        frame_bytes = frames[0].ByteSize()
        with grpc.insecure_channel(c.address(1)) as channel:
            call = queue_pb2_grpc.QueueStub(channel).EnqueueStream(iter(frames), timeout=60)
            answers: list[str] = []
            failed: list[BaseException] = []
            drain = _drain(call, answers, failed)
            assert writer.started.wait(10)
            taken.settle()
            # The batch being stored and what is read ahead are each under budget + one frame
            # (before: all 60 frames).
            assert not writer.batches
            assert taken.bytes <= 2 * (budget + frame_bytes), (taken.messages, taken.bytes)
            writer.release.set()
            drain.join(30)
            assert not drain.is_alive() and not failed, failed
        _check_all_answered_in_order(frames, writer, answers)
    finally:
        writer.release.set()
        c.close()


def _readers() -> set[threading.Thread]:
    """The EnqueueStream reader threads alive (started with a context's ``run``)."""
    return {t for t in threading.enumerate() if t.name.endswith("(run)")}


@pytest.mark.parametrize("end", ["cancel", "deadline", "node stops"])
def test_a_reader_held_back_ends_with_its_call(tmp_path: Path, end: str) -> None:
    """A reader waiting for room while the batch before is being stored ends as soon as the call
    does (cancelled, past its deadline, or the node stopping), without waiting for the commit."""
    c = InProcessCluster(tmp_path, ["a"])
    before = _readers()
    try:
        leader = c.leader()
        writer = SlowWriter(leader)

        def endless() -> Iterator[Any]:
            frame = _frames(1, 128, 16)[0]
            while True:
                yield frame

        with grpc.insecure_channel(c.address(1)) as channel:
            call = queue_pb2_grpc.QueueStub(channel).EnqueueStream(
                endless(), timeout=2 if end == "deadline" else 60)
            answers: list[str] = []
            failed: list[BaseException] = []
            drain = _drain(call, answers, failed)
            assert writer.started.wait(10)
            deadline = time.monotonic() + 10
            while not _readers() - before and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _readers() - before
            if end == "cancel":
                call.cancel()
            elif end == "node stops":
                leader.grpc.stop(0)
            deadline = time.monotonic() + 10
            while _readers() - before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _readers() - before  # ended while the commit still waits
            assert not writer.batches
            writer.release.set()
            drain.join(10)
            assert not drain.is_alive() and failed
        deadline = time.monotonic() + 10
        while leader.in_flight.count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leader.in_flight.count == 0  # the call's loop ended too
    finally:
        c.close()
