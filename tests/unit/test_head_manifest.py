"""The typed head manifest (`HeadManifest`) reads and writes the JSON the stores already hold byte for byte:
tests/unit/data/head_sealed.json is a head.json a LocalStore wrote before the manifest was typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from headswap.server.manifest import SEAL, HeadManifest, ManifestError, manifest_digest
from headswap.server.store.files import json_bytes

WRITTEN = Path(__file__).parent / "data" / "head_sealed.json"


def test_a_manifest_written_before_the_type_round_trips_byte_for_byte() -> None:
    raw = WRITTEN.read_bytes()
    manifest = HeadManifest.from_json(json.loads(raw))
    assert json_bytes(manifest.to_json()) == raw
    assert manifest.seal == manifest_digest(manifest.to_json())
    assert manifest.version == 2 and manifest.labels == ("blue", "red")
    # Committing it again (as `store copy` does) gives the same seal: same keys, same canonical form.
    assert manifest.committed(2, str(manifest.weights_sha256)) == manifest


def test_a_manifest_from_before_the_seal_round_trips_without_one() -> None:
    data = json.loads(WRITTEN.read_bytes())
    del data[SEAL]
    manifest = HeadManifest.from_json(data)
    assert manifest.seal is None and manifest.to_json() == data
    assert (
        manifest.committed(2, str(manifest.weights_sha256)).to_json()[SEAL]
        == json.loads(WRITTEN.read_bytes())[SEAL]
    )


def test_fields_never_written_stay_absent() -> None:
    data = {"labels": ["a", "b"], "anything": {"else": [1, 2]}}
    assert HeadManifest.from_json(data).to_json() == data


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m["labels"].reverse(), "does not match the sha256 recorded at commit"),
        (lambda m: m.update(labels="red"), "has no list of distinct labels"),
        (lambda m: m.update(created_at="yesterday"), "has a created_at of the wrong type (str)"),
        (lambda m: m.update(example_count=True), "has a example_count of the wrong type (bool)"),
    ],
)
def test_a_damaged_manifest_says_what_is_wrong(edit: object, problem: str) -> None:
    data = json.loads(WRITTEN.read_bytes())
    if "sha256" not in problem:
        del data[SEAL]
    edit(data)  # type: ignore[operator]
    with pytest.raises(
        ManifestError, match=r"version 2's head.json " + problem.replace("(", r"\(").replace(")", r"\)")
    ):
        HeadManifest.from_json(data, "version 2's head.json")
    with pytest.raises(ManifestError, match="is not a manifest"):
        HeadManifest.from_json([data])
