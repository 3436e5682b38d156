"""Bulk embedding on a real local Ray (2 CPUs) and a real LanceDB directory: every input format, vectors equal
to ``Embedder.embed`` row for row, ids kept, bad rows reported, resume after SIGKILL, an actor killed mid-run,
a model mismatch refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import ray

from runtime import Embedder
from runtime.bulk import BulkOptions, OutputMismatchError, embed_dataset, run_bulk

from .helpers import chinese_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting one costs seconds); the address lets subprocess
    drivers join it, as ``--ray-address`` does on a cluster."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def emb(tiny_artifact) -> Embedder:
    return Embedder(tiny_artifact, device="cpu", precision="int8")  # what the bulk run picks on CPU


def corpus(n: int, seed: int = 0, long_every: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = 600 if long_every and i % long_every == 3 else int(rng.integers(1, 80))
        rows.append({"pid": f"p{i:05d}", "text": chinese_text(length, rng), "lang": "zh" if i % 2 else "en"})
    return rows


def write_input(rows: list[dict], path: Path, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        pacsv.write_csv(pa.Table.from_pylist(rows), path)
    return path


def read_output(out: Path) -> pa.Table:
    files = sorted(out.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def expected(emb: Embedder, texts: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return emb.embed(texts)


def vectors(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)


def options(src: Path | str, out: Path | str, model: Path, **kw) -> BulkOptions:
    kw = {"text_column": "text", "shard_rows": 100, "actors": 1, "threads_per_actor": 1, "progress": False} | kw
    return BulkOptions(input=str(src), output=str(out), model_dir=model, **kw)


# -- formats, vectors, ids ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt, actors", [("jsonl", 2), ("parquet", 1), ("csv", 1)])
def test_each_format_gives_embed_vectors_and_keeps_ids(ray_local, tiny_artifact, emb, tmp_path, fmt, actors):
    rows = corpus(250, seed=1, long_every=50)
    src = write_input(rows, tmp_path / f"corpus.{fmt}", fmt)
    summary = run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid", keep=("lang",), actors=actors))
    table = read_output(tmp_path / "out")
    assert table.column_names == ["pid", "lang", "embedding"]
    assert table.column("pid").to_pylist() == [r["pid"] for r in rows]
    assert table.column("lang").to_pylist() == [r["lang"] for r in rows]
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), emb.dim)
    np.testing.assert_allclose(vectors(table), expected(emb, [r["text"] for r in rows]), rtol=0, atol=1e-6)
    assert (summary.rows, summary.failed, summary.truncated, summary.shards) == (250, 0, 5, 3)
    assert summary.tokens > 0 and summary.errors_path is None
    meta = pq.read_schema(tmp_path / "out" / "part-000000.parquet").metadata
    assert meta[b"bge_onnx.precision"] == b"int8" and len(meta[b"bge_onnx.model_digest"]) == 64
    assert not (tmp_path / "out" / "_bulk" / "errors.jsonl").exists()


def test_directory_input_without_id_column_numbers_rows_in_file_order(ray_local, tiny_artifact, emb, tmp_path):
    a, b = corpus(70, seed=2), corpus(60, seed=3)
    write_input(b, tmp_path / "in" / "b.jsonl", "jsonl")
    write_input(a, tmp_path / "in" / "a.jsonl", "jsonl")
    run_bulk(options(tmp_path / "in", tmp_path / "out", tiny_artifact, shard_rows=50))
    table = read_output(tmp_path / "out")
    assert table.column("id").to_pylist() == list(range(130))
    np.testing.assert_allclose(vectors(table), expected(emb, [r["text"] for r in a + b]), rtol=0, atol=1e-6)
    # a glob names the same files
    run_bulk(options(str(tmp_path / "in" / "*.jsonl"), tmp_path / "out2", tiny_artifact, shard_rows=50))
    assert read_output(tmp_path / "out2").equals(table)


def test_auto_shard_size_is_kept_by_a_resumed_run(ray_local, tiny_artifact, tmp_path):
    from runtime.bulk.options import auto_shard_rows

    assert [auto_shard_rows(n, a) for n, a in ((100, 1), (1300, 1), (20000, 1), (20000, 2), (10**7, 8))] == [
        256, 325, 4096, 2500, 4096]
    rows = corpus(1300, seed=4)
    src = write_input(rows, tmp_path / "c.jsonl", "jsonl")
    first = run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid", shard_rows=None))
    assert (first.shard_rows, first.shards) == (325, 4)
    for k in (1, 3):
        (tmp_path / "out" / f"part-{k:06d}.parquet").unlink()
    # two actors would pick 256-row shards on a new output; a resumed one must cut the first run's shards
    again = run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid", shard_rows=None, actors=2))
    assert (again.shard_rows, again.skipped_shards, again.rows) == (325, 2, 650)
    assert sorted(read_output(tmp_path / "out").column("pid").to_pylist()) == sorted(r["pid"] for r in rows)
    with pytest.raises(OutputMismatchError, match="shard_rows"):
        run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid", shard_rows=300))


def test_query_input_type_prepends_the_instruction(ray_local, tiny_artifact, emb, tmp_path):
    rows = corpus(20, seed=4)
    src = write_input(rows, tmp_path / "q.parquet", "parquet")
    run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid", input_type="query"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = emb.embed_queries([r["text"] for r in rows])
    np.testing.assert_allclose(vectors(read_output(tmp_path / "out")), want, rtol=0, atol=1e-6)


def _jitter(batch: dict) -> dict:
    """Blocks finish in a random order: a plan that trusted completion order would shift positions."""
    time.sleep(float(np.random.default_rng().uniform(0, 0.15)))
    return {"id": batch["id"], "text": np.array([f"t{i}" for i in batch["id"]], dtype=object)}


def test_shard_plan_follows_input_order_not_completion_order(ray_local):
    from runtime.bulk.resume import POS, plan_shards

    ds = ray.data.range(400, override_num_blocks=8).map_batches(_jitter, batch_size=None)
    plan = plan_shards(ds, 30)
    assert (plan.total_rows, plan.n_shards) == (400, 14)
    for k in (13, 0, 5, 7):  # 5 and 7 span two blocks of 50 rows
        table = plan.rows(k, "text")
        want = list(range(30 * k, min(30 * k + 30, 400)))
        assert table.column("id").to_pylist() == table.column(POS).to_pylist() == want
        assert table.column("text").to_pylist() == [f"t{i}" for i in want]
    with pytest.raises(ValueError, match="outside"):
        plan.rows(14, "text")


# -- LanceDB ---------------------------------------------------------------------------------
def test_lancedb_table_is_searchable_and_a_rerun_adds_nothing(ray_local, tiny_artifact, tmp_path):
    rows = corpus(150, seed=5)
    src = write_input(rows, tmp_path / "c.jsonl", "jsonl")
    sink = f"lancedb://{tmp_path / 'db'}/passages"
    run_bulk(options(src, sink, tiny_artifact, id_column="pid", keep=("text",)))
    table = lancedb.connect(str(tmp_path / "db")).open_table("passages")
    assert table.count_rows() == 150
    data = table.to_arrow()
    for i in (0, 77, 149):
        own = np.asarray(data.column("embedding")[i].as_py(), np.float32)
        hit = table.search(own).limit(1).to_list()[0]
        assert hit["pid"] == data.column("pid")[i].as_py()
    again = run_bulk(options(src, sink, tiny_artifact, id_column="pid", keep=("text",)))
    assert again.rows == 0 and again.skipped_shards == again.shards
    assert lancedb.connect(str(tmp_path / "db")).open_table("passages").count_rows() == 150


# -- bad rows, too-long rows, model mismatch ----------------------------------------------------
def test_bad_rows_go_to_errors_jsonl_and_the_rest_is_written(ray_local, tiny_artifact, emb, tmp_path):
    rows = corpus(120, seed=6)
    rows[3]["text"] = None
    rows[10]["text"] = 12345
    rows[50]["text"] = "字" * 700  # past max_length: refused with truncate=False
    rows[60]["text"] = ""  # valid
    src = write_input(rows, tmp_path / "bad.jsonl", "jsonl")
    summary = run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid", truncate=False))
    errors = [json.loads(line) for line in (tmp_path / "out" / "_bulk" / "errors.jsonl").read_text().splitlines()]
    assert {e["id"]: e["reason"] for e in errors}.keys() == {"p00003", "p00010", "p00050"}
    reasons = {e["id"]: e["reason"] for e in errors}
    assert "null" in reasons["p00003"] and "int" in reasons["p00010"] and "702 tokens" in reasons["p00050"]
    assert (summary.failed, summary.rows, summary.errors_total) == (3, 117, 3)
    table = read_output(tmp_path / "out")
    good = [r for r in rows if r["pid"] not in reasons]
    # the errors file does not stop the directory from being read as a Parquet dataset
    assert sorted(pq.read_table(tmp_path / "out").column("pid").to_pylist()) == sorted(r["pid"] for r in good)
    assert table.column("pid").to_pylist() == [r["pid"] for r in good]
    np.testing.assert_allclose(vectors(table), expected(emb, [r["text"] for r in good]), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def other_artifact(tmp_path_factory) -> Path:
    """Another model of the same architecture (other seed), INT8 only: exported in seconds."""
    from export.architectures import materialise
    from export.cli import main

    ckpt = materialise("tiny-zh", tmp_path_factory.mktemp("ckpt2") / "tiny-zh", seed=2)
    out = tmp_path_factory.mktemp("art2") / "tiny2"
    assert main(["--model", str(ckpt), "--out", str(out), "--precision", "int8"]) == 0
    return out


def test_a_different_model_or_precision_is_refused(ray_local, tiny_artifact, other_artifact, tmp_path):
    src = write_input(corpus(30, seed=7), tmp_path / "c.parquet", "parquet")
    run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid"))
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    with pytest.raises(OutputMismatchError, match="refusing to mix"):
        run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid", precision="fp32"))
    with pytest.raises(OutputMismatchError, match="new output"):
        run_bulk(options(src, tmp_path / "out", other_artifact, id_column="pid"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_embed_dataset_adds_embedding_and_reports_bad_rows(ray_local, tiny_artifact, emb):
    texts = ["你好，世界", "", "手机开不了机怎么办？", "长" * 600]
    table = pa.table({"k": [0, 1, 2, 3, 4], "text": pa.array([t.encode() for t in texts] + [b"\xff\xfe"], pa.binary())})
    ds = embed_dataset(ray.data.from_arrow(table), tiny_artifact, "text", rows_per_call=2)
    out = pa.Table.from_pylist(ds.take_all()).sort_by("k")
    got = out.column("embedding").to_pylist()
    np.testing.assert_allclose(np.array(got[:4], np.float32), expected(emb, texts), rtol=0, atol=1e-6)
    assert got[4] is None and "UTF-8" in out.column("embedding_error")[4].as_py()
    assert out.column("embedding_error").to_pylist()[:4] == [None] * 4


# -- failures: an actor dies, the driver is killed ---------------------------------------------
def test_an_actor_killed_mid_run_is_restarted_and_every_row_written_once(ray_local, tiny_artifact, emb, tmp_path):
    rows = corpus(400, seed=8)
    src = write_input(rows, tmp_path / "c.jsonl", "jsonl")
    marker = tmp_path / "crashed"
    summary = run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid", actors=2,
                               crash_once_marker=str(marker)))
    assert marker.exists()  # the hook did kill an actor process
    table = read_output(tmp_path / "out")
    assert table.column("pid").to_pylist() == [r["pid"] for r in rows]
    assert summary.rows == 400 and summary.failed == 0
    np.testing.assert_allclose(vectors(table), expected(emb, [r["text"] for r in rows]), rtol=0, atol=1e-6)


def _bulk_cmd(src: Path, out: Path, model: Path, address: str, summary: Path) -> list[str]:
    return [sys.executable, "-m", "runtime.bulk", str(src), str(out), "--model", str(model), "--id-column", "pid",
            "--shard-rows", "20", "--actors", "1", "--threads-per-actor", "1", "--ray-address", address,
            "--no-progress", "--summary-json", str(summary)]


def test_sigkill_then_resume_gives_every_id_exactly_once(ray_local, tiny_artifact, emb, tmp_path):
    rows = corpus(1200, seed=9)
    src = write_input(rows, tmp_path / "c.parquet", "parquet")
    out = tmp_path / "out"
    n_shards = 60
    proc = subprocess.Popen(_bulk_cmd(src, out, tiny_artifact, ray_local, tmp_path / "s1.json"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 6:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run wrote no shards in 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done_at_kill = len(list(out.glob("part-*.parquet")))
    assert 6 <= done_at_kill < n_shards, done_at_kill

    rerun = subprocess.run(_bulk_cmd(src, out, tiny_artifact, ray_local, tmp_path / "s2.json"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((tmp_path / "s2.json").read_text())
    assert summary["skipped_shards"] >= done_at_kill and summary["shards"] == n_shards
    assert summary["rows"] == 1200 - 20 * summary["skipped_shards"]
    table = read_output(out)
    ids = table.column("pid").to_pylist()
    assert Counter(ids) == Counter(r["pid"] for r in rows)  # every id exactly once
    assert ids == [r["pid"] for r in rows]
    assert not list(out.glob(".*.tmp"))
    np.testing.assert_allclose(vectors(table), expected(emb, [r["text"] for r in rows]), rtol=0, atol=1e-6)


# -- long texts: pooled windows, or one row per window ------------------------------------------------
def test_long_text_chunk_pools_and_chunks_writes_one_row_per_window(ray_local, tiny_artifact, emb, tmp_path):
    rng = np.random.default_rng(3)
    rows = [{"pid": f"d{i}", "text": chinese_text(n, rng)} for i, n in enumerate([20, 900, 1500, 40, 600])]
    texts = [r["text"] for r in rows]
    src = write_input(rows, tmp_path / "long.jsonl", "jsonl")
    pooled = run_bulk(options(src, tmp_path / "chunk", tiny_artifact, id_column="pid", long_text="chunk"))
    table = read_output(tmp_path / "chunk")
    assert table.column("pid").to_pylist() == [r["pid"] for r in rows]
    np.testing.assert_allclose(vectors(table), emb.embed(texts, long_text="chunk"), rtol=0, atol=1e-6)
    assert (pooled.rows, pooled.truncated) == (5, 3)  # three texts were cut into windows, none lost a token

    windows = run_bulk(options(src, tmp_path / "chunks", tiny_artifact, id_column="pid", long_text="chunks",
                               input_type="query"))
    table = read_output(tmp_path / "chunks")
    chunks = emb.embed_chunks([emb.manifest.query_instruction + t for t in texts])
    assert table.column("pid").to_pylist() == [r["pid"] for r, c in zip(rows, chunks) for _ in range(len(c))]
    assert table.column("window").to_pylist() == [w for c in chunks for w in range(len(c))]
    np.testing.assert_allclose(vectors(table), np.concatenate([c.vectors for c in chunks]), rtol=0, atol=1e-6)
    # spans are in the row's own text (the query instruction is not part of it); later windows are exact
    n_prefix = len(emb.manifest.query_instruction)
    spans = list(zip(table.column("span_start").to_pylist(), table.column("span_end").to_pylist()))
    assert spans == [(max(0, a - n_prefix), b - n_prefix) for c in chunks for a, b in c.spans]
    assert windows.windows == table.num_rows > 5 and windows.rows == 5
    with pytest.raises(Exception, match="contradicts"):
        options(src, tmp_path / "x", tiny_artifact, long_text="chunk", truncate=False)


def test_long_text_error_refuses_per_row_without_no_truncate(emb):
    from runtime.bulk.rows import embed_rows

    res = embed_rows(emb, ["字" * 700, "短句", None], long_text="error")
    assert res.ok.tolist() == [False, True, False]
    assert "702 tokens" in res.reasons[0] and "null" in res.reasons[2]
    np.testing.assert_allclose(res.vectors, expected(emb, ["短句"]), rtol=0, atol=1e-6)


def test_rerun_removes_half_written_parts_of_a_killed_run(ray_local, tiny_artifact, tmp_path):
    src = write_input(corpus(120, seed=9), tmp_path / "c.jsonl", "jsonl")
    run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid"))
    stale = [tmp_path / "out" / ".part-000001.parquet.abc123.tmp", tmp_path / "out" / "_bulk" / "errors" / ".000001.jsonl.x.tmp"]
    for p in stale:
        p.write_bytes(b"half a write")
    mine = tmp_path / "out" / ".notes.tmp"  # not one of ours: left alone
    mine.write_text("keep")
    again = run_bulk(options(src, tmp_path / "out", tiny_artifact, id_column="pid"))
    assert again.rows == 0 and not any(p.exists() for p in stale) and mine.exists()


# -- bge-m3: sparse and ColBERT outputs ---------------------------------------------------------------
def test_m3_outputs_go_to_parquet_and_lancedb_as_encode_gives_them(ray_local, m3_artifact, tiny_artifact, tmp_path):
    from runtime.bulk import BulkConfigError

    rows = corpus(60, seed=9)
    src = write_input(rows, tmp_path / "c.jsonl", "jsonl")
    out = tmp_path / "out"
    run_bulk(options(src, out, m3_artifact, id_column="pid", shard_rows=25, outputs=("dense", "sparse", "colbert")))
    table = read_output(out)
    by_pid = {p: i for i, p in enumerate(table.column("pid").to_pylist())}
    texts = [r["text"] for r in rows]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = Embedder(m3_artifact, precision="int8").encode(texts, dense=True, sparse=True, colbert=True)
    assert table.schema.field("colbert").type == pa.list_(pa.list_(pa.float32(), 64))
    for j, r in enumerate(rows):
        i = by_pid[r["pid"]]
        np.testing.assert_allclose(table.column("embedding")[i].as_py(), want.dense[j], atol=1e-5)
        ids, values = table.column("sparse_indices")[i].as_py(), table.column("sparse_values")[i].as_py()
        assert ids == sorted(want.sparse[j])
        np.testing.assert_allclose(values, [want.sparse[j][t] for t in ids], atol=1e-5)
        np.testing.assert_allclose(np.array(table.column("colbert")[i].as_py(), np.float32), want.colbert[j], atol=1e-5)
    sink = f"lancedb://{tmp_path / 'db'}/m3"
    run_bulk(options(src, sink, m3_artifact, id_column="pid", outputs=("sparse", "colbert")))
    lt = lancedb.connect(str(tmp_path / "db")).open_table("m3")
    assert lt.count_rows() == 60 and "colbert" in lt.schema.names and "embedding" not in lt.schema.names
    with pytest.raises(BulkConfigError, match="bge-m3"):
        options(src, tmp_path / "x", tiny_artifact, outputs=("sparse",))
    with pytest.raises(BulkConfigError, match="chunk"):
        options(src, tmp_path / "x", m3_artifact, outputs=("colbert",), long_text="chunk")
    with pytest.raises(BulkConfigError, match="--outputs"):
        options(src, tmp_path / "x", m3_artifact, outputs=("dense", "dense"))
