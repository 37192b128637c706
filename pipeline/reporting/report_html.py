"""`report.html`: the run's report as one self-contained page (the PNG plots embedded), written
next to `report.json` from the same dictionary. Plots: each block's reconstruction loss before
and after training (learned methods) or its output error, the error carried to the output
depth (`eval.depth_errors`), the bits of each unit when CVXQ allocated them, the time and
memory per block, the data-parallel workers' compute and collective time per block; and the
FP against the quantized perplexity in the summary."""
from __future__ import annotations

import base64
import html
import io
import logging
from typing import Any

from pipeline import storage

log = logging.getLogger(__name__)
REPORT_HTML = "report.html"
STYLE = ("<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
         "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
         "figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}"
         "img{max-width:100%}</style></head><body>")
GIB = 1024**3


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _series(blocks: list[dict[str, Any]], key: str) -> list[float | None]:
    return [b.get(key) for b in blocks]


def _plots(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(title, caption, base64 PNG) per plot that the report has data for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report.get("blocks", [])
    x = [b.get("index", i) + 1 for i, b in enumerate(blocks)]
    out: list[tuple[str, str, str]] = []

    def figure(title: str, caption: str, draw: Any, log_y: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        draw(ax)
        ax.set_xlabel("block")
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        out.append((title, caption, _png(fig)))
        plt.close(fig)

    before, after = _series(blocks, "loss_before"), _series(blocks, "loss_after")
    if any(v is not None for v in before):
        def loss(ax: Any) -> None:
            ax.plot(x, before, "o-", ms=3, label="before training")
            ax.plot(x, after, "o-", ms=3, label="after training (folded)")
            ax.set_ylabel("reconstruction loss")
        figure("Reconstruction loss per block", "The training loss on the probe windows with "
               "the initial parameters and after folding (learned methods).", loss, True)
    errors = _series(blocks, "output_relative_error")
    if any(v is not None for v in errors):
        figure("Output error per block", "Each block's output on the quantized stream against "
               "the FP block on the FP stream (relative squared error): the error accumulated "
               "up to that depth.",
               lambda ax: (ax.plot(x, errors, "o-", ms=3), ax.set_ylabel("relative error")),
               True)
    depth = _series(blocks, "output_depth_error")
    if any(v is not None for v in depth):
        figure("Error at the output depth per block", "Each block alone quantized, its error "
               "carried through the FP blocks after it to the last block's output "
               "(eval.depth_errors): which blocks the model's output is most sensitive to.",
               lambda ax: (ax.bar(x, depth), ax.set_ylabel("relative error at the output")),
               True)
    allocation = report.get("allocation") or {}
    units = allocation.get("units") or []
    if units and all(isinstance(u, dict) and "bits" in u for u in units):
        def bits(ax: Any) -> None:
            ax.bar(range(len(units)), [u["bits"] for u in units], width=1.0)
            ax.set_ylabel("bits")
            ax.set_xlabel("decision unit (depth order)")
        fig, ax = plt.subplots(figsize=(8, 3.2))
        bits(ax)
        ax.grid(alpha=0.3)
        caption = (f"Average {allocation.get('achieved_bits', '?')} bits under the budget; "
                   "one bar per decision unit.")
        out.append(("Bits per unit (CVXQ)", caption, _png(fig)))
        plt.close(fig)
    seconds = _series(blocks, "seconds")
    if any(v is not None for v in seconds):
        def time_memory(ax: Any) -> None:
            ax.bar(x, [s or 0 for s in seconds], color="tab:blue", label="seconds")
            ax.set_ylabel("seconds")
            rss = _series(blocks, "peak_private_bytes")
            if any(r for r in rss):
                twin = ax.twinx()
                twin.plot(x, [(r or 0) / GIB for r in rss], "o-", ms=3, color="tab:red",
                          label="peak private memory (GiB)")
                twin.set_ylabel("GiB", color="tab:red")
        figure("Time and memory per block", "Seconds to quantize each block (bars) and the "
               "worker's peak private memory so far (line).", time_memory)
    per_worker = [b.get("workers") for b in blocks]
    if any(per_worker):
        count = max(len(w or []) for w in per_worker)

        def workers(ax: Any) -> None:
            for k in range(count):
                compute = [(w[k].get("compute_seconds", 0) if w and k < len(w) else 0)
                           for w in per_worker]
                wait = [(w[k].get("collective_seconds", 0) if w and k < len(w) else 0)
                        for w in per_worker]
                offset = [xi + (k - (count - 1) / 2) * 0.8 / count for xi in x]
                ax.bar(offset, compute, width=0.8 / count, label=f"worker {k} compute")
                ax.bar(offset, wait, width=0.8 / count, bottom=compute, hatch="//",
                       alpha=0.5, label=f"worker {k} collectives")
            ax.set_ylabel("seconds")
        figure("Workers per block", "Data-parallel workers: each one's compute time and its "
               "time in collectives (hatched) per block.", workers)
    return out


def _summary(report: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = [("output", str(report.get("output"))),
                                   ("method", str(report.get("method"))),
                                   ("schedule", str(report.get("schedule"))),
                                   ("blocks", str(len(report.get("blocks", []))))]
    ppl = report.get("perplexity")
    if ppl:
        fp, quant = ppl.get("fp"), ppl.get("quantized")
        text = f"{quant:.4f} quantized" if quant is not None else "-"
        if fp is not None:
            text += f" vs {fp:.4f} FP"
            if quant is not None:
                text += f" ({100 * (quant / fp - 1):+.2f} %)"
        label = (f"perplexity ({ppl.get('corpus')}, {ppl.get('windows')} windows of "
                 f"{ppl.get('seq_len')})")
        rows.append((label, text))
    bits = report.get("bits_per_weight") or {}
    if bits.get("total") is not None:
        rows.append(("bits per weight", f"{bits['total']:.3f}"))
    rows.append(("wall time", f"{report.get('wall_seconds', 0):.1f} s"))
    phases = report.get("phase_seconds") or {}
    if phases:
        rows.append(("phases", ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())))
    export = report.get("export") or {}
    if "vllm_servable" in export:
        rows.append(("vLLM", "servable" if export["vllm_servable"] else
                     f"not servable: {export.get('vllm_why')}"))
    return rows


def render(report: dict[str, Any]) -> str:
    """The page for a report dictionary (as written to report.json)."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>relayquant report: {esc(str(report.get('output')))}</title>",
             STYLE,
             "<h1>relayquant report</h1><table>"]
    parts += [f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _summary(report)]
    parts.append("</table>")
    for title, caption, png in _plots(report):
        parts.append(f"<figure><h2>{esc(title)}</h2><img alt='{esc(title)}' "
                     f"src='data:image/png;base64,{png}'><figcaption>{esc(caption)}"
                     "</figcaption></figure>")
    columns = [("index", "block", lambda v: str(v + 1)),
               ("seconds", "seconds", lambda v: f"{v:.1f}"),
               ("loss_before", "loss before", lambda v: f"{v:.3e}"),
               ("loss_after", "loss after", lambda v: f"{v:.3e}"),
               ("output_relative_error", "output error", lambda v: f"{v:.3e}"),
               ("output_depth_error", "error at output depth", lambda v: f"{v:.3e}"),
               ("peak_private_bytes", "peak private GiB", lambda v: f"{v / GIB:.2f}")]
    blocks = report.get("blocks", [])
    shown = [c for c in columns if any(b.get(c[0]) is not None for b in blocks)]
    parts.append("<h2>Blocks</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>"
                                                         for _, h, _ in shown) + "</tr>")
    for b in blocks:
        parts.append("<tr>" + "".join(
            f"<td>{esc(fmt(b[k])) if b.get(k) is not None else ''}</td>"
            for k, _, fmt in shown) + "</tr>")
    parts.append("</table><p style='font-size:12px;color:#777'>Every figure here is in "
                 "report.json (schema: docs/report.md).</p></body></html>")
    return "\n".join(parts)


def write_html(output: str, report: dict[str, Any]) -> str | None:
    """Write OUTPUT/report.html; None (and a warning) when matplotlib is missing or a plot
    fails: the JSON report is the record, the page only shows it."""
    try:
        page = render(report)
    except ImportError:
        log.warning("report.html not written: matplotlib is not installed (pip install "
                    "matplotlib); report.json has every figure")
        return None
    path = storage.join(output, REPORT_HTML)
    storage.write_bytes(path, page.encode())
    return path
