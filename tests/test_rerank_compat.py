"""FlagReranker drop-in: against FlagEmbedding's own FlagReranker (in a venv of its own, see test_compat.py),
on trained weights (BERT cross-encoder) and on a random XLM-R one (bge-reranker's architecture family)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from runtime.compat import FlagReranker

from .test_compat import _flag_env

PAIRS = [
    ["what is panda?", "hi"],
    ["what is panda?", "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
                       "is a bear species endemic to China."],
    ["我喜欢你", "i like you"],
    ["A man is playing a guitar.", "A man plays the guitar. " * 80],  # past 512 tokens: the passage is cut
    ["a long query " * 200, "short passage"],  # past the 384-token query cap
    ["", "empty query"],
]


def _flag_scores(checkpoint: Path, tmp_path: Path) -> dict:
    python = _flag_env(Path(os.environ.get("BGE_ONNX_FLAG_ENV", "/tmp/bge-onnx-flagembedding-env")))
    script = textwrap.dedent(
        f"""
        import json, sys
        from FlagEmbedding import FlagReranker
        pairs = json.load(open(sys.argv[1]))
        r = FlagReranker({str(checkpoint)!r}, devices="cpu", use_fp16=False)
        out = {{
            "raw": r.compute_score(pairs),
            "norm": r.compute_score(pairs, normalize=True),
            "short": r.compute_score(pairs, max_length=32, query_max_length=8),
            "one": r.compute_score(pairs[1]),
            "instructed": FlagReranker({str(checkpoint)!r}, devices="cpu", query_instruction_for_rerank="Q: ",
                                       passage_instruction_for_rerank="P: ").compute_score(pairs[:3]),
        }}
        json.dump(out, open(sys.argv[2], "w"))
        """
    )
    (tmp_path / "pairs.json").write_text(json.dumps(PAIRS))
    (tmp_path / "ref.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([str(python), str(tmp_path / "ref.py"), str(tmp_path / "pairs.json"), str(tmp_path / "o.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "o.json").read_text())


@pytest.mark.parametrize("which", ["trained-bert", "random-xlmr"])
def test_flagreranker_matches_flagembedding(which, trained_cross_encoder, trained_reranker,
                                            xlmr_reranker_checkpoint, xlmr_reranker, tmp_path):
    checkpoint, artifact = ((trained_cross_encoder, trained_reranker) if which == "trained-bert"
                            else (xlmr_reranker_checkpoint, xlmr_reranker))
    ref = _flag_scores(checkpoint, tmp_path)
    ours = FlagReranker(artifact, devices="cpu")
    assert ours.model.precision == "fp32"  # as FlagEmbedding on CPU
    got = {
        "raw": ours.compute_score(PAIRS),
        "norm": ours.compute_score(PAIRS, normalize=True),
        "short": ours.compute_score(PAIRS, max_length=32, query_max_length=8),
        "one": ours.compute_score(PAIRS[1]),
        "instructed": FlagReranker(artifact, devices="cpu", query_instruction_for_rerank="Q: ",
                                   passage_instruction_for_rerank="P: ").compute_score(PAIRS[:3]),
    }
    for key, want in ref.items():
        assert isinstance(got[key], list) and all(isinstance(x, float) for x in got[key]), key
        # FlagEmbedding runs transformers 4.57 (up to 2e-4 apart from 5.x per hidden component, see test_compat)
        np.testing.assert_allclose(got[key], want, atol=2e-3, err_msg=key)


# -- LangChain and LlamaIndex ----------------------------------------------------------------------------------
DOCS = ["A woman is slicing an onion.", "A man plays the guitar on stage.", "The cat sleeps on the sofa.",
        "Someone is playing an instrument.", "A man is playing a guitar."]
QUERY = "A man is playing a guitar."


def test_langchain_cross_encoder_reranker_keeps_the_best_documents(trained_reranker):
    from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
    from langchain_core.documents import Document

    from runtime import Reranker
    from runtime.compat.langchain import BGEOnnxCrossEncoder

    want = [i for i, _ in Reranker(trained_reranker).rerank(QUERY, DOCS, top_n=3)]
    compressor = CrossEncoderReranker(model=BGEOnnxCrossEncoder(trained_reranker), top_n=3)
    kept = compressor.compress_documents([Document(page_content=d, metadata={"i": i}) for i, d in enumerate(DOCS)],
                                         QUERY)
    assert [d.metadata["i"] for d in kept] == want
    scores = BGEOnnxCrossEncoder(trained_reranker, normalize=True).score([(QUERY, d) for d in DOCS])
    assert isinstance(scores, list) and all(isinstance(s, float) and 0 < s < 1 for s in scores)


def test_llamaindex_rerank_postprocessor(trained_reranker):
    from llama_index.core.schema import NodeWithScore, TextNode

    from runtime import Reranker
    from runtime.compat.llamaindex import BGEOnnxRerank

    ranked = Reranker(trained_reranker).rerank(QUERY, DOCS, top_n=2)
    nodes = [NodeWithScore(node=TextNode(text=d, id_=str(i)), score=0.5) for i, d in enumerate(DOCS)]
    post = BGEOnnxRerank(trained_reranker, top_n=2, keep_retrieval_score=True)
    out = post.postprocess_nodes(nodes, query_str=QUERY)
    assert [int(n.node.node_id) for n in out] == [i for i, _ in ranked]
    np.testing.assert_allclose([n.score for n in out], [s for _, s in ranked], atol=1e-6)
    assert out[0].node.metadata["retrieval_score"] == 0.5
    with pytest.raises(ValueError, match="needs the query"):
        post.postprocess_nodes(nodes)
