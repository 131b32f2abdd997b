"""Resolve a model argument - a shipped name or a directory - and load it with its tokenizer.

This is where float, fake-quantized and packed model directories meet: `load` looks at the
directory's config and dispatches, so `eval`, `generate` and `quantize` accept any of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from faircalib.errors import CheckpointError, ConfigError
from faircalib.models import DiffusionLM
from faircalib.models.base import REDO, read_json
from faircalib.models.io import stored_float_dtype

ASSETS = Path(__file__).parent / "assets"
SHIPPED_MODELS = ("mdlm-tiny", "mdlm-small")
# the Gaussian families (no mask token): a separate tuple, because code and tests that walk
# SHIPPED_MODELS feed them masked inputs
SHIPPED_GAUSSIAN_MODELS = ("diffusionlm-tiny", "planner-tiny")


# a Hugging Face repository id, "owner/name" (what is not a local directory and looks like one)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# weights, configs and tokenizer only: a checkpoint's remote code (modeling_*.py, auto_map) is
# never downloaded, let alone run; pickled weights (*.bin, *.pt) are not read either
HUB_FILES = ["*.json", "*.safetensors", "merges.txt"]  # merges.txt: slow-only tokenizers
MAX_TOKENIZER_BYTES = 256 * 2**20  # published tokenizer.json files are 1-20 MB
GPT2_MASK_VOCAB = 50258  # GPT-2's 50,257 tokens + [MASK]: mdlm-owt's vocabulary


def resolve(model: str | Path) -> Path:
    """A shipped model name, a path, or a Hugging Face repository id -> the model directory."""
    if str(model) in SHIPPED_MODELS + SHIPPED_GAUSSIAN_MODELS:
        path = ASSETS / "models" / str(model)
        if not path.is_dir():
            raise CheckpointError(f"shipped model {model} is not installed at {path}")
        return path
    path = Path(model)
    if path.is_dir():
        return path
    if not path.exists() and HUB_ID.fullmatch(str(model)):
        return download(str(model))
    raise CheckpointError(
        f"{model} is neither a shipped model "
        f"({', '.join(SHIPPED_MODELS + SHIPPED_GAUSSIAN_MODELS)}), a model directory "
        "nor a Hugging Face repository id (owner/name); check the name or path"
    )


def download(repo_id: str) -> Path:
    """The local snapshot of hub repository `repo_id` (config, tokenizer, safetensors only)."""
    try:
        from huggingface_hub import snapshot_download  # only needed for hub ids

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated, disk full: one line either way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{repo_id} is not a local directory, and fetching it from the Hugging Face Hub "
            f"failed ({type(exc).__name__}: {reason}); download it where there is network access "
            "and pass the directory"
        ) from exc


def is_packed(directory: Path) -> bool:
    qconfig = read_json(Path(directory) / "config.json").get("quantization_config")
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == "compressed-tensors"


def is_mdlm_hf(directory: Path) -> bool:
    """kuleshov-group's Hugging Face MDLM layout (`model_type: mdlm`, `backbone.*` tensors),
    which `faircalib.models.loaders` reads; our own MDLM directories carry `family`."""
    config_path = Path(directory) / "config.json"
    if not config_path.is_file():
        return False
    config = read_json(config_path)
    return config.get("model_type") == "mdlm" and "family" not in config


def source_dtype(directory: Path) -> torch.dtype:
    """The dtype a model directory's weights are stored in: what most of its safetensors
    hold (headers only), else config.json's torch_dtype or dtype, else float32. The shards
    win over the config: a bf16 checkpoint whose config says float32 would otherwise be
    written back twice its size (LLaDA-8B's config names no dtype at all)."""
    config_path = Path(directory) / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    name = config.get("torch_dtype") or config.get("dtype")
    declared = None
    if name is not None and name != "auto":
        key = str(name).removeprefix("torch.")
        if key not in DTYPES:  # a typo or a non-float type would otherwise load as float32
            raise CheckpointError(
                f"{config_path}: torch_dtype {name!r} is not a float dtype faircalib reads "
                f"({', '.join(DTYPES)}); fix config.json, or pass --dtype and --calib-dtype"
            )
        declared = DTYPES[key]
    stored = stored_float_dtype(Path(directory))
    if stored is not None and stored in DTYPES.values():
        return stored
    return declared or torch.float32


def check_device(device: str) -> torch.device:
    """`device` parsed, refusing names torch does not know and devices this machine lacks."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if parsed.type not in ("cpu", "cuda"):  # mps, xpu, meta...: not what the kernels target
        raise ConfigError(f"--device {device}: faircalib runs on cpu or cuda (cuda:N)")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible; "
            "use cuda:0 .. cuda:N-1"
        )
    return parsed


def load(
    model: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    stack: bool = False,
) -> DiffusionLM:
    """`stack`: run the linears that read one norm's output as one stacked layer where they
    allow it (`formats.packed.stack_readers`: packed and float layers; same math, one GEMM)."""
    check_device(device)
    directory = resolve(model)
    if is_packed(directory):
        from faircalib.formats.packed import load_packed_model  # joins models and kernels

        return load_packed_model(directory, device=device, dtype=dtype, stack=stack)
    if is_mdlm_hf(directory):  # kuleshov-group's published layout (mdlm-owt)
        from faircalib.models.loaders import load_mdlm_hf

        loaded = load_mdlm_hf(directory, dtype=dtype).to(device).eval()
    else:
        from faircalib.calib.fakequant_io import load_fake_quant  # re-applies act. quantization

        loaded = load_fake_quant(directory, device=device, dtype=dtype)
    if stack:
        from faircalib.formats.packed import stack_readers

        stack_readers(loaded)
    return loaded


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(model: str | Path, name: str) -> torch.dtype:
    """A dtype name, or 'auto': the checkpoint's own (`source_dtype`)."""
    if name == "auto":
        return source_dtype(resolve(model))
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)} or auto")
    return DTYPES[name]


# files of an upstream checkpoint that a quantized copy keeps, so stock readers load it as they
# loaded the source: tokenizer settings (chat template), generation defaults
UPSTREAM_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",  # a slow tokenizer's files (Dream ships no tokenizer.json)
    "merges.txt",
)


def upstream_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """(files to copy beside a quantized copy of `directory`, auto_map modules it lacks).
    The files: UPSTREAM_FILES present and, when config.json or tokenizer_config.json has an
    `auto_map`, the directory's `*.py` (the modules it names import their neighbours, e.g.
    Dream's generation_utils.py). They are copied as files, never imported: transformers runs
    them only with trust_remote_code. A hub download has no `*.py` (faircalib never fetches
    checkpoint code): those modules are returned as missing, for the caller to say so."""
    directory = Path(directory)
    files = {name: directory / name for name in UPSTREAM_FILES if (directory / name).is_file()}
    refs: list = []
    for name in ("config.json", "tokenizer_config.json"):
        try:  # runs after calibration: a damaged side file must not lose the run
            meta = read_json(directory / name) if (directory / name).is_file() else {}
        except CheckpointError:
            meta = {}
        auto_map = meta.get("auto_map") if isinstance(meta, dict) else None
        for value in auto_map.values() if isinstance(auto_map, dict) else ():
            refs += value if isinstance(value, list) else [value]
    modules = {
        ref.rsplit(".", 1)[0]
        for ref in refs
        if isinstance(ref, str) and "--" not in ref and "." in ref  # not None, not another repo
    }
    if modules:
        files.update({p.name: p for p in sorted(directory.glob("*.py")) if p.is_file()})
    missing = sorted(
        f"{m}.py" for m in modules if re.fullmatch(r"\w+", m) and f"{m}.py" not in files
    )
    return files, missing


def load_tokenizer(model: str | Path) -> Tokenizer:
    path = resolve(model) / "tokenizer.json"
    if not path.is_file() and is_mdlm_hf(path.parent):
        # kuleshov-group/mdlm-owt ships no tokenizer: its vocabulary is GPT-2's plus [MASK]
        from faircalib.data.tokenizers import gpt2_tokenizer

        if read_json(path.parent / "config.json").get("vocab_size") == GPT2_MASK_VOCAB:
            return gpt2_tokenizer()
    if not path.is_file() and has_slow_tokenizer(path.parent):
        return _slow_tokenizer(path.parent)
    if not path.is_file():
        raise CheckpointError(
            f"{path.parent} has no tokenizer.json; copy the model's tokenizer.json into it"
        )
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise CheckpointError(
            f"{path} is {path.stat().st_size:,} bytes, over the {MAX_TOKENIZER_BYTES:,} a "
            f"tokenizer may be; {REDO}"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises plain Exception
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable tokenizer ({reason}); {REDO}") from exc
    _check_vocab(tokenizer, path)
    return tokenizer


def has_slow_tokenizer(directory: Path) -> bool:
    """No tokenizer.json, but vocab.json + merges.txt (a repository with only a slow
    tokenizer, as Dream's): `load_tokenizer` rebuilds the fast one from them."""
    directory = Path(directory)
    return not (directory / "tokenizer.json").is_file() and all(
        (directory / name).is_file() for name in ("vocab.json", "merges.txt")
    )


def _slow_tokenizer(directory: Path) -> Tokenizer:
    from faircalib.data.tokenizers import bpe_from_slow_files

    try:
        tokenizer = bpe_from_slow_files(directory)
    except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{directory} has no tokenizer.json, and its vocab.json + merges.txt cannot be "
            f"rebuilt into one ({exc}); save a tokenizer.json with transformers "
            "(AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)) and pass the directory"
        ) from exc
    _check_vocab(tokenizer, directory / "vocab.json")
    return tokenizer


def _check_vocab(tokenizer: Tokenizer, path: Path) -> None:
    """A tokenizer whose ids reach past the model's vocabulary would index outside its
    embedding at the first such token: refuse it at load (a smaller one is normal: LLaDA and
    Dream pad their vocabularies)."""
    config_path = path.parent / "config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    vocab = config.get("vocab_size")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if _is_int(vocab) and size > vocab:
        raise CheckpointError(
            f"{path} has {size:,} tokens but the model's vocabulary {vocab:,}: it is not this "
            f"model's tokenizer; {REDO}"
        )
    # a mask id that is not the tokenizer's mask token would score and sample with the wrong
    # token and give no error at all (a perplexity of 32,000 on mdlm-tiny instead of ~200)
    from faircalib.data.tokenizers import MASK

    key = "mask_token_id" if "mask_token_id" in config else "mask_id"
    declared, named = config.get(key), tokenizer.token_to_id(MASK)
    if _is_int(declared) and named is not None and named != declared:
        raise CheckpointError(
            f"{path} has {MASK} at id {named} but config.json's {key} is {declared}: fix one "
            f"of them; {REDO}"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
