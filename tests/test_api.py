"""Issue 20, item 6: the one-call Python API, its documented example (README's "Python API"
section, kept in docs/python-api.md), and include/exclude layer selection."""

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import faircalib
from faircalib import hub
from faircalib.calib.select import layer_selected, restrict, select_linears, selected_layers
from faircalib.config import CalibConfig
from faircalib.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def python_api_example() -> str:
    """The first python block under a "Python API" heading: the README's once the section is
    pasted there, docs/python-api.md's until then."""
    for path in (ROOT / "README.md", ROOT / "docs" / "python-api.md"):
        lines, fenced, inside, code = path.read_text().splitlines(), False, False, None
        for line in lines:
            if line.startswith("```"):
                if fenced and inside and code is not None:
                    return "\n".join(code)
                fenced = not fenced
                if fenced and inside and line.strip() == "```python":
                    code = []
                continue
            if not fenced and re.match(r"#+ ", line):
                if inside:
                    break
                inside = re.fullmatch(r"#+ Python API", line.strip()) is not None
            elif fenced and code is not None:
                code.append(line)
        assert not inside, f"{path}: the Python API section has no python example"
    raise AssertionError("no Python API section in README.md or docs/python-api.md")


def test_the_documented_example_runs(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(python_api_example(), "python-api-example", "exec"), {})
    printed = capsys.readouterr().out
    assert "6 layers quantized" in printed and "ppl <=" in printed
    out = tmp_path / "runs" / "mdlm-tiny-gptq-w4g64"
    assert hub.is_packed(out)
    record = json.loads((out / "quantization.json").read_text())
    names = {row["layer"] for row in record["layers"]}
    assert names == {f"blocks.{i}.mlp.{j}" for i in (1, 2, 3) for j in (0, 2)}
    assert record["method"]["method"] == "gptq" and record["method"]["group_size"] == 64
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["args"]["include"] == ["blocks.*.mlp.*"] and recipe["model"] == "mdlm-tiny"
    assert recipe["args"]["exclude"] == ["blocks.0.*"]
    loaded = hub.load(out)
    assert type(loaded.blocks[0].mlp[0]) is torch.nn.Linear  # still float
    assert type(loaded.blocks[1].attn_qkv) is torch.nn.Linear
    assert type(loaded.blocks[1].mlp[0]) is not torch.nn.Linear


def test_import_faircalib_is_light_and_exports_the_api():
    code = "import sys, faircalib; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == (
        "False\n"
    )
    for name in ("load", "quantize", "save", "evaluate"):
        assert callable(getattr(faircalib, name))
    assert faircalib.api.quantize is faircalib.quantize


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "hqq"}, "unknown method"),
        ({"method": "gptq", "dampening": 0.1}, "unknown quantize option"),
        ({"method": "awq", "damp": 0.1}, "does not apply"),
        ({"method": "gptq", "bits": 9}, "unsupported bit width"),
        ({"method": "rtn", "device": "gpu"}, "unknown device"),
        ({"method": "rtn", "format": "gguf"}, "format"),
    ],
)
def test_api_refuses_bad_requests_before_work(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        faircalib.quantize("mdlm-tiny", **kwargs)


def test_api_quantizes_a_loaded_model_in_place_and_evaluates_it_in_memory(tmp_path: Path):
    text = tmp_path / "text.txt"
    text.write_text(
        "\n\n".join(f"Paragraph {i} about rivers, bridges and bread." for i in range(40))
    )
    model = faircalib.load("mdlm-tiny")
    q = faircalib.quantize(
        model, method="rtn", nsamples=1, seq_len=32, include="blocks.1.mlp.*", calib=str(text)
    )
    assert q.model is model and [r["layer"] for r in q.report["layers"]] == [
        "blocks.1.mlp.0",
        "blocks.1.mlp.2",
    ]
    result = faircalib.evaluate(q, str(text), limit=1, seq_len=32)
    assert result["sequences"] == 1 and result["ppl"] > 1


def test_layer_patterns():
    assert layer_selected("blocks.0.attn_qkv")
    assert layer_selected("blocks.2.mlp.0", include=["blocks.*.mlp.*"])
    assert not layer_selected("blocks.2.attn_out", include=["blocks.*.mlp.*"])
    assert not layer_selected("blocks.2.mlp.0", exclude=["blocks.2.*"])
    assert not layer_selected("blocks.2.mlp.0", ["*mlp*"], ["*.mlp.0"])
    linears = [("attn_qkv", 1), ("mlp.0", 2), ("mlp.2", 3)]
    cfg = CalibConfig(include=["*mlp*"], exclude=["blocks.1.mlp.2"])
    assert select_linears(linears, 1, cfg) == [("mlp.0", 2)]
    assert select_linears(linears, 0, cfg) == [("mlp.0", 2), ("mlp.2", 3)]
    assert select_linears(linears, 0, CalibConfig()) == linears


def test_restrict_narrows_the_model_and_its_copies_then_restores():
    model = hub.load("mdlm-tiny")
    full = [n for n, _ in model.quantizable_linears(model.blocks[1])]
    with restrict(model, ["blocks.1.*"], ["*attn*"]):
        assert [n for n, _ in model.quantizable_linears(model.blocks[1])] == ["mlp.0", "mlp.2"]
        assert model.quantizable_linears(model.blocks[0]) == []
        clone = copy.deepcopy(model)  # FAIR-Calib's teacher / noisy copy see the same selection
        assert [n for n, _ in clone.quantizable_linears(clone.blocks[1])] == ["mlp.0", "mlp.2"]
    assert [n for n, _ in model.quantizable_linears(model.blocks[1])] == full
    with pytest.raises(ConfigError, match="matches no quantizable layer"):
        selected_layers(model, ["lm_head"], None)
    with pytest.raises(ConfigError, match="leave no layer"):
        selected_layers(model, None, ["*"])
