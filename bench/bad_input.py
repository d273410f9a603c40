"""How fast does bad input fail? Every case of the bad-input table (tests/bad_inputs.py)
through the real entry point, `python -m fedtune.cli run ...`, one fresh process each.

    HF_HUB_OFFLINE=1 python bench/bad_input.py

Prints per case: seconds, exit code, and the one line printed. The target is exit code 2
and under 5 s each (interpreter start and imports included). Not a test: timings depend on
the machine and its load.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import bad_inputs  # noqa: E402
import tinymodels  # noqa: E402

FLOOR = (
    "import fedtune.cli, torch, datasets, flwr_datasets.partitioner, "
    "transformers.configuration_utils"
)


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tok = tinymodels.gpt2_tokenizer(tmp / "tok")
        llama, gpt2 = (
            tinymodels.tiny_llama(tmp / "llama", tok),
            tinymodels.tiny_gpt2(tmp / "gpt2", tok),
        )
        recipe = bad_inputs.write_inputs(tmp / "cases", llama, gpt2)
        worst, bad = 0.0, 0
        print(f"{'seconds':>7}  exit  case: message")
        for case in bad_inputs.TABLE:
            args = bad_inputs.argv(case, tmp / "cases", gpt2, recipe)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "fedtune.cli", *args],
                text=True,
                capture_output=True,
                cwd=tmp / "cases",
            )
            seconds = time.perf_counter() - t0
            lines = [
                x for x in proc.stderr.strip().splitlines() if not x.startswith("fedtune: warning:")
            ]
            ok = proc.returncode == 2 and len(lines) == 1
            bad += not ok
            worst = max(worst, seconds)
            print(
                f"{seconds:7.2f}  {proc.returncode:4d}  {case}: "
                f"{lines[-1][:150] if lines else '(nothing)'}"
                f"{'' if ok else '  <-- NOT ONE LINE/EXIT 2'}"
            )
        print(f"slowest {worst:.2f} s; {bad} case(s) not one line with exit 2")
        # the floor under the cases that must read the model or the data: importing what
        # every run imports anyway, in a fresh process, same machine, same minute
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", FLOOR], check=True, capture_output=True)
        print(f"{time.perf_counter() - t0:7.2f}  import floor: {FLOOR}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
