"""A sampler option the family's own sampler does not read is named in a warning, not dropped
silently (`DiffusionLM.sampler_fields`, `frontier.samplers.ignored_options`)."""

import dataclasses
import warnings

import pytest
import torch

from faircalib import hub
from faircalib.cli import main
from faircalib.frontier.samplers import IgnoredSamplerOptions, SamplerConfig, generate

PROMPT = torch.tensor([[5, 9, 13]])
BASE = SamplerConfig(steps=6, gen_length=6)


def _run(model, cfg):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = generate(model, PROMPT, cfg, seed=0, trace=False).tokens
    return tokens, [w.message for w in caught if isinstance(w.message, IgnoredSamplerOptions)]


def test_gaussian_sampler_names_what_it_ignores_and_its_output_does_not_move():
    model = hub.load("diffusionlm-tiny")
    plain, none = _run(model, BASE)
    assert none == []
    extra = dataclasses.replace(BASE, block_length=3, temperature=1.0, top_k=5, cfg_scale=1.5)
    tokens, warned = _run(model, extra)
    assert torch.equal(tokens, plain)  # the options really are ignored: the same sample
    assert [w.fields for w in warned] == [["block_length", "temperature", "top_k", "cfg_scale"]]
    assert "--block-length" in str(warned[0]) and "diffusion_lm" in str(warned[0])


def test_options_a_sampler_reads_give_no_warning():
    planner = hub.load("planner-tiny")
    hot = dataclasses.replace(BASE, temperature=1.0)
    tokens, warned = _run(planner, hot)
    assert warned == [] and not torch.equal(tokens, _run(planner, BASE)[0])  # it is read
    mdlm = hub.load("mdlm-tiny")  # the shared masked samplers read every option
    assert _run(mdlm, dataclasses.replace(BASE, block_length=3, temperature=1.0))[1] == []


def test_cli_prints_one_warning_line(capsys):
    args = ["generate", "diffusionlm-tiny", "--prompt", "The", "--gen-length", "4"]
    assert main([*args, "--steps", "4", "--block-length", "2", "--json"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert err == [
        "faircalib generate: warning: the diffusion_lm sampler does not use --block-length; ignored"
    ]


@pytest.mark.parametrize("name", ["diffusionlm-tiny", "planner-tiny"])
def test_declared_fields_are_sampler_config_fields(name):
    fields = {f.name for f in dataclasses.fields(SamplerConfig)}
    assert hub.load(name).sampler_fields <= fields


def test_a_guidance_scale_that_overflows_is_refused():
    """--cfg-scale 1e308 made (scale + 1) x the log-prob gap overflow: every token NaN, the
    text empty and the JSON trace invalid (bare NaN). The largest scale allowed still gives
    finite guided log-probs at the widest gaps float32 log-probs show."""
    from faircalib.errors import ConfigError
    from faircalib.frontier.samplers import MAX_CFG_SCALE, guided

    with pytest.raises(ConfigError, match="--cfg-scale"):
        SamplerConfig(cfg_scale=1e308).validate()
    SamplerConfig(cfg_scale=MAX_CFG_SCALE).validate()
    cond = torch.tensor([[0.0, -100.0, -200.0]]).log_softmax(-1)
    uncond = torch.tensor([[-200.0, -100.0, 0.0]]).log_softmax(-1)
    out = guided(cond, uncond, MAX_CFG_SCALE)
    assert torch.isfinite(out).all() and out.argmax().item() == 0
