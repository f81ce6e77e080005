"""train.py's periodic evaluation (eval.evaluate: 256 held-out scenes, the caption checker) of a record-configuration
checkpoint at the given eval batch sizes, in turn. Usage: evalbench.py RUN N B1,B2,... [--no-keep]
(--no-keep: glibc's default malloc thresholds, not train.py's and eval.py's keep_freed_memory)."""
import json
import sys
import time

import eval as ev
from data import open_heldout
from model import load_run

if "--no-keep" not in sys.argv:
    ev.keep_freed_memory()  # as train.py and eval.py (eval.setup_distributed)
model, run, ckpt = load_run(sys.argv[1], "ema")
a = run["args"]
N = int(sys.argv[2])
split = open_heldout("builtin", N, "long", a["resolution"], a["seed"], a["text_context"])
for bs in [int(b) for b in sys.argv[3].split(",")]:
    t = time.perf_counter()
    result = ev.evaluate(model, split, N, (3, 32, 32), ev.to_uint8, None, batch_size=bs, **run["sampling"])
    print(json.dumps(dict(batch=bs, seconds=round(time.perf_counter() - t, 1), **result)), flush=True)
