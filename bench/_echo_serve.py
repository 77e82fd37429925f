"""The floor of a Python gRPC server: grpc.aio answering Classify with a fixed reply and doing nothing else
(no decoding, no interceptor, no batching, no head). `python -m bench.grpc_floor` loads it beside headswap
to show what share of a single-text Classify's server CPU is gRPC itself.

    python -m bench._echo_serve PORT
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
from grpc import aio

from headswap.server import loops
from headswap.v1 import headswap_pb2 as pb

REPLY = pb.ClassifyResponse(
    predictions=[pb.Prediction(labels=[pb.LabelScore(label="a", probability=1.0)])], version=1
).SerializeToString()


async def classify(request: bytes, context: Any) -> bytes:
    return REPLY


async def main(port: int) -> None:
    server = aio.server()
    handler = grpc.unary_unary_rpc_method_handler(classify)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("headswap.v1.HeadswapService", {"Classify": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"SERVING on port {port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    # On the event loop headswap serves on by default (uvloop where installed): the floor under the same loop.
    loops.run(main(int(sys.argv[1])))
