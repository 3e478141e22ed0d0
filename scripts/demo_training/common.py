"""Constants every phase of the demo-model training shares, and the log line format."""

from __future__ import annotations

import time

# (sequence length, batch size, steps). Every stage uses ~4096 tokens per step.
DEFAULT_STAGES = "64x64x150,128x32x300,256x16x400,512x8x650,1024x4x300,2048x2x350"
TASK_WEIGHTS = {"needle": 1.0, "multikey": 1.0, "multidoc": 1.5, "vartrack": 1.5}
EVAL_SEED = 1_000_003  # held-out documents (training documents use string seeds "train/<seed>/<step>/<row>")
PAD, BOS, EOS = 3, 1, 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
