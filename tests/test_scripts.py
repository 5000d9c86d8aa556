"""The example and the benchmark run end to end (tiny sizes)."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_spiral_example():
    out = run("examples/spiral_odeint.py", "--iters", "4")
    assert "rampde_fx bfloat16" in out and "torchdiffeq float32" in out


@pytest.mark.slow
def test_benchmark_quick(tmp_path):
    path = tmp_path / "results.json"
    run("benchmarks/run.py", "--quick", "--json", str(path))
    rows = json.loads(path.read_text())["workloads"]["mlp"]
    ours = {row["variant"]: row for row in rows}["rampde_fx bf16"]
    assert ours["saved_MiB"] > 0 and ours["grad_err"] < 2 ** -7
