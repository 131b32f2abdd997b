"""benchmarks/seed_table.py --merge: a later run replaces only the rows it measured.

The old table is a real smoke run rewritten in the format of files written before rows carried
records (as the committed GPU table is); the merged file is checked against that file's own
bytes: kept rows equal field for field, their record the old file's record; the replacing row
is the model measured now (its fingerprint is the weight files', not the old row's)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark
from faircalib import hub
from faircalib.training import directory_fingerprint

ROOT = Path(__file__).parents[1]
COMMITTED = ROOT / "benchmarks/results/seed-table/seed_table.json"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    script = load_benchmark("seed_table")
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    script.main(["--smoke", "--out", str(first), "--model", "mdlm-tiny"])
    # the old format: no per-row record; a second row that the merge must replace
    old = json.loads((first / "seed_table.json").read_text())
    kept = old["rows"][0]
    del kept["record"]
    old["rows"].append({**json.loads(json.dumps(kept)), "name": "replaced"})
    legacy = first / "legacy.json"
    legacy.write_text(json.dumps(old, indent=2) + "\n")
    argv = ["--smoke", "--out", str(second), "--merge", str(legacy), "--skip-missing"]
    # "mdlm-tiny" is not run now (missing directory): it must not erase the measured row; one
    # model is measured (CPU time), "added" is appended as not run
    argv += ["--model", "mdlm-tiny=/nonexistent/mdlm-tiny", "--model", "replaced=diffusionlm-tiny"]
    argv += ["--model", "added=/nonexistent/added"]
    result = script.main(argv)
    saved = json.loads((second / "seed_table.json").read_text())
    return old, result, saved, second


def test_kept_rows_are_unchanged_and_take_the_file_record(merged):
    old, _, saved, _ = merged
    assert [r["name"] for r in saved["rows"]] == ["mdlm-tiny", "replaced", "added"]
    kept = dict(saved["rows"][0])
    record = kept.pop("record")
    # numbers, evaluation records, fingerprint: byte for byte the old file's
    assert json.dumps(kept, sort_keys=True) == json.dumps(old["rows"][0], sort_keys=True)
    assert record == {**old["record"], "config": old["config"], "inherited": True}
    assert saved["merged_from"]["record"] == old["record"]


def test_new_rows_replace_same_named_ones_and_carry_this_run(merged):
    old, result, saved, _ = merged
    replaced, added = saved["rows"][1], saved["rows"][2]
    assert replaced["family"] == "diffusion_lm" and "columns" not in added
    fingerprint = directory_fingerprint(hub.resolve("diffusionlm-tiny"))
    assert replaced["weight_fingerprint_sha256"] == fingerprint
    assert fingerprint != old["rows"][1]["weight_fingerprint_sha256"]
    for row in (replaced, added):
        assert row["record"]["command"] == saved["record"]["command"]
        assert row["record"]["config"]["merge"] is not None and "inherited" not in row["record"]
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))


def test_markdown_is_rendered_from_the_merged_rows(merged):
    old, _, saved, out = merged
    md = (out / "seed_table.md").read_text()
    for row in saved["rows"][:2]:
        ppl = row["columns"]["float"]["ppl"]
        assert f"| {row['name']} | {row['family']} |" in md and f"{ppl:.2f}" in md
    assert f"| mdlm-tiny | `{old['record']['git_commit']}` |" in md
    assert "| added | - | - | not run" in md
    if importlib.util.find_spec("matplotlib"):  # the plot is optional, like matplotlib
        assert (out / "degradation.png").stat().st_size > 0


def test_the_committed_table_loads_for_a_merge():
    """Whatever the committed table holds (rows with or without their own records), a merge of
    the two Gaussian rows keeps every other row, its place, its numbers and its record."""
    script = load_benchmark("seed_table")
    committed = json.loads(COMMITTED.read_text())
    previous = script.load_previous(COMMITTED)
    gaussian = {"diffusionlm-base": {"name": "diffusionlm-base", "columns": {}}}
    gaussian["planner-small"] = {"name": "planner-small", "columns": {}}
    rows = script.merge_rows(previous["rows"], list(gaussian.values()))
    assert [r["name"] for r in rows][: len(committed["rows"])] == [
        r["name"] for r in committed["rows"]
    ]
    for before, after in zip(committed["rows"], rows, strict=False):
        if before["name"] in gaussian:
            assert after == gaussian[before["name"]]
            continue
        before, after = dict(before), dict(after)
        own, record = before.pop("record", None), after.pop("record")
        assert after == before
        if own is not None:  # a row measured by a later run keeps its own record
            assert record == own
        else:  # a row of the first table takes the file's record and config
            assert record["git_commit"] == committed["record"]["git_commit"]
            assert record["config"] == committed["config"]


def test_smoke_rows_never_merge_into_a_real_table(tmp_path):
    script = load_benchmark("seed_table")
    with pytest.raises(SystemExit, match="smoke"):
        script.main(["--smoke", "--out", str(tmp_path), "--merge", str(COMMITTED)])


class Parsed(Exception):
    """Raised by the patched parse_args once the command line parsed."""


def test_the_lease_table_line_merges_the_two_families_into_the_committed_rows(
    tmp_path, monkeypatch
):
    env = {**os.environ, "RUNS": str(tmp_path / "runs"), "MERGE_FAMILIES": "1"}
    done = subprocess.run(
        ["bash", "scripts/gpu_seed_table.sh", "print", "table"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    words = shlex.split(done.stdout)
    assert words[:2] == ["python3", "benchmarks/seed_table.py"]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed) as stop:
        load_benchmark("seed_table").main(words[2:])
    args = stop.value.args[0]
    assert (ROOT / args.merge).resolve() == COMMITTED.resolve()
    # the names measured are the committed rows they must replace (not append beside)
    names = [spec.partition("=")[0] for spec in args.model]
    committed = [r["name"] for r in json.loads(COMMITTED.read_text())["rows"]]
    assert names == ["diffusionlm-base", "planner-small"] and set(names) <= set(committed)
    # the evaluation settings of the committed run: the merged rows stay comparable
    old = json.loads(COMMITTED.read_text())["config"]
    assert all(getattr(args, k) == old[k] for k in ("nsamples", "limit", "mc_samples"))
    assert args.fair_preset == old["fair_preset"] and not args.smoke


def test_families_picks_the_models_the_lease_trains_and_measures(tmp_path):
    def table_line(families: str | None) -> subprocess.CompletedProcess:
        env = {**os.environ, "RUNS": str(tmp_path), "MERGE_FAMILIES": "1"}
        if families is not None:
            env["FAMILIES"] = families
        return subprocess.run(
            ["bash", "scripts/gpu_seed_table.sh", "print", "table"],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip

    words = shlex.split(table_line("diffusionlm-base").stdout)
    models = [words[i + 1] for i, w in enumerate(words) if w == "--model"]
    assert models == [f"diffusionlm-base={tmp_path}/diffusionlm-base"] and "--merge" in words
    bad = table_line("mdlm-base")  # not a Gaussian family: refused before anything runs
    assert bad.returncode == 2 and "FAMILIES" in bad.stderr and not bad.stdout


@pytest.mark.parametrize("content", [None, "[1, 2]", "{not json", '{"rows": []}'])
def test_a_bad_merge_file_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / "seed_table.json"
    if content is not None:
        path.write_text(content)
    script = load_benchmark("seed_table")
    with pytest.raises(SystemExit) as stop:
        script.load_previous(path)
    message = str(stop.value)
    assert message.startswith(f"--merge {path}:") and "\n" not in message
