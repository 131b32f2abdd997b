"""Local multiple-choice tasks: a JSON Lines file of {"context", "choices", "answer"} items,
scored with LLaDA's conditional log-likelihood (faircalib.eval.likelihood).

Each line: `{"context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}`
(`answer` is the 0-based index of the right choice; a choice is appended to the context as
written, so put the separating space in the choice). An item counts as right when its answer
has the highest log-likelihood (`acc`) or the highest log-likelihood per character (`acc_norm`,
lm-eval's length normalisation).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from tqdm import tqdm

from faircalib.data.sources import valid_unicode
from faircalib.errors import DataError
from faircalib.eval.likelihood import conditional_log_likelihood, encode_pair, fit_context
from faircalib.models.base import DiffusionLM


@dataclass(frozen=True)
class ChoiceItem:
    context: str
    choices: tuple[str, ...]
    answer: int
    where: str = ""  # "FILE line N": what an error about the item names


def load_task(path: str | Path) -> tuple[list[ChoiceItem], dict]:
    """The items of a task file and its record (file, sha256, item count)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file {path} does not exist; check the path")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not content
    except UnicodeDecodeError as exc:
        raise DataError(f"task file {path} is not UTF-8 (byte {exc.start}); convert it") from exc
    items = []
    # JSON Lines are separated by \n alone: splitlines() would also split inside strings at
    # U+2028, U+0085 and other characters JSON allows raw (a trailing \r is JSON whitespace)
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            items.append(_item(line, f"{path} line {number}"))
    if not items:
        raise DataError(f"task file {path} has no items; add one JSON object per line")
    record = {"task": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "items": len(items)}
    return items, record


def _item(line: str, where: str) -> ChoiceItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where} is not JSON ({exc.msg}); fix that line") from exc
    except RecursionError as exc:  # nesting deeper than Python's stack
        raise DataError(f"{where} nests JSON too deeply; fix that line") from exc
    except ValueError as exc:  # a number past Python's 4300-digit int limit
        reason = str(exc).split(";")[0]  # not Python's advice to raise its limit
        raise DataError(f"{where}: {reason}; fix that line") from exc
    if not isinstance(obj, dict) or not {"context", "choices", "answer"} <= set(obj):
        raise DataError(f'{where} needs "context", "choices" and "answer"; add them')
    context, choices, answer = obj["context"], obj["choices"], obj["answer"]
    if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: context must be text and choices a list of at least 2; fix it")
    if not all(isinstance(c, str) and c for c in choices):
        raise DataError(f"{where}: every choice must be non-empty text; fix it")
    if type(answer) is not int or not 0 <= answer < len(choices):
        raise DataError(f"{where}: answer must be a choice index 0..{len(choices) - 1}; fix it")
    for text in (context, *choices):  # the tokenizer would fail on them later, mid-run
        valid_unicode(text, where)
    return ChoiceItem(context, tuple(choices), answer, where)


def check_task_fits(items: list[ChoiceItem], tokenizer: Tokenizer, seq_len: int) -> None:
    """Refuse, before any evaluation, an item with a choice longer than the model (the context
    is cut from the left to fit, a choice cannot be)."""
    for item in items:
        for number, choice in enumerate(item.choices):
            _, continuation = encode_pair(tokenizer, item.context, choice)
            if len(continuation) > seq_len:
                raise DataError(
                    f"{item.where}: choice {number} has {len(continuation)} tokens, more than "
                    f"the model's length {seq_len}; shorten that choice or drop the item"
                )


def choice_log_likelihoods(
    model: DiffusionLM,
    tokenizer: Tokenizer,
    item: ChoiceItem,
    *,
    mc_samples: int,
    batch_size: int = 16,
    seed: int = 0,
) -> list[float]:
    """LLaDA's log-likelihood estimate of every choice given the item's context."""
    out = []
    for choice in item.choices:
        ctx, cont = encode_pair(tokenizer, item.context, choice)
        ctx = fit_context(ctx, cont, model.seq_len)
        out.append(
            conditional_log_likelihood(
                model, ctx, cont, mc_samples=mc_samples, batch_size=batch_size, seed=seed
            )
        )
    return out


def task_accuracy(
    model: DiffusionLM,
    tokenizer: Tokenizer,
    items: list[ChoiceItem],
    *,
    mc_samples: int = 16,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """{"acc", "acc_norm", "items", "mc_samples"} over `items`."""
    right = right_norm = 0
    for item in tqdm(items, desc="task", disable=not progress, mininterval=2):
        lls = choice_log_likelihoods(
            model, tokenizer, item, mc_samples=mc_samples, batch_size=batch_size, seed=seed
        )
        norm = [ll / len(c) for ll, c in zip(lls, item.choices, strict=True)]
        right += int(max(range(len(lls)), key=lls.__getitem__) == item.answer)
        right_norm += int(max(range(len(norm)), key=norm.__getitem__) == item.answer)
    n = len(items)
    return {"acc": right / n, "acc_norm": right_norm / n, "items": n, "mc_samples": mc_samples}
