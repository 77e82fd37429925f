"""bench.images' own parts: the report's ratios, the camera-sized photos, whole passes."""

from __future__ import annotations

import io

from PIL import Image

from bench.images import Rate, camera_sized, passes, report


def test_report_ratios() -> None:
    rates = {
        "decode headswap": Rate("a", 100, 1.0),
        "decode pillow": Rate("b", 50, 1.0),
        "decode headswap 1080p": Rate("c", 30, 1.0),
        "decode pillow 1080p": Rate("d", 10, 1.0),
        "ort": Rate("e", 200, 1.0),
        "ort+decode": Rate("f", 100, 1.0),
        "headswap": Rate("g", 95, 1.0),
    }
    text = report(rates, 370, 0.2)
    assert "**0.47**" in text and "**0.95**" in text and "2.00×" in text and "3.00×" in text
    assert "| g | 95.0 | 10.53 |" in text and "load average at start 0.20" in text


def test_camera_sized_and_passes() -> None:
    small = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(small, "JPEG")
    (big,) = camera_sized([small.getvalue()])
    assert Image.open(io.BytesIO(big)).size == (1920, 1080)
    calls = []
    rate = passes("x", lambda: calls.append(1) or 5, 0.01)
    assert rate.images == 5 * (len(calls) - 1) and rate.images >= 5  # the warm-up pass is not counted
