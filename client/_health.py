"""A minimal grpc.health.v1 client, so that the client needs no grpcio-health-checking.

HealthCheckRequest is `{string service = 1}` and HealthCheckResponse `{ServingStatus status = 1}`: small
enough to encode by hand.
"""

from __future__ import annotations

import time

import grpc

STATUSES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
_CHECK = "/grpc.health.v1.Health/Check"


def _encode_request(service: str) -> bytes:
    raw = service.encode()
    if not raw:
        return b""
    if len(raw) > 127:
        raise ValueError("service name too long")
    return b"\x0a" + bytes([len(raw)]) + raw


def _decode_status(data: bytes) -> str:
    # Field 1, varint: tag 0x08 then one byte (statuses are < 128). Absent means 0 (UNKNOWN).
    if len(data) >= 2 and data[0] == 0x08:
        return STATUSES.get(data[1], "UNKNOWN")
    return "UNKNOWN"


def check(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    call = channel.unary_unary(_CHECK, request_serializer=None, response_deserializer=None)
    return _decode_status(call(_encode_request(service), timeout=timeout))


def wait_serving(channel: grpc.Channel, timeout: float, service: str = "") -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            last = check(channel, service, timeout=min(5.0, max(0.1, deadline - time.monotonic())))
            if last == "SERVING":
                return
        except grpc.RpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
        time.sleep(0.1)
    raise TimeoutError(f"server not SERVING after {timeout:.0f}s (last answer: {last})")
