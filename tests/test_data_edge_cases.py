"""Text from other sources than the shipped corpora: special-token strings inside the text,
empty documents, byte-order marks, old line endings, raw separators inside JSON strings, xz
compression, uneven text under --limit, a single sequence, and a recipe replayed on changed
text."""

import json
import lzma

import pytest

from faircalib import hub
from faircalib.cli import main
from faircalib.data.sources import load_source, plain_text_docs
from faircalib.data.tokenizers import encode_text
from faircalib.errors import DataError

ENGLISH = " ".join(f"the cat number {i} sat on the mat and looked at the door." for i in range(40))
CHINESE = "扩散语言模型的量化是一个活跃的研究领域。" * 30


def strict_json(text: str) -> dict:
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def eval_json(capsys, *argv: str) -> dict:
    assert main(["eval", "mdlm-tiny", *argv, "--json"]) == 0
    return strict_json(capsys.readouterr().out)


def test_special_token_strings_in_the_text_are_plain_text(tmp_path, capsys):
    tok = hub.load_tokenizer("mdlm-tiny")
    mask, eos = tok.token_to_id("<|mask|>"), tok.token_to_id("<|endoftext|>")
    ids = encode_text(tok, ["a <|mask|> b <|endoftext|> c"])[0]
    assert mask not in ids and eos not in ids
    assert tok.decode(ids) == "a <|mask|> b <|endoftext|> c"
    assert tok.encode_special_tokens is False  # the tokenizer is left as it was
    path = tmp_path / "doc.txt"
    path.write_text(f"{ENGLISH} <|mask|> {ENGLISH}\n")
    result = eval_json(capsys, "--data", str(path), "--limit", "4")
    assert result["ppl"] < 1e6  # a clean [MASK] id would make the bound infinite


def test_data_whose_documents_are_all_empty_is_refused(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(50)))
    assert main(["eval", "mdlm-tiny", "--data", str(path)]) == 2
    assert "holds no text: its 50 document(s) are all empty" in capsys.readouterr().err
    argv = ["quantize", "mdlm-tiny", "--method", "rtn", "--calib", str(path), "--nsamples", "1"]
    assert main([*argv, "--out", str(tmp_path / "q")]) == 2
    assert "holds no text" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_one_sequence_has_no_interval_and_the_json_stays_json(tmp_path, capsys):
    path = tmp_path / "doc.txt"
    path.write_text(ENGLISH + "\n")
    result = eval_json(capsys, "--data", str(path), "--limit", "1")
    assert result["sequences"] == 1 and result["ci95"] is None
    assert main(["eval", "mdlm-tiny", "--data", str(path), "--limit", "1"]) == 0
    assert "one sequence: no CI" in capsys.readouterr().out


def test_limit_counts_the_bytes_of_the_rows_it_keeps(tmp_path, capsys):
    english, mixed = tmp_path / "en.txt", tmp_path / "mixed.txt"
    english.write_text(f"{ENGLISH}\n\n{ENGLISH}\n")
    mixed.write_text(f"{ENGLISH}\n\n{ENGLISH}\n\n" + f"{CHINESE}\n\n" * 8)
    alone = eval_json(capsys, "--data", str(english), "--limit", "2")
    first = eval_json(capsys, "--data", str(mixed), "--limit", "2")
    # the first two rows of the mixed file are the same English rows: the same bytes, not
    # the mixed file's average bytes per token times their tokens
    assert first["tokens"] == alone["tokens"]
    assert first["bytes"] == alone["bytes"]


def test_byte_order_marks_old_line_endings_and_xz(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("first block\n\nsecond block\n")
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert (
        load_source(str(bom)).docs
        == load_source(str(plain)).docs
        == (
            "first block",
            "second block",
        )
    )
    assert plain_text_docs("one\r\rtwo\r") == ("one", "two")  # old Mac line endings
    lines = "".join(json.dumps({"text": d}) + "\n" for d in ("a\u2028b", "c\x85d"))
    raw = tmp_path / "seps.jsonl"
    raw.write_text(lines)  # raw U+2028 / U+0085 inside JSON strings are legal JSON
    assert load_source(str(raw)).docs == ("a\u2028b", "c\x85d")
    with_bom = tmp_path / "bom.jsonl"
    with_bom.write_bytes(b"\xef\xbb\xbf" + raw.read_bytes())
    assert load_source(str(with_bom)).docs == ("a\u2028b", "c\x85d")
    xz = tmp_path / "seps.jsonl.xz"
    xz.write_bytes(lzma.compress(raw.read_bytes()))
    assert load_source(str(xz)).docs == ("a\u2028b", "c\x85d")
    broken = tmp_path / "broken.jsonl.xz"
    broken.write_bytes(lzma.compress(raw.read_bytes())[:20])
    with pytest.raises(DataError, match="looks xz-compressed but cannot be read"):
        load_source(str(broken))


def test_eval_past_the_training_length_warns(tmp_path, capsys):
    path = tmp_path / "doc.txt"
    path.write_text(f"{ENGLISH}\n")
    assert main(["eval", "mdlm-tiny", "--data", str(path), "--seq-len", "256", "--limit", "1"]) == 0
    assert "--seq-len 256 is longer than mdlm-tiny's training length 128" in (
        capsys.readouterr().err
    )


def test_a_recipe_replayed_on_changed_text_says_so(tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(f"{ENGLISH}\n\n{ENGLISH}\n")
    argv = ["quantize", "mdlm-tiny", "--method", "rtn", "--calib", str(calib), "--nsamples", "2"]
    assert main([*argv, "--seq-len", "32", "--out", str(tmp_path / "a")]) == 0
    recipe = tmp_path / "a" / "recipe.json"
    replay = ["quantize", "--config", str(recipe)]
    capsys.readouterr()
    assert main([*replay, "--out", str(tmp_path / "b")]) == 0
    assert "differs from the recipe's" not in capsys.readouterr().err
    calib.write_text(f"{ENGLISH} changed\n\n{ENGLISH}\n")
    assert main([*replay, "--out", str(tmp_path / "c")]) == 0
    assert "differs from the recipe's (sha256" in capsys.readouterr().err


def test_calibrating_on_an_evaluation_split_warns(tmp_path, capsys):
    argv = ["quantize", "mdlm-tiny", "--method", "rtn", "--nsamples", "2", "--seq-len", "16"]
    assert (
        main([*argv, "--calib", "c4", "--calib-split", "validation", "--out", str(tmp_path / "a")])
        == 0
    )
    assert "calibrating on c4/validation, a split faircalib evaluates on" in capsys.readouterr().err
    assert main([*argv, "--calib", "c4", "--out", str(tmp_path / "b")]) == 0  # c4/train
    assert "a split faircalib evaluates on" not in capsys.readouterr().err
