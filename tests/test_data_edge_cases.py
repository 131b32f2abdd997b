"""Text from other sources than the shipped corpora: special-token strings inside the text,
empty documents, byte-order marks, old line endings, raw separators inside JSON strings, xz and
bz2 compression, suffixes in any case, JSON arrays and CSV tables, unpaired surrogates, uneven
text and characters cut between rows under --limit, a single sequence, and recipes replayed on
changed text or from another directory."""

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


def test_an_unpaired_surrogate_is_named_with_its_line(tmp_path, capsys):
    # scraped JSON Lines often hold half an escaped emoji: no UTF-8 form, so no tokens
    path = tmp_path / "cut.jsonl"
    rows = [json.dumps({"text": f"doc {i} " * 20}) for i in range(3)]
    path.write_text("\n".join([*rows, json.dumps({"text": "broken \ud83d emoji"})]) + "\n")
    with pytest.raises(DataError, match=r"line 4: its text holds U\+D83D, half of a surrogate"):
        load_source(str(path))
    assert main(["eval", "mdlm-tiny", "--data", str(path), "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_suffixes_are_matched_whatever_their_case_and_bz2_is_read(tmp_path, capsys):
    import bz2
    import gzip

    docs = tuple(f"document {i} about cats" for i in range(4))
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "D.JSONL").write_bytes(lines)
    (tmp_path / "d.jsonl.GZ").write_bytes(gzip.compress(lines))
    (tmp_path / "d.jsonl.bz2").write_bytes(bz2.compress(lines))
    (tmp_path / "d.TXT.BZ2").write_bytes(bz2.compress("\n\n".join(docs).encode()))
    for name in ("D.JSONL", "d.jsonl.GZ", "d.jsonl.bz2", "d.TXT.BZ2"):
        assert load_source(str(tmp_path / name)).docs == docs, name
    zst = tmp_path / "d.jsonl.zst"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 16)
    with pytest.raises(DataError, match="zstd-compressed, which faircalib does not read"):
        load_source(str(zst))
    # JSON Lines under a plain-text name are read as the suffix says, with a warning
    misnamed = tmp_path / "rows.txt"
    misnamed.write_bytes(lines)
    capsys.readouterr()
    assert len(load_source(str(misnamed)).docs) == 1
    assert "its first line is a JSON object; rename it .jsonl" in capsys.readouterr().err


def test_json_arrays_and_csv_tables_give_one_document_per_item(tmp_path):
    docs = ("first, with a comma", 'second "quoted"\nover two lines', "third")
    objects = tmp_path / "a.json"
    objects.write_text(json.dumps([{"text": d, "id": i} for i, d in enumerate(docs)], indent=2))
    strings = tmp_path / "b.json"
    strings.write_text(json.dumps(list(docs)))
    assert load_source(str(objects)).docs == load_source(str(strings)).docs == docs
    import csv

    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"t{suffix}"
        with path.open("w", newline="") as f:
            writer = csv.writer(f, delimiter=delimiter)
            writer.writerow(["id", "body"])
            writer.writerows([i, d] for i, d in enumerate(docs))
        source = load_source(str(path), text_field="body")
        assert source.docs == docs and source.kind == "csv"
        with pytest.raises(DataError, match="no column 'text' in its header"):
            load_source(str(path))
    broken = tmp_path / "c.json"
    broken.write_text('[{"text": "a"},')
    with pytest.raises(DataError, match="starts with '\\[' but is not one JSON array"):
        load_source(str(broken))


def test_limit_counts_bytes_of_characters_cut_between_rows_once(tmp_path):
    # emoji (4 bytes, several byte-level tokens each) cut at row boundaries: the kept rows'
    # bytes are the UTF-8 bytes of their tokens, counted here token by token (decoded row by
    # row, each cut character came back as replacement characters of 3 bytes)
    from faircalib.eval.protocols import first_rows, protocol_sequences

    tok = hub.load_tokenizer("mdlm-tiny")
    path = tmp_path / "emoji.txt"
    path.write_text("\n\n".join("🌍🌎🌏 weather 🌧️🌦️" * 20 for _ in range(6)))
    batch = protocol_sequences(tok, load_source(str(path)), "faircalib", 64)
    seqs, n_bytes = first_rows(tok, batch.sequences, batch.n_bytes, 5)
    # a byte-level token spells each of its bytes as one character
    special = {tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|mask|>")}
    kept = [i for i in seqs.reshape(-1).tolist() if i not in special]
    exact = sum(len(tok.id_to_token(i)) for i in kept)
    assert abs(n_bytes - exact) <= 3  # at most the last row's cut character
    rowwise = sum(len(t.encode()) for t in tok.decode_batch(seqs.tolist()))
    assert rowwise - exact > 3  # counted row by row, every cut character was overstated


def test_directory_hash_ignores_hidden_files_and_datasets_caches(tmp_path):
    from faircalib.data.sources import directory_sha256

    (tmp_path / "data-00000-of-00001.arrow").write_bytes(b"rows")
    (tmp_path / "state.json").write_text("{}")
    before = directory_sha256(tmp_path)
    (tmp_path / ".DS_Store").write_bytes(b"finder")
    (tmp_path / "cache-1234abcd.arrow").write_bytes(b"a map() result")
    assert directory_sha256(tmp_path) == before
    (tmp_path / "data-00000-of-00001.arrow").write_bytes(b"other rows")
    assert directory_sha256(tmp_path) != before


def test_a_recipe_names_its_local_inputs_absolutely(tmp_path, monkeypatch, capsys):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "calib.txt").write_text(f"{ENGLISH}\n\n{ENGLISH}\n")
    monkeypatch.chdir(work)
    argv = ["quantize", "mdlm-tiny", "--method", "rtn", "--calib", "calib.txt", "--nsamples", "2"]
    assert main([*argv, "--seq-len", "32", "--out", "q"]) == 0
    recipe = json.loads((work / "q" / "recipe.json").read_text())
    assert recipe["args"]["calib"] == str(work / "calib.txt") and recipe["model"] == "mdlm-tiny"
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["quantize", "--config", str(work / "q" / "recipe.json"), "--out", "r"]) == 0
    assert "differs from the recipe's" not in capsys.readouterr().err
    written = sorted(p.name for p in (work / "q").glob("*.safetensors"))
    assert written and written == sorted(p.name for p in (elsewhere / "r").glob("*.safetensors"))
    for name in written:
        assert (work / "q" / name).read_bytes() == (elsewhere / "r" / name).read_bytes()


def test_bench_data_keeps_a_path_with_a_comma_whole(tmp_path):
    from faircalib.commands.bench import eval_specs

    path = tmp_path / "a,b.txt"
    path.write_text("text")
    assert eval_specs(f"wikitext2,{path},c4", None) == ["wikitext2", str(path), "c4"]
    assert eval_specs(f"{path}", "test") == [f"{path}:test"]
    assert eval_specs("wikitext2,c4", None) == ["wikitext2", "c4"]


def test_a_cpu_replay_with_another_thread_count_says_so(tmp_path, capsys):
    import torch

    calib = tmp_path / "calib.txt"
    calib.write_text(f"{ENGLISH}\n\n{ENGLISH}\n")
    argv = ["quantize", "mdlm-tiny", "--method", "rtn", "--calib", str(calib), "--nsamples", "2"]
    assert main([*argv, "--seq-len", "32", "--device", "cpu", "--out", str(tmp_path / "a")]) == 0
    recipe = json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert recipe["cpu_threads"] == torch.get_num_threads()
    recipe["cpu_threads"] = torch.get_num_threads() + 3
    (tmp_path / "a" / "recipe.json").write_text(json.dumps(recipe))
    capsys.readouterr()
    replay = ["quantize", "--config", str(tmp_path / "a" / "recipe.json"), "--device", "cpu"]
    assert main([*replay, "--out", str(tmp_path / "b")]) == 0
    assert f"set OMP_NUM_THREADS={torch.get_num_threads() + 3} for a bit-identical" in (
        capsys.readouterr().err
    )


def test_json_nested_deeper_than_the_stack_is_one_line(tmp_path):
    """A JSON line (or array) of 100,000 open brackets raised RecursionError in json.loads;
    evaluation data, a JSON array and a training shard all refuse it in one line."""
    from faircalib.data.sources import load_source
    from faircalib.training import read_documents

    lines = tmp_path / "deep.jsonl"
    lines.write_text('{"text": "a document"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(DataError, match="line 2 nests JSON too deeply"):
        load_source(str(lines))
    array = tmp_path / "deep.json"
    array.write_text("[" * 100_000)
    with pytest.raises(DataError, match="nests JSON too deeply"):
        load_source(str(array))
    with pytest.raises(DataError, match="line 2 nests JSON too deeply"):
        list(read_documents([str(lines)]))


def test_numbers_past_pythons_digit_limit_are_one_line(tmp_path):
    """json.loads raises a plain ValueError (not JSONDecodeError) for an integer of more than
    4300 digits: one DataError naming the file (and line), in JSON Lines, arrays and tasks."""
    from faircalib.eval.tasks import load_task

    huge = "1" * 5000
    lines = tmp_path / "big.jsonl"
    lines.write_text(f'{{"text": "abc", "id": {huge}}}\n')
    array = tmp_path / "big.json"
    array.write_text(f'[{{"text": "abc", "id": {huge}}}]')
    task = tmp_path / "task.jsonl"
    task.write_text(f'{{"context": "a", "choices": [" b", " c"], "answer": 0, "id": {huge}}}\n')
    for path, where in ((lines, "line 1"), (array, "big.json"), (task, "line 1")):
        with pytest.raises(DataError, match=where) as exc:
            load_source(str(path)).docs if path != task else load_task(path)
        assert "\n" not in str(exc.value)


def test_task_files_read_as_data_files_do(tmp_path):
    """A task file is JSON Lines as the data files are: a byte-order mark is no content, a raw
    U+2028 inside a string does not end its line, and a lone surrogate is refused at load
    (it used to fail mid-run in the tokenizer)."""
    from faircalib.eval.tasks import load_task

    item = {"context": "a\u2028b", "choices": [" yes", " no"], "answer": 1}
    path = tmp_path / "task.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(item, ensure_ascii=False) + "\r\n").encode())
    items, record = load_task(path)
    assert record["items"] == 1 and items[0].context == "a\u2028b" and items[0].answer == 1
    path.write_text('{"context": "cut \\ud83d", "choices": [" a", " b"], "answer": 0}\n')
    with pytest.raises(DataError, match="line 1.*surrogate"):
        load_task(path)


def test_csv_and_tsv_rows_are_read_whole_or_refused(tmp_path):
    """A CSV cell longer than csv's default 131,072-character field limit is read; a TSV is read
    without quote handling (text/tab-separated-values has none), so a text starting with a
    quote mark no longer swallows the rows after it; a row with more or fewer fields than the
    header is refused, naming the row."""
    long = tmp_path / "long.csv"
    long.write_text("text\n" + "a b " * 50_000 + "\n")
    assert len(load_source(str(long)).docs[0]) == 200_000
    tsv = tmp_path / "q.tsv"
    tsv.write_text('id\ttext\n1\t"quoted start\n2\tsecond doc\n3\t"Hello," she said.\n')
    assert load_source(str(tsv)).docs == ('"quoted start', "second doc", '"Hello," she said.')
    quoted = tmp_path / "ok.csv"
    quoted.write_text('id,text\n1,"He said ""hi"", then left"\n')
    assert load_source(str(quoted)).docs == ('He said "hi", then left',)
    bad = (
        ("stray.tsv", "id\ttext\n1\thello\tworld\n", "row 1 has 3 fields where the header has 2"),
        ("short.csv", "id,text\n1\n", "row 1 has 1 fields where the header has 2"),
        ("quote.csv", 'id,text\n1,"Hello," she said.\n', "line 2: ',' expected after"),
    )
    for name, body, reason in bad:
        path = tmp_path / name
        path.write_text(body)
        with pytest.raises(DataError, match=reason):
            load_source(str(path))
