"""Issue 20, items 3 and 7: one-line errors before any work (devices, packed sources, unwritable
outputs), warnings for --seq-len past the model's length and for re-quantizing a fake-quant
model, and kuleshov-group's MDLM layout through every command."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from faircalib import api, hub
from faircalib.cli import main
from test_loaders import V, hf_tensors, write_hf

ASSET = hub.ASSETS / "models" / "mdlm-tiny"
RTN = ["--method", "rtn", "--nsamples", "1", "--seq-len", "32"]


def calib_text(directory: Path) -> Path:
    """A small calibration file (tokenizing the shipped C4 split costs seconds per run)."""
    path = directory / "calib.txt"
    docs = [
        f"Document {i}: the river flows north past the old mill, and the town council meets "
        f"on the {i}th day to discuss bridges, schools, music and the price of bread."
        for i in range(40)
    ]
    path.write_text("\n\n".join(docs))
    return path


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "%|" not in line]  # progress bars aside
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


COMMANDS = {
    "quantize": lambda out, dev: ["quantize", "mdlm-tiny", *RTN, "--device", dev, "--out", out],
    "eval": lambda out, dev: ["eval", "mdlm-tiny", "--limit", "1", "--device", dev],
    "generate": lambda out, dev: ["generate", "mdlm-tiny", "--device", dev],
    "bench": lambda out, dev: ["bench", "mdlm-tiny", "--device", dev],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unknown_device_is_one_line(command, tmp_path: Path, capsys):
    out = tmp_path / "q"
    assert main(COMMANDS[command](str(out), "gpu")) == 2
    one_line_error(capsys, "unknown device 'gpu'", "cpu, cuda")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cuda_on_a_cpu_only_torch_is_one_line(command, tmp_path: Path, capsys):
    out = tmp_path / "q"
    assert main(COMMANDS[command](str(out), "cuda")) == 2
    one_line_error(capsys, "no CUDA GPU", "--device cpu")
    assert not out.exists()


def test_unwritable_out_fails_before_calibration(tmp_path: Path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for out in (blocker / "q", Path("/proc/faircalib-no-such/q")):  # root ignores mode bits
        code = main(["quantize", "mdlm-tiny", *RTN, "--out", str(out)])
        assert code in (1, 2)
        line = one_line_error(capsys, str(out))
        assert "[calib]" not in line


def test_out_below_a_regular_file_names_the_file(tmp_path: Path, capsys):
    # mkdir's own "File exists" reads as if --out existed; the line names the file in the way
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = blocker / "sub" / "q"
    assert main(["quantize", "mdlm-tiny", *RTN, "--out", str(out)]) == 2
    one_line_error(capsys, str(out), f"{blocker} is a file, not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
    assert blocker.read_text() == "not a directory"


@pytest.fixture(scope="module")
def packed_and_fake(tmp_path_factory):
    """A packed directory `quantize` wrote, and a fake-quant one (the float model's files plus
    the quantization.json that every fake-quant output carries)."""
    root = tmp_path_factory.mktemp("sources")
    q = api.quantize(
        "mdlm-tiny",
        method="rtn",
        nsamples=1,
        seq_len=32,
        include="blocks.3.*",
        calib=str(calib_text(root)),
    )
    packed = api.save(q, root / "packed")
    fake = root / "fake"
    shutil.copytree(ASSET, fake)
    record = {"format": "fake", "source_model": "mdlm-tiny", "method": {"method": "rtn", "bits": 4}}
    (fake / "quantization.json").write_text(json.dumps(record))
    return packed, fake


def test_quantizing_a_packed_directory_is_refused(packed_and_fake, tmp_path: Path, capsys):
    packed, _ = packed_and_fake
    out = tmp_path / "again"
    assert main(["quantize", str(packed), *RTN, "--out", str(out)]) == 2
    one_line_error(capsys, "already quantized", "float source")
    assert not out.exists()


def test_requantizing_fake_quant_and_long_seq_len_warn(packed_and_fake, tmp_path: Path, capsys):
    _, fake = packed_and_fake
    out = tmp_path / "again"
    argv = ["quantize", str(fake), "--method", "rtn", "--nsamples", "1", "--seq-len", "160"]
    argv += ["--calib", str(calib_text(tmp_path))]
    assert main([*argv, "--include", "blocks.0.*", "--out", str(out), "--json"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "already fake-quantized (rtn W4)" in err
    assert "--seq-len 160 is longer than" in err and "training length 128" in err


def mdlm_hf_dir(tmp_path: Path) -> Path:
    src = write_hf(tmp_path / "mdlm-hf", hf_tensors(0))
    vocab = {f"w{i}": i for i in range(V - 2)} | {"<|endoftext|>": V - 2, "[MASK]": V - 1}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.save(str(src / "tokenizer.json"))
    return src


def test_kuleshov_mdlm_layout_works_with_eval_generate_and_quantize(tmp_path: Path, capsys):
    src = mdlm_hf_dir(tmp_path)
    data = ["--data", str(calib_text(tmp_path))]
    assert main(["eval", str(src), *data, "--limit", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and result["ppl"] > 1
    for key in ("faircalib_version", "git_commit", "torch", "device", "run_device", "date"):
        assert key in result["record"], key  # every results file says what produced it
    assert main(["generate", str(src), "--gen-length", "8", "--steps", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["texts"]) == 1
    out = tmp_path / "q"
    argv = ["quantize", str(src), "--method", "rtn", "--group-size", "32", "--nsamples", "1"]
    assert main([*argv, "--calib", str(calib_text(tmp_path)), "--out", str(out)]) == 0
    assert hub.is_packed(out) and hub.load(out).mask_id == V - 1


def test_mdlm_owt_without_a_tokenizer_gets_gpt2(tmp_path: Path):
    src = tmp_path / "owt"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mdlm", "vocab_size": 50258}))
    tokenizer = hub.load_tokenizer(src)
    assert tokenizer.get_vocab_size() == 50258 and tokenizer.token_to_id("<|endoftext|>") == 50256


@pytest.mark.parametrize("model", ["diffusionlm-tiny", "planner-tiny"])
def test_a_seq_len_past_a_learned_position_table_is_one_line_before_any_work(
    model: str, tmp_path: Path, capsys
):
    """Learned position tables (128 rows here) have no position 129: each command says so in
    one line and writes nothing (rotary MDLM only warns, above)."""
    assert hub.load(model).max_positions == 128
    out = tmp_path / "q"
    quantize = ["quantize", model, "--method", "rtn", "--nsamples", "1", "--seq-len", "129"]
    assert main([*quantize, "--out", str(out)]) == 2
    one_line_error(capsys, "--seq-len 129", "learned position table has 128 positions")
    assert main(["eval", model, "--seq-len", "129", "--limit", "1"]) == 2
    one_line_error(capsys, f"longer than {model} can take")
    bench = ["bench", model, "--methods", "rtn", "--schemes", "w4g128", "--seq-len", "129"]
    assert main([*bench, "--out", str(out)]) == 2
    one_line_error(capsys, "learned position table")
    assert not out.exists()
    assert hub.load("mdlm-tiny").max_positions is None  # rotary: any length runs
