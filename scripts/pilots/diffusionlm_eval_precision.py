"""Does the trainer's bf16 validation hide what a Diffusion-LM learned? One trained directory,
its held-out bound (training.evaluate_loss: fixed windows, t and noise) with and without the
trainer's bf16 autocast, and the model's weights in float32 throughout.

    python diffusionlm_eval_precision.py MODEL_DIR TOKENS.npy [--device cuda]

TOKENS is the token file the model was trained on; its validation tail is the trainer's
(`val_fraction` of the stream, as training.train splits it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from faircalib.models import load_model
from faircalib.training import TrainConfig, evaluate_loss, validation_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model")
    p.add_argument("tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    model = load_model(args.model).float().to(args.device)
    summary = json.loads((Path(args.model) / "train_log.json").read_text())
    known = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in summary["config"].items() if k in known})
    stream = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    val = stream[-validation_tokens(len(stream), cfg) :]
    row = {"model": args.model, "train_log_final": summary["final_val_nelbo_per_token"]}
    row["bf16_autocast"] = evaluate_loss(model, val, cfg, args.device)  # as the trainer does
    row["fp32"] = evaluate_loss(model, val, cfg, args.device, fp32=True)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
