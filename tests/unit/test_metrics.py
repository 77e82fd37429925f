"""The metrics the server exports are the ones the dashboard, the autoscaler and the docs name."""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from headswap.server.inference.forward import BatchStats
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


def declared_labels(metrics: Metrics) -> dict[str, tuple[str, ...]]:
    """Every metric's label names as declared, whether or not it has a sample yet."""
    return {
        collector._name: tuple(collector._labelnames)  # type: ignore[attr-defined]
        for collector in vars(metrics).values()
        if isinstance(collector, MetricWrapperBase)
    }


def test_label_sets_are_fixed_and_bounded() -> None:
    """Every metric, those with no sample yet included (calls, their latency, the backbone's identity): a
    label may only take values from a fixed, small set, never a tenant or a key."""
    m = Metrics()
    declared = declared_labels(m)
    registered = {family.name for family in m.registry.collect()}
    assert {n.removesuffix("_total") for n in declared} == registered, "a metric the check does not see"
    allowed = {
        "rpc",  # one of the server's methods
        "code",  # a gRPC status name
        "stage",
        "outcome",
        "reason",  # small enums
        "served_as",  # a backbone's name, from the server's configuration
        "name",
        "fingerprint",
        "provider",
        "precision",  # of the backbones served: one series each
        "trained",  # precisions: fp32, fp16, int8 (and "unrecorded")
        "served",
    }
    for name, labels in declared.items():
        assert set(labels) <= allowed, (name, labels)
    # What is exposed matches what is declared (histograms add only "le").
    m.observe_batch(BatchStats(items=4, requests=2, padded_cost=40, real_cost=30, run_s=0.01))
    m.observe_stages(0.001, 0.002, 0.003, 0.0001)
    m.requests.labels("Embed", "OK").inc()
    m.request_duration.labels("Embed").observe(0.01)
    m.backbone_info.labels("text", "minilm", "f" * 12, "CPUExecutionProvider", "fp32").set(1)
    for name, keys in exposed(m).items():
        assert keys - {"le"} <= allowed, (name, keys)
    assert {"rpc", "code"} <= exposed(m)["headswap_requests"]


def test_padding_ratio() -> None:
    from prometheus_client import generate_latest

    m = Metrics()
    m.observe_batch(BatchStats(items=4, requests=2, padded_cost=40, real_cost=30, run_s=0.01))
    text = generate_latest(m.registry).decode()
    assert "headswap_batch_padding_ratio_sum 0.25" in text
    assert "headswap_batch_size_items_sum 4.0" in text
