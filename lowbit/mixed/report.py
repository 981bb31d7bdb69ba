"""The report of a quantized model and its mixed-precision search: HTML (PNGs embedded) and Markdown.

``write_report(artifact, out, search_result)`` writes ``report.html``, ``report.md`` and the figures as PNG files:

- ``bits.png``: storage bits per weight of every quantized layer, coloured by format;
- ``sqnr.png``: each layer's weight SQNR against the float weight, in dB (needs the float model);
- ``sensitivity.png`` (with a search record): every layer's sensitivity under every candidate format;
- ``front.png`` (with a search record): predicted error against bits per weight of the optimal allocation at
  every budget, the uniform formats and the chosen allocation marked;
- ``measures.png`` (with a record holding several measures): each cheap measure against the direct one (KL), per
  group and format, with Spearman's rank correlation.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from lowbit.errors import InputError
from lowbit.mixed.allocate import totals
from lowbit.mixed.search import SearchResult
from lowbit.mixed.sensitivity import spearman

REPORT_FILES = ("report.html", "report.md", "bits.png", "sqnr.png", "sensitivity.png", "front.png", "measures.png")


def write_report(artifact: str | Path, out: str | Path, result: SearchResult | None = None, overwrite: bool = False,
                 reference: bool = True) -> Path:
    """Write the report of the quantized folder ``artifact`` (and of ``result``, its search) into folder ``out``,
    atomically. ``reference``: load the float model the artifact records, for the SQNR column.

    Raises:
        InputError: ``out`` exists and holds other files than an earlier report (or exists and not
            ``overwrite``); the artifact cannot be read.
    """
    from lowbit.atomic import atomic_folder
    from lowbit.evaluation import layer_table, model_size
    from lowbit.io import load, read_manifest

    dest = _check_out(Path(out), overwrite)
    manifest = read_manifest(artifact)
    model = load(artifact)
    ref = None
    source = manifest.get("source")
    if reference and source is not None and source.get("type") != "hf-config":
        from lowbit.models import load_model

        ref = load_model(source).model
        transforms = (manifest.get("plan") or {}).get("transforms") or []
        if transforms:
            from lowbit.transforms import apply_transforms

            apply_transforms(ref, transforms)
    rows = layer_table(model, ref)
    size = model_size(model)
    figures = {"bits": _bits_figure(rows)}
    if any(r.sqnr_db is not None for r in rows):
        figures["sqnr"] = _sqnr_figure(rows)
    if result is not None:
        figures["sensitivity"] = _sensitivity_figure(result)
        figures["front"] = _front_figure(result)
        if "kl" in result.measures and len(result.measures) > 1:
            figures["measures"] = _measures_figure(result)
    md, body = _text(Path(artifact), rows, size, result)
    with atomic_folder(dest) as tmp:
        for name, png in figures.items():
            (tmp / f"{name}.png").write_bytes(png)
        images = "".join(f'<h2>{html.escape(_CAPTIONS[n])}</h2><img src="data:image/png;base64,'
                         f'{base64.b64encode(p).decode()}" alt="{n}">' for n, p in figures.items())
        (tmp / "report.md").write_text(md + "".join(f"\n## {_CAPTIONS[n]}\n\n![{n}]({n}.png)\n" for n in figures),
                                       encoding="utf-8")
        (tmp / "report.html").write_text(_HTML.format(title=html.escape(f"lowbit report: {Path(artifact).name}"),
                                                      body=body + images), encoding="utf-8")
    return dest


_CAPTIONS = {"bits": "Bits per weight, per layer", "sqnr": "Weight SQNR per layer",
             "sensitivity": "Sensitivity per layer and format", "front": "Predicted size/quality front",
             "measures": "Cheap sensitivities against the direct one (KL)"}

_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #bbb; padding: 2px 6px; text-align: right; }} td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}</style></head><body><h1>{title}</h1>{body}</body></html>
"""


def _check_out(dest: Path, overwrite: bool) -> Path:
    if dest.exists():
        if not dest.is_dir():
            raise InputError(f"{dest} exists and is not a folder; pass a folder path for the report")
        others = sorted(p.name for p in dest.iterdir() if p.name not in REPORT_FILES)
        if others:
            raise InputError(f"{dest} holds other files than a lowbit report ({', '.join(others[:5])}); choose a new "
                             f"or empty folder")
        if any(dest.iterdir()) and not overwrite:
            raise InputError(f"{dest} holds a report already; pass --overwrite to replace it")
    return dest.resolve()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _format_colours(formats: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return {f: cmap(i % 10) for i, f in enumerate(formats)}


def _bits_figure(rows) -> bytes:
    plt = _pyplot()
    formats = list(dict.fromkeys(r.format for r in rows))
    colours = _format_colours(formats)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    from matplotlib.patches import Patch

    ax.bar(range(len(rows)), [r.bits_per_weight for r in rows], color=[colours[r.format] for r in rows], width=0.9)
    ax.set_xlabel("quantized layer (model order)")
    ax.set_ylabel("storage bits per weight (scales included)")
    ax.legend(handles=[Patch(color=colours[f], label=f) for f in formats], fontsize=8, ncol=min(len(formats), 4))
    ax.set_xlim(-1, len(rows))
    return _png(fig)


def _sqnr_figure(rows) -> bytes:
    from matplotlib.patches import Patch

    plt = _pyplot()
    formats = list(dict.fromkeys(r.format for r in rows))
    colours = _format_colours(formats)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    vals = [r.sqnr_db if r.sqnr_db is not None and math.isfinite(r.sqnr_db) else 0.0 for r in rows]
    ax.bar(range(len(rows)), vals, color=[colours[r.format] for r in rows], width=0.9)
    ax.set_xlabel("quantized layer (model order)")
    ax.set_ylabel("weight SQNR vs float (dB)")
    ax.legend(handles=[Patch(color=colours[f], label=f) for f in formats], fontsize=8, ncol=min(len(formats), 4))
    ax.set_xlim(-1, len(rows))
    return _png(fig)


def _sensitivity_figure(result: SearchResult) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.8))
    colours = _format_colours(result.specs)
    chosen = [k for g, k in zip(result.groups, result.choice) for _ in g]
    if result.layer_costs:
        names = [n for g in result.groups for n in g]
        for k, s in enumerate(result.specs):
            ax.plot(range(len(names)), [max(result.layer_costs[n][k], 1e-30) for n in names], ".-", ms=3, lw=0.6,
                    color=colours[s], label=s)
        ax.scatter(range(len(names)), [max(result.layer_costs[n][chosen[i]], 1e-30) for i, n in enumerate(names)],
                   s=18, facecolors="none", edgecolors="k", label="chosen", zorder=3)
        ax.set_xlabel("layer (model order)")
    else:  # the KL measure: per group
        for k, s in enumerate(result.specs):
            ax.plot(range(len(result.groups)), [max(c[k], 1e-30) for c in result.cost], ".-", ms=3, lw=0.6,
                    color=colours[s], label=s)
        ax.set_xlabel("layer group (model order)")
    ax.set_yscale("log")
    ax.set_ylabel(f"sensitivity '{result.measure}' (log)")
    ax.legend(fontsize=8, ncol=min(len(result.specs) + 1, 5))
    return _png(fig)


def _front_figure(result: SearchResult) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    total = sum(result.weights)
    if result.front:
        xs, ys = zip(*result.front)
        ax.plot(xs, ys, "-", color="0.4", label="optimal allocation (predicted)")
    colours = _format_colours(result.specs)
    for k, s in enumerate(result.specs):
        c, b = totals([k] * len(result.groups), result.cost, result.bits)
        ax.plot([b / total], [c], "s", color=colours[s], ms=8, label=f"uniform {s}")
    ax.plot([result.bits_per_weight], [result.predicted], "*", color="crimson", ms=14,
            label=f"chosen ({result.bits_per_weight:.3f} bits/weight)")
    ax.set_xlabel("storage bits per weight (scales included)")
    ax.set_ylabel(f"predicted error: sum of '{result.measure}'")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _measures_figure(result: SearchResult) -> bytes:
    plt = _pyplot()
    cheap = [m for m in result.measures if m != "kl"]
    fig, axes = plt.subplots(1, len(cheap), figsize=(4.6 * len(cheap), 3.9), squeeze=False, layout="constrained")
    kl = [v for row in result.measures["kl"] for v in row]
    for ax, m in zip(axes[0], cheap):
        vals = [v for row in result.measures[m] for v in row]
        rho = spearman(vals, kl)
        ax.loglog([max(v, 1e-30) for v in vals], [max(v, 1e-30) for v in kl], ".", ms=4)
        ax.set_xlabel(f"{m} (log)")
        ax.set_ylabel("direct: output KL, nats per token (log)")
        ax.set_title(f"{m}: Spearman {rho:.3f} (per group and format)", fontsize=9)
    return _png(fig)


def correlations(result: SearchResult) -> dict[str, float]:
    """Spearman's rank correlation of each cheap measure with the direct one (KL), over groups and formats."""
    if "kl" not in result.measures:
        return {}
    kl = [v for row in result.measures["kl"] for v in row]
    return {m: spearman([v for row in vals for v in row], kl) for m, vals in result.measures.items() if m != "kl"}


def _text(artifact: Path, rows, size, result: SearchResult | None) -> tuple[str, str]:
    """The Markdown report and the HTML body (tables), holding the same numbers."""
    sections: list[tuple[str, list[str], list[list[str]]]] = []
    summary = [["artifact", str(artifact)], ["size", size.describe()]]
    if result is not None:
        c = result.calibration
        summary += [["budget", str(result.budget)], ["chosen", f"{result.bits_per_weight:.3f} bits/weight"],
                    ["method", str(result.method)], ["sensitivity", result.measure],
                    ["predicted error", f"{result.predicted:.6g}"],
                    ["calibration", f"{c.get('batches')} batches for statistics, {c.get('gradient_samples')} samples "
                                    f"for gradients, {c.get('heldout')} held out for KL; "
                     + ", ".join(f"{k} {v}" for k, v in c.items()
                                 if k not in ("batches", "gradient_samples", "heldout"))],
                    ["search time", ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())]]
        if result.latency:
            summary.append(["time per call (chosen)", f"{result.seconds_per_call * 1e3:.3f} ms on "
                            f"{result.latency_tokens} input row(s), {c.get('threads')} thread(s)"])
        for m, rho in correlations(result).items():
            summary.append([f"Spearman({m}, kl)", f"{rho:.3f}"])
    sections.append(("Summary", ["", ""], summary))
    if result is not None:
        uniform = []
        total = sum(result.weights)
        for k, s in enumerate(result.specs):
            cst, b = totals([k] * len(result.groups), result.cost, result.bits)
            uniform.append([f"uniform {s}", f"{b / total:.3f}", f"{cst:.6g}"])
        uniform.append(["chosen", f"{result.bits_per_weight:.3f}", f"{result.predicted:.6g}"])
        sections.append(("Allocations (predicted)", ["allocation", "bits/weight", f"sum of {result.measure}"],
                         uniform))
    sens = {}
    if result is not None and result.layer_costs:
        chosen = result.layer_specs()
        sens = {n: result.layer_costs[n][result.specs.index(chosen[n])] for n in chosen}
    table = [[r.name, r.format, f"{r.bits_per_weight:.3f}", "" if r.sqnr_db is None else f"{r.sqnr_db:.2f}",
              f"{sens[r.name]:.4g}" if r.name in sens else ""] for r in rows]
    sections.append(("Layers", ["layer", "format", "bits/weight", "SQNR dB", "sensitivity (chosen)"], table))
    md, body = [f"# lowbit report: {artifact.name}\n"], []
    for title, head, body_rows in sections:
        md.append(f"\n## {title}\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        md.extend("| " + " | ".join(cell.replace("|", "/") for cell in r) + " |\n" for r in body_rows)
        body.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
                    + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                                        for r in body_rows) + "</table>")
    return "".join(md), "".join(body)
