"""infinity-emb as a peer embedding server for the serving benchmark, in a venv of its own.

infinity pins transformers < 5 and numpy < 2, so it cannot share this project's environment; this module
builds that environment, exports a checkpoint to the plain ONNX graph its optimum engine expects, and
says how to start it. See /work/shared/notes/infinity-emb.md for the facts behind the pins and flags.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / "benchmarks" / "results" / "cache" / "infinity-venv"

# Found to work together on CPU (see the notes): newer optimum breaks the ONNX optimisation or the import,
# an unpinned torch pulls a multi-GB CUDA build (2.13.0 resolves to the local +cpu wheel here).
PINNED_REQUIREMENTS: tuple[str, ...] = (
    "infinity-emb[server,optimum]==0.0.78",
    "optimum[onnxruntime]==1.26.1",
    "transformers>=4.47,<4.49",
    "huggingface_hub<1",
    "numpy<2",
    "torch==2.13.0",
)
_MARKER = "infinity-peer-requirements.txt"


class InfinityPeerError(RuntimeError):
    """Base class: something about the infinity peer could not be set up or did not behave."""


class InfinityEnvError(InfinityPeerError):
    """The venv could not be created or infinity could not be installed into it."""


def _run(argv: list[str], *, timeout: float, what: str, next_step: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a subprocess with a timeout; turn failure into an error that says what to do next."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        raise InfinityPeerError(f"{what} took longer than {timeout:.0f} s. Next step: {next_step}") from e
    except OSError as e:
        raise InfinityPeerError(f"{what} could not start ({e}). Next step: {next_step}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-3000:]
        raise InfinityPeerError(f"{what} failed (exit {proc.returncode}):\n{tail}\nNext step: {next_step}")
    return proc


def _marker_text() -> str:
    return "\n".join([f"# python {sys.version_info.major}.{sys.version_info.minor}", *PINNED_REQUIREMENTS]) + "\n"


def ensure_env(venv_dir: Path) -> Path:
    """Create (once) a venv at venv_dir with infinity-emb and its pinned deps; return its python.

    Idempotent: a marker file records the pinned requirement set (written only after a successful
    install); the venv is rebuilt from scratch if it differs, so a half-built venv is never reused."""
    venv_dir = Path(venv_dir).resolve()
    python = venv_dir / "bin" / "python"
    marker = venv_dir / _MARKER
    if python.exists() and marker.is_file() and marker.read_text(encoding="utf-8") == _marker_text():
        return python
    if venv_dir.exists():
        if not (venv_dir / "pyvenv.cfg").is_file() and any(venv_dir.iterdir()):
            raise InfinityEnvError(
                f"{venv_dir} exists and is not a venv; refusing to delete it. Next step: remove it or pass another venv_dir"
            )
        shutil.rmtree(venv_dir)
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    reqs = " ".join(f"'{r}'" for r in PINNED_REQUIREMENTS)
    try:
        _run([sys.executable, "-m", "venv", str(venv_dir)], timeout=300, what="creating the infinity venv",
             next_step=f"run `{sys.executable} -m venv {venv_dir}` by hand to see why")
        _run([str(python), "-m", "pip", "install", "--no-input", *PINNED_REQUIREMENTS], timeout=1800,
             what="pip install of infinity-emb",
             next_step=f"run `{python} -m pip install {reqs}` by hand and read pip's resolver message")
    except InfinityPeerError as e:
        raise InfinityEnvError(str(e)) from e
    probe = _run([str(python), "-c", "import infinity_emb, optimum.onnxruntime, onnxruntime, torch; "
                  "print(infinity_emb.__version__, torch.__version__, torch.version.cuda)"],
                 timeout=300, what="importing infinity_emb in its venv",
                 next_step=f"run `{python} -c 'import infinity_emb'` and fix the failing import")
    marker.write_text(_marker_text(), encoding="utf-8")
    print(f"infinity venv ready at {venv_dir}: {probe.stdout.strip()}", file=sys.stderr)
    return python


class InfinityModelError(InfinityPeerError):
    """The checkpoint could not be exported or quantised for infinity."""


class InfinityServerError(InfinityPeerError):
    """The infinity server did not start, answer, or agree with the reference."""


# --------------------------------------------------------------------------------------------- model

# Bumped whenever the export recipe changes, so prepared directories from an older recipe are rebuilt.
EXPORT_RECIPE = "torch.onnx.export dynamo=False opset=18 eager-attention inputs=ids,mask,types v2"
QUANT_RECIPE = "optimum ORTQuantizer avx512_vnni dynamic per_channel=False of model.onnx v2"
_SOURCE_RECORD = "infinity-peer-source.json"
# What infinity's optimum engine reads besides the graph: AutoConfig and AutoTokenizer. The weights are
# deliberately not copied (the directory must hold nothing but the graph for infinity to choose from).
_COPY_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)

_EXPORT_SCRIPT = r'''
import json, sys
import numpy as np, onnxruntime as ort, torch
from transformers import BertModel, AutoTokenizer

src, out, opset = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)  # the cores are shared; export is not the benchmark
# eager attention: the classic BERT graph that onnxruntime's transformer optimizer fuses (as optimum exports it)
model = BertModel.from_pretrained(src, add_pooling_layer=False, use_safetensors=True, trust_remote_code=False,
                                  attn_implementation="eager", torch_dtype=torch.float32).eval()

class LastHidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.m(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=token_type_ids).last_hidden_state

names = ["input_ids", "attention_mask", "token_type_ids"]
dyn = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
dyn["last_hidden_state"] = {0: "batch_size", 1: "sequence_length"}
ids = torch.randint(1000, 5000, (2, 16)); ids[:, 0] = 101
dummy = (ids, torch.ones_like(ids), torch.zeros_like(ids))
with torch.no_grad():
    torch.onnx.export(LastHidden(model).eval(), dummy, out, input_names=names, output_names=["last_hidden_state"],
                      dynamic_axes=dyn, opset_version=opset, dynamo=False, do_constant_folding=True)

# parity on another shape, with padding, through the real tokenizer; export restores the wrapper's
# training flag, and the wrapper's train() reaches the model, so set eval again before comparing
model.eval()
tok = AutoTokenizer.from_pretrained(src)
enc = tok(["hello world", "一个更长一些的中文句子，用来检查动态形状。", "x"], padding=True, return_tensors="np")
feed = {k: enc[k].astype(np.int64) for k in names}
so = ort.SessionOptions(); so.intra_op_num_threads = 1
got = ort.InferenceSession(out, so, providers=["CPUExecutionProvider"]).run(None, feed)[0]
with torch.no_grad():
    want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state.numpy()
print(json.dumps({"max_abs_diff": float(np.abs(got - want).max()), "shape": list(got.shape)}))
'''

_QUANT_SCRIPT = r'''
import json, sys
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig

src_dir, out_dir = sys.argv[1], sys.argv[2]
quantizer = ORTQuantizer.from_pretrained(src_dir, file_name="model.onnx")
qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
quantizer.quantize(save_dir=out_dir, quantization_config=qconfig)
print(json.dumps({"quantized": True}))
'''


def _fingerprint(checkpoint_dir: Path, recipe: str) -> dict[str, str]:
    """Content hash of the checkpoint (not mtimes: a checkpoint re-materialised with the same seed is the
    same checkpoint), plus the recipe and the venv pins, so any change rebuilds the prepared model."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(q for q in checkpoint_dir.rglob("*") if q.is_file()):
        h.update(p.relative_to(checkpoint_dir).as_posix().encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return {"checkpoint": str(checkpoint_dir), "sha256": h.hexdigest(), "recipe": recipe,
            "requirements": _marker_text()}


def _reuse(base: Path, want: dict[str, str], graph: str) -> bool:
    record = base / _SOURCE_RECORD
    if not (record.is_file() and (base / "model" / graph).is_file()):
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")) == want
    except (OSError, json.JSONDecodeError):
        return False


def _fresh_staging(base: Path) -> Path:
    staging = base.with_name(base.name + f".tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "model").mkdir(parents=True)
    return staging


def _publish(staging: Path, base: Path, want: dict[str, str]) -> Path:
    """Swap the finished directory in whole, so a killed export never leaves a half-written model behind.
    The old directory goes with its hf-home, which holds infinity's optimised graph of the old export."""
    (staging / _SOURCE_RECORD).write_text(json.dumps(want, indent=2), encoding="utf-8")
    if base.exists():
        shutil.rmtree(base)
    staging.rename(base)
    return base / "model"


def _copy_tokenizer_files(checkpoint_dir: Path, model_dir: Path) -> None:
    if not (checkpoint_dir / "config.json").is_file() or not any(checkpoint_dir.glob("*.safetensors")):
        raise InfinityModelError(
            f"{checkpoint_dir} is not a checkpoint directory with config.json and *.safetensors. Next step: build "
            "one with export.architectures.materialise(...) or point --checkpoint at a Hugging Face directory"
        )
    for name in _COPY_FILES:
        if (checkpoint_dir / name).is_file():
            shutil.copy2(checkpoint_dir / name, model_dir / name)


def prepare_model(checkpoint_dir: Path, workdir: Path, *, venv_dir: Path = DEFAULT_VENV) -> Path:
    """Return a model directory (under workdir) holding the checkpoint's config/tokenizer files plus
    model.onnx exported from it (the plain BertModel graph, outputs last_hidden_state; infinity pools CLS
    itself for BGE). Idempotent (reuse if present and the checkpoint is unchanged).

    The export runs in infinity's venv (its torch/transformers), as infinity would get it from optimum.
    Layout: workdir/infinity-<checkpoint name>/{model/, hf-home/}; hf-home is the HF_HOME server_command
    gives infinity, where it caches its optimised graph (keyed by the model id ".", hence one per model)."""
    checkpoint_dir, workdir = Path(checkpoint_dir).resolve(), Path(workdir).resolve()
    base = workdir / f"infinity-{checkpoint_dir.name}"
    want = _fingerprint(checkpoint_dir, EXPORT_RECIPE)
    if _reuse(base, want, "model.onnx"):
        return base / "model"
    python = ensure_env(venv_dir)
    staging = _fresh_staging(base)
    model_dir = staging / "model"
    _copy_tokenizer_files(checkpoint_dir, model_dir)
    try:
        proc = _run([str(python), "-c", _EXPORT_SCRIPT, str(checkpoint_dir), str(model_dir / "model.onnx"), "18"],
                    timeout=1800, what=f"ONNX export of {checkpoint_dir.name} in the infinity venv",
                    next_step=f"rerun prepare_model; if it fails again run the export by hand with {python} "
                              "and check that the checkpoint loads as a BertModel",
                    env=_offline_env(os.environ), cwd=str(staging))
        parity = json.loads(proc.stdout.strip().splitlines()[-1])
    except InfinityPeerError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise InfinityModelError(str(e)) from e
    if parity["max_abs_diff"] > 1e-3:
        shutil.rmtree(staging, ignore_errors=True)
        raise InfinityModelError(
            f"the exported graph differs from torch by {parity['max_abs_diff']:.2e} (max abs, last_hidden_state). "
            "Next step: check the torch/onnxruntime versions in the infinity venv"
        )
    (staging / "export-parity.json").write_text(json.dumps(parity), encoding="utf-8")
    return _publish(staging, base, want)


def _quantize(python: Path, fp32_dir: Path, out_dir: Path, cwd: Path, name: str) -> None:
    """optimum's avx512_vnni dynamic INT8 of ``fp32_dir/model.onnx`` into ``out_dir``, in infinity's venv."""
    _run([str(python), "-c", _QUANT_SCRIPT, str(fp32_dir), str(out_dir)], timeout=1800,
         what=f"INT8 quantisation of {name} in the infinity venv",
         next_step=f"run optimum's ORTQuantizer by hand with {python} on {fp32_dir}/model.onnx",
         env=_offline_env(os.environ), cwd=str(cwd))


def prepare_quantized_model(checkpoint_dir: Path, workdir: Path, *, venv_dir: Path = DEFAULT_VENV) -> Path:
    """Like prepare_model, but the directory holds only model_quantized.onnx: optimum's avx512_vnni dynamic
    INT8 quantisation of the same plain graph, which infinity picks on CPU because of "quantize" in its name.
    This is the INT8 graph an infinity user gets from the usual optimum recipe, hence the fair INT8 peer."""
    checkpoint_dir, workdir = Path(checkpoint_dir).resolve(), Path(workdir).resolve()
    fp32_dir = prepare_model(checkpoint_dir, workdir, venv_dir=venv_dir)
    base = workdir / f"infinity-{checkpoint_dir.name}-int8"
    want = _fingerprint(checkpoint_dir, EXPORT_RECIPE + " | " + QUANT_RECIPE)
    if _reuse(base, want, "model_quantized.onnx"):
        return base / "model"
    python = ensure_env(venv_dir)
    staging = _fresh_staging(base)
    model_dir, scratch = staging / "model", staging / "quantizer-out"
    try:
        _quantize(python, fp32_dir, scratch, staging, checkpoint_dir.name)
    except InfinityPeerError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise InfinityModelError(str(e)) from e
    onnx_files = sorted(p.name for p in scratch.glob("*.onnx"))
    if onnx_files != ["model_quantized.onnx"]:
        shutil.rmtree(staging, ignore_errors=True)
        raise InfinityModelError(f"expected only model_quantized.onnx after quantisation, found {onnx_files}. "
                                 "Next step: check optimum's ORTQuantizer output naming for this version")
    # optimum also re-saves config/tokenizer with its transformers; keep the checkpoint's own, as in fp32
    (scratch / "model_quantized.onnx").rename(model_dir / "model_quantized.onnx")
    shutil.rmtree(scratch)
    _copy_tokenizer_files(checkpoint_dir, model_dir)
    return _publish(staging, base, want)


# ------------------------------------------------------------------------------------ cross-encoders

CROSS_RECIPE = "torch.onnx.export dynamo=False opset=18 eager SequenceClassification logits v2 (positions fix)"

_CROSS_EXPORT_SCRIPT = r"""
import json, sys
import numpy as np, onnxruntime as ort, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

src, out, opset = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
model = AutoModelForSequenceClassification.from_pretrained(src, use_safetensors=True, trust_remote_code=False,
                                                           attn_implementation="eager", torch_dtype=torch.float32).eval()
names = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.config.type_vocab_size > 1 else [])

class Logits(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
    def forward(self, *args):
        return self.m(**dict(zip(names, args))).logits

tok = AutoTokenizer.from_pretrained(src)
enc = tok([("a query", "a passage of text"), ("another", "x")], padding=True, return_tensors="pt")
dummy = tuple(enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in names)
dyn = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
dyn["logits"] = {0: "batch_size"}
with torch.no_grad():
    torch.onnx.export(Logits(model).eval(), dummy, out, input_names=names, output_names=["logits"], dynamic_axes=dyn,
                      opset_version=opset, dynamo=False, do_constant_folding=True)
model.eval()
enc = tok([("q", "一个更长一些的中文句子，用来检查动态形状。"), ("hello", "world")], padding=True, return_tensors="np")
feed = {n: enc[n].astype(np.int64) for n in names}
got = ort.InferenceSession(out, providers=["CPUExecutionProvider"]).run(None, feed)[0]
with torch.no_grad():
    want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
print(json.dumps({"max_abs_diff": float(np.abs(got - want).max()), "shape": list(got.shape)}))
"""

_CROSS_COPY = _COPY_FILES + ("sentencepiece.bpe.model",)


def prepare_cross_encoder(checkpoint_dir: Path, workdir: Path, *, venv_dir: Path = DEFAULT_VENV) -> Path:
    """A model directory for infinity's optimum cross-encoder engine (its ``/rerank``): the checkpoint's config
    and tokenizer plus only ``model_quantized.onnx``, optimum's avx512_vnni dynamic INT8 of the plain
    ``...ForSequenceClassification`` graph (logits), which infinity picks on CPU: the INT8 peer a user of
    infinity gets. Idempotent like prepare_model."""
    checkpoint_dir, workdir = Path(checkpoint_dir).resolve(), Path(workdir).resolve()
    base = workdir / f"infinity-cross-{checkpoint_dir.name}"
    want = _fingerprint(checkpoint_dir, CROSS_RECIPE + " | " + QUANT_RECIPE)
    if _reuse(base, want, "model_quantized.onnx"):
        return base / "model"
    python = ensure_env(venv_dir)
    staging = _fresh_staging(base)
    fp32_dir, model_dir, scratch = staging / "fp32", staging / "model", staging / "quantizer-out"
    fp32_dir.mkdir()
    for d in (fp32_dir, model_dir):
        for name in _CROSS_COPY:
            if (checkpoint_dir / name).is_file():
                shutil.copy2(checkpoint_dir / name, d / name)
    try:
        proc = _run([str(python), "-c", _CROSS_EXPORT_SCRIPT, str(checkpoint_dir), str(fp32_dir / "model.onnx"), "18"],
                    timeout=1800, what=f"ONNX export of the cross-encoder {checkpoint_dir.name} in the infinity venv",
                    next_step="check that the checkpoint loads as AutoModelForSequenceClassification",
                    env=_offline_env(os.environ), cwd=str(staging))
        parity = json.loads(proc.stdout.strip().splitlines()[-1])
        _quantize(python, fp32_dir, scratch, staging, checkpoint_dir.name)
    except InfinityPeerError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise InfinityModelError(str(e)) from e
    if parity["max_abs_diff"] > 1e-3:
        shutil.rmtree(staging, ignore_errors=True)
        raise InfinityModelError(f"the exported cross-encoder differs from torch by {parity['max_abs_diff']:.2e}")
    (scratch / "model_quantized.onnx").rename(model_dir / "model_quantized.onnx")
    shutil.rmtree(scratch)
    shutil.rmtree(fp32_dir)
    # infinity 0.0.78's optimum cross-encoder truncates pairs to config.max_position_embeddings, which for
    # XLM-R (514: positions start at padding_idx + 1) lets a 514-token pair index past the position table and
    # its start-up warm-up fails ("indices element out of data bounds, idx=514"); the workaround a user needs:
    # the config infinity reads says 512, the tokenizer's model_max_length
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") in ("xlm-roberta", "roberta"):
        config["max_position_embeddings"] = int(config["max_position_embeddings"]) - int(config.get("pad_token_id", 1)) - 1
        (model_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (staging / "export-parity.json").write_text(json.dumps(parity), encoding="utf-8")
    return _publish(staging, base, want)


# -------------------------------------------------------------------------------------------- server

_THREADS_VAR = "INFINITY_PEER_INTRA_OP_THREADS"
# infinity (0.0.78) builds its onnxruntime sessions through optimum without SessionOptions and has no
# thread option, and onnxruntime's CPU provider ignores OMP_NUM_THREADS (it has its own thread pool). So
# the server is started through this launcher, which sets intra_op_num_threads on every InferenceSession
# that has not set it, then runs infinity's own CLI in the same process. It also logs each graph it loads,
# which is how we know which file infinity serves without running it at info log level.
_LAUNCHER = r'''
import os, sys
import onnxruntime as ort
_n = int(os.environ.get("INFINITY_PEER_INTRA_OP_THREADS", "0"))
_init = ort.InferenceSession.__init__
def _init_with_threads(self, path_or_bytes, sess_options=None, *args, **kwargs):
    if sess_options is None:
        sess_options = ort.SessionOptions()
    if _n > 0 and sess_options.intra_op_num_threads == 0:
        sess_options.intra_op_num_threads = _n
    where = path_or_bytes if isinstance(path_or_bytes, (str, os.PathLike)) else "<bytes>"
    print(f"infinity_peer: InferenceSession {os.fspath(where)} intra_op_num_threads="
          f"{sess_options.intra_op_num_threads}", file=sys.stderr, flush=True)
    _init(self, path_or_bytes, sess_options, *args, **kwargs)
ort.InferenceSession.__init__ = _init_with_threads
sys.argv = ["infinity_emb", *sys.argv[1:]]
from infinity_emb.cli import cli
sys.exit(cli())
'''

# Per-request access logs cost the server CPU in a load test; warnings and errors are still logged.
LOG_LEVEL = "warning"


def _offline_env(base: dict[str, str] | os._Environ) -> dict[str, str]:
    """No hub, no telemetry, and none of this project's venv leaking into infinity's."""
    env = {k: v for k, v in base.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update({
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def server_command(model_dir: Path, port: int, threads: int, *, venv_dir: Path = DEFAULT_VENV,
                   rerank: bool = False) -> tuple[list[str], dict[str, str], Path]:
    """argv, environment and cwd to start infinity serving model_dir on 127.0.0.1:port as model "bge" with
    its optimum (ONNX) engine on CPU, routes under /v1 (POST /v1/embeddings).

    Threads: onnxruntime intra-op threads are set to ``threads`` by the launcher (see _LAUNCHER); the
    OpenMP/MKL/OpenBLAS pools and the tokenizer's rayon pool are capped to the same number by env vars.
    ``threads <= 0`` leaves every default alone (onnxruntime: one thread per physical core).
    cwd is model_dir and the model id is "." (an absolute id fails in infinity 0.0.78)."""
    model_dir = Path(model_dir).resolve()
    python = Path(venv_dir).resolve() / "bin" / "python"
    if not python.exists():
        raise InfinityEnvError(f"{python} does not exist. Next step: call ensure_env({venv_dir!s}) first")
    if not any(model_dir.glob("*.onnx")):
        raise InfinityModelError(f"{model_dir} holds no .onnx graph. Next step: call prepare_model(...) first")
    argv = [
        str(python), "-c", _LAUNCHER, "v2",
        "--model-id", ".",
        "--served-model-name", "bge",
        "--engine", "optimum",
        "--device", "cpu",
        "--batch-size", "32",          # infinity's default, stated so the benchmark records it
        *(["--pooling-method", "cls"] if not rerank else []),  # BGE; infinity's "auto" also means CLS
        "--no-trust-remote-code",
        "--host", "127.0.0.1",
        "--port", str(int(port)),
        "--url-prefix", "/v1",
        "--log-level", LOG_LEVEL,
    ]
    env = _offline_env(os.environ)
    env["HF_HOME"] = str(model_dir.parent / "hf-home")
    if threads > 0:
        for var in (_THREADS_VAR, "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
            env[var] = str(int(threads))
    else:
        env.pop(_THREADS_VAR, None)
    return argv, env, model_dir


# ---------------------------------------------------------------------------------- running and checking

def start_server(model_dir: Path, port: int, threads: int, log_path: Path, *,
                 venv_dir: Path = DEFAULT_VENV, rerank: bool = False) -> subprocess.Popen:
    """Start infinity in its own process group (so stop_server ends it and nothing else), logging to log_path."""
    argv, env, cwd = server_command(model_dir, port, threads, venv_dir=venv_dir, rerank=rerank)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop_server(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the server's process group, SIGKILL it if it has not gone after ``timeout`` seconds."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def post_embeddings(port: int, texts: list[str], timeout: float = 30.0) -> list[list[float]]:
    """POST /v1/embeddings as an OpenAI client would; vectors in input order."""
    import urllib.request

    body = json.dumps({"model": "bge", "input": texts}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/embeddings", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data = json.loads(resp.read())["data"]
    return [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 300.0) -> float:
    """Seconds until the embeddings route answers (/health is only a liveness timestamp, it answers
    before the model is usable). Raises if the process dies or the deadline passes."""
    import time
    import urllib.error

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise InfinityServerError(
                f"infinity exited with code {proc.returncode} before serving. Log tail:\n{_tail(log_path)}\n"
                f"Next step: read {log_path}"
            )
        try:
            post_embeddings(port, ["ok"], timeout=5.0)
            return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, json.JSONDecodeError):
            time.sleep(0.5)
    raise InfinityServerError(f"infinity did not answer on port {port} within {timeout:.0f} s. "
                              f"Log tail:\n{_tail(log_path)}\nNext step: read {log_path}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError as e:
        return f"(no log: {e})"


def process_memory_mb(pid: int) -> dict[str, float]:
    """Current and peak RSS of the server process (VmRSS, VmHWM), in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
        elif key == "Threads":
            out[key] = int(line.split()[1])
    return out


def served_graphs(log_path: Path) -> list[str]:
    """The graphs infinity opened, in order (logged by the launcher with their intra-op thread count); the
    last one is the one it serves."""
    marker = "infinity_peer: InferenceSession "
    lines = [line.split(marker, 1)[1].strip() for line in _tail(log_path, 10**7).splitlines() if marker in line]
    return [line.rsplit(" intra_op_num_threads=", 1)[0] for line in lines]


def _graph_ops(path: str) -> dict[str, int]:
    """Op counts of a graph, to see whether it is fused (Attention, SkipLayerNormalization) or INT8."""
    from collections import Counter

    import onnx

    g = onnx.load(path, load_external_data=False)
    return dict(Counter(n.op_type for n in g.graph.node).most_common())


CHECK_TEXTS = [
    "为这个句子生成表示以用于检索相关文章：什么是向量检索？",
    "The quick brown fox jumps over the lazy dog.",
    "短句",
    "向量数据库把文本编码成稠密向量，再用近似最近邻搜索找出语义最相近的文档。" * 6,
    "Mixed 中英文 text with numbers 12345 and punctuation!?",
    "x",
]


def check(checkpoint: Path, workdir: Path, port: int, threads: int, venv_dir: Path, int8: bool) -> dict:
    """The end-to-end check: env, export, serve, compare with the project's PyTorch reference."""
    import time

    import numpy as np

    from export.reference import ReferenceEmbedder
    from export.source import resolve

    result: dict = {"checkpoint": str(checkpoint), "threads": threads}
    t = time.monotonic()
    ensure_env(venv_dir)
    result["ensure_env_s"] = round(time.monotonic() - t, 1)

    import torch

    torch.set_num_threads(max(threads, 1))
    ref = ReferenceEmbedder(resolve(str(checkpoint), workdir=workdir)).embed(CHECK_TEXTS)

    variants = [("fp32", prepare_model)] + ([("int8", prepare_quantized_model)] if int8 else [])
    for name, prepare in variants:
        t = time.monotonic()
        model_dir = prepare(checkpoint, workdir, venv_dir=venv_dir)
        entry: dict = {"model_dir": str(model_dir), "prepare_s": round(time.monotonic() - t, 1)}
        cached = sorted(str(p.relative_to(model_dir.parent)) for p in (model_dir.parent / "hf-home").rglob("*.onnx"))
        entry["optimised_graph_cached_before_start"] = cached
        log_path = model_dir.parent / f"server-{port}.log"
        proc = start_server(model_dir, port, threads, log_path, venv_dir=venv_dir)
        try:
            entry["ready_s"] = round(wait_ready(proc, port, log_path), 1)
            got = np.asarray(post_embeddings(port, CHECK_TEXTS), dtype=np.float32)
            t = time.monotonic()
            for _ in range(20):
                post_embeddings(port, CHECK_TEXTS[:1])
            entry["one_text_request_ms_mean_of_20"] = round((time.monotonic() - t) / 20 * 1000, 2)
            entry["memory"] = process_memory_mb(proc.pid)
        finally:
            stop_server(proc)
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        entry["dim"] = int(got.shape[1])
        entry["cosine_vs_reference_min"] = float(cos.min())
        entry["cosine_vs_reference_mean"] = float(cos.mean())
        entry["max_abs_diff_vs_reference"] = float(np.abs(got - ref).max())
        graphs = served_graphs(log_path)
        entry["graphs_opened"] = [str(Path(g).resolve().relative_to(model_dir.parent.resolve()))
                                  if Path(g).resolve().is_relative_to(model_dir.parent.resolve()) else g
                                  for g in graphs]
        if graphs:
            served = Path(graphs[-1])
            served = served if served.is_absolute() else model_dir / served
            ops = _graph_ops(str(served))
            entry["served_graph_ops"] = {k: v for k, v in ops.items() if k in (
                "Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization",
                "BiasGelu", "FastGelu", "Gelu", "MatMul", "MatMulInteger", "DynamicQuantizeLinear",
                "DynamicQuantizeMatMul", "QAttention", "Softmax", "LayerNormalization")}
        result[name] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build infinity's venv and model, serve it, check it against the reference.")
    ap.add_argument("--checkpoint", type=Path, required=True,
                    help="checkpoint directory; built with export.architectures.materialise if missing and "
                         "named ckpt-<architecture>")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--port", type=int, default=7997)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1: shared cores)")
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--int8", action="store_true", help="also serve optimum's dynamic INT8 graph and check it")
    args = ap.parse_args(argv)

    if not args.checkpoint.is_dir():
        from export.architectures import ARCHITECTURES, materialise

        arch = args.checkpoint.name.removeprefix("ckpt-")
        if arch not in ARCHITECTURES:
            print(f"{args.checkpoint} does not exist and {arch!r} is not one of {sorted(ARCHITECTURES)}; "
                  "build the checkpoint first", file=sys.stderr)
            return 2
        materialise(arch, args.checkpoint, seed=0)
    try:
        result = check(args.checkpoint.resolve(), args.workdir.resolve(), args.port, args.threads,
                       args.venv, args.int8)
    except InfinityPeerError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
