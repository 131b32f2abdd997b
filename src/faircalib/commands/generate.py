"""`faircalib generate`: sample text from a (quantized) dLLM with a write-frontier sampler."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from typing import TYPE_CHECKING, Any

from faircalib.commands import argtypes, common
from faircalib.commands.argtypes import positive_int
from faircalib.errors import ConfigError

if TYPE_CHECKING:  # imported in the functions: the parser must not load torch
    from tokenizers import Tokenizer

    from faircalib.frontier.samplers import SamplerConfig

# a generation ends at the first of these the tokenizer has: end of text (shipped tokenizers,
# LLaDA, Dream) and end of turn (LLaDA-Instruct's <|eot_id|>, Dream-Instruct's <|im_end|>)
STOP_TOKENS = ("<|endoftext|>", "<|eot_id|>", "<|im_end|>")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text with a write-frontier sampler",
        description="Generate text from a float, fake-quant or packed model.",
    )
    common.add_model(p)
    p.add_argument(
        "--prompt",
        default="",
        help="text the generation continues (default: none, an unconditional sample)",
    )
    p.add_argument("--gen-length", type=positive_int, default=64, help="tokens to generate")
    p.add_argument("--block-length", type=positive_int, help="semi-AR block (default: gen length)")
    p.add_argument(
        "--steps",
        type=positive_int,
        default=64,
        help="denoising steps of the sampler (model calls); not quantize's --sampler-steps "
        "(calibration masking grid) or --fair-steps (FAIR-Calib's frontier tracking)",
    )
    p.add_argument(
        "--seed", type=argtypes.seed, default=0, help="same seed = same noise for any model"
    )
    p.add_argument(
        "--sampler",
        choices=common.SAMPLER_NAMES,
        default="low_confidence",
        help="order in which masked positions are committed",
    )
    p.add_argument("--temperature", type=argtypes.finite_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (off)")
    p.add_argument("--top-p", type=argtypes.finite_float, help="nucleus sampling mass (off)")
    p.add_argument(
        "--num-samples",
        type=positive_int,
        default=1,
        help="rows generated from the prompt (not --nsamples, calibration sequences)",
    )
    p.add_argument(
        "--cfg-scale",
        type=argtypes.finite_float,
        default=0.0,
        help="classifier-free guidance (LLaDA): also run the prompt masked; 0 = off",
    )
    p.add_argument(
        "--alg-temp",
        type=argtypes.finite_float,
        help="maskgit_plus / topk_margin / entropy (Dream): draw positions from "
        "softmax(confidence / alg-temp) instead of taking the most confident",
    )
    p.add_argument(
        "--eps",
        type=argtypes.finite_float,
        default=1e-3,
        help="Dream orders: final time of the grid",
    )
    p.add_argument(
        "--cache",
        choices=("none", "prefix", "dual"),
        default="none",
        help="Fast-dLLM K/V cache of block decoding (approximate under bidirectional "
        "attention): prefix keeps the prompt and finished blocks, dual also the masked suffix; "
        "refreshed at each block's first step",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap --prompt as one user turn in the model family's chat template (Instruct)",
    )
    common.add_device(p)
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each denoising step from a captured CUDA graph (CUDA only; same output)",
    )
    p.add_argument(
        "--stack-linears",
        action="store_true",
        help="run q, k, v (and gate, up) as one stacked layer each where their quantization "
        "matches: one GEMM instead of three (two); the same math, up to accumulation order "
        "(3-14%% faster batch-1 generation of an 8B-shaped LLaDA on an H200; README)",
    )
    common.add_json(p)
    p.set_defaults(func=run)


def _say_what_stacked(model: Any) -> None:
    """One warning line when --stack-linears stacked less than it could: groups left apart
    (a mixed recipe, fake-quant layers) or a family that declares no readers to stack."""
    report = getattr(model, "stack_report", None)
    if report is None or (not report.stacked and not report.left):
        print(
            "faircalib generate: warning: --stack-linears: this model declares no layers that "
            "read one input (a residual layout), so nothing was stacked",
            file=sys.stderr,
        )
    elif report.left:
        paths, why = report.left[0]
        print(
            f"faircalib generate: warning: --stack-linears left {len(report.left)} of "
            f"{len(report.left) + len(report.stacked)} groups apart, e.g. {', '.join(paths)}: "
            f"{why}",
            file=sys.stderr,
        )


def generate_texts(
    model_name: str,
    prompt: str,
    cfg: SamplerConfig,
    *,
    seed: int = 0,
    num_samples: int = 1,
    device: str = "cpu",
    cuda_graph: bool = False,
    progress: bool = True,
    chat: bool = False,
    stack: bool = False,
) -> dict[str, Any]:
    """-> {"texts", "tokens", "trace"}; texts are the generated part, cut at the first stop
    token. `chat`: `prompt` is a user message, formatted with the family's chat template."""
    import torch
    from tqdm import tqdm

    from faircalib import hub
    from faircalib.frontier.samplers import IgnoredSamplerOptions, generate, ignored_options
    from faircalib.models.chat import chat_prompt

    if num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {num_samples}")
    model = hub.load(model_name, device=device, stack=stack)
    if stack:
        _say_what_stacked(model)
    if cuda_graph:
        from faircalib.models.cuda_graph import CUDAGraphDenoiser

        model = CUDAGraphDenoiser(model)  # refuses a model that is not on a CUDA device
    tokenizer = hub.load_tokenizer(model_name)
    if chat:
        prompt = chat_prompt(model.family, prompt)
    ids = tokenizer.encode(prompt).ids
    if len(ids) + cfg.gen_length > model.seq_len:
        raise ConfigError(
            f"prompt ({len(ids)} tokens) + --gen-length {cfg.gen_length} exceeds "
            f"{model_name}'s sequence length {model.seq_len}; use a shorter --gen-length or prompt"
        )
    cfg.validate()  # before the progress bar: a refusal is then the only line printed
    prompt_ids = torch.tensor([ids] * num_samples, dtype=torch.long)  # [N, P]
    ignored = ignored_options(model, cfg)
    if ignored:  # one line before the bar; the Python warning below would say it again
        message = IgnoredSamplerOptions(getattr(model, "family", "model"), ignored)
        print(f"faircalib generate: warning: {message}", file=sys.stderr)
    with (
        tqdm(total=cfg.steps, desc="generate", unit="step", disable=not progress) as bar,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", IgnoredSamplerOptions)
        result = generate(model, prompt_ids, cfg, seed, trace=True, progress=bar.update)
    generated = result.tokens[:, result.prompt_len :].tolist()
    cut = [_until_stop(row, stop_ids(tokenizer)) for row in generated]
    texts = [tokenizer.decode(row) for row in cut]
    out = {"texts": texts, "tokens": result.tokens.tolist(), "trace": result.trace.to_dict()}
    if result.stats is not None:  # what it cost: model calls, token rows run, tokens/s
        out["stats"] = {  # JSON has no infinity (tokens/s of a zero-second run)
            k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in result.stats.to_dict().items()
        }
    return out


def stop_ids(tokenizer: Tokenizer) -> set[int]:
    return {i for i in map(tokenizer.token_to_id, STOP_TOKENS) if i is not None}


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    end = next((i for i, tok in enumerate(row) if tok in stops), len(row))
    return row[:end]


def run(args: argparse.Namespace) -> int:
    from faircalib.frontier.samplers import SamplerConfig

    try:  # a shell passes undecodable bytes through as surrogates
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("--prompt is not valid UTF-8 text") from None

    cfg = SamplerConfig(
        sampler=args.sampler,
        steps=args.steps,
        gen_length=args.gen_length,
        block_length=args.block_length,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cfg_scale=args.cfg_scale,
        alg_temp=args.alg_temp,
        eps=args.eps,
        cache=args.cache,
    )
    out = generate_texts(
        args.model,
        args.prompt,
        cfg,
        seed=args.seed,
        num_samples=args.num_samples,
        device=args.device,
        cuda_graph=args.cuda_graph,
        chat=args.chat,
        stack=args.stack_linears,
    )
    if args.json:
        print(json.dumps(out))
    else:
        for i, text in enumerate(out["texts"]):
            print(f"--- sample {i} ---\n{args.prompt}{text}")
        if "stats" in out:
            st = out["stats"]
            rate = f"{st['tokens_per_s']:.1f}" if st["tokens_per_s"] is not None else "-"
            print(
                f"--- {st['generated_tokens']} tokens in {st['seconds']:.2f} s "
                f"({rate} tokens/s), {st['model_calls']} model calls, "
                f"{100 * st['row_fraction']:.0f}% of the uncached token rows (cache: {st['cache']})"
            )
    return 0
