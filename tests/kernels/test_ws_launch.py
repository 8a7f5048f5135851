"""The warp-specialized kernel's launch options refuse what the GPU cannot run, before
anything compiles. Checked in a process of its own: importing a Gluon module here would
break the interpreter tests that share this process (see test_triton_interpret.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHECK = """
import json, sys
try:
    from sparsek import gluon_ws_attn as ws
except (ImportError, AttributeError) as exc:  # a Triton build without Gluon's Hopper API
    print(json.dumps({"skip": repr(exc)}))
    raise SystemExit(0)
out = {"default": ws.launch_kwargs(64, 4), "errors": [],
       "tuned": [ws.launch_kwargs(*tile, rows=rows)["maxnreg"]
                 for rows, tiles in ws.WS_CONFIGS.items() for tile in tiles]}
for args in json.loads(sys.argv[1]):
    try:
        ws.launch_kwargs(*args)
        out["errors"].append(None)
    except ValueError as exc:
        out["errors"].append(str(exc))
print(json.dumps(out))
"""

BAD = [
    ((64, 1), "at least 2 shared-memory slots"),
    ((32, 4), "tiles of block_n=64 keys (its TMA box); got 32"),
    ((64, 4, 228, 48), "consumer_regs must be a multiple of 8"),
    ((64, 4, 224, 16), "producer_regs must be a multiple of 8 from 24 to 256"),
    ((64, 4, 240, 56), "must be at most 504"),
    ((64, 2, 216, 56, 64), "1 x consumer_regs + producer_regs must be at most 256"),
    ((64, 2, None, None, 32), "runs programs of 64 or 128 rows; got 32"),
    ((64, 2, 200, 48, 64), "what the producer leaves: 2 x 128 - 48 = 208; got 200"),
]


def test_ws_launch_options_refuse_what_the_gpu_cannot_run():
    args = [list(a) for a, _ in BAD] + [[64, 4, 216, 72], [64, 2, 216, 40, 64]]
    run = subprocess.run([sys.executable, "-c", CHECK, json.dumps(args)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(f"this Triton build has no Gluon Hopper API: {out['skip']}")
    # The default is the first tuned tile's split, which fills the kernel's cap exactly.
    assert (out["default"]["CONSUMER_REGS"], out["default"]["PRODUCER_REGS"]) == (216, 72)
    for (_, want), got in zip(BAD, out["errors"]):
        assert got is not None and want in got
    assert out["errors"][-2:] == [None, None]  # 2 x 216 + 72 = 504 and 216 + 40 fit
    # Every tile the tuner may pick is one the launch options accept, at its rows' cap.
    assert sorted(set(out["tuned"])) == [128, 168]
