"""Several processes: `fastft run --nproc 2` (torchrun, gloo on CPU) against one process.

One two-process run and one single-process run with the same global batch are shared by the
module. They must give the same adapter because, step for step, they train on the same
examples with the same loss:

- same examples per optimizer step: accelerate draws one permutation per epoch with the same
  seed (`data_seed`) in every process and deals the per-process batches out in turn, so 2
  processes x batch 2 see exactly the single process's batch of 4 (no DistributedSampler with
  its own interleaving is involved);
- same loss: each process sums its token losses and divides by the loss tokens of the whole
  global batch (`average_tokens_across_devices`, counted over all processes), then DDP
  averages the gradients, which the Trainer compensates by scaling by the process count.
  Without the global count the adapter differs by about 2e-3 here;
- nothing random in the step: the recipe's LoRA dropout is 0 and Llama's attention dropout is 0.

Padding differs (each process pads to its own longest example), which changes nothing for
the real tokens with right padding and causal attention; fp32 sums in another order leave
differences around 1e-8.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import PYTHONPATH, qa_rows, run_cli, tiny_recipe

# 2 processes x 2 = the recipe's 4; a checkpoint every step (one is resumed from in the second epoch)
DDP_SETTINGS = ("--set", "train.batch_size=2", "--set", "train.save_steps=1", "--set", "train.save_total_limit=4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the two-process run, train the single-process one meanwhile, wait for both."""
    tmp = tmp_path_factory.mktemp("dist")
    recipe = tiny_recipe(tmp, steps=4, rows=qa_rows(8))  # 2 optimizer steps per epoch, 2 epochs
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    two = subprocess.Popen([sys.executable, "-m", "fastft", "run", str(recipe), "--nproc", "2",
                            "--output", str(tmp / "two"), *DDP_SETTINGS],
                           cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    claim = {}
    watch = threading.Thread(target=try_to_claim, args=(tmp / "two", two, claim), daemon=True)
    watch.start()
    from fastft.train import run

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # the run sets it for itself
        run(str(recipe), output=str(tmp / "one"), echo=lambda *a, **k: None)
    out, err = two.communicate(timeout=600)
    watch.join()
    return {"recipe": recipe, "tmp": tmp, "two": tmp / "two", "one": tmp / "one", "rc": two.returncode,
            "out": out, "err": err, "claim": claim,
            "pid": two.pid}


def try_to_claim(run_dir, launcher, result):
    """Once rank 0 of the torchrun job has written the recipe, claim its folder as a second run would."""
    from fastft.claim import take
    from fastft.errors import FastftError

    while not (run_dir / "recipe.toml").exists() and launcher.poll() is None:
        time.sleep(0.05)
    try:
        take(run_dir).release()
        result["error"] = None
    except FastftError as e:
        result["error"] = str(e)


def message(result) -> str:
    """stderr with the CLI's line wrapping undone."""
    return " ".join(result.stderr.split())


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def test_both_processes_finish_and_rank0_writes_once(runs):
    assert runs["rc"] == 0, runs["err"][-3000:]  # torchrun exits 0 only if every process did
    summary = json.loads((runs["two"] / "fastft.json").read_text())
    assert summary["processes"] == 2
    # Both processes trained: each wrote its random state into the checkpoint, then rank 0 marked it.
    checkpoint = runs["two"] / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "rng_state_0.pth").exists() and (checkpoint / "rng_state_1.pth").exists()
    mark = json.loads((checkpoint / "fastft-complete").read_text())
    assert mark["step"] == 4 and mark["processes"] == 2
    # One writer: one log, one adapter folder, no temporary or displaced copies left beside it.
    assert runs["out"].count("adapter: ") == 1 and runs["out"].count("data: 8 train") == 1
    assert sorted(p.name for p in runs["two"].iterdir()) == ["adapter", "checkpoints", "fastft.json", "loss.png",
                                                           "recipe.toml"]


def test_the_launcher_claims_the_folder_for_the_whole_torchrun_job(runs):
    """`fastft run --nproc 2` claims the folder, execs into torchrun (same process id) and keeps it claimed;
    rank 0 adopts the claim instead of competing with it; the claim is gone when the job ends."""
    from fastft.claim import lock_file

    assert runs["rc"] == 0, runs["err"][-3000:]
    error = runs["claim"]["error"]
    assert error and f"is in use by another fastft run (process {runs['pid']} on " in error, error
    assert not lock_file(runs["two"]).exists()


def test_a_plain_torchrun_job_on_a_held_folder_stops_every_rank(tmp_path):
    """torchrun without --nproc: rank 0 claims the folder for all ranks; when another run holds it, every
    rank exits 2 with the paragraph (rank 0 naming the holder) and nothing is written."""
    from fastft.claim import take

    recipe = tiny_recipe(tmp_path, steps=2, rows=qa_rows(8))
    out = tmp_path / "out"
    claim = take(out)  # this test process is the other run
    try:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                                 "fastft", "run", str(recipe), "--output", str(out), *DDP_SETTINGS], cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": PYTHONPATH}, capture_output=True, text=True,
                                timeout=300)
    finally:
        claim.release()
    text = message(result)
    # torchrun's report, per rank: 2, or SIGTERM (-15) from torchrun once the other rank had exited with 2.
    # Never SIGABRT (-6): gloo's threads aborted 5 runs in 20 before fastft left its process group on error.
    codes = [int(c) for c in re.findall(r"exitcode : (-?\d+)", text)]
    assert result.returncode != 0 and len(codes) == 2 and 2 in codes and set(codes) <= {2, -15}, text[-3000:]
    assert f"[rank 0] error: {out} is in use by another fastft run (process {os.getpid()} on " in text
    if codes.count(2) == 2:  # rank 1 ended by itself: it said why
        assert f"[rank 1] error: {out} is in use by another run (rank 0 says by which)." in text
    assert not out.exists()


def test_adapter_equals_single_process_with_same_global_batch(runs):
    two, one = adapter(runs["two"]), adapter(runs["one"])
    assert two.keys() == one.keys() and len(one) > 0
    for name in one:
        assert torch.allclose(two[name], one[name], rtol=0, atol=1e-5), name
    # The adapter moved away from its initialisation (B starts at zero), so equality is not trivial.
    assert any(t.abs().max() > 1e-3 for n, t in one.items() if "lora_B" in n)
    s2, s1 = (json.loads((runs[k] / "fastft.json").read_text()) for k in ("two", "one"))
    assert s2["first_loss"] == pytest.approx(s1["first_loss"], abs=1e-5)
    assert s2["final_loss"] == pytest.approx(s1["final_loss"], abs=1e-5)


def test_throughput_counts_all_processes(runs):
    s2, s1 = (json.loads((runs[k] / "fastft.json").read_text()) for k in ("two", "one"))
    # Two epochs: every non-padding token twice, whichever process trained on it.
    assert s2["train_tokens"] == s1["train_tokens"] == 2 * s1["data"]["train_tokens"]
    assert s2["train_tokens_per_second"] > 0


@pytest.mark.slow
def test_two_processes_resumed_in_the_second_epoch_end_on_the_same_adapter(runs):
    """Resumed from step 3 (halfway through epoch 2, so each process skips its first batch of that epoch):
    every process derives the epoch's order from (seed, epoch) alone and deals itself the same batches."""
    import shutil

    assert runs["rc"] == 0, runs["err"][-3000:]
    resumed = runs["tmp"] / "resumed"
    shutil.copytree(runs["two"], resumed)
    for checkpoint in (resumed / "checkpoints").glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) > 3:
            shutil.rmtree(checkpoint)
    shutil.rmtree(resumed / "adapter")
    (resumed / "fastft.json").unlink()
    done = run_cli("run", str(runs["recipe"]), "--nproc", "2", "--output", str(resumed), "--resume", *DDP_SETTINGS,
                   cwd=runs["tmp"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((resumed / "fastft.json").read_text())["resumed_from"].endswith("checkpoint-3")
    ours, uninterrupted = adapter(resumed), adapter(runs["two"])
    assert ours.keys() == uninterrupted.keys()
    assert all(torch.equal(ours[name], uninterrupted[name]) for name in uninterrupted)


def test_resume_with_another_process_count_is_refused(runs):
    result = run_cli("run", str(runs["recipe"]), "--output", str(runs["two"]), "--resume", *DDP_SETTINGS,
                     cwd=runs["tmp"])
    assert result.returncode == 2, result.stderr
    assert "written by 2 process(es) and this run has 1" in message(result) and "--nproc 2" in message(result)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["--nproc", "WORLD_SIZE"])
def test_unsloth_refuses_several_processes(tmp_path, how):
    recipe = tiny_recipe(tmp_path)
    args = ["run", str(recipe), "--backend", "unsloth", "--output", str(tmp_path / "out")]
    if how == "--nproc":
        result = run_cli(*args, "--nproc", "2", cwd=tmp_path)
    else:  # as torchrun would start it
        result = run_cli(*args, cwd=tmp_path, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert result.returncode == 2, result.stderr
    assert "--backend unsloth runs as one process" in message(result) and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_fsdp_needs_several_processes(tmp_path):
    result = run_cli("run", str(tiny_recipe(tmp_path)), "--set", "train.fsdp=true", cwd=tmp_path)
    assert result.returncode == 2 and "`train.fsdp = true` shards the model" in message(result), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_fsdp_needs_gpus(tmp_path):
    result = run_cli("run", str(tiny_recipe(tmp_path)), "--set", "train.fsdp=true", "--nproc", "2", cwd=tmp_path)
    assert result.returncode == 2 and "needs NVIDIA GPUs" in message(result), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP over 2 processes needs 2 NVIDIA GPUs")
def test_fsdp_qlora_on_two_gpus(tmp_path):
    """4-bit base sharded over 2 GPUs: trains like plain DDP, and the gathered adapter is complete."""
    recipe = tiny_recipe(tmp_path)
    common = ("--set", "model.quantization=4bit", "--set", "train.batch_size=2")
    result = run_cli("run", str(recipe), "--nproc", "2", "--set", "train.fsdp=true", *common,
                     "--output", str(tmp_path / "fsdp"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = run_cli("run", str(recipe), "--nproc", "2", *common, "--output", str(tmp_path / "ddp"), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    sharded, replicated = adapter(tmp_path / "fsdp"), adapter(tmp_path / "ddp")
    assert sharded.keys() == replicated.keys()
    for name in replicated:
        assert sharded[name].shape == replicated[name].shape and torch.isfinite(sharded[name]).all(), name
    assert all(sharded[n].abs().max() > 0 for n in sharded if "lora_B" in n)  # gathered, not left empty
    # bf16 compute in both, gathered differently: the losses agree closely, not exactly.
    s_fsdp, s_ddp = (json.loads((tmp_path / k / "fastft.json").read_text()) for k in ("fsdp", "ddp"))
    assert s_fsdp["final_loss"] == pytest.approx(s_ddp["final_loss"], rel=0.02)
