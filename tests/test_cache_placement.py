"""Where the layer-wise engine keeps its activation caches (issue 13): the planner's arithmetic
against hand computations, and the same quantized bits whichever placement runs.

On the CPU both placements compute where they store, so the comparison here checks the two
code paths (host copies vs. tensors read in place) give the same bits; tests/test_cuda.py runs
the same comparison with pinned host memory and device-resident caches on a GPU.
"""

import copy
import json

import pytest
import torch

from faircalib import hub
from faircalib.calib import engine, quantize
from faircalib.calib.engine import BATCH, quant_results, quantize_model
from faircalib.calib.progress import PartialRun, fingerprint
from faircalib.calib.streaming import (
    GIB,
    CachePlan,
    block_working_bytes,
    cache_copies,
    cache_margin,
    plan_cache,
    resident_bytes,
)
from faircalib.config import CalibConfig, GPTQConfig, ReconConfig, ReconMethodConfig

torch.set_num_threads(1)
CUDA = torch.device("cuda")  # a device object only: no GPU is touched by the planner


# --- the planner's arithmetic -------------------------------------------------------------------
def test_cache_copies_count_what_reconstruction_keeps_alive():
    assert cache_copies(None) == 1  # the block inputs
    assert cache_copies("quant_input") == 2  # + the float block's outputs (targets)
    assert cache_copies("float_stream") == 3  # + the float stream the targets replace


def test_margin_is_a_tenth_of_the_budget_and_at_least_two_gib():
    assert cache_margin(None) == 2 * GIB
    assert cache_margin(10 * GIB) == 2 * GIB
    assert cache_margin(40 * GIB) == 4 * GIB


def test_block_working_bytes_by_hand():
    shapes = [(8, 16), (16, 8)]
    # statistics: Hessians 8*8*8 + 16*16*8, samples 5 rows x (8 + 16) x 4 bytes
    stats = 512 + 2048 + 5 * 24 * 4
    batch = 10 * 16 * (3 * 4 + 4 * 2)  # 10 rows at width 16: 3 float32 + 4 bf16 copies
    gptq = 16 * 16 * 24 + 16 * 8 * 16  # the (16, 8) linear's Hessians and float32 copies
    assert stats + gptq > stats + batch
    assert block_working_bytes(shapes, 10, 2, 5) == stats + gptq
    assert block_working_bytes(shapes, 10, 2, 5, recon_rows=3) == stats + gptq  # recon smaller
    recon = (8 * 16 + 16 * 8) * 32 + 100 * (24 + 24) * 4  # 8 float32 per weight + activations
    assert recon > stats + gptq
    assert block_working_bytes(shapes, 10, 2, 5, recon_rows=100) == recon


def test_plan_fits_exactly_at_the_budget_and_not_one_byte_over():
    budget = 30 * GIB
    margin = 3 * GIB  # a tenth of it
    cache, resident = 5 * GIB, 4 * GIB
    working = budget - cache - resident - margin
    fits = plan_cache(CUDA, cache, resident, working, budget)
    assert fits.on_device and fits.placement == "device" and not fits.pinned
    over = plan_cache(CUDA, cache, resident, working + 1, budget)
    assert not over.on_device and over.placement == "host"
    # pinned host memory only where CUDA exists: never asked for on a CPU-only build
    assert over.pinned == torch.cuda.is_available()
    assert over.to_dict() | {"pinned": None} == {
        "placement": "host",
        "device": "cuda",
        "pinned": None,
        "forced": False,
        "cache_bytes": cache,
        "resident_bytes": resident,
        "working_bytes": working + 1,
        "margin_bytes": margin,
        "budget_bytes": budget,
    }


def test_cpu_device_keeps_the_cache_where_it_computes_and_force_overrides():
    cpu = torch.device("cpu")
    assert plan_cache(cpu, 10**15, 0, 0, GIB).on_device  # nothing to move on the CPU
    assert not plan_cache(cpu, 0, 0, 0, None, force="host").on_device
    assert plan_cache(CUDA, 10**15, 0, 0, GIB, force="device").on_device
    assert not plan_cache(cpu, 0, 0, 0, None, force="host").pinned
    with pytest.raises(ValueError, match="force"):
        plan_cache(cpu, 0, 0, 0, None, force="gpu")


LLADA_8B = [(4096, 4096)] * 4 + [(4096, 12288)] * 2 + [(12288, 4096)]  # q k v o, ff/up, ff_out


def test_llada_8b_calibration_on_a_24_gib_budget():
    """The issue's run (128 x 2048 tokens, bf16, --offload --max-device-gib 24), by hand."""
    seq = 2048 * 4096 * 2  # one cached sequence: 16 MiB
    stats = 6 * (4096**2 * 8 + 8192 * 4096 * 4) + (12288**2 * 8 + 8192 * 12288 * 4)  # 3 GiB
    batch = 16 * 2048 * 12288 * (3 * 4 + 4 * 2)  # 7.5 GiB
    working = block_working_bytes(LLADA_8B, 16 * 2048, 2, 8192, recon_rows=0)
    assert working == stats + batch == int(10.5 * GIB)
    # reconstruction of 4 sequences: 8 float32 per weight + inputs and outputs of every linear
    weights = 4 * 4096**2 + 3 * 4096 * 12288
    recon = weights * 32 + 4 * 2048 * (4 * 8192 + 2 * 16384 + 16384) * 4  # 9 GiB
    assert block_working_bytes(LLADA_8B, 16 * 2048, 2, 8192, recon_rows=4 * 2048) == working
    assert recon == 9 * GIB < working
    # stem + head (2 x 126464 x 4096 bf16) + one block's bf16 weights and uint8 codes
    resident = 2 * 126464 * 4096 * 2 + weights * 3
    budget = 24 * GIB
    gptq_cache = (1 * 128 + 16) * seq  # the cache and one propagate batch: 2.25 GiB
    fair_cache = (3 * 128 + 16) * seq  # with the recon target and the float stream: 6.25 GiB
    margin = int(2.4 * GIB)
    assert gptq_cache + resident + working + margin < fair_cache + resident + working + margin
    assert fair_cache + resident + working + margin <= budget  # 21.8 GiB
    assert plan_cache(CUDA, gptq_cache, resident, working, budget).on_device
    assert plan_cache(CUDA, fair_cache, resident, working, budget).on_device
    assert not plan_cache(CUDA, fair_cache, resident, working, 20 * GIB).on_device


def test_resident_bytes_of_a_tiny_model_by_hand():
    model = hub.load("mdlm-tiny")

    def nbytes(module):  # parameters and buffers (the rotary frequencies)
        tensors = [*module.parameters(), *module.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    stem_head = nbytes(model) - sum(nbytes(b) for b in model.blocks)
    codes = sum(lin.weight.numel() for _, lin in model.quantizable_linears(model.blocks[0]))
    one = nbytes(model.blocks[0]) + codes  # every block has the same shapes
    assert resident_bytes(model, offload=True) == stem_head + one
    assert resident_bytes(model, offload=False) == stem_head + len(model.blocks) * one


# --- the engine ---------------------------------------------------------------------------------
def calib_rows(model):
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randint(2, model.vocab_size, (20, 32), generator=gen)
    return model, x_t, torch.rand(20, generator=gen)


@pytest.fixture(scope="module")
def tiny():
    return calib_rows(hub.load("mdlm-tiny"))


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    from llama_like_ckpt import write_family  # a bf16 family: LLaDA's layout, tiny

    path = write_family(tmp_path_factory.mktemp("llada") / "llada", "llada")
    return calib_rows(hub.load(path, dtype=torch.bfloat16))


def hidden_of(model) -> int:
    return model.quantizable_linears(model.blocks[0])[0][1].in_features


def run_engine(model, x_t, t, monkeypatch, placement, *, recon=None, offload=False, **calib):
    q = copy.deepcopy(model)
    monkeypatch.setattr(engine, "_FORCED_CACHE_PLACEMENT", placement)
    weights = torch.rand(x_t.shape, generator=torch.Generator().manual_seed(4))
    cfg = CalibConfig(offload=offload, **calib)
    text_ids = torch.arange(len(x_t)) // 2
    report = quantize_model(
        q, GPTQConfig(group_size=32), x_t, t, weights, calib_cfg=cfg, recon=recon,
        text_ids=text_ids, progress=False,
    )  # fmt: skip
    return q, report


def assert_same_bits(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    ra, rb = quant_results(a), quant_results(b)
    assert ra.keys() == rb.keys() and len(ra) >= 8
    for name in ra:
        assert torch.equal(ra[name].codes, rb[name].codes), name
        assert torch.equal(ra[name].qparams.scale, rb[name].qparams.scale), name


@pytest.mark.parametrize(
    ("target", "offload", "bf16"),
    [
        (None, False, False),
        ("float_stream", False, False),
        ("quant_input", True, False),
        ("float_stream", True, True),
    ],
)
def test_host_and_device_placements_give_the_same_bits(
    tiny, tiny_bf16, monkeypatch, target, offload, bf16
):
    model, x_t, t = tiny_bf16 if bf16 else tiny
    recon = None if target is None else ReconConfig(steps=6, batch=3, eval_every=2, target=target)
    runs = {
        where: run_engine(model, x_t, t, monkeypatch, where, recon=recon, offload=offload)
        for where in ("host", "device")
    }
    assert_same_bits(runs["host"][0], runs["device"][0])
    logs = {where: report.recon for where, (_, report) in runs.items()}
    assert logs["host"] == logs["device"]  # the same validation curves, bit for bit
    for where, (_, report) in runs.items():
        assert report.calib["cache"]["placement"] == where
        assert report.calib["cache"]["forced"] is True


def test_report_records_the_cache_plan_by_hand(tiny, monkeypatch):
    model, x_t, t = tiny
    recon = ReconConfig(steps=2, batch=2, eval_every=1)  # float_stream: three copies
    _, report = run_engine(model, x_t, t, monkeypatch, None, recon=recon, max_device_gib=1.5)
    cache = report.calib["cache"]
    row = 32 * hidden_of(model) * 4  # one float32 sequence
    assert cache["cache_bytes"] == (3 * 20 + BATCH) * row
    assert cache["budget_bytes"] == int(1.5 * GIB)
    assert cache["margin_bytes"] == 2 * GIB
    assert cache["resident_bytes"] == resident_bytes(model, offload=False)
    assert cache["placement"] == "device" and cache["device"] == "cpu" and not cache["forced"]
    json.dumps(report.to_dict())  # quantization.json can hold it


def test_cache_line_prints_the_real_dtype_and_size(tiny_bf16, monkeypatch, capsys):
    model, x_t, t = tiny_bf16
    bf16 = copy.deepcopy(model)
    monkeypatch.setattr(engine, "_FORCED_CACHE_PLACEMENT", None)
    quantize_model(bf16, GPTQConfig(group_size=32), x_t, t, calib_cfg=CalibConfig())
    line = next(s for s in capsys.readouterr().err.splitlines() if "block-input cache" in s)
    gib = 20 * 32 * hidden_of(bf16) * 2 / GIB  # 2 bytes per value
    assert f"block-input cache {gib:.2f} GiB bfloat16 on cpu" in line


def test_resume_across_placements_is_bit_identical(tmp_path, monkeypatch):
    """Progress written by a host-placed run, resumed by a device-placed one (and the other
    way round): the uninterrupted run's bits."""
    model = hub.load("mdlm-tiny")
    tokens = torch.randint(2, model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(PartialRun, "COMMIT_EVERY_S", 0.0)
    stage2 = ReconConfig(steps=4, e2e_steps=0, eval_every=2)
    config = ReconMethodConfig(group_size=64, steps=4, prefix_len=8, n_prompts=4, recon=stage2)
    calib = CalibConfig(n_samples=4, seq_len=32)
    reference = copy.deepcopy(model)
    quantize(reference, config, tokens, calib, progress=False)
    original = PartialRun.save_block

    def save_then_stop(self, i, *args, **kwargs):
        original(self, i, *args, **kwargs)
        if i == 1:
            raise KeyboardInterrupt

    for first, then in (("host", "device"), ("device", "host")):
        directory = tmp_path / f"{first}.partial"
        fp = fingerprint(model, config.to_dict(), calib.to_dict(), tokens)
        with monkeypatch.context() as patch:
            patch.setattr(PartialRun, "save_block", save_then_stop)
            patch.setattr(engine, "_FORCED_CACHE_PLACEMENT", first)
            partial = PartialRun.open(directory, fp, resume=False, overwrite=False)
            with pytest.raises(KeyboardInterrupt):
                quantize(
                    copy.deepcopy(model), config, tokens, calib, progress=False, partial=partial
                )
        monkeypatch.setattr(engine, "_FORCED_CACHE_PLACEMENT", then)
        resumed = copy.deepcopy(model)
        partial = PartialRun.open(directory, fp, resume=True, overwrite=False)
        report = quantize(resumed, config, tokens, calib, progress=False, partial=partial)
        assert report.calib["cache"]["placement"] == then
        assert_same_bits(reference, resumed)


def test_a_plan_keeps_host_tensors_contiguous_and_device_tensors_in_place():
    cpu = torch.device("cpu")
    h = torch.randn(4, 6, 8).transpose(1, 2)  # a non-contiguous block output
    host = CachePlan(False, cpu, 0, 0, 0, 0, None)
    kept = host.keep(h)
    assert kept.is_contiguous() and torch.equal(kept, h) and kept.data_ptr() != h.data_ptr()
    assert host.adopt(kept) is kept  # already placed: no copy
    device = CachePlan(True, cpu, 0, 0, 0, 0, None)
    same = torch.randn(4, 6, 8)
    assert device.keep(same) is same and device.load(same) is same
    assert device.copy(same) is not same and torch.equal(device.copy(same), same)
