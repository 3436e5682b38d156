"""The runtime's contract: input checking, typed errors, properties, queries, provider handling."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from runtime import (
    ArtifactError,
    Embedder,
    InputTooLongError,
    ProviderUnavailableError,
    TruncationWarning,
)
from runtime.providers import cuda_available


@pytest.fixture(scope="module")
def emb(tiny_artifact):
    return Embedder(tiny_artifact, device="cpu", precision="fp32")


def test_properties(emb, tiny_artifact):
    assert emb.dim == 64 and emb.max_length == 512 and emb.precision == "fp32"
    assert emb.providers == ["CPUExecutionProvider"]
    assert emb.manifest.variants.keys() == {"fp32", "fp16", "int8"}
    assert "tiny" in repr(emb)


def test_auto_picks_int8_on_cpu_and_fp16_on_cuda(tiny_artifact):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = Embedder(tiny_artifact)
    assert (emb.device, emb.precision) == (("cuda", "fp16") if cuda_available() else ("cpu", "int8"))


@pytest.mark.parametrize(
    "bad, match",
    [
        (None, "list or tuple of str, got NoneType"),
        ("a bare string", "single str"),
        ({"a": 1}, "got dict"),
        (["ok", 1], r"texts\[1\] is int"),
        (["ok", "ok", b"bytes"], r"texts\[2\] is bytes"),
        ((None,), r"texts\[0\] is NoneType"),
        ([{"x": 1}], r"texts\[0\] is dict"),
    ],
)
def test_bad_inputs_raise_type_error(emb, bad, match):
    with pytest.raises(TypeError, match=match):
        emb.embed(bad)
    with pytest.raises(TypeError, match=match):
        emb.embed_queries(bad)


def test_empty_list_and_empty_string(emb):
    out = emb.embed([])
    assert out.shape == (0, 64) and out.dtype == np.float32
    one = emb.embed([""])
    assert one.shape == (1, 64) and np.isfinite(one).all()
    assert abs(np.linalg.norm(one) - 1) < 1e-5


def test_truncate_false_names_index_and_count(emb):
    texts = ["短", "字" * 600, "字" * 900]
    with pytest.raises(InputTooLongError) as info:
        emb.embed(texts, truncate=False)
    assert info.value.index == 1 and info.value.n_tokens == 602
    assert "input 1 has 602 tokens" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncate_true_warns_with_count(emb):
    with pytest.warns(TruncationWarning) as record:
        emb.embed(["短", "字" * 600, "字" * 900])
    w = record[0].message
    assert w.count == 2 and w.indices == [1, 2]


def test_no_warning_when_nothing_is_truncated(emb):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb.embed(["字" * 510])  # 510 + [CLS] + [SEP] = 512, fits exactly


def test_lone_surrogate_is_a_value_error_naming_the_index(emb):
    with pytest.raises(ValueError, match="input 1"):
        emb.embed(["fine", "bad \ud800 text"])


def test_embed_queries_prepends_the_instruction(emb):
    q = "手机开不了机怎么办？"
    instr = emb.manifest.query_instruction
    assert instr == "为这个句子生成表示以用于检索相关文章："
    np.testing.assert_allclose(emb.embed_queries([q]), emb.embed([instr + q]), atol=1e-6)


def test_bad_arguments(tiny_artifact, emb):
    with pytest.raises(ValueError, match="device"):
        Embedder(tiny_artifact, device="tpu")
    with pytest.raises(ValueError, match="precision"):
        Embedder(tiny_artifact, device="cpu", precision="int4")
    with pytest.raises(ValueError, match="batch_size"):
        emb.embed(["x"], batch_size=0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Embedder(tiny_artifact, device="cpu", max_batch_tokens=100)


def test_missing_variant_is_an_artifact_error(artifact_copy):
    import json

    path = artifact_copy / "manifest.json"
    data = json.loads(path.read_text())
    del data["variants"]["int8"]
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="no int8 variant.*fp16.*fp32"):
        Embedder(artifact_copy, device="cpu", precision="int8")


def test_not_an_artifact_directory(tmp_path):
    with pytest.raises(ArtifactError, match="python -m export"):
        Embedder(tmp_path)


def test_cuda_requested_without_cuda_raises_listing_providers(tiny_artifact, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailableError, match="CPUExecutionProvider") as info:
        Embedder(tiny_artifact, device="cuda")
    assert "bge-onnx[gpu]" in str(info.value)


def test_cuda_session_that_falls_back_to_cpu_is_refused(tiny_artifact, monkeypatch):
    """The provider is listed but the session silently got only the CPU: raise, never run on CPU."""
    import onnxruntime as ort

    from runtime import providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    real = ort.InferenceSession

    def cpu_only(path, sess_options=None, providers=None, disabled_optimizers=None):
        return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(providers.ort, "InferenceSession", cpu_only)
    with pytest.raises(ProviderUnavailableError, match="session got"):
        Embedder(tiny_artifact, device="cuda")


def test_import_loads_neither_torch_nor_transformers_nor_the_server(tiny_artifact):
    code = textwrap.dedent(
        f"""
        import sys
        import runtime
        v = runtime.Embedder({str(tiny_artifact)!r}, device="cpu").embed(["你好", "hello"])
        assert v.shape == (2, 64), v.shape
        heavy = sorted(m for m in ("torch", "transformers", "onnx", "sentence_transformers", "starlette",
                                   "uvicorn", "prometheus_client", "runtime.serve", "ray", "lancedb",
                                   "pyarrow", "runtime.bulk") if m in sys.modules)
        assert not heavy, heavy
        print("clean")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout
