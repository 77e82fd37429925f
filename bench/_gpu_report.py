"""`bench.gpu`'s report: the markdown tables of a GPU run and of a free-encoder (or CPU) run."""

from __future__ import annotations

import json
from typing import Any

from bench.common import markdown_table


def report_gpu(data: dict[str, Any]) -> str:
    rows = []

    def add(system: str, short: Any, long: Any = "—") -> None:
        rows.append([system, _num(short), _num(long)])

    add(
        "plain ONNX Runtime CUDA fp16, tokenize + forward in one thread, batch 1024",
        data.get("ort_fp16_tokenize_forward_b1024_short"),
        data.get("ort_fp16_tokenize_forward_b1024_long"),
    )
    add(
        "sentence-transformers fp16, batch 256",
        data.get("sentence_transformers_fp16_b256_short", "not run"),
        data.get("sentence_transformers_fp16_b256_long", "not run"),
    )
    add(
        "forward pass alone, fixed shape, batch 1024 (the ceiling)",
        f"{_num(data.get('forward_only_fixed_b1024_t32'))} at 32 tokens",
        f"{_num(data.get('forward_only_fixed_b1024_t128'))} at 128 tokens",
    )
    for key, value in sorted(data.items()):
        if key.startswith("headswap_embed_workers_"):
            workers = key.rsplit("_", 1)[1]
            add(
                f"headswap Embed over gRPC, {workers} worker(s), requests of 256",
                value["short_r256"]["inputs_per_s"],
                value.get("long_r256", {}).get("inputs_per_s", "—"),
            )
            add(
                f"headswap Embed over gRPC, {workers} worker(s), requests of 32",
                value["short_r32"]["inputs_per_s"],
            )
    table = markdown_table(["system", "short texts/s", "long texts/s"], rows, [False, True, True])
    parts = [table]
    for key, value in sorted(data.items()):
        if key.startswith("headswap_classify_workers_"):
            workers = key.rsplit("_", 1)[1]
            lines = [
                [name.replace("rate_", "") + (" calls/s offered" if name.startswith("rate") else " (closed loop)"),
                 _num(v["calls_per_s"]), _num(v["p50_ms"]), _num(v["p99_ms"]), json.dumps(v["errors"])]
                for name, v in value.items()
            ]  # fmt: skip
            parts.append(
                f"Single-text Classify, {workers} worker(s):\n\n"
                + markdown_table(
                    ["load", "calls/s answered", "p50 ms", "p99 ms", "errors"],
                    lines,
                    [False, True, True, True, False],
                )
            )
    if "adapt_head_10k" in data:
        parts.append("AdaptHead on 10,000 Banking77 examples: " + json.dumps(data["adapt_head_10k"]))
    if "train_head_10k_alone" in data:
        parts.append(
            "The head's fit alone (`train_head`, 10,000 × 384): " + json.dumps(data["train_head_10k_alone"])
        )
    return "\n\n".join(parts)


def report_free(data: dict[str, Any]) -> str:
    summary = data.get("free_summary", {})
    names = list(summary)
    rows = []
    for key, label in (
        ("embed_r256", "Embed, requests of 256 short texts: texts/s"),
        ("embed_r32", "Embed, requests of 32 short texts: texts/s"),
        ("classify_1", "Classify, one text per call: calls/s"),
        ("classify_1_h2load", "Classify, one text per call, from h2load: calls/s"),
        ("embed_r256_per_cpu", "Embed, requests of 256: texts per server CPU-second"),
        ("embed_r32_per_cpu", "Embed, requests of 32: texts per server CPU-second"),
        ("classify_1_per_cpu", "Classify, one text per call: calls per server CPU-second"),
        (
            "classify_1_h2load_per_cpu",
            "Classify, one text per call, from h2load: calls per server CPU-second",
        ),
        *[
            (f"{key}_{q}", f"Classify at {key.rsplit('_', 1)[1]} calls/s (open loop): {q}, ms")
            for key in sorted(
                {k.rsplit("_", 1)[0] for n in names for k in summary[n] if k.startswith("classify_at_")},
                key=lambda k: float(k.rsplit("_", 1)[1]),
            )
            for q in ("p50", "p99")
        ],
    ):
        if not all(key in summary[name] for name in names):
            continue
        values = [summary[name][key] for name in names]
        # A latency's ratio to the baseline's says little (an overloaded baseline's seconds): shown as is.
        latency = key.startswith("classify_at_")
        ratios = [f"{v / values[0]:.2f}×" if values[0] and not latency else "—" for v in values[1:]]
        rows.append([label, *[_num(v) for v in values], *ratios])
    ratio_heads = [f"{name} / {names[0]}" for name in names[1:]]
    return markdown_table(
        ["measure", *names, *ratio_heads],
        rows,
        [False, *[True] * len(names), *[True] * len(ratio_heads)],
    )


def _num(value: Any) -> str:
    if isinstance(value, (int, float)):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value) if value is not None else "—"
