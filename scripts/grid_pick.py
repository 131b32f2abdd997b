"""Summarise a grid of `faircalib train` runs and pick the lowest final held-out bound.

    python scripts/grid_pick.py RUNS NAME [NAME ...] > grid.json

Reads RUNS/NAME/train_log.json for every NAME (gpu_seed_table.sh `pick`); a run without one
(still training, or failed) is listed with an error and never picked.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

KEYS = ("parameters", "steps", "tokens_seen", "wall_time_s", "final_val_nelbo_per_token")


def summarise(runs: Path, names: list[str]) -> dict:
    arms: dict[str, dict] = {}
    for name in names:
        log = runs / name / "train_log.json"
        if not log.exists():
            arms[name] = {"error": "no train_log.json (not finished)"}
            continue
        summary = json.loads(log.read_text())
        arms[name] = {k: summary[k] for k in KEYS} | {
            # the floor the bound must get below (records before 2026-11-30 lack it)
            "val_unigram_nats_per_token": summary.get("val_unigram_nats_per_token"),
            "config": summary["config"],
            "log": summary["log"],
        }
    done = {k: v["final_val_nelbo_per_token"] for k, v in arms.items() if "error" not in v}
    done = {k: v for k, v in done.items() if math.isfinite(v)}  # a diverged run is never picked
    return {"picked": min(done, key=done.get) if done else None, "arms": arms}


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: grid_pick.py RUNS NAME [NAME ...]")
    result = summarise(Path(argv[0]), argv[1:])
    print(json.dumps(result, indent=1))
    for name, arm in result["arms"].items():
        bound = arm.get("final_val_nelbo_per_token", arm.get("error"))
        floor = arm.get("val_unigram_nats_per_token")
        print(
            f"{name}: {arm.get('parameters')} params, {arm.get('steps')} steps, {bound}"
            + (f" (unigram floor {floor:.4f})" if floor is not None else ""),
            file=sys.stderr,
        )
    print(f"picked: {result['picked']}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
