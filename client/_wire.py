"""What both ends of the wire read off the protobuf schema rather than repeat: the head kinds its `HeadKind`
enum names, and values copied between messages and dataclasses field by field of the same name.

It lives in the client package, which every install of the server has (one distribution), so that the
server's codec may use it too; the client never imports the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar, cast

from google.protobuf.message import Message

from headswap.v1 import headswap_pb2 as pb

T = TypeVar("T")

# HEAD_KIND_MLP -> "mlp": a new head kind on the wire is a new enum value, nothing here.
HEAD_KINDS: dict[pb.HeadKind, str] = {
    cast(pb.HeadKind, v.number): v.name.removeprefix("HEAD_KIND_").lower()
    for v in pb.HeadKind.DESCRIPTOR.values
    if v.number != pb.HEAD_KIND_UNSPECIFIED
}
HEAD_KIND_CODES: dict[str, pb.HeadKind] = {name: code for code, name in HEAD_KINDS.items()}


def head_kind_names(quote: Callable[[str], str] = repr) -> str:
    """ "'linear' or 'mlp'": the kinds a message may offer."""
    return " or ".join(quote(name) for name in HEAD_KIND_CODES)


def from_message(cls: Callable[..., T], message: Message, **given: Any) -> T:
    """The dataclass `cls` with each field read from `message`'s field of the same name (None where the
    message leaves an optional one unset), except those `given`."""
    present = message.DESCRIPTOR.fields_by_name
    values = dict(given)
    for f in fields(cast(Any, cls)):
        if f.name in given or not f.init:
            continue
        unset = present[f.name].has_presence and not message.HasField(f.name)
        values[f.name] = None if unset else getattr(message, f.name)
    return cls(**values)


def to_message(cls: Callable[..., T], source: object, **given: Any) -> T:
    """The message `cls` with each field `source` has an attribute of the same name for set from it
    (a None leaves it unset), except those `given`."""
    descriptor = getattr(cls, "DESCRIPTOR")  # noqa: B009 - a generated class's attribute, for the type checker
    values = dict(given)
    for name in descriptor.fields_by_name:
        if name not in given and hasattr(source, name):
            values[name] = getattr(source, name)
    return cls(**values)
