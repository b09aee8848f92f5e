"""`fastft bench`: the harness on CPU (rows in their own processes, counting, MFU, outputs).

One benchmark runs for the whole module (tiny model, 1 warm-up + 3 timed steps per row) with
the GPU hidden from the rows, so the unsloth row is unavailable on any machine.
"""

import json
import os
import sys

import pytest

from conftest import run_cli

STEPS, BATCH, SEQ = 3, 2, 64


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    from fastft.bench import run_bench

    out = tmp_path_factory.mktemp("bench") / "bench.json"
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")  # faking only the absence of a GPU, for the workers
        report = run_bench(backends="unsloth,hf,hf-stock", model="fastft:tiny", batch_size=BATCH, seq_len=SEQ,
                           steps=STEPS, warmup=1, out=str(out), echo=lines.append, command="fastft bench (test)")
    return report, out, "\n".join(lines)


def rows(report):
    return {r["backend"]: r for r in report["rows"]}


def test_each_row_runs_in_its_own_process(bench_run):
    report, _, _ = bench_run
    pids = [r["pid"] for r in report["rows"]]
    assert len(pids) == 3 and len(set(pids)) == 3
    assert os.getpid() not in pids


def test_unavailable_backend_is_reported_and_the_others_still_run(bench_run):
    report, _, output = bench_run
    by_name = rows(report)
    assert by_name["unsloth"]["status"] == "unavailable"
    assert by_name["unsloth"]["reason"].strip()
    assert f"unsloth: unavailable: {by_name['unsloth']['reason'].splitlines()[0]}" in output
    for name in ("hf", "hf-stock"):
        r = by_name[name]
        assert r["status"] == "ok", r.get("reason")
        assert r["tokens_per_second"] > 0 and len(r["step_times_s"]) == STEPS
        assert r["step_time_s"]["p20"] <= r["step_time_s"]["median"] <= r["step_time_s"]["p80"]
        assert r["peak_memory_allocated_gib"] is None and r["mfu"] is None  # CPU: nothing to claim
    assert by_name["hf"]["vs_hf_stock"]["tokens_per_second"] == pytest.approx(
        by_name["hf"]["tokens_per_second"] / by_name["hf-stock"]["tokens_per_second"], rel=1e-2)
    # Both rows trained on the same batches from the same initial weights: the same first loss.
    assert by_name["hf"]["first_loss"] == pytest.approx(by_name["hf-stock"]["first_loss"], abs=1e-3)


def test_counts_come_from_the_batches_trained(bench_run):
    report, _, _ = bench_run
    for name in ("hf", "hf-stock"):
        r = rows(report)[name]
        # Synthetic rows are full: every position is a real token; the loss skips each row's first token.
        assert r["timed_counts"] == {"sequences": STEPS * BATCH, "tokens": STEPS * BATCH * SEQ,
                                     "loss_tokens": STEPS * BATCH * (SEQ - 1), "positions": STEPS * BATCH * SEQ,
                                     "sum_sq_lengths": STEPS * BATCH * SEQ * SEQ}
        assert r["tokens_per_second"] == pytest.approx(STEPS * BATCH * SEQ / sum(r["step_times_s"]), rel=1e-3)


def test_token_counting_excludes_padding(tokenizer):
    from fastft.bench_count import count_batch
    from fastft.batching import make_collator

    lengths = [5, 3, 8]
    examples = []
    for n in lengths:
        ids = list(range(10, 10 + n))
        examples.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})  # a 2-token prompt without loss
    # Targets after the shift by one: 3 + 1 + 6 loss tokens; 5 + 3 + 8 real tokens.
    padded = count_batch(make_collator(tokenizer, packing=False)(examples))
    assert padded == {"sequences": 3, "tokens": 16, "loss_tokens": 10, "positions": 24, "sum_sq_lengths": 98}
    packed = count_batch(make_collator(tokenizer, packing=True)(examples))
    assert packed == {"sequences": 3, "tokens": 16, "loss_tokens": 10, "positions": 16, "sum_sq_lengths": 98}


def test_mfu_arithmetic():
    from transformers import AutoConfig

    from fastft.bench_count import model_flops, model_shape, peak_tflops
    from fastft.models import ARCHITECTURES

    shape = dict(ARCHITECTURES["llama-3.2-1b"])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    counted = model_shape(config)
    # q, o: 2048x2048; k, v: 2048x512 (8 KV heads of 64); gate, up, down: 2048x8192; the tied head 2048x128256.
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192
    assert counted == {"linear_parameters": 16 * per_layer + 2048 * 128256, "n_layers": 16, "hidden_size": 2048,
                       "vocab_size": 128256}
    # One batch of 4 x 2048 in 0.1 s: 4N per token plus causal attention 6 * layers * hidden * L^2 per sequence.
    easy = {"linear_parameters": 10**9, "n_layers": 16, "hidden_size": 2048}
    flops = model_flops(easy, tokens=8192, sum_sq_lengths=4 * 2048**2)
    assert flops == 4e9 * 8192 + 6 * 16 * 2048 * 4 * 2048**2 == pytest.approx(3.60665e13, rel=1e-5)
    assert flops / 0.1 / (peak_tflops("NVIDIA H100 80GB HBM3") * 1e12) == pytest.approx(0.36468, rel=1e-4)
    assert peak_tflops("NVIDIA H200") == 989 and peak_tflops("NVIDIA H100 PCIe") == 756
    assert peak_tflops("CPU (x86_64, 2 cores)") is None


def test_json_markdown_and_png_are_written(bench_run):
    report, out, output = bench_run
    data = json.loads(out.read_text())
    assert {"command", "created", "workload", "device", "versions", "settings", "model_shape", "mfu_formula",
            "recipe", "rows"} <= set(data)
    assert data["command"] == "fastft bench (test)" and data["workload"] == "synthetic"
    assert data["versions"]["torch"] and data["device"]["name"].startswith("CPU")
    ok = rows(data)["hf"]
    assert {"tokens_per_second", "loss_tokens_per_second", "padded_tokens_per_second", "samples_per_second",
            "step_time_s", "peak_memory_allocated_gib", "peak_memory_reserved_gib", "mfu", "load_time_s",
            "first_loss", "last_loss", "packing", "pid"} <= set(ok)
    md = out.with_suffix(".md").read_text()
    assert "| backend | tokens/s |" in md and "\n| hf | " in md and "\n| hf-stock | " in md
    assert "- unsloth: unavailable" in md and "MFU = (4 * N * tokens" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out.with_suffix('.png')}" in output


def test_without_matplotlib_the_chart_is_skipped_with_a_note(bench_run, tmp_path, monkeypatch):
    from fastft.bench_report import write_outputs

    report, _, _ = bench_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    notes = []
    written = write_outputs(report, tmp_path / "again.json", echo=notes.append)
    assert [p.name for p in written] == ["again.json", "again.md"]
    assert "matplotlib is not installed" in notes[0] and not (tmp_path / "again.png").exists()


def test_cli_rejects_an_unknown_row_and_shows_an_example():
    bad = run_cli("bench", "--backends", "hf,vllm")
    assert bad.returncode == 2 and "unknown row `vllm`" in bad.stderr and "Traceback" not in bad.stderr
    shown = run_cli("bench", "--help")
    assert shown.returncode == 0 and "fastft bench --backends hf,hf-stock --out bench.json" in shown.stdout


def test_default_recipe_is_the_issue_shape_and_its_data_loads(tokenizer):
    from fastft.bench import DEFAULT_RECIPE
    from fastft.data import prepare
    from fastft.recipe import load_recipe

    r = load_recipe(DEFAULT_RECIPE)
    assert (r.model.name, r.model.quantization, r.lora.r, r.lora.target_modules) == (
        "random:llama-3.2-1b", "4bit", 16, ["all-linear"])
    assert (r.train.batch_size, r.data.max_length) == (4, 2048)
    assert prepare(r, tokenizer, echo=lambda *a: None).stats["train_examples"] == 123


def test_an_interrupted_bench_still_writes_the_rows_it_measured(tmp_path):
    """A time box (gpu_proof.sh) or Ctrl-C during a row: the rows before it are kept, the row stopped."""
    import signal
    import subprocess

    from conftest import PYTHONPATH

    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastft", "bench", "--backends", "hf,hf-stock", "--model",
                             "fastft:tiny", "--batch-size", "2", "--seq-len", "64", "--warmup", "1", "--steps", "200",
                             "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "hf-stock: step 2/" in line:  # the second row is training: stop the bench there
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[0]
    output = "".join(seen) + rest
    assert proc.returncode == 130, output[-3000:]
    report = json.loads(out.read_text())
    assert [(r["backend"], r["status"]) for r in report["rows"]] == [("hf", "ok")]
    assert "interrupted: hf-stock not measured" in report["notes"]
    assert (tmp_path / "bench.md").exists()
