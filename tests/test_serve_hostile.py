"""Hostile and careless inputs against the real server: huge texts, bodies that are not JSON, empty strings.
A huge text is cut before tokenising (and gets the vector of its first max_length tokens), refused at once
where it would have to be tokenised whole, and never holds up the requests of other clients."""

from __future__ import annotations

import threading
import warnings

import httpx
import numpy as np
import pytest

from runtime import Embedder

from .helpers import chinese_text
from .serve_process import start_server

MB = 1_000_000


@pytest.fixture(scope="module")
def server(tiny_artifact, tmp_path_factory):
    srv = start_server(["--model", f"tiny={tiny_artifact}", "--max-text-chars", "300000"],
                       tmp_path_factory.mktemp("hostile"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def emb(tiny_artifact):
    return Embedder(tiny_artifact)


@pytest.fixture(scope="module")
def huge():
    """5 million CJK characters (15 MB of UTF-8 would pass the 16 MiB body limit too; 5 M keeps it quick)."""
    return chinese_text(5 * MB, np.random.default_rng(7))


def _embed(emb: Embedder, texts: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return emb.embed(texts)


def test_huge_text_gets_the_vector_of_its_first_tokens(server, emb, huge):
    r = httpx.post(server.url + "/v1/embeddings", json={"input": [huge, "短句"], "encoding_format": "float"},
                   timeout=60)
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
    np.testing.assert_allclose(got, _embed(emb, [huge[:600], "短句"]), atol=1e-6)  # 1 token a character
    np.testing.assert_allclose(got, _embed(emb, [huge, "短句"]), atol=1e-6)
    assert r.json()["usage"]["prompt_tokens"] == 512 + 4
    # TEI's route with truncate: the same
    r = httpx.post(server.url + "/embed", json={"inputs": huge, "truncate": True}, timeout=60)
    np.testing.assert_allclose(np.array(r.json(), np.float32), got[:1], atol=1e-6)


def test_huge_text_that_must_be_tokenised_whole_is_refused_at_once(server, huge):
    for body in ({"input": huge[:400_000], "truncate": False}, {"input": huge[:400_000], "long_text": "chunk"}):
        r = httpx.post(server.url + "/v1/embeddings", json=body, timeout=60)
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "text_too_large" and "400000 characters" in err["message"]
        assert "--max-text-chars" in err["message"] and "truncate" in err["message"]
    # under that limit but past the runtime's cut: refused as too long without counting every token
    r = httpx.post(server.url + "/embed", json={"inputs": huge[:200_000]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_long"
    assert "at least 513 tokens" in r.json()["error"]["message"]
    # chunking a long text that fits the limit still works
    r = httpx.post(server.url + "/v1/embeddings", json={"input": huge[:3000], "long_text": "chunk"}, timeout=60)
    assert r.status_code == 200 and int(r.headers["x-windows"]) > 1


def test_one_line_requests_get_their_vectors_while_huge_ones_are_in_flight(server, emb, huge):
    """Two clients keep sending 5 MB texts while a third sends one-line requests: every answer is right.
    (How long the one-line requests take meanwhile is measured by benchmarks/hostile.py, not asserted.)"""
    stop = threading.Event()
    statuses: list[int] = []

    def flood() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                statuses.append(c.post(server.url + "/v1/embeddings", json={"input": huge}).status_code)

    threads = [threading.Thread(target=flood) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        texts = [f"第{i}个问题怎么办" for i in range(20)]
        with httpx.Client(timeout=60) as c:
            for text in texts:
                r = c.post(server.url + "/v1/embeddings", json={"input": text, "encoding_format": "float"})
                assert r.status_code == 200, r.text
                np.testing.assert_allclose(np.array(r.json()["data"][0]["embedding"], np.float32),
                                           _embed(emb, [text])[0], atol=1e-6)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert statuses and set(statuses) == {200}


@pytest.mark.parametrize("headers", [{"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
                                     {}])
def test_a_body_that_is_not_json_gets_415(server, headers):
    r = httpx.post(server.url + "/v1/embeddings", content=b'{"input": "a"}', headers=headers)
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_with_parameters_or_a_json_suffix_is_json(server, content_type):
    r = httpx.post(server.url + "/v1/embeddings", content=b'{"input": "a"}', headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text


def test_tei_bare_url_routes_and_model_retrieve(server, emb):
    for path in ("/", "/invocations"):
        r = httpx.post(server.url + path, json={"inputs": ["你好", "世界"]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json(), np.float32), _embed(emb, ["你好", "世界"]), atol=1e-6)
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(NotFoundError, match="not served here"):
        client.models.retrieve("nope")
