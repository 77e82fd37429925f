"""`bench.soak`'s report: the table by 10-minute window (long runs) and the markdown section."""

from __future__ import annotations

from collections import Counter

from bench._soak_samples import RACES, Samples, slope_error
from bench.common import markdown_table, measured_on


def windows(samples: Samples, entry_bytes: float, width: float = 600.0) -> list[list[str]]:
    """One row per whole `width`-second window of the load: where RSS ended, and its slope per 10 minutes
    with what the file-backed pages, the cache and the head stacks account for of it; so a long run shows
    whether growth levels off."""
    rows = []
    start = 0.0
    while samples.t and start + width <= samples.t[-1] + 5:
        part = samples.between(start, start + width)
        if len(part.t) >= 3:
            a = part.attribution(entry_bytes)
            rows.append(
                [
                    f"{start / 60:.0f}-{(start + width) / 60:.0f}",
                    f"{part.rss_mib[-1]:.0f}",
                    *(f"{v:+.1f}" for v in (a.rss, a.file, a.cache, a.heads, a.unaccounted)),
                ]
            )
        start += width
    return rows


SHORT = (
    "A run this short measures its second half inside the first 20 minutes, while the server is still growing "
    "to the load's working size (the cache filling, and memory not attributed part by part: allocators, "
    "ONNX Runtime's arena, the interpreter's object pools); whether growth levels off, a run of an hour shows "
    "(`--seconds 3600`, its own section with a table by 10-minute window)."
)


def render(
    outcomes: Counter[str],
    samples: Samples,
    seconds: float,
    tenants: int,
    setup_s: float,
    command: str,
    entry_bytes: float,
) -> str:
    late = samples.second_half()
    rss, fds, threads = late.slopes_per_10min()
    rss_error = 600 * slope_error(late.t, late.rss_mib)
    a = late.attribution(entry_bytes)
    by_window = windows(samples, entry_bytes) if seconds >= 1800 else []
    entries, heads = samples.cache_entries, samples.heads_mib
    rows = [[k, str(v), f"{v / seconds:.1f}"] for k, v in sorted(outcomes.items())]
    first, last = samples.rss_mib[0], samples.rss_mib[-1]
    return "\n".join(
        [
            measured_on(command),
            "",
            f"{tenants} tenants created in {setup_s:.0f} s, then {seconds:.0f} s of mixed load from 16 workers "
            "(60 % Classify, 20 % Embed, 12 % AdaptHead adding 2 examples of labels the tenant has, 5 % DeleteHead + retrain on new labels, 3 % calls for unknown tenants).",
            "",
            markdown_table(["call and outcome", "calls", "per second"], rows, [False, True, True]),
            "",
            *(
                [RACES, ""]
                if any(k.split()[0] != "unknown" and not k.endswith(" OK") for k in outcomes)
                else []
            ),
            f"Server RSS {first:.0f} MiB at the start of the load, {max(samples.rss_mib):.0f} MiB at most, "
            f"{last:.0f} MiB at the end; over the second half ({len(late.t)} samples, 5 s apart) RSS moved "
            f"{rss:+.1f} MiB (standard error {rss_error:.1f}; RSS between {min(late.rss_mib):.0f} and "
            f"{max(late.rss_mib):.0f} MiB), of which file-backed pages {a.file:+.1f} MiB (the code and data of "
            "the libraries, read from disk the first time the server runs each path: the kernel can drop them "
            "at any time, they are not memory the server holds), open file descriptors "
            f"{fds:+.1f} and threads {threads:+.1f} per 10 minutes. "
            f"File descriptors {min(samples.fds)} to {max(samples.fds)}; threads {min(samples.threads)} to "
            f"{max(samples.threads)}.",
            "",
            "Where the rest goes, by the server's own gauges of what holds memory by design: the "
            "embedding cache (every distinct text trained on, dropped with the last tenant that trained on it; "
            f"bounded by `--cache-capacity`, 200,000 entries by default) held {entries[0]:,.0f} entries at the start of the load and {entries[-1]:,.0f} at "
            f"the end, {a.new_entries:+,.0f} per 10 minutes over the second half, which at {entry_bytes:,.0f} "
            f"bytes an entry (measured with tracemalloc in this process) is {a.cache:+.1f} MiB; the head "
            "stacks (a slab per class-count bucket, doubled when full, halved once a quarter or less is used "
            "and its upper half is empty) held "
            f"{heads[0]:.1f} MiB at the start and {heads[-1]:.1f} MiB at the end, {a.heads:+.1f} MiB per 10 "
            "minutes. **Not accounted for by the file-backed pages, the cache or the head stacks: "
            f"{a.unaccounted:+.1f} MiB per 10 minutes.**",
            "",
            *(
                [
                    "The same, window by window (MiB per 10 minutes), to see whether growth levels off:",
                    "",
                    markdown_table(
                        [
                            "minutes",
                            "RSS at the end",
                            "RSS",
                            "file-backed",
                            "cache",
                            "head stacks",
                            "not accounted for",
                        ],
                        by_window,
                        [False, *[True] * 6],
                    ),
                    "",
                ]
                if by_window
                else [SHORT, ""]
            ),
        ]
    )
