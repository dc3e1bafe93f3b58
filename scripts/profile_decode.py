"""Profile the engine's decode-step, prefill and mixed-step latency and fit the rank-aware latency model.

    python scripts/profile_decode.py [--model tiny] [--batch-sizes 1,4,8,16,32] [--ranks 8,16,32,64,128]
        [--prompt-tokens 16,64,256] [--decode-steps 8] [--out profiles/<device>/<model>/latency.json]
    python scripts/profile_decode.py --refit FILE [--out FILE]

Runs the real engine (eager, so compile time does not leak into the numbers) over batch size x
rank mix (each rank alone, all mixed, and base only; every request with an adapter of its own)
and, for prefill and mixed steps (the batch decoding while a new prompt is prefilled in the same
step), x prompt tokens. Fits caraserve.perf.model.PerfModel (candidate feature
sets chosen by held-out error), prints R^2 and the held-out relative error, and writes the raw
medians and the fitted model as JSON with a provenance header, plus a PNG of measured vs
predicted. Run with OMP_NUM_THREADS=1 on a shared CPU. Each grid dimension needs two values at
least: from one rank (or one batch size, one prompt length) a law cannot tell its terms apart.
--refit fits a profile's raw timings again with this version's fitting (no measuring), in place
unless --out is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from caraserve.config import AdapterConfig, ConfigError, EngineConfig, ModelConfig
from caraserve.engine import Engine
from caraserve.model.args import ModelArgs
from caraserve.model.loader import load_hf_config
from caraserve.model.tiny import resolve_paths
from caraserve.perf.model import DecodeFeatures, PerfModel, PrefillFeatures, make_header
from caraserve.profiling.cli_args import output_file, positive_int, positive_ints
from caraserve.profiling.decode import rank_mixes, sweep
from caraserve.profiling.machine import cpu_name

RANK_BUCKETS = (8, 16, 32, 64, 128)


def plot(rows: list[dict], model: PerfModel, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, kind in zip(axes, ("decode", "mixed", "prefill")):
        pts = [(r["seconds"] * 1e3, predict(model, r) * 1e3, r["mix"]) for r in rows if r["kind"] == kind]
        for mix in sorted({p[2] for p in pts}):
            xs = [p[0] for p in pts if p[2] == mix]
            ys = [p[1] for p in pts if p[2] == mix]
            ax.scatter(xs, ys, label=mix, s=18)
        if not pts:
            continue
        hi = max(max(p[0], p[1]) for p in pts)
        ax.plot([0, hi], [0, hi], "k--", lw=1)
        ax.set(xlabel="measured ms", ylabel="predicted ms", title=f"{kind} step")
        ax.legend(fontsize=7)
    fig.suptitle(model.describe(), fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def features(row: dict) -> DecodeFeatures | PrefillFeatures:
    if row["kind"] == "decode":
        return DecodeFeatures.of(row["ranks"])
    if row["kind"] == "mixed":
        return DecodeFeatures.of(row["ranks"], [row["prefill_tokens"]], [row["chunk_rank"]])
    return PrefillFeatures.of([row["tokens_per_request"]] * row["batch_size"], row["ranks"])


def predict(model: PerfModel, row: dict) -> float:
    return model.predict(features(row))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch-sizes", type=positive_ints, default="1,4,8,16,32")
    ap.add_argument("--ranks", type=positive_ints, default="8,16,32,64,128")
    ap.add_argument("--prompt-tokens", type=positive_ints, default="16,64,256")
    ap.add_argument("--decode-steps", type=positive_int, default=8, help="timed decode steps per point (>= 2)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=output_file, default=None)
    ap.add_argument("--refit", type=Path, default=None, help="a profile this script wrote: fit its raw timings again")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.refit is not None:
        return refit(ap, args.refit, args.out or args.refit)
    sizes, ranks, tokens = args.batch_sizes, args.ranks, args.prompt_tokens
    for flag, values in (("--batch-sizes", sizes), ("--ranks", ranks), ("--prompt-tokens", tokens)):
        if len(set(values)) < 2:
            ap.error(f"argument {flag}: give two values at least (a law cannot tell its terms apart from one)")
    if max(ranks) > RANK_BUCKETS[-1]:
        ap.error(f"argument --ranks: {max(ranks)} is above the largest rank bucket, {RANK_BUCKETS[-1]}")
    if args.decode_steps < 2:
        ap.error("argument --decode-steps: a decode law needs at least 2 timed steps per point")
    device_dir = "cpu" if args.device == "cpu" else "gpu"
    try:
        out = args.out or output_file(f"profiles/{device_dir}/{Path(args.model).name}/latency.json")
    except argparse.ArgumentTypeError as e:
        ap.error(f"the default output: {e} (choose another with --out)")
    try:
        # before the engine, whose KV cache is sized for the longest prompts
        positions = model_positions(args.model)
        if max(tokens) + args.decode_steps + len(tokens) + 8 > positions:
            ap.error(f"argument --prompt-tokens: {max(tokens)} tokens and the decode steps after them do not fit the "
                     f"{positions} positions a request of this model may hold")
        engine = make_engine(args, sizes, tokens)
    except ConfigError as e:
        ap.error(str(e))
    total = len(rank_mixes(ranks)) * len(sizes) * len(tokens)
    with tqdm(total=total, desc="latency sweep", file=sys.stderr) as bar:
        rows = sweep(engine, sizes, ranks, tokens, args.decode_steps, bar)
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    header = make_header(dev_name, args.model, str(engine.dtype).removeprefix("torch."),
                         threads=torch.get_num_threads(), cpu=cpu_name())
    return write(ap, header, rows, out)


def write(ap, header: dict, rows: list[dict], out: Path) -> int:
    """Fits the latency model to the raw rows and writes it beside them (and the plot)."""
    try:
        model = PerfModel.fit([(features(r), r["seconds"]) for r in rows if r["kind"] != "prefill"],
                              [(features(r), r["seconds"]) for r in rows if r["kind"] == "prefill"],
                              header, rank_buckets=RANK_BUCKETS)
    except ValueError as e:
        ap.error(f"the timings cannot be fitted: {e}")
    out.write_text(json.dumps({"header": header, "raw": rows, "model": model.to_dict()}, indent=2) + "\n")
    plot(rows, model, out.with_suffix(".png"))
    print(model.describe())
    print(f"wrote {out}")
    return 0


def refit(ap, source: Path, out: Path) -> int:
    """The profile in `source` fitted again from its raw timings (its header gains `refit`)."""
    try:
        data = json.loads(source.read_text())
        header, rows = dict(data["header"]), list(data["raw"])
    except (OSError, ValueError, TypeError, KeyError) as e:
        ap.error(f"argument --refit: {source} is not a profile this script wrote ({type(e).__name__}: {e})")
    header["refit"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return write(ap, header, rows, out)


def model_positions(model: str) -> int:
    """The positions a request of the model may hold (its config's max_position_embeddings)."""
    path, _ = resolve_paths(EngineConfig(model=ModelConfig(path=model), adapters=AdapterConfig(dir="none")))
    return ModelArgs.from_hf(load_hf_config(path)).max_position  # (a ConfigError names what is wrong)


def make_engine(args, sizes: list[int], tokens: list[int]) -> Engine:
    """The engine the sweep runs: room for the largest batch of the longest prompts."""
    return Engine(EngineConfig(
        model=ModelConfig(path=args.model),
        adapters=AdapterConfig(dir="none", rank_buckets=RANK_BUCKETS, device_slots=max(sizes)),
        device=args.device, compile="false", max_batch_size=max(sizes) + 1, prefix_caching=False,
        max_seq_len=max(tokens) + args.decode_steps + len(tokens) + 8,
        max_tokens_per_step=max(sizes) * max(tokens) + max(tokens),
        num_kv_blocks=(max(sizes) + 1) * -(-(max(tokens) + args.decode_steps + len(tokens) + 8) // 16)))


if __name__ == "__main__":
    sys.exit(main())
