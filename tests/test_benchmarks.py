"""The benchmark building blocks behave (the figures themselves come from the scripts, not from tests)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import datasets
from benchmarks.paths import OnnxFilePath, OursPath, TorchPath
from benchmarks.speed import model_ops
from benchmarks.stock import STOCK

from .helpers import cosines


def test_datasets_are_shipped_with_the_project():
    assert len(datasets.sts_b_en()) == 1379 and len(datasets.sts_b_zh()) == 1361
    select, report = datasets.sts_b_en().split()
    assert len(select) + len(report) == 1379
    assert len(datasets.sohu_long_documents()) == 250 and len(datasets.zh_queries()) == 2701


def test_calibration_and_report_splits_do_not_share_pairs():
    from export.quantize import calibration_texts

    _, report_en = datasets.sts_b_en().split()
    _, report_zh = datasets.sts_b_zh().split()
    report_pairs = set(zip(report_en.first, report_en.second)) | set(zip(report_zh.first, report_zh.second))
    calibration = set(calibration_texts(10_000))
    # calibration sees sentences only, never scores; short sentences recur across STS-B pairs ("A man is
    # playing a guitar."), so a handful of report pairs have both sentences elsewhere: keep that under 1%
    both = [p for p in report_pairs if p[0] in calibration and p[1] in calibration]
    assert len(both) < 0.01 * len(report_pairs)


@pytest.mark.parametrize("name", sorted(STOCK))
def test_stock_quantizers_produce_runnable_graphs(tiny_spec, tiny_artifact, tmp_path, name):
    from export.graph import export_onnx
    from export.reference import load_model

    plain = tmp_path / "plain.onnx"
    export_onnx(load_model(tiny_spec, attn_implementation="eager"), "cls", True, plain)
    dst = tmp_path / "q.onnx"
    STOCK[name](plain, dst)
    texts = ["你好世界", "今天天气很好", "hello"]
    got = OnnxFilePath(name, dst, tiny_artifact / "tokenizer.json", 512).embed(texts)
    ref = OursPath(tiny_artifact, "fp32").embed(texts)
    assert got.shape == ref.shape and cosines(got, ref).min() > 0.9


def test_paths_agree_with_the_reference(tiny_spec, tiny_artifact):
    texts = ["短", "一个比较长的中文句子，用来检查批处理。", "mixed 中文 and English"]
    ref = TorchPath(tiny_spec).embed(texts)
    np.testing.assert_allclose(OursPath(tiny_artifact, "fp32").embed(texts), ref, atol=1e-5)


def test_model_ops_counts_projections_ffn_and_attention():
    cfg = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24}
    per_token = model_ops(cfg, [1])
    assert abs(per_token / 1e9 - 0.604) < 0.01  # ~0.6 G ops per token for bge-large, as the issue states
    assert model_ops(cfg, [10, 20]) == pytest.approx(model_ops(cfg, [10]) + model_ops(cfg, [20]))


def test_profile_sums_node_time_after_the_warm_up_runs():
    from benchmarks.profile import summarise

    def run(ops: dict[str, float]) -> list[dict]:
        nodes = [{"cat": "Node", "name": f"n{i}_kernel_time", "dur": d, "args": {"op_name": op}}
                 for i, (op, d) in enumerate(ops.items())]
        return nodes + [{"cat": "Session", "name": "model_run", "dur": sum(ops.values()) + 5}]

    trace = run({"MatMul": 1000.0}) + run({"MatMul": 10.0, "Gelu": 4.0}) + run({"MatMul": 20.0, "Gelu": 6.0})
    s = summarise(trace, skip_runs=1)
    assert s["per_type_us"] == {"MatMul": 30.0, "Gelu": 10.0}
    assert s["node_us"] == 40.0 and s["run_us"] == 50.0 and s["events"] == {"MatMul": 2, "Gelu": 2}


def test_profile_of_a_real_graph_finds_its_fused_products(tiny_artifact):
    from benchmarks.profile import batches_for, profile_graph

    batches, tokens = batches_for(tiny_artifact / "tokenizer.json", ["你好", "今天天气很好", "a b c"] * 4, 4, 4096)
    got = profile_graph(tiny_artifact / "model_int8.onnx", {"w": batches}, threads=1)["w"]
    assert tokens > 0 and got["node_us"] > 0 and got["run_us"] >= got["node_us"] * 0.5
    assert "MatMulIntegerToFloat" in got["per_type_us"] and "QAttention" in got["per_type_us"]


def test_quality_script_compares_every_path_on_one_run(tiny_checkpoint, tmp_path, monkeypatch):
    from benchmarks import quality

    monkeypatch.setattr(quality, "SPEED_ROUNDS", 2)
    result = quality.run(tiny_checkpoint, "sts-b-zh", tmp_path, threads=1)
    names = [r["path"] for r in result["rows"]]
    assert names[:4] == ["torch fp32 (transformers)", "ours fp32", "ours fp16", "ours int8"]
    assert set(STOCK) <= set(names)
    rows = {r["path"]: r for r in result["rows"]}
    assert rows[quality.SPEED_BASELINE]["time_vs_default_median"] == 1.0
    assert rows["ours fp32"]["min_cosine_to_reference"] > 0.99999 and rows["ours fp32"]["spearman_ratio"] > 0.9999
    assert all(len(r["round_seconds"]) == 2 and r["texts_per_second"] > 0 for r in result["rows"])
    assert set(result["ours_int8_time_vs_stock"]) == set(STOCK)
    table = quality.table(result)
    assert table.count("\n| ") == len(names) + 1 and "time vs default" in table and "same rounds" in table


def test_rerank_benchmark_workload_and_report():
    from benchmarks.rerank import ST_FED, ST_TORCH, STOCK_OURS_FED, query_groups, render

    groups = query_groups(3, 50)
    assert len(groups) == 3 and all(len(ps) == 50 and all(ps) for _, ps in groups)
    assert groups[0][1][0] != groups[1][1][0]
    row = lambda pps, ms: {"pairs_per_s": pps, "one_x_50_ms_median": ms, "one_x_50_ms_p90": ms}  # noqa: E731
    result = {"machine": {"cpu": "x", "flags": "avx2", "date": "d"}, "threads": 2, "label": "arch", "repeats": 3,
              "pairs": 10, "tokens": 100, "rows": {"ours int8": row(200, 100), ST_FED: row(100, 250),
                                                   STOCK_OURS_FED: row(160, 150), ST_TORCH: row(20, 1000)}}
    md = render(result)
    assert "2.00x the pairs/s (target 1.7x)" in md and "latency 0.40x" in md and "10.00x (target 5x)" in md


def test_m3_table_gives_ours_against_flagembedding_and_bge_m3_lite_at_the_same_precision():
    from benchmarks.m3 import encoder_flops, markdown

    # one layer, H 2, FFN 4, 3 tokens: 2 x (4 H^2 + 2 H F + 2 L H) + the 2 H^2 head = 96 a token
    assert encoder_flops(3, 1, layers=1, hidden=2, ffn=4) == 288
    assert encoder_flops(128, 16) == pytest.approx(1.2670e12, rel=1e-4)  # bge-m3, 16 texts of 128 tokens
    rows = [{"engine": e, "length": 512, "texts": 8, "seconds": s, "texts_per_s": 8 / s, "peak_gib": 1.0,
             "gflops": 1200 / s} for e, s in (("ours-int8", 2.0), ("lite-int8", 5.0), ("ours-fp32", 4.0),
                                               ("lite-fp32", 6.0), ("flagembedding-fp32", 20.0))]
    rows.append({"engine": "lite-int8", "length": 8192, "texts": 1, "error": "killed"})
    lines = {line.split("|")[2].strip() + line.split("|")[1]: line for line in markdown(rows, 400).splitlines()[2:]}
    assert lines["ours-int8 512 x 8 "].rstrip("| ").endswith("10.00x | 2.50x | 600 (150%)")
    assert lines["ours-fp32 512 x 8 "].rstrip("| ").endswith("5.00x | 1.50x | 300 (75%)")
    assert lines["lite-int8 512 x 8 "].rstrip().endswith("| 4.00x |  | 240 (60%) |")
    assert "failed: killed" in lines["lite-int8 8192 x 1 "]


def test_model_alone_on_drawn_texts_pads_each_run_to_its_longest(tiny_artifact):
    """The serving benchmark's ceiling on a mix's own texts: runs of n drawn texts, padded to the longest, so a
    spread of lengths costs what it costs a server (more padding in bigger runs)."""
    from benchmarks.layout import model_alone
    from runtime import Manifest

    model = tiny_artifact / Manifest.load(tiny_artifact).variants["fp32"].model_file
    rows = [[101] + [7] * n + [102] for n in (2, 4, 8, 30)]
    one = model_alone(model, 1, 1, False, 1, 0.2, rows=rows)
    four = model_alone(model, 2, 1, False, 4, 0.2, rows=rows)
    assert one["texts_per_s"] > 0 and four["texts_per_s"] > 0 and four["workers"] == 2
    assert 4 <= one["mean_padded_tokens"] < four["mean_padded_tokens"] <= 32
    fixed = model_alone(model, 1, 1, False, 2, 0.2, length=9)
    assert "mean_padded_tokens" not in fixed and fixed["texts"] == 2
