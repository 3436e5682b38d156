"""The server hosting an embedder and rerankers side by side, driven over HTTP: TEI's /rerank, Cohere's and
Jina's /v1/rerank and /v2/rerank (with the real ``cohere`` client), pairs batched across requests with the
same scores as ``Reranker.score``, and clear errors for a model asked to do what it is not."""

from __future__ import annotations

import asyncio
import warnings

import httpx
import numpy as np
import pytest

from runtime import Embedder, Reranker

from .helpers import chinese_text
from .serve_process import start_server

QUERY = "A man is playing a guitar."
DOCS = ["A woman is slicing an onion.", "A man plays the guitar on stage.", "Someone is playing an instrument.",
        "The cat sleeps.", "A man is playing a guitar."]


@pytest.fixture(scope="module")
def server(tiny_artifact, trained_reranker, bert_reranker, tmp_path_factory):
    srv = start_server(["--model", f"tiny={tiny_artifact}", "--model", f"minilm-rerank={trained_reranker}",
                        "--model", f"bert-rerank={bert_reranker}"], tmp_path_factory.mktemp("serve"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def minilm_rr(trained_reranker):
    return Reranker(trained_reranker)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_tei_rerank_gives_the_runtimes_scores_sorted(server, minilm_rr):
    logits = minilm_rr.score([(QUERY, d) for d in DOCS])
    r = httpx.post(server.url + "/rerank", json={"query": QUERY, "texts": DOCS}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["index"] for x in body] == list(np.argsort(-logits, kind="stable"))
    np.testing.assert_allclose([x["score"] for x in body], np.sort(_sigmoid(logits))[::-1], atol=1e-6)
    assert "text" not in body[0]
    raw = httpx.post(server.url + "/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True,
                                                   "return_text": True, "model": "minilm-rerank"}, timeout=30).json()
    np.testing.assert_allclose([x["score"] for x in raw], np.sort(logits)[::-1], atol=1e-5)
    assert raw[0]["text"] == DOCS[raw[0]["index"]]


def test_tei_rerank_refuses_long_pairs_unless_truncate(server, minilm_rr):
    long = "The guitar is a fretted musical instrument. " * 120
    r = httpx.post(server.url + "/rerank", json={"query": QUERY, "texts": ["short", long]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_long"
    assert "texts[1]" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/rerank", json={"query": QUERY, "texts": ["short", long], "truncate": True,
                                                 "raw_scores": True}, timeout=30)
    assert r.status_code == 200 and r.headers["x-truncated-pairs"] == "1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = minilm_rr.score([(QUERY, "short"), (QUERY, long)])
    got = {x["index"]: x["score"] for x in r.json()}
    np.testing.assert_allclose([got[0], got[1]], want, atol=1e-5)


def test_cohere_and_jina_shape(server, minilm_rr):
    logits = minilm_rr.score([(QUERY, d) for d in DOCS])
    body = {"model": "minilm-rerank", "query": QUERY, "documents": [{"text": d} for d in DOCS[:2]] + DOCS[2:],
            "top_n": 3, "return_documents": True}
    r = httpx.post(server.url + "/v1/rerank", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "minilm-rerank" and out["usage"]["total_tokens"] > 0
    order = list(np.argsort(-logits, kind="stable"))[:3]
    assert [x["index"] for x in out["results"]] == order
    np.testing.assert_allclose([x["relevance_score"] for x in out["results"]], _sigmoid(logits[order]), atol=1e-6)
    assert out["results"][0]["document"] == {"text": DOCS[order[0]]}


def test_the_cohere_client_reranks_against_us(server, minilm_rr):
    import cohere

    logits = minilm_rr.score([(QUERY, d) for d in DOCS])
    order = list(np.argsort(-logits, kind="stable"))
    v2 = cohere.ClientV2(api_key="unused", base_url=server.url)
    res = v2.rerank(model="minilm-rerank", query=QUERY, documents=DOCS, top_n=2)
    assert [x.index for x in res.results] == order[:2]
    np.testing.assert_allclose([x.relevance_score for x in res.results], _sigmoid(logits[order[:2]]), atol=1e-6)
    v1 = cohere.Client(api_key="unused", base_url=server.url)
    res1 = v1.rerank(model="minilm-rerank", query=QUERY, documents=DOCS, return_documents=True)
    assert [x.index for x in res1.results] == order
    assert res1.results[0].document.text == DOCS[order[0]]


def test_pairs_batch_across_requests_with_the_libraries_scores(server, bert_reranker):
    """Concurrent requests to a BERT cross-encoder (segment ids fed by the server) share batches; each pair's
    score is the one ``Reranker.score`` gives it alone."""
    rr = Reranker(bert_reranker, precision="int8")
    rng = np.random.default_rng(9)
    requests = [(chinese_text(int(rng.integers(2, 12)), rng),
                 [chinese_text(int(rng.integers(1, 120)), rng) for _ in range(int(rng.integers(1, 6)))])
                for _ in range(24)]
    before = server.metric("bge_embedded_texts_total", model="bert-rerank")

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            rs = await asyncio.gather(*[c.post("/rerank", json={"model": "bert-rerank", "query": q, "texts": t,
                                                                 "raw_scores": True}) for q, t in requests])
        return [r.json() for r in rs]

    answers = asyncio.run(go())
    for (q, texts), ans in zip(requests, answers):
        want = rr.score([(q, t) for t in texts])
        got = np.empty(len(texts))
        for x in ans:
            got[x["index"]] = x["score"]
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert server.metric("bge_embedded_texts_total", model="bert-rerank") - before == sum(len(t) for _, t in requests)


def test_each_model_does_only_its_own_job(server, tiny_artifact):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "minilm-rerank", "input": ["a"]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"
    assert "rerank" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/rerank", json={"model": "tiny", "query": "q", "texts": ["a"]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_model_kind"
    # without a model each route takes the first model of its kind
    r = httpx.post(server.url + "/v1/embeddings", json={"input": ["今天天气很好"]}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], Embedder(tiny_artifact).embed(["今天天气很好"])[0],
                               atol=1e-6)
    kinds = {m["id"]: m["kind"] for m in httpx.get(server.url + "/v1/models", timeout=10).json()["data"]}
    assert kinds == {"tiny": "embedder", "minilm-rerank": "reranker", "bert-rerank": "reranker"}
    info = {m["name"]: m for m in httpx.get(server.url + "/info", timeout=10).json()["models"]}
    assert info["bert-rerank"]["kind"] == "reranker" and info["bert-rerank"]["dimension"] == 1


@pytest.mark.parametrize("body, code", [
    ({"texts": ["a"]}, "missing_field"),
    ({"query": "", "texts": ["a"]}, "empty_string"),
    ({"query": "q", "texts": []}, "empty_input"),
    ({"query": "q", "texts": ["a", 3]}, "invalid_type"),
    ({"query": "q", "texts": ["a"], "top_n": 0}, "invalid_value"),
    ({"query": "q", "texts": ["a"], "model": "nope"}, "model_not_found"),
])
def test_bad_rerank_bodies_get_400s_naming_the_field(server, body, code):
    r = httpx.post(server.url + "/rerank", json=body, timeout=30)
    assert r.status_code in (400, 404) and r.json()["error"]["code"] == code, r.text
