"""`faircalib-lm-eval` (`python -m faircalib.eval.lm_eval_cli`): lm-eval's command line with the
`faircalib` model registered, for lm-eval releases without plugin discovery (0.4.13 and
earlier). Same arguments as `lm_eval`:

    faircalib-lm-eval --model faircalib --model_args pretrained=mdlm-small --tasks TASK
"""

from __future__ import annotations


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    import faircalib.eval.harness  # noqa: F401  (registers the model)

    cli_evaluate()


if __name__ == "__main__":
    main()
