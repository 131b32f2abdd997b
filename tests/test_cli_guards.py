"""Bad inputs found by an audit of the CLI (2026-11-30): each is refused in one line, before
any work, and nothing the user had is touched."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from faircalib import cli, hub
from faircalib.calib.progress import PartialRun
from faircalib.config import QuantConfig
from faircalib.errors import CheckpointError, ConfigError, FairCalibError
from faircalib.models.io import check_state_dict
from faircalib.training_state import META_FILE, STATE_FILE, load_state

QUICK = ["--method", "rtn", "--nsamples", "2", "--seq-len", "16"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def local_model(tmp_path: Path) -> Path:
    """mdlm-tiny copied with its files resolved (the shipped tokenizer is a symlink)."""
    model = tmp_path / "m"
    shutil.copytree(hub.resolve("mdlm-tiny"), model, symlinks=False)
    return model


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("out", ["SELF", "PARENT", ".", ""])
def test_overwrite_never_deletes_the_input_model_or_the_working_directory(
    tmp_path, monkeypatch, capsys, out
):
    model = local_model(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    before = snapshot(model)
    monkeypatch.chdir(tmp_path)
    target = {"SELF": str(model), "PARENT": str(tmp_path)}.get(out, out)
    code = cli.main(["quantize", str(model), *QUICK, "--out", target, "--overwrite"])
    err = one_line_error(capsys)
    assert code == 2 and ("input" in err or "current directory" in err)
    assert snapshot(model) == before and (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["quantize", "mdlm-tiny", *QUICK, "--seed", str(2**64), "--out", "q"], "seed"),
        (["eval", "mdlm-tiny", "--seed", "-1"], "seed"),
        (["bench", "mdlm-tiny", "--calib-seeds", "1,x"], "calib-seeds"),
    ],
)
def test_seeds_outside_a_64_bit_generator_are_argument_errors(tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and not any(tmp_path.iterdir())


def test_devices_other_than_cpu_and_cuda_are_refused(capsys):
    assert cli.main(["eval", "mdlm-tiny", "--device", "mps", "--limit", "1"]) == 2
    assert "cpu or cuda" in one_line_error(capsys)


def test_a_prompt_that_is_not_utf8_is_refused(capsys):
    prompt = b"\x01 \xff".decode("utf-8", "surrogateescape")  # what a shell passes through
    assert cli.main(["generate", "mdlm-tiny", "--gen-length", "8", "--prompt", prompt]) == 2
    assert "UTF-8" in one_line_error(capsys)


def test_only_minus_one_or_zero_mean_per_channel():
    assert QuantConfig(bits=4, group_size=-1).group_size is None
    assert QuantConfig(bits=4, group_size=0).group_size is None
    with pytest.raises(ConfigError, match="group size -2"):
        QuantConfig(bits=4, group_size=-2)


def test_running_out_of_torch_memory_is_one_line_and_other_errors_stay_visible(monkeypatch, capsys):
    from faircalib.commands import eval as eval_command

    def oom(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9")

    monkeypatch.setattr(eval_command, "run", oom)
    assert cli.main(["eval", "mdlm-tiny"]) == 1
    assert "out of memory" in one_line_error(capsys)

    def bug(args):
        raise RuntimeError("a shape mismatch deep in a kernel")

    monkeypatch.setattr(eval_command, "run", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug is not dressed up
        cli.main(["eval", "mdlm-tiny"])


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ([], "JSON object"),
        ({"step": "two", "total_steps": 4, "tokens_seen": 0, "elapsed_s": 0, "log": []}, "step"),
        ({"step": 9, "total_steps": 4, "tokens_seen": 0, "elapsed_s": 0, "log": []}, "past"),
        ({"step": -5, "total_steps": 4, "tokens_seen": 0, "elapsed_s": 0, "log": []}, "step"),
    ],
)
def test_a_damaged_training_state_is_refused_in_one_line(tmp_path, meta, words):
    state = tmp_path / "t.partial"
    state.mkdir()
    (state / META_FILE).write_text(json.dumps(meta))
    from safetensors.torch import save_file

    save_file({"rng.gen": torch.zeros(1)}, str(state / STATE_FILE))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match=words) as exc:
        load_state(state, model, opt, torch.Generator(), {})
    assert "\n" not in str(exc.value)


def test_a_damaged_quantize_progress_fingerprint_is_refused(tmp_path):
    run = PartialRun(tmp_path, {"fingerprint": [], "finished_blocks": 0, "blocks": []})
    with pytest.raises(CheckpointError, match="damaged"):
        run._check({})


def test_a_bad_commit_interval_in_the_environment_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FAIRCALIB_COMMIT_EVERY_S", "abc")
    with pytest.raises(ConfigError, match="FAIRCALIB_COMMIT_EVERY_S"):
        PartialRun(tmp_path, {"finished_blocks": 0, "blocks": []})._commit_every()


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    model = local_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 1000  # the shipped tokenizer has 8192 tokens
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not this model's tokenizer"):
        hub.load_tokenizer(model)


@pytest.mark.parametrize("key", ["mask_id", "mask_token_id"])
def test_a_config_mask_id_that_is_not_the_tokenizers_mask_token_is_refused(tmp_path, key):
    """mdlm-tiny's tokenizer has <|mask|> at id 1; a config naming id 5 would evaluate with the
    wrong token and no error (a perplexity bound of ~32,000 instead of ~200)."""
    model = local_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    hub.load_tokenizer(model)  # the shipped pair agrees
    config[key] = 5
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"<\\|mask\\|> at id 1 but config.json's {key} is 5"):
        hub.load_tokenizer(model)


def test_float8_weights_in_a_float_checkpoint_are_refused():
    model = torch.nn.Linear(4, 4)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors["weight"] = tensors["weight"].to(torch.float8_e4m3fn)
    with pytest.raises(FairCalibError, match="float8_e4m3fn"):
        check_state_dict(model, tensors, "m")


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "mdlm-tiny", "--temperature", "nan"],
        ["generate", "mdlm-tiny", "--cfg-scale", "inf"],
    ],
)
def test_non_finite_sampler_numbers_are_argument_errors(argv):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2


def test_eval_refuses_a_zero_sequence_length(capsys):
    assert cli.main(["eval", "mdlm-tiny", "--seq-len", "0", "--limit", "1"]) == 2
    assert "--seq-len" in one_line_error(capsys)


def test_a_recipe_of_another_version_is_refused(tmp_path, capsys):
    recipe = json.loads((hub.ASSETS / "recipes" / "rtn-w4g128.json").read_text())
    recipe["faircalib_recipe"] = 99
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    code = cli.main(
        ["quantize", "mdlm-tiny", "--config", str(tmp_path), "--out", str(tmp_path / "q")]
    )
    assert code == 2 and "version 99" in one_line_error(capsys)
    assert not (tmp_path / "q").exists()


def test_an_unreadable_recipe_is_named_as_a_recipe(tmp_path, capsys):
    (tmp_path / "recipe.json").write_text("{not json")
    code = cli.main(
        ["quantize", "mdlm-tiny", "--config", str(tmp_path), "--out", str(tmp_path / "q")]
    )
    err = one_line_error(capsys)
    assert code == 2 and "not a readable recipe" in err and "re-download" not in err


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [("method", "bogus", "--method"), ("group_size", "abc", "--group-size")],
)
def test_a_recipe_value_its_flag_would_refuse_is_named(tmp_path, capsys, field, value, said):
    """A recipe bypasses argparse: its values get the typed flags' choices and types, and the
    error names the recipe field (an unknown method was reported as an activation method)."""
    recipe = json.loads((hub.ASSETS / "recipes" / "rtn-w4g128.json").read_text())
    recipe["args"][field] = value
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    code = cli.main(
        ["quantize", "mdlm-tiny", "--config", str(tmp_path), "--out", str(tmp_path / "q")]
    )
    err = one_line_error(capsys)
    assert code == 2 and f"recipe field {field}" in err and said in err
    assert "activations" not in err and not (tmp_path / "q").exists()


def test_an_unknown_torch_dtype_in_config_json_is_refused(tmp_path, capsys):
    """`--dtype auto` writes the dtype the shards hold, whatever config.json's torch_dtype
    says (a bf16 checkpoint whose config said float32 was written back at twice its size);
    a name that is not a float dtype (it used to become float32 silently) is still one line,
    before any output."""
    model = local_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(next(model.glob("*.safetensors"))), "pt") as f:
        stored = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert len(stored) == 1
    held = stored.pop()
    for name in ("torch.bfloat16", "float16", "float32", "auto"):
        (model / "config.json").write_text(json.dumps({**config, "torch_dtype": name}))
        assert hub.source_dtype(model) == held
    (model / "config.json").write_text(json.dumps({**config, "torch_dtype": "foo"}))
    with pytest.raises(CheckpointError, match="torch_dtype 'foo'"):
        hub.source_dtype(model)
    out = tmp_path / "q"
    argv = ["quantize", str(model), "--method", "rtn", "--bits", "4", "--out", str(out)]
    assert cli.main(argv) != 0
    assert "torch_dtype 'foo'" in one_line_error(capsys) and not out.exists()


def test_an_unreadable_progress_file_is_named_as_progress_damage(tmp_path):
    """A progress directory's safetensors file that does not read is damage to that directory
    (start over), not a checkpoint to re-download."""
    run = PartialRun(tmp_path, {"finished_blocks": 0, "blocks": []})
    (tmp_path / "block.0.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointError) as exc:
        run._read_tensors("block.0.safetensors")
    said = str(exc.value)
    assert "damaged" in said and "block.0.safetensors" in said and "--overwrite" in said
    assert "re-download" not in said and "\n" not in said


def test_bench_removes_the_output_directories_it_made_when_it_fails_early(tmp_path, capsys):
    out = tmp_path / "new" / "bench"
    argv = ["bench", "mdlm-tiny", "--methods", "rtn", "--schemes", "w4g128", "--out", str(out)]
    assert cli.main([*argv, "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither new/ nor new/bench left
    kept = tmp_path / "kept"
    kept.mkdir()
    argv[-1] = str(kept)
    assert cli.main([*argv, "--data", str(tmp_path / "missing.txt")]) == 2
    capsys.readouterr()
    assert kept.is_dir()  # the user's own directory stays


def test_a_recipe_string_is_converted_as_its_flag_would_convert_it():
    import argparse

    from faircalib.commands.quantize import check_recipe_value
    from faircalib.errors import ConfigError

    parser = argparse.ArgumentParser()
    bits = parser.add_argument("--bits", type=int, choices=[2, 3, 4, 8])
    assert check_recipe_value(bits, "4") == 4 and check_recipe_value(bits, 4) == 4
    with pytest.raises(ConfigError, match="recipe field bits"):
        check_recipe_value(bits, 5)
    ratio = parser.add_argument("--ratio", type=float)
    assert check_recipe_value(ratio, "0.5") == 0.5
    with pytest.raises(ConfigError, match="not a valid --ratio"):
        check_recipe_value(ratio, "half")


def test_out_inside_or_above_the_installed_package_is_refused(tmp_path):
    """Shipped models, corpora, tokenizers and recipes are reached by name (`mdlm-tiny`,
    `c4`), so no input path names them: --out there with --overwrite used to delete them."""
    from faircalib.errors import OutputError
    from faircalib.models.io import check_output_dir

    package = Path(cli.__file__).resolve().parent
    for out in (
        package / "assets" / "models" / "mdlm-tiny",
        package / "data" / "files",
        package / "assets" / "recipes",
        package.parent,
    ):
        with pytest.raises(OutputError, match="would replace files of the installed faircalib"):
            check_output_dir(out, overwrite=True)  # refuses before anything is touched
    check_output_dir(tmp_path / "fine", overwrite=True)


def test_out_holding_a_linked_input_file_is_refused(tmp_path, capsys):
    model = local_model(tmp_path)
    elsewhere = tmp_path / "tokenizers"
    elsewhere.mkdir()
    (model / "tokenizer.json").rename(elsewhere / "tok.json")
    (model / "tokenizer.json").symlink_to(elsewhere / "tok.json")
    before = snapshot(elsewhere)
    code = cli.main(["quantize", str(model), *QUICK, "--out", str(elsewhere), "--overwrite"])
    assert code == 2 and "would replace the input" in one_line_error(capsys)
    assert snapshot(elsewhere) == before


@pytest.mark.parametrize(
    ("field", "value", "wanted"),
    [
        ("calib", 3, "a string"),
        ("exclude", 5, "a list of strings"),
        ("include", ["blocks.*", 7], "a list of strings"),
        ("clip_search", "yes", "true or false"),
    ],
)
def test_a_recipe_value_of_the_wrong_json_type_is_one_line(tmp_path, capsys, field, value, wanted):
    recipe = json.loads((hub.ASSETS / "recipes" / "rtn-w4g128.json").read_text())
    recipe["args"][field] = value
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    argv = ["quantize", "mdlm-tiny", "--config", str(tmp_path), "--out", str(tmp_path / "q")]
    code = cli.main(argv)
    assert code == 2 and f"recipe field {field} = {value!r} must be {wanted}" in (
        one_line_error(capsys)
    )
    assert not (tmp_path / "q").exists()


def test_a_head_the_group_does_not_divide_leaves_no_progress_directory(tmp_path, capsys):
    from faircalib.models import save_model
    from faircalib.models.mdlm import MDLM, MDLMConfig

    model = tmp_path / "m64"
    tokenizer = hub.resolve("mdlm-tiny") / "tokenizer.json"
    config = MDLMConfig(8192, 1, seq_len=32, hidden_dim=64, cond_dim=8, n_blocks=1, n_heads=2)
    save_model(MDLM(config), model, extra_files={"tokenizer.json": tokenizer.resolve()})
    out = tmp_path / "q"
    argv = ["quantize", str(model), *QUICK, "--group-size", "-1", "--out", str(out)]
    assert cli.main([*argv, "--quantize-head", "int4"]) == 2
    assert "--quantize-head int4" in one_line_error(capsys)
    assert not out.exists() and not Path(f"{out}.partial").exists()
    assert cli.main([*argv, "--quantize-head", "int8"]) == 0  # the advised command runs


def test_bench_flip_flags_are_checked_before_any_calibration(tmp_path, capsys):
    base = ["bench", "mdlm-tiny", "--methods", "rtn", "--nsamples", "2", "--seq-len", "16"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--flip-steps", "0", "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2 and "--flip-steps" in capsys.readouterr().err
    code = cli.main([*base, "--flip-gen-length", "500", "--out", str(tmp_path / "b")])
    assert code == 2 and "--flip-gen-length 500" in one_line_error(capsys)
    assert not (tmp_path / "b").exists()
    (tmp_path / "file").write_text("x")
    code = cli.main([*base, "--out", str(tmp_path / "file")])
    assert code == 2 and "exists and is not a directory" in one_line_error(capsys)


# --- second audit (2026-11-30, nineteenth session) ---------------------------------------------
TRAIN = ["train", "--data", "c4.jsonl", "--tokenizer", "t.json", "--out", "t"]


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--lr", "-1"),
        ("--batch-size", "0"),
        ("--batch-size", "-1"),
        ("--eval-every", "0"),
        ("--max-steps", "0"),
        ("--warmup-steps", "-5"),
        ("--time-budget", "nan"),
        ("--stop-after", "nan"),
        ("--seed", "-1"),
        ("--seq-len", "0"),
    ],
)
def test_impossible_training_numbers_are_argument_errors(flag, value, capsys):
    # --lr inf used to train a NaN model and exit 0; --eval-every 0 divided by zero
    with pytest.raises(SystemExit) as exc:
        cli.main([*TRAIN, flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_token_pieces_never_overwrite_and_refuse_impossible_piece_sizes(tmp_path, capsys):
    tok = hub.resolve("mdlm-tiny") / "tokenizer.json"
    shard = tmp_path / "s.jsonl"
    shard.write_text("".join(json.dumps({"text": f"doc {i} " * 30}) + "\n" for i in range(50)))
    pack = ["data", "pack-tokens", str(shard), "--tokenizer", str(tok)]
    for size in ("0", "nan", "-1"):
        with pytest.raises(SystemExit):
            cli.main([*pack, "--out", str(tmp_path / "p"), "--max-piece-mib", size])
        assert "argument --max-piece-mib" in capsys.readouterr().err
    assert cli.main([*pack, "--out", str(tmp_path / "p"), "--max-piece-mib", "1e-5"]) == 2
    assert "under 1 KiB" in one_line_error(capsys)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "config.json").write_text("{}")
    assert cli.main([*pack, "--out", str(occupied)]) == 2
    assert "not an empty directory" in one_line_error(capsys)
    assert sorted(p.name for p in occupied.iterdir()) == ["config.json"]
    assert cli.main([*pack, "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    before = shard.read_bytes()
    assemble = ["data", "assemble-tokens", str(tmp_path / "p")]
    assert cli.main([*assemble, "--out", str(shard)]) == 2  # the input shard itself
    assert "already exists" in one_line_error(capsys) and shard.read_bytes() == before
    assert cli.main([*assemble, "--out", str(tmp_path / "tokens.npy")]) == 0
    assert not list(tmp_path.glob("*.tmp.npy"))


def test_an_unreadable_tokenizer_for_data_is_one_line(tmp_path, capsys):
    for bad in (tmp_path / "nope.json", tmp_path):
        assert cli.main(["data", "--tokenizer", str(bad)]) == 2
        assert "pass a tokenizer.json" in one_line_error(capsys)


def test_null_recipe_values_keep_the_flags_defaults(tmp_path, capsys):
    # "dtype": null used to calibrate fully and then fail in save(), leaving a .partial
    recipe = {
        "faircalib_recipe": 1,
        "model": "mdlm-tiny",
        "args": {"method": "rtn", "nsamples": 2, "seq_len": 16, "dtype": None, "format": None},
    }
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    assert cli.main(["quantize", "--config", str(path), "--out", str(tmp_path / "q")]) == 0
    assert not (tmp_path / "q.partial").exists()


def test_a_run_that_fails_before_its_first_block_leaves_no_progress(tmp_path, monkeypatch, capsys):
    # e.g. out of memory at the first block (a too large --views): the progress directory of
    # 0 finished blocks used to block the corrected command (--resume: "a different run")
    import faircalib.calib

    def out_of_memory(*args, **kwargs):
        raise ConfigError("simulated: out of memory at block 0")

    out = tmp_path / "q"
    with monkeypatch.context() as patch:
        patch.setattr(faircalib.calib, "quantize", out_of_memory)
        assert cli.main([*QUICK_FIX, "--out", str(out)]) == 2
    assert "simulated" in one_line_error(capsys)
    assert not (tmp_path / "q.partial").exists() and not out.exists()
    assert cli.main([*QUICK_FIX, "--out", str(out)]) == 0  # no --resume, no --overwrite


QUICK_FIX = ["quantize", "mdlm-tiny", "--method", "rtn", "--nsamples", "2", "--seq-len", "16"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_config_that_is_a_named_pipe_is_refused_without_blocking(tmp_path, capsys):
    """Reading a FIFO named config.json would wait forever for a writer."""
    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / "config.json")
    assert cli.main(["eval", str(tmp_path / "m")]) != 0
    assert "config.json is not a regular file" in one_line_error(capsys)


@pytest.mark.parametrize("data", [",", ",,"])
def test_bench_data_naming_nothing_is_refused_before_calibrating(tmp_path, capsys, data):
    """`--data ,` split into no evaluation set: bench calibrated, then crashed writing its
    tables and left bench.json behind."""
    out = tmp_path / "b"
    argv = ["bench", "mdlm-tiny", "--methods", "rtn", "--nsamples", "2", "--seq-len", "16"]
    assert cli.main([*argv, "--data", data, "--out", str(out)]) != 0
    assert "names no evaluation data" in one_line_error(capsys)
    assert not out.exists()


def test_a_refused_run_leaves_no_empty_parent_folders(tmp_path, capsys):
    """check_output_dir creates --out's parents to prove they are writable; a run refused
    after that (a missing calibration file) used to leave them behind, empty."""
    out = tmp_path / "a" / "b" / "c" / "d"
    argv = ["quantize", "mdlm-tiny", "--method", "rtn", "--nsamples", "2", "--seq-len", "16"]
    assert cli.main([*argv, "--calib", str(tmp_path / "nope.jsonl"), "--out", str(out)]) != 0
    assert "nope.jsonl" in one_line_error(capsys)
    assert not (tmp_path / "a").exists()
    assert cli.main([*argv, "--out", str(out)]) == 0  # the writer makes them when it writes
    assert (out / "config.json").is_file()


def test_an_unknown_seeded_scheme_is_refused_before_calibrating(tmp_path, capsys):
    """`--seeded-schemes w9` (a typo) used to run every scheme on the first seed alone."""
    out = tmp_path / "b"
    argv = ["bench", "mdlm-tiny", "--methods", "rtn", "--schemes", "w4g128", "--calib-seeds"]
    assert cli.main([*argv, "0,1", "--seeded-schemes", "w9", "--out", str(out)]) != 0
    assert "unknown --seeded-schemes ['w9']" in one_line_error(capsys)
    assert not out.exists()
