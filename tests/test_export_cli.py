"""`python -m export` end to end, its errors, its gates and its all-or-nothing output directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import Embedder, Manifest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


def test_cli_end_to_end_from_a_local_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "art"
    proc = run_cli("--model", str(tiny_checkpoint), "--out", str(out), "--precision", "fp32,int8", "--max-length", "128")
    assert proc.returncode == 0, proc.stderr
    assert "| fp32 | model.onnx |" in proc.stdout and "| int8 | model_int8.onnx |" in proc.stdout
    for step in ("loading", "exporting", "fusing", "quantising", "validating"):
        assert step in proc.stderr
    m = Manifest.load(out)
    assert set(m.variants) == {"fp32", "int8"} and m.max_length == 128
    assert not (out / "model_fp16.onnx").exists()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model_int8.onnx", "tokenizer.json"]
    assert m.versions["torch"] and m.versions["onnxruntime"] and m.versions["transformers"]
    assert not list(tmp_path.glob(".art.partial-*"))
    emb = Embedder(out, device="cpu")
    assert emb.precision == "int8" and emb.embed(["你好"]).shape == (1, 64)


def test_random_init_is_announced_and_recorded(tmp_path):
    out = tmp_path / "rnd"
    proc = run_cli("--random-init", "tiny-zh", "--out", str(out), "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM WEIGHTS" in proc.stderr
    m = Manifest.load(out)
    assert m.source.random_weights and m.source.model == "tiny-zh"
    assert m.query_instruction == "为这个句子生成表示以用于检索相关文章："


def test_unknown_model_offline_gives_one_clear_paragraph(tmp_path):
    proc = run_cli("--model", "no-such-org/no-such-model", "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "no-such-org/no-such-model" in proc.stderr and "--model PATH" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_non_bert_or_non_safetensors_checkpoints_are_refused(tiny_checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    proc = run_cli("--model", str(ckpt), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "safetensors only" in proc.stderr and "Traceback" not in proc.stderr


def test_refuses_to_replace_a_directory_that_is_not_an_artifact(tiny_checkpoint, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    proc = run_cli("--model", str(tiny_checkpoint), "--out", str(out))
    assert proc.returncode == 2 and "not an artifact" in proc.stderr
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_failed_gate_leaves_variant_out_and_exits_non_zero(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from export import pipeline
    from export.cli import main

    monkeypatch.setitem(pipeline.GATES, "int8", 1.0000001)  # impossible: int8 must fail
    out = tmp_path / "gated"
    rc = main(["--model", str(tiny_checkpoint), "--out", str(out), "--precision", "fp32,int8"])
    captured = capsys.readouterr()
    assert rc == 1
    assert "| int8 |" in captured.out and "FAIL" in captured.out and "failed their parity gate" in captured.err
    m = Manifest.load(out)
    assert set(m.variants) == {"fp32"}
    assert not (out / "model_int8.onnx").exists()


def test_interrupted_export_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    from export import pipeline
    from export.cli import main

    real = pipeline.quantize.quantize_int8

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)  # the file is written, then Ctrl-C arrives
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.quantize, "quantize_int8", interrupted)
    out = tmp_path / "art"
    assert main(["--model", str(tiny_checkpoint), "--out", str(out)]) == 130
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_disk_error_is_reported_and_old_artifact_kept(tiny_checkpoint, tiny_artifact, tmp_path, monkeypatch, capsys):
    import shutil

    from export import pipeline
    from export.cli import main

    out = tmp_path / "art"
    shutil.copytree(tiny_artifact, out)
    before = (out / "manifest.json").read_text()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "save_tokenizer", disk_full)
    assert main(["--model", str(tiny_checkpoint), "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    Embedder(out, device="cpu", precision="fp32")  # the old artifact is intact


def test_reexport_replaces_an_existing_artifact(tiny_checkpoint, tiny_artifact, tmp_path):
    import shutil

    from export.cli import main

    out = tmp_path / "art"
    shutil.copytree(tiny_artifact, out)
    assert main(["--model", str(tiny_checkpoint), "--out", str(out), "--precision", "fp32"]) == 0
    assert set(json.loads((out / "manifest.json").read_text())["variants"]) == {"fp32"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_an_fp16_variant_the_cpu_cannot_run_is_recorded_not_fatal():
    """Without CUDA, an FP16 graph the CPU provider cannot run is recorded as not validated (the manifest
    says why); the same failure in an FP32 or INT8 variant stops the export."""
    from export.pipeline import _run_variant

    def fails():
        raise RuntimeError("no kernel for this op")

    got, note = _run_variant("fp16", fails)
    assert got is None and note.startswith("not validated: no CUDA") and "RuntimeError" in note
    assert _run_variant("fp16", lambda: 3) == (3, "")
    for name in ("fp32", "int8"):
        with pytest.raises(RuntimeError, match="no kernel"):
            _run_variant(name, fails)


def test_a_large_model_step_whose_child_dies_fails_instead_of_hanging(tmp_path):
    """Large models run fusion, FP16 and INT8 in a spawned child (its memory goes back when it ends). A child
    killed (for memory) or unable to start must end the export with a typed error: a multiprocessing Pool
    respawned the failing worker for ever when the export was driven from standard input on a GPU machine."""
    from export.errors import ChildProcessFailedError
    from export.pipeline import _run

    with pytest.raises(ChildProcessFailedError, match="died"):
        _run(True, os._exit, 3)
    # from standard input the spawned child cannot re-import the main module: an error within seconds
    program = "import os\nfrom export.pipeline import _run\n_run(True, os.getpid)\n"
    proc = subprocess.run([sys.executable, "-"], input=program, capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode != 0 and "ChildProcessFailedError" in proc.stderr, proc.stderr[-2000:]
