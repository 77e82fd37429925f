from __future__ import annotations

import grpc
import numpy as np
import pytest

from headswap.client import _codec as client_codec
from headswap.client import _health
from headswap.server.domain import Input
from headswap.server.errors import InvalidArgument
from headswap.server.rpc import codec
from headswap.server.rpc.interceptors import status_of
from headswap.server.validation import check_inputs, check_tenant
from headswap.v1 import headswap_pb2 as pb


def test_tensor_round_trip_float32_and_float16() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 384)).astype(np.float32)
    for dtype in (np.dtype("<f4"), np.dtype("<f2")):
        wire = pb.Tensor.FromString(codec.tensor_to_pb(x.astype(dtype)).SerializeToString())
        back = client_codec.tensor(wire)
        assert back.shape == (5, 384) and back.dtype == dtype
        np.testing.assert_allclose(back.astype(np.float32), x, atol=1e-2 if dtype.itemsize == 2 else 0)


def test_tensor_data_is_raw_little_endian() -> None:
    t = codec.tensor_to_pb(np.array([[1.0, -2.0]], dtype=np.float32))
    assert t.data == b"\x00\x00\x80\x3f\x00\x00\x00\xc0" and list(t.shape) == [1, 2]


def test_inputs_to_texts_rejects_images_and_empty_content() -> None:
    assert codec.inputs_from_pb([pb.Input(text="a")]) == (Input(text="a"),)
    with pytest.raises(InvalidArgument, match=r"inputs\[0\] is an image"):
        check_inputs(codec.inputs_from_pb([pb.Input(image=b"x")]), 10, "text")
    with pytest.raises(InvalidArgument, match="no content"):
        codec.inputs_from_pb([pb.Input()])


def test_unknown_element_type() -> None:
    with pytest.raises(InvalidArgument, match="unknown element type"):
        codec.dtype_from_pb(7)
    with pytest.raises(ValueError, match="float32 or float16"):
        client_codec.element_type("int8")


def check_texts(texts: list[str], max_inputs: int) -> None:
    check_inputs([Input(text=t) for t in texts], max_inputs, "text")


def test_check_texts() -> None:
    check_texts(["a", "b"], 2)
    with pytest.raises(InvalidArgument, match="at least one"):
        check_texts([], 2)
    with pytest.raises(InvalidArgument, match="maximum of 2"):
        check_texts(["a", "b", "c"], 2)
    with pytest.raises(InvalidArgument, match=r"inputs\[1\]"):
        check_texts(["a", "\n\t "], 2)
    assert status_of(InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", ["acme", "Acme-2", "a.b_c", "x" * 64, "0day"])
def test_good_tenant_names(name: str) -> None:
    assert check_tenant(name) == name


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "-x", "x" * 65, "naïve", "a b", "a\x00"])
def test_bad_tenant_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="not a valid name"):
        check_tenant(name)


def test_health_wire_encoding() -> None:
    from grpc_health.v1 import health_pb2

    assert _health._encode_request("") == health_pb2.HealthCheckRequest().SerializeToString()
    name = "headswap.v1.HeadswapService"
    assert _health._encode_request(name) == health_pb2.HealthCheckRequest(service=name).SerializeToString()
    for value, text in ((1, "SERVING"), (2, "NOT_SERVING")):
        raw = health_pb2.HealthCheckResponse(status=value).SerializeToString()  # type: ignore[arg-type]
        assert _health._decode_status(raw) == text
    assert _health._decode_status(b"") == "UNKNOWN"
