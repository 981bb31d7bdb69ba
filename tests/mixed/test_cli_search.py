"""``lowbit search`` -> ``lowbit quantize --recipe`` -> ``lowbit report`` on the tiny bundled Llama."""

from __future__ import annotations

import json

import pytest

from lowbit.cli import main
from lowbit.mixed import report as R
from lowbit.mixed.search import SearchResult

FORMATS = "int2-g32-asym,int4-g32-asym,int8"


def run(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """The recipe, its record and the quantized artifact of one search."""
    import contextlib
    import io

    d = tmp_path_factory.mktemp("search")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["search", "tiny-llama", "--budget", "5bpw", "--formats", FORMATS, "--also", "proxy", "kl",
                   "--calib-samples", "10", "--calib-len", "32", "--out", str(d / "mixed.yaml")])
        assert rc == 0
        rc = main(["quantize", "tiny-llama", "--recipe", str(d / "mixed.yaml"), "--calib-samples", "4",
                   "--calib-len", "32", "--out", str(d / "art")])
        assert rc == 0
    return d, buf.getvalue()


def test_search_writes_a_recipe_and_its_record(searched):
    d, printed = searched
    assert "bits/weight within 5 bits/weight" in printed and "next: lowbit quantize" in printed
    record = SearchResult.from_dict(json.loads((d / "mixed.search.json").read_text()))
    assert record.bits_per_weight <= 5.0 and set(record.measures) == {"fisher", "proxy", "kl"}
    text = (d / "mixed.yaml").read_text()
    assert text.startswith("# lowbit search:") and "model.layers.0.self_attn.q_proj" in text


def test_report_renders_tables_and_figures_with_named_axes(searched, capsys, monkeypatch):
    d, _ = searched
    figures = {}
    real_png = R._png

    def keep(fig):  # the figures' axes, read before they are closed
        figures[len(figures)] = [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]
        return real_png(fig)

    monkeypatch.setattr(R, "_png", keep)
    rc, out, err = run(capsys, "report", d / "art", "--search", d / "mixed.search.json", "--out", d / "rep")
    assert rc == 0, err
    names = sorted(p.name for p in (d / "rep").iterdir())
    assert names == ["bits.png", "front.png", "measures.png", "report.html", "report.md", "sensitivity.png",
                     "sqnr.png"]
    for labels in figures.values():
        for x, y in labels:
            assert x and y  # every axis is named
    assert any("bits per weight" in x for labels in figures.values() for x, _ in labels)
    assert any("(dB)" in y for labels in figures.values() for _, y in labels)
    md = (d / "rep" / "report.md").read_text()
    html = (d / "rep" / "report.html").read_text()
    for text in (md, html):
        assert "Spearman(fisher, kl)" in text and "uniform int4-g32-asym" in text
        assert "model.layers.1.mlp.down_proj" in text
    assert html.count("data:image/png;base64,") == 5
    # a report folder is replaced only with --overwrite, and a folder with other files never
    rc, _, err = run(capsys, "report", d / "art", "--out", d / "rep")
    assert rc == 2 and "--overwrite" in err
    (d / "other").mkdir()
    (d / "other" / "notes.txt").write_text("mine")
    rc, _, err = run(capsys, "report", d / "art", "--out", d / "other")
    assert rc == 2 and "notes.txt" in err
    rc, _, err = run(capsys, "report", d / "art", "--search", d / "missing.json", "--out", d / "rep2")
    assert rc == 2 and "no such file" in err


def test_search_cli_errors(capsys, tmp_path):
    rc, _, err = run(capsys, "search", "tiny-llama", "--budget", "fast", "--formats", FORMATS, "--out",
                     tmp_path / "r.yaml")
    assert rc == 2 and "not a size" in err
    rc, _, err = run(capsys, "search", "tiny-llama", "--budget", "4bpw", "--formats", "int4-g32-asym", "--out",
                     tmp_path / "r.yaml")
    assert rc == 2 and "two distinct" in err
    (tmp_path / "r.yaml").write_text("mine")
    rc, _, err = run(capsys, "search", "tiny-llama", "--budget", "4bpw", "--formats", FORMATS, "--out",
                     tmp_path / "r.yaml")
    assert rc == 2 and "exists" in err
    assert not (tmp_path / "r.search.json").exists()
