"""bench.common, bench.data and bench.serving: percentiles, workloads, the load-average wait, /proc parsing, docs sections, tables."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from bench.common import LatencySummary, markdown_table, percentile, replace_section, wait_for_quiet
from bench.data import (
    cut_to_tokens,
    default_tokenizer_path,
    load_tokenizer,
    long_workload,
    short_workload,
    token_count,
    word_count,
)
from bench.serving import _stat_cpu_seconds, batch_limits_from_log, parse_proc_stat

# -- percentiles -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
@pytest.mark.parametrize("n", [1, 2, 7, 100, 1001])
def test_percentile_matches_numpy_linear(q: float, n: int) -> None:
    rng = random.Random(n)
    values = [rng.expovariate(0.1) for _ in range(n)]  # skewed, like latencies
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-12)


def test_percentile_known_values_and_order_independence() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([10.0], 99) == 10.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0) == 1.0
    # p99 of 1..100 lies between the 99th and 100th values, not on the maximum.
    assert percentile([float(i) for i in range(1, 101)], 99) == pytest.approx(99.01)


def test_percentile_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    with pytest.raises(ValueError):
        percentile([1.0], -1)


def test_latency_summary() -> None:
    s = LatencySummary.of([float(i) for i in range(1, 101)])
    assert (s.count, s.mean_ms, s.p50_ms, s.max_ms) == (100, 50.5, 50.5, 100.0)
    assert s.p90_ms == pytest.approx(90.1)
    assert s.p99_ms == pytest.approx(99.01)


# -- workloads ---------------------------------------------------------------------------------------------

SENTENCES = [
    "a stirring , funny and finally transporting re-imagining of beauty and the beast",
    "apparently reassembled from the cutting-room floor of any given daytime soap .",
    "I am still waiting on my card?",
    "hi",
    "too short here",
    "What can I do if my card still hasn't arrived after 2 weeks?",
    " ".join(["word"] * 41),
    " ".join(["word"] * 40),
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .",
]


def test_short_workload_keeps_4_to_40_words_and_the_count() -> None:
    texts = short_workload(SENTENCES, 50, seed=3)
    assert len(texts) == 50
    assert all(4 <= word_count(t) <= 40 for t in texts)
    assert {t for t in texts} == {t for t in SENTENCES if 4 <= word_count(t) <= 40}
    assert " ".join(["word"] * 40) in texts and " ".join(["word"] * 41) not in texts


def test_short_workload_is_seeded_and_repeats_only_after_using_every_text() -> None:
    distinct = len({t for t in SENTENCES if 4 <= word_count(t) <= 40})
    a = short_workload(SENTENCES, distinct, seed=1)
    assert len(set(a)) == distinct  # one full pass before any repeat
    assert a == short_workload(SENTENCES, distinct, seed=1)
    assert a != short_workload(SENTENCES, distinct, seed=2)
    with pytest.raises(ValueError):
        short_workload(["hi", "two words"], 5)


@pytest.fixture(scope="module")
def tokenizer() -> object:
    path = default_tokenizer_path()
    if path is None:
        pytest.fail("no all-MiniLM-L6-v2 tokenizer.json (neither .cache/backbone nor the model package)")
    return load_tokenizer(path)


def test_long_workload_texts_are_124_to_128_tokens(tokenizer: object) -> None:
    texts = long_workload(SENTENCES * 3, tokenizer, 40, tokens=128, seed=0)  # type: ignore[arg-type]
    assert len(texts) == 40
    lengths = [token_count(tokenizer, t) for t in texts]  # type: ignore[arg-type]
    assert min(lengths) >= 124, lengths
    assert max(lengths) <= 128, lengths
    assert len(set(texts)) > 1


def test_long_workload_other_lengths(tokenizer: object) -> None:
    texts = long_workload(SENTENCES, tokenizer, 10, tokens=32, seed=5)  # type: ignore[arg-type]
    assert all(28 <= token_count(tokenizer, t) <= 32 for t in texts)  # type: ignore[arg-type]


def test_cut_to_tokens_gives_a_prefix_within_the_budget(tokenizer: object) -> None:
    text = " ".join(SENTENCES)
    for budget in (8, 17, 64):
        cut = cut_to_tokens(tokenizer, text, budget)  # type: ignore[arg-type]
        assert text.startswith(cut)
        n = token_count(tokenizer, cut)  # type: ignore[arg-type]
        assert budget - 3 <= n <= budget
    assert cut_to_tokens(tokenizer, "short one", 128) == "short one"  # type: ignore[arg-type]


# -- the machine -------------------------------------------------------------------------------------------


def test_wait_for_quiet_waits_until_the_load_drops() -> None:
    readings = iter([1.5, 1.2, 0.6, 0.1])
    slept: list[float] = []
    load = wait_for_quiet(0.7, 30, 600, read=lambda: next(readings), sleep=slept.append, say=lambda _: None)
    assert load == 0.6
    assert slept == [30, 30]


def test_wait_for_quiet_gives_up_after_the_limit_and_reports_the_last_load() -> None:
    slept: list[float] = []
    messages: list[str] = []
    load = wait_for_quiet(0.7, 30, 90, read=lambda: 2.0, sleep=slept.append, say=messages.append)
    assert load == 2.0
    assert slept == [30, 30, 30]
    assert "measuring anyway" in messages[-1]


def test_stat_cpu_seconds_survives_spaces_and_parentheses_in_the_name() -> None:
    fields = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 30
    line = "1234 (event (engine) x) " + " ".join(fields)
    assert _stat_cpu_seconds(line) == pytest.approx(300 / os.sysconf("SC_CLK_TCK"))


# -- docs --------------------------------------------------------------------------------------------------

DOC = """# Benchmarks

## Head quality: Banking77 (MTEB protocol)

Someone else's text.<2 spaces>
Trailing spaces stay.

```sh
## not a heading inside a fence
python -m eval.banking77
```

## Embed throughput

old table

## Later section

| keep | me |
""".replace("<2 spaces>", "  ")  # a Markdown line break, kept as is


def test_replace_section_replaces_only_its_own_section() -> None:
    out = replace_section(DOC, "## Embed throughput", "new table\n")
    before, _, _ = DOC.partition("## Embed throughput")
    assert out.startswith(before)  # everything before, byte for byte
    assert out.endswith("## Later section\n\n| keep | me |\n")
    assert "old table" not in out and "new table" in out
    assert replace_section(out, "## Embed throughput", "new table\n") == out  # idempotent


def test_replace_section_ignores_headings_inside_fences_and_appends_when_missing() -> None:
    out = replace_section(DOC, "## Classify latency", "latency table")
    assert out.startswith(DOC.rstrip("\n"))
    assert out.endswith("\n\n## Classify latency\n\nlatency table\n")
    fenced = replace_section(DOC, "## not a heading inside a fence", "x")
    assert fenced.startswith(DOC.rstrip("\n")) and fenced.count("## not a heading inside a fence") == 2


def test_replace_section_last_section_and_empty_document() -> None:
    out = replace_section(DOC, "## Later section", "replaced")
    assert out == DOC.partition("## Later section")[0] + "## Later section\n\nreplaced\n"
    assert replace_section("", "## Embed throughput", "x") == "# Benchmarks\n\n## Embed throughput\n\nx\n"


def test_markdown_table() -> None:
    table = markdown_table(["a", "b"], [["x", "1"]], [False, True])
    assert table.splitlines() == ["| a | b |", "|---|--:|", "| x | 1 |"]
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [["only one"]], [False, True])


def test_batch_limits_from_the_server_log() -> None:
    log = (
        "2026-11-24 10:57:01,123 INFO headswap.server.backbone: backbone loaded\n"
        "2026-11-24 10:57:03,456 INFO headswap.server.service: batches of at most 16 inputs and 4096 padded "
        "tokens\n"
    )
    assert batch_limits_from_log(log) == (16, 4096)
    today = "INFO headswap.server.app: text: batches of at most 256 inputs and a cost of 65536, padding at most 30%"
    assert batch_limits_from_log(today) == (256, 65536)
    assert batch_limits_from_log("an older server that does not say") is None


def test_parse_proc_stat_busy_and_steal() -> None:
    tick = os.sysconf("SC_CLK_TCK")
    busy, steal = parse_proc_stat("cpu  800 5 40 550 30 7 9 60 0 0")
    assert busy == pytest.approx((800 + 5 + 40 + 7 + 9) / tick)  # idle and iowait are not busy
    assert steal == pytest.approx(60 / tick)
