"""bge-m3: one graph, three outputs. Parity of dense, sparse and ColBERT with the PyTorch reference (FlagEmbedding's
formulas) over a batch x length grid, batch invariance, long inputs, per-call max length, typed errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from runtime import ArtifactError, Embedder, InputTooLongError, Manifest, TruncationWarning
from runtime.m3 import M3Output, colbert_score, hybrid_scores, lexical_score

from .helpers import chinese_text

RNG = np.random.default_rng(11)
TEXTS = ["", "hello world", "什么是深度学习？", "BGE M3 is an embedding model supporting dense retrieval, lexical "
         "matching and multi-vector interaction.", chinese_text(300, RNG), "the the the the cat the", "x " * 700]


@pytest.fixture(scope="module")
def reference(m3_checkpoint):
    from export.reference import ReferenceM3
    from export.source import resolve

    spec = resolve(str(m3_checkpoint), workdir=m3_checkpoint.parent)
    assert spec.m3 and spec.max_length == 1024
    return ReferenceM3(spec)


def _assert_matches(out: M3Output, dense, lexical, colbert, tol: float, weight_tol: float) -> None:
    cos = (out.dense * dense).sum(axis=1)
    assert cos.min() > 1 - tol, cos
    for got, want in zip(out.sparse, lexical):
        assert set(got) == {t for t, w in want.items() if w > weight_tol} | (set(got) & set(want)), (got, want)
        for t, w in want.items():
            assert abs(got.get(t, 0.0) - w) <= weight_tol, (t, got.get(t), w)
    for got, want in zip(out.colbert, colbert):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=weight_tol)


def test_manifest_declares_the_heads_and_every_variant_passed_them(m3_artifact):
    m = Manifest.load(m3_artifact)
    assert m.m3 is not None and m.kind == "embedder" and m.max_length == 1024 and m.query_instruction == ""
    assert m.m3.colbert_dim == 64 and set(m.m3.skip_token_ids) == {0, 1, 2, 3}
    assert set(m.variants) == {"fp32", "fp16", "int8"}
    for name, v in m.variants.items():
        fig = v.parity.m3
        assert fig["texts"] == 18 and fig["gates"], name
        assert fig["min_colbert_cosine"] >= fig["gates"]["min_colbert_cosine"], name
        assert fig["max_lexical_score_error"] <= fig["gates"]["max_lexical_score_error"], name
    assert m.variants["fp32"].parity.m3["max_colbert_score_error"] < 1e-5
    assert m.variants["fp32"].fused_operators["Attention"] == 2


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("max_length", [16, 128, 1024])
def test_fp32_matches_the_reference_over_batch_and_length(m3_artifact, reference, batch_size, max_length):
    emb = Embedder(m3_artifact, precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        out = emb.encode(TEXTS, batch_size=batch_size, dense=True, sparse=True, colbert=True, max_length=max_length)
    dense, lexical, colbert = reference.encode(TEXTS, batch_size=batch_size, max_length=max_length)
    _assert_matches(out, dense, lexical, colbert, tol=1e-6, weight_tol=2e-5)
    for i, text in enumerate(TEXTS):  # a text of n tokens: n - 1 ColBERT rows
        assert len(out.colbert[i]) == min(emb.count_tokens(text), max_length) - 1
    np.testing.assert_allclose(out.dense, emb.embed([t for t in TEXTS], batch_size=batch_size) if max_length == 1024
                               else out.dense, atol=1e-6)


def test_int8_stays_close_and_every_output_is_batch_invariant(m3_artifact, reference):
    for precision, atol in (("fp32", 1e-6), ("int8", 1e-5)):
        emb = Embedder(m3_artifact, precision=precision)
        batched = emb.encode(TEXTS, dense=True, sparse=True, colbert=True)
        for i, text in enumerate(TEXTS):
            alone = emb.encode([text], dense=True, sparse=True, colbert=True)
            np.testing.assert_allclose(alone.dense[0], batched.dense[i], atol=atol)
            np.testing.assert_allclose(alone.colbert[0], batched.colbert[i], atol=atol)
            assert alone.sparse[0].keys() == batched.sparse[i].keys()
            np.testing.assert_allclose(list(alone.sparse[0].values()), list(batched.sparse[i].values()), atol=atol)
    dense, lexical, colbert = reference.encode(TEXTS)
    int8 = Embedder(m3_artifact, precision="int8")
    # bge-m3's per-token outputs take the weights' eighth bit; the activations give it (export/quantize.py)
    build = int8.manifest.variants["int8"].build
    assert (build["weight_bits"], build["activation_bits"], build["reduce_range"]) == (8, 7, False)
    out = int8.encode(TEXTS, dense=True, sparse=True, colbert=True)
    assert (out.dense * dense).sum(axis=1).min() > 0.99
    for i in range(len(TEXTS)):
        for j in range(len(TEXTS)):
            assert abs(colbert_score(out.colbert[i], out.colbert[j]) - colbert_score(colbert[i], colbert[j])) < 0.03
            ref = lexical_score(lexical[i], lexical[j])
            assert abs(lexical_score(out.sparse[i], out.sparse[j]) - ref) <= 0.1 * max(lexical_score(d, d) for d in lexical)


def test_outputs_not_asked_for_are_none_and_dense_is_embed(m3_artifact):
    emb = Embedder(m3_artifact)
    only_sparse = emb.encode(TEXTS[:3], dense=False, sparse=True)
    assert only_sparse.dense is None and only_sparse.colbert is None and len(only_sparse.sparse) == 3
    np.testing.assert_allclose(emb.encode(TEXTS[:3]).dense, emb.embed(TEXTS[:3]), atol=1e-6)
    assert emb.has_m3_heads
    # special tokens are never lexical weights; every weight is positive
    skip = set(emb.manifest.m3.skip_token_ids)
    assert all(not (set(w) & skip) and all(v > 0 for v in w.values()) for w in only_sparse.sparse)
    named = emb.lexical_tokens(only_sparse.sparse[1])
    assert len(named) <= len(only_sparse.sparse[1]) and all(isinstance(k, str) for k in named)


def test_long_inputs_are_cut_or_refused_at_the_asked_length(m3_artifact):
    emb = Embedder(m3_artifact, precision="fp32")
    long = "深度学习 " * 800  # past the tiny model's 1024 tokens
    with pytest.warns(TruncationWarning):
        out = emb.encode([long, "short"], colbert=True, max_length=64)
    assert len(out.colbert[0]) == 63
    with pytest.raises(InputTooLongError):
        emb.encode([long], long_text="error")
    with pytest.raises(InputTooLongError):
        emb.encode(["a b c d e f g h i j"], long_text="error", max_length=4)
    with pytest.raises(ValueError, match="max_length"):
        emb.encode(["a"], max_length=2048)
    with pytest.raises(ValueError, match="chunk"):
        emb.encode(["a"], long_text="chunk")
    with pytest.raises(ValueError, match="at least one"):
        emb.encode(["a"], dense=False)


def test_a_plain_embedder_has_no_heads(tiny_artifact):
    emb = Embedder(tiny_artifact)
    assert not emb.has_m3_heads
    assert emb.encode(["a"]).dense.shape == (1, emb.dim)
    with pytest.raises(ArtifactError, match="bge-m3"):
        emb.encode(["a"], sparse=True)


def test_hybrid_scores_weigh_the_three_scores(m3_artifact):
    emb = Embedder(m3_artifact)
    q = emb.encode(["what is deep learning"], dense=True, sparse=True, colbert=True)
    p = emb.encode(TEXTS[1:4], dense=True, sparse=True, colbert=True)
    s = hybrid_scores(q, p, weights=(0.4, 0.2, 0.4))
    np.testing.assert_allclose(s["dense"], p.dense @ q.dense[0], rtol=1e-6)
    np.testing.assert_allclose(s["colbert+sparse+dense"], 0.4 * s["dense"] + 0.2 * s["sparse"] + 0.4 * s["colbert"])
    np.testing.assert_allclose(s["sparse+dense"], (0.4 * s["dense"] + 0.2 * s["sparse"]) / 0.6)
    assert lexical_score({1: 2.0, 5: 1.0}, {5: 3.0, 7: 1.0}) == 3.0
    assert colbert_score(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32)) == 1.0


@pytest.mark.parametrize("isolated", [False, True])
def test_a_graph_past_the_protobuf_limit_exports_with_external_data(m3_checkpoint, m3_artifact, tmp_path, monkeypatch,
                                                                    isolated):
    """bge-m3's FP32 graph is over 2 GiB: every step (fusion output, FP16 conversion, INT8 calibration and
    preparation) must handle weights in a .data file (the threshold is lowered so the tiny model takes that
    path), and a large model's fusion, FP16 and INT8 steps run in child processes (``isolated``: forced; the
    children keep the default threshold, so there the graphs are single files)."""
    from export import onnx_io, pipeline
    from export.cli import main

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
    if isolated:
        monkeypatch.setattr(pipeline, "ISOLATE_BYTES", 0)
    out = tmp_path / "external"
    assert main(["--model", str(m3_checkpoint), "--out", str(out)]) == 0
    m = Manifest.load(out)
    data = [] if isolated else [".data"]
    assert [f.path for f in m.variants["fp32"].files] == [f"model.onnx{x}" for x in [""] + data]
    assert [f.path for f in m.variants["fp16"].files] == [f"model_fp16.onnx{x}" for x in [""] + data]
    a = Embedder(out, precision="fp32").encode(TEXTS, sparse=True, colbert=True)
    b = Embedder(m3_artifact, precision="fp32").encode(TEXTS, sparse=True, colbert=True)
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-6)
    np.testing.assert_allclose(a.colbert[3], b.colbert[3], atol=1e-6)
    np.testing.assert_allclose(Embedder(out, precision="int8").embed(TEXTS), Embedder(m3_artifact, precision="int8").embed(TEXTS),
                               atol=1e-5)
    # INT8 is rewritten for flash attention after quantisation (long-context model), so saved by onnx_io too
    assert [f.path for f in m.variants["int8"].files] == [f"model_int8.onnx{x}" for x in [""] + data]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json", "model.onnx", "model_fp16.onnx", "model_int8.onnx"]
        + ([] if isolated else ["model.onnx.data", "model_fp16.onnx.data", "model_int8.onnx.data"]))


def test_saving_a_large_graph_twice_does_not_grow_its_data_file(m3_artifact, tmp_path, monkeypatch):
    """onnx appends external data to an existing file; the INT8 greedy saves its prepared graph once per round
    (a bge-reranker-large export had grown it to 16 GB after seven rounds)."""
    import onnx

    from export import onnx_io

    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
    model = onnx.load(str(m3_artifact / "model.onnx"))
    first = onnx_io.save(model, tmp_path / "g.onnx")
    size = first[1].stat().st_size
    onnx_io.save(model, tmp_path / "g.onnx")
    assert first[1].stat().st_size == size


def test_long_context_graphs_take_flash_attention_when_no_row_is_padded(m3_artifact, tiny_artifact):
    """Past 512 tokens of max length the FP32 and INT8 graphs wrap each attention in an If: unpadded batches run
    onnxruntime's CPU flash attention (no length x length matrix), padded ones the fused node. Both give the
    same vectors; a 512-token model's graphs are left as they were."""
    import onnx

    for precision in ("fp32", "int8"):
        m = Manifest.load(m3_artifact)
        assert m.variants[precision].build["flash_attention_layers"] == 2
        ops = [n.op_type for n in onnx.load(str(m3_artifact / m.variants[precision].model_file)).graph.node]
        assert ops.count("If") == 2 and "Attention" not in ops and "QAttention" not in ops
        emb = Embedder(m3_artifact, precision=precision)
        same_length = ["深" * 6, "学" * 6, "模" * 6]  # unpadded batch: the flash path
        assert len({len(r) for r in emb.tokenize(same_length).ids}) == 1
        flash = emb.encode(same_length, sparse=True, colbert=True)
        padded = emb.encode(same_length + ["一个长得多的句子，让这一批有填充"], sparse=True, colbert=True)
        np.testing.assert_allclose(flash.dense, padded.dense[:3], atol=1e-5)
        for a, b in zip(flash.colbert, padded.colbert):
            np.testing.assert_allclose(a, b, atol=1e-5)
    ops = [n.op_type for n in onnx.load(str(tiny_artifact / "model.onnx")).graph.node]
    assert "If" not in ops and ops.count("Attention") == 2


def test_layer_tails_run_over_row_windows_with_the_same_numbers(m3_checkpoint, m3_artifact, tmp_path, monkeypatch):
    """Past 512 tokens of max length each layer's tail (output projection, FFN, layer norms) runs in a Loop over
    windows of rows, so an 8,192-token text never holds its whole FFN intermediate. The artifact's windows are
    512 rows (one window for these texts); an export with 3-row windows cuts every text into several windows
    (and the padded batch's rows across texts): the same numbers, FP32 and INT8."""
    import onnx

    from export import row_windows
    from export.cli import main

    monkeypatch.setattr(row_windows, "ROWS", 3)
    out = tmp_path / "windows"
    assert main(["--model", str(m3_checkpoint), "--out", str(out), "--precision", "fp32,int8"]) == 0
    texts = TEXTS + ["深" * 6, "一个长得多的句子，让这一批有填充" * 3]
    for precision in ("fp32", "int8"):
        m = Manifest.load(out)
        assert m.variants[precision].build["row_window_layers"] == 2
        ops = [n.op_type for n in onnx.load(str(out / m.variants[precision].model_file)).graph.node]
        assert ops.count("Loop") == 2
        a = Embedder(out, precision=precision).encode(texts, sparse=True, colbert=True)
        b = Embedder(m3_artifact, precision=precision).encode(texts, sparse=True, colbert=True)
        np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)
        for x, y in zip(a.colbert, b.colbert):
            np.testing.assert_allclose(x, y, atol=1e-5)
        for x, y in zip(a.sparse, b.sparse):
            assert x.keys() == y.keys() and np.allclose(list(x.values()), [y[k] for k in x], atol=1e-5)


def test_a_tail_that_is_not_row_wise_is_left_alone():
    """A dynamically quantised node takes its scale from the whole tensor: windowing it would make a row's
    numbers depend on its window, so such a tail is refused (the export then stops with a FusionError); the same
    tail quantised with a static scale is windowed and gives the same numbers."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from export.row_windows import windowed_tails

    def graph(dynamic: bool) -> onnx.ModelProto:
        quantise = ([helper.make_node("DynamicQuantizeLinear", ["a"], ["q", "s", "z"])] if dynamic else
                    [helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"])])
        nodes = [helper.make_node("Attention", ["x", "w", "b"], ["a"], domain="com.microsoft", num_heads=1),
                 *quantise,
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                 helper.make_node("Add", ["d", "x"], ["r"]),
                 helper.make_node("LayerNormalization", ["r", "g", "b2"], ["n1"]),
                 helper.make_node("MatMul", ["n1", "m"], ["r2"]),
                 helper.make_node("LayerNormalization", ["r2", "g", "b2"], ["y"])]
        rng = np.random.default_rng(0)
        inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
                 for name, shape in (("w", (4, 12)), ("b", (12,)), ("g", (4,)), ("b2", (4,)), ("m", (4, 4)))]
        if not dynamic:
            inits += [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                      numpy_helper.from_array(np.array(128, np.uint8), "z")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])

    assert windowed_tails(graph(dynamic=True), rows=3) == (0, 1)
    static = graph(dynamic=False)
    x = np.random.default_rng(1).standard_normal((2, 5, 4)).astype(np.float32)
    before = ort.InferenceSession(static.SerializeToString()).run(None, {"x": x})[0]
    assert windowed_tails(static, rows=3) == (1, 0)  # 10 rows: windows of 3, 3, 3, 1
    after = ort.InferenceSession(static.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, atol=1e-6)
