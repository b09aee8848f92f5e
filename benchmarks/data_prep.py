"""Data preparation at scale on CPU: cold and warm `prepare`, peak memory, and a run's first step (not a test).

For each size (default 5,000, 50,000 and 1,000,000 examples) an Alpaca-style JSON array is
made from the shared 5,000-example Alpaca set (copy k of an example has its instruction
suffixed with " (k)"), in a temporary folder, never in the repository. Then, each in a fresh
Python process with its own empty data cache:

    cold    `fastft.data.prepare` on an `alpaca` recipe (fastft:tiny, max_length 2048): read,
            format, tokenise with `data.num_proc` processes, write the cache
    warm    the same again: the cache is loaded

Each measurement starts once the 1-minute load average is below `--quiet-load` (default 1.5),
which is recorded with it. Times: `prepare` alone (what the cache saves) and the whole process
(imports included).
Memory: the peak resident set of the busiest process (the child's own rusage, from `os.wait4`
in the parent: the largest of the preparing process and its tokenising workers) and the peak
of their sum, sampled every 0.2 s with psutil (forked workers share pages with their
parent, so the sum overstates it). CPU: user + system seconds of the process and its workers
(from the same rusage); on a machine shared with other jobs the wall times stretch, the CPU
seconds much less, and CPU seconds / cores is what the wall time would be with the cores free
and kept busy.

Then `fastft run` is started `--first-step` times (default 3, each in a fresh process and run
folder) on the largest size, its cache warm (`train.max_steps = 1`, batch size 1), and the time
from starting the process to the end of the first optimizer step is recorded.

    python benchmarks/data_prep.py [--sizes 5000 50000 1000000] [--source PATH] [--first-step 3]
        [--out benchmarks/results/cpu-data-prep] [--note "the machine's state"]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the shared Alpaca sample beside the checkout (../shared/data), or beside the folder of worktrees
CANDIDATES = (ROOT.parent / "shared/data/alpaca_5000.json", ROOT.parent.parent / "shared/data/alpaca_5000.json")
SOURCE = next((p for p in CANDIDATES if p.is_file()), CANDIDATES[0])
QUIET_LOAD = 1.5  # --quiet-load

RECIPE = """[model]
name = "fastft:tiny"
quantization = "16bit"

[data]
path = "{path}"
format = "alpaca"
max_length = 2048

[lora]
r = 4

[train]
max_steps = 1
batch_size = 1
logging_steps = 1
save_steps = 0
report_to = "none"
gradient_checkpointing = false
"""

PREPARE = """
import json, sys, time
started = time.time()
from fastft.data import prepare
from fastft.models import load_tokenizer
from fastft.recipe import load_recipe
recipe = load_recipe(sys.argv[1])
tokenizer = load_tokenizer(recipe.model)
t = time.time()
said = []
data = prepare(recipe, tokenizer, echo=said.append)
print(json.dumps({"prepare_s": time.time() - t, "process_s": time.time() - started, "said": said,
                  "examples": len(data.train), "tokens": data.stats["train_tokens"]}))
"""

FIRST_STEP = """
import json, sys, time
from transformers import TrainerCallback
from fastft.train import run

class FirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            print("FIRST_STEP " + json.dumps(time.time()), flush=True)

run(sys.argv[1], output=sys.argv[2], callbacks=(FirstStep(),), echo=lambda *a: None)
"""


def make_data(source: Path, n: int, out: Path) -> None:
    rows = json.loads(source.read_text(encoding="utf-8"))
    with open(out, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            row, copy = dict(rows[i % len(rows)]), i // len(rows)
            if copy:
                row["instruction"] = f"{row['instruction']} ({copy})"
            f.write(("," if i else "") + json.dumps(row, ensure_ascii=False))
        f.write("]")


def quiet_machine(below: float, patience_s: float = 600) -> float:
    """Wait (up to `patience_s`) until the 1-minute load average is below `below`; return it.

    A measurement that follows another (the cold build's two busy cores) would otherwise start
    on a machine that is still busy by this measure."""
    deadline = time.time() + patience_s
    while os.getloadavg()[0] >= below and time.time() < deadline:
        time.sleep(5)
    return round(os.getloadavg()[0], 2)


def measure(args: list[str], env: dict) -> dict:
    """Run a Python child; return its wall time, peak RSS (largest process, and sampled sum) and its output."""
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.time()
        child = subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=err, text=True)
        peak_sum, proc = 0, psutil.Process(child.pid)
        while True:
            # wait4 reports this child's own resource usage: ru_maxrss is the largest peak among it and the
            # processes it waited for (the tokenising workers)
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            try:
                peak_sum = max(peak_sum, sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.2)
        wall = time.time() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode:
        raise SystemExit(f"{args} failed:\n{stderr[-3000:]}")
    return {"wall_s": wall, "started": started, "stdout": stdout, "stderr": stderr,
            "peak_rss_gb": usage.ru_maxrss / 1e6, "peak_rss_sum_gb": peak_sum / 1e9,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def one_size(n: int, source: Path, first_step: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"fastft-data-{n}-") as tmp:
        tmp = Path(tmp)
        make_data(source, n, tmp / "alpaca.json")
        (tmp / "recipe.toml").write_text(RECIPE.format(path=(tmp / "alpaca.json").as_posix()), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTFT_CACHE": str(tmp / "cache"),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        # build fastft:tiny into this cache first, so the cold figure is about the data only
        subprocess.run([sys.executable, "-c", "from fastft.models import resolve_model; resolve_model('fastft:tiny')"],
                       env=env, check=True, capture_output=True)
        result = {"examples": n, "file_mb": round((tmp / "alpaca.json").stat().st_size / 1e6, 1),
                  "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
        for phase in ("cold", "warm"):
            load = quiet_machine(QUIET_LOAD)
            m = measure(["-c", PREPARE, str(tmp / "recipe.toml")], env)
            out = json.loads(m["stdout"].strip().splitlines()[-1])
            result[phase] = {"prepare_s": round(out["prepare_s"], 2), "process_s": round(out["process_s"], 2),
                             "peak_rss_gb": m["peak_rss_gb"] and round(m["peak_rss_gb"], 3),
                             "peak_rss_sum_gb": round(m["peak_rss_sum_gb"], 3), "cpu_s": round(m["cpu_s"], 1),
                             "said": out["said"], "load_average_1min_at_start": load}
            result.update(train_examples=out["examples"], train_tokens=out["tokens"])
            print(f"{n:>9,} {phase}: prepare {out['prepare_s']:.1f} s, process {out['process_s']:.1f} s "
                  f"(CPU {m['cpu_s']:.0f} s), "
                  f"peak RSS {result[phase]['peak_rss_gb']} GB (sum {result[phase]['peak_rss_sum_gb']} GB)", flush=True)
        for k in range(first_step):
            load = quiet_machine(QUIET_LOAD)
            m = measure(["-c", FIRST_STEP, str(tmp / "recipe.toml"), str(tmp / f"run-{k}")], env)
            stamp = next(line for line in m["stdout"].splitlines() if line.startswith("FIRST_STEP "))
            result.setdefault("first_step", []).append({
                "first_step_s": round(float(stamp.split()[1]) - m["started"], 2), "run_wall_s": round(m["wall_s"], 2),
                "run_cpu_s": round(m["cpu_s"], 1), "peak_rss_gb": round(m["peak_rss_gb"], 3),
                "load_average_1min_at_start": load})
            print(f"{n:>9,} run {k + 1}: first optimizer step {result['first_step'][-1]['first_step_s']} s after start "
                  f"(load {load})", flush=True)
        cache_mb = sum(f.stat().st_size for f in (tmp / "cache" / "data").rglob("*") if f.is_file()) / 1e6
        result["cache_mb"] = round(cache_mb, 1)
        result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    return result


def machine() -> dict:
    load = os.getloadavg()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "python": platform.python_version(), "load_average_at_end": [round(x, 2) for x in load]}


def markdown(results: list[dict], info: dict) -> str:
    lines = [
        "# Data preparation on CPU: cold, warm, memory",
        "",
        f"Machine: {info['cores']} CPU cores ({info['cpu']}), {info['memory_gb']} GB memory, Python {info['python']}. "
        f"Load average (1, 5, 15 min) when the measurements ended: {', '.join(map(str, info['load_average_at_end']))}; "
        f"{info['note']}",
        "",
        "Made by `python benchmarks/data_prep.py` (see its docstring for the method): an `alpaca` recipe on "
        "`fastft:tiny` (byte-level tokenizer, so tokens are bytes), `max_length` 2048, `data.num_proc` at its "
        "default, each measurement in a fresh process with its own data cache.",
        "",
        "| examples | tokens | cold `prepare` | cold process (CPU s) | warm `prepare` | warm process | peak RSS cold "
        "(largest process / sum) | peak RSS warm | examples/s cold | cache on disk | load avg at start (cold / warm) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c, w = r["cold"], r["warm"]
        lines.append(
            f"| {r['examples']:,} | {r['train_tokens'] / 1e6:.1f} M | {c['prepare_s']} s | "
            f"{c['process_s']} s ({c['cpu_s']}) | "
            f"{w['prepare_s']} s | {w['process_s']} s | {c['peak_rss_gb']} / {c['peak_rss_sum_gb']} GB | "
            f"{w['peak_rss_gb']} GB | {r['examples'] / c['prepare_s']:,.0f} | {r['cache_mb']:,.0f} MB | "
            f"{c.get('load_average_1min_at_start', '-')} / {w.get('load_average_1min_at_start', '-')} |")
    steps = [r for r in results if r.get("first_step")]
    if steps:
        lines += ["", "Time from starting `fastft run` (cache warm, `train.max_steps = 1`, batch size 1) to the end of "
                  "its first optimizer step, each run in a fresh process:", ""]
        lines += [f"- {r['examples']:,} examples, run {k}: {s['first_step_s']} s (the whole run: {s['run_wall_s']} s "
                  f"wall, {s['run_cpu_s']} CPU s, peak RSS {s['peak_rss_gb']} GB; load average at start "
                  f"{s['load_average_1min_at_start']})" for r in steps for k, s in enumerate(r["first_step"], 1)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 50000, 1000000])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cpu-data-prep")
    parser.add_argument("--first-step", type=int, default=3, metavar="N",
                        help="Runs of `fastft run` on the largest size (0: none).")
    parser.add_argument("--note", default="", help="A sentence about the machine's state, for the results file.")
    parser.add_argument("--quiet-load", type=float, default=1.5,
                        help="Start each measurement once the 1-minute load average is below this (waits up to 10 min).")
    args = parser.parse_args()
    global QUIET_LOAD
    QUIET_LOAD = args.quiet_load
    results = [one_size(n, args.source, args.first_step if n == max(args.sizes) else 0) for n in sorted(args.sizes)]
    info = {**machine(), "note": args.note}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(results, info))
    print(f"wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
