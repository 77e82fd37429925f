"""Out-of-distribution abstention on the real backbone (issue 24): a small Banking77 head that cross-validation
gets all right abstains on pizza and weather, claims no more than its held-out record supports, and keeps
its threshold across a restart and on a second server over the same store."""

from __future__ import annotations

from pathlib import Path

import pytest

from headswap.client import Client
from tests.helpers import ServerProcess

pytestmark = pytest.mark.integration

Data = dict[str, dict[str, list[str]]]
INTENTS = ["card_arrival", "exchange_rate", "lost_or_stolen_card"]
OFF_TOPIC = [
    "I want pizza",
    "what's the weather like in Paris?",
    "Can you recommend a good movie for tonight?",
    "How tall is the Eiffel tower?",
]


def start(backbone_dir: Path, store: Path, log: Path) -> ServerProcess:
    proc = ServerProcess(
        "--backbone", str(backbone_dir), "--store", str(store), "--warmup-rounds", "0", log_path=log
    )
    proc.wait_serving()
    return proc


def test_a_small_banking_head_abstains_on_pizza_and_weather(
    backbone_dir: Path, banking77: Data, tmp_path: Path
) -> None:
    texts = [t for i in INTENTS for t in banking77["train"][i][:10]]
    labels = [i for i in INTENTS for _ in range(10)]
    in_domain = [t for i in INTENTS for t in banking77["test"][i][:10]]
    store = tmp_path / "store"
    proc = start(backbone_dir, store, tmp_path / "a.log")
    try:
        with Client(proc.target) as client:
            result = client.adapt_head("bank", texts, labels)
            m = result.metrics
            assert m.evaluated_on == "cross_validation" and m.validation_examples == 30
            assert m.ood_threshold is not None and m.ood_flagged_share is not None
            assert m.ood_flagged_share <= 0.05
            assert m.confidence_cap is not None and m.confidence_cap <= 31 / 32 + 1e-9
            assert m.expected_calibration_error_interval is not None and m.log_loss_interval is not None
            off = client.classify("bank", OFF_TOPIC)
            assert all(p.out_of_distribution and p.abstained for p in off), [
                (p.label, p.probability, p.ood_score) for p in off
            ]
            # Never more confident than the held-out record supports, off-topic inputs included.
            assert max(p.probability for p in off) <= m.confidence_cap + 1e-4
            inside = client.classify("bank", in_domain)
            flagged = sum(p.out_of_distribution for p in inside)
            assert flagged <= 3, [(p.label, p.ood_score) for p in inside if p.out_of_distribution]
            assert all(
                p.ood_score < min(q.ood_score for q in off) for p in inside if not p.out_of_distribution
            )
            # The old behaviour on request: answered, flagged, not abstained.
            kept = client.classify("bank", OFF_TOPIC, ignore_ood=True)
            assert not any(p.abstained for p in kept) and all(p.out_of_distribution for p in kept)
            before = client.get_head("bank")
            before_answers = client.classify("bank", OFF_TOPIC + in_domain[:5])
    finally:
        assert proc.terminate() == 0
    # A restart, then a second server on the same store beside it: the same threshold, the same answers.
    proc = start(backbone_dir, store, tmp_path / "b.log")
    replica = start(backbone_dir, store, tmp_path / "c.log")
    try:
        for server in (proc, replica):
            with Client(server.target) as client:
                after = client.get_head("bank")
                assert after.versions[-1].metrics.ood_threshold == m.ood_threshold
                assert after == before
                answers = client.classify("bank", OFF_TOPIC + in_domain[:5])
                assert [p.out_of_distribution for p in answers] == [
                    p.out_of_distribution for p in before_answers
                ]
                for a, b in zip(answers, before_answers, strict=True):
                    assert a.ood_score == pytest.approx(b.ood_score, abs=1e-5)
    finally:
        assert replica.terminate() == 0
        assert proc.terminate() == 0


def test_the_evaluation_runs_quick(backbone_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from eval.ood import main

    assert main(["--quick", "--backbone", str(backbone_dir)]) == 0
    out = capsys.readouterr().out
    assert "| 3 intents, 10-shot | 30 |" in out and "AUROC" in out
