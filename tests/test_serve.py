"""The server, really started (a subprocess on a loopback port), talked to with real clients: the official
``openai`` package and ``httpx``. Vectors must equal ``Embedder.embed`` whatever the load."""

from __future__ import annotations

import asyncio
import base64
import random
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter

import httpx
import numpy as np
import pytest
from openai import OpenAI

from runtime import Embedder
from runtime.providers import usable_cores

from .helpers import chinese_text
from .serve_process import ROOT, start_server

TEXTS = ["你好，世界", "A man is playing a guitar.", "   ", "手机开不了机怎么办？", "emoji 😀🎉 mixed 中文",
         "长" * 700]


@pytest.fixture(scope="module")
def server(tiny_artifact, minilm_artifact, tmp_path_factory):
    srv = start_server(["--model", f"tiny={tiny_artifact}", "--model", f"minilm={minilm_artifact}"],
                       tmp_path_factory.mktemp("serve"))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def tiny_emb(tiny_artifact):
    return Embedder(tiny_artifact)


@pytest.fixture(scope="module")
def minilm_emb(minilm_artifact):
    return Embedder(minilm_artifact)


def _embed(emb: Embedder, texts: list[str], query: bool = False) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return emb.embed_queries(texts) if query else emb.embed(texts)


def _sts_sentences(n: int) -> list[str]:
    lines = (ROOT / "benchmarks" / "data" / "sts-b-en.test.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[6] for line in lines[:n]]


# -- vectors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["base64", "float"])
def test_openai_client_gets_embedder_vectors(server, tiny_emb, minilm_emb, encoding):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    for model, emb, texts in (("tiny", tiny_emb, TEXTS), ("minilm", minilm_emb, _sts_sentences(40) + TEXTS)):
        kwargs = {} if encoding == "base64" else {"encoding_format": "float"}  # the client's default is base64
        resp = client.embeddings.create(model=model, input=texts, **kwargs)
        got = np.array([d.embedding for d in resp.data], dtype=np.float32)
        assert [d.index for d in resp.data] == list(range(len(texts)))
        assert resp.model == model
        np.testing.assert_allclose(got, _embed(emb, texts), rtol=0, atol=1e-6)
        n_tokens = sum(len(ids) for ids in emb.tokenize(texts).ids)
        assert resp.usage.prompt_tokens == resp.usage.total_tokens == n_tokens


def test_single_string_and_queries(server, tiny_emb):
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    one = client.embeddings.create(model="tiny", input="手机开不了机怎么办？", encoding_format="float")
    np.testing.assert_allclose(np.array(one.data[0].embedding, np.float32), _embed(tiny_emb, ["手机开不了机怎么办？"])[0],
                               atol=1e-6)
    q = client.embeddings.create(model="tiny", input=["手机开不了机怎么办？", "怎么办"], extra_body={"input_type": "query"})
    got = np.array([d.embedding for d in q.data], np.float32)
    np.testing.assert_allclose(got, _embed(tiny_emb, ["手机开不了机怎么办？", "怎么办"], query=True), atol=1e-6)
    assert not np.allclose(got, _embed(tiny_emb, ["手机开不了机怎么办？", "怎么办"]), atol=1e-3)


def test_base64_is_little_endian_float32(server, tiny_emb):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": ["你好"], "encoding_format": "base64"})
    assert r.status_code == 200
    vec = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, _embed(tiny_emb, ["你好"])[0], atol=1e-6)


def test_token_id_inputs(server, minilm_emb):
    texts = _sts_sentences(5)
    ids = minilm_emb.tokenize(texts).ids
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    many = client.embeddings.create(model="minilm", input=ids, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in many.data], np.float32), _embed(minilm_emb, texts),
                               atol=1e-6)
    assert many.usage.prompt_tokens == sum(map(len, ids))
    one = client.embeddings.create(model="minilm", input=ids[0], encoding_format="float")
    np.testing.assert_allclose(np.array(one.data[0].embedding, np.float32), _embed(minilm_emb, texts[:1])[0], atol=1e-6)


def test_tei_embed_route(server, tiny_emb):
    r = httpx.post(server.url + "/embed", json={"inputs": "你好", "model": "tiny"})
    assert r.status_code == 200
    np.testing.assert_allclose(np.array(r.json(), np.float32), _embed(tiny_emb, ["你好"]), atol=1e-6)
    r = httpx.post(server.url + "/embed", json={"inputs": ["你好", "世界"], "prompt_name": "query", "model": "tiny"})
    np.testing.assert_allclose(np.array(r.json(), np.float32), _embed(tiny_emb, ["你好", "世界"], query=True), atol=1e-6)
    # TEI's default is truncate=false: a text past max length is refused unless truncate is true
    long_text = "长" * 700
    r = httpx.post(server.url + "/embed", json={"inputs": [long_text], "model": "tiny"})
    assert r.status_code == 400 and "inputs[0]" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/embed", json={"inputs": [long_text], "truncate": True, "model": "tiny"})
    np.testing.assert_allclose(np.array(r.json(), np.float32), _embed(tiny_emb, [long_text]), atol=1e-6)
    # without "model" the first served model answers
    r = httpx.post(server.url + "/embed", json={"inputs": "你好"})
    np.testing.assert_allclose(np.array(r.json(), np.float32), _embed(tiny_emb, ["你好"]), atol=1e-6)


def test_long_text_choice_per_request(server, tiny_emb):
    rng = np.random.default_rng(7)
    texts = ["短句", chinese_text(1500, rng), chinese_text(900, rng)]
    body = {"model": "tiny", "input": texts, "encoding_format": "float"}
    chunked = httpx.post(server.url + "/v1/embeddings", json=body | {"long_text": "chunk"})
    assert chunked.status_code == 200 and int(chunked.headers["x-windows"]) > len(texts)
    got = np.array([d["embedding"] for d in chunked.json()["data"]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_allclose(got, tiny_emb.embed(texts, long_text="chunk"), atol=1e-6)
        truncated = tiny_emb.embed(texts)
    # the same texts truncated (the default) are not answered from the chunked request's cache entries
    plain = httpx.post(server.url + "/v1/embeddings", json=body)
    np.testing.assert_allclose(np.array([d["embedding"] for d in plain.json()["data"]], np.float32), truncated,
                               atol=1e-6)
    assert np.abs(got[1] - truncated[1]).max() > 1e-4  # so a mix-up would fail the comparisons above
    tei = httpx.post(server.url + "/embed", json={"inputs": texts, "long_text": "chunk"})
    np.testing.assert_allclose(np.array(tei.json(), np.float32), got, atol=1e-6)


def test_models_info_health(server, minilm_emb):
    r = httpx.get(server.url + "/v1/models")
    assert [m["id"] for m in r.json()["data"]] == ["tiny", "minilm"]
    assert OpenAI(base_url=server.url + "/v1", api_key="x").models.list().data[1].id == "minilm"
    info = {m["name"]: m for m in httpx.get(server.url + "/info").json()["models"]}
    assert info["minilm"]["dimension"] == 384 and info["minilm"]["precision"] == "int8"
    assert info["minilm"]["provider"] == "CPUExecutionProvider"
    assert info["minilm"]["pooling"] == "mean" and info["tiny"]["query_instruction"]
    assert len(info["tiny"]["manifest_sha256"]) == 64
    cores = usable_cores()
    assert info["minilm"]["workers"] == cores and info["minilm"]["lone_threads"] == (min(cores, 4) if cores > 1 else 0)
    if info["minilm"]["lone_threads"]:  # a lone query on an idle server takes the lone lane, with embed's vector
        time.sleep(1.1)
        r = httpx.post(server.url + "/v1/embeddings", json={"model": "minilm", "input": "a lone query", "encoding_format": "float"})
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], _embed(minilm_emb, ["a lone query"])[0], atol=1e-6)
        after = {m["name"]: m for m in httpx.get(server.url + "/info").json()["models"]}["minilm"]
        assert after["lone_runs"] == info["minilm"]["lone_runs"] + 1
        assert server.metric("bge_lone_runs_total", model="minilm") == after["lone_runs"]
    h = httpx.get(server.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


# -- errors ----------------------------------------------------------------------------------------
ERRORS = [
    # (route, body, status, code, fragment of the message)
    ("/v1/embeddings", b"{not json", 400, "invalid_json", "not valid JSON"),
    ("/v1/embeddings", b"[1, 2]", 400, "invalid_json", "JSON object"),
    ("/v1/embeddings", {"model": "tiny"}, 400, "missing_field", "'input' is required"),
    ("/v1/embeddings", {"model": "tiny", "input": []}, 400, "empty_input", "must not be empty"),
    ("/v1/embeddings", {"model": "tiny", "input": ["a", 3]}, 400, "invalid_type", "'input[1]' is int"),
    ("/v1/embeddings", {"model": "tiny", "input": [["a"]]}, 400, "invalid_type", "'input[0][0]' is str"),
    ("/v1/embeddings", {"model": "tiny", "input": {"a": 1}}, 400, "invalid_type", "got dict"),
    ("/v1/embeddings", {"model": "tiny", "input": [[101, 21128, 102]]}, 400, "invalid_token_id", "21128"),
    ("/v1/embeddings", {"model": "tiny", "input": [[101, -1, 102]]}, 400, "invalid_token_id", "-1"),
    ("/v1/embeddings", {"model": "tiny", "input": [[101] + [5] * 597 + [102]]}, 400, "input_too_long",
     "599 token ids"),
    # ids from another tokenizer (tiktoken's cl100k, as LangChain sends them) never pass as this model's
    ("/v1/embeddings", {"model": "tiny", "input": [[101, 7, 102], [9906, 1917]]}, 400, "foreign_token_ids",
     "'input[1]' is not a token-id list this model's tokenizer makes"),
    ("/v1/embeddings", {"model": "tiny", "input": [5, 6, 102]}, 400, "foreign_token_ids", "check_embedding_ctx_length"),
    ("/v1/embeddings", {"model": "tiny", "input": [101, 5, 6]}, 400, "foreign_token_ids", "end with [102]"),
    ("/v1/embeddings", {"model": "tiny", "input": [101]}, 400, "foreign_token_ids", "start with [101]"),
    # as in OpenAI's API, an empty string is refused (it has nothing to embed)
    ("/v1/embeddings", {"model": "tiny", "input": ""}, 400, "empty_string", "'input' is an empty string"),
    ("/v1/embeddings", {"model": "tiny", "input": ["a", ""]}, 400, "empty_string", "'input[1]' is an empty string"),
    ("/embed", {"inputs": ["a", ""]}, 400, "empty_string", "'inputs[1]'"),
    ("/embed", {"inputs": "a", "dimensions": 8}, 400, "unsupported_dimensions", "pass 64"),
    ("/v1/embeddings", {"model": "tiny", "input": ["ok", "长" * 700], "truncate": False}, 400, "input_too_long",
     "'input[1]' has 702 tokens"),
    ("/v1/embeddings", {"model": "tiny", "input": "a", "dimensions": 32}, 400, "unsupported_dimensions", "64"),
    ("/v1/embeddings", {"model": "tiny", "input": "a", "encoding_format": "int8"}, 400, "invalid_value", "encoding_format"),
    ("/v1/embeddings", {"model": "tiny", "input": "a", "input_type": "passage"}, 400, "invalid_value", "input_type"),
    ("/v1/embeddings", {"model": "tiny", "input": [[101, 102]], "input_type": "query"}, 400, "invalid_value",
     "needs text"),
    ("/v1/embeddings", {"model": "nope", "input": "a"}, 404, "model_not_found", "['minilm', 'tiny']"),
    ("/v1/embeddings", {"model": "tiny", "input": ["a"] * 2049}, 413, "too_many_inputs", "2048"),
    ("/embed", {"inputs": "a", "normalize": False}, 400, "invalid_value", "normalize"),
    ("/embed", {"inputs": "a", "prompt_name": "passage"}, 400, "unknown_prompt", "query"),
    ("/embed", {"inputs": "a", "truncation_direction": "Left"}, 400, "invalid_value", "right"),
    ("/embed", {}, 400, "missing_field", "'inputs' is required"),
    ("/v1/embeddings", {"model": "tiny", "input": "a", "long_text": "split"}, 400, "invalid_value", "long_text"),
    ("/v1/embeddings", {"model": "tiny", "input": ["长" * 700], "long_text": "error"}, 400, "input_too_long",
     "\"long_text\": \"chunk\""),
]


def _check_error_body(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in r.text
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


@pytest.mark.parametrize("route,body,status,code,fragment", ERRORS)
def test_errors_in_openai_shape(server, route, body, status, code, fragment):
    if isinstance(body, bytes):
        r = httpx.post(server.url + route, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    else:
        r = httpx.post(server.url + route, json=body, timeout=60)
    err = _check_error_body(r, status, code)
    assert fragment in err["message"], err


def test_unknown_route_and_method(server):
    _check_error_body(httpx.get(server.url + "/v2/nothing"), 404, "not_found")
    _check_error_body(httpx.get(server.url + "/v1/embeddings"), 405, "method_not_allowed")


@pytest.fixture(scope="module")
def strict_server(tiny_artifact, tmp_path_factory):
    """Small limits and an API key, the key given through the environment (as containers do)."""
    srv = start_server(["--model", str(tiny_artifact), "--max-inputs", "8", "--max-request-tokens", "300",
                        "--max-body-bytes", "4000"], tmp_path_factory.mktemp("strict"),
                       env={"BGE_SERVE_API_KEY": "s3cret", "BGE_SERVE_CACHE_SIZE": "0"}, api_key="s3cret")
    yield srv
    assert srv.stop() == 0, srv.log()


def test_api_key_and_size_limits(strict_server):
    url = strict_server.url
    _check_error_body(httpx.post(url + "/v1/embeddings", json={"input": "a"}), 401, "invalid_api_key")
    _check_error_body(httpx.post(url + "/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer no"}),
                      401, "invalid_api_key")
    _check_error_body(httpx.get(url + "/metrics"), 401)
    assert httpx.get(url + "/health").status_code == 200  # a readiness probe needs no key
    ok = OpenAI(base_url=url + "/v1", api_key="s3cret").embeddings.create(model="tiny", input=["a", "b"])
    assert len(ok.data) == 2
    auth = strict_server.headers()
    err = _check_error_body(httpx.post(url + "/v1/embeddings", json={"input": ["a"] * 9}, headers=auth), 413)
    assert "limit of 8" in err["message"]
    err = _check_error_body(httpx.post(url + "/v1/embeddings", json={"input": ["长" * 100] * 4}, headers=auth), 413,
                            "too_many_tokens")
    assert "408 tokens" in err["message"] and "300" in err["message"]
    err = _check_error_body(httpx.post(url + "/v1/embeddings", json={"input": ["x" * 5000]}, headers=auth), 413,
                            "body_too_large")
    assert "4000 bytes" in err["message"]
    info = httpx.get(url + "/info", headers=auth).json()
    assert info["limits"]["cache_size"] == 0 and [m["name"] for m in info["models"]] == ["tiny"]


# -- load --------------------------------------------------------------------------------------------
def test_concurrent_requests_get_their_own_vectors_in_order(server, minilm_emb):
    rng = random.Random(0)
    pool = _sts_sentences(300)
    requests = [rng.sample(pool, rng.randint(1, 6)) for _ in range(300)]
    for i in range(0, 300, 7):
        requests[i] = ["The same sentence every time."]  # cache hits mixed with computed vectors

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as c:
            sem = asyncio.Semaphore(48)

            async def one(texts):
                async with sem:
                    return await c.post("/v1/embeddings", json={"model": "minilm", "input": texts,
                                                                "encoding_format": "float"})
            return await asyncio.gather(*(one(t) for t in requests))

    hits_before = server.metric("bge_cache_hits_total", model="minilm")
    responses = asyncio.run(run())
    assert Counter(r.status_code for r in responses) == {200: len(requests)}
    expected = _embed(minilm_emb, pool)
    index = {t: i for i, t in enumerate(pool)}
    same = _embed(minilm_emb, ["The same sentence every time."])[0]
    for texts, r in zip(requests, responses):
        got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
        want = np.stack([same if t not in index else expected[index[t]] for t in texts])
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert server.metric("bge_cache_hits_total", model="minilm") - hits_before >= 40
    # batching across requests happened: fewer batches than texts
    assert server.metric("bge_batch_size_count", model="minilm") < server.metric("bge_batch_size_sum", model="minilm")


def test_metrics_parse_and_split_latency(server):
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.post(server.url + "/v1/embeddings", json={"model": "tiny", "input": ["你好"]})
    for header in ("x-queue-time", "x-inference-time", "x-tokenization-time", "x-total-time"):
        assert float(r.headers[header]) >= 0
    text = httpx.get(server.url + "/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    for name in ("bge_requests", "bge_request_duration_seconds", "bge_queue_duration_seconds",
                 "bge_tokenization_duration_seconds", "bge_inference_duration_seconds", "bge_batch_size",
                 "bge_batch_padded_tokens", "bge_queue_texts", "bge_queue_tokens", "bge_cache_hits",
                 "bge_dropped_texts", "bge_shed_requests"):
        assert name in names, name
    assert server.metric("bge_requests_total", route="/v1/embeddings", status="200") >= 1


def _long_texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [chinese_text(250, rng) for _ in range(n)]


@pytest.fixture(scope="module")
def small_queue_server(minilm_artifact, tmp_path_factory):
    srv = start_server(["--model", f"m={minilm_artifact}", "--max-queue-tokens", "2000", "--cache-size", "0"],
                       tmp_path_factory.mktemp("smallq"))
    yield srv
    assert srv.stop() == 0, srv.log()


def test_overload_gets_429_with_retry_after_and_no_5xx(small_queue_server, minilm_emb):
    texts = _long_texts(4, seed=1)  # ~1000 tokens a request: two fill the queue

    async def run():
        async with httpx.AsyncClient(base_url=small_queue_server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=100)) as c:
            return await asyncio.gather(*(c.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"})
                                          for _ in range(60)))

    responses = asyncio.run(run())
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    assert statuses[200] >= 1 and statuses[429] >= 30, statuses
    want = _embed(minilm_emb, texts)
    for r in responses:
        if r.status_code == 429:
            err = _check_error_body(r, 429, "queue_full")
            assert int(r.headers["retry-after"]) >= 1 and "retry after" in err["message"]
        else:
            np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]], np.float32), want, atol=1e-6)
    assert small_queue_server.metric("bge_shed_requests_total", model="m") == statuses[429]


def test_latency_target_measures_the_budget(tiny_artifact, tmp_path):
    """With --latency-target the budget starts at 0.7 of it and, once requests have been answered, is the
    target less their measured overshoot (here light load: near the 0.9 cap); /info and /metrics show it."""
    srv = start_server(["--model", f"t={tiny_artifact}", "--latency-target", "0.05", "--cache-size", "0"], tmp_path)
    try:
        def budget() -> tuple[float, float | None]:
            info = httpx.get(srv.url + "/info").json()
            assert info["limits"]["latency_target"] == 0.05 and info["limits"]["max_queue_time"] is None
            return info["models"][0]["queue_budget_seconds"], info["models"][0]["measured_overshoot_seconds"]

        assert budget()[0] == pytest.approx(0.035) and srv.metric("bge_queue_budget_seconds", model="t") == \
            pytest.approx(0.035)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            for i in range(100):
                assert c.post("/v1/embeddings", json={"input": [f"第{i}个句子"]}).status_code == 200
        seconds, overshoot = budget()
        assert overshoot is not None and 0 <= overshoot < 0.025, overshoot
        assert seconds == pytest.approx(min(0.045, 0.05 - overshoot))
        assert srv.metric("bge_queue_budget_seconds", model="t") == pytest.approx(seconds)
        # one request at a time never queues behind another: nothing went in on the target's tail
        assert httpx.get(srv.url + "/info").json()["models"][0]["tail_admitted_requests"] == 0
        assert srv.metric("bge_tail_admitted_requests_total", model="t") == 0
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_loop_running_behind_its_limit_refuses_at_once(tiny_artifact, tmp_path):
    """The event loop's lateness is measured while requests arrive (bge_event_loop_lag_seconds, /info); with
    --max-loop-lag, requests that arrive while it stays over the limit get 429 `overloaded` with Retry-After
    before their body is read. Bursts of 100 concurrent requests keep the loop busy, so its timer runs late
    by more than a 1 us limit while they last."""
    srv = start_server(["--model", f"t={tiny_artifact}", "--max-loop-lag", "0.000001", "--cache-size", "0"], tmp_path)
    try:
        assert httpx.get(srv.url + "/info").json()["limits"]["max_loop_lag"] == 0.000001

        async def bursts() -> list[httpx.Response]:
            out = []
            async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=httpx.Limits(max_connections=100)) as c:
                for k in range(5):
                    out += await asyncio.gather(*(c.post("/v1/embeddings", json={"input": [f"第{k}-{i}个句子"]})
                                                  for i in range(100)))
            return out

        responses = asyncio.run(bursts())
        statuses = Counter(r.status_code for r in responses)
        for r in responses:
            if r.status_code == 429:
                err = _check_error_body(r, 429, "overloaded")
                assert r.headers["retry-after"] == "1" and "--max-loop-lag" in err["message"]
        assert set(statuses) <= {200, 429} and statuses[429] >= 1, statuses
        info = httpx.get(srv.url + "/info").json()["event_loop"]
        assert info["shed_requests"] == statuses[429] == srv.metric("bge_loop_shed_requests_total")
        assert httpx.get(srv.url + "/health").status_code == 200  # shedding is not unreadiness
    finally:
        assert srv.stop() == 0, srv.log()
    # without the option nothing is refused for lag, and the lag is still measured and exported
    srv = start_server(["--model", f"t={tiny_artifact}", "--cache-size", "0"], tmp_path)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert all(c.post("/v1/embeddings", json={"input": [f"第{i}个"]}).status_code == 200 for i in range(50))
        assert httpx.get(srv.url + "/info").json()["limits"]["max_loop_lag"] is None
        assert srv.metric("bge_event_loop_lag_seconds") >= 0 and srv.metric("bge_loop_shed_requests_total") == 0
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def deadline_server(minilm_artifact, tmp_path_factory):
    srv = start_server(["--model", f"m={minilm_artifact}", "--request-timeout", "0.5", "--cache-size", "0",
                        "--batch-size", "4"], tmp_path_factory.mktemp("deadline"))
    yield srv
    assert srv.stop() == 0, srv.log()


def _settled(srv, name: str, **labels: str) -> float:
    """A counter once it stops moving (the worker finishes the batch it was running)."""
    last = -1.0
    for _ in range(100):
        value = srv.metric(name, **labels)
        if value == last:
            return value
        last = value
        time.sleep(0.2)
    return last


def test_request_past_deadline_gets_504_and_its_work_is_dropped(deadline_server):
    texts = _long_texts(96, seed=2)  # seconds of work, deadline 0.5 s
    before = deadline_server.metric("bge_embedded_texts_total", model="m")
    t0 = time.monotonic()
    r = httpx.post(deadline_server.url + "/v1/embeddings", json={"input": texts}, timeout=60)
    assert time.monotonic() - t0 < 5
    err = _check_error_body(r, 504, "deadline_exceeded")
    assert "0.5 s" in err["message"]
    embedded = _settled(deadline_server, "bge_embedded_texts_total", model="m") - before
    dropped = deadline_server.metric("bge_dropped_texts_total", model="m", reason="deadline")
    assert embedded < len(texts) and dropped >= 1 and embedded + dropped >= len(texts) - 4, (embedded, dropped)
    # the server is still healthy and answers the next request
    ok = httpx.post(deadline_server.url + "/v1/embeddings", json={"input": ["短句"]}, timeout=30)
    assert ok.status_code == 200


def test_client_that_leaves_has_its_work_dropped(deadline_server):
    texts = _long_texts(96, seed=3)
    before = deadline_server.metric("bge_dropped_texts_total", model="m", reason="disconnected")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(deadline_server.url + "/v1/embeddings", json={"input": texts}, timeout=httpx.Timeout(0.2))
    _settled(deadline_server, "bge_embedded_texts_total", model="m")
    assert deadline_server.metric("bge_dropped_texts_total", model="m", reason="disconnected") > before


def test_sigterm_during_load_answers_every_accepted_request(minilm_artifact, minilm_emb, tmp_path):
    srv = start_server(["--model", f"m={minilm_artifact}", "--cache-size", "0"], tmp_path)
    pool = _sts_sentences(200)
    requests = [pool[i:i + 8] for i in range(0, 200, 8)] * 4  # 100 requests of 8 texts
    health_during_drain: list[int] = []

    async def run():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as c:
            tasks = [asyncio.ensure_future(c.post("/v1/embeddings", json={"input": t, "encoding_format": "float"}))
                     for t in requests]
            while srv.metric("bge_embedded_texts_total", model="m") < 40:  # load is under way
                await asyncio.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
            health_during_drain.append((await c.get("/health")).status_code)
            late = await c.post("/v1/embeddings", json={"input": ["too late"]})
            return await asyncio.gather(*tasks, return_exceptions=True), late

    responses, late = asyncio.run(run())
    assert srv.proc.wait(60) == 0, srv.log()
    statuses = Counter(getattr(r, "status_code", type(r).__name__) for r in responses)
    assert set(statuses) <= {200, 503} and statuses[200] >= 1, statuses
    assert health_during_drain == [503]
    _check_error_body(late, 503, "draining")
    expected = {t: v for t, v in zip(pool, _embed(minilm_emb, pool))}
    for texts, r in zip(requests, responses):
        if r.status_code == 200:
            got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
            np.testing.assert_allclose(got, np.stack([expected[t] for t in texts]), atol=1e-6)


# -- command line ----------------------------------------------------------------------------------
def test_cli_help_and_bad_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "runtime.serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--model", "--max-queue-time", "--request-timeout", "--cache-size", "--api-key", "BGE_SERVE_"):
        assert flag in out.stdout
    out = subprocess.run([sys.executable, "-m", "runtime.serve", "--model", f"x={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no manifest.json" in out.stderr
    out = subprocess.run([sys.executable, "-m", "runtime.serve"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no model to serve" in out.stderr
