"""SUMMARY.md of a GPU proof run: every figure issue 12's acceptance list needs, each ratio computed.

    python benchmarks/proof_summary.py RESULTS_DIR --mode gpu      # the last step of benchmarks/gpu_proof.sh

Reads what the earlier steps wrote into RESULTS_DIR (steps.jsonl, env.json, tests-*.xml,
bench-*.json, plan-*.json) and writes RESULTS_DIR/SUMMARY.md: the steps (which failed and
why, with the end of their logs), one line per acceptance target (measured, ratio, PASS / FAIL /
not measured), then the figures behind them. A missing file makes its targets "not measured";
it never stops the summary. A CPU run (`--mode cpu`) says so at the top, and no target passes or
fails on it: the harness ran, nothing was measured.
"""

from __future__ import annotations

import argparse
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

# Plain Unsloth, Llama-3.2-1B shape at 4 x 2048, 4-bit, r=16 all linear, checkpointing on,
# on an H100 with a hand-written script (../shared/BENCHMARKING.md).
REFERENCE_UNSLOTH_TPS = 44_100
REFERENCE_UNSLOTH_GIB = 2.3
PARITY_FIRST, PARITY_LAST = 0.02, 0.05  # hf vs unsloth loss: first logged, after 30 steps (the gpu test's bounds)
SAME_LOSS = 0.02  # packed vs padded, same examples in the same order: first and last loss within 2%
PLANNER_TOLERANCE = 0.15
NOT_MEASURED = "not measured"


@dataclass
class Target:
    name: str
    measured: str
    verdict: str  # PASS, FAIL, or "not measured ..." with why


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verdict(ok: bool | None, why_not: str = "") -> str:
    if ok is None:
        return f"{NOT_MEASURED}{': ' + why_not if why_not else ''}"
    return "PASS" if ok else "FAIL"


def ratio(a, b):
    return a / b if a is not None and b else None


def rel_diff(a, b):
    return abs(a - b) / abs(b) if a is not None and b else None


def row(report: dict | None, name: str) -> dict | None:
    """The ok row `name` of a `fastft bench` report, else None."""
    for r in (report or {}).get("rows", []):
        if r["backend"] == name and r["status"] == "ok":
            return r
    return None


def why_missing(report: dict | None, name: str, what: str) -> str:
    if report is None:
        return f"no {what} results"
    for r in report.get("rows", []):
        if r["backend"] == name:
            return f"{name} {r['status']}: {first_line(r.get('reason'))}"
    return f"no {name} row"


def first_line(text: str | None, limit: int = 100) -> str:
    line = ((text or "").strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _signed(x) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _x(x) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


# --------------------------------------------------------------------------- tests


def junit(path: Path) -> dict | None:
    """Outcome of each test case in a pytest --junitxml file, and what each printed."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = {}
    for case in root.iter("testcase"):
        if not case.get("name"):  # the entry pytest leaves for a test stopped by SIGINT
            continue
        name = f"{case.get('classname', '')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        cases[name] = {"outcome": outcome, "out": "".join(c.text or "" for c in case.iter("system-out"))}
    return cases


def count(cases: dict) -> dict:
    out = {"passed": 0, "failure": 0, "error": 0, "skipped": 0}
    for c in cases.values():
        out[c["outcome"]] += 1
    return out


def gpu_test_targets(cases: dict | None) -> list[Target]:
    if cases is None:
        return [Target("gpu tests pass (1B)", "no tests-gpu.xml", verdict(None, "step skipped or failed"))]
    n = count(cases)
    failed = [k.split("::")[-1] for k, c in cases.items() if c["outcome"] in ("failure", "error")]
    ran = n["passed"] + n["failure"] + n["error"]
    text = f"{n['passed']} passed, {n['failure']} failed, {n['error']} errors, {n['skipped']} skipped"
    targets = [Target("gpu tests pass (1B)", text + (f"; failed: {', '.join(failed)}" if failed else ""),
                      verdict(None if not ran else not failed, "every gpu test skipped"))]
    # test_losses_agree prints both backends' losses.
    printed = "".join(c["out"] for k, c in cases.items() if k.endswith("test_losses_agree"))
    m = re.search(r"first loss: hf ([\d.]+), unsloth ([\d.]+); loss at step 30: hf ([\d.]+), unsloth ([\d.]+)", printed)
    if m:
        hf0, un0, hf30, un30 = map(float, m.groups())
        d0, d30 = rel_diff(un0, hf0), rel_diff(un30, hf30)
        targets += [Target(f"hf vs unsloth first loss within {PARITY_FIRST:.0%}",
                           f"hf {hf0:.4f}, unsloth {un0:.4f}: {_pct(d0)} apart", verdict(d0 <= PARITY_FIRST)),
                    Target(f"hf vs unsloth loss at step 30 within {PARITY_LAST:.0%}",
                           f"hf {hf30:.4f}, unsloth {un30:.4f}: {_pct(d30)} apart", verdict(d30 <= PARITY_LAST))]
    else:
        targets.append(Target("hf vs unsloth loss parity (2% first, 5% at step 30)", "no losses printed",
                              verdict(None, "test_losses_agree did not run")))
    adapters = {k: c for k, c in cases.items() if "test_adapter_gives_the_same_logits_on_the_other_stack" in k}
    done = [c["outcome"] for c in adapters.values() if c["outcome"] != "skipped"]
    targets.append(Target("adapters load across stacks (unsloth <-> hf)",
                          ", ".join(f"{k.split('[')[-1].rstrip(']')}: {c['outcome']}" for k, c in adapters.items())
                          or "not run", verdict(all(o == "passed" for o in done) if done else None, "skipped")))
    return targets


# --------------------------------------------------------------------------- benchmarks


def synthetic_targets(report: dict | None) -> list[Target]:
    un, hf, stock = row(report, "unsloth"), row(report, "hf"), row(report, "hf-stock")
    out = []
    if un:
        r = ratio(un["tokens_per_second"], REFERENCE_UNSLOTH_TPS)
        out.append(Target(f"unsloth >= 0.95x plain Unsloth ({REFERENCE_UNSLOTH_TPS:,} tokens/s, H100 reference)",
                          f"{un['tokens_per_second']:,.0f} tokens/s = {_x(r)}", verdict(r >= 0.95)))
        mem = un["peak_memory_allocated_gib"]
        r = ratio(mem, REFERENCE_UNSLOTH_GIB)
        out.append(Target(f"unsloth peak allocated <= 1.05x plain Unsloth ({REFERENCE_UNSLOTH_GIB} GiB)",
                          f"{mem:.2f} GiB = {_x(r)}" if mem is not None else "n/a",
                          verdict(None if r is None else r <= 1.05, "no GPU memory")))
    else:
        out.append(Target("unsloth >= 0.95x plain Unsloth (44,100 tokens/s)", "n/a",
                          verdict(None, why_missing(report, "unsloth", "synthetic bench"))))
    if hf and stock:
        r = ratio(hf["tokens_per_second"], stock["tokens_per_second"])
        out.append(Target("hf >= 3x hf-stock tokens/s", f"{hf['tokens_per_second']:,.0f} / "
                          f"{stock['tokens_per_second']:,.0f} = {_x(r)}", verdict(r >= 3)))
        alloc = ratio(hf["peak_memory_allocated_gib"], stock["peak_memory_allocated_gib"])
        reserved = ratio(hf["peak_memory_reserved_gib"], stock["peak_memory_reserved_gib"])
        text = ("n/a" if alloc is None else f"allocated {hf['peak_memory_allocated_gib']:.2f} / "
                f"{stock['peak_memory_allocated_gib']:.2f} GiB = {_pct(alloc)} (reserved {_pct(reserved)})")
        out.append(Target("hf peak memory <= 25% of hf-stock", text,
                          verdict(None if alloc is None else alloc <= 0.25, "no GPU memory")))
    else:
        missing = "hf" if not hf else "hf-stock"
        out.append(Target("hf >= 3x hf-stock tokens/s, <= 25% of its memory", "n/a",
                          verdict(None, why_missing(report, missing, "synthetic bench"))))
    if hf and un:
        r = ratio(hf["tokens_per_second"], un["tokens_per_second"])
        out.append(Target("hf >= 0.55x unsloth tokens/s", f"{hf['tokens_per_second']:,.0f} / "
                          f"{un['tokens_per_second']:,.0f} = {_x(r)}", verdict(r >= 0.55)))
    else:
        out.append(Target("hf >= 0.55x unsloth tokens/s", "n/a",
                          verdict(None, why_missing(report, "unsloth" if not un else "hf", "synthetic bench"))))
    return out


def packing_targets(packed: dict | None, padded: dict | None) -> list[Target]:
    """Per backend: packed >= 2x padded tokens/s, and the same losses (same examples, same order)."""
    out = []
    for backend in ("unsloth", "hf"):
        p, d = row(packed, backend), row(padded, backend)
        if not (p and d):
            why = why_missing(packed, backend, "packed") if not p else why_missing(padded, backend, "padded")
            out.append(Target(f"{backend}: packed >= 2x padded tokens/s, same losses", "n/a", verdict(None, why)))
            continue
        r = ratio(p["tokens_per_second"], d["tokens_per_second"])
        # Padded positions per real token: the most packing could gain if step time followed positions.
        bound = ratio(d["padded_tokens_per_second"], d["tokens_per_second"])
        out.append(Target(f"{backend}: packed >= 2x padded tokens/s",
                          f"{p['tokens_per_second']:,.0f} / {d['tokens_per_second']:,.0f} = {_x(r)} (the padded run "
                          f"computes {_x(bound)} positions per real token)", verdict(r >= 2)))
        first, last = rel_diff(p["first_loss"], d["first_loss"]), rel_diff(p["last_loss"], d["last_loss"])
        out.append(Target(f"{backend}: packed and padded losses within {SAME_LOSS:.0%}",
                          f"first {p['first_loss']:.4f} vs {d['first_loss']:.4f} ({_pct(first)}), last "
                          f"{p['last_loss']:.4f} vs {d['last_loss']:.4f} ({_pct(last)})",
                          verdict(first <= SAME_LOSS and last <= SAME_LOSS)))
    return out


# --------------------------------------------------------------------------- planner


def planner_targets(plans: list[dict]) -> list[Target]:
    out = []
    for plan in plans:
        label = f"planner {plan['model'].removeprefix('random:')} {plan['backend']}"
        if plan.get("status") == "unavailable":
            out.append(Target(label, "n/a", verdict(None, first_line(plan.get("reason")))))
            continue
        for s in plan["setups"]:
            name = f"{label}, budget {s['budget']}: reserved within {PLANNER_TOLERANCE:.0%}"
            if s["status"] != "ok":
                out.append(Target(name, "n/a", verdict(None, first_line(s.get("reason")))))
            elif not s.get("measured"):
                out.append(Target(name, f"predicted {s['predicted']['reserved_gib']:.2f} GiB",
                                  verdict(None, "no GPU memory")))
            else:
                err = s["error"]["reserved"]
                measured = s["measured"]["after_first_step"] or s["measured"]["first_step"]
                out.append(Target(name, f"{setup_text(s['chosen'])}: predicted {s['predicted']['reserved_gib']:.2f}, "
                                  f"measured {measured['reserved_gib']:.2f} GiB ({_signed(err)})",
                                  verdict(err is not None and abs(err) <= PLANNER_TOLERANCE)))
    return out or [Target("planner: reserved within 15% of the prediction", "n/a", verdict(None, "no plan results"))]


def setup_text(c: dict) -> str:
    return f"micro {c['micro_batch']} x {c['grad_accum']}, checkpointing {c['gradient_checkpointing']}"


# --------------------------------------------------------------------------- the page


def steps_section(out: Path, steps: list[dict]) -> list[str]:
    lines = ["## Steps", "", "| step | status | exit | seconds / budget |", "|---|---|---|---|"]
    for s in steps:
        status = s["status"] + (f" ({s['note']})" if s.get("note") else "")
        lines.append(f"| {s['step']} | {status} | {'' if s['exit'] is None else s['exit']} | "
                     f"{s['seconds']} / {s['budget_s']} |")
    failed = [s for s in steps if s["status"] in ("failed", "timeout")]
    total = sum(s["seconds"] for s in steps)
    lines += ["", f"{len(failed)} step(s) failed; {total} s for the steps above."]
    for s in failed:
        why = "ran past its budget and was stopped" if s["status"] == "timeout" else f"exited with status {s['exit']}"
        try:
            tail = (out / s["log"]).read_text(errors="replace").splitlines()[-12:]
        except OSError:
            tail = ["(no log)"]
        lines += ["", f"**{s['step']}** {why}; the end of `{s['log']}`:", "", "```", *tail, "```"]
    return lines


def figures(synthetic, packed, padded, plans) -> list[str]:
    lines = ["## Figures", ""]
    bench_rows = [("synthetic", r) for r in (synthetic or {}).get("rows", [])]
    bench_rows += [("alpaca packed", r) for r in (packed or {}).get("rows", [])]
    bench_rows += [("alpaca padded", r) for r in (padded or {}).get("rows", [])]
    if bench_rows:
        lines += ["| workload | row | tokens/s | all tokens/s | step s | alloc GiB | reserved GiB | MFU | loss first->last |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for workload, r in bench_rows:
            if r["status"] != "ok":
                lines.append(f"| {workload} | {r['backend']} | {r['status']} | | | | | | |")
                continue
            mem = ["n/a" if r[k] is None else f"{r[k]:.2f}" for k in
                   ("peak_memory_allocated_gib", "peak_memory_reserved_gib")]
            lines.append(f"| {workload} | {r['backend']} | {r['tokens_per_second']:,.0f} | "
                         f"{r['padded_tokens_per_second']:,.0f} | {r['step_time_s']['median']:.3f} | {mem[0]} | "
                         f"{mem[1]} | {_pct(r['mfu']) if r.get('mfu') is not None else 'n/a'} | "
                         f"{r['first_loss']:.3f}->{r['last_loss']:.3f} |")
        settings = [f"{name}: {s['model']} {s['quantization']}, batch {s['batch_size']} x {s['seq_len']}, "
                    f"{s['warmup_steps']} warm-up + {s['timed_steps']} timed steps"
                    for name, rep in (("synthetic", synthetic), ("alpaca", packed or padded)) if rep
                    for s in [rep["settings"]]]
        lines += ["", "; ".join(settings) + ". Full tables: `bench-*.md`."]
    measured = [(p, s) for p in plans for s in p.get("setups", []) if s.get("status") == "ok"]
    if measured:
        lines += ["", "| planner run | budget | chosen setup | predicted alloc / reserved GiB | measured alloc / reserved "
                  "GiB (first step) | error alloc / reserved |", "|---|---|---|---|---|---|"]
        for p, s in measured:
            m = s.get("measured") or {}
            steady, first = m.get("after_first_step"), m.get("first_step")
            text = "n/a" if not steady else (f"{steady['allocated_gib']:.2f} / {steady['reserved_gib']:.2f} "
                                             f"({first['allocated_gib']:.2f} / {first['reserved_gib']:.2f})")
            err = s.get("error") or {}
            lines.append(f"| {p['model'].removeprefix('random:')} {p['backend']} | {s['budget']} | "
                         f"{setup_text(s['chosen'])} | {s['predicted']['allocated_gib']:.2f} / "
                         f"{s['predicted']['reserved_gib']:.2f} | {text} | {_signed(err.get('allocated'))} / "
                         f"{_signed(err.get('reserved'))} |")
    return lines


def summarize(out: Path, mode: str) -> str:
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()] \
        if (out / "steps.jsonl").exists() else []
    env = load_json(out / "env.json") or {}
    run = load_json(out / "run.json") or {}
    synthetic = load_json(out / "bench-synthetic.json")
    packed, padded = load_json(out / "bench-dataset-packed.json"), load_json(out / "bench-dataset-padded.json")
    plans = [p for p in (load_json(f) for f in sorted(out.glob("plan-*.json"))) if p]
    cases = junit(out / "tests-gpu.xml")

    targets = gpu_test_targets(cases) + synthetic_targets(synthetic) + packing_targets(packed, padded) \
        + planner_targets(plans)
    if mode == "cpu":  # the harness ran on fastft:tiny: the figures prove nothing
        for t in targets:
            reason = t.verdict.partition(": ")[2] if t.verdict.startswith(NOT_MEASURED) else ""
            t.verdict = f"{NOT_MEASURED} (CPU harness)" + (f": {reason}" if reason else "")

    device = (env.get("gpu") or {}).get("name") or run.get("device") or "unknown device"
    date = (env.get("date") or run.get("started") or "")[:10]
    lines = [f"# fastft GPU proof: {device if mode == 'gpu' else 'CPU harness'}, {date}", ""]
    if mode == "cpu":
        lines += ["**CPU harness run, not a performance result.** No GPU here: every step ran on `fastft:tiny` with a "
                  "few steps, only to prove that the harness runs end to end. No figure below says anything about "
                  "speed or GPU memory, and no target is passed or failed by it.", ""]
    gpu, versions = env.get("gpu") or {}, env.get("versions") or {}
    if gpu:
        lines.append(f"- GPU: {gpu['name']} ({gpu['memory_gib']} GiB), driver {gpu['driver']}, CUDA {gpu['cuda_runtime']}")
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    if env.get("commit"):
        lines.append(f"- commit {env['commit'][:12]}{' with uncommitted changes' if env.get('uncommitted_changes') else ''}")
    if not env:
        lines.append("- environment: not recorded (the env step failed)")
    lines.append(f"- 8B: {'included (--with-8b)' if run.get('with_8b') else 'not run (needs --with-8b)'}")
    lines += [""] + steps_section(out, steps)
    passed = sum(t.verdict == "PASS" for t in targets)
    failed = sum(t.verdict == "FAIL" for t in targets)
    lines += ["", "## Acceptance (issue 12)", "", f"{passed} PASS, {failed} FAIL, {len(targets) - passed - failed} not "
              "measured." + ("" if mode == "cpu" else " Ratios are from this run; the Unsloth reference was measured on "
                             f"an H100{'' if 'H100' in device else ' (this GPU differs: that ratio is indicative)'}."),
              "",
              "| target | measured | result |", "|---|---|---|"]
    lines += [f"| {t.name} | {t.measured} | {t.verdict} |" for t in targets]
    lines += [""] + figures(synthetic, packed, padded, plans)
    lines += ["", "Files: `steps.jsonl` and `logs/` (each step), `env.json`, `tests-*.xml`, `bench-*.{json,md,png}`, "
              "`plan-*.json`. Made by `benchmarks/gpu_proof.sh`; see benchmarks/README.md."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the folder gpu_proof.sh wrote")
    parser.add_argument("--mode", choices=("gpu", "cpu"), required=True, help="gpu, or cpu for a harness run")
    a = parser.parse_args()
    (a.results / "SUMMARY.md").write_text(summarize(a.results, a.mode))


if __name__ == "__main__":
    main()
