"""MDLM's zero-shot perplexity protocol: detokenizers and row wrapping on fixed inputs whose
outputs were derived by hand from kuleshov-group/mdlm's dataloader.py, and the CLI switch."""

import json

import pytest
import torch

from benchmark_scripts import load_benchmark
from faircalib import hub
from faircalib.cli import main
from faircalib.data import load_texts
from faircalib.data.corpora import load_rows
from faircalib.data.sources import load_source
from faircalib.data.tokenizers import EOS
from faircalib.errors import ConfigError, DataError
from faircalib.eval.detokenizers import DETOKENIZERS, get_detokenizer
from faircalib.eval.protocols import mdlm_sequences, protocol_sequences, wrap_rows

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return hub.load_tokenizer("mdlm-tiny")


WIKITEXT_CASES = [
    # heading markers join; the space before the newline goes
    (" = = Early life = = \n", " == Early life ==\n"),
    # escaped number separators, comma spacing, brackets, contraction; " .\n" is left alone
    (
        "Smith 's team scored 3 @,@ 000 points in the 1 @.@ 5 @-@ hour game ( see below ) , "
        "and won .\n",
        "Smith's team scored 3,000 points in the 1.5-hour game (see below), and won .\n",
    ),
    # plural possessive first, then "; ", the quote pair, " \n", and N -> 1
    (
        'the players \' union said " we will strike " ; N members \n',
        'the players\' union said "we will strike"; 1 members\n',
    ),
    ("about 20 \N{DEGREE SIGN} C", "about 20\N{DEGREE SIGN}C"),
    ("a /' 5/ b", "a /'[0-9]/ b"),  # MDLM's rule with slashes in its pattern, kept as it is
]


@pytest.mark.parametrize(("row", "expected"), WIKITEXT_CASES)
def test_wikitext_detokenizer(row, expected):
    assert DETOKENIZERS["wikitext"](row) == expected


def test_ptb_lm1b_lambada_detokenizers():
    ptb = "the company 's profit wo n't rise \\/ fall N N % to $ N <unk>"
    # " N N " needs a second pass: one pass does not rescan its own output
    assert DETOKENIZERS["ptb"](ptb) == "the company's profit won't rise / fall 1 1 % to $1 ?"
    lm1b = 'He said " it \'s fine " ( really ) , see http : / / x.org / docs ; we are done .'
    assert DETOKENIZERS["lm1b"](lm1b) == (
        'He said "it\'s fine" (really), see http://x.org/docs; we are done.'
    )
    lambada = "  \N{LEFT DOUBLE QUOTATION MARK}Hi,\N{RIGHT DOUBLE QUOTATION MARK} she said.  "
    assert DETOKENIZERS["lambada"](lambada) == '\n"Hi," she said.'
    assert get_detokenizer("none") is None
    with pytest.raises(ConfigError, match="unknown detokenizer 'moses'"):
        get_detokenizer("moses")


def test_detokenizer_changes_the_rows_the_issue_counted():
    rows = load_rows("wikitext2", "test")
    changed = sum(DETOKENIZERS["wikitext"](r) != r for r in rows)
    assert (changed, len(rows)) == (2891, 4358)  # issue 17's count from MDLM's code


def test_wrap_rows_frames_pieces_with_bos_and_eos():
    rows = [[1, 2, 3], [4], [5, 6]]
    # stream 1 2 3 E 4 E 5 6 E (9 tokens): two pieces of 4, the ninth token dropped
    assert wrap_rows(rows, 6, bos=8, eos=9).tolist() == [[8, 1, 2, 3, 9, 9], [8, 4, 9, 5, 6, 9]]
    # concatenation per batch of 2 rows: 1 2 3 E 4 E -> one piece (4 E dropped); 5 6 E -> none
    assert wrap_rows(rows, 6, bos=8, eos=9, group_rows=2).tolist() == [[8, 1, 2, 3, 9, 9]]
    with pytest.raises(DataError, match="shorter than one evaluation row"):
        wrap_rows([[1]], 6, bos=8, eos=9)


def test_mdlm_sequences_detokenize_every_row_and_end_it(tok):
    eos = tok.token_to_id(EOS)
    rows = ["Hello , world . Bye .\n", "", "It 's here"]
    # by hand: " , " and " . " lose their first space, " .\n" stays, " 's" joins
    expected_text = ["Hello, world. Bye .\n", "", "It's here"]
    stream = []
    for text in expected_text:
        stream += tok.encode(text).ids + [eos]
    seqs, n_bytes = mdlm_sequences(tok, rows, 5, DETOKENIZERS["wikitext"])
    pieces = len(stream) // 3
    assert seqs.tolist() == [[eos, *stream[3 * i : 3 * i + 3], eos] for i in range(pieces)]
    text_bytes = sum(len(t.encode()) for t in expected_text)
    assert n_bytes == round(text_bytes * pieces * 3 / len(stream))


def test_shipped_wikitext_under_mdlm_protocol(tok):
    eos = tok.token_to_id(EOS)
    source = load_source("wikitext2", "test")
    batch = protocol_sequences(tok, source, "mdlm", 128)
    assert batch.detokenizer == "wikitext" and "validation" in batch.note
    first = tok.encode(" = Robert Boulter =\n").ids  # row 1 detokenized by hand; row 0 is ""
    assert batch.sequences[0, :2].tolist() == [eos, eos]  # BOS, then the blank row's EOS
    assert batch.sequences[0, 2 : 2 + len(first)].tolist() == first
    assert (batch.sequences[:, 0] == eos).all() and (batch.sequences[:, -1] == eos).all()
    ours = protocol_sequences(tok, source, "faircalib", 128)
    assert ours.sequences[0, :4].tolist() == tok.encode(load_texts("wikitext2", "test")[0]).ids[:4]


def test_eval_cli_mdlm_protocol_defaults_to_validation(capsys):
    code = main(["eval", "mdlm-tiny", "--protocol", "mdlm", "--limit", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["split"], out["protocol"], out["detokenizer"]) == ("validation", "mdlm", "wikitext")
    assert out["sequences"] == 2 and out["tokens"] == 256
    assert out["data_source"]["rows"] == 3760  # WikiText validation lines (SOURCES.md)
    assert "not shipped" in out["split_note"]


def test_detokenizer_needs_the_mdlm_protocol(capsys):
    assert main(["eval", "mdlm-tiny", "--detokenizer", "ptb"]) == 2
    assert "--detokenizer ptb applies to --protocol mdlm only" in capsys.readouterr().err


def test_protocols_benchmark_smoke(tmp_path):

    from faircalib.data import eval_sequences
    from faircalib.eval import likelihood_bound

    out = load_benchmark("protocols").main(["--smoke", "--out", str(tmp_path)])
    assert [r["protocol"] for r in out["results"]] == ["faircalib", "mdlm"]
    # our protocol's row recomputed from the data API: the first 4 rows, seed 0, 1 sample
    tok = hub.load_tokenizer("mdlm-tiny")
    seqs, n_bytes = eval_sequences(tok, "wikitext2", "test", 128)
    direct = likelihood_bound(
        hub.load("mdlm-tiny"), seqs[:4], round(n_bytes * 4 / len(seqs)), progress=False
    )
    assert out["results"][0]["ppl"] == direct.ppl
    saved = (tmp_path / "protocols.md").read_text()
    assert "python benchmarks/protocols.py --smoke" in saved and "| 4 x 128 |" in saved


@pytest.mark.parametrize("protocol", ["faircalib", "mdlm"])
def test_a_limit_gives_the_first_rows_of_the_whole_text_and_their_bytes(tok, protocol, monkeypatch):
    """With --limit, each protocol tokenizes only the documents (ours) or row groups (MDLM's)
    its rows need; the rows and their bytes are those of the whole text's rows cut to the limit
    (decoded bytes)."""
    from faircalib.data import corpora
    from faircalib.eval import protocols

    source = load_source("wikitext2", "test")
    whole = protocol_sequences(tok, source, protocol, 128)
    assert len(whole.sequences) > 40
    for limit in (1, 7, 40):
        got = protocol_sequences(tok, source, protocol, 128, limit=limit)
        want = whole.sequences[:limit]
        text = tok.decode(want.reshape(-1).tolist(), skip_special_tokens=True)
        assert torch.equal(got.sequences, want)
        assert got.n_bytes == len(text.encode("utf-8"))
    beyond = protocol_sequences(tok, source, protocol, 128, limit=10**6)
    assert torch.equal(beyond.sequences, whole.sequences) and beyond.n_bytes == whole.n_bytes
    # and only the documents / rows those rows need were tokenized
    encoded = []
    module = corpora if protocol == "faircalib" else protocols
    real = module.encode_text
    monkeypatch.setattr(
        module, "encode_text", lambda t, d, **kw: encoded.extend(d) or real(t, d, **kw)
    )
    monkeypatch.setattr(corpora, "_STREAMS", {})
    protocol_sequences(tok, source, protocol, 128, limit=7)
    everything = len(source.docs) if protocol == "faircalib" else len(list(source.row_texts))
    assert 0 < len(encoded) < everything / 2
