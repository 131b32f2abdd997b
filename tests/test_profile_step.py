"""benchmarks/profile_step.py: its smoke run end to end on the CPU."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import profile_step  # noqa: E402
from faircalib.models.io import load_tensors  # noqa: E402

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
# W4_AUTO's CPU rule, written out: the int4 kernel takes bf16 activations, else fp32 `dequant`
CPU_BACKEND = {"bfloat16": "int4_cpu", "float32": "dequant"}


def test_smoke_run_profiles_bf16_and_packed_steps(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--smoke", "--blocks", "2", "--seq-len", "32", "--reps", "2", "--warmup", "1"]
    argv += ["--profile-steps", "2", "--top", "500", "--work", str(work), "--out", str(out)]
    profile_step.main(argv)
    result = json.loads((out / "profile_step.json").read_text())
    assert result["record"]["command"] == " ".join(argv) and "git_commit" in result["record"]
    variants = result["variants"]
    assert list(variants) == ["bf16", "packed", "packed-cast"]

    # the quantized layers are the ones the packed checkpoint holds, named as it names them
    packed_dir = work / "smoke-2blocks-w4g128-rtn"
    packed_keys = {k.removesuffix(".weight_packed") for k in load_tensors(packed_dir)}
    expected = {f"model.transformer.blocks.{b}.{n}" for b in range(2) for n in BLOCK_LINEARS}
    assert expected <= packed_keys
    assert variants["bf16"]["layers"] == {} and variants["bf16"]["float_dtypes"].keys() == {
        "bfloat16"
    }
    for name in ("packed", "packed-cast"):
        v = variants[name]
        assert set(v["layers"]) == expected
        for layer in v["layers"].values():  # one input dtype per layer, and its CPU backend
            (dtype,) = layer["input_dtypes"]
            assert layer["backend"] == CPU_BACKEND[dtype]
    cast = variants["packed-cast"]
    assert cast["float_dtypes"].keys() == {"bfloat16"} and cast["backends"] == {"int4_cpu": 14}

    # the profiler saw the kernel each backend runs, once per layer per profiled step
    ops = {r["name"]: r for r in cast["ops"]["by_cpu_time"]}
    assert ops["aten::_weight_int4pack_mm_for_cpu"]["calls_per_step"] == 14
    dense_ops = {r["name"]: r for r in variants["bf16"]["ops"]["by_cpu_time"]}
    assert "aten::_weight_int4pack_mm_for_cpu" not in dense_ops
    assert all(v["step_ms"] > 0 and len(v["step_ms_all"]) == 2 for v in variants.values())
    table = (out / "profile_step.md").read_text()
    assert all(f"| {name} |" in table for name in variants)


def test_float_dtypes_counts_elements_outside_quant_linears():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model[1].to(torch.bfloat16)
    assert profile_step.float_dtypes(model) == {"float32": 4 * 3 + 3, "bfloat16": 3 + 3}
