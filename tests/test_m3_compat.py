"""BGEM3FlagModel drop-in against FlagEmbedding's own BGEM3FlagModel (in a venv of its own, see test_compat.py),
on a tiny random bge-m3 (XLM-R with random colbert_linear.pt and sparse_linear.pt heads)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np

from runtime.compat import BGEM3FlagModel

from .test_compat import _flag_env

TEXTS = ["What is BGE M3?", "Defination of BM25", "BGE M3 is an embedding model supporting dense retrieval, "
         "lexical matching and multi-vector interaction.", "我喜欢你", "", "a long passage " * 300]
PAIRS = [[TEXTS[0], TEXTS[2]], [TEXTS[1], TEXTS[5]], [TEXTS[3], "我也喜欢你"]]


def _flag_outputs(checkpoint: Path, tmp_path: Path) -> dict:
    python = _flag_env(Path(os.environ.get("BGE_ONNX_FLAG_ENV", "/tmp/bge-onnx-flagembedding-env")))
    script = textwrap.dedent(
        f"""
        import json, sys
        from FlagEmbedding import BGEM3FlagModel
        texts, pairs = json.load(open(sys.argv[1]))
        m = BGEM3FlagModel({str(checkpoint)!r}, devices="cpu", use_fp16=False)
        o = m.encode(texts, return_dense=True, return_sparse=True, return_colbert_vecs=True)
        short = m.encode(texts, max_length=12, return_sparse=True, return_colbert_vecs=True)
        lw = o["lexical_weights"]
        out = {{
            "dense": o["dense_vecs"].tolist(),
            "sparse": [{{k: float(v) for k, v in d.items()}} for d in lw],
            "colbert": [c.tolist() for c in o["colbert_vecs"]],
            "short_sparse": [{{k: float(v) for k, v in d.items()}} for d in short["lexical_weights"]],
            "short_colbert": [c.tolist() for c in short["colbert_vecs"]],
            "lexical": float(m.compute_lexical_matching_score(lw[0], lw[2])),
            "colbert_score": float(m.colbert_score(o["colbert_vecs"][0], o["colbert_vecs"][2])),
            "tokens": {{k: float(v) for k, v in m.convert_id_to_token(lw[2]).items()}},
            "scores": m.compute_score(pairs, weights_for_different_modes=[0.4, 0.2, 0.4]),
            "one": m.encode(texts[0])["dense_vecs"].tolist(),
        }}
        json.dump(out, open(sys.argv[2], "w"))
        """
    )
    (tmp_path / "in.json").write_text(json.dumps([TEXTS, PAIRS]))
    (tmp_path / "ref.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([str(python), str(tmp_path / "ref.py"), str(tmp_path / "in.json"), str(tmp_path / "o.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "o.json").read_text())


def _same_sparse(got: list[dict], want: list[dict], atol: float) -> None:
    for g, w in zip(got, want):
        keep = {k for k, v in w.items() if v > atol}  # a weight at the relu's edge may fall either side
        assert keep <= set(g) <= set(w) | {k for k, v in g.items() if v <= atol}, (g, w)
        for k in set(g) | set(w):
            assert abs(float(g.get(k, 0.0)) - w.get(k, 0.0)) <= atol, k


def test_bgem3flagmodel_matches_flagembedding(m3_checkpoint, m3_artifact, tmp_path):
    ref = _flag_outputs(m3_checkpoint, tmp_path)
    m = BGEM3FlagModel(m3_artifact, devices="cpu")
    assert m.model.precision == "fp32"  # as FlagEmbedding on CPU
    o = m.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    # FlagEmbedding runs transformers 4.57 (up to 2e-4 apart from 5.x per hidden component, see test_compat)
    np.testing.assert_allclose(o["dense_vecs"], ref["dense"], atol=2e-3)
    assert all(isinstance(k, str) and isinstance(v, np.float32) for d in o["lexical_weights"] for k, v in d.items())
    _same_sparse(o["lexical_weights"], ref["sparse"], atol=2e-3)
    for g, w in zip(o["colbert_vecs"], ref["colbert"]):
        np.testing.assert_allclose(g, np.array(w, dtype=np.float32), atol=2e-3)
    short = m.encode(TEXTS, max_length=12, return_sparse=True, return_colbert_vecs=True)
    _same_sparse(short["lexical_weights"], ref["short_sparse"], atol=2e-3)
    assert [len(c) for c in short["colbert_vecs"]] == [len(c) for c in ref["short_colbert"]]
    lw = o["lexical_weights"]
    assert abs(m.compute_lexical_matching_score(lw[0], lw[2]) - ref["lexical"]) < 2e-3 * max(1.0, ref["lexical"])
    assert abs(m.colbert_score(o["colbert_vecs"][0], o["colbert_vecs"][2]) - ref["colbert_score"]) < 2e-3
    tokens = m.convert_id_to_token(lw[2])
    assert set(tokens) == set(ref["tokens"])
    scores = m.compute_score(PAIRS, weights_for_different_modes=[0.4, 0.2, 0.4])
    for key, want in ref["scores"].items():
        np.testing.assert_allclose(scores[key], want, atol=3e-3, err_msg=key)
    np.testing.assert_allclose(m.encode(TEXTS[0])["dense_vecs"], ref["one"], atol=2e-3)
