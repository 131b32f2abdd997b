"""The detokenizers of MDLM's zero-shot evaluation (Sahoo et al. 2024), re-implemented from
reading kuleshov-group/mdlm's `dataloader.py`.

Benchmark text such as WikiText, PTB and LM1B is stored pre-tokenized ("the cat 's toy ,"); MDLM
rewrites each dataset row back towards natural text before GPT-2 tokenization, and its published
perplexities depend on that. Each detokenizer is an ordered list of rewrite rules applied to one
row. Order matters (later rules see earlier rewrites), and the rules are MDLM's, quirks included.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from faircalib.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    pattern: str
    replacement: str
    regex: bool = False  # False: a plain substring replacement
    passes: int = 1  # plain replacements never rescan their own output; repeat to catch overlaps

    def apply(self, text: str) -> str:
        for _ in range(self.passes):
            if self.regex:
                text = re.sub(self.pattern, self.replacement, text)
            else:
                text = text.replace(self.pattern, self.replacement)
        return text


def _pairs(open_: str, close: str) -> Rule:
    """Drop the spaces just inside a bracket or quote pair: '( a b )' -> '(a b)'."""
    o, c = re.escape(open_), re.escape(close)
    return Rule(rf"{o}\s*([^{c}]*?)\s*{c}", rf"{open_}\1{close}", regex=True)


WIKITEXT = [
    Rule("s '", "s'"),  # plural possessive
    # MDLM's rule has slashes inside the pattern, so it only rewrites the literal text "/' 5/"
    # (into "/'[0-9]/"); kept for fidelity, it never fires on WikiText
    Rule(r"/' [0-9]/", "/'[0-9]/", regex=True),
    Rule(" @-@ ", "-"),  # WikiText's escaped separators inside numbers and compounds
    Rule(" @,@ ", ","),
    Rule(" @.@ ", "."),
    *(Rule(f" {p} ", f"{p} ") for p in ":;.!?,"),
    _pairs("(", ")"),
    _pairs("[", "]"),
    _pairs("{", "}"),
    _pairs('"', '"'),
    _pairs("'", "'"),
    Rule("= = = =", "===="),  # section heading markers
    Rule("= = =", "==="),
    Rule("= =", "=="),
    Rule(" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    Rule(" \n", "\n"),
    Rule("\n ", "\n"),
    Rule(" N ", " 1 "),
    Rule(" 's", "'s"),
]

PTB = [
    Rule(" 's", "'s"),
    Rule("s ' ", "s' "),
    Rule(" n't", "n't"),
    Rule(" \n ", "\n"),
    Rule("\\/", "/"),
    Rule(" N ", " 1 ", passes=10),  # PTB's number token; runs of "N N" need several passes
    Rule("$ 1", "$1"),
    Rule("# 1", "#1"),
    Rule("<unk>", "?"),
]

LM1B = [
    Rule("http : / / ", "http://"),
    Rule("https : / / ", "https://"),
    Rule(r" '(\w+)", r"'\1", regex=True),
    Rule(r" (\w+) \. ", r" \1. ", regex=True),
    Rule(r" (\w+) \.$", r" \1.", regex=True),
    Rule(" ? ", "? "),
    Rule(r" \?$", "?", regex=True),
    Rule(" ! ", "! "),
    Rule(r" \!$", "!", regex=True),
    Rule(" , ", ", "),
    Rule(" : ", ": "),
    Rule(" ; ", "; "),
    Rule(" / ", "/"),
    # unlike WikiText's rules these need exactly one space inside the pair, and content
    Rule(r'" ([^"]+) "', r'"\1"', regex=True),
    Rule(r"' ([^']+) '", r"'\1'", regex=True),
    Rule(r"\( ([^\(\)]+) \)", r"(\1)", regex=True),
    Rule(r"\[ ([^\[\]]+) \]", r"[\1]", regex=True),
    Rule("$ ", "$"),
    Rule("\N{POUND SIGN} ", "\N{POUND SIGN}"),
]


def _rules(rules: list[Rule]) -> Callable[[str], str]:
    def detokenize(text: str) -> str:
        for rule in rules:
            text = rule.apply(text)
        return text

    return detokenize


def lambada(text: str) -> str:
    """Curly double quotes to straight ones; the passage stripped and put after a newline."""
    text = text.replace("\N{LEFT DOUBLE QUOTATION MARK}", '"')
    text = text.replace("\N{RIGHT DOUBLE QUOTATION MARK}", '"')
    return "\n" + text.strip()


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext": _rules(WIKITEXT),
    "ptb": _rules(PTB),
    "lm1b": _rules(LM1B),
    "lambada": lambada,
}
# which detokenizer MDLM applies to the corpora we ship (C4 is not one of its corpora: MDLM
# applies none to datasets it has no detokenizer for)
SHIPPED_DETOKENIZER = {"wikitext2": "wikitext", "c4": None}


def get_detokenizer(name: str | None) -> Callable[[str], str] | None:
    """`name` in DETOKENIZERS, or None / 'none' for no detokenization."""
    if name is None or name == "none":
        return None
    if name not in DETOKENIZERS:
        raise ConfigError(f"unknown detokenizer {name!r}; choose from {sorted(DETOKENIZERS)}")
    return DETOKENIZERS[name]
