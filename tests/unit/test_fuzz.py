"""Issue 9.7: fuzzing every RPC with Hypothesis — random bytes and random well-formed messages (every field,
enum values the server does not know, NaNs, huge numbers, empty and odd strings). No call may end in
INTERNAL or UNKNOWN, and the server must still serve afterwards. In process on the fake encoder."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headswap.client import Client
from headswap.server.config import LimitsConfig, ServerConfig
from headswap.server.inference.fake import fake_backbone
from headswap.server.store.memory import MemoryStore
from headswap.server.testing import in_process
from headswap.v1 import headswap_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["HeadswapService"]
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
F = FieldDescriptor


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if t == F.TYPE_DOUBLE else 32)
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t == F.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.sampled_from(["fuzz", "../x", "a" * 70, " ", "ok-tenant"]))
    if t == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == F.TYPE_ENUM:
        return st.integers(-3, 9)  # known values and unknown ones
    raise AssertionError(f"no strategy for field type {t}")


@st.composite
def message(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    msg = _cls(descriptor)()
    oneofs_set: set[str] = set()
    for field in descriptor.fields:
        if field.containing_oneof is not None:
            if field.containing_oneof.name in oneofs_set or not draw(st.booleans()):
                continue
            oneofs_set.add(field.containing_oneof.name)
        elif not draw(st.booleans()):
            continue
        if field.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            values = draw(
                st.lists(message(field.message_type, depth + 1), max_size=4 if _repeated(field) else 1)
            )
            target = getattr(msg, field.name)
            if _repeated(field):
                target.extend(values)
            elif values:
                target.CopyFrom(values[0])
            continue
        if _repeated(field):
            getattr(msg, field.name).extend(draw(st.lists(scalar(field), max_size=5)))
        else:
            setattr(msg, field.name, draw(scalar(field)))
    return msg


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _cls(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for every example, on a loop of its own (Hypothesis drives plain functions)."""
    home: Path = tmp_path_factory.mktemp("fuzz")
    # Warmed up (PyTorch included: a cold first training took 3 s of the 5 s budget on a loaded machine, and
    # the training after the fuzz ran out of it); the budget keeps the fuzz's own trainings short.
    config = ServerConfig(
        warmup_rounds=1, home=home, limits=LimitsConfig(max_batch_inputs=16, max_train_seconds=5)
    )
    ready, stop, address = threading.Event(), threading.Event(), []

    async def main() -> None:
        async with in_process(config, backbone=fake_backbone(), store=MemoryStore()) as running:
            address.append(running.target)
            ready.set()
            await asyncio.to_thread(stop.wait)

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield address[0]
    stop.set()
    thread.join(30)


def call(target: str, method: str, payload: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        path = f"/{SERVICE.full_name}/{method}"
        streaming = SERVICE.methods_by_name[method].output_type.name == "AdaptHeadResponse"
        try:
            if streaming:
                for _ in channel.unary_stream(path)(payload, timeout=10):
                    pass
            else:
                channel.unary_unary(path)(payload, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() not in FORBIDDEN, f"{method}: {exc.code().name}: {exc.details()}"
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


METHODS = sorted(SERVICE.methods_by_name)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(payload=st.binary(max_size=200))
def test_random_bytes(target: str, method: str, payload: bytes) -> None:
    call(target, method, payload)


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(data=st.data())
def test_random_messages(target: str, method: str, data: st.DataObject) -> None:
    request = data.draw(message(SERVICE.methods_by_name[method].input_type))
    call(target, method, request.SerializeToString())


def test_still_serving_after_the_fuzz(target: str) -> None:
    with Client(target, retries=0) as client:
        client.wait_ready(5)
        assert client.embed(["still here"]).shape == (1, 16)
        texts = [f"{c} {i}" for c in ("up", "down") for i in range(4)]
        result = client.adapt_head("after-fuzz", texts, [t.split()[0] for t in texts], validation_fraction=0)
        assert result.activated and not math.isnan(result.metrics.accuracy)
