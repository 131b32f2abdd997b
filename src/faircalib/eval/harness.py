"""lm-evaluation-harness model `faircalib`: any model `faircalib` loads (shipped name, float,
fake-quant or packed directory, hub id) behind lm-eval's three request types.

    lm_eval --model faircalib --model_args pretrained=MODEL_OR_DIR,mc_num=128 --tasks ...

- `loglikelihood`: LLaDA's Monte Carlo estimate (`mc_num` draws in batches of `mc_batch_size`,
  classifier-free guidance `cfg`), and whether greedy decoding gives the continuation
  (`check_greedy`; off = always False, as LLaDA recommends for speed);
- `loglikelihood_rolling`: our NELBO bound (`rolling_mc_num` draws) summed over lm-eval's
  rolling windows, each at most the model's length;
- `generate_until`: our samplers with the model family's published settings as defaults
  (GENERATION_DEFAULTS), overridable by model_args (`sampler`, `gen_length`, `steps`,
  `block_length`, `temperature`, `top_k`, `top_p`, `alg_temp`, `cfg_scale`, `eps`).
All randomness is seeded by `seed`, so two models scored with one seed see identical noise.

Registration: the package declares the entry point `lm_eval.models: faircalib`, which lm-eval
releases with plugin discovery pick up with no flags. Releases without it (0.4.13 and earlier)
run through `faircalib-lm-eval` (`python -m faircalib.eval.lm_eval_cli`): lm-eval's own CLI
with this model registered, same arguments. In Python, `import faircalib.eval.harness` before
`lm_eval.simple_evaluate(model="faircalib", ...)`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from tqdm import tqdm

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: ours joins, not replaces)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry, register_model
except ImportError as exc:  # pragma: no cover - only without the optional extra
    from faircalib.errors import ConfigError

    raise ConfigError(
        "the lm-evaluation-harness model needs lm-eval: pip install 'faircalib[eval]'"
    ) from exc

from faircalib import hub
from faircalib.data.tokenizers import EOS
from faircalib.errors import ConfigError
from faircalib.eval.likelihood import (
    conditional_bound,
    conditional_log_likelihood,
    encode_pair,
    fit_context,
    greedy_match,
    rolling_windows,
)
from faircalib.frontier.samplers import SamplerConfig, generate

# Each family's published generation settings (the defaults of its own lm-eval wrapper):
GENERATION_DEFAULTS: dict[str, dict[str, Any]] = {
    # ML-GSAI/LLaDA eval_llada.py: 1024 tokens in 1024 steps, one block, low-confidence
    # remasking, greedy, no guidance
    "llada": {
        "sampler": "low_confidence",
        "gen_length": 1024,
        "steps": 1024,
        "block_length": 1024,
        "temperature": 0.0,
    },
    # DreamLM/Dream eval/eval.py: 128 new tokens in 128 steps, entropy order, greedy
    "dream": {"sampler": "entropy", "gen_length": 128, "steps": 128, "temperature": 0.0},
    # kuleshov-group/mdlm: its ancestral (ddpm_cache) sampler with the config's 128 steps,
    # sampling from the model (temperature 1). MDLM publishes no conditional generation length:
    # None = half the model's length.
    "mdlm": {"sampler": "ancestral", "gen_length": None, "steps": 128, "temperature": 1.0},
}
SAMPLER_ARGS = {f.name for f in dataclasses.fields(SamplerConfig)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def generation_config(family: str, seq_len: int, overrides: dict[str, Any]) -> SamplerConfig:
    """The family's defaults (MDLM's for unknown families) with `overrides` applied."""
    unknown = sorted(set(overrides) - SAMPLER_ARGS)
    if unknown:
        raise ConfigError(
            f"unknown model_args {unknown}; generation accepts {sorted(SAMPLER_ARGS)}"
        )
    settings = {**GENERATION_DEFAULTS.get(family, GENERATION_DEFAULTS["mdlm"]), **overrides}
    if settings.get("gen_length") is None:
        settings["gen_length"] = seq_len // 2
    cfg = SamplerConfig(**settings)
    cfg.validate()
    return cfg


def resize(cfg: SamplerConfig, gen_length: int) -> SamplerConfig:
    """`cfg` for a generation of `gen_length` tokens with the same steps per token; the block
    is kept where it still tiles the generation, else the generation becomes one block."""
    if gen_length == cfg.gen_length:
        return cfg
    steps = max(1, round(cfg.steps * gen_length / cfg.gen_length))
    block = cfg.block_length
    if block and (gen_length % block or steps % (gen_length // block)):
        block = None
    return dataclasses.replace(cfg, gen_length=gen_length, steps=steps, block_length=block)


def fit_generation(cfg: SamplerConfig, prompt_len: int, seq_len: int) -> tuple[SamplerConfig, int]:
    """(config, prompt tokens kept) so that prompt + generation fit in the model's length: the
    generation is cut to seq_len - 1 at most (`resize`), then the prompt from the left (what
    lm-eval's and Dream's wrappers do)."""
    cfg = resize(cfg, min(cfg.gen_length, seq_len - 1))
    return cfg, min(prompt_len, seq_len - cfg.gen_length)


def pick_device(device: str | None) -> str:
    """lm-eval passes `cuda:0` unless told otherwise; like its own HF model, fall back to the
    CPU where there is no GPU."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("no CUDA device: running on the CPU")
        return "cpu"
    return device or "cpu"


class FairCalibLM(LM):
    """lm-eval model over faircalib.hub.load(pretrained). lm-eval's `batch_size` is accepted and
    unused: requests run one at a time, their Monte Carlo draws in batches of `mc_batch_size`."""

    def __init__(
        self,
        pretrained: str,
        device: str = "cpu",
        dtype: str = "float32",
        mc_num: int = 128,
        mc_batch_size: int = 16,
        cfg: float = 0.0,
        check_greedy: bool = True,
        rolling_mc_num: int = 8,
        seed: int = 0,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        **generation: Any,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model = hub.load(pretrained, device=pick_device(device), dtype=DTYPES[dtype])
        self.tokenizer = hub.load_tokenizer(pretrained)
        self.pretrained = str(pretrained)
        self.mc_num, self.mc_batch_size, self.cfg = int(mc_num), int(mc_batch_size), float(cfg)
        self.check_greedy, self.rolling_mc_num = bool(check_greedy), int(rolling_mc_num)
        self.seed = int(seed)
        self.sampler = generation_config(self.model.family, self.model.seq_len, generation)
        self.eos_id = self.tokenizer.token_to_id(EOS)

    @property
    def tokenizer_name(self) -> str:  # lm-eval keys its request cache on this
        return f"faircalib:{self.pretrained}"

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        out = []
        for request in tqdm(requests, desc="loglikelihood", disable=len(requests) < 8):
            context, continuation = request.args
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            ctx = fit_context(ctx, cont, self.model.seq_len)
            ll = conditional_log_likelihood(
                self.model,
                ctx,
                cont,
                mc_samples=self.mc_num,
                batch_size=self.mc_batch_size,
                cfg_scale=self.cfg,
                seed=self.seed,
            )
            greedy = self.check_greedy and greedy_match(self.model, ctx, cont, cfg_scale=self.cfg)
            out.append((ll, bool(greedy)))
            self.cache_hook.add_partial("loglikelihood", request.args, out[-1])
        return out

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        out = []
        for request in tqdm(requests, desc="rolling", disable=len(requests) < 8):
            tokens = self.tokenizer.encode(request.args[0], add_special_tokens=False).ids
            total = 0.0  # an empty text has probability 1
            for ctx, pred in rolling_windows(tokens, self.eos_id, self.model.seq_len):
                total += conditional_bound(
                    self.model, ctx, pred, mc_samples=self.rolling_mc_num, seed=self.seed
                )
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return out

    def generate_until(self, requests: list) -> list[str]:
        return [
            self._generate_one(*request.args)
            for request in tqdm(requests, desc="generate", disable=len(requests) < 8)
        ]

    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        from faircalib.commands.generate import stop_ids

        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        cfg = self.sampler
        if gen_kwargs.get("max_gen_toks"):  # a task's cap on the answer length
            cfg = resize(cfg, min(cfg.gen_length, int(gen_kwargs["max_gen_toks"])))
        ids = self.tokenizer.encode(context).ids or (
            [self.eos_id] if self.eos_id is not None else []
        )
        cfg, keep = fit_generation(cfg, len(ids), self.model.seq_len)
        prompt = torch.tensor([ids[len(ids) - keep :]], dtype=torch.long)
        result = generate(self.model, prompt, cfg, self.seed, trace=False)
        row = result.tokens[0, result.prompt_len :].tolist()
        stops = stop_ids(self.tokenizer)
        row = row[: next((i for i, tok in enumerate(row) if tok in stops), len(row))]
        text = self.tokenizer.decode(row)
        for stop in until:
            text = text.split(stop)[0] if stop else text
        return text


# lm-eval releases with plugin discovery hold our entry point under this name already and load
# this class from it; older ones learn the name here
if "faircalib" not in model_registry:
    register_model("faircalib")(FairCalibLM)
