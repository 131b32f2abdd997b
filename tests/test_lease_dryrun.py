"""The GPU lease scripts' command lines still parse on the CLIs they call.

A flag that a script passes but its CLI no longer accepts only shows on the GPU, minutes into a
30-minute lease. Here every `benchmarks/run_gpu.sh` job line and every training line of
`scripts/gpu_seed_table.sh` is printed by the script itself (its `print` phase) and handed to
the real argument parser of the program it runs; parsing stops there, nothing is run.
The GPU-only tests at the end run the issue-16 jobs' CUDA branches at their smallest size; the
`cudatests` job runs them before the long jobs are started.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN_GPU = ROOT / "benchmarks" / "run_gpu.sh"
SEED_TABLE = ROOT / "scripts" / "gpu_seed_table.sh"
# a pytest run and a shell script (benchmarks/torchrun_check.sh, which runs the CLI under
# torchrun; test_distributed.py::test_torchrun_quantize_writes_the_single_process_model checks
# the same property on gloo), not our parsers
NOT_ARGPARSE = {"cudatests", "cudatests-k", "torchrun"}
# issue 16: the backends and the dLLM layer shapes (in, out) the kernel sweep must cover
ISSUE16_BACKENDS = {"fp8_w8a8", "int8_w8a8", "w4a8", "w4a8_fp8", "auto_w4"}
ISSUE16_SHAPES = {(4096, 12288), (12288, 4096), (3584, 18944), (18944, 3584), (3584, 512)}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only paths (cudatests job)")


class Parsed(Exception):
    """Raised by the patched parse_args once the command line parsed."""


def run_gpu_jobs() -> list[str]:
    """The job names of run_gpu.sh's job_command (its case labels), read from the script."""
    body = RUN_GPU.read_text().split("job_command() {", 1)[1].split("\n}\n", 1)[0]
    labels = re.findall(r"^  ([a-z0-9|-]+)\)", body, flags=re.M)
    return [name for label in labels for name in label.split("|")]


def printed(script: Path, *args: str, tmp: Path) -> str:
    env = {**os.environ, "RES": str(tmp / "res"), "RUNS": str(tmp / "runs")}
    env["PIECES"], env["CARRY"] = str(tmp / "pieces"), str(tmp / "carry")
    done = subprocess.run(
        ["bash", str(script), "print", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def python_argv(command: str) -> list[str]:
    """The argv after `python3` of the python3 invocation inside a (compound) job line."""
    words = shlex.split(command.replace(";", " ; "))
    start = words.index("python3")
    end = words.index(";", start) if ";" in words[start:] else len(words)
    return [w for w in words[start + 1 : end] if w not in (">", "2>&1")]


def parse_only(monkeypatch, argv: list[str]) -> argparse.Namespace:
    """Run the program's own entry point until its parser returns, then stop."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    with pytest.raises(Parsed) as stop:
        if argv[0] == "-m":
            from faircalib import cli

            # faircalib.cli and `python -m faircalib.commands.train` share the train parser
            rest = argv[2:] if argv[1] == "faircalib.cli" else ["train", *argv[2:]]
            cli.main(rest)
        else:
            load_script(argv[0], monkeypatch).main(argv[1:])
    return stop.value.args[0]


def load_script(path: str, monkeypatch):
    """A benchmarks/ script as a module (registered: dataclasses look their module up)."""
    name = f"lease_job_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def test_the_job_list_is_read():
    jobs = run_gpu_jobs()
    assert {"bench-act", "w4a4", "kernels", "e2e", "profile-step", "llada-fair-fast"} <= set(jobs)


@pytest.mark.parametrize("job", sorted(set(run_gpu_jobs()) - NOT_ARGPARSE))
def test_run_gpu_job_parses(job, tmp_path, monkeypatch):
    command = printed(RUN_GPU, job, tmp=tmp_path)
    args = parse_only(monkeypatch, python_argv(command))
    # every job writes into $RES/<job>: what `run_gpu.sh wait` tars up and brings back
    assert getattr(args, "out", None) == str(tmp_path / "res" / job)
    # the device tool returns only names of letters, digits, '.', '_' and '-'
    assert re.fullmatch(r"[A-Za-z0-9._-]+", f"{job}.tgz")


@pytest.mark.parametrize(
    "preset,batch,lr", [("mdlm-base", "128", "6e-4"), ("diffusionlm-base", "128", "1e-3"),
                        ("planner-small", "64", "1e-3")]
)  # fmt: skip
def test_seed_table_training_line_parses(preset, batch, lr, tmp_path, monkeypatch):
    command = printed(SEED_TABLE, preset, batch, lr, "480", "/x/tokens.npy", tmp=tmp_path)
    args = parse_only(monkeypatch, python_argv(command))
    assert (args.preset, args.batch_size, args.lr) == (preset, int(batch), float(lr))
    assert args.compile and args.time_budget == 480 and args.token_cache == "/x/tokens.npy"
    # the table phase reads $RUNS/<preset>/train_log.json: the model goes to $RUNS/<preset>
    assert args.out == str(tmp_path / "runs" / preset)


def test_diffusion_lm_size_sweep_lines_parse(tmp_path, monkeypatch):
    """`gpu_seed_table.sh sizes`: every DLM_SIZES arm becomes a pilot line its parser takes,
    with the arm's size and learning rate; a malformed arm is refused before anything runs."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts" / "pilots"))  # the pilot's own imports
    monkeypatch.setenv("DLM_SIZES", "2x128@1e-3 12x768@3e-4")
    lines = printed(SEED_TABLE, "sizes", tmp=tmp_path).strip().splitlines()
    parsed = [parse_only(monkeypatch, python_argv(line.replace("\\", ""))) for line in lines]
    got = [(a.arm, a.blocks, a.hidden, a.lr, a.batch, a.device) for a in parsed]
    assert got == [("pert", 2, 128, 1e-3, 256, "cuda"), ("pert", 12, 768, 3e-4, 256, "cuda")]
    monkeypatch.setenv("DLM_SIZES", "12x768")  # no learning rate
    done = subprocess.run(
        ["bash", str(SEED_TABLE), "print", "sizes"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode != 0 and "BLOCKSxHIDDEN@LR" in done.stderr


def test_diffusion_lm_grid_lines_parse_and_the_pick_takes_the_lowest_bound(tmp_path, monkeypatch):
    """`gpu_seed_table.sh grid`: every DLM_GRID arm is a `faircalib train` line of the real
    preset at that depth, width (64-wide heads) and rate, in its own directory; `pick`'s summary
    chooses the finished arm with the lowest final held-out bound and never an unfinished one."""
    monkeypatch.setenv("DLM_GRID", "4x256@1e-3 8x512@3e-4")
    lines = printed(SEED_TABLE, "grid", tmp=tmp_path).strip().splitlines()
    parsed = [parse_only(monkeypatch, python_argv(line.replace("\\", ""))) for line in lines]
    got = [(a.preset, a.n_blocks, a.hidden_dim, a.n_heads, a.lr, Path(a.out).name) for a in parsed]
    assert got == [
        ("diffusionlm-base", 4, 256, 4, 1e-3, "dlm-4x256-1e-3"),
        ("diffusionlm-base", 8, 512, 8, 3e-4, "dlm-8x512-3e-4"),
    ]
    # an arm's own options (+name[=value]) reach its line only, and name its directory
    monkeypatch.setenv("DLM_GRID", "4x256@2e-3 4x256@2e-3+time-warp=64+embed-dim=16")
    lines = printed(SEED_TABLE, "grid", tmp=tmp_path).strip().splitlines()
    plain, warped = [parse_only(monkeypatch, python_argv(x.replace("\\", ""))) for x in lines]
    assert (plain.time_warp, plain.embed_dim, warped.time_warp, warped.embed_dim) == (
        None,
        None,
        64,
        16,
    )
    assert Path(warped.out).name == "dlm-4x256-2e-3-time-warp64-embed-dim16" != Path(plain.out).name
    assert warped.lr == plain.lr == 2e-3
    monkeypatch.setenv("DLM_GRID", "4x256@2e-3+warp=x")  # a value that is not a number
    done = subprocess.run(
        ["bash", str(SEED_TABLE), "print", "grid"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode != 0 and "BLOCKSxHIDDEN@LR" in done.stderr
    pick = load_script("scripts/grid_pick.py", monkeypatch)
    for name, bound in [("nan", float("nan")), ("a", 6.2), ("b", 5.9), ("c", 7.1)]:
        (tmp_path / name).mkdir()
        log = dict.fromkeys(pick.KEYS, 1) | {"final_val_nelbo_per_token": bound}
        (tmp_path / name / "train_log.json").write_text(json.dumps(log | {"config": {}, "log": []}))
    floored = json.loads((tmp_path / "c" / "train_log.json").read_text())
    floored["val_unigram_nats_per_token"] = 7.25  # records since 2026-11-30 carry the floor
    (tmp_path / "c" / "train_log.json").write_text(json.dumps(floored))
    result = pick.summarise(tmp_path, ["nan", "a", "b", "c", "unfinished"])  # NaN: diverged
    assert result["picked"] == "b" and "error" in result["arms"]["unfinished"]
    assert result["arms"]["c"]["val_unigram_nats_per_token"] == 7.25
    assert result["arms"]["a"]["val_unigram_nats_per_token"] is None  # an older record
    assert pick.summarise(tmp_path, ["unfinished"])["picked"] is None
    assert pick.summarise(tmp_path, ["nan"])["picked"] is None


def test_trainer_ablation_lines_parse_with_one_piece_of_the_loop_each(tmp_path, monkeypatch):
    """`gpu_seed_table.sh ablate`: the pilot arms turn on exactly their piece of the old trainer
    loop on the trainer's model (no bias, bf16); the trainer arms run at the pilot's size and
    length at a constant rate: as it trains now (eager and compiled) and with the old pieces."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts" / "pilots"))
    monkeypatch.setenv("ABLATE_ARMS", "ref fused compile trainer-draws all trainer-old")
    lines = printed(SEED_TABLE, "ablate", tmp=tmp_path).strip().splitlines()
    argvs = [python_argv(line.replace("\\", "")) for line in lines]
    *pilots, old = [parse_only(monkeypatch, argv) for argv in argvs]
    pieces = [(a.fused, a.compile, a.trainer_draws) for a in pilots]
    assert pieces == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
    assert all(
        a.no_bias and a.bf16 and (a.blocks, a.hidden, a.lr) == (2, 128, 1e-3) for a in pilots
    )
    assert not old.compile and old.fused_adam and old.device_draws
    monkeypatch.setenv("ABLATE_ARMS", "trainer trainer-compile")
    lines = printed(SEED_TABLE, "ablate", tmp=tmp_path).strip().splitlines()
    eager, compiled = [parse_only(monkeypatch, python_argv(x.replace("\\", ""))) for x in lines]
    assert (eager.compile, compiled.compile) == (False, True)
    for trainer in (eager, compiled, old):
        assert trainer.min_lr_ratio == 1 and trainer.seq_len == 64
        assert (trainer.n_blocks, trainer.hidden_dim, trainer.n_heads) == (2, 128, 4)
        assert trainer.lr == 1e-3
    assert not (eager.fused_adam or eager.device_draws or compiled.fused_adam)
    assert len({t.out for t in (eager, compiled, old)}) == 3  # each arm its own directory
    monkeypatch.setenv("ABLATE_ARMS", "ref nonsense")
    done = subprocess.run(
        ["bash", str(SEED_TABLE), "print", "ablate"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode != 0 and "unknown arm 'nonsense'" in done.stderr


def test_kernel_sweep_covers_the_dllm_shapes(monkeypatch):
    kernels = load_script("benchmarks/kernels.py", monkeypatch)
    assert set(kernels.SHAPES) >= ISSUE16_SHAPES


# --- GPU-only branches of the issue-16 jobs, at the smallest size (run by the cudatests job
# before the long jobs: their --smoke runs on the CPU and never enters these branches) ---------
@cuda
def test_kernel_sweep_runs_every_gpu_backend_correctly(tmp_path, monkeypatch):
    kernels = load_script("benchmarks/kernels.py", monkeypatch)
    monkeypatch.setattr(kernels, "SHAPES", [(3584, 512)])  # the smallest of the real shapes
    result = kernels.main(["--out", str(tmp_path), "--ms", "1,256", "--min-seconds", "0.001"])
    rows = [r for r in result["rows"] if r["backend"] in ISSUE16_BACKENDS]
    assert {r["backend"] for r in rows} == ISSUE16_BACKENDS
    # the sweep records a crashing backend as a skipped row and goes on: fail on it here; the
    # others are checked against a float64 matmul of their own operands (the script's check)
    failed = [
        (r["backend"], r["M"], r.get("rel_err"), r.get("skipped"))
        for r in rows
        if not r.get("correct")
    ]
    assert not failed
    assert {p.name for p in tmp_path.iterdir()} >= {"kernels.json", "kernels.md", "kernels.png"}


@cuda
def test_e2e_step_runs_one_real_llada_block(tmp_path, monkeypatch):
    e2e = load_script("benchmarks/e2e.py", monkeypatch)
    argv = ["--out", str(tmp_path), "--blocks", "1", "--batches", "1", "--repeats", "1"]
    result = e2e.main(argv)
    for variant in result["variants"].values():
        assert variant["batches"]["1"]["per_block_ms"] > 0
    assert (tmp_path / "e2e.json").is_file() and (tmp_path / "e2e.md").is_file()


@cuda
def test_profile_step_runs_one_real_llada_block(tmp_path, monkeypatch):
    profile_step = load_script("benchmarks/profile_step.py", monkeypatch)
    argv = ["--blocks", "1", "--seq-len", "64", "--warmup", "1", "--reps", "1"]
    argv += ["--profile-steps", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    result = profile_step.main(argv)
    assert set(result["variants"]) == {"bf16", "packed", "packed-cast"}
    assert all(v["step_ms"] > 0 for v in result["variants"].values())
