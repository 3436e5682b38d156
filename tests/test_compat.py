"""Drop-ins: FlagEmbedding's FlagModel (against its documented behaviour, and against FlagEmbedding itself in
an environment of its own), and the LangChain / LlamaIndex embeddings inside each framework's real vector
store."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest

from benchmarks import datasets
from runtime import Embedder
from runtime.compat import FlagModel

INSTRUCTION = "Represent this sentence for searching relevant passages: "
# FlagEmbedding 1.4.2 imports only with transformers 4.x (its package __init__ loads a module that imports
# transformers.modeling_attn_mask_utils, removed in transformers 5), while the export stage needs 5.x: it is
# installed into a venv of its own that sees this environment's torch and numpy through a .pth file.
FLAG_PINS = ["FlagEmbedding==1.4.2", "transformers==4.57.6", "sentence-transformers==5.7.0"]


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    pairs = datasets.sts_b_en()
    return pairs.first[:12] + pairs.second[:12]


@pytest.fixture(scope="module")
def minilm(minilm_artifact) -> Embedder:
    return Embedder(minilm_artifact, device="cpu", precision="fp32")


# -- FlagModel: the documented behaviour ------------------------------------------------------------------
@pytest.fixture(scope="module")
def flag(tiny_artifact) -> FlagModel:
    return FlagModel(tiny_artifact, query_instruction_for_retrieval=INSTRUCTION, devices="cpu")


def test_flagmodel_defaults_are_flagembeddings(flag):
    assert (flag.batch_size, flag.query_max_length, flag.passage_max_length) == (256, 512, 512)
    assert flag.normalize_embeddings and flag.use_fp16 and flag.convert_to_numpy
    assert flag.query_instruction_format == "{}{}" and flag.pooling_method == "cls"
    assert flag.model.precision == "fp32"  # FlagEmbedding runs FP32 on CPU whatever use_fp16 says


def test_flagmodel_queries_get_the_instruction_and_the_corpus_none(flag, tiny_artifact):
    emb = Embedder(tiny_artifact, device="cpu", precision="fp32")
    qs, ps = ["手机开不了机怎么办？", "how to reset a phone"], ["样例段落-1", "passage two"]
    q, p = flag.encode_queries(qs), flag.encode_corpus(ps)
    assert q.dtype == np.float32 and q.shape == (2, emb.dim) and isinstance(q, np.ndarray)
    np.testing.assert_allclose(q, emb.embed([INSTRUCTION + x for x in qs]), atol=1e-6)
    np.testing.assert_allclose(p, emb.embed(ps), atol=1e-6)
    np.testing.assert_allclose(flag.encode(ps), p, atol=1e-6)
    np.testing.assert_allclose(flag.encode(ps, instruction="x: "), emb.embed(["x: " + t for t in ps]), atol=1e-6)
    one = flag.encode_queries(qs[0])
    assert one.shape == (emb.dim,)  # a single str gives a 1-D vector
    np.testing.assert_allclose(one, q[0], atol=1e-6)
    no_instruction = FlagModel(tiny_artifact, devices="cpu")  # FlagModel's default: no instruction at all
    np.testing.assert_allclose(no_instruction.encode_queries(qs), emb.embed(qs), atol=1e-6)


def test_flagmodel_passage_instruction_and_format(tiny_artifact):
    emb = Embedder(tiny_artifact, device="cpu", precision="fp32")
    model = FlagModel(tiny_artifact, devices="cpu", query_instruction_for_retrieval="Q",
                      query_instruction_format="<{}>{}", passage_instruction_for_retrieval="P: ")
    np.testing.assert_allclose(model.encode_queries(["a"]), emb.embed(["<Q>a"]), atol=1e-6)
    np.testing.assert_allclose(model.encode_corpus(["a"]), emb.embed(["P: a"]), atol=1e-6)


def test_flagmodel_max_length_cuts_like_the_tokenizer(flag, tiny_artifact):
    emb = Embedder(tiny_artifact, device="cpu", precision="fp32")
    text = "字" * 40
    ids = emb.tokenize([text]).ids[0]
    cut = np.array([ids[:15] + ids[-1:]], dtype=np.int64)  # [CLS] + 14 chars + [SEP]
    got = flag.encode_corpus([text], max_length=16)
    np.testing.assert_allclose(got, emb.embed_tokens(cut, np.ones_like(cut)), atol=1e-6)
    long = "字" * 700  # past the artifact's 512: cut there, silently (as FlagEmbedding does)
    np.testing.assert_allclose(flag.encode([long]), emb.embed(["字" * 510]), atol=1e-6)


def test_flagmodel_tensor_output_and_refusals(flag, tiny_artifact):
    import torch

    t = flag.encode(["a", "b"], convert_to_numpy=False)
    assert isinstance(t, torch.Tensor) and t.shape == (2, flag.model.dim)
    with pytest.raises(ValueError, match="--no-normalize"):
        FlagModel(tiny_artifact, normalize_embeddings=False)
    with pytest.raises(ValueError, match="--pooling mean"):
        FlagModel(tiny_artifact, pooling_method="mean")
    with pytest.raises(ValueError, match="'cpu' or 'cuda"):
        FlagModel(tiny_artifact, devices="npu:0")


# -- FlagModel against FlagEmbedding itself ----------------------------------------------------------------
def _flag_env(root: Path) -> Path:
    """A venv with FLAG_PINS that sees this interpreter's packages (torch, numpy) after its own.

    The env outlives a checkout (it sits in /tmp), so it is keyed on the parent it was built against: pip skips
    what the parent already has, and an env pointing at a parent that moved or was rebuilt lacks numpy or tqdm.
    """
    python = root / "bin" / "python"
    parent = sysconfig.get_paths()["purelib"]
    key = hashlib.sha256(parent.encode()).hexdigest()[:12]
    marker = root / ("ready-" + "-".join(FLAG_PINS).replace("==", "_") + "-" + key)
    if marker.exists():
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=120)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "zz_bge_onnx_parent.pth").write_text(parent + "\n")
    for old in root.glob("ready-*"):
        old.unlink()
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", *FLAG_PINS], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"installing {FLAG_PINS} failed (needs PyPI):\n{out.stderr[-3000:]}"
    check = subprocess.run([str(python), "-c", "import numpy, torch, tqdm, FlagEmbedding"], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, f"the FlagEmbedding env at {root} cannot import its stack:\n{check.stderr[-3000:]}"
    marker.touch()
    return python


def test_flagmodel_matches_flagembedding(minilm_path, minilm_artifact, sentences, tmp_path):
    env = Path(os.environ.get("BGE_ONNX_FLAG_ENV", "/tmp/bge-onnx-flagembedding-env"))
    python = _flag_env(env)
    script = textwrap.dedent(
        f"""
        import json, sys
        import numpy as np
        from FlagEmbedding import FlagModel
        texts = json.load(open(sys.argv[1]))
        m = FlagModel({str(minilm_path)!r}, pooling_method="mean", devices="cpu",
                      query_instruction_for_retrieval={INSTRUCTION!r})
        np.save(sys.argv[2] + "/q.npy", m.encode_queries(texts))
        np.save(sys.argv[2] + "/p.npy", m.encode_corpus(texts))
        np.save(sys.argv[2] + "/one.npy", m.encode_queries(texts[0]))
        np.save(sys.argv[2] + "/short.npy", m.encode(texts, max_length=12))
        """
    )
    (tmp_path / "texts.json").write_text(json.dumps(sentences))
    (tmp_path / "ref.py").write_text(script)
    env_vars = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([str(python), str(tmp_path / "ref.py"), str(tmp_path / "texts.json"), str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env_vars)
    assert out.returncode == 0, out.stderr[-3000:]
    ours = FlagModel(minilm_artifact, pooling_method="mean", devices="cpu", query_instruction_for_retrieval=INSTRUCTION)
    for name, got in [("q", ours.encode_queries(sentences)), ("p", ours.encode_corpus(sentences)),
                      ("one", ours.encode_queries(sentences[0])), ("short", ours.encode(sentences, max_length=12))]:
        ref = np.load(tmp_path / f"{name}.npy")
        assert got.shape == ref.shape and got.dtype == ref.dtype == np.float32, name
        # FlagEmbedding runs transformers 4.57, whose BERT differs from 5.x (our export reference, and
        # sentence-transformers here, both within 2e-7 of us) by up to 2e-4 per component (measured):
        # gate on the export's own FP32 cosine gate instead of bitwise agreement
        cosine = (got.reshape(-1, got.shape[-1]) * ref.reshape(-1, ref.shape[-1])).sum(-1)
        assert cosine.min() >= 0.99999, (name, float(cosine.min()))
        np.testing.assert_allclose(got, ref, atol=1e-3, err_msg=name)


# -- LangChain ----------------------------------------------------------------------------------------------
def test_langchain_in_memory_store_finds_each_documents_own_text(minilm, sentences):
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore

    from runtime.compat.langchain import BGEOnnxEmbeddings

    embeddings = BGEOnnxEmbeddings(minilm)
    assert isinstance(embeddings, Embeddings)
    store = InMemoryVectorStore.from_texts(sentences, embeddings)
    for text in sentences:
        assert store.similarity_search(text, k=1)[0].page_content == text
    docs = embeddings.embed_documents(sentences[:3])
    assert isinstance(docs, list) and isinstance(docs[0], list) and isinstance(docs[0][0], float)
    np.testing.assert_allclose(docs, minilm.embed(sentences[:3]), atol=1e-6)
    np.testing.assert_allclose(embeddings.embed_query(sentences[0]), minilm.embed_queries(sentences[:1])[0], atol=1e-6)
    assert asyncio.run(embeddings.aembed_documents(sentences[:3])) == docs
    assert asyncio.run(embeddings.aembed_query(sentences[0])) == embeddings.embed_query(sentences[0])


def test_langchain_long_documents_can_be_chunked(minilm):
    from runtime.compat.langchain import BGEOnnxEmbeddings

    long = " ".join(datasets.sts_b_en().first[:60])
    chunked = BGEOnnxEmbeddings(minilm, long_text="chunk", overlap=32).embed_documents([long])
    np.testing.assert_allclose(chunked, minilm.embed([long], long_text="chunk", overlap=32), atol=1e-6)


# -- LlamaIndex ---------------------------------------------------------------------------------------------
def test_llamaindex_vector_store_index_finds_each_nodes_own_text(minilm, sentences):
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.schema import TextNode

    from runtime.compat.llamaindex import BGEOnnxEmbedding

    model = BGEOnnxEmbedding(minilm)
    assert isinstance(model, BaseEmbedding)
    index = VectorStoreIndex(nodes=[TextNode(text=t) for t in sentences], embed_model=model)  # no LLM needed
    retriever = index.as_retriever(similarity_top_k=1)
    for text in sentences:
        assert retriever.retrieve(text)[0].node.get_content() == text
    np.testing.assert_allclose(model.get_text_embedding_batch(sentences[:3]), minilm.embed(sentences[:3]), atol=1e-6)
    query = model.get_query_embedding(sentences[0])
    np.testing.assert_allclose(query, minilm.embed_queries(sentences[:1])[0], atol=1e-6)
    assert asyncio.run(model.aget_query_embedding(sentences[0])) == model.get_query_embedding(sentences[0])
    assert asyncio.run(model.aget_text_embedding_batch(sentences[:3])) == model.get_text_embedding_batch(sentences[:3])


# -- no framework on `import runtime` ------------------------------------------------------------------------
def test_runtime_and_compat_import_no_framework():
    code = textwrap.dedent(
        """
        import sys
        import runtime, runtime.compat
        from runtime.compat import FlagModel
        heavy = sorted(m for m in ("torch", "transformers", "langchain_core", "llama_index", "tqdm",
                                   "FlagEmbedding") if m in sys.modules)
        assert not heavy, heavy
        print("clean")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout
