"""The environment of a GPU proof run, as JSON on stdout (step 1 of benchmarks/gpu_proof.sh).

    python benchmarks/proof_env.py --mode gpu > env.json

Absolute figures mean something only with the GPU, its driver and the library versions
(BENCHMARKING.md), so they are recorded next to the results.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "unsloth", "unsloth_zoo",
            "liger-kernel", "triton", "xformers", "numpy", "pytest")


def command_output(*args: str) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def gpu() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "driver": command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"),
            "cuda_runtime": torch.version.cuda, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1)}


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None  # not installed: worth seeing (unsloth missing explains an unavailable row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("gpu", "cpu"), required=True, help="what gpu_proof.sh detected")
    mode = parser.parse_args().mode
    root = Path(__file__).resolve().parent.parent
    env = {
        "mode": mode, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores", "gpu": gpu(), "versions": versions(),
        "commit": command_output("git", "-C", str(root), "rev-parse", "HEAD"),
        "uncommitted_changes": bool(command_output("git", "-C", str(root), "status", "--porcelain", "--untracked-files=no")),
    }
    print(json.dumps(env, indent=2))


if __name__ == "__main__":
    main()
