"""The lm-evaluation-harness model `faircalib`, offline on mdlm-tiny with small local JSON
tasks: float, fake-quant and packed models; every response checked against a direct call."""

import json
from importlib.metadata import entry_points

import pytest
import torch

from faircalib import hub
from faircalib.cli import main
from faircalib.eval.likelihood import (
    conditional_bound,
    conditional_log_likelihood,
    encode_pair,
    rolling_windows,
)
from faircalib.frontier.samplers import SamplerConfig, generate

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (pip install 'faircalib[eval]')"
)
from faircalib.eval import harness  # noqa: E402  (needs lm_eval)

torch.set_num_threads(1)

MC_ITEMS = [
    {"context": "The capital of France is", "choices": [" Paris", " banana"], "answer": 0},
    {"context": "One, two, three,", "choices": [" four", " purple"], "answer": 0},
]
TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # > 128 tokens: several windows
PROMPT = "The history of the city"
ARGS = "mc_num=8,mc_batch_size=4,rolling_mc_num=4,steps=8"


def direct_generation(model, tok) -> str:
    """MDLM's defaults (its ancestral sampler at temperature 1; 64 tokens, half of mdlm-tiny's
    length, in the 8 steps ARGS sets) capped by the task's max_gen_toks = 16 with the same
    steps per token (8 * 16 / 64 = 2), cut at the end-of-text token."""
    cfg = SamplerConfig(sampler="ancestral", steps=2, gen_length=16, temperature=1.0)
    prompt = tok.encode(PROMPT).ids
    row = generate(model, torch.tensor([prompt]), cfg, 0, trace=False).tokens[0, len(prompt) :]
    row, eos = row.tolist(), tok.token_to_id("<|endoftext|>")
    return tok.decode(row[: row.index(eos)] if eos in row else row)


def write_tasks(folder):
    data = {"mc": MC_ITEMS, "ppl": [{"text": TEXT}], "gen": [{"question": PROMPT, "answer": " is"}]}
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        "dataset_path: json\ndataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n"
        "    test: {file}\ntest_split: test\n"
    )
    specs = {
        "mc": 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n",
        "ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n",
        "gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
        "  max_gen_toks: 16\nmetric_list:\n  - metric: exact_match\n",
    }
    for name, body in specs.items():
        head = common.format(cache=folder / "hf", file=folder / f"{name}.jsonl")
        (folder / f"fc_{name}.yaml").write_text(f"task: fc_{name}\n{head}{body}")


def test_entry_point_names_the_model():
    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "faircalib"]
    assert ep.load() is harness.FairCalibLM
    assert lm_eval.api.registry.get_model("faircalib") is harness.FairCalibLM


def test_local_tasks_end_to_end_with_direct_checks(tmp_path):
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path)
    result = lm_eval.simple_evaluate(
        model="faircalib",
        model_args=f"pretrained=mdlm-tiny,{ARGS}",
        tasks=["fc_mc", "fc_ppl", "fc_gen"],
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        log_samples=True,
    )
    model, tok = hub.load("mdlm-tiny"), hub.load_tokenizer("mdlm-tiny")
    responses = [s["resps"] for s in result["samples"]["fc_mc"]]
    for item, resp in zip(MC_ITEMS, responses, strict=True):
        for choice, ((ll, _),) in zip(item["choices"], resp, strict=True):
            ctx, cont = encode_pair(tok, item["context"], choice)
            assert ll == conditional_log_likelihood(model, ctx, cont, mc_samples=8, batch_size=4)
    ids = tok.encode(TEXT).ids
    windows = rolling_windows(ids, tok.token_to_id("<|endoftext|>"), 128)
    assert len(windows) == 2
    bound = sum(conditional_bound(model, c, p, mc_samples=4) for c, p in windows)
    ((rolled,),) = result["samples"]["fc_ppl"][0]["resps"]
    assert rolled == pytest.approx(bound, rel=1e-6)
    (generated,) = result["samples"]["fc_gen"][0]["resps"][0]
    assert generated == direct_generation(model, tok).split("\n")[0]
    assert 0.0 <= result["results"]["fc_mc"]["acc,none"] <= 1.0


def test_fake_quant_and_packed_models(tmp_path, capsys):
    from lm_eval.api.instance import Instance

    args = ["quantize", "mdlm-tiny", "--method", "rtn", "--bits", "4", "--group-size", "64"]
    args += ["--nsamples", "2", "--seq-len", "32", "--json"]
    assert main([*args, "--format", "fake", "--out", str(tmp_path / "fake")]) == 0
    assert main([*args, "--format", "packed", "--out", str(tmp_path / "packed")]) == 0
    capsys.readouterr()
    requests = [
        Instance("loglikelihood", {}, (item["context"], item["choices"][0]), 0) for item in MC_ITEMS
    ]
    scores = {}
    for kind in ("mdlm-tiny", tmp_path / "fake", tmp_path / "packed"):
        lm = harness.FairCalibLM.create_from_arg_string(f"pretrained={kind},{ARGS}")
        scores[kind] = [ll for ll, _ in lm.loglikelihood(requests)]
    packed = hub.load(tmp_path / "packed")
    tok = hub.load_tokenizer("mdlm-tiny")
    for (context, continuation), ll in zip(
        (r.args for r in requests), scores[tmp_path / "packed"], strict=True
    ):
        ctx, cont = encode_pair(tok, context, continuation)
        assert ll == conditional_log_likelihood(packed, ctx, cont, mc_samples=8, batch_size=4)
    # the packed checkpoint keeps embeddings, head and scales in bf16: close to fake-quant,
    # not equal; both differ from the float model
    assert scores[tmp_path / "packed"] == pytest.approx(scores[tmp_path / "fake"], rel=0.01)
    assert scores[tmp_path / "fake"] != scores["mdlm-tiny"]
    gen = Instance("generate_until", {}, (PROMPT, {"until": ["\n"], "max_gen_toks": 16}), 0)
    assert lm.generate_until([gen]) == [direct_generation(packed, tok).split("\n")[0]]


def test_unknown_model_args_are_refused():
    from faircalib.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown model_args \['beam_size'\]"):
        harness.FairCalibLM(pretrained="mdlm-tiny", beam_size=4)
    # 200 tokens in 100 steps -> 127 (the most that fits) in round(63.5) = 64; prompt: 1 token
    cfg, keep = harness.fit_generation(SamplerConfig(gen_length=200, steps=100), 90, 128)
    assert (cfg.gen_length, cfg.steps, cfg.block_length, keep) == (127, 64, None, 1)
    # LLaDA's 1024 / 1024 / one block of 1024, capped at 256: 256 steps; 1024 no longer tiles
    llada = harness.generation_config("llada", 4096, {})
    assert (llada.gen_length, llada.steps, llada.block_length) == (1024, 1024, 1024)
    capped = harness.resize(llada, 256)
    assert (capped.gen_length, capped.steps, capped.block_length) == (256, 256, None)
    blocks = harness.resize(SamplerConfig(gen_length=256, steps=256, block_length=32), 128)
    assert (blocks.steps, blocks.block_length) == (128, 32)  # 4 blocks of 32, 32 steps each
