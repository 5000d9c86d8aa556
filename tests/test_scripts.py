"""The examples and the benchmark run end to end (tiny sizes) and report what they promise."""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BF16_GRAD_BOUND = 2 ** -5  # a few bf16 unit roundoffs (2**-8), through a whole solve


def run(*args: str) -> str:
    # One thread: OpenMP's spinning threads slow down by orders of magnitude on a CI runner or
    # machine whose other cores are busy, and these runs measure nothing that needs two.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def numbers_after(label: str, out: str) -> list[float]:
    """The numbers on the line that starts (after spaces) with ``label``."""
    line = next(line for line in out.splitlines() if line.strip().startswith(label))
    return [float(x) for x in re.findall(r"\d+\.\d+(?:e[-+]\d+)?", line[len(label):])]


@pytest.mark.slow
def test_spiral_example():
    out = run("examples/spiral_odeint.py", "--iters", "4")
    assert "rampde_fx bfloat16" in out and "torchdiffeq float32" in out


@pytest.mark.slow
def test_quickstart():
    out = run("examples/quickstart.py", "--steps", "6")
    fp32 = numbers_after("torchdiffeq float32", out)
    bf16 = numbers_after("rampde_fx bfloat16 compiled", out)
    # final loss, accuracy, ms/step, first step s, saved MiB
    assert abs(bf16[0] - fp32[0]) < 0.05 * fp32[0]
    assert 0 < bf16[4] < fp32[4]  # one bf16 state per step against every activation


@pytest.mark.slow
def test_cnf_toy(tmp_path):
    png = tmp_path / "cnf.png"
    out = run("examples/cnf_toy.py", "--iters", "3", "--batch", "64", "--plot", str(png))
    fp32 = numbers_after("trained in float32 (torchdiffeq)", out)[0]
    bf16 = numbers_after("trained in bfloat16 (rampde_fx)", out)[0]
    assert math.isfinite(fp32) and abs(bf16 - fp32) < 0.05 * abs(fp32)
    assert numbers_after("bf16 model with its own bf16 solve:", out)[-1] < 1e-2
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_flow_matching(tmp_path):
    png = tmp_path / "flow.png"
    out = run("examples/flow_matching.py", "--iters", "20", "--batch", "128", "--samples", "256",
              "--steps", "4", "--repeats", "1", "--plot", str(png))
    # sample ms, loglik ms, NLL, samples' and log p's relative errors, log p's mean |error|
    fp32 = numbers_after("torchdiffeq float32", out)
    bf16 = numbers_after("rampde_fx.mixed_precision bf16", out)
    assert len(fp32) == len(bf16) == 6 and all(map(math.isfinite, fp32 + bf16))
    assert min(fp32[:2] + bf16[:2]) > 0
    assert max(fp32[3:]) < 1e-5
    assert max(bf16[3:5]) < BF16_GRAD_BOUND
    # |mean(a) - mean(b)| <= mean|a - ref| + mean|b - ref|, up to the printed 4 decimals
    assert abs(bf16[2] - fp32[2]) <= bf16[5] + fp32[5] + 1e-4
    assert "converted by the scope: 2 solve(s)" in out and "runs eagerly" not in out
    assert png.stat().st_size > 0


@pytest.mark.slow
def test_odenet_classifier():
    out = run("examples/odenet_classifier.py", "--epochs", "1", "--channels", "8")
    fp32 = numbers_after("torchdiffeq float32", out)[0]
    bf16 = numbers_after("rampde_fx bfloat16", out)[0]
    assert 0 <= fp32 <= 1 and abs(bf16 - fp32) < 0.15  # same batches, same initial weights
    assert numbers_after("bf16 solve's test logits", out)[-1] < 1e-2


def benchmark(tmp_path: pathlib.Path, *workloads: str, extra: tuple[str, ...] = ()) -> dict:
    path = tmp_path / "results.json"
    args = [arg for name in workloads for arg in ("--workload", name)]
    run("benchmarks/run.py", "--quick", *args, *extra, "--json", str(path))
    return json.loads(path.read_text())


@pytest.mark.slow
def test_benchmark_mlp(tmp_path):
    report = benchmark(tmp_path, "mlp", extra=("--compile-times",))
    times = report["compile_times"]
    for steps in (8, 128):
        assert times[f"compile_s_{steps}"] > 0 and times[f"steady_s_{steps}"] > 0
    rows = {row["variant"]: row for row in report["workloads"]["mlp"]}
    assert len(rows) == 7 and not any("skipped" in row for row in rows.values())
    for name, row in rows.items():
        assert math.isfinite(row["median_ms"]) and math.isfinite(row["output_err"]), name
        if name.startswith("rampde_fx"):
            assert row["grad_err"] < (BF16_GRAD_BOUND if "bf16" in name else 1e-5), name
    ours, compiled = rows["rampde_fx bf16"], rows["rampde_fx bf16 compiled"]
    # float32 accumulation and the discrete adjoint against autocast's bf16 everywhere
    assert ours["grad_err"] < rows["torchdiffeq autocast bf16"]["grad_err"]
    assert 0 < ours["saved_MiB"] < rows["torchdiffeq fp32"]["saved_MiB"]
    assert compiled["grad_err"] == pytest.approx(ours["grad_err"], rel=0.1)
    # the same kernels, run without torch.compile
    assert rows["rampde_fx bf16 compile_steps"]["grad_err"] == pytest.approx(
        compiled["grad_err"], rel=0.05)
    assert ours["matmul_floor"] > 0 and "matmul_floor" not in rows["rampde_fx fp32"]


@pytest.mark.slow
def test_benchmark_cnf_and_adaptive(tmp_path):
    report = benchmark(tmp_path, "cnf", "odenet")
    rows = {row["variant"]: row for row in report["workloads"]["cnf"]}
    assert rows["rampde_fx bf16"]["grad_err"] < BF16_GRAD_BOUND
    assert rows["rampde_fx fp32"]["grad_err"] < 1e-5
    # the exact trace's torch.autograd.grad is part of the captured graph: it compiles
    compiled = rows["rampde_fx bf16 compiled"]
    assert "skipped" not in compiled
    # inductor keeps fused intermediates (and small products) in float32 where eager rounds
    # each op's result to bf16: no less accurate than the eager bf16 solve
    assert compiled["grad_err"] < 1.1 * rows["rampde_fx bf16"]["grad_err"]
    # dopri5 at rtol=1e-3 against a tight float64 solve: the float32 rows carry the method's
    # error; rampde_fx's float32 mode takes torchdiffeq's steps, bfloat16 adds its roundoff.
    odenet = {row["variant"]: row for row in report["workloads"]["odenet"]}
    fp32, ours, theirs = (odenet[name] for name in ("rampde_fx fp32", "rampde_fx bf16",
                                                     "torchdiffeq fp32"))
    assert fp32["output_err"] == pytest.approx(theirs["output_err"], rel=1e-3)
    assert ours["output_err"] < fp32["output_err"] + 2**-8
    assert ours["grad_err"] < fp32["grad_err"] + BF16_GRAD_BOUND


@pytest.mark.slow
def test_benchmark_inference_and_odernn(tmp_path):
    report = benchmark(tmp_path, "sample", "likelihood", "odernn")["workloads"]
    inference = report["sample"] + report["likelihood"]
    tables = {row["table"] for row in inference}
    assert len(tables) == 5 and len(inference) == 5 * 6
    for table in tables:
        rows = {row["variant"]: row for row in inference if row["table"] == table}
        assert not any("skipped" in row for row in rows.values()), table
        assert all(row["median_ms"] > 0 and "grad_err" not in row and "saved_MiB" not in row
                   for row in rows.values()), table
        # fixed grids: float32 at roundoff; dopri5 at 1e-3 against a float64 solve at 1e-8
        assert rows["torchdiffeq fp32"]["output_err"] < (1e-3 if "dopri5" in table else 1e-5)
        ours = rows["rampde_fx bf16"]["output_err"]
        assert ours < BF16_GRAD_BOUND, table
        # the scope converts the torchdiffeq call into the same solve
        assert rows["rampde_fx.mixed_precision bf16"]["output_err"] == pytest.approx(ours)
        assert rows["rampde_fx bf16 compiled"]["output_err"] < 1.5 * ours, table
        assert rows["rampde_fx bf16 compile_steps"]["output_err"] < 1.5 * ours, table
    rows = {row["variant"]: row for row in report["odernn"]}
    assert len(rows) == 5 and not any("skipped" in row for row in rows.values())
    ours, compiled = rows["rampde_fx bf16 convert"], rows["rampde_fx bf16 convert compiled"]
    assert ours["grad_err"] < min(BF16_GRAD_BOUND, rows["torchdiffeq autocast bf16"]["grad_err"])
    # Both bf16 solves: the compiled kernels keep fused intermediates (the results of small
    # products widened to float32 included) in float32, so they round less often than eager,
    # and a bf16 solve is nowhere near float32's roundoff.
    assert ours["grad_err"] / 10 < compiled["grad_err"] < 1.5 * ours["grad_err"]
    assert 0 < ours["saved_MiB"] < rows["torchdiffeq fp32"]["saved_MiB"]
    assert compiled["first_call_s"] > ours["first_call_s"] > 0
    assert rows["rampde_fx bf16 convert compile_steps"]["grad_err"] == pytest.approx(
        compiled["grad_err"], rel=0.5)


@pytest.mark.slow
def test_adaptive_step_counts():
    out = run("benchmarks/adaptive_steps.py", "--channels", "8", "--size", "8", "--batch", "2")
    rows = {tuple(line.split()[:3]): line for line in out.splitlines()}
    # torchdiffeq's float16 norm overflows on 1024 components of magnitude 10; rampde_fx's
    # (in float32) does not
    assert "underflow in dt" in rows[("1e-03", "torchdiffeq", "fp16")]
    fp32, fp16 = (numbers_after("1e-03 rampde_fx " + name, out) for name in ("fp32", "fp16"))
    assert fp16[0] < fp32[0] + 2**-10  # output error: float16's roundoff beside dopri5's own
    assert "ToleranceWarning" in out  # 1e-6 is below bfloat16's rounding floor


@pytest.mark.slow
def test_budget_benchmark():
    out = run("benchmarks/budget.py", "--steps", "300", "--states", "4", "16", "--long-steps",
              "600", "--long-states", "8", "--batch", "8")
    # checkpoint, kept (number, MiB), states, nfe fwd, nfe bwd, recomputed, bound, ratio...
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:5]}
    assert rows["4"][3] == "4" and rows["16"][3] == "16"  # states kept
    assert rows["4"][8] == rows["16"][8] == "1.000"  # recomputed steps: revolve's bound
    assert all(row[-1] == "0.0e+00" for row in rows.values())  # the gradients of 'steps'
    assert "600 steps, Budget(8)" in out and "ratio 1.000" in out


@pytest.mark.slow
def test_per_call_benchmark():
    out = run("benchmarks/per_call.py", "--calls", "20")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:4]}
    assert set(rows) == {"reused", "lambda", "module"}
    for name in ("lambda", "module"):  # one site, and nothing left alive by 20 calls
        assert rows[name][4] == "1"
        assert rows[name][5] == rows[name][7] and rows[name][8] == rows[name][10]
    assert len(numbers_after("mlp", out)) == 1  # the guard check's cost per solve
