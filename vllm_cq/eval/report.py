"""Evaluation results out: numbers relative to `auto`, a Markdown table, the JSON file, a PNG plot.

The JSON holds everything a table or plot is drawn from (so a README table can be regenerated from it
alone); matplotlib is optional (`pip install 'vllm-cq[eval]'`) and the plot is skipped without it.
"""

from __future__ import annotations

import json
import os
from typing import Any

BASELINE = "auto"


def length_label(n: int) -> str:
    """1024 -> '1K', 1536 -> '1536'."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def add_relative(rows: list[dict[str, Any]]) -> None:
    """Perplexity change (%) and KV-capacity factor of each row vs the `auto` row, where there is one."""
    base = next((r for r in rows if r.get("format") == BASELINE and not r.get("error")), None)
    for r in rows:
        r["ppl_delta_pct"] = None
        r["kv_factor"] = None
        if base is None or r.get("error"):
            continue
        if r.get("ppl") is not None and base.get("ppl"):
            r["ppl_delta_pct"] = 100.0 * (r["ppl"] / base["ppl"] - 1.0)
        if r.get("kv_cache_tokens") and base.get("kv_cache_tokens"):
            r["kv_factor"] = r["kv_cache_tokens"] / base["kv_cache_tokens"]


def _num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def shown(row: dict[str, Any]) -> str:
    """The row's label, with the recent window it ran with when the label does not say (a bare cq label
    serves the dtype's default window)."""
    w = row.get("recent_window")
    return row["format"] + (f" (w{w})" if w and "+w" not in row["format"] else "")


def markdown_table(result: dict[str, Any]) -> str:
    """One row per format: bits, vLLM's KV capacity (and factor vs auto), ppl (and change vs auto),
    passkey accuracy per length, seconds."""
    lengths = [int(n) for n in result.get("passkey", {}).get("lengths", [])] if "passkey" in result["tasks"] else []
    head = ["format", "bits/channel", "KV tokens", "vs auto"]
    if "ppl" in result["tasks"]:
        head += ["ppl", "ppl vs auto"]
    head += [f"passkey {length_label(n)} (%)" for n in lengths]
    head += ["seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        if r.get("error"):
            cells = [r["format"], "error: " + r["error"].splitlines()[-1][:120]] + [""] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [
            shown(r),
            _num(r.get("bits_per_channel"), "g"),
            _num(r.get("kv_cache_tokens"), ","),
            "" if r.get("kv_factor") is None else f"{r['kv_factor']:.1f}x",
        ]
        if "ppl" in result["tasks"]:
            d = r.get("ppl_delta_pct")
            cells += [_num(r.get("ppl"), ".3f"), "" if d is None or r["format"] == BASELINE else f"{d:+.1f}%"]
        acc = r.get("passkey") or {}
        cells += [_num(None if acc.get(str(n)) is None else 100.0 * acc[str(n)], ".0f") for n in lengths]
        cells += [_num(r.get("seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_line(row: dict[str, Any]) -> str:
    """One format's numbers on one line, printed as soon as its engine is done."""
    bits = [f"{shown(row)}: {row['kv_cache_tokens']:,} KV tokens"]
    if row.get("ppl") is not None:
        bits.append(f"ppl {row['ppl']:.3f}")
    if row.get("passkey"):
        accs = " ".join(f"{length_label(int(k))} {100 * v:.0f}%" for k, v in row["passkey"].items())
        bits.append(f"passkey {accs}")
    return ", ".join(bits) + f" ({row['seconds']:.0f} s)"


def describe(result: dict[str, Any]) -> str:
    """The lines under the table: what was measured, on what, and through which path."""
    out = [f"model: {result['model']}; device: {result['device']}; vLLM {result['vllm_version']}; {result['date']}"]
    if "ppl" in result["tasks"]:
        out.append(
            f"ppl: {result['ppl_tokens']:,} tokens scored of {result['text']} in non-overlapping "
            f"{result['ppl_window']}-token windows (first token of each window is context only); "
            "path: prefill over stored codes for cq formats (each step writes its codes, then attends over "
            "the cache), vLLM's own backend for the others"
        )
    if "passkey" in result["tasks"]:
        p = result["passkey"]
        out.append(
            f"passkey: {p['trials_per_length']} trials per length (depths {', '.join(f'{d:g}' for d in p['depths'])}"
            f" x {p['keys_per_depth']} keys, seed {p['seed']}); greedy decode over the cache"
        )
    return "\n".join(out)


def write_json(path: str, result: dict[str, Any]) -> None:
    """Write atomically, so a run cut short leaves the last complete file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# What must agree for two runs' rows to share one table (same text, windows, passkey trials, model).
SAME_SETUP = ("model_name", "tasks", "text", "ppl_window", "ppl_tokens", "passkey")


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of the same evaluation over different formats (e.g. one run per GPU):
    rows in order of appearance, a later run's row replacing an earlier one of the same format.
    Refuses runs whose setup differs, since their numbers would not be comparable."""
    if not results:
        raise ValueError("nothing to merge")
    base = dict(results[0])
    for other in results[1:]:
        diff = [k for k in SAME_SETUP if base.get(k) != other.get(k)]
        if diff:
            raise ValueError(f"cannot merge runs with a different {', '.join(diff)}")
    rows: dict[str, dict[str, Any]] = {}
    for res in results:
        for r in res["rows"]:
            rows.pop(r["format"], None)
            rows[r["format"]] = dict(r)
    base["rows"] = list(rows.values())
    base["formats"] = list(rows)
    base["merged_from"] = [res.get("date") for res in results]
    add_relative(base["rows"])
    return base


def plot(path: str, result: dict[str, Any]) -> str:
    """Perplexity per format and passkey accuracy vs length, to a PNG; returns a line saying what it did."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'vllm-cq[eval]')"
    rows = [r for r in result["rows"] if not r.get("error")]
    panels = [t for t in ("ppl", "passkey") if t in result["tasks"]]
    if not rows or not panels:
        return "plot skipped: nothing to plot"
    wide = max(5.5, 0.45 * len(rows) + 1.5)  # many formats: room for their labels
    fig, axes = plt.subplots(1, len(panels), figsize=(wide * len(panels), 4.6), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, task in zip(axes[0], panels, strict=True):
        if task == "ppl":
            names = [shown(r) for r in rows if r.get("ppl") is not None]
            vals = [r["ppl"] for r in rows if r.get("ppl") is not None]
            ax.bar(names, vals, color=[colors[i % len(colors)] for i in range(len(vals))])
            for i, v in enumerate(vals):
                ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
            if max(vals) > 3 * min(vals):  # one runaway format would flatten the others
                ax.set_yscale("log")
            ax.tick_params(axis="x", labelrotation=60, labelsize=8)
            ax.set_ylabel("perplexity (lower is better)")
            ax.set_title(f"{result['ppl_tokens']:,} tokens, {result['ppl_window']}-token windows")
        else:
            lengths = [int(n) for n in result["passkey"]["lengths"]]
            for i, r in enumerate(rows):
                acc = r.get("passkey") or {}
                shift = 2 ** (0.03 * (i - (len(rows) - 1) / 2))  # side by side, so equal scores stay visible
                ys = [100.0 * acc.get(str(n), float("nan")) for n in lengths]
                ax.plot([n * shift for n in lengths], ys, marker="o", label=shown(r), color=colors[i % len(colors)])
            ax.set_xscale("log", base=2)
            ax.set_xlim(min(lengths) / 1.5, max(lengths) * 1.5)
            ax.set_xticks(lengths, [length_label(n) for n in lengths])
            ax.set_ylim(-5, 105)
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel("passkey accuracy (%)")
            ax.set_title(f"passkey, {result['passkey']['trials_per_length']} trials per length")
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"{result['model_name']} through vLLM ({result['device']})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
