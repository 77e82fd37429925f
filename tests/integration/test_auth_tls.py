"""Issue 11 on the real server process: the first admin key made offline, keys that survive a restart,
TLS and mutual TLS with certificates made here (trustme), a renewed certificate picked up without a restart,
grpcurl with a key and TLS, and no key or key id in any log or metric."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
import trustme

from headswap.client import Client, HeadswapError, PermissionDenied
from tests.helpers import ServerProcess, free_port

pytestmark = pytest.mark.integration

Data = dict[str, dict[str, list[str]]]
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card"]


def examples(banking77: Data, per: int = 5) -> tuple[list[str], list[str]]:
    pairs = [(t, i) for i in INTENTS for t in banking77["train"][i][:per]]
    return [t for t, _ in pairs], [y for _, y in pairs]


def headswap(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "headswap.client.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost, a client certificate, and a second CA for the rotation."""
    root = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server, client, renewed = (
        ca.issue_cert("localhost", "127.0.0.1"),
        ca.issue_cert("client"),
        other.issue_cert("localhost", "127.0.0.1"),
    )
    files = {
        "ca": ca.cert_pem,
        "other_ca": other.cert_pem,
        "cert": server.cert_chain_pems[0],
        "key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
        "renewed_cert": renewed.cert_chain_pems[0],
        "renewed_key": renewed.private_key_pem,
    }
    out = {}
    for name, blob in files.items():
        blob.write_to_path(str(root / f"{name}.pem"))
        out[name] = root / f"{name}.pem"
    return out


def test_keys_tls_restart_grpcurl_and_no_leaks(
    backbone_dir: Path, banking77: Data, pki: dict[str, Path], tmp_path: Path
) -> None:
    store, pepper = tmp_path / "store", tmp_path / "pepper"
    pepper.write_text("a pepper of more than sixteen bytes, from a Secret\n")
    env = {"HEADSWAP_AUTH_PEPPER_FILE": str(pepper)}
    bootstrap = headswap("keys", "create", "--admin", "--name", "bootstrap", "--store", str(store), env=env)
    assert bootstrap.returncode == 0, bootstrap.stderr
    admin = bootstrap.stdout.strip().splitlines()[-1]
    admin_id = admin.split("_")[1]
    # TLS on the gRPC port (a copy of the certificate files, to renew them later), health alone in plaintext.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(pki["cert"].read_bytes())
    key.write_bytes(pki["key"].read_bytes())
    health_port = free_port()
    args = ["--backbone", str(backbone_dir), "--store", str(store), "--warmup-rounds", "0", "--auth", "keys",
            "--tls-cert", str(cert), "--tls-key", str(key), "--health-port", str(health_port)]  # fmt: skip
    metrics_port = free_port()
    proc = ServerProcess(*args, log_path=tmp_path / "a.log", env=env, metrics_port=metrics_port)
    secrets: list[str] = [admin, admin_id]
    ca = pki["ca"].read_bytes()
    try:
        target = f"localhost:{proc.port}"
        with Client(f"127.0.0.1:{health_port}") as plain:
            plain.wait_ready(120)  # the plaintext health port answers probes
        tls = {"root_certificates": ca}
        with Client(target, api_key=admin, **tls) as client:  # type: ignore[arg-type]
            made = headswap(
                "keys",
                "create",
                "--tenant",
                "acme",
                "--target",
                target,
                "--api-key",
                admin,
                "--tls-ca",
                str(pki["ca"]),
                env={},
            )
            assert made.returncode == 0, made.stderr
            tenant_key = made.stdout.strip().splitlines()[-1]
            secrets += [tenant_key, tenant_key.split("_")[1]]
            other = client.create_api_key("tenant", "other").key
            secrets += [other, other.split("_")[1]]
        with Client(target, api_key=tenant_key, **tls) as acme:  # type: ignore[arg-type]
            acme.adapt_head("acme", *examples(banking77))
            assert acme.classify("", ["my card has not come"])[0].label == "card_arrival"
        with Client(target, api_key=other, **tls) as intruder, pytest.raises(PermissionDenied):  # type: ignore[arg-type]
            intruder.get_head("acme")
        with (
            Client(f"127.0.0.1:{proc.port}", api_key=admin, retries=0, timeout=5) as plaintext,
            pytest.raises(HeadswapError) as info,
        ):
            plaintext.list_heads()  # a plaintext client on the TLS port
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        status = headswap("health", "--target", target, "--tls-ca", str(pki["ca"]), env={})
        assert status.returncode == 0 and "SERVING" in status.stdout
        out = subprocess.run(
            ["grpcurl", "-cacert", str(pki["ca"]), "-H", f"authorization: Bearer {tenant_key}",
             "-d", '{"inputs": [{"text": "lost my card"}]}', target, "headswap.v1.HeadswapService/Classify"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["predictions"][0]["labels"][0]["label"] == "lost_or_stolen_card"
        denied = subprocess.run(
            ["grpcurl", "-cacert", str(pki["ca"]), target, "headswap.v1.HeadswapService/ListHeads"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert denied.returncode != 0 and "Unauthenticated" in denied.stderr
        # A renewed certificate (here from another CA) serves new connections, with no restart.
        cert.write_bytes(pki["renewed_cert"].read_bytes())
        key.write_bytes(pki["renewed_key"].read_bytes())
        with Client(target, api_key=admin, root_certificates=pki["other_ca"].read_bytes()) as renewed:
            assert [h.tenant for h in renewed.list_heads()] == ["acme"]
        with (
            Client(target, api_key=admin, root_certificates=ca, retries=0, timeout=5) as stale,
            pytest.raises(HeadswapError),
        ):
            stale.list_heads()
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        )
        assert 'headswap_auth_failures_total{reason="missing"} 1.0' in metrics
    finally:
        assert proc.terminate() == 0
    # Keys survive a restart (plaintext now).
    proc = ServerProcess("--backbone", str(backbone_dir), "--store", str(store), "--warmup-rounds", "0", "--auth", "keys",
                         log_path=tmp_path / "b.log", env=env)  # fmt: skip
    try:
        proc.wait_serving()
        with Client(proc.target, api_key=tenant_key) as acme:
            assert acme.classify("acme", ["exchange rate for euros"])[0].label == "exchange_rate"
        with Client(proc.target, api_key=admin) as client:
            assert {k.tenant for k in client.list_api_keys()} == {None, "acme", "other"}
    finally:
        assert proc.terminate() == 0
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text() + metrics
    for secret in secrets:
        assert secret not in logs, "a key or a key id reached a log or a metric"


def test_mutual_tls(backbone_dir: Path, pki: dict[str, Path], tmp_path: Path) -> None:
    proc = ServerProcess(
        "--backbone", str(backbone_dir), "--warmup-rounds", "0", "--tls-cert", str(pki["cert"]),
        "--tls-key", str(pki["key"]), "--tls-client-ca", str(pki["ca"]), log_path=tmp_path / "log",
    )  # fmt: skip
    try:
        target = f"localhost:{proc.port}"
        ca = pki["ca"].read_bytes()
        with Client(
            target, root_certificates=ca, certificate_chain=pki["client_cert"].read_bytes(),
            private_key=pki["client_key"].read_bytes(),
        ) as client:  # fmt: skip
            client.wait_ready(120)
            assert client.embed(["hello"]).shape == (1, 384)
        with (
            Client(target, root_certificates=ca, retries=0, timeout=5) as anonymous,
            pytest.raises(HeadswapError) as info,
        ):
            anonymous.embed(["hello"])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        assert proc.terminate() == 0


def test_a_failed_certificate_reload_keeps_the_old_certificate(
    backbone_dir: Path, pki: dict[str, Path], tmp_path: Path
) -> None:
    """A rotation caught half-way (a new certificate beside the old key) or a damaged file: new connections
    keep being served with the certificate in use, the server says why in its log, and the rotation takes
    effect once the files agree again."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(pki["cert"].read_bytes())
    key.write_bytes(pki["key"].read_bytes())
    proc = ServerProcess(
        "--backbone", str(backbone_dir), "--warmup-rounds", "0", "--tls-cert", str(cert), "--tls-key", str(key),
        log_path=tmp_path / "log",
    )  # fmt: skip
    target = f"localhost:{proc.port}"
    old_ca, new_ca = pki["ca"].read_bytes(), pki["other_ca"].read_bytes()

    def served_by(ca: bytes) -> bool:
        """A new connection (a new client) trusting only `ca` is served."""
        with Client(target, root_certificates=ca, retries=0, timeout=10) as client:
            try:
                return bool(client.embed(["hello"]).shape == (1, 384))
            except HeadswapError as exc:
                assert exc.code == grpc.StatusCode.UNAVAILABLE, exc
                return False

    try:
        with Client(target, root_certificates=old_ca) as client:
            client.wait_ready(120)
        assert served_by(old_ca) and not served_by(new_ca)
        # Mid-rotation: the new certificate is written, its key not yet.
        cert.write_bytes(pki["renewed_cert"].read_bytes())
        assert served_by(old_ca) and not served_by(new_ca)
        assert "TLS files not reloaded" in proc.log()
        # A damaged file: not PEM at all.
        key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nthis is not a key\n-----END PRIVATE KEY-----\n")
        assert served_by(old_ca) and not served_by(new_ca)
        # The files agree again: the renewed certificate serves new connections.
        key.write_bytes(pki["renewed_key"].read_bytes())
        assert served_by(new_ca) and not served_by(old_ca)
        assert "TLS certificate reloaded" in proc.log()
    finally:
        assert proc.terminate() == 0
    log = proc.log_path.read_text()
    assert "Traceback" not in log
    assert log.count("TLS files not reloaded") == 2, (
        "a bad file is reported once per change, not per connection"
    )
