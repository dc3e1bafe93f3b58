"""Configuration: typed values, unknown keys, the README's overrides, and what the entry points
print for a configuration mistake (one line, exit status 2)."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from caraserve import config
from caraserve.cluster.config import ClusterConfig, RouterConfig, WorkloadConfig
from caraserve.config import (
    AdapterConfig,
    ConfigError,
    CpuAssistConfig,
    EngineConfig,
    ModelConfig,
    ServerConfig,
    engine_config,
)
from caraserve.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def refused(cls, data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        cls.from_dict(data)
    return str(e.value)


@pytest.mark.parametrize("value, shown", [("abc", "'abc'"), (8.5, "8.5"), (True, "true"), (None, "null"),
                                          ([8], "[8]")])
def test_int_field_refuses_what_is_not_an_integer(value, shown):
    assert refused(EngineConfig, {"max_batch_size": value}) == f"engine.max_batch_size={shown} must be an integer"


def test_a_step_token_budget_below_the_batch_size_is_refused():
    """A step holds one token of every running request: a smaller budget would leave admitted
    prompts no prefill until decoders finish."""
    assert refused(EngineConfig, {"max_batch_size": 8, "max_tokens_per_step": 4}) == (
        "engine.max_tokens_per_step=4 must be >= engine.max_batch_size=8 (a step holds one token of every "
        "running request)")
    assert EngineConfig.from_dict({"max_batch_size": 8, "max_tokens_per_step": 8}).max_tokens_per_step == 8


def test_int_field_takes_a_whole_float_as_an_int():
    cfg = AdapterConfig.from_dict({"host_mem_bytes": 8e9, "rank_buckets": [8, 16.0]})
    assert cfg.host_mem_bytes == 8_000_000_000 and type(cfg.host_mem_bytes) is int
    assert cfg.rank_buckets == (8, 16) and all(type(r) is int for r in cfg.rank_buckets)


def test_float_bool_str_and_list_fields_are_checked():
    cfg = ServerConfig.from_dict({"timeout_keep_alive_s": 3, "api_key": 12345})
    assert cfg.timeout_keep_alive_s == 3.0 and type(cfg.timeout_keep_alive_s) is float
    assert cfg.api_key == "12345"  # Hydra reads a bare 12345 as an int
    assert refused(ServerConfig, {"timeout_keep_alive_s": "3"}) == "server.timeout_keep_alive_s='3' must be a number"
    assert refused(ServerConfig, {"drain_timeout_s": True}) == "server.drain_timeout_s=true must be a number"
    assert refused(ServerConfig, {"allow_runtime_lora": "yes"}) == \
        "server.allow_runtime_lora='yes' must be a boolean (true/false)"
    assert refused(ServerConfig, {"allow_runtime_lora": 1}) == \
        "server.allow_runtime_lora=1 must be a boolean (true/false)"
    assert refused(ServerConfig, {"host": 1.5}) == "server.host=1.5 must be a string"
    assert refused(ServerConfig, {"log_level": True}) == "server.log_level=true must be a string"
    assert refused(AdapterConfig, {"rank_buckets": [8, "x"]}) == "adapters.rank_buckets[1]='x' must be an integer"
    assert refused(AdapterConfig, {"rank_buckets": 8}) == "adapters.rank_buckets=8 must be a list of integers"
    assert refused(AdapterConfig, {"allowed_roots": "/a"}) == "adapters.allowed_roots='/a' must be a list of strings"
    assert EngineConfig.from_dict({"compile": True}).compile == "true"  # engine.compile=true: a bool is taken
    assert EngineConfig.from_dict({"cuda_graphs": "capture"}).cuda_graphs == "capture"
    assert refused(EngineConfig, {"cuda_graphs": "eager"}) == "engine.cuda_graphs='eager' must be compile|capture"


def test_nested_sections_are_named_as_on_the_command_line():
    with pytest.raises(ConfigError, match=r"^model\.path=5\.5 must be a string$"):
        engine_config({"model": {"path": 5.5}})
    with pytest.raises(ConfigError, match=r"^cpu_assist\.threads='two' must be an integer$"):
        engine_config({"cpu_assist": {"threads": "two"}})
    with pytest.raises(ConfigError, match=r"^server=5 must be a mapping of keys$"):
        ServerConfig.from_dict(5)
    with pytest.raises(ConfigError, match=r"^workload\.prompt_tokens\.min_tokens=2\.5 must be an integer$"):
        WorkloadConfig.from_dict({"prompt_tokens": {"min_tokens": 2.5}})
    with pytest.raises(ConfigError, match=r"^workload\.num_adapters='x' must be an integer$"):
        WorkloadConfig.from_dict({"num_adapters": "x"})


def test_unknown_key_suggests_the_closest_known_one():
    assert refused(EngineConfig, {"max_batchsize": 3}) == \
        "unknown key engine.max_batchsize; did you mean engine.max_batch_size?"
    msg = refused(ServerConfig, {"zzz": 3})
    assert msg.startswith("unknown key server.zzz (known: admin_api_key, allow_runtime_lora, ")
    with pytest.raises(ConfigError, match=r"^unknown key srever; did you mean server\?$"):
        config.check_keys({"srever": {}}, ("model", "server"))
    # engine.* lists its own keys, not the sections that join it under other names
    with pytest.raises(ConfigError, match=r"^unknown key engine\.foo \(known: compile, ") as e:
        engine_config({"engine": {"foo": 1}})
    assert "adapters" not in str(e.value) and "model" not in str(e.value)


def test_max_memory_bytes_takes_device_indices_and_float_literals():
    cfg = ModelConfig.from_dict({"max_memory_bytes": {0: 40e9, "1": 40e9, "cpu": 8_000_000_000}})
    assert cfg.max_memory_bytes == {"0": 40_000_000_000, "1": 40_000_000_000, "cpu": 8_000_000_000}
    assert all(type(v) is int for v in cfg.max_memory_bytes.values())
    assert ModelConfig.from_dict({"max_memory_bytes": None}).max_memory_bytes == {}
    assert refused(ModelConfig, {"max_memory_bytes": {0: 1.5}}) == "model.max_memory_bytes.0=1.5 must be an integer"
    assert "the key 'disk' must be a CUDA device index" in refused(ModelConfig, {"max_memory_bytes": {"disk": 10}})


# ---- Hydra: what a user types ----

def composed(name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_container(compose(name, overrides=overrides), resolve=True)


def hydra_error(name: str, overrides: list[str]) -> str:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(Exception) as e:
            compose(name, overrides=overrides)
    from caraserve.cli import one_line

    return one_line(e.value)


def test_hydra_errors_read_as_one_line():
    assert hydra_error("serve", ["engine.max_batchsize=3"]) == \
        "unknown key engine.max_batchsize; did you mean engine.max_batch_size?"
    msg = hydra_error("serve", ['model.max_memory_bytes={"0": 40e9}'])
    assert msg.startswith("cannot parse 'model.max_memory_bytes={\"0\": 40e9}'") and "unquoted" in msg
    assert hydra_error("serve", ["model=nope"]) == "In 'serve': Could not find 'model/nope'; available: tiny"
    for msg in (hydra_error("serve", ["engine.max_batch_size=[1"]), hydra_error("serve", ["server.port=1,2"])):
        assert "\n" not in msg


def test_added_unknown_key_is_refused_like_an_overridden_one():
    cfg = composed("serve", ["+engine.max_batchsize=3"])
    with pytest.raises(ConfigError) as e:
        engine_config(cfg)
    assert str(e.value) == "unknown key engine.max_batchsize; did you mean engine.max_batch_size?"


ENTRIES = {"caraserve.serve": "serve", "scripts/generate.py": "generate", "caraserve.ray_serve": "ray_serve",
           "scripts/simulate.py": "simulate"}
SERVE_SECTIONS = ("model", "adapters", "engine", "cpu_assist", "scheduler", "limits", "server")


def readme_overrides() -> list[tuple[str, list[str]]]:
    """(config name, overrides) for every command in README.md's bash blocks and every inline
    `section.key=value` span (those are the server's), split as a shell would."""
    text = (ROOT / "README.md").read_text()
    found = []

    def commands(words: list[str], inline: bool = False) -> None:
        for i, w in enumerate(words):
            if w in ENTRIES:
                rest = []
                for x in words[i + 1:]:
                    if x in ("&&", "&", "|", ";"):
                        break
                    rest.append(x)
                overrides = [x for x in rest if "=" in x and not x.startswith("-")]
                if overrides or not inline:  # an inline mention of an entry point is no command
                    found.append((ENTRIES[w], overrides))

    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            commands(shlex.split(line, comments=True))
    for span in re.findall(r"`([^`\n]+)`", text):
        try:
            words = shlex.split(span)
        except ValueError:
            continue
        if words and all(re.match(r"^[a-z_]+(\.[a-z_]+)+=", w) and w.split(".")[0] in SERVE_SECTIONS
                         for w in words):
            found.append(("serve", words))
        else:
            commands(words, inline=True)
    return found


def convert(name: str, cfg: dict) -> None:
    """What the entry point does with the composed config before it starts anything."""
    if name == "serve":
        from caraserve.serve.__main__ import configs
        configs(cfg)
    elif name == "ray_serve":
        from caraserve.ray_serve.app import app_config
        app_config(cfg)
    elif name == "generate":
        config.check_keys(cfg, ("model", "adapters", "engine", "cpu_assist", "scheduler", "limits", "input", "output",
                         "progress", "format", "server"))
        engine_config(cfg)
    else:  # as scripts/simulate.py
        ClusterConfig.from_dict(cfg["cluster"])
        WorkloadConfig.from_dict(cfg["workload"])
        RouterConfig.from_dict(cfg["scheduler"])


def test_every_readme_override_composes_and_converts():
    found = readme_overrides()
    assert len(found) >= 15 and {c for c, _ in found} == set(ENTRIES.values())
    assert any("model.max_memory_bytes" in o for _, ovs in found for o in ovs)
    for name, overrides in found:
        convert(name, composed(name, overrides))


def test_readme_max_memory_bytes_override_gives_int_bytes_per_device():
    [overrides] = [ovs for _, ovs in readme_overrides() if any("max_memory_bytes" in o for o in ovs)]
    cfg = engine_config(composed("serve", overrides))
    assert cfg.model.max_memory_bytes == {"0": 40_000_000_000, "1": 40_000_000_000}


# ---- the entry points ----

def run_entry(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


# server.port=0: should a check ever let the value through, the server binds no fixed port
@pytest.mark.parametrize("args, line", [
    (("-m", "caraserve.serve", "server.port=0", "engine.max_batch_size=abc"),
     "error: engine.max_batch_size='abc' must be an integer"),
    (("-m", "caraserve.serve", "server.port=0", "engine.max_batchsize=3"),
     "error: unknown key engine.max_batchsize; did you mean engine.max_batch_size?"),
    (("-m", "caraserve.ray_serve", "server.port=0", "router.max_attempts=2.5"),
     "error: router.max_attempts=2.5 must be an integer"),
    ((str(ROOT / "scripts" / "generate.py"), "+engine.max_batchsize=3"),
     "error: unknown key engine.max_batchsize; did you mean engine.max_batch_size?"),
    (("-m", "caraserve.serve", "server.port=0", "model.path=/nonexistent", "adapters.dir=none"),
     "error: model.path: model folder /nonexistent does not exist"),
    (("-m", "caraserve.serve", "server.port=0", "server.chat_template='{% if %}'"),
     "error: server.chat_template: not a usable Jinja template (TemplateSyntaxError: Expected an expression, "
     "got 'end of statement block')"),
    (("-m", "caraserve.serve", "server.port=0", "server.host=''"),
     "error: server.host is empty: give an address (0.0.0.0 for every interface)"),
])
def test_entry_point_prints_one_line_and_exits_2(args, line, tmp_path):
    p = run_entry(*args, cwd=ROOT if args[0] == "-m" else tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.splitlines() == [line] and p.stdout == ""


@pytest.mark.parametrize("args, line", [
    ((str(ROOT / "scripts" / "generate.py"), "adapters.dir=/nonexistent"),
     "error: adapters.dir: /nonexistent does not exist"),
    ((str(ROOT / "scripts" / "generate.py"), "engine.num_kv_blocks=100000000000"),
     "error: the KV cache (100000000000 blocks of 16 tokens: 6103515.6 GiB) cannot be allocated: lower "
     "engine.num_kv_blocks, engine.kv_cache_bytes or engine.max_batch_size"),
    (("-m", "caraserve.serve", "server.port=0", "server.served_model_name=demo-r8"),
     "error: the base model's name 'demo-r8' (server.served_model_name, else model.served_name, else the model "
     "folder's) is also an adapter's: requests naming it could not reach the adapter; rename one"),
])
def test_start_up_errors_after_the_model_loads_end_with_one_error_line(args, line, tmp_path):
    p = run_entry(*args, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.splitlines()[-1] == line


def test_server_settings_that_would_misbehave_are_refused_or_said(caplog):
    with pytest.raises(ConfigError, match="server.unload_timeout_s=-5"):
        ServerConfig(unload_timeout_s=-5)
    with pytest.raises(ConfigError, match=r"server.heap_trim_s=-1(\.0)? must be >= 0 \(0: never\)"):
        ServerConfig(heap_trim_s=-1)
    with pytest.raises(ConfigError, match=r"cpu_assist.emulate_copy_gbps=1e-09 must be 0 \(off\) or >= 0.0001"):
        CpuAssistConfig(emulate_copy_gbps=1e-9)  # a copy of hours: adapters that never land
    long_inline = "{% for m in messages %}" + "x" * 300 + "{{ m.content }}{% endfor %}"  # no file name
    assert ServerConfig(chat_template=long_inline).chat_template == long_inline
    engine = Engine(EngineConfig(compile="false", max_seq_len=100000, max_batch_size=1, num_kv_blocks=8,
                                 adapters=AdapterConfig(dir="none")))
    assert engine.max_seq_len < 100000 and "engine.max_seq_len=100000 is past the model's 4096 positions" in caplog.text


def test_entry_point_parse_error_is_one_line(tmp_path):
    p = run_entry("-m", "caraserve.serve", 'model.max_memory_bytes={"0": 40e9, "1": 40e9}', cwd=ROOT)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and p.stderr.startswith("error: cannot parse")


def test_server_on_a_taken_port_says_so_before_loading_the_model():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        t0 = time.monotonic()
        p = run_entry("-m", "caraserve.serve", f"server.port={port}", "model.path=/nonexistent", cwd=ROOT)
    assert p.returncode == 2, p.stderr[-2000:]  # (a model load would have failed on the path)
    assert p.stderr.splitlines() == [f"error: server.host/server.port: cannot listen on 127.0.0.1:{port} "
                                     "(Address already in use)"]
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("args, usage, sections", [
    (("-m", "caraserve.serve"), "python -m caraserve.serve",
     {"model", "adapters", "engine", "cpu_assist", "scheduler", "limits", "server"}),
    ((str(ROOT / "scripts" / "generate.py"),), "python scripts/generate.py",
     {"model", "adapters", "engine", "cpu_assist", "scheduler", "limits", "input", "output", "progress", "format",
      "server"}),
])
def test_help_shows_the_entry_points_own_sections_only(args, usage, sections, tmp_path):
    """--help lists the sections this entry point reads, not every config group in conf/ (cluster,
    workload and ray are other entry points')."""
    p = run_entry(*args, "--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith(f"usage: {usage} [section.key=value ...]")
    top = {line.split(":")[0] for line in p.stdout.splitlines()[1:] if re.match(r"^[a-z_]+:", line)}
    assert top == sections


def test_a_config_built_in_python_is_checked_as_one_read_from_yaml():
    """EngineConfig(model=path) as vLLM's LLM(model=path); a section given as a mapping is read as
    that section; a value of the wrong type is a ConfigError naming the key, not a TypeError or
    an AttributeError deep in the engine."""
    assert EngineConfig(model="/models/x").model == ModelConfig(path="/models/x")
    assert EngineConfig(adapters={"dir": "none", "device_slots": 2}).adapters.device_slots == 2
    assert EngineConfig(max_batch_size=8.0).max_batch_size == 8
    for kw, says in ((dict(max_batch_size="8"), "engine.max_batch_size='8' must be an integer"),
                     (dict(adapters={"dri": "x"}), "did you mean engine.adapters.dir"),
                     (dict(model=5), "engine.model=5 must be a mapping"),
                     (dict(compile=3), "engine.compile='3' must be auto|true|false")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            EngineConfig(**kw)
    with pytest.raises(ConfigError, match=re.escape("adapters.device_slots='2' must be an integer")):
        AdapterConfig(device_slots="2")
