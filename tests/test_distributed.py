"""Data parallelism through torch.distributed: two gloo ranks on the CPU against one process.

One spawn of two ranks runs every scenario (process start-up dominates the cost); each rank
saves what it computed and the test compares, in this process, with the single-process run.
Every run uses one thread, so matrix products sum in the same order in both.
"""

from __future__ import annotations

import copy
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from faircalib import distributed, hub
from faircalib.calib import engine, fair, quantize
from faircalib.calib.engine import quant_results
from faircalib.config import (
    AWQConfig,
    CalibConfig,
    FairCalibConfig,
    GPTQConfig,
    ReconConfig,
    RTNConfig,
    SmoothQuantConfig,
)
from faircalib.errors import DataError
from faircalib.eval import likelihood_bound
from faircalib.quant.stats import LayerInputsAccumulator

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
N, SEQ = 40, 32  # 40 calibration rows = three engine batches (16, 16, 8): uneven on 2 ranks
TRACK_BATCH = 8  # FAIR-Calib's 20 tracked prompts in three sampler runs
CALIB = CalibConfig(n_samples=N, seq_len=SEQ, max_rows_per_layer=100)  # the sample is cut
FAIR = dict(bits=3, group_size=32, n_prompts=N, steps=4, prefix_len=8)
METHODS = {
    "rtn": RTNConfig(bits=4, group_size=32),
    "gptq": GPTQConfig(bits=3, group_size=32),
    "awq": AWQConfig(bits=3, group_size=32),
    "smoothquant": SmoothQuantConfig(),
    "fair_fast": FairCalibConfig(**FAIR, preset="fast"),
    "fair_full": FairCalibConfig(**FAIR, recon=ReconConfig(steps=4, e2e_steps=4, eval_every=2)),
}
QUANTIZE = ["quantize", "mdlm-tiny", "--method", "gptq", "--bits", "3", "--group-size", "32"]
QUANTIZE += ["--nsamples", str(N), "--seq-len", str(SEQ), "--json"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def inputs() -> tuple:
    """mdlm-tiny cut to two blocks, random calibration tokens [N, SEQ] and evaluation
    sequences [20, SEQ] (equality needs neither depth nor real text, and both cost seconds)."""
    model = hub.load("mdlm-tiny")
    model.blocks = torch.nn.ModuleList(model.blocks[:2])
    ids = torch.randint(
        0, model.vocab_size, (N + 20, SEQ), generator=torch.Generator().manual_seed(0)
    )
    ids[ids == model.mask_id] = 0
    return model, ids[:N], ids[N:], 20 * SEQ * 4


def run_methods(model, tokens) -> dict:
    """Quantized weights and codes plus the report of every method (as this process sees it)."""
    fair.TRACK_BATCH = TRACK_BATCH
    out = {}
    for name, cfg in METHODS.items():
        q = copy.deepcopy(model)
        report = quantize(q, cfg, tokens, CALIB, progress=False)
        results = quant_results(q)
        out[name] = {
            "weights": {k: r.weight for k, r in results.items()},
            "codes": {k: r.codes for k, r in results.items()},
            "layers": [{k: v for k, v in row.items() if k != "seconds"} for row in report.layers],
            "recon": report.recon,
        }
    return out


def run_cli(argv: list[str]) -> dict:
    """cli.main(argv) with stdout and stderr captured: exit code and both texts."""
    from faircalib.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = stdout, stderr
    try:
        code = main(argv)
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


EVAL = ["eval", "mdlm-tiny", "--seq-len", str(SEQ), "--limit", "20", "--mc-samples", "2"]
EVAL += ["--batch-size", "4", "--json"]


def rank_main(rank: int, ports: list[int], tmp: str) -> None:
    """One of two ranks: the library calls in one process group, then the CLI as torchrun
    would start it (environment variables), a bad input included."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=2
    )
    model, tokens, seqs, n_bytes = inputs()
    out = run_methods(model, tokens)
    out["bound"] = likelihood_bound(model, seqs, n_bytes, mc_samples=2, batch_size=4).to_dict()
    out["shard"] = distributed.shard(list(range(5)))
    torch.save(out, Path(tmp) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    captured = {}
    for case, argv, port in (
        ("eval", EVAL, ports[1]),
        ("bad", [*QUANTIZE, "--bits", "9", "--out", f"{tmp}/never"], ports[2]),
        ("device", [*QUANTIZE, "--device", "cuda:1", "--out", f"{tmp}/never"], ports[3]),
    ):
        os.environ["MASTER_PORT"] = str(port)
        captured[case] = run_cli(argv)
    # last: rank 1 fails while rank 0 waits for it in a collective; its exit (below) breaks
    # rank 0's collective, which then ends quietly
    os.environ["MASTER_PORT"] = str(ports[4])
    if rank == 1:
        engine._quantize_linear = fail_on_rank_1
    captured["one_fails"] = run_cli([*QUANTIZE, "--out", f"{tmp}/never"])
    (Path(tmp) / f"cli{rank}.json").write_text(json.dumps(captured))


def fail_on_rank_1(*args, **kwargs):
    raise DataError("a failure on rank 1 alone")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, list[dict], list[dict]]:
    tmp = tmp_path_factory.mktemp("ranks")
    mp.spawn(rank_main, args=([free_port() for _ in range(5)], str(tmp)), nprocs=2)
    model, tokens, seqs, n_bytes = inputs()
    single = run_methods(model, tokens)
    single["bound"] = likelihood_bound(model, seqs, n_bytes, mc_samples=2, batch_size=4).to_dict()
    single["eval"] = run_cli(EVAL)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    cli = [json.loads((tmp / f"cli{r}.json").read_text()) for r in range(2)]
    return single, ranks, cli


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "smoothquant", "fair_fast"])
def test_two_ranks_quantize_bit_identically_to_one_process(two_ranks, method):
    single, ranks, _ = two_ranks
    for rank in ranks:
        assert same(rank[method]["codes"], single[method]["codes"])
        assert same(rank[method]["weights"], single[method]["weights"])
        # the layer table reads the statistics (Hessian, sample) the ranks reduced
        assert rank[method]["layers"] == single[method]["layers"]


def test_fair_calib_with_reconstruction_gives_every_rank_the_same_model(two_ranks):
    single, ranks, _ = two_ranks
    a, b = ranks[0]["fair_full"], ranks[1]["fair_full"]
    assert same(a["codes"], b["codes"]) and same(a["weights"], b["weights"])
    assert a["recon"] == b["recon"]
    blocks = [log for log in a["recon"] if log["block"] != "e2e"]
    assert len(blocks) == 2 and a["recon"][-1]["block"] == "e2e"
    for log in a["recon"]:  # the best held-out step is kept, so never worse than the start
        assert log["best_val"] <= log["initial_val"]
    # data-parallel minibatches are not one process's draws, so the models differ; the first
    # block starts from the same weighted GPTQ and the held-out loss is summed over ranks
    first = single["fair_full"]["recon"][0]["initial_val"]
    assert a["recon"][0]["initial_val"] == pytest.approx(first, rel=1e-6)


def test_the_likelihood_bound_is_bit_identical_on_two_ranks(two_ranks):
    single, ranks, _ = two_ranks
    assert ranks[0]["bound"] == ranks[1]["bound"] == single["bound"]
    assert ranks[0]["shard"] == [0, 2, 4] and ranks[1]["shard"] == [1, 3]


def test_cli_under_two_ranks_prints_once_and_errors_in_one_line(two_ranks):
    single, _, cli = two_ranks
    assert cli[0]["eval"]["code"] == cli[1]["eval"]["code"] == 0
    assert cli[1]["eval"]["stdout"] == "" and cli[1]["eval"]["stderr"] == ""
    two, one = json.loads(cli[0]["eval"]["stdout"]), json.loads(single["eval"]["stdout"])
    for key in ("ppl", "nll_per_token", "bits_per_byte", "ci95", "tokens", "sequences"):
        assert two[key] == one[key], key  # bit-identical, as the library call above
    assert cli[0]["bad"]["code"] == cli[1]["bad"]["code"] == 2
    for case in ("bad", "device"):  # both ranks meet the bad input; one of them says so
        lines = (cli[0][case]["stderr"] + cli[1][case]["stderr"]).splitlines()
        assert len(lines) == 1 and lines[0].startswith("faircalib quantize: error:"), lines
        assert cli[0][case]["stdout"] == cli[1][case]["stdout"] == ""
    assert "pass --device cuda" in cli[0]["device"]["stderr"] + cli[1]["device"]["stderr"]
    one_fails = [c["one_fails"] for c in cli]
    assert (one_fails[0]["code"], one_fails[1]["code"]) == (1, 2)
    assert one_fails[0]["stderr"] == one_fails[0]["stdout"] == ""
    assert one_fails[1]["stderr"] == (
        "faircalib quantize: error: a failure on rank 1 alone (rank 1)\n"
    )


def test_without_a_process_group_every_helper_is_the_identity():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    x = torch.arange(5.0)
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.all_reduce_sum(x) is x and distributed.sum_float(2.5) == 2.5
    assert distributed.all_gather(x, x)[0] is x
    assert distributed.broadcast_tree({"a": x}, 0, "cpu")["a"] is x
    assert distributed.owners([1.0, 5.0, 2.0]) == [0, 0, 0]


def test_owners_put_the_longest_jobs_on_different_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert distributed.owners([1.0, 5.0, 2.0, 2.0]) == [1, 0, 1, 1]


def test_folding_pruned_candidates_gives_the_streaming_sample():
    """The exchange's sample merge, without processes: each batch offers only the rows whose
    keys can still make the bottom k, and the fold gives what adding every row gives."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(60, 8, generator=gen) for _ in range(5)]
    weights = [torch.rand(60, generator=gen).round() for _ in range(5)]  # half are zero
    whole, pruned = (LayerInputsAccumulator(8, 25, seed=3, device="cpu") for _ in range(2))
    for x, w in zip(batches, weights, strict=True):
        whole.add(x, w)
        summary = pruned.summarise(x, w)
        keys, rows, kept = summary.candidates(pruned.draw_keys(summary.n_rows), limit=25)
        assert len(keys) == 25  # 30-odd rows of positive weight, pruned to the 25 smallest
        pruned.fold(summary, keys, rows, kept)
    a, b = whole.finish(), pruned.finish()
    for field in ("hessian", "sample", "sample_weights", "act_absmax", "act_absmean", "mean"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_torchrun_quantize_writes_the_single_process_model(tmp_path):
    """`torchrun --nproc-per-node 2 -m faircalib.cli quantize ...` end to end: one JSON line on
    stdout, and the written model equals one process's, bit for bit."""
    from safetensors.torch import load_file

    from faircalib.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "faircalib.cli"]
    cmd += [*QUANTIZE, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.splitlines()) == 1 and json.loads(done.stdout)["out"]
    assert main([*QUANTIZE, "--out", str(tmp_path / "one")]) == 0
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "two").glob("*.safetensors"))
    for name in files:
        assert same(load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name))


def test_distributed_benchmark_smoke_runs_one_and_two_gloo_ranks(tmp_path):
    """benchmarks/distributed.py --smoke: the multi-GPU benchmark's code path on CPU ranks."""
    script = REPO / "benchmarks" / "distributed.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), "--smoke", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "distributed.json").read_text())
    assert result["record"]["command"].startswith("python benchmarks/distributed.py --smoke")
    assert [r["world"] for r in result["rows"]] == [1, 2]
    assert result["checks"] == {"identical_codes": True, "bound_identical": True}
    two = result["rows"][1]
    assert two["ranks_agree"] and two["calib_efficiency"] == pytest.approx(
        result["rows"][0]["calib_s"] / (2 * two["calib_s"])
    )
    assert "| 2 |" in (tmp_path / "distributed.md").read_text()
