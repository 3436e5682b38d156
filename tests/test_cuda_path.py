"""The CUDA path as far as a CPU machine can exercise it: packaging of the two onnxruntime builds, the
provider errors, IO binding (run on CPU sessions here), GPU-style padding, and the device script's
CPU rehearsal. The GPU figures themselves come from `python -m benchmarks.gpu` on a lent GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from runtime import Embedder, InputTooLongError, ProviderUnavailableError
from runtime.batching import make_batches
from runtime.tokenizer import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]


def _requirements(extras: dict[str, list[str]], name: str, seen: set[str] | None = None) -> set[str]:
    """Distribution names an extra pulls in, following self-references like bge-onnx[cpu,export]."""
    seen = seen or set()
    out: set[str] = set()
    for req in extras[name]:
        dist = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            dist = dist.split(sep)[0]
        if dist == "bge-onnx":
            for sub in req[req.index("[") + 1 : req.index("]")].split(","):
                if sub not in seen:
                    seen.add(sub)
                    out |= _requirements(extras, sub, seen)
        else:
            out.add(dist)
    return out


def test_packaging_never_installs_both_onnxruntime_builds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split("<")[0].split(">")[0].split("=")[0] for d in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not base & {"onnxruntime", "onnxruntime-gpu"}, "an onnxruntime build in the base dependencies"
    assert "onnxruntime" in _requirements(extras, "cpu")
    assert "onnxruntime-gpu" in _requirements(extras, "gpu")
    for name in extras:
        got = _requirements(extras, name)
        assert not {"onnxruntime", "onnxruntime-gpu"} <= got, f"extra {name!r} installs both builds"
    # the export stage works with either build, so it must name neither (else [gpu,export] brings both)
    assert not _requirements(extras, "export") & {"onnxruntime", "onnxruntime-gpu"}


def test_missing_onnxruntime_is_a_clear_import_error():
    code = "import sys; sys.modules['onnxruntime'] = None\ntry:\n    import runtime\nexcept ImportError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "bge-onnx[cpu]" in out.stdout and "bge-onnx[gpu]" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("dists", "hint"),
    [
        (["onnxruntime", "onnxruntime-gpu"], "several onnxruntime builds are installed"),
        (["onnxruntime"], "CPU-only build `onnxruntime` is installed"),
        ([], "bge-onnx[gpu]"),
    ],
)
def test_cuda_error_says_which_builds_are_installed(tiny_artifact, monkeypatch, dists, hint):
    import onnxruntime as ort

    from runtime import providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(providers, "installed_ort_distributions", lambda: dists)
    with pytest.raises(ProviderUnavailableError, match="CPUExecutionProvider") as info:
        Embedder(tiny_artifact, device="cuda")
    assert hint in str(info.value)


def test_installed_distributions_sees_this_environment():
    from runtime.providers import installed_ort_distributions

    assert installed_ort_distributions() == ["onnxruntime"]  # what the [test] extra installs


def test_cuda_options_bound_the_arena():
    from runtime.providers import cuda_options

    opts = cuda_options(1)
    assert opts["device_id"] == 1 and opts["arena_extend_strategy"] == "kSameAsRequested"
    with pytest.raises(ValueError, match="device_id"):
        cuda_options(-1)


def test_cuda_session_gets_the_options_and_device(tiny_artifact, monkeypatch):
    """What the runtime asks onnxruntime for on CUDA: the CUDA provider first, with our options."""
    import onnxruntime as ort

    from runtime import providers

    asked = {}
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    class Recorder:
        def __init__(self, path, sess_options=None, providers=None, disabled_optimizers=None):
            asked["providers"] = providers
            asked["disabled_optimizers"] = disabled_optimizers
            self._s = real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

        def __getattr__(self, name):
            return getattr(self._s, name)

    monkeypatch.setattr(providers.ort, "InferenceSession", Recorder)
    emb = Embedder(tiny_artifact, device="cuda", device_id=3)
    name, opts = asked["providers"][0]
    assert name == "CUDAExecutionProvider" and opts["device_id"] == 3
    # onnxruntime's CUDA SkipLayerNormalization is its fast path: left to fuse at load there
    assert asked["disabled_optimizers"] == []
    assert emb.precision == "fp16"  # the default on CUDA
    # GPU batching: lengths padded to a multiple of 8, and the vectors still match a plain CPU run
    with pytest.warns(UserWarning, match="fp16 variant on CPU"):
        cpu = Embedder(tiny_artifact, device="cpu", precision="fp16")
    texts = ["你好", "今天天气很好，我们去公园散步吧。", "a" * 37]
    np.testing.assert_allclose(emb.embed(texts), cpu.embed(texts), atol=2e-3)


def test_pad_multiple_rounds_lengths_up_to_max_length():
    ids = [[101] + [5] * n + [102] for n in (3, 10, 508)]
    lengths = np.array([len(x) for x in ids])
    shapes = sorted(b.input_ids.shape[1] for b in make_batches(ids, lengths, 0, 1, 4096, pad_multiple=8, max_length=512))
    assert shapes == [8, 16, 512]
    capped = [b.input_ids.shape[1] for b in make_batches(ids[2:], lengths[2:], 0, 1, 4096, pad_multiple=64, max_length=510)]
    assert capped == [510]
    with pytest.raises(ValueError, match="pad_multiple"):
        list(make_batches(ids, lengths, 0, 1, 4096, pad_multiple=0))


def test_io_binding_path_gives_the_plain_runs_outputs(tiny_artifact, bert_reranker):
    """CUDA runs bind the output into an array of ours (on CPU a plain run is cheaper): the same code on a
    CPU session gives the plain run's vectors and logits (a reranker's output is [batch], not [batch, 1])."""
    from runtime import Reranker

    texts = ["你好", "今天天气很好，我们去公园散步吧。", "The quick brown fox.", "a" * 37]
    pairs = [("天气", t) for t in texts]
    for model, call in ((Embedder(tiny_artifact, device="cpu", precision="fp32"), lambda m: m.embed(texts)),
                        (Reranker(bert_reranker, device="cpu", precision="fp32"), lambda m: m.score(pairs))):
        plain = call(model)
        model._io_binding = True
        bound = call(model)
        assert bound.shape == plain.shape
        np.testing.assert_array_equal(bound, plain)


def test_extra_padding_does_not_change_vectors(tiny_artifact):
    """Runs of pre-tokenised batches, padded to 8 or not, agree with embed()."""
    emb = Embedder(tiny_artifact, device="cpu", precision="fp32")
    texts = ["你好", "今天天气很好，我们去公园散步吧。", "The quick brown fox.", "a" * 37]
    enc = TextTokenizer(tiny_artifact / "tokenizer.json", emb.max_length).encode(texts)
    expected = emb.embed(texts)
    for multiple in (1, 8, 64):
        for b in make_batches(enc.ids, enc.lengths, 0, 3, 4096, pad_multiple=multiple, max_length=emb.max_length):
            got = emb.embed_tokens(b.input_ids, b.attention_mask)
            np.testing.assert_allclose(got, expected[b.indices], atol=1e-5)


def test_embed_tokens_checks_its_arguments(tiny_artifact):
    emb = Embedder(tiny_artifact, device="cpu", precision="fp32")
    with pytest.raises(ValueError, match="same shape"):
        emb.embed_tokens(np.ones((2, 4), np.int64), np.ones((2, 5), np.int64))
    with pytest.raises(InputTooLongError):
        emb.embed_tokens(np.ones((1, emb.max_length + 1), np.int64), np.ones((1, emb.max_length + 1), np.int64))
    assert emb.embed_tokens(np.zeros((0, 4), np.int64), np.zeros((0, 4), np.int64)).shape == (0, emb.dim)


def test_device_script_cpu_rehearsal(tmp_path):
    """`python -m benchmarks.gpu --dry-run` runs every step of the GPU script on the CPU and writes the
    JSON the issue asks for; on the GPU the same code runs with the CUDA provider and torch fp16."""
    from benchmarks.gpu import card_slug, main

    assert main(["--dry-run", "--out", str(tmp_path), "--keep", str(tmp_path / "keep")]) == 0
    # --keep leaves what benchmarks.serve --device cuda serves: the checkpoint and an artifact with fp16
    assert (tmp_path / "keep" / "checkpoint" / "config.json").is_file()
    assert set(json.loads((tmp_path / "keep" / "artifact" / "manifest.json").read_text())["variants"]) == {"fp32", "fp16"}
    result = json.loads((tmp_path / "gpu-cpu-dry-run.json").read_text())
    for key in ("device", "throughput_vs_torch_fp16", "latency_vs_torch_fp16", "min_cos_vs_fp32", "raw",
                "throughput", "latency", "fp16_matmul_peak_tflops", "profile_ours_fp16_64x128", "targets"):
        assert key in result, key
    assert result["check"]["nan_or_inf"] is False
    assert result["min_cos_vs_fp32"] >= 0.999
    assert set(result["throughput"]) == {"64x128", "32x512"}
    assert all(len(v) >= 2 for v in result["raw"]["batch_s"].values())
    assert result["profile_ours_fp16_64x128"]["top_op_types_us_per_run"]
    assert (tmp_path / "gpu-cpu-dry-run.md").read_text().count("|") > 10
    assert card_slug("NVIDIA H100 80GB HBM3") == "h100" and card_slug("NVIDIA H200") == "h200"


def test_serving_benchmark_on_cuda_starts_every_server_in_fp16_on_the_gpu(tmp_path):
    """`benchmarks.serve --device cuda` (run by benchmarks/gpu_session.sh on a lent GPU): ours gets the CUDA
    provider and the fp16 variant with its own CUDA layout, the naive servers their fp16 GPU form, servers
    without one are reported unavailable, and the results never overwrite the CPU run's files."""
    from benchmarks import serve

    with pytest.raises(SystemExit):  # a CUDA run needs the artifact benchmarks.gpu --keep wrote
        serve.parse_args(["--device", "cuda"])
    args = serve.parse_args(["--device", "cuda", "--artifact", str(tmp_path / "a"), "--checkpoint",
                             str(tmp_path / "c"), "--model-arch", "bge-large-zh", "--mix", "query"])
    files = {"artifact": args.artifact, "checkpoint": args.checkpoint}
    ours = serve.build_spec("ours", files, args, ["--latency-target", "0.1"], "q: ")
    argv = ours.command(1234)[0]
    assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--precision") + 1] == "fp16"
    assert "--workers" not in argv and "fp16" in ours.label
    for name, model in (("naive-st-torch", args.checkpoint), ("naive-ours", args.artifact)):
        argv = serve.build_spec(name, files, args, [], "q: ").command(1234)[0]
        assert argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--model") + 1] == str(model)
    for name in ("naive-st-qint8", "infinity"):
        with pytest.raises(serve.Unavailable):
            serve.build_spec(name, files, args, [], "q: ")
    assert serve.result_stem("bge-large-zh", "query", "cuda") != serve.result_stem("bge-large-zh", "query", "cpu")
