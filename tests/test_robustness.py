"""The malformed-input suite of issue 18: benchmarks/robustness.py's CASES, run here in-process
(every case) and as real processes (one case per kind of failure), plus hypothesis fuzzing of
config.json and safetensors headers.

A case passes when the command exits non-zero with exactly one stderr line that names the
problem and says what to do, prints no traceback and leaves no new directory with a
config.json (what every loader starts from)."""

import json

import pytest
import torch

from benchmark_scripts import load_benchmark

torch.set_num_threads(1)  # tiny cases: threads would only contend on a shared CPU


robustness = load_benchmark("robustness")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return robustness.Inputs.build(tmp_path_factory.mktemp("robustness") / "inputs")


@pytest.fixture(scope="module")
def no_mount():
    return robustness.mount_unavailable()


def test_suite_covers_every_kind_of_bad_input():
    groups = {c.group for c in robustness.CASES}
    assert groups == {"checkpoint", "packed", "arguments", "output", "data"}
    assert len(robustness.CASES) + len(robustness.FUZZ) >= 60
    assert len({c.name for c in robustness.CASES}) == len(robustness.CASES)


@pytest.mark.parametrize("case", robustness.CASES, ids=lambda c: c.name)
def test_refused_in_one_line(case, inputs, no_mount, tmp_path):
    if case.mount and no_mount:
        pytest.skip(no_mount)
    row = robustness.run_case(case, inputs, tmp_path / "case")
    assert row["outcome"] == "pass", f"{row['problems']}: {row['message']}"


def test_the_judge_catches_what_it_must():
    """A suite that cannot fail proves nothing: each rule of `judge` rejects its violation."""
    case = robustness.Case("x", "arguments", lambda w, i: [], r"bad bits")
    good = "faircalib quantize: error: bad bits; use --bits 4"
    assert robustness.judge(case, 2, good + "\n", []) == []
    assert "exit status 0" in robustness.judge(case, 0, good, [])
    assert "Python traceback" in robustness.judge(case, "traceback", good, [])
    assert "2 lines on stderr" in robustness.judge(case, 2, "usage: ...\n" + good, [])
    assert any("does not match" in p for p in robustness.judge(case, 2, "error: other", []))
    assert "message does not say what to do" in robustness.judge(case, 2, "bad bits", [])
    assert any("model-like" in p for p in robustness.judge(case, 2, good, ["q"]))


@pytest.mark.parametrize("fuzz", ["config", "header"])
def test_fuzzed_files_load_or_give_one_line(fuzz, tmp_path):
    run = robustness.fuzz_config if fuzz == "config" else robustness.fuzz_header
    row = run(tmp_path, examples=150)
    assert row["outcome"] == "pass", row["problems"]


def test_as_real_processes_with_results_files(tmp_path, no_mount):
    """Exit status and stderr of real processes (no in-process harness between the command
    and the check), and the benchmark's JSON and Markdown table."""
    names = ["arg-bits-not-a-number", "ckpt-header-claims-2^60", "data-not-utf8"]
    names += ["out-read-only-mount"] if not no_mount else []
    result = robustness.main(["--cases", ",".join(names), "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "robustness.json").read_text())
    assert sorted(r["case"] for r in on_disk["rows"]) == sorted(names)
    assert all(r["outcome"] == "pass" for r in result["rows"]), result["rows"]
    assert all(r["exit_status"] == 2 for r in result["rows"])  # argparse and FairCalibError
    assert on_disk["mode"] == "one process per case"
    assert {"command", "git_commit", "date", "deterministic"} <= set(on_disk["record"])
    table = (tmp_path / "robustness.md").read_text()
    assert "| ckpt-header-claims-2^60 | checkpoint | pass | 2 |" in table
    assert table.count("\n- ") == len(names)  # one command line per case


def test_index_paths_are_judged_by_name_so_hub_cache_symlinks_load(tmp_path, inputs):
    """A Hugging Face cache's snapshot holds symlinks into its blob store: they are inside the
    model directory by name and must load, while ../ and absolute names are refused."""
    from faircalib import hub

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in inputs.float_dir.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(blobs / f.name)
    assert hub.load(snapshot).vocab_size == 8192
