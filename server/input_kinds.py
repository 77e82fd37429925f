"""The input kinds a backbone can take, in one registry (as Infinity registers its modalities).

A kind's name is the same word everywhere: `Input.kind`, a backbone manifest's `input_kind`, the field of the
protobuf `Input.content` oneof, and the key of a stored example's JSON. Its entry here says what its content
is (text or encoded bytes), how an input is measured, keyed for the embedding cache, checked for blankness
and stored, how messages name it, and which preprocessor prepares it. Adding a kind (audio, say) is an entry
in `KINDS`, its preprocessor module under `inference/` (built from the backbone directory by the function
`preprocessor` names), its export, and its field in the proto; the client keeps its own small table
(`headswap.client._inputs`), since it never imports the server.

No heavy imports: `domain.py` reads this module, and the serving core must load without torch.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from headswap.server.inference.protocols import Preprocessor
    from headswap.server.manifest import BackboneManifest

Content = str | bytes


@dataclass(frozen=True)
class InputLimits:
    """What a preprocessor may refuse by size before decoding (images; a new kind adds its own)."""

    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000


@dataclass(frozen=True)
class InputKind:
    name: str
    article: str  # "a" or "an": "inputs[3] is an image, but the backbone takes texts"
    textual: bool  # content is a str (sized in UTF-8); else encoded bytes (stored as base64)
    blank: str  # what `check_inputs` says of an input with no content, after "inputs[i] "
    preprocessor: str  # "module:function" building the kind's Preprocessor (directory, manifest, limits)
    length_axis: bool  # batches pad along a length (tokens): shape buckets with lengths, bounded padding

    def size(self, content: Content) -> int:
        """Size as sent (UTF-8 bytes of a text)."""
        return len(content.encode("utf-8", "surrogatepass")) if isinstance(content, str) else len(content)

    def content_key(self, content: Content) -> bytes:
        """sha256 of the content: the embedding cache's key (with the backbone's fingerprint)."""
        return hashlib.sha256(content.encode("utf-8") if isinstance(content, str) else content).digest()

    def is_blank(self, content: Content) -> bool:
        return not content.strip() if isinstance(content, str) else not content

    def to_json(self, content: Content) -> str:
        return content if isinstance(content, str) else base64.b64encode(content).decode()

    def from_json(self, raw: str) -> Content:
        return raw if self.textual else base64.b64decode(raw)

    def load_preprocessor(
        self, directory: Path, manifest: BackboneManifest, limits: InputLimits
    ) -> Preprocessor:
        module, function = self.preprocessor.split(":")
        factory: Any = getattr(importlib.import_module(module), function)
        return factory(directory, manifest, limits)  # type: ignore[no-any-return]


KINDS: dict[str, InputKind] = {}


def register(kind: InputKind) -> InputKind:
    KINDS[kind.name] = kind
    return kind


def input_kind(name: str) -> InputKind:
    """The registered kind of this name; ValueError naming the ones there are."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"input kind {name!r} is not one of {', '.join(KINDS)}") from None


TEXT = register(
    InputKind(
        "text",
        "a",
        textual=True,
        blank="is empty or only white space: every input needs some text",
        preprocessor="headswap.server.inference.text:from_backbone",
        length_axis=True,
    )
)
IMAGE = register(
    InputKind(
        "image",
        "an",
        textual=False,
        blank="is an empty image: send the encoded bytes",
        preprocessor="headswap.server.inference.image:from_backbone",
        length_axis=False,
    )
)
