"""The labelled-pairs quality gate of the export (``--validate-with``)."""

from __future__ import annotations

import numpy as np
import pytest

from export.errors import ExportError
from export.labelled import load_pairs, spearman


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a = rng.integers(0, 10, 500).astype(float)  # many ties
    b = a + rng.normal(0, 3, 500)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_load_pairs_reads_both_layouts(tmp_path):
    from benchmarks.datasets import DATA

    en = load_pairs(DATA / "sts-b-en.test.tsv")
    zh = load_pairs(DATA / "sts-b-zh.test.tsv")
    assert len(en.first) == 1379 and en.first[0] == "A girl is styling her hair." and en.score[0] == 2.5
    assert len(zh.first) == 1361 and zh.score.max() <= 5
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\tnot-a-number\n" * 20)
    with pytest.raises(ExportError, match="sentence1, sentence2, score"):
        load_pairs(bad)


def test_variant_below_its_quality_gate_is_refused(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from benchmarks.datasets import DATA
    from export import pipeline
    from export.cli import main
    from runtime import Manifest

    monkeypatch.setitem(pipeline.QUALITY_GATES, "int8", 2.0)  # a ratio above 1 is impossible
    out = tmp_path / "art"
    rc = main(["--model", str(tiny_checkpoint), "--out", str(out), "--precision", "fp32,int8",
               "--validate-with", str(DATA / "sts-b-zh.test.tsv")])
    assert rc == 1
    assert "FAIL" in capsys.readouterr().out
    m = Manifest.load(out)
    assert set(m.variants) == {"fp32"}
    assert m.variants["fp32"].parity.quality["pairs"] == 1361
