"""The Grafana dashboard: valid JSON, a templated Prometheus datasource, and only the server's metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.deploy import DEPLOY, METRIC_NAMES, metric_base

DASHBOARD = DEPLOY / "grafana" / "headswap-dashboard.json"
DATASOURCE = "${datasource}"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    value = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(value, dict)
    return value


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # panels of a collapsed row


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries."""
    out = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(query["query"] if isinstance(query, dict) else query)
    return out


def test_datasource_is_a_templated_prometheus(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == DATASOURCE, panel["title"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == DATASOURCE, var["name"]


def test_panel_ids_unique_and_layout_in_grid(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_queries_name_only_the_servers_metrics_and_all_of_them(dashboard: dict[str, Any]) -> None:
    used = {
        metric_base(name) for query in queries(dashboard) for name in re.findall(r"headswap_[a-z_]+", query)
    }
    unknown = used - METRIC_NAMES
    assert not unknown, f"the server has no such metrics: {sorted(unknown)}"
    missing = METRIC_NAMES - used
    assert not missing, f"no panel shows {sorted(missing)}"


def test_queries_are_balanced(dashboard: dict[str, Any]) -> None:
    pairs = {")": "(", "}": "{", "]": "["}
    for query in queries(dashboard):
        stack: list[str] = []
        for char in re.sub(r'"[^"]*"', '""', query):  # brackets inside label values do not count
            if char in "({[":
                stack.append(char)
            elif char in pairs:
                assert stack and stack.pop() == pairs[char], f"unbalanced: {query}"
        assert not stack, f"unbalanced: {query}"


def test_latency_quantiles_and_the_views_asked_for(dashboard: dict[str, Any]) -> None:
    text = "\n".join(queries(dashboard))
    for histogram in ("headswap_request_duration_seconds", "headswap_stage_duration_seconds"):
        for q in ("0.5", "0.95", "0.99"):
            assert re.search(
                rf"histogram_quantile\({q}, sum by \(le[^)]*\) \(rate\({histogram}_bucket", text
            ), f"no p{q} of {histogram}"
    for stage in ("queue", "tokenize", "backbone", "head"):
        assert f'stage="{stage}"' in text, f"no panel for the {stage} stage"
    assert re.search(r"sum by \(rpc, code\) \(rate\(headswap_requests_total", text), (
        "throughput by rpc and code"
    )
    assert re.search(
        r"headswap_embedding_cache_hits_total.*/.*headswap_embedding_cache_misses_total", text
    ), "cache hit ratio"
