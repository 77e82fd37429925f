"""The metrics the server exports are the ones the dashboard, the autoscaler and the docs name."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from headswap.server.inference.batcher import BatchStats
from headswap.server.metrics import Metrics
from tests.deploy import METRIC_NAMES


def exposed(metrics: Metrics) -> dict[str, set[str]]:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(family.name, set()).update(sample.labels)
    return names


def test_registry_matches_the_deploy_contract() -> None:
    names = {family.name for family in Metrics().registry.collect()}
    # prometheus_client reports counters without their _total suffix in the family name.
    full = {n if n in names else n.removesuffix("_total") for n in METRIC_NAMES}
    missing = {n for n in full if n not in names}
    assert not missing, f"the dashboard/HPA use metrics the server does not export: {missing}"
    assert all(n.startswith("headswap_") for n in names)


def test_label_sets_are_fixed_and_bounded() -> None:
    m = Metrics()
    m.observe_batch(BatchStats(items=4, requests=2, padded_cost=40, real_cost=30, run_s=0.01))
    m.observe_stages(0.001, 0.002, 0.003, 0.0001)
    labels = exposed(m)
    allowed = {
        "rpc",
        "code",
        "stage",
        "outcome",
        "reason",
        "le",
        "name",
        "fingerprint",
        "provider",
        "precision",
        "trained",  # precisions: fp32, fp16, int8 (and "unrecorded")
        "served",
    }
    for name, keys in labels.items():
        assert keys <= allowed, (name, keys)
        assert "tenant" not in keys


def test_padding_ratio() -> None:
    from prometheus_client import generate_latest

    m = Metrics()
    m.observe_batch(BatchStats(items=4, requests=2, padded_cost=40, real_cost=30, run_s=0.01))
    text = generate_latest(m.registry).decode()
    assert "headswap_batch_padding_ratio_sum 0.25" in text
    assert "headswap_batch_size_items_sum 4.0" in text
