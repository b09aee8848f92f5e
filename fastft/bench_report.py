"""How `fastft bench` shows its report: one line per row, the terminal table, Markdown, a chart, the files."""

from __future__ import annotations

import json
import os
from pathlib import Path

from fastft.runs import atomic_write


def summary_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['status']}: {r['reason'].splitlines()[0] if r.get('reason') else ''}"
    mem = "" if r["peak_memory_allocated_gib"] is None else f", peak {r['peak_memory_allocated_gib']:.2f} GiB allocated"
    return (f"{r['tokens_per_second']:,.0f} tokens/s, median step {r['step_time_s']['median']:.3f} s{mem}, "
            f"loss {r['first_loss']} -> {r['last_loss']}")



COLUMNS = [  # (header, value of an ok row as text)
    ("backend", lambda r: r["backend"]),
    ("tokens/s", lambda r: f"{r['tokens_per_second']:,.0f}"),
    ("x hf-stock", lambda r: _x(r.get("vs_hf_stock", {}).get("tokens_per_second"))),
    ("loss tokens/s", lambda r: f"{r['loss_tokens_per_second']:,.0f}"),
    ("all tokens/s", lambda r: f"{r['padded_tokens_per_second']:,.0f}"),
    ("samples/s", lambda r: f"{r['samples_per_second']:,.2f}"),
    ("step s (p20-p80)", lambda r: "{median:.3f} ({p20:.3f}-{p80:.3f})".format(**r["step_time_s"])),
    ("alloc GiB", lambda r: _num(r["peak_memory_allocated_gib"], "{:.2f}")),
    ("reserved GiB", lambda r: _num(r["peak_memory_reserved_gib"], "{:.2f}")),
    ("x mem", lambda r: _x(r.get("vs_hf_stock", {}).get("peak_memory_allocated"))),
    ("MFU", lambda r: _num(r["mfu"], "{:.1%}")),
    ("load s", lambda r: f"{r['load_time_s']:.1f}"),
    ("loss first->last", lambda r: f"{r['first_loss']:.3f}->{r['last_loss']:.3f}"),
    ("packing", lambda r: "yes" if r["packing"] else "no"),
    ("order", lambda r: r.get("sampling", "")),
]



def _num(value, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)



def _x(value) -> str:
    return "" if value is None else f"{value:.2f}x"



def table_cells(report: dict) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, one row of cells per measured backend, and a line per backend that did not run."""
    headers = [h for h, _ in COLUMNS]
    cells = [[fmt(r) for _, fmt in COLUMNS] for r in report["rows"] if r["status"] == "ok"]
    others = [f"{r['backend']}: {r['status']}: {r.get('reason', '')}" for r in report["rows"] if r["status"] != "ok"]
    return headers, cells, others



def terminal_table(report: dict) -> str:
    headers, cells, others = table_cells(report)
    widths = [max(len(x) for x in col) for col in zip(headers, *cells)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines += [first_line for o in others for first_line in o.splitlines()[:1]]
    device = report["device"] or {}
    lines.append(f"device: {device.get('name', 'unknown')}; tokens/s count non-padding tokens; MFU against "
                 f"{_num(_row_peak(report), '{:.0f} TFLOP/s dense bf16')}")
    return "\n".join(lines)



def _row_peak(report: dict):
    return next((r["peak_tflops"] for r in report["rows"] if r.get("peak_tflops")), None)



def markdown(report: dict) -> str:
    """The report as a Markdown page: context, the table, rows that did not run, the formula."""
    headers, cells, others = table_cells(report)
    s, device = report["settings"], report["device"] or {}
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines = [
        f"# fastft bench: {report['workload']} workload",
        "",
        f"- command: `{report['command']}`",
        f"- device: {device.get('name', 'unknown')}" + (f", driver {device['driver']}, CUDA {device.get('cuda')}"
                                                         if device.get("driver") else ""),
        f"- model: {s['model']} ({s['quantization']}), LoRA r={s['lora_r']} on {', '.join(s['lora_target_modules'])}, "
        f"gradient checkpointing {str(s['gradient_checkpointing']).lower()}",
        f"- batch {s['batch_size']} x {'' if report['workload'] == 'synthetic' else 'up to '}{s['seq_len']} tokens, "
        f"grad_accum {s['grad_accum']}, "
        f"{s['warmup_steps']} warm-up + {s['timed_steps']} timed steps",
        f"- versions: {versions}",
        f"- date: {report['created']}",
    ]
    lines += [f"- note: {n}" for n in report["notes"]]
    lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    lines += [""] + [f"- {o.splitlines()[0]}" for o in others]
    lines += ["", "tokens/s counts non-padding tokens; loss tokens/s the tokens the loss is taken over; all tokens/s "
              "includes padding. Step time: median (20th-80th percentile) over the timed steps. Memory: peak "
              "`torch.cuda.max_memory_allocated` / `max_memory_reserved` over the timed steps.", "",
              f"{report['mfu_formula']} ({_num(_row_peak(report), '{:.0f} TFLOP/s')})."]
    return "\n".join(lines) + "\n"



def chart(report: dict, path: Path) -> None:
    """A PNG with tokens/s and peak memory per backend (matplotlib's Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["rows"] if r["status"] == "ok"]
    names = [r["backend"] for r in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.6 * max(len(ok), 2) + 1.8))
    bars = left.barh(names, [r["tokens_per_second"] for r in ok], color="tab:blue")
    left.bar_label(bars, fmt="{:,.0f}", padding=3)
    left.set_xlabel("tokens/s (non-padding), higher is better")
    right.set_xlabel("peak GPU memory (GiB), lower is better")
    if any(r["peak_memory_allocated_gib"] is not None for r in ok):
        right.barh(names, [r["peak_memory_reserved_gib"] for r in ok], color="tab:orange", alpha=0.4, label="reserved")
        bars = right.barh(names, [r["peak_memory_allocated_gib"] for r in ok], color="tab:orange", label="allocated")
        right.bar_label(bars, fmt="{:.2f}", padding=3)
        right.legend(loc="lower right")
    else:
        right.set_yticks([])
        right.set_xticks([])
        right.text(0.5, 0.5, "no GPU memory to show (CPU run)", ha="center", va="center", transform=right.transAxes)
    for ax in (left, right):
        ax.invert_yaxis()
        ax.margins(x=0.25)
    s = report["settings"]
    device = (report["device"] or {}).get("name", "unknown")
    title = (f"fastft bench, {report['workload']}: {s['model']} {s['quantization']}, batch {s['batch_size']} x "
             f"{s['seq_len']} on {device}")
    if device.startswith("CPU"):
        title += "\nCPU harness run: not a performance claim"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)



def write_outputs(report: dict, out: Path, echo=print) -> list[Path]:
    """Write `out` (JSON), its `.md` and `.png` siblings, each atomically; return what was written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")
    atomic_write(json_path, json.dumps(report, indent=2, default=str) + "\n")
    atomic_write(md_path, markdown(report))
    written = [json_path, md_path]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        echo("note: matplotlib is not installed (`pip install matplotlib`): no chart written")
        return written
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    chart(report, tmp)
    os.replace(tmp, png_path)
    return written + [png_path]
