"""What `Client` and `AsyncClient` share: each call built as a `Call` (method, request, parser) and the
retry rule. The two clients only send."""

from __future__ import annotations

import abc
import dataclasses
import functools
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar

import grpc

from headswap.client import _codec, _codec_keys
from headswap.client import results as r
from headswap.client._wire import from_message
from headswap.client.errors import HeadswapError, from_rpc_error
from headswap.v1 import headswap_pb2 as pb
from headswap.v1 import headswap_pb2_grpc as pb_grpc

T = TypeVar("T")

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_BACKOFF = 2.0  # seconds between two attempts at most
MAX_RETRIES = 50  # when retries=None and there is no deadline


class AdaptOptions(TypedDict, total=False):
    """Keyword options of `adapt_head`."""

    replace: bool  # drop the tenant's stored examples first (by default new examples are added to them)
    force_activate: bool  # promote the new version even when the promotion gate holds it back
    backbone: str  # the served backbone to train on (its served_as name); "": the one for the inputs' kind
    # Idempotency key of this training (default: a new random one): the call is retried with it when the
    # server went away, and a retry is answered with the first outcome, never trained or stored twice; pass
    # your own to retry across processes; "" sends none (and the call is then never retried).
    request_id: str
    chunk_bytes: int  # examples per call at most (default 4 MiB): a larger set goes in several calls
    on_progress: Callable[[r.AdaptProgress], None]  # called with each progress message
    timeout: float | None  # deadline of the whole training, seconds (default 600)
    kind: str  # "linear" (default) or "mlp"
    # Share held out per class once, instead of cross-validating (the default); 0 trains on everything
    # without any held-out estimate, choice of l2 or calibration.
    validation_fraction: float
    seed: int
    l2: float  # L2 strength, scikit-learn's 1/C; by default chosen on the held-out predictions
    max_epochs: int
    hidden_dim: int  # mlp only
    dropout: float  # mlp only


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str  # the stub's method name
    request: Any
    parse: Callable[[Any], T]
    retry: bool = True  # safe to repeat: reads, and writes that land in the same state twice
    # A server stream: `parse` reads each reply as it comes, and the call's result is the last one it returned
    # other than None (None when there was none).
    stream: bool = False


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _server_went_away(exc: grpc.RpcError) -> bool:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    # The client never cancels a call it waits on; "Channel closed!" is this client being closed: final.
    return code == grpc.StatusCode.CANCELLED and "channel closed" not in (exc.details() or "").lower()


class BaseClient(abc.ABC):
    """`target` is host:port; `timeout` the deadline of each call, retries included (seconds, None for none);
    a call the server answered UNAVAILABLE (or cancelled as it stopped) is tried again, `backoff` seconds apart and doubling (up to 2 s,
    with jitter), until the deadline or `retries` more attempts (None: as many as the deadline allows).

    `api_key` (default: the HEADSWAP_API_KEY environment variable) is sent as `authorization: Bearer ...`
    with every call. TLS: `root_certificates` (PEM bytes of the CA that signed the server's certificate;
    None: the system's roots) and, for mutual TLS, `certificate_chain` and `private_key`; `tls=True` with
    none of them uses the system's roots; `credentials` passes ready-made gRPC channel credentials instead."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        retries: int | None = None,
        backoff: float = 0.1,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if retries is not None and retries < 0:
            raise ValueError("retries must be >= 0 (or None: as many as the deadline allows)")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        key = api_key if api_key is not None else os.environ.get("HEADSWAP_API_KEY")
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()
        if credentials is None and (tls or root_certificates or certificate_chain or private_key):
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
        self._channel = self._connect(target, credentials, channel_options(max_message_bytes))
        self._stub = pb_grpc.HeadswapServiceStub(self._channel)

    @staticmethod
    @abc.abstractmethod
    def _connect(
        target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> Any:
        """The channel: blocking or asyncio, by subclass."""

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _retry_delay(
        self, call: Call[Any], exc: grpc.RpcError, attempt: int, deadline: float | None
    ) -> float | None:
        """Seconds to wait before trying `call` again, or None to give up. Retried: UNAVAILABLE (the server
        is starting or draining, or the connection broke before the call reached it) and a CANCELLED this
        client did not ask for (a server that stops cancels the calls it had received but not yet started),
        with exponential backoff and jitter, for as long as the call's deadline allows (a restart takes
        seconds). Only calls that are safe to repeat are retried."""
        limit = self.retries if self.retries is not None else MAX_RETRIES
        if not call.retry or not _server_went_away(exc) or attempt >= limit:
            return None
        delay = min(self.backoff * 2**attempt, MAX_BACKOFF) * random.uniform(0.5, 1.0)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay

    def _retry_after(
        self, call: Call[Any], exc: grpc.RpcError, attempt: int, deadline: float | None
    ) -> float:
        """`_retry_delay`, or the error for its status when the call is not tried again."""
        delay = self._retry_delay(call, exc, attempt, deadline)
        if delay is None:
            raise from_rpc_error(exc) from exc
        return delay

    def _start(self, call: Call[Any], deadline: float | None) -> Any:
        """The call sent: its reply (a future, for the asyncio client), or its stream of replies."""
        return getattr(self._stub, call.method)(
            call.request, timeout=self._remaining(deadline), metadata=self._metadata
        )

    # -- the calls ------------------------------------------------------------------------------------------

    def _embed(
        self, texts: Sequence[str] | None, images: Sequence[r.ImageLike] | None, dtype: str, backbone: str
    ) -> Call[r.EmbedResult]:
        request = _codec.embed_request(texts, images, dtype, backbone)
        return Call("Embed", request, _codec.embed_result)

    def _list_heads(self) -> Call[list[r.HeadSummary]]:
        return Call("ListHeads", pb.ListHeadsRequest(), _codec.head_summaries)

    def _get_head(self, tenant: str) -> Call[r.HeadDetails]:
        return Call("GetHead", pb.GetHeadRequest(tenant=tenant), _codec.head_details)

    def _activate(self, tenant: str, version: int) -> Call[r.Activation]:
        request = pb.ActivateHeadVersionRequest(tenant=tenant, version=version)
        return Call("ActivateHeadVersion", request, lambda reply: from_message(r.Activation, reply))

    def _delete_version(self, tenant: str, version: int) -> Call[r.HeadDetails]:
        request = pb.DeleteHeadVersionRequest(tenant=tenant, version=version)
        return Call("DeleteHeadVersion", request, lambda reply: _codec.head_details(reply.head), retry=False)

    def _create_key(
        self, role: str, tenant: str | None, name: str, ttl: float | None
    ) -> Call[r.CreatedApiKey]:
        request = _codec_keys.create_key_request(role, tenant, name, ttl)
        return Call("CreateApiKey", request, _codec_keys.created_key, retry=False)

    def _list_keys(self) -> Call[list[r.ApiKeyInfo]]:
        return Call("ListApiKeys", pb.ListApiKeysRequest(), _codec_keys.key_infos)

    def _revoke_key(self, key_id: str) -> Call[r.ApiKeyInfo]:
        return Call("RevokeApiKey", pb.RevokeApiKeyRequest(id=key_id), _codec_keys.revoked_key)

    def _delete(self, tenant: str) -> Call[r.Deletion]:
        request = pb.DeleteHeadRequest(tenant=tenant)
        return Call("DeleteHead", request, lambda reply: from_message(r.Deletion, reply))

    @staticmethod
    def _adapt(
        tenant: str,
        texts: Sequence[str] | None,
        images: Sequence[r.ImageLike] | None,
        labels: Sequence[str] | None,
        options: AdaptOptions,
    ) -> tuple[list[Call[r.AdaptResult | None]], float | None]:
        """The calls of an AdaptHead (one, or several for a large set) and their deadline (one for all of
        them). Each is retried like the others when it has an idempotency key."""
        rest = {k: v for k, v in options.items() if k not in ("on_progress", "timeout", "chunk_bytes")}
        request = _codec.adapt_request(tenant, texts, images, labels, rest)
        requests = _codec.split_adapt(request, options.get("chunk_bytes", _codec.CHUNK_BYTES))
        timeout = options.get("timeout", 600.0)
        deadline = None if timeout is None else time.monotonic() + timeout
        on_progress = options.get("on_progress")
        calls = []
        for i, part in enumerate(requests):
            report = BaseClient._chunk_progress(on_progress, requests, i)
            parse = functools.partial(BaseClient._adapt_event, on_progress=report)
            calls.append(Call("AdaptHead", part, parse, retry=bool(part.request_id), stream=True))
        return calls, deadline

    @staticmethod
    def _chunk_progress(
        on_progress: Callable[[r.AdaptProgress], None] | None,
        requests: Sequence[pb.AdaptHeadRequest],
        index: int,
    ) -> Callable[[r.AdaptProgress], None] | None:
        """Progress of one call of several as progress of the whole: "embedding" counts every example sent
        so far out of all of them, whatever call carried it."""
        if on_progress is None or len(requests) == 1:
            return on_progress
        offset = sum(len(q.examples) for q in requests[:index])
        size, total = len(requests[index].examples), sum(len(q.examples) for q in requests)

        def report(p: r.AdaptProgress) -> None:
            if p.stage == "embedding":
                done = offset + (size if p.total == 0 else round(size * p.done / p.total))
                p = dataclasses.replace(p, done=done, total=total)
            on_progress(p)

        return report

    @staticmethod
    def _whole_call(results: Sequence[r.AdaptResult]) -> r.AdaptResult:
        """The last call's result, counted for the whole upload: `embedded` is what every call embedded, and
        `cache_hits` the trained examples whose vectors were cached before the first call."""
        last = results[-1]
        if len(results) == 1:
            return last
        embedded = sum(x.embedded for x in results)
        trained = last.embedded + last.cache_hits
        return dataclasses.replace(last, embedded=embedded, cache_hits=max(0, trained - embedded))

    @staticmethod
    def _adapt_event(
        reply: pb.AdaptHeadResponse, on_progress: Callable[[r.AdaptProgress], None] | None
    ) -> r.AdaptResult | None:
        """The result, when this reply carries it; progress goes to `on_progress`."""
        if reply.HasField("result"):
            return _codec.adapt_result(reply.result)
        if on_progress is not None:
            on_progress(_codec.adapt_progress(reply.progress))
        return None

    @staticmethod
    def _adapted(results: Sequence[r.AdaptResult | None]) -> r.AdaptResult:
        """The whole upload's result, once every call ended with one."""
        done = [x for x in results if x is not None]
        if len(done) != len(results):
            raise HeadswapError(grpc.StatusCode.UNKNOWN, "AdaptHead ended without a result")
        return BaseClient._whole_call(done)
