"""Training reference models (MDLM, Diffusion-LM, PLANNER): a plain loop in the spirit of nanoGPT.

Data: jsonl(.xz/.gz) shards with a "text" field, tokenised once, documents joined by EOS
into one token stream; each step draws random windows of `seq_len` tokens. Loss: the
continuous-time NELBO per token with low-discrepancy t's (each family's `training_loss`:
the masked NELBO for MDLM, for Diffusion-LM the cross-entropy of p(w | z_t) + rounding +
prior (CDCD; docs/models.md says why not L_simple), the full bound for PLANNER; the held-out
number is always the family's bound, `nelbo`). A preset names its family. AdamW, linear
warm-up, cosine decay, bf16 autocast on a GPU. The result is a normal model directory (config.json,
safetensors shards, tokenizer.json, MODEL_CARD.md, train_log.json).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from faircalib.data.tokenizers import EOS, MASK
from faircalib.errors import DataError
from faircalib.models import DiffusionLM, save_model
from faircalib.models.io import build_model as build_from_config
from faircalib.models.io import check_output_dir
from faircalib.models.objective import nelbo_per_sequence, stratified_times
from faircalib.training_state import discard_state, load_state, resume_key, save_state, state_dir

PRESETS: dict[str, dict] = {
    # ~2.9 M parameters: CPU tests and the README's demo
    "tiny": dict(hidden_dim=128, n_heads=4, n_blocks=4, cond_dim=32, seq_len=128),
    # ~20 M parameters: the main benchmark model (<= 40 MB of bf16)
    "small": dict(hidden_dim=384, n_heads=6, n_blocks=8, cond_dim=32, seq_len=512),
    # ~105 M parameters (GPT-2-small shape): the seed table's MDLM base, trained and measured
    # inside one GPU lease (scripts/gpu_seed_table.sh; docs/training.md has the FLOP budget:
    # ~0.60 GFLOP per training token, ~4.1e5 tokens/s at 250 TFLOP/s, ~2e8 tokens in 480 s)
    "mdlm-base": dict(hidden_dim=768, n_heads=12, n_blocks=12, cond_dim=128, seq_len=512),
    # Gaussian families (docs/models.md): tiny ones ship (<= 2 MB with the tokenizer; CPU)
    "diffusionlm-tiny": dict(
        family="diffusion_lm", embed_dim=16, hidden_dim=128, n_blocks=2, n_heads=4, seq_len=128
    ),
    "planner-tiny": dict(
        family="planner",
        embed_dim=16,
        hidden_dim=128,
        plan_dim=64,
        n_blocks=2,
        n_heads=4,
        n_latents=4,
        latent_dim=16,
        seq_len=128,
    ),
    # the GPU versions (scripts/gpu_train_families.sh); not shipped
    "diffusionlm-base": dict(
        family="diffusion_lm",
        embed_dim=128,
        hidden_dim=768,
        n_blocks=12,
        n_heads=12,
        mlp_ratio=4,
        seq_len=128,
        # pre-LN blocks need the LayerNorm before the head's tanh: without it the 2026-11-29
        # lease's 600 s run saturated the tanh and stayed at unigram level (docs/models.md)
        final_norm=True,
        # half the training sequences with a noise level per position: the seed table's row
        # (2607 perplexity bound against 2636 with one level a sequence, 5189 with every
        # sequence per position; docs/models.md "Per-position noise levels",
        # benchmarks/results/seed-table/independent-t05-lease/)
        independent_t=0.5,
    ),
    "planner-small": dict(
        family="planner",
        embed_dim=256,
        hidden_dim=512,
        plan_dim=512,
        n_blocks=8,
        n_heads=8,
        mlp_ratio=4,
        enc_blocks=4,
        n_prior_blocks=6,
        n_latents=16,
        latent_dim=32,
        seq_len=256,
    ),
}


@dataclass
class TrainConfig:
    corpus: list[str]
    tokenizer: str
    out: str
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    warmup_steps: int = 200
    max_steps: int = 2000
    time_budget_s: float | None = None  # stop early (cosine schedule rescaled) when exceeded
    eval_every: int = 250
    eval_batches: int = 8
    val_fraction: float = 0.005
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: bool = False
    # the loop that trained mdlm-base (commit 1059b71): fused AdamW and batches drawn on the
    # device. Off by default since 2026-11-30: host draws give the same batches on every
    # device; an ablation found neither choice changes what a model learns (docs/training.md)
    fused_adam: bool = False
    device_draws: bool = False
    max_docs: int | None = None
    token_cache: str | None = None  # .npy of the tokenised stream, shared by concurrent runs
    # resumable runs (faircalib.training_state): the whole state goes to OUT.partial every
    # `checkpoint_every` steps (0: only when a limit below ends this invocation early)
    checkpoint_every: int = 0
    stop_after_s: float | None = None  # this invocation's wall-clock limit
    stop_after_steps: int | None = None  # this invocation's step limit
    resume: bool = False  # continue from OUT.partial (same settings and data)
    overwrite: bool = False  # replace an existing OUT (never one that holds an input)


MAX_LINE_CHARS = (
    16 * 2**20
)  # one document per line: longer is not a jsonl shard (or needs splitting)
SHARD_FORMAT = 'pass jsonl shards with one JSON object holding a "text" field per line'


def read_documents(paths: list[str], max_docs: int | None = None) -> Iterator[str]:
    n = 0
    for path in paths:
        for text in _shard_texts(path):
            if text.strip():
                yield text
                n += 1
                if max_docs is not None and n >= max_docs:
                    return


def _shard_texts(path: str) -> Iterator[str]:
    """The "text" of every line of one shard; anything else is one DataError line."""
    opener = lzma.open if path.endswith(".xz") else gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            # readline with a limit: an enormous line is refused without being held whole
            while line := f.readline(MAX_LINE_CHARS + 1):
                lineno += 1
                if len(line) > MAX_LINE_CHARS:
                    raise DataError(
                        f"{path} line {lineno} is over {MAX_LINE_CHARS:,} characters; "
                        "split the text into documents, one per line"
                    )
                yield _text_of(json.loads(line), path, lineno)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} line {lineno + 1} is not UTF-8 text; convert the file to UTF-8"
        ) from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} line {lineno} is not JSON ({exc.msg}); {SHARD_FORMAT}") from exc
    except RecursionError as exc:  # nesting deeper than Python's stack: not a text record
        raise DataError(f"{path} line {lineno} nests JSON too deeply; {SHARD_FORMAT}") from exc
    except (OSError, EOFError, lzma.LZMAError) as exc:  # missing, unreadable, corrupt archive
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DataError(f"cannot read training shard {path} ({reason}); {SHARD_FORMAT}") from exc


def _text_of(obj: object, path: str, lineno: int) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f'{path} line {lineno} has no string "text" field; {SHARD_FORMAT}')
    return obj["text"]


def tokenize_stream(
    tokenizer: Tokenizer, docs: Iterator[str], eos_id: int, chunk: int = 2048
) -> np.ndarray:
    """Documents -> one int32 token stream with EOS after every document."""
    parts: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for enc in tokenizer.encode_batch(batch):
            parts.append(np.asarray(enc.ids + [eos_id], dtype=np.int32))
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) == chunk:
            flush()
    if batch:
        flush()
    if not parts:
        raise DataError("the training corpus holds no text; pass jsonl shards with documents")
    return np.concatenate(parts)


def load_stream(cfg: TrainConfig, tokenizer: Tokenizer, eos_id: int) -> np.ndarray:
    """The token stream: the `token_cache` .npy when it exists (written by an earlier run, or
    assembled from transported pieces by `faircalib.data.token_pieces`), else the corpus
    tokenised now (and cached when a path is given)."""
    cache = Path(cfg.token_cache) if cfg.token_cache else None
    if cache is not None and cache.exists():
        return read_token_cache(cache, tokenizer.get_vocab_size())
    if not cfg.corpus:
        raise DataError(
            f"no training text: pass --data shards, or a --token-cache file that exists ({cache})"
        )
    stream = tokenize_stream(tokenizer, read_documents(cfg.corpus, cfg.max_docs), eos_id)
    if cache is not None:
        tmp = cache.with_name(cache.name + ".tmp.npy")
        np.save(tmp, stream)
        tmp.replace(cache)
    return stream


def without_mask_tokens(stream: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """The stream without the mask token's id, saying how many went. Text that spells the
    mask token out (a literal "<|mask|>") tokenises to that id: as a clean token it would be
    indistinguishable from a masked one to an MDLM, and a Gaussian family gives it no mass
    (an infinite loss)."""
    mask_id = tokenizer.token_to_id(MASK)
    if mask_id is None:
        return stream  # build_model refuses such a tokenizer with its own message
    keep = stream != mask_id
    dropped = int(len(stream) - keep.sum())
    if dropped:
        print(
            f"dropped {dropped:,} {MASK} tokens from the training text (written out literally "
            "in it): a clean token must never be the mask",
            flush=True,
        )
        stream = stream[keep]
    return stream


def read_token_cache(cache: Path, vocab_size: int) -> np.ndarray:
    """A cached token stream as int32 (uint16 files from the transport are widened: torch
    indexes int32 on every device). Ids outside the tokenizer mean another tokenizer made it."""
    try:  # never unpickle: a token cache is a plain integer array
        stream = np.load(cache, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(
            f"token cache {cache} is not a plain .npy array ({exc}); delete it to rebuild it"
        ) from exc
    if stream.ndim != 1 or stream.dtype.kind not in "iu":
        raise DataError(
            f"token cache {cache} holds {stream.dtype} {stream.shape}, not token ids; "
            "delete it to rebuild it"
        )
    if len(stream) and (int(stream.min()) < 0 or int(stream.max()) >= vocab_size):
        raise DataError(
            f"token cache {cache} holds ids outside [0, {vocab_size}) of this tokenizer: it was "
            "made with another one; rebuild it with the training tokenizer"
        )
    return stream.astype(np.int32, copy=False)


# safetensors' names of the dtypes a checkpoint holds (the fingerprint hashes these names, so a
# reader of the raw file can recompute it without torch)
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def weight_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a checkpoint's tensors in a fixed order (names sorted): for each tensor the line
    `name|DTYPE|d0,d1,...` then its little-endian bytes. Independent of shard layout and file
    metadata, so two trainings with the same weights have the same fingerprint."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        shape = ",".join(str(d) for d in tensor.shape)
        digest.update(f"{name}|{SAFETENSORS_DTYPES[tensor.dtype]}|{shape}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def directory_fingerprint(directory: str | Path) -> str:
    """`weight_fingerprint` of a saved model directory's safetensors tensors."""
    from faircalib.models.io import load_tensors

    return weight_fingerprint(load_tensors(Path(directory)))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def random_windows(
    stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator
) -> torch.Tensor:
    """[batch, seq_len] windows of `stream` at random starts, gathered on the stream's device
    (no per-step host work or transfer when the stream lives on the GPU)."""
    starts = torch.randint(
        0, len(stream) - seq_len, (batch, 1), generator=gen, device=stream.device
    )
    offsets = torch.arange(seq_len, device=stream.device)
    return stream[starts + offsets].long()  # [batch, seq_len]


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> DiffusionLM:
    """The preset's family (MDLM when the preset names none), sized to the tokenizer. Gaussian
    families take the mask id too: they never see it, and give it no mass."""
    mask_id = tokenizer.token_to_id(MASK)
    if mask_id is None:
        raise DataError(f"tokenizer {cfg.tokenizer} has no {MASK} token")
    params = {"family": "mdlm", **PRESETS[cfg.preset], **cfg.model_overrides}
    return build_from_config(
        {"vocab_size": tokenizer.get_vocab_size(), "mask_id": mask_id, **params}
    )


def step_loss_fn(model: DiffusionLM, cfg: TrainConfig, device: str):
    """The training loss (mean per-token NELBO of a batch) as one function of (x0, t, u),
    compiled whole when asked: forward, SUBS head and NELBO fuse, so the [B, L, V] float32
    log-probabilities are not written out several times. Falls back to eager where
    compilation does not work on this machine."""

    def loss(x0: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return model.training_loss(x0, t, u).mean() / model.seq_len

    if not cfg.compile:
        return loss
    compiled = torch.compile(loss)
    # the warm-up batch is random: training state kept in buffers (a time warp's running
    # curve) must not learn from it
    state = {name: b.clone() for name, b in model.named_buffers()}
    try:
        x = torch.randint(2, model.vocab_size, (2, model.seq_len), device=device)
        t, u = torch.rand(2, device=device), torch.rand(2, model.seq_len, device=device)
        with autocast(device):
            compiled(x, t, u).backward()
        return compiled
    except Exception as exc:  # compilation support varies by torch build; training must not
        print(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly", flush=True)
        return loss
    finally:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(state[name])


def autocast(device: str) -> torch.autocast:
    """bf16 autocast on accelerators; a no-op on the CPU (fp32 training, as the tests run)."""
    kind = device.split(":")[0]
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=kind != "cpu")


@torch.no_grad()
def evaluate_loss(
    model: DiffusionLM, stream: torch.Tensor, cfg: TrainConfig, device: str, fp32: bool = False
) -> float:
    """Mean per-token NELBO on fixed held-out windows with fixed noise (comparable across steps).
    `fp32` skips the bf16 autocast: the recorded final bound. (bf16 read a trained Diffusion-LM
    0.07 nats high, benchmarks/results/pilots/diffusionlm_gpu2-eval-precision.jsonl, until its
    bound kept the SNR-weighted terms in float32 under autocast: docs/models.md.)"""
    gen = torch.Generator().manual_seed(1234)
    model.eval()
    total = 0.0
    for _ in range(cfg.eval_batches):
        x0 = random_windows(stream, cfg.batch_size, model.seq_len, gen).to(device)
        t = stratified_times(x0.shape[0], gen).to(device)
        u = torch.rand(x0.shape, generator=gen).to(device)
        with autocast("cpu" if fp32 else device):
            total += nelbo_per_sequence(model, x0, t, u).mean().item() / model.seq_len
    model.train()
    return total / cfg.eval_batches


def unigram_log_probs(train: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size] float64 log-probabilities of the add-one unigram model of `train` (also
    benchmarks/unigram_floor.py's, on the evaluation sets)."""
    counts = torch.bincount(train.long(), minlength=vocab_size).double() + 1.0
    return (counts / counts.sum()).log()


def unigram_cross_entropy(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Nats per token of `val` under the unigram model of `train`: the floor a trained model
    must get below to show it reads anything of its input (a Diffusion-LM sat on it for weeks
    while its pilots' copy-prone windows said otherwise; docs/models.md)."""
    return -unigram_log_probs(train, vocab_size)[val.long()].mean().item()


def validation_tokens(n_tokens: int, cfg: TrainConfig) -> int:
    """How many tokens at the end of a stream of `n_tokens` training holds out for validation."""
    return max(int(n_tokens * cfg.val_fraction), 4 * PRESETS[cfg.preset]["seq_len"])


def load_tokenizer(path: str) -> tuple[Tokenizer, int]:
    """The tokenizer and its end-of-text id; one DataError line for anything unusable."""
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # the tokenizers library raises plain Exception
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{path} is not a readable tokenizer.json ({reason}); pass one") from exc
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        raise DataError(f"tokenizer {path} has no {EOS} token; pass one that has {EOS} and {MASK}")
    return tokenizer, eos_id


def train(cfg: TrainConfig) -> Path:
    """Train and write the model directory `cfg.out`; -> that path. When `stop_after_s` or
    `stop_after_steps` ends the run first, the state is kept and its directory (OUT.partial)
    is returned instead: `resume=True` with the same settings continues it."""
    torch.manual_seed(cfg.seed)
    # before any work: an existing --out (without overwrite), one holding an input (the corpus,
    # the tokenizer, the token cache), or an unwritable one
    inputs = [Path(p) for p in (*cfg.corpus, cfg.tokenizer, cfg.token_cache) if p]
    check_output_dir(Path(cfg.out), overwrite=cfg.overwrite, inputs=inputs)
    tokenizer, eos_id = load_tokenizer(cfg.tokenizer)
    t0 = time.time()
    stream = torch.from_numpy(without_mask_tokens(load_stream(cfg, tokenizer, eos_id), tokenizer))
    seq_len = cfg.model_overrides.get("seq_len", PRESETS[cfg.preset]["seq_len"])
    n_val = validation_tokens(len(stream), cfg)
    if len(stream) <= n_val + seq_len:
        raise DataError(
            f"the training corpus has {len(stream):,} tokens; training needs more than "
            f"{n_val + seq_len:,} (validation windows plus one window of {seq_len}): add text"
        )
    train_stream, val_stream = stream[:-n_val], stream[-n_val:]
    print(f"tokenised {len(stream):,} tokens in {time.time() - t0:.0f}s", flush=True)
    floor = unigram_cross_entropy(train_stream, val_stream, tokenizer.get_vocab_size())
    print(f"unigram floor on the validation split: {floor:.4f} nats/token", flush=True)

    device = cfg.device
    model = build_model(cfg, tokenizer).to(device)
    print(f"model: {model.num_parameters():,} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        fused=cfg.fused_adam and device.startswith("cuda"),
    )
    step_loss = step_loss_fn(model, cfg, device)
    # batches are drawn on the host by default: a CPU generator gives the same windows, times
    # and noise keys on every device (the Diffusion-LM pilots' draws). `device_draws` keeps the
    # stream and the generator on the training device (no per-step copy)
    draw_device = device if cfg.device_draws else "cpu"
    train_stream = train_stream.to(draw_device)
    gen = torch.Generator(device=draw_device).manual_seed(cfg.seed)
    progress = {"step": 0, "total_steps": cfg.max_steps, "tokens_seen": 0, "elapsed_s": 0.0}
    progress["log"] = []
    saving = cfg.resume or cfg.checkpoint_every or cfg.stop_after_s or cfg.stop_after_steps
    partial = state_dir(cfg.out)
    key = resume_key(cfg, stream.numpy()) if saving else {}
    if cfg.resume:
        progress = load_state(partial, model, opt, gen, key)
        print(f"resumed from {partial} at step {progress['step']:,}", flush=True)
    elif saving and partial.exists():
        print(f"starting afresh: {partial} (an earlier run's state) will be replaced", flush=True)
    log: list[dict] = progress["log"]
    total_steps, tokens_seen, first = (
        progress["total_steps"],
        progress["tokens_seen"],
        progress["step"],
    )
    start = time.time() - progress["elapsed_s"]  # the schedule's clock counts earlier runs too
    invocation = time.time()

    def save(next_step: int) -> None:
        progress.update(step=next_step, total_steps=total_steps, tokens_seen=tokens_seen)
        progress.update(elapsed_s=time.time() - start, log=log)
        save_state(partial, model, opt, gen, progress, key)

    steps_done = first
    stopped = False
    bar = tqdm(range(first, cfg.max_steps), desc="train", mininterval=5, initial=first,
               total=cfg.max_steps)  # fmt: skip
    for step in bar:
        if cfg.time_budget_s and step > cfg.warmup_steps and step % 50 == 0:
            # shrink the cosine horizon so the schedule ends when the budget does
            rate = (time.time() - start) / step
            total_steps = min(cfg.max_steps, int(cfg.time_budget_s / rate))
            if step >= total_steps:
                break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg)
        x0 = random_windows(train_stream, cfg.batch_size, model.seq_len, gen)
        t = stratified_times(cfg.batch_size, gen)
        u = torch.rand(x0.shape, generator=gen, device=draw_device)
        x0, t, u = (v.to(device, non_blocking=True) for v in (x0, t, u))
        with autocast(device):
            loss = step_loss(x0, t, u)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens_seen += x0.numel()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % cfg.eval_every == 0:
            val = evaluate_loss(model, val_stream, cfg, device)
            log.append(
                {
                    "step": step + 1,
                    "train_loss": loss.item(),
                    "val_nelbo": val,
                    "elapsed_s": time.time() - start,
                    "tokens": tokens_seen,
                }
            )
            print(json.dumps(log[-1]), flush=True)
        steps_done = step + 1
        limit = (cfg.stop_after_steps and steps_done - first >= cfg.stop_after_steps) or (
            cfg.stop_after_s and time.time() - invocation >= cfg.stop_after_s
        )
        stopped = bool(limit) and steps_done < cfg.max_steps
        if stopped or (cfg.checkpoint_every and steps_done % cfg.checkpoint_every == 0):
            save(steps_done)
        if stopped:
            break
    if stopped:
        print(
            f"stopped after step {steps_done:,} of at most {total_steps:,}: the state is in "
            f"{partial}; run the same command with --resume to continue",
            flush=True,
        )
        return partial
    wall = time.time() - start
    final_val = evaluate_loss(model, val_stream, cfg, device, fp32=True)
    summary = {
        "config": asdict(cfg),
        "parameters": model.num_parameters(),
        "tokens_seen": tokens_seen,
        "steps": steps_done,
        "wall_time_s": wall,
        "final_val_nelbo_per_token": final_val,
        "final_val_ppl_bound": math.exp(final_val),
        # a model that reads nothing of its input scores about this (its bound adds a little)
        "val_unigram_nats_per_token": floor,
        "corpus_tokens": len(stream),
        "log": log,
    }
    # the fingerprint of exactly the tensors save_model writes (bf16 of the float weights)
    saved = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.float().state_dict().items()}
    summary["weight_fingerprint_sha256"] = weight_fingerprint(saved)
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}), flush=True)
    print(f"weight fingerprint (sha256): {summary['weight_fingerprint_sha256']}", flush=True)
    save_model(
        model,
        Path(cfg.out),
        dtype=torch.bfloat16,
        overwrite=True,  # checked at the start (`check_output_dir`): OUT was free or replaceable
        extra_files={
            "tokenizer.json": Path(cfg.tokenizer),
            "train_log.json": summary,
            "MODEL_CARD.md": model_card(summary),
        },
    )
    # the model directory now holds the result: this run's state, or an older run's left
    # behind, must not be resumed over it
    discard_state(partial)
    return Path(cfg.out)


def model_card(summary: dict) -> str:
    """A short card for a trained directory: what was trained, on what, and its fingerprint."""
    cfg = summary["config"]
    data = cfg["token_cache"] or ", ".join(Path(p).name for p in cfg["corpus"])
    return "\n".join(
        [
            f"# {Path(cfg['out']).name}",
            "",
            f"Trained with `faircalib train --preset {cfg['preset']}` (seed {cfg['seed']}).",
            "",
            f"- parameters: {summary['parameters']:,}",
            f"- data: {data} ({summary['corpus_tokens']:,} tokens); "
            f"tokens seen: {summary['tokens_seen']:,} in {summary['steps']:,} steps, "
            f"{summary['wall_time_s']:.0f} s",
            f"- held-out NELBO per token: {summary['final_val_nelbo_per_token']:.4f} "
            f"(perplexity bound {summary['final_val_ppl_bound']:.2f}); the unigram model of the "
            f"training tokens: {summary['val_unigram_nats_per_token']:.4f}",
            f"- weight fingerprint (sha256 of the bf16 tensors, names sorted; "
            f"`faircalib.training.directory_fingerprint`): "
            f"`{summary['weight_fingerprint_sha256']}`",
            "",
        ]
    )
