"""bge-m3 over HTTP: TEI's /embed_sparse, /embed_all (the ColBERT vectors) and /encode (all three outputs in one
pass, BGEM3FlagModel's keys), batched across requests with dense ones, the same numbers as ``Embedder.encode``."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from runtime import Embedder

from .serve_process import start_server

TEXTS = ["What is BGE M3?", "BM25 is a bag-of-words retrieval function", "我喜欢你", "a", "深度学习 " * 50]


@pytest.fixture(scope="module")
def server(m3_artifact, tiny_artifact, tmp_path_factory):
    srv = start_server(["--model", f"m3={m3_artifact}", "--model", f"tiny={tiny_artifact}"],
                       tmp_path_factory.mktemp("serve"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def local(m3_artifact):
    return Embedder(m3_artifact).encode(TEXTS, dense=True, sparse=True, colbert=True)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def test_embed_sparse_in_teis_shape(server, local):
    r = _post(server, "/embed_sparse", {"inputs": TEXTS, "model": "m3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body) == len(TEXTS)
    for got, want in zip(body, local.sparse):
        assert [e["index"] for e in got] == sorted(want)
        np.testing.assert_allclose([e["value"] for e in got], [want[t] for t in sorted(want)], atol=1e-5)
    one = _post(server, "/embed_sparse", {"inputs": TEXTS[0], "model": "m3"}).json()
    assert one == body[:1]


def test_embed_all_gives_the_colbert_vectors(server, local):
    body = _post(server, "/embed_all", {"inputs": TEXTS, "model": "m3"}).json()
    for got, want in zip(body, local.colbert):
        np.testing.assert_allclose(np.array(got, dtype=np.float32).reshape(want.shape), want, atol=1e-5)


def test_encode_gives_all_three_in_one_request(server, local):
    r = _post(server, "/encode", {"inputs": TEXTS, "model": "m3", "return_sparse": True, "return_colbert_vecs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["dense_vecs"], local.dense, atol=1e-5)
    assert [set(map(int, d)) for d in body["lexical_weights"]] == [set(d) for d in local.sparse]
    assert [len(m) for m in body["colbert_vecs"]] == [len(m) for m in local.colbert]
    dense = _post(server, "/encode", {"inputs": TEXTS, "model": "m3"}).json()
    assert dense["lexical_weights"] is None and dense["colbert_vecs"] is None
    np.testing.assert_allclose(dense["dense_vecs"], _post(server, "/embed", {"inputs": TEXTS, "model": "m3"}).json(),
                               atol=1e-6)


def test_sparse_and_dense_requests_batch_together_with_the_same_numbers(server, local):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            calls = []
            for i in range(24):
                text = TEXTS[i % len(TEXTS)]
                path = ("/embed_sparse", "/embed", "/embed_all")[i % 3]
                calls.append(c.post(path, json={"inputs": [text], "model": "m3"}))
            return await asyncio.gather(*calls)

    for i, r in enumerate(asyncio.run(go())):
        assert r.status_code == 200, r.text
        k = i % len(TEXTS)
        if i % 3 == 0:
            assert {e["index"]: e["value"] for e in r.json()[0]} == pytest.approx(local.sparse[k], abs=1e-5)
        elif i % 3 == 1:
            np.testing.assert_allclose(r.json()[0], local.dense[k], atol=1e-5)
        else:
            np.testing.assert_allclose(np.array(r.json()[0], np.float32).reshape(local.colbert[k].shape),
                                       local.colbert[k], atol=1e-5)


def test_errors_say_what_to_do(server):
    r = _post(server, "/embed_sparse", {"inputs": ["a"], "model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_sparse_output"
    assert "m3" in r.json()["error"]["message"]
    r = _post(server, "/embed_sparse", {"inputs": ["深度学习 " * 700], "model": "m3"})  # past 1024 tokens
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_long"
    assert _post(server, "/embed_sparse", {"inputs": ["深度学习 " * 700], "model": "m3", "truncate": True}).status_code == 200
    r = _post(server, "/encode", {"inputs": ["a"], "model": "m3", "return_dense": False})
    assert r.status_code == 400 and "at least one" in r.json()["error"]["message"]
    r = _post(server, "/embed_all", {"inputs": ["a"], "model": "m3", "long_text": "chunk"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "long_text"


def test_base64_gives_the_same_floats_in_a_third_of_the_bytes(server, local):
    """``encoding_format: base64`` on /embed_all and /encode: one string per text of its little-endian float32 rows."""
    import base64

    def rows(s: str, dim: int) -> np.ndarray:
        return np.frombuffer(base64.b64decode(s), dtype="<f4").reshape(-1, dim)

    floats = _post(server, "/embed_all", {"inputs": TEXTS, "model": "m3"})
    r = _post(server, "/embed_all", {"inputs": TEXTS, "model": "m3", "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    dim = local.colbert[0].shape[1]
    for got, want in zip(r.json(), local.colbert):
        np.testing.assert_allclose(rows(got, dim), want, atol=1e-5)
    assert len(r.content) < len(floats.content) / 2
    body = _post(server, "/encode", {"inputs": TEXTS, "model": "m3", "return_colbert_vecs": True,
                                     "encoding_format": "base64"}).json()
    assert body["encoding_format"] == "base64" and body["dimension"] == local.dense.shape[1]
    np.testing.assert_allclose(np.stack([rows(s, body["dimension"])[0] for s in body["dense_vecs"]]), local.dense,
                               atol=1e-5)
    for got, want in zip(body["colbert_vecs"], local.colbert):
        np.testing.assert_allclose(rows(got, body["colbert_dim"]), want, atol=1e-5)
    r = _post(server, "/embed_all", {"inputs": ["a"], "model": "m3", "encoding_format": "binary"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "encoding_format"
