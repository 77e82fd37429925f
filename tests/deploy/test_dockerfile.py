"""The Dockerfile: lint-clean, builds from files that exist, and makes the image the manifests expect."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from headswap.server.config import ServerConfig, setting_names
from tests.deploy import REPO, Instruction, Stage, parse_dockerfile, run_tool

CONFIG_ENVS = setting_names()
DEFAULTS = ServerConfig()


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile()


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_hadolint_is_clean() -> None:
    proc = run_tool("hadolint", "--config", ".hadolint.yaml", "--no-color", "Dockerfile")
    assert proc.returncode == 0, f"hadolint found problems:\n{proc.stdout}{proc.stderr}"


def test_hadolint_catches_problems(tmp_path: Path) -> None:
    """The lint above means something: the same command fails a Dockerfile with a latest tag and an unpinned pip install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install requests\n", encoding="utf-8")
    proc = run_tool("hadolint", "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(bad))
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3013" in proc.stdout, proc.stdout


def _dockerignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    assert path.is_file(), ".dockerignore is missing: the build context would carry .venv, .git and .cache"
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_matches(pattern: str, rel: str) -> bool:
    """Docker's .dockerignore matching, enough for these patterns: a pattern matches a path or its parents."""
    pattern = pattern.strip("/")
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("**/"):
        tail = pattern[3:]
        return any(fnmatch.fnmatchcase(part, tail) for part in parts) or any(
            fnmatch.fnmatchcase("/".join(parts[i:]), tail) for i in range(len(parts))
        )
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def dockerignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _pattern_matches(pattern.lstrip("!"), rel):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = _dockerignore_patterns()
    for rel in (".venv", ".cache", ".git", ".mypy_cache", ".pytest_cache", "server/__pycache__"):
        assert dockerignored(rel, patterns), f".dockerignore should exclude {rel}"


def test_every_copy_source_exists_and_is_in_the_build_context(stages: list[Stage]) -> None:
    patterns = _dockerignore_patterns()
    sources: list[str] = []
    for stage in stages:
        for ins in stage.of("COPY") + stage.of("ADD"):
            flags, words = ins.flags_and_rest()
            if "from" in flags:
                continue  # a copy from another stage or image, not from the build context
            assert len(words) >= 2, f"Dockerfile:{ins.line}: COPY needs a source and a destination"
            sources += words[:-1]
    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sources:
        matches = (
            sorted(REPO.glob(source.rstrip("/"))) if any(c in source for c in "*?[") else [REPO / source]
        )
        assert matches and all(m.exists() for m in matches), f"COPY {source}: not in the repository"
        for match in matches:
            rel = match.relative_to(REPO).as_posix()
            assert not dockerignored(rel, patterns), f"COPY {source}: excluded by .dockerignore"
            if match.is_dir():
                for file in match.rglob("*"):
                    if file.suffix in (".py", ".proto", ".pyi", ".typed") or file.name == "py.typed":
                        inner = file.relative_to(REPO).as_posix()
                        assert not dockerignored(inner, patterns), f"{inner}: excluded by .dockerignore"
    # What setuptools needs to build headswap[server] (see [tool.setuptools] in pyproject.toml).
    needed = {"pyproject.toml", "README.md", "proto", "server", "client", "adapters"}
    copied = {s.strip("./").rstrip("/") for s in sources}
    assert needed <= copied, f"the image build needs {sorted(needed - copied)} too"


def test_base_image_is_cuda13_with_cudnn9_and_pinned(stages: list[Stage]) -> None:
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.image in names:
            continue
        assert ":" in stage.image and not stage.image.endswith(":latest"), f"pin a tag: FROM {stage.image}"
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", stages[-1].image), (
        f"the runtime image should be a CUDA 13 runtime with cuDNN (onnxruntime-gpu's build), not {stages[-1].image}"
    )


def test_installs_the_server_extra_with_torch_pinned_as_in_pyproject(stages: list[Stage]) -> None:
    runs = [ins.args for stage in stages for ins in stage.of("RUN")]
    assert any(re.search(r"pip install [^&;]*[\"']?\.?/?(?:src)?\[server\]", run) for run in runs), (
        "no RUN installs the project with its server extra (pip install './[server]')"
    )
    server_extra = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]["server"]
    torch_pins = [dep.replace(" ", "") for dep in server_extra if dep.replace(" ", "").startswith("torch==")]
    dockerfile_pins = {m for run in runs for m in re.findall(r"torch==[\w.+-]+", run)}
    assert dockerfile_pins <= set(torch_pins), (
        f"the Dockerfile installs {sorted(dockerfile_pins)}, pyproject.toml pins {torch_pins}"
    )


def exports(stages: list[Stage]) -> dict[str, tuple[Stage, str]]:
    """ "text" and "image" -> (stage, directory) of each `headswap export ... --out DIR` at build time."""
    found: dict[str, tuple[Stage, str]] = {}
    for stage in stages:
        for ins in stage.of("RUN"):
            for m in re.finditer(r"headswap export ((?:[^&;|]* )?)--out[ =](\S+)", ins.args):
                found["image" if "--image" in m.group(1) else "text"] = (stage, m.group(2))
    return found


def test_exports_both_backbones_at_build_time(stages: list[Stage], final: Stage) -> None:
    made = exports(stages)
    assert set(made) == {"text", "image"}, (
        "RUN `headswap export --out DIR` and `headswap export --image mobilenet_v2 --out DIR` should export "
        "both backbones into the image"
    )
    assert final.env().get("HEADSWAP_BACKBONE") == made["text"][1], (
        "the image serves the text backbone by default"
    )
    for stage, out in made.values():
        if stage is not final:
            copies = [ins.flags_and_rest() for ins in final.of("COPY")]
            assert any(flags.get("from") == stage.name and words[:-1] == [out] for flags, words in copies), (
                f"{out} is exported in stage {stage.name!r}: COPY --from={stage.name} {out} into the image"
            )


def test_runs_as_uid_10001(final: Stage) -> None:
    users = final.of("USER")
    assert users, "the image runs as root: add a USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), "the last USER is root"
    if user.isdigit():
        assert user == "10001", f"USER {user}: the manifests run as uid 10001"
    else:
        assert any(re.search(rf"useradd .*--uid 10001 .*\b{user}\b", i.args) for i in final.of("RUN")), (
            f"USER {user}: create it with uid 10001"
        )


def test_healthcheck_asks_headswap_health(final: Stage) -> None:
    checks = final.of("HEALTHCHECK")
    assert len(checks) == 1, "the image should have one HEALTHCHECK"
    assert "CMD" in checks[0].words(), "HEALTHCHECK needs a CMD"
    cmd = Instruction("CMD", checks[0].args.split("CMD", 1)[1].strip(), checks[0].line)
    command = cmd.json_args() or cmd.words()
    assert command[:2] == ["headswap", "health"], f"HEALTHCHECK should run `headswap health`, not {command}"
    assert "--target" in command, "HEALTHCHECK: pass --target"
    target = command[command.index("--target") + 1]
    assert target == f"localhost:{DEFAULTS.port}", (
        f"HEALTHCHECK --target {target}: the server listens on {DEFAULTS.port}"
    )


def test_entrypoint_serves_and_stops_on_sigterm(final: Stage) -> None:
    entrypoint = final.of("ENTRYPOINT")[-1].json_args() if final.of("ENTRYPOINT") else []
    cmd = final.of("CMD")[-1].json_args() if final.of("CMD") else []
    assert entrypoint is not None and cmd is not None, (
        "use the exec (JSON) form so that SIGTERM reaches the server"
    )
    assert entrypoint + cmd == ["headswap", "serve"], (
        f"the image should run `headswap serve`, not {entrypoint + cmd}"
    )
    assert [i.args for i in final.of("STOPSIGNAL")] == ["SIGTERM"]
    exposed = {p.split("/")[0] for i in final.of("EXPOSE") for p in i.words()}
    assert {str(DEFAULTS.port), str(DEFAULTS.metrics_port)} <= exposed, f"EXPOSE {sorted(exposed)}"


def test_image_environment(final: Stage) -> None:
    env = final.env()
    assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1"
    settings = {k: v for k, v in env.items() if k.startswith("HEADSWAP_")}
    unknown = set(settings) - CONFIG_ENVS
    assert not unknown, f"not settings of headswap serve: {sorted(unknown)}"
    config = ServerConfig.from_sources(environ=settings)  # raises on a bad value
    assert config.port == DEFAULTS.port and config.metrics_port == DEFAULTS.metrics_port
    assert config.store.url is not None, "set HEADSWAP_STORE: the volume for the store is mounted there"
