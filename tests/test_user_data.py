"""Users' data for eval, quantize and bench: plain text, JSON Lines (gzip too), Parquet and
`datasets` directories, with their sha256 and document counts in every result record."""

import gzip
import hashlib
import json
import sys

import pytest
import torch

from faircalib import hub
from faircalib.cli import main
from faircalib.data import calibration_batch
from faircalib.data.sources import load_source
from faircalib.errors import DataError
from faircalib.eval.likelihood import conditional_log_likelihood, encode_pair

torch.set_num_threads(1)

DOCS = [
    "The river flows north through the valley, past the old mill and the church.",
    "Prices rose by three percent in the second quarter, the ministry said on Monday.",
    "She plays the violin in the city orchestra and teaches on weekends.",
]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path, docs, field="text", compress=False):
    lines = "".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs))
    path.write_bytes(gzip.compress(lines.encode()) if compress else lines.encode())
    return path


def test_plain_text_documents_are_blank_line_blocks(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("  first line\nsame doc\n\n\n second doc \n \t\nthird\n")
    source = load_source(str(path))
    assert source.docs == ("first line\nsame doc", "second doc", "third")
    assert source.record() == {
        "data": str(path),
        "format": "text",
        "split": None,
        "text_field": None,
        "documents": 3,
        "sha256": sha(path),
        "sha256_of": "file",
    }


def test_jsonl_plain_and_gzipped_with_a_text_field(tmp_path):
    plain = write_jsonl(tmp_path / "d.jsonl", DOCS, field="body")
    packed = write_jsonl(tmp_path / "d.jsonl.gz", DOCS, compress=True)
    assert load_source(str(plain), text_field="body").docs == tuple(DOCS)
    source = load_source(str(packed))
    assert source.docs == tuple(DOCS) and source.sha256 == sha(packed)  # of the file as stored
    with pytest.raises(DataError, match=r"line 1 has no field 'text' \(fields: \['body', 'id'\]\)"):
        load_source(str(plain))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 5}\n')
    with pytest.raises(DataError, match="bad.jsonl line 2: field 'text' is int, not text"):
        load_source(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="broken.jsonl line 2 is not JSON"):
        load_source(str(tmp_path / "broken.jsonl"))
    with pytest.raises(DataError, match="single file: it has no splits"):
        load_source(str(packed), "train")
    with pytest.raises(DataError, match="neither a shipped corpus"):
        load_source(str(tmp_path / "missing.jsonl"))


def test_parquet(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed (the data extra)")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": DOCS}), path)
    source = load_source(str(path), text_field="content")
    assert (source.docs, source.kind, source.sha256) == (tuple(DOCS), "parquet", sha(path))
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['content'\]\)"):
        load_source(str(path))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were missing
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'faircalib\[data\]'"):
        load_source(str(path), text_field="content")


def test_datasets_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="datasets not installed (the data extra)")
    folder = tmp_path / "ds"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": DOCS[:2]}),
            "test": datasets.Dataset.from_dict({"text": DOCS[2:]}),
        }
    ).save_to_disk(str(folder))
    with pytest.raises(DataError, match=r"has splits \['test', 'train'\]"):
        load_source(str(folder))
    source = load_source(str(folder), "train")
    assert source.docs == tuple(DOCS[:2]) and source.record()["documents"] == 2
    # the directory's hash: every file's path and bytes, in path order (recomputed here)
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f.relative_to(folder).as_posix().encode() + b"\0" + bytes.fromhex(sha(f)))
    assert source.sha256 == digest.hexdigest()
    # a hub id: the loader is datasets' own (no network here, so it is stood in for); with no
    # file to hash, the record hashes the documents, each followed by a NUL byte
    calls = []

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"text": DOCS})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    hub_source = load_source("someone/corpus", "validation")
    assert calls == [("someone/corpus", "validation")]
    expected = hashlib.sha256("".join(d + "\0" for d in DOCS).encode()).hexdigest()
    assert (hub_source.sha256, hub_source.sha256_of, hub_source.kind) == (expected, "text", "hub")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"needs the datasets package: pip install"):
        load_source(str(folder), "train")


def test_too_little_text_is_an_error_not_a_repeat(tmp_path):
    tok = hub.load_tokenizer("mdlm-tiny")
    source = load_source(str(write_jsonl(tmp_path / "d.jsonl", DOCS)))
    n_tokens = sum(len(tok.encode(d).ids) + 1 for d in DOCS)  # each document + end-of-text
    fits = n_tokens // 8
    assert calibration_batch(tok, source, None, n_samples=fits, seq_len=8).shape == (fits, 8)
    with pytest.raises(DataError, match=f"has {n_tokens} tokens, fewer than {fits + 1} samples"):
        calibration_batch(tok, source, None, n_samples=fits + 1, seq_len=8)


def test_eval_and_quantize_record_the_users_data(tmp_path, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", DOCS * 20)
    assert main(["eval", "mdlm-tiny", "--data", str(data), "--limit", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data_source"]["sha256"] == sha(data) and out["data_source"]["documents"] == 60
    assert out["sequences"] == 2 and out["split"] is None
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(DOCS * 10))
    args = ["quantize", "mdlm-tiny", "--method", "rtn", "--bits", "8", "--group-size", "-1"]
    args += ["--calib", str(text), "--nsamples", "4", "--seq-len", "32", "--json"]
    assert main([*args, "--out", str(tmp_path / "q")]) == 0
    summary = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "q" / "quantization.json").read_text())
    for record in (summary["calib_data"], saved["calib_data"]):
        assert (record["sha256"], record["documents"], record["format"]) == (sha(text), 30, "text")


def test_bench_with_users_data_and_a_task(tmp_path, capsys):
    calib = write_jsonl(tmp_path / "calib.jsonl", DOCS * 10)
    evald = write_jsonl(tmp_path / "eval.jsonl", DOCS * 5)
    task = tmp_path / "task.jsonl"
    items = [
        {"context": "The river flows", "choices": [" north", " purple"], "answer": 0},
        {"context": "She plays the", "choices": [" seventeen", " violin"], "answer": 1},
    ]
    task.write_text("".join(json.dumps(i) + "\n" for i in items))
    args = ["bench", "--model", "mdlm-tiny", "--methods", "rtn", "--schemes", "w8pc"]
    args += ["--nsamples", "2", "--seq-len", "32", "--eval-limit", "2", "--flip-prompts", "1"]
    args += ["--flip-gen-length", "8", "--flip-steps", "4", "--calib", str(calib)]
    args += ["--eval-data", f"{evald},wikitext2:test", "--protocol", "mdlm"]
    args += ["--task", str(task), "--task-mc-samples", "4", "--out", str(tmp_path / "b"), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    data = result["record"]["data"]
    assert data["calib"]["sha256"] == sha(calib) and data["calib"]["documents"] == 30
    assert data["eval"][str(evald)]["sha256"] == sha(evald)
    assert data["eval"]["wikitext2:test"]["protocol"] == "mdlm"
    assert data["task"] == {"task": str(task), "sha256": sha(task), "items": 2}
    # the float row's accuracy, recomputed from LLaDA's estimate of each choice
    model, tok = hub.load("mdlm-tiny"), hub.load_tokenizer("mdlm-tiny")
    right = 0
    for item in items:
        lls = [
            conditional_log_likelihood(model, *encode_pair(tok, item["context"], c), mc_samples=4)
            for c in item["choices"]
        ]
        right += int(lls.index(max(lls)) == item["answer"])
    assert result["rows"][0]["task"]["acc"] == right / 2
    assert result["summary"][1]["task_acc"] in (0.0, 0.5, 1.0)
    markdown = (tmp_path / "b" / "bench.md").read_text()
    assert "task acc" in markdown and f"sha256 {sha(calib)[:12]}" in markdown


def test_task_files_are_checked_line_by_line(tmp_path):
    from faircalib.eval.tasks import load_task

    path = tmp_path / "task.jsonl"
    good = {"context": "A", "choices": [" b", " c"], "answer": 1}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "answer": 2}) + "\n")
    with pytest.raises(DataError, match=r"task.jsonl line 3: answer must be a choice index 0..1"):
        load_task(path)
    path.write_text(json.dumps(good) + "\n")
    items, record = load_task(path)
    assert (items[0].choices, items[0].answer) == ((" b", " c"), 1)
    assert record == {"task": str(path), "sha256": sha(path), "items": 1}


def test_a_task_choice_longer_than_the_model_is_named_before_any_evaluation(tmp_path):
    """The context is cut to fit the model; a choice cannot be. The check names the line and
    the choice, and runs before the float model is evaluated (bench used to fail after it)."""
    from faircalib.eval.tasks import check_task_fits, load_task

    tokenizer = hub.load_tokenizer("mdlm-tiny")
    path = tmp_path / "task.jsonl"
    fits = {"context": "word " * 1000, "choices": [" b", " c"], "answer": 0}
    long = {"context": "A", "choices": [" b", " word" * 200], "answer": 0}
    path.write_text(json.dumps(fits) + "\n\n" + json.dumps(long) + "\n")
    items, _ = load_task(path)
    check_task_fits(items[:1], tokenizer, 128)  # a long context is cut, not refused
    n = len(tokenizer.encode(" word" * 200).ids)
    with pytest.raises(DataError, match=rf"task.jsonl line 3: choice 1 has {n} tokens, more than"):
        check_task_fits(items, tokenizer, 128)
    check_task_fits(items, tokenizer, n)  # exactly the model's length fits


def test_an_unreachable_hub_dataset_is_one_line_without_the_retry_warnings(monkeypatch, capsys):
    """Offline, huggingface_hub logs a warning (with the URL) per retried request before
    load_dataset fails; the user sees only the one-line error."""
    import logging

    datasets = pytest.importorskip("datasets")
    handler_output = []

    class Collect(logging.Handler):
        def emit(self, record):
            handler_output.append(record.getMessage())

    hub_logger = logging.getLogger("huggingface_hub.utils._http")
    collect = Collect()
    hub_logger.addHandler(collect)
    root = logging.getLogger("huggingface_hub")
    level = root.level
    root.setLevel(logging.WARNING)  # the library's default: its warnings are shown

    def offline_load_dataset(name, split=None):
        for n in range(1, 6):
            hub_logger.warning(f"Retrying in {n}s [Retry {n}/5].")
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)
    try:
        with pytest.raises(DataError, match="loading it as a hub dataset failed") as exc:
            load_source("someone/corpus", "validation")
        assert handler_output == []  # the warnings were not emitted
        assert root.level == logging.WARNING  # the level is restored
        hub_logger.warning("after the call")
        assert handler_output == ["after the call"]
    finally:
        hub_logger.removeHandler(collect)
        root.setLevel(level)
    assert "\n" not in str(exc.value)
