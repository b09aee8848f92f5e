"""benchmarks/gpu_proof.sh stays runnable between GPU runs: its CPU harness, and the summary's arithmetic.

The harness test runs the real script on the CPU (CUDA hidden, so also on a GPU machine) with its
pytest steps skipped and one step made to fail on purpose; the summary tests feed proof_summary.py
results shaped like a GPU run's and check each ratio and verdict.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_proof.sh"
STEPS = ["env", "bench-synthetic", "bench-dataset-packed", "bench-dataset-padded", "planner", "tests-gpu",
         "tests-cpu", "tests-gpu-8b", "planner-8b", "summary"]


def proof(*args, env=None, cwd=None, timeout=600):
    full = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}  # the CPU harness, even on a GPU
    full.pop("GPU_PROOF_FAIL", None)
    full.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


def recorded_steps(out) -> list:
    """The steps as the script recorded them in steps.jsonl, in order."""
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == STEPS  # every step recorded, ran or not, in the script's order
    return steps


def alpaca_rows(n=48):
    """Alpaca-format records of varied lengths (with and without `input`), like the real set's."""
    return [{"instruction": f"Explain point {i} about fusion " + "in detail " * (i % 7),
             "input": "" if i % 3 else f"Context {i}: " + "plasma " * (i % 5),
             "output": f"Point {i}: " + "the tokamak confines the plasma. " * (1 + i % 6)} for i in range(n)]


@pytest.mark.slow
def test_cpu_harness_runs_every_step_and_records_a_failed_one(tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(alpaca_rows()))
    out = tmp_path / "proof"
    # bench-synthetic fails on purpose: the steps after it must still run.
    result = proof("--skip-tests", "--out", str(out), env={"GPU_PROOF_FAIL": "bench-synthetic", "ALPACA_JSON": str(data)},
                   cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # one step failed
    assert "1 step(s) failed" in result.stdout

    steps = {s["step"]: s for s in recorded_steps(out)}
    assert steps["bench-synthetic"]["status"] == "failed" and steps["bench-synthetic"]["exit"] == 3
    for name in ("env", "bench-dataset-packed", "bench-dataset-padded", "planner", "summary"):
        assert steps[name]["status"] == "ok", (name, (out / steps[name]["log"]).read_text()[-3000:])
    assert {steps[n]["status"] for n in ("tests-cpu", "tests-gpu", "tests-gpu-8b", "planner-8b")} == {"skipped"}

    # The later steps really ran: packed and padded hf rows trained the same examples in the same order.
    packed, padded = (json.loads((out / f"bench-dataset-{k}.json").read_text()) for k in ("packed", "padded"))
    hf_packed, hf_padded = (next(r for r in rep["rows"] if r["backend"] == "hf") for rep in (packed, padded))
    assert (hf_packed["status"], hf_packed["packing"], hf_padded["status"], hf_padded["packing"]) == \
        ("ok", True, "ok", False)
    assert hf_packed["timed_counts"]["tokens"] == hf_padded["timed_counts"]["tokens"]
    assert hf_padded["timed_counts"]["positions"] > hf_padded["timed_counts"]["tokens"]  # padding was there
    assert hf_packed["first_loss"] == pytest.approx(hf_padded["first_loss"], rel=1e-3)
    plan = json.loads((out / "plan-1b-hf.json").read_text())
    assert plan["status"] == "ok" and [s["budget"] for s in plan["setups"]] == ["card", "12"]
    assert all(s["predicted"]["reserved_gib"] > 0 for s in plan["setups"])
    assert json.loads((out / "plan-1b-unsloth.json").read_text())["status"] == "unavailable"  # no GPU

    summary = (out / "SUMMARY.md").read_text()
    assert "**CPU harness run, not a performance result.**" in summary
    for section in ("## Steps", "## Acceptance (issue 12)", "## Figures"):
        assert section in summary
    assert "**bench-synthetic** exited with status 3" in summary and "failing on purpose" in summary
    assert "| bench-dataset-padded | ok | 0 |" in summary
    assert "| PASS |" not in summary and "| FAIL |" not in summary  # a CPU run passes or fails nothing
    assert "0 PASS, 0 FAIL" in summary
    assert "| hf: packed >= 2x padded tokens/s | " in summary  # computed from the two dataset runs
    assert "| unsloth >= 0.95x plain Unsloth (44,100 tokens/s) | n/a | not measured (CPU harness): no synthetic" \
        in summary
    assert "planner fastft:tiny hf, budget 12: reserved within 15%" in summary


def test_only_runs_the_named_steps_and_always_the_summary(tmp_path):
    out = tmp_path / "proof"
    result = proof("--only", "env", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = recorded_steps(out)
    ran = [s["step"] for s in steps if s["status"] == "ok"]
    assert ran == ["env", "summary"]
    assert {s["note"] for s in steps if s["step"] not in ran} == {"not in --only"}
    assert json.loads((out / "env.json").read_text())["mode"] == "cpu"
    assert "| tests-gpu | skipped (not in --only) |" in (out / "SUMMARY.md").read_text()
    unknown = proof("--only", "env,planer", "--out", str(tmp_path / "other"), timeout=60)
    assert unknown.returncode == 2 and "unknown step planer" in unknown.stderr and not (tmp_path / "other").exists()


def test_deadline_skips_the_steps_it_leaves_no_time_for_but_not_the_summary(tmp_path):
    out = tmp_path / "proof"
    # 60 s is the CPU summary's own budget, kept back: no step before it has 15 s left.
    result = proof("--deadline", "60", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = recorded_steps(out)
    assert [s["status"] for s in steps] == ["skipped"] * 9 + ["ok"]
    notes = {s["step"]: s["note"] for s in steps[:-1]}
    assert {notes.pop("tests-gpu-8b"), notes.pop("planner-8b")} == {"needs --with-8b"}
    assert all(note.startswith("--deadline 60: ") for note in notes.values()), notes
    assert (out / "SUMMARY.md").exists()
    bad = proof("--deadline", "soon", "--out", str(tmp_path / "other"), timeout=60)
    assert bad.returncode == 2 and "--deadline needs whole seconds" in bad.stderr


def test_refuses_a_results_folder_that_is_not_empty(tmp_path):
    (tmp_path / "earlier.json").write_text("{}")
    result = proof("--skip-tests", "--out", str(tmp_path), timeout=120)
    assert result.returncode == 2 and "is not empty" in result.stderr and "never overwrites" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["earlier.json"]


# --------------------------------------------------------------------------- the summary's arithmetic


def load_summary_module():
    spec = importlib.util.spec_from_file_location("proof_summary", ROOT / "benchmarks" / "proof_summary.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def bench_row(backend, tps, alloc, reserved, first=2.0, last=1.5, padded_tps=None):
    return {"backend": backend, "status": "ok", "tokens_per_second": tps, "padded_tokens_per_second": padded_tps or tps,
            "peak_memory_allocated_gib": alloc, "peak_memory_reserved_gib": reserved, "first_loss": first,
            "last_loss": last, "mfu": 0.2, "step_time_s": {"median": 0.2}}


def bench_report(*rows):
    return {"rows": list(rows), "settings": {"model": "random:llama-3.2-1b", "quantization": "4bit", "batch_size": 4,
                                             "seq_len": 2048, "warmup_steps": 10, "timed_steps": 20}}


def test_summary_computes_each_ratio_and_verdict(tmp_path):
    s = load_summary_module()
    (tmp_path / "steps.jsonl").write_text(json.dumps({"step": "planner", "status": "timeout", "exit": 124, "seconds": 50,
                                                      "budget_s": 50, "log": "logs/planner.log", "note": ""}) + "\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "planner.log").write_text("loading\nstill compiling\n")
    (tmp_path / "env.json").write_text(json.dumps({"gpu": {"name": "NVIDIA H200", "memory_gib": 139.8, "driver": "580",
                                                           "cuda_runtime": "13.0"}, "versions": {"torch": "2.11"}}))
    # unsloth 0.96x the reference; hf 3.2x hf-stock at 20% of its memory, 0.60x unsloth.
    (tmp_path / "bench-synthetic.json").write_text(json.dumps(bench_report(
        bench_row("unsloth", 42_336, 2.5, 3.0), bench_row("hf", 25_401.6, 3.0, 3.5), bench_row("hf-stock", 7_938, 15.0, 16.0))))
    # hf: packing 2.5x with the same losses; unsloth: 1.5x, and its last loss 3% off.
    (tmp_path / "bench-dataset-packed.json").write_text(json.dumps(bench_report(
        bench_row("unsloth", 30_000, 3, 4, last=1.03), bench_row("hf", 25_000, 3, 4))))
    (tmp_path / "bench-dataset-padded.json").write_text(json.dumps(bench_report(
        bench_row("unsloth", 20_000, 3, 4, last=1.0, padded_tps=40_000),
        bench_row("hf", 10_000, 3, 4, padded_tps=22_000))))
    setup = {"budget": "card", "status": "ok", "chosen": {"micro_batch": 8, "grad_accum": 1,
                                                          "gradient_checkpointing": "off"},
             "predicted": {"allocated_gib": 10.0, "reserved_gib": 11.0},
             "measured": {"first_step": {"allocated_gib": 10.5, "reserved_gib": 12.0},
                          "after_first_step": {"allocated_gib": 10.2, "reserved_gib": 11.5}},
             "error": {"allocated": 0.02, "reserved": 0.0455}}
    too_far = dict(setup, budget="12", error={"allocated": 0.2, "reserved": -0.18})
    (tmp_path / "plan-1b-hf.json").write_text(json.dumps({"backend": "hf", "model": "random:llama-3.2-1b",
                                                          "status": "ok", "setups": [setup, too_far]}))
    (tmp_path / "tests-gpu.xml").write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_gpu_backends" name="test_losses_agree"><system-out>\nfirst loss: hf 11.9000, '
        'unsloth 12.0000; loss at step 30: hf 6.0000, unsloth 6.4000\n</system-out></testcase>'
        '<testcase classname="tests.test_gpu_backends" name="test_adapter_gives_the_same_logits_on_the_other_stack'
        '[unsloth-hf]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_plan" name="test_other"><skipped/></testcase>'
        '<testcase time="0.000" />'  # what pytest writes for a test stopped by SIGINT at the step's budget
        '</testsuite></testsuites>')

    page = s.summarize(tmp_path, "gpu")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in page.splitlines() if line.startswith("| ")}

    def check(name, *parts):
        assert name in rows, f"no row {name!r} in:\n{page}"
        for part in parts:
            assert part in rows[name], (part, rows[name])

    check("unsloth >= 0.95x plain Unsloth (44,100 tokens/s, H100 reference)", "42,336 tokens/s = 0.96x", "PASS")
    check("unsloth peak allocated <= 1.05x plain Unsloth (2.3 GiB)", "2.50 GiB = 1.09x", "FAIL")
    check("hf >= 3x hf-stock tokens/s", "= 3.20x", "PASS")
    check("hf peak memory <= 25% of hf-stock", "= 20.0%", "(reserved 21.9%)", "PASS")
    check("hf >= 0.55x unsloth tokens/s", "= 0.60x", "PASS")
    check("hf: packed >= 2x padded tokens/s", "= 2.50x", "computes 2.20x positions per real token", "PASS")
    check("hf: packed and padded losses within 2%", "PASS")
    check("unsloth: packed >= 2x padded tokens/s", "= 1.50x", "FAIL")
    check("unsloth: packed and padded losses within 2%", "(3.0%)", "FAIL")
    check("planner llama-3.2-1b hf, budget card: reserved within 15%", "predicted 11.00, measured 11.50 GiB (+4.5%)",
          "PASS")
    check("planner llama-3.2-1b hf, budget 12: reserved within 15%", "(-18.0%)", "FAIL")
    check("hf vs unsloth first loss within 2%", "0.8% apart", "PASS")
    check("hf vs unsloth loss at step 30 within 5%", "6.7% apart", "FAIL")
    check("gpu tests pass (1B)", "1 passed, 1 failed", "FAIL")
    check("adapters load across stacks (unsloth <-> hf)", "unsloth-hf: failure", "FAIL")
    check("planner", "timeout", "124")
    assert "**planner** ran past its budget and was stopped" in page and "still compiling" in page
    assert "(this GPU differs: that ratio is indicative)" in page
    assert "CPU harness" not in page


def test_summary_says_what_is_missing_and_why(tmp_path):
    s = load_summary_module()
    (tmp_path / "bench-synthetic.json").write_text(json.dumps(bench_report(
        {"backend": "unsloth", "status": "error", "reason": "RuntimeError: CUDA out of memory\nmore"},
        bench_row("hf", 25_000, 3.0, 3.5))))
    page = s.summarize(tmp_path, "gpu")
    assert "| hf >= 0.55x unsloth tokens/s | n/a | not measured: unsloth error: RuntimeError: CUDA out of memory |" in page
    assert "not measured: no packed results" in page
    assert "- environment: not recorded (the env step failed)" in page
    assert "| PASS |" not in page and "| FAIL |" not in page


def test_the_gpu_tests_probe_trains_inits_and_loads_on_the_cpu(tmp_path):
    """tests/gpu_probe.py, which every GPU parity test runs, on the hf stack and fastft:tiny: it cannot rot
    between GPU runs (it once called a function the code had renamed, and only a GPU would have shown it)."""
    import torch
    from safetensors.torch import load_file
    from test_gpu_backends import RECIPE, Probe, _start_training, _trained

    tiny = ["model.name=fastft:tiny", "model.quantization=16bit", "model.dtype=fp32", "train.max_steps=3"]
    init = Probe("init", "hf", str(RECIPE), str(tmp_path / "step0.safetensors"), log=tmp_path / "init.log", extra=tiny)
    run = _trained(_start_training(tmp_path, "hf", "main", extra=tiny))
    init.output()
    assert run["summary"]["steps"] == 3 and len(run["batches"]) == 3
    start = load_file(tmp_path / "step0.safetensors")
    assert start and all(".lora_" in name for name in start)

    loaded = Probe("load", "hf", str(run["dir"] / "adapter"), str(run["logits"]), str(tmp_path / "loaded.safetensors"),
                   str(RECIPE), log=tmp_path / "load.log", extra=tiny)
    loaded.output()
    trained, again = load_file(run["logits"])["logits"], load_file(tmp_path / "loaded.safetensors")
    assert torch.allclose(again["logits"], trained, atol=1e-4)  # the saved adapter gives the trained model back
    assert not torch.allclose(again["base_logits"], trained, atol=1e-4)  # and the adapter changed something
