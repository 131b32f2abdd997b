"""Resumable calibration, atomic writes and determinism (issue 18) on the shipped mdlm-tiny.

The honest interruption is a real process killed with SIGKILL once its progress shows a finished
block; every method's resume is also checked in-process, interrupted (KeyboardInterrupt, as
SIGINT delivers it) right after a chosen block or inside FAIR-Calib's end-to-end stage.
"""

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from faircalib import hub
from faircalib.bench import deterministic, run_record
from faircalib.calib import METHOD_CONFIGS, quantize
from faircalib.calib import progress as progress_mod
from faircalib.calib.engine import quant_results
from faircalib.calib.progress import PartialRun, fingerprint, partial_dir
from faircalib.cli import main
from faircalib.config import CalibConfig, GPTQConfig, ReconConfig
from faircalib.errors import CheckpointError, ConfigError
from faircalib.models import save_model
from faircalib.models.io import atomic_directory

torch.set_num_threads(1)  # as the OMP_NUM_THREADS=1 subprocess: the same reduction order
SHARD = "model-00001-of-00001.safetensors"
# FAIR-Calib with every stage on (tracking, weighted GPTQ, block reconstruction against the
# float stream, end-to-end scales), shrunk to seconds
FAIR = [
    *("quantize", "mdlm-tiny", "--method", "fair", "--bits", "4", "--group-size", "64"),
    *("--nsamples", "4", "--seq-len", "32", "--fair-steps", "4", "--fair-prefix-len", "8"),
    *("--recon-steps", "4", "--e2e-steps", "4", "--json"),
]


@pytest.fixture(autouse=True)
def commit_every_block(monkeypatch):
    """Commit after every block, so that an interruption after block k leaves k + 1 blocks
    (deferred commits have their own test)."""
    monkeypatch.setattr(PartialRun, "COMMIT_EVERY_S", 0.0)
    monkeypatch.setenv("FAIRCALIB_COMMIT_EVERY_S", "0")


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / SHARD))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def kill_after_block(argv: list[str], partial: Path, block: int) -> int:
    """Run `faircalib ARGV` as its own process and SIGKILL it once `block` blocks are finished
    (read from its progress.json); returns how many were finished when it died."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "faircalib.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 120
    finished = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            finished = json.loads((partial / "progress.json").read_text())["finished_blocks"]
        except (OSError, ValueError, KeyError):  # not there yet, or mid-replace
            finished = 0
        if finished >= block:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    return finished


def test_sigkill_then_resume_is_bit_identical_and_deterministic(tmp_path, capsys):
    out, ref, again = tmp_path / "q", tmp_path / "ref", tmp_path / "again"
    finished = kill_after_block([*FAIR, "--out", str(out)], partial_dir(out), block=1)
    assert 1 <= finished < 4
    left = partial_dir(out)
    # nothing half-written: no output, nothing a loader starts from; progress in JSON and
    # safetensors only (no pickle)
    assert not out.exists() and not list(tmp_path.rglob("config.json"))
    assert {p.suffix for p in left.iterdir()} <= {".json", ".safetensors"}
    assert all(p.read_bytes()[:1] != b"\x80" for p in left.iterdir())  # pickle protocol 2+
    assert (left / "inputs.safetensors").exists()  # FAIR-Calib's tracked inputs are kept
    with pytest.raises(CheckpointError):
        hub.load(left)

    assert main([*FAIR, "--out", str(out)]) == 2  # progress is never discarded silently
    assert "pass --resume" in capsys.readouterr().err
    assert main([*FAIR, "--out", str(out), "--resume"]) == 0
    assert f"{finished} block(s) finished" in capsys.readouterr().err
    assert not left.exists()  # a successful finish removes the progress
    record = json.loads((out / "quantization.json").read_text())
    assert record["resumed_from_block"] == finished and record["deterministic"] is True

    assert main([*FAIR, "--out", str(ref)]) == 0
    assert main([*FAIR, "--out", str(again)]) == 0
    capsys.readouterr()
    assert_identical(tensors_of(ref), tensors_of(out))
    # the same command with the same seed: the same bytes
    assert (ref / SHARD).read_bytes() == (again / SHARD).read_bytes()


@pytest.fixture(scope="module")
def tiny():
    model = hub.load("mdlm-tiny")
    tokens = torch.randint(2, model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    return model, tokens


def method_config(method: str):
    knobs = {"bits": 8, "group_size": None} if method == "smoothquant" else {"group_size": 64}
    if method in ("fair", "recon"):
        knobs.update(steps=4, prefix_len=8, n_prompts=4, recon=ReconConfig(steps=4, e2e_steps=4))
    return METHOD_CONFIGS[method](**knobs)


def run(model, config, tokens, calib, directory: Path, *, resume: bool):
    """Quantize a copy of `model` keeping progress in `directory`; returns the copy."""
    q = copy.deepcopy(model)
    fp = fingerprint(q, config.to_dict(), calib.to_dict(), tokens)
    partial = PartialRun.open(directory, fp, resume=resume, overwrite=False)
    quantize(q, config, tokens, calib, progress=False, partial=partial)
    return q


def interrupt_after_block(monkeypatch, block: int) -> None:
    original = PartialRun.save_block

    def save_then_stop(self, i, *args, **kwargs):
        original(self, i, *args, **kwargs)
        if i == block:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartialRun, "save_block", save_then_stop)


def interrupt_e2e(monkeypatch) -> None:
    def stop(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("faircalib.calib.finetune_scales_e2e", stop)


def run_stopped_after_block(monkeypatch, block, model, config, tokens, calib, directory) -> None:
    """A fresh run into `directory`, interrupted right after `block` is saved."""
    with monkeypatch.context() as patch:
        interrupt_after_block(patch, block)
        with pytest.raises(KeyboardInterrupt):
            run(model, config, tokens, calib, directory, resume=False)


def assert_same_codes(ours: dict, theirs: dict) -> None:
    """Codes and scales of every layer: what the packed writer stores."""
    for name, result in ours.items():
        assert torch.equal(result.codes, theirs[name].codes), name
        assert torch.equal(result.qparams.scale, theirs[name].qparams.scale), name


@pytest.mark.parametrize(
    ("method", "where", "offload"),
    [
        ("rtn", 0, False),
        ("gptq", 2, False),
        ("gptq", 1, True),
        ("awq", 1, False),
        ("smoothquant", 2, False),
        ("recon", 1, False),
        ("fair", "e2e", False),  # every block finished; killed in the end-to-end stage
    ],
)
def test_resume_each_method_bit_identical(tiny, tmp_path, monkeypatch, method, where, offload):
    model, tokens = tiny
    config = method_config(method)
    calib = CalibConfig(n_samples=4, seq_len=32, offload=offload)
    reference = copy.deepcopy(model)
    quantize(reference, config, tokens, calib, progress=False)

    directory = tmp_path / "q.partial"
    with monkeypatch.context() as patch:
        if where == "e2e":
            interrupt_e2e(patch)
        else:
            interrupt_after_block(patch, where)
        with pytest.raises(KeyboardInterrupt):
            run(model, config, tokens, calib, directory, resume=False)
    state = json.loads((directory / "progress.json").read_text())
    assert state["finished_blocks"] == (4 if where == "e2e" else where + 1)

    resumed = run(model, config, tokens, calib, directory, resume=True)
    assert_identical(reference.state_dict(), resumed.state_dict())
    ours, theirs = quant_results(resumed), quant_results(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 16
    assert_same_codes(ours, theirs)


def test_resume_a_gaussian_family_with_fair_calib_bit_identical(tmp_path, monkeypatch):
    """planner-tiny (a Gaussian-latent family whose prior is an extra block stack, quantized
    again on resume rather than restored) with every FAIR-Calib stage on, interrupted after
    decoder block 0: the uninterrupted run's bits, prior included."""
    model = hub.load("planner-tiny")
    tokens = torch.randint(2, model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    config, calib = method_config("fair"), CalibConfig(n_samples=4, seq_len=32)
    config = dataclasses.replace(config, group_size=32)  # the prior is 64 wide
    reference = copy.deepcopy(model)
    quantize(reference, config, tokens, calib, progress=False)
    directory = tmp_path / "q.partial"
    run_stopped_after_block(monkeypatch, 0, model, config, tokens, calib, directory)
    state = json.loads((directory / "progress.json").read_text())
    assert state["finished_blocks"] == 1 and state["inputs"] is not None

    resumed = run(model, config, tokens, calib, directory, resume=True)
    assert_identical(reference.state_dict(), resumed.state_dict())
    ours, theirs = quant_results(resumed), quant_results(reference)
    assert ours.keys() == theirs.keys()
    assert {n.split(".")[0] for n in ours} == {"prior_blocks", "blocks"}
    assert_same_codes(ours, theirs)
    # and the weights did move: a resume that restored nothing would not pass for quantized
    assert not torch.equal(resumed.blocks[1].mlp[0].weight, model.blocks[1].mlp[0].weight)


def test_deferred_commits_lose_only_uncommitted_blocks_and_resume_exactly(
    tiny, tmp_path, monkeypatch
):
    model, tokens = tiny
    config, calib = method_config("gptq"), CalibConfig(n_samples=4, seq_len=32)
    reference = copy.deepcopy(model)
    quantize(reference, config, tokens, calib, progress=False)
    directory = tmp_path / "q.partial"
    monkeypatch.delenv("FAIRCALIB_COMMIT_EVERY_S", raising=False)  # it overrides
    monkeypatch.setattr(PartialRun, "COMMIT_EVERY_S", 1e9)  # nothing commits before the end
    run_stopped_after_block(monkeypatch, 2, model, config, tokens, calib, directory)
    state = json.loads((directory / "progress.json").read_text())
    assert state["finished_blocks"] == 0 and state["blocks"] == []
    assert not list(directory.glob("state-*"))  # no cache was written
    resumed = run(model, config, tokens, calib, directory, resume=True)
    assert_identical(reference.state_dict(), resumed.state_dict())


def test_a_deferred_commit_after_an_earlier_one_records_every_block_once(
    tiny, tmp_path, monkeypatch
):
    """Block 0 is committed; blocks 1 and 2 are committed together (the clock passed the
    interval at block 2); block 3 is interrupted before its commit. progress.json must then
    hold blocks 0..2 in order with the input cache of block 3, and resuming must give the
    uninterrupted result."""
    model, tokens = tiny
    config, calib = method_config("gptq"), CalibConfig(n_samples=4, seq_len=32)
    reference = copy.deepcopy(model)
    quantize(reference, config, tokens, calib, progress=False)
    directory = tmp_path / "q.partial"
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    monkeypatch.delenv("FAIRCALIB_COMMIT_EVERY_S", raising=False)  # it overrides
    monkeypatch.setattr(PartialRun, "COMMIT_EVERY_S", 10.0)
    clock = {0: 50.0, 1: 55.0, 2: 70.0}  # commits at blocks 0 and 2; block 1 waits for 2
    original = PartialRun.save_block

    def save(self, i, *args, **kwargs):
        now[0] = clock.get(i, 71.0)
        original(self, i, *args, **kwargs)
        if i == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(PartialRun, "save_block", save)
        with pytest.raises(KeyboardInterrupt):
            run(model, config, tokens, calib, directory, resume=False)
    state = json.loads((directory / "progress.json").read_text())
    assert state["finished_blocks"] == 3
    assert [entry["block"] for entry in state["blocks"]] == [0, 1, 2]
    assert sorted(p.name for p in directory.glob("state-*")) == ["state-00003.safetensors"]
    resumed = run(model, config, tokens, calib, directory, resume=True)
    assert_identical(reference.state_dict(), resumed.state_dict())


def test_bf16_progress_keeps_codes_not_weights_and_restores_exactly(tmp_path, monkeypatch):
    from llama_like_ckpt import write_family  # a bf16 family: LLaDA's layout, tiny

    model = hub.load(write_family(tmp_path / "llada", "llada"), dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    config, calib = GPTQConfig(group_size=32), CalibConfig(n_samples=4, seq_len=32)
    reference = copy.deepcopy(model)
    quantize(reference, config, tokens, calib, progress=False)
    directory = tmp_path / "q.partial"
    run_stopped_after_block(monkeypatch, 1, model, config, tokens, calib, directory)
    saved = load_file(str(directory / "block-00000.safetensors"))
    assert saved and not [k for k in saved if k.endswith(".weight")]  # decode + bf16 is exact
    resumed = run(model, config, tokens, calib, directory, resume=True)
    assert_identical(reference.state_dict(), resumed.state_dict())
    assert {v.dtype for k, v in resumed.state_dict().items() if "q_proj" in k} == {torch.bfloat16}


def test_resume_refuses_a_different_run(tiny, tmp_path, monkeypatch):
    model, tokens = tiny
    config, calib = method_config("gptq"), CalibConfig(n_samples=4, seq_len=32)
    directory = tmp_path / "q.partial"
    run_stopped_after_block(monkeypatch, 0, model, config, tokens, calib, directory)
    other_tokens = tokens.flip(0)
    with pytest.raises(ConfigError, match=r"different run \(calibration data changed\)"):
        run(model, config, other_tokens, calib, directory, resume=True)
    other_model = copy.deepcopy(model)
    with torch.no_grad():
        other_model.blocks[3].mlp[2].weight[0, 0] += 1e-3
    with pytest.raises(ConfigError, match=r"different run \(model weights changed\)"):
        run(other_model, config, tokens, calib, directory, resume=True)
    with pytest.raises(ConfigError, match=r"\(method config changed\)"):
        run(model, method_config("rtn"), tokens, calib, directory, resume=True)
    monkeypatch.setattr(progress_mod, "code_digest", lambda: "another version")
    with pytest.raises(ConfigError, match=r"\(faircalib code changed\)"):
        run(model, config, tokens, calib, directory, resume=True)


def test_interrupted_save_leaves_nothing_a_loader_accepts(tmp_path, monkeypatch):
    model = hub.load("mdlm-tiny")
    out = tmp_path / "m"

    def die(*_args, **_kwargs):
        raise KeyboardInterrupt

    # killed between the weights and the config: the temporary directory is removed
    monkeypatch.setattr("faircalib.models.io.write_extra_files", die)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, out, extra_files={"note.txt": "x"})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    # a SIGKILL cannot clean up: what it leaves has no config.json (written last), so no
    # loader accepts it, and the next save into the same place removes it
    stale = tmp_path / ".m.tmp-999999999-abc"
    stale.mkdir()
    (stale / SHARD).write_bytes((hub.ASSETS / "models" / "mdlm-tiny" / SHARD).read_bytes())
    with pytest.raises(CheckpointError, match="config.json is missing"):
        hub.load(stale)
    save_model(model, out)
    assert not stale.exists() and hub.load(out) is not None


def test_atomic_directory_replaces_only_when_complete(tmp_path):
    out = tmp_path / "d"
    with atomic_directory(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("killed mid-write")
    assert (out / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_run_record_says_whether_the_run_was_deterministic():
    assert deterministic("cpu") is True
    assert run_record(["x"])["deterministic"] is (
        deterministic() if torch.cuda.is_available() else True
    )
    flags = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic)
    benchmark = torch.backends.cudnn.benchmark
    try:
        torch.use_deterministic_algorithms(False)
        assert deterministic("cuda") is False  # torch's default on a GPU
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        assert deterministic("cuda") is True
        torch.backends.cudnn.benchmark = True  # the autotuner picks kernels by timing
        assert deterministic("cuda") is False
    finally:
        torch.use_deterministic_algorithms(flags[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[1], benchmark


def test_git_state_names_the_commit_and_flags_files_that_differ_from_it(tmp_path):
    """A tree whose tracked files differ from HEAD (edited here, or a copy carrying an older
    history, as the GPU machine's once did) is recorded as dirty, not as HEAD's commit alone."""
    import shutil

    from faircalib.bench import git_state

    if shutil.which("git") is None:
        pytest.skip("no git")
    assert git_state(tmp_path) == ("", False)  # not a checkout
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_COMMITTER_EMAIL": "t@t", "HOME": str(tmp_path), "PATH": os.environ["PATH"]}

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        return done.stdout.strip()

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert len(head) == 40 and git_state(tmp_path) == (head, False)
    (tmp_path / "untracked.txt").write_text("not part of the tree\n")
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == (head, True)
