"""benchmarks/unigram_floor.py --tokens: the add-one unigram model of a token file, without the
validation tail `faircalib train` holds out, scored on WikiText-2 like the seed table."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np

from faircalib import hub
from faircalib.data import eval_sequences

ROOT = Path(__file__).resolve().parents[1]


def test_the_floor_of_a_token_file_leaves_out_the_trainers_validation_tail(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "unigram_floor", ROOT / "benchmarks/unigram_floor.py"
    )
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    rng = np.random.default_rng(0)
    ids = np.minimum(2 + rng.zipf(1.5, size=20_000), 8191).astype(np.uint16)
    ids[-100:] = 7  # the last 0.5% (the trainer's validation tail): must not count
    np.save(tmp_path / "tokens.npy", ids)
    out = floor.main(["--tokens", str(tmp_path / "tokens.npy"), "--out", str(tmp_path / "o")])
    counts = np.bincount(ids[:-100], minlength=8192) + 1.0  # add-one, by hand
    tok = hub.load_tokenizer("mdlm-small")
    seqs, n_bytes = eval_sequences(tok, "wikitext2", "test", 512)
    nats = -np.log(counts / counts.sum())[seqs.flatten().numpy()].sum()
    got = out["unigram_ppl"]["wikitext2:test"]
    assert math.isclose(got, math.exp(nats / seqs.numel()), rel_tol=1e-9)
    bits = out["unigram_bits_per_byte"]["wikitext2:test"]
    assert math.isclose(bits, nats / n_bytes / math.log(2), rel_tol=1e-9)
    assert out["unigram_ppl"]["training tokens"] == len(ids) - 100
    assert json.loads((tmp_path / "o" / "unigram.json").read_text())["fitted_on"].endswith(
        "tokens.npy"
    )
