"""The bench plot reads at a glance: plain numbers on its log axes, the concurrencies as ticks."""

from __future__ import annotations

import pytest

from service.tools.bench.report import _plain_axes

plt = pytest.importorskip("matplotlib.pyplot")


def test_log_axes_show_plain_numbers_and_the_measured_concurrencies() -> None:
    figure, (throughput, latency) = plt.subplots(1, 2)
    throughput.plot([1, 4, 16, 64], [1032, 1979, 2024, 1899])
    throughput.set(xscale="log", yscale="log")
    latency.plot([1032, 1979], [0.9, 34.0])
    latency.set(yscale="log")
    _plain_axes(throughput, latency, [1, 4, 16, 64])
    figure.canvas.draw()
    assert list(throughput.get_xticks()) == [1, 4, 16, 64]
    shown = [t.get_text() for t in throughput.get_xticklabels()]
    assert shown == ["1", "4", "16", "64"]
    formatter = throughput.yaxis.get_major_formatter()
    assert formatter(1000.0, 0) == "1,000" and formatter(0.5, 0) == "0.5"
    assert "10^" not in "".join(t.get_text() for t in latency.get_yticklabels())
    plt.close(figure)
