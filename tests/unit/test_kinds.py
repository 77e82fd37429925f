"""Input kinds and head kinds are registries (issue 25): each kind the wire names is registered on every side
that handles it, and each registered kind brings everything its registry asks for."""

from __future__ import annotations

import pytest

from headswap.adapters.spec import HEAD_KINDS, HeadSpec, expected_state_shapes, head_kind
from headswap.client import _codec as client_codec
from headswap.client._wire import HEAD_KIND_CODES
from headswap.server.domain import Example, Input
from headswap.server.input_kinds import KINDS, input_kind
from headswap.server.store.base import example_from_json, example_to_json
from headswap.v1 import headswap_pb2 as pb


def test_every_input_kind_is_a_field_of_the_wire_input_on_both_sides() -> None:
    oneof = {f.name for f in pb.Input.DESCRIPTOR.oneofs_by_name["content"].fields}
    assert set(KINDS) == oneof == set(client_codec.INPUT_KINDS)


def test_an_input_is_its_kind_and_content() -> None:
    text, image = Input(text="hi"), Input(image=b"\xff\xd8")
    assert (text.kind, text.content, text.nbytes) == ("text", "hi", 2)
    assert (image.kind, image.content, image.nbytes) == ("image", b"\xff\xd8", 2)
    assert text == Input(text="hi") and text != Input(image=b"hi")
    with pytest.raises(ValueError, match="input kind 'audio' is not one of text, image"):
        Input(audio=b"RIFF")
    with pytest.raises(TypeError, match="one keyword"):
        Input(text="a", image=b"b")


@pytest.mark.parametrize("item", [Input(text="héllo"), Input(image=b"\x00\xffbytes")])
def test_stored_examples_keep_their_kind(item: Input) -> None:
    raw = example_to_json(Example(item, "label"))
    assert list(raw) == [item.kind, "label"] and all(isinstance(v, str) for v in raw.values())
    assert example_from_json(raw) == Example(item, "label")


def test_each_input_kind_loads_its_preprocessor_factory() -> None:
    import importlib

    for kind in KINDS.values():
        module, function = kind.preprocessor.split(":")
        assert callable(getattr(importlib.import_module(module), function)), kind.name
    assert input_kind("text").length_axis and not input_kind("image").length_axis


def test_every_head_kind_on_the_wire_is_registered_with_its_torch_side() -> None:
    assert set(HEAD_KIND_CODES) == set(HEAD_KINDS)
    for name in HEAD_KINDS:
        kind = head_kind(name)
        module = kind.module()
        needed = ["build", "fit_steps", "fit_head"] + ([] if kind.linear_map else ["stacked_logits"])
        assert all(callable(getattr(module, f, None)) for f in needed), name
        shapes = expected_state_shapes(HeadSpec(name, 8, 3, hidden_dim=4))
        assert set(kind.output) <= set(shapes), name
        built = module.build(HeadSpec(name, 8, 3, hidden_dim=4), None)
        assert {k: tuple(v.shape) for k, v in built.state_dict().items()} == shapes, name
    with pytest.raises(ValueError, match="unknown head kind 'tree'"):
        head_kind("tree")
