"""Offline batch generation.

    python scripts/generate.py input=IN.jsonl output=OUT.jsonl [model.path=DIR adapters.dir=DIR]
        [engine.max_batch_size=32 engine.compile=false adapters.device_slots=2 ...]

Without `input`, generates for a few demo prompts (one per demo adapter) and prints them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from caraserve.cli import config_task, run
from caraserve.config import ENGINE_SECTIONS, ConfigError, ServerConfig, check_keys, engine_config
from caraserve.config_checks import show
from caraserve.engine import Engine
from caraserve.offline import run_offline
from caraserve.serve.openai_batch import SERVER_KEYS, is_batch_file, run_openai_batch

log = logging.getLogger("generate")

FORMATS = ("auto", "caraserve", "openai")
DEMO_PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Server:", "The quick brown fox"]


def _demo_lines(engine: Engine) -> list[str]:
    adapters = [None] + [a.name for a in engine.adapters()]
    return [json.dumps({"id": f"demo-{i}", "prompt": p, "adapter": adapters[i % len(adapters)],
                        "max_tokens": 24, "temperature": 0})
            for i, p in enumerate(DEMO_PROMPTS + DEMO_PROMPTS[:1])]


def path_value(key: str, value) -> Path | None:
    """input= / output= as a path: Hydra reads `input=123` as a number, which is the file "123";
    `true` or `1.50` would not name the file a user typed, so they are refused."""
    if value is None or isinstance(value, str) and value:
        return None if value is None else Path(hydra.utils.to_absolute_path(value))
    if isinstance(value, int) and not isinstance(value, bool):
        return Path(hydra.utils.to_absolute_path(str(value)))
    raise ConfigError(f"{key}={show(value)}: expected a file path (quote a name Hydra reads as a value: "
                      f"{key}=\"'{show(value)}'\")")


def output_file(out: Path):
    """Where the results go: (the path written at the end, a temporary file beside it or None).
    A regular file (or a new one, or a symlink to either: written at the link's target) gets a
    temporary file made now, which the results go into and which then replaces it, so an output
    that cannot be written fails before the job, not after it, and the input may be the output.
    Anything else that exists (a FIFO, a device, /dev/stdout) is written through, as `> path`
    does, at the end."""
    if out.is_dir():
        raise ConfigError(f"output={out}: is a folder")
    if out.exists() and not out.is_file():
        return out, None
    real = Path(os.path.realpath(out))
    if not real.parent.is_dir():
        raise ConfigError(f"output={out}: {real.parent} is not a folder")
    try:
        return real, tempfile.NamedTemporaryFile("w", dir=real.parent, prefix=f".{real.name}.", suffix=".tmp",
                                                 delete=False)
    except OSError as e:
        raise ConfigError(f"output={out}: cannot write in {real.parent} ({e.strerror or e})") from None


def batch_server(composed: dict, lines: list[str] | None) -> ServerConfig | None:
    """With format=openai (or auto and OpenAI batch lines), the server settings the calls are
    answered by; None for CaraServe's own lines."""
    fmt = composed["format"]
    if fmt not in FORMATS:
        raise ConfigError(f"format={show(fmt)} must be one of {'|'.join(FORMATS)}")
    server = composed.get("server") or {}
    if not isinstance(server, dict):
        raise ConfigError(f"server={show(server)} must be a mapping of keys ({', '.join(SERVER_KEYS)})")
    check_keys(server, SERVER_KEYS, "server")
    if fmt == "caraserve" or fmt == "auto" and (lines is None or not is_batch_file(lines)):
        return None
    if lines is None:
        raise ConfigError("format=openai needs input= (a file of OpenAI batch lines)")
    return ServerConfig.from_dict(server)


def json_line(result: dict) -> str:
    """A result as one line of strict JSON: no NaN or Infinity, which JSON parsers refuse (a
    logprob of -inf, a token the model rules out, is -9999.0, as the API sends it)."""
    try:
        return json.dumps(result, allow_nan=False) + "\n"
    except ValueError:
        return json.dumps(_finite(result), allow_nan=False) + "\n"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return -9999.0 if value < 0 else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _file_mode(path: Path) -> int:
    """The mode the output gets: the file's own when it exists, else what the umask gives a new one."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def read_lines(path: Path) -> list[str]:
    """The input's lines, split at "\\n" only (JSON strings may hold U+2028 and other characters
    Python's splitlines also breaks at), after a UTF-8 byte order mark if the file starts with
    one. A line that is not UTF-8 keeps its bytes as lone surrogates, so it fails alone, naming
    itself, as any bad line does. A pipe (input=/dev/stdin, a FIFO) is read to its end."""
    if path.is_dir() or not path.exists():
        raise ConfigError(f"input={path}: " + ("is a folder, not a file" if path.is_dir() else "no such file"))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"input={path}: cannot be read ({e.strerror or e})") from None
    lines = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
@config_task
def main(cfg: DictConfig) -> None:
    composed = OmegaConf.to_container(cfg, resolve=True)
    check_keys(composed, (*ENGINE_SECTIONS, "input", "output", "progress", "format", "server"))
    if not isinstance(cfg.progress, bool):
        raise ConfigError(f"progress={cfg.progress!r} must be true or false")
    source = path_value("input", cfg.input)
    lines = None if source is None else read_lines(source)
    batch = batch_server(composed, lines)
    out = path_value("output", cfg.output)
    out, tmp = (None, None) if out is None else output_file(out)
    try:
        engine = Engine(engine_config(composed))
        if lines is None:
            lines = _demo_lines(engine)
        bar = tqdm(total=sum(1 for line in lines if line.strip()), desc="requests", unit="req", file=sys.stderr,
                   disable=not cfg.progress)
        results, summary = run_offline(engine, lines, bar) if batch is None else \
            run_openai_batch(engine, batch, lines, bar)
        # What finished is written whatever else comes: a second Ctrl-C or a SIGTERM now would
        # lose it all for the few seconds of writing it saves.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        bar.close()
        text = "".join(json_line(r) for r in results)
        if summary.interrupted and tmp is not None and source is not None and _same_file(source, out):
            # The input is the output: replacing it would turn the lines that did not run into
            # errors and lose their requests, so it stays, and the results go beside it.
            out = out.with_name(out.name + ".interrupted")
            print(f"interrupted: input={source} is kept as it was; the results are in {out}", file=sys.stderr)
        try:
            if tmp is not None:
                with tmp:
                    tmp.write(text)
                os.chmod(tmp.name, _file_mode(out))
                os.replace(tmp.name, out)
            elif out is not None:
                with open(out, "w") as f:
                    f.write(text)
            elif cfg.input is not None:
                if sys.stdout is None:  # (closed by the caller: `>&-`)
                    raise OSError("standard output is closed")
                sys.stdout.write(text)
                sys.stdout.flush()
        except OSError as e:  # (a full disk, a closed pipe): one line, not a traceback
            print(f"error: the results could not be written to {out or 'standard output'} "
                  f"({e.strerror or e}); {summary.requests} requests ran", file=sys.stderr)
            sys.exit(1)
    finally:
        if tmp is not None and os.path.exists(tmp.name):
            os.unlink(tmp.name)
    if out is None and cfg.input is None:
        for line, r in zip(lines, results):
            req = json.loads(line)
            print(f"[{req['adapter'] or 'base'}] {req['prompt']!r} -> {r.get('text', r.get('error'))!r}")
    blank = f", {summary.blank_lines} blank lines skipped" if summary.blank_lines else ""
    print(f"{summary.requests} requests ({summary.errors} errors{blank}), {summary.output_tokens} tokens in "
          f"{summary.seconds:.2f} s: {summary.tokens_per_s:.1f} tokens/s", file=sys.stderr)
    if summary.interrupted:
        print("interrupted: the requests that had finished are written, the others as errors", file=sys.stderr)
        sys.exit(130)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # a batch scheduler's stop, taken as Ctrl-C: the finished lines are written


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(run(main))
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        sys.exit(130)
