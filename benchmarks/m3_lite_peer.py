"""bge-m3-lite 0.6.2 (PyPI), the strongest onnxruntime-only bge-m3 library, as a peer of ``benchmarks/m3.py``:
the same random bge-m3 checkpoint run by it, by us and by FlagEmbedding, every side seeing the same token ids.

Setup, once (``benchmarks/results/cache`` is git-ignored; bge-m3-lite needs onnx and onnx-ir for its fuse and
quantise steps, so it gets a venv of its own; FlagEmbedding's venv, ``BGE_ONNX_FLAG_ENV``, which the compat tests
build, trains the SentencePiece model and traces the backbone)::

    python3 -m venv benchmarks/results/cache/m3-lite-venv
    benchmarks/results/cache/m3-lite-venv/bin/pip install "bge-m3-lite[quant]==0.6.2"
    python -m benchmarks.m3_lite_peer prepare          # about 20 minutes, needs ~22 GiB free (our INT8 export)
    python -m benchmarks.m3 --artifact benchmarks/results/cache/bge-m3-sp/artifact \\
        --checkpoint benchmarks/results/cache/bge-m3-sp/checkpoint --lite benchmarks/results/cache/bge-m3-sp/lite

What ``prepare`` builds under ``benchmarks/results/cache/bge-m3-sp`` (each step skipped when its output exists):

1. ``checkpoint/``: the seeded random bge-m3 checkpoint of ``--random-init bge-m3`` (seed 0; weights and
   heads linked, not copied) with a *SentencePiece* tokenizer: bge-m3-lite tokenises with its own reader of
   ``sentencepiece.bpe.model`` (a unigram model), so a random ``tokenizers`` vocabulary, which is what
   ``--random-init`` writes, has nothing it can read. A unigram model is trained offline (``sentencepiece``, vocab
   32,000, on the texts of benchmarks/data) and ``transformers``' XLMRobertaTokenizerFast converts it to the
   ``tokenizer.json`` we and FlagEmbedding read. Ids follow XLM-R's fairseq layout (``<s>`` 0, ``<pad>`` 1, ``</s>``
   2, ``<unk>`` 3, pieces at SentencePiece id + 1, ``<mask>`` last); the embedding table keeps bge-m3's 250,002
   rows (ids past 32,001 are never fed). ``compare-tokens`` checks both readers give the same ids.
2. ``artifact/``: ours, ``python -m export --model checkpoint --precision fp32,int8`` (every gate enforced).
3. ``lite/``: the backbone as the Hub's ``onnx/model.onnx`` is laid out (inputs ``input_ids``, ``attention_mask``;
   output ``token_embeddings``; weights in ``model.onnx_data``), traced with torch from the same checkpoint
   (transformers' XLMRobertaModel, eager attention, opset 14), then bge-m3-lite's own ``fuse`` (its FP32 graph:
   Attention/SkipLayerNorm/BiasGelu, chunked attention, layer tail in row windows) and ``quantize`` (its INT8
   backbone: SmoothQuant + row-wise dynamic INT8, calibrated on its own calibration texts) from its venv.

bge-m3-lite checks every small file against the sha256 of the published bge-m3 files on each load and downloads
on a mismatch; the benchmark's child process points ``bge_m3_lite.hub.ensure_files`` at the files of ``lite/``
instead (the only change to it; its graphs, tokenizer, batching and session options are its own defaults).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "results" / "cache"
DEFAULT_VENV = CACHE / "m3-lite-venv"
DEFAULT_WORK = CACHE / "bge-m3-sp"
SETUP_HINT = f'python3 -m venv {DEFAULT_VENV} && {DEFAULT_VENV}/bin/pip install "bge-m3-lite[quant]==0.6.2"'
FLAG_ENV = Path(os.environ.get("BGE_ONNX_FLAG_ENV", "/tmp/bge-onnx-flagembedding-env"))
VOCAB = 32000
# What the checkpoint keeps of the random one: everything but its tokenizer.
_KEEP = ("model.safetensors", "config.json", "colbert_linear.pt", "sparse_linear.pt", "modules.json",
         "sentence_bert_config.json", "1_Pooling", "2_Normalize", "RANDOM_WEIGHTS")

_TRAIN = r"""
import json, sys
from pathlib import Path
import sentencepiece as spm
from transformers import XLMRobertaTokenizerFast
data, out, vocab = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
lines = []
for name in ("sohu-dc.part1.jsonl", "sohu-dd.test.jsonl", "zh-query-pos-neg.jsonl"):
    for line in open(data / name, encoding="utf-8"):
        for v in json.loads(line).values():
            lines += [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)] if isinstance(v, list) else []
for name in ("sts-b-en.test.tsv", "sts-b-zh.test.tsv"):
    for line in open(data / name, encoding="utf-8"):
        lines += line.rstrip("\n").split("\t")[:2]
spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out / "sentencepiece.bpe"),
                               vocab_size=vocab, model_type="unigram", character_coverage=0.9995,
                               hard_vocab_limit=False, num_threads=2, minloglevel=2, seed_sentencepiece_size=1000000)
(out / "sentencepiece.bpe.vocab").unlink()
XLMRobertaTokenizerFast(vocab_file=str(out / "sentencepiece.bpe.model"), model_max_length=8192).save_pretrained(out)
"""

_TRACE = r"""
import sys
from pathlib import Path
import onnx, torch
from transformers import XLMRobertaModel
ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
model = XLMRobertaModel.from_pretrained(ckpt, attn_implementation="eager", add_pooling_layer=False).eval()
class Backbone(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
ids = torch.tensor([[0, 100, 200, 300, 2], [0, 400, 2, 1, 1]])
axes = {0: "batch", 1: "sequence"}
tmp = out / "trace"
tmp.mkdir(exist_ok=True)
with torch.no_grad():
    torch.onnx.export(Backbone(model), (ids, (ids != 1).long()), str(tmp / "model.onnx"), dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["token_embeddings"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_embeddings": axes},
                      opset_version=14, do_constant_folding=True)
del model
graph = onnx.load(str(tmp / "model.onnx"))
onnx.save_model(graph, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                location="model.onnx_data", size_threshold=1024)
for f in tmp.iterdir():
    f.unlink()
tmp.rmdir()
"""

_LITE_BUILD = r"""
import sys
from pathlib import Path
from bge_m3_lite.fuse import fuse
from bge_m3_lite.quantize import QuantConfig, quantize
lite = Path(sys.argv[1])
if not (lite / "model_fused.onnx").exists():
    print("fuse:", fuse(lite / "model.onnx"), flush=True)
if not (lite / "model_int8.onnx").exists():
    print("quantize:", quantize(lite / "model_fused.onnx", lite / "model_int8.onnx", QuantConfig(),
                                tokenizer_path=lite / "sentencepiece.bpe.model"), flush=True)
"""

# The lite engine's prelude of benchmarks.m3's child script (run in the lite venv): bge-m3-lite's files resolved
# to lite/ instead of its download cache, then its embedder with its own defaults.
LITE_PRELUDE = r"""
from pathlib import Path
from bge_m3_lite import hub
lite, precision = Path(sys.argv[1]), sys.argv[2]
def ensure_files(files=hub.ALL_FILES, cache_dir=None, *, quiet=False):
    out = {f.name: lite / f.name for f in files}
    missing = [str(p) for p in out.values() if not p.exists() and p.name != "Constant_7_attr__value"]
    if missing:
        raise FileNotFoundError(f"not built: {missing} (python -m benchmarks.m3_lite_peer prepare)")
    return out
hub.ensure_files = ensure_files
from bge_m3_lite import embedder as lite_embedder
lite_embedder.hub.ensure_files = ensure_files
m = lite_embedder.BGEM3Embedder(str(lite), precision=precision, quiet=True)
warm = lambda: m.encode(["warm up"], return_sparse=True, return_colbert_vecs=True)
encode = lambda: m.encode(texts, batch_size=len(texts), max_length=length, return_dense=True, return_sparse=True,
                          return_colbert_vecs=True)
colbert_rows = lambda out: [len(c) for c in out["colbert_vecs"]]
"""

_COMPARE = r"""
import json, sys
from bge_m3_lite.tokenizer import XLMRobertaTokenizer
lite = XLMRobertaTokenizer.from_file(sys.argv[1])
rows = json.load(open(sys.argv[2]))
print(json.dumps([lite.encode(t, max_length=10**9) for t in rows]))
"""


def lite_python(venv: Path = DEFAULT_VENV) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"bge-m3-lite's venv is missing: {SETUP_HINT}")
    return python


def _run(cmd: list[str], what: str) -> None:
    print(f"[m3-lite-peer] {what}: {' '.join(cmd[:4])} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def make_checkpoint(random_checkpoint: Path, out: Path) -> Path:
    """The random checkpoint's weights and heads (linked) with a SentencePiece tokenizer trained here."""
    if (out / "tokenizer.json").exists():
        return out
    if not (random_checkpoint / "model.safetensors").exists():
        # The same seeded checkpoint ``python -m export --random-init bge-m3`` builds (seed 0), kept on disk.
        from export.architectures import materialise

        print(f"[m3-lite-peer] seeded random bge-m3 checkpoint -> {random_checkpoint}", file=sys.stderr, flush=True)
        materialise("bge-m3", random_checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    for name in _KEEP:
        src, dst = random_checkpoint / name, out / name
        if not src.exists() or dst.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            os.link(src, dst)
    script = out.parent / "train_sentencepiece.py"
    script.write_text(_TRAIN)
    _run([str(FLAG_ENV / "bin" / "python"), str(script), str(REPO / "benchmarks" / "data"), str(out), str(VOCAB)],
         "SentencePiece unigram model + tokenizer.json")
    return out


def trace_backbone(checkpoint: Path, lite: Path) -> None:
    """The Hub-style backbone graph (input_ids, attention_mask -> token_embeddings) with its files beside it."""
    lite.mkdir(parents=True, exist_ok=True)
    for name in ("sentencepiece.bpe.model", "colbert_linear.pt", "sparse_linear.pt"):
        if not (lite / name).exists():
            shutil.copy2(checkpoint / name, lite / name)
    if (lite / "model.onnx").exists():
        return
    script = lite.parent / "trace_backbone.py"
    script.write_text(_TRACE)
    # FlagEmbedding's venv: transformers 4.57, whose eager XLM-R attention onnxruntime's BERT fusion matches
    # (the Hub's export predates transformers 5's mask code); torch comes from this project's venv.
    _run([str(FLAG_ENV / "bin" / "python"), str(script), str(checkpoint), str(lite)], "trace the backbone")


def build_lite(lite: Path, venv: Path = DEFAULT_VENV) -> None:
    script = lite.parent / "build_lite.py"
    script.write_text(_LITE_BUILD)
    _run([str(lite_python(venv)), str(script), str(lite)], "bge-m3-lite fuse + quantize")


def export_ours(checkpoint: Path, artifact: Path) -> None:
    if (artifact / "manifest.json").exists():
        return
    _run([sys.executable, "-m", "export", "--model", str(checkpoint), "--out", str(artifact),
          "--precision", "fp32,int8"], "our export")


def lite_ids(lite: Path, texts: list[str], work: Path, venv: Path = DEFAULT_VENV) -> list[list[int]]:
    """bge-m3-lite's token ids of ``texts`` (no cut), for the check that both sides read the same ids."""
    import json

    script, rows = work / "lite_ids.py", work / "lite_ids_texts.json"
    script.write_text(_COMPARE)
    rows.write_text(json.dumps(texts, ensure_ascii=False))
    out = subprocess.run([str(lite_python(venv)), str(script), str(lite / "sentencepiece.bpe.model"), str(rows)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["prepare"])
    p.add_argument("--random-checkpoint", type=Path, default=CACHE / "bge-m3-checkpoint")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--skip-ours", action="store_true", help="build only the checkpoint and bge-m3-lite's graphs")
    args = p.parse_args(argv)
    lite_python(args.venv)
    checkpoint = make_checkpoint(args.random_checkpoint, args.work / "checkpoint")
    trace_backbone(checkpoint, args.work / "lite")
    build_lite(args.work / "lite", args.venv)
    if not args.skip_ours:
        export_ours(checkpoint, args.work / "artifact")
    print(f"ready: {args.work}/{{checkpoint,artifact,lite}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
