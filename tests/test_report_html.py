"""report.html: one self-contained page drawn from the report dictionary."""
from __future__ import annotations

import base64
import re

import pytest

from pipeline.reporting import report_html


def report(learned=True, depth=True, allocation=True, workers=True):
    blocks = []
    for i in range(4):
        b = {"index": i, "seconds": 10.0 + i, "peak_private_bytes": (1 + i) * 2**30,
             "output_relative_error": 0.01 * (i + 1), "sha256": {"": "0" * 64}}
        if learned:
            b.update(loss_before=0.1 * (i + 1), loss_after=0.05 * (i + 1))
        if depth:
            b["output_depth_error"] = 0.001 * (4 - i)
        if workers:
            b["workers"] = [{"worker": k, "compute_seconds": 5.0 + k,
                             "collective_seconds": 0.5} for k in range(2)]
        blocks.append(b)
    out = {"schema_version": 2, "output": "/tmp/x<y>", "method": "omniquant",
           "schedule": "data_parallel", "blocks": blocks, "wall_seconds": 99.0,
           "phase_seconds": {"quantize": 80.0, "evaluate": 10.0},
           "perplexity": {"fp": 20.0, "quantized": 21.0, "corpus": "sotu:test", "windows": 8,
                          "seq_len": 32},
           "bits_per_weight": {"total": 3.25},
           "export": {"vllm_servable": False, "vllm_why": "asymmetric 3-bit"}}
    if allocation:
        out["allocation"] = {"achieved_bits": 2.98,
                             "units": [{"name": f"u{i}", "bits": b} for i, b in
                                       enumerate([2, 3, 4, 3])]}
    return out


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)",
                                                     page)]


@pytest.mark.unit
def test_every_plot_the_report_has_data_for_is_an_embedded_png():
    page = report_html.render(report())
    pngs = images(page)
    # loss, output error, output-depth error, bits per unit, time and memory, workers
    assert len(pngs) == 6
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 1000 for p in pngs)
    assert "21.0000 quantized vs 20.0000 FP (+5.00 %)" in page
    assert "/tmp/x&lt;y&gt;" in page and "<y>" not in page  # escaped
    assert "not servable: asymmetric 3-bit" in page
    assert "http" not in page.replace("https://", "")  # nothing fetched from elsewhere


@pytest.mark.unit
def test_plots_without_data_are_left_out():
    page = report_html.render(report(learned=False, depth=False, allocation=False,
                                     workers=False))
    assert len(images(page)) == 2  # output error; time and memory
    assert "loss before" not in page and "error at output depth" not in page


@pytest.mark.unit
def test_written_next_to_the_json(tmp_path):
    path = report_html.write_html(str(tmp_path), report())
    assert path.endswith("report.html")
    with open(path) as f:
        assert len(images(f.read())) == 6
