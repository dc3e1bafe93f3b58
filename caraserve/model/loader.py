"""Loads a Hugging Face model folder as it is: config.json, single or sharded safetensors.

Placement: with a memory budget for several devices, accelerate's `infer_auto_device_map`
decides which decoder layers go where, and each tensor is read straight onto its device.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from caraserve.config_checks import ConfigError
from caraserve.model.llama import CausalLM, ModelArgs

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ConfigError):
    """The folder cannot be loaded; the message names the file and tensor. A configuration error:
    model.path names a folder that is not a loadable model (an entry point says it in one line)."""


def load_hf_config(path: str | os.PathLike):
    from transformers import AutoConfig

    folder = Path(path)
    cfg_file = folder / "config.json"
    if not folder.is_dir():
        # "org/name" that is no folder here reads as a Hugging Face hub id: nothing is downloaded
        hub = not folder.exists() and not folder.is_absolute() and len(folder.parts) == 2
        raise ModelLoadError(f"model.path: model folder {folder} does not exist"
                             + (" (it is a file)" if folder.exists() else "")
                             + (f" (a hub id? models are read from local folders only: fetch it first, e.g. "
                                f"huggingface-cli download {folder} --local-dir DIR)" if hub else ""))
    if not cfg_file.is_file():
        raise ModelLoadError(f"{cfg_file} is missing: not a Hugging Face model folder")
    try:
        json.loads(cfg_file.read_text())
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # JSON, I/O, and transformers' own checks of the values (their own types)
        raise ModelLoadError(f"{cfg_file} cannot be read: {type(e).__name__}: {e}") from e


def resolve_dtype(name: str, hf_config) -> torch.dtype:
    if name == "auto":
        cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(cfg_dtype, torch.dtype):
            return cfg_dtype
        return DTYPES.get(str(cfg_dtype), torch.float32)
    if name not in DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it. A single model.safetensors is read before
    an index, as transformers reads them (a folder may hold a stale one beside new shards)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return dict.fromkeys(_open(single).keys(), single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {e}") from e
        return {name: folder / fname for name, fname in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder} (only safetensors checkpoints load)")
    mapping: dict[str, Path] = {}
    for f in files:
        for name in _open(f).keys():
            mapping[name] = f
    return mapping


def _read_tensor(folder: Path, files: dict[str, Path], handles: dict, name: str) -> torch.Tensor:
    """Checkpoint tensor `name` (its file opened once), or a ModelLoadError naming it."""
    file = files.get(name)
    if file is None:
        raise ModelLoadError(f"tensor {name!r} is missing from the checkpoint in {folder}")
    if file not in handles:
        if not file.is_file():
            raise ModelLoadError(f"{file} (holding {name!r}) does not exist")
        handles[file] = _open(file)
    try:
        return handles[file].get_tensor(name)
    except Exception as e:
        raise ModelLoadError(f"cannot read tensor {name!r} from {file}: {e}") from e


# dtypes a checkpoint's weights may have: a quantized or integer tensor cast to the compute dtype
# would be served as other weights than the model's
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _refuse_quantized(hf_config, folder: Path) -> None:
    quant = getattr(hf_config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise ModelLoadError(f"{folder / 'config.json'}: quantized checkpoints (quantization_config, "
                             f"quant_method={method!r}) are not supported; give an unquantized model")


# a multimodal checkpoint's parts besides its language model, which text serving does not read
_OTHER_TOWERS = tuple(f"{prefix}{part}." for prefix in ("", "model.")
                      for part in ("vision_tower", "multi_modal_projector", "visual"))  # (visual: Qwen2-VL's)
# where a multimodal checkpoint keeps its language model's tensors: (its prefix, ours)
_LANGUAGE_MODEL = (("language_model.model.", "model."), ("model.language_model.", "model."),
                   ("language_model.lm_head.", "lm_head."))


def _language_model_names(files: dict[str, Path]) -> dict[str, str]:
    """Our parameter name -> the tensor holding it in a multimodal checkpoint: its language model's
    under language_model.model (as released) or model.language_model (as transformers 5 names it)."""
    out = {}
    for name in files:
        for theirs, ours in _LANGUAGE_MODEL:
            if name.startswith(theirs):
                out[ours + name[len(theirs):]] = name
    return out


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModelLoadError(f"cannot read {file}: {e}") from e


def plan_placement(
    model: nn.Module, dtype: torch.dtype, device: str, max_memory_bytes: dict | None
) -> dict[str, str]:
    """Module name -> device. Without a budget everything goes to `device`; with one, accelerate
    places whole decoder layers within the per-device budgets."""
    if not max_memory_bytes:
        return {"": device}
    from accelerate import infer_auto_device_map

    budget = {(int(k) if str(k).isdigit() else k): int(v) for k, v in max_memory_bytes.items()}
    dmap = infer_auto_device_map(
        model, max_memory=budget, no_split_module_classes=["DecoderLayer"], dtype=dtype
    )
    placed = {}
    for name, dev in dmap.items():
        if dev == "disk":
            raise ModelLoadError(
                f"the memory budget {max_memory_bytes} leaves {name!r} for disk offload, which is not supported"
            )
        placed[name] = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
    return placed


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one ("cuda" is the current CUDA device, "cuda:0" may be it too)."""
    def index(d: torch.device):
        return torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index
    return a.type == b.type and (a.type == "cpu" or index(a) == index(b))


def _device_for(name: str, placement: dict[str, str]) -> str:
    best, dev = -1, placement.get("", "cpu")
    for prefix, d in placement.items():
        if (name == prefix or name.startswith(prefix + ".") or prefix == "") and len(prefix) > best:
            best, dev = len(prefix), d
    return dev


def _read_parameter(folder, files, handles, module, module_name: str, name: str, param, source: dict,
                    dtype: torch.dtype, dev: str, used: set) -> torch.Tensor:
    """The checkpoint's value of parameter `name` (meta `param`) on `dev` in `dtype`: one tensor, or
    the parts a fused projection stacks (each read straight into its rows), checked for dtype and
    shape; the checkpoint names read go into `used`."""
    attr = name.rpartition(".")[2]
    parts = module.checkpoint_parts(module_name, attr) if hasattr(module, "checkpoint_parts") else \
        [(name, 0, param.shape[0] if param.dim() else 0)]
    value = None if len(parts) == 1 else torch.empty(param.shape, dtype=dtype, device=dev)
    for ck, lo, hi in parts:
        shape = (hi - lo, *param.shape[1:]) if value is not None else tuple(param.shape)
        ck = source.get(ck, ck)
        tensor = _read_tensor(folder, files, handles, ck)
        if tensor.dtype not in FLOAT_DTYPES:
            raise ModelLoadError(f"tensor {ck!r} in {files[ck]} is {str(tensor.dtype).removeprefix('torch.')}: "
                                 "quantized or integer weights are not supported")
        if getattr(module, "stacked_checkpoint", False) and tensor.dim() == 3:  # [E, rows, in]: its rows
            tensor = tensor.flatten(0, 1)
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(f"tensor {ck!r} in {files[ck]} has shape {tuple(tensor.shape)}, expected {shape}")
        if value is None:
            value = tensor.to(device=dev, dtype=dtype)
        else:  # each part straight into its rows: no second copy of the fused parameter
            value[lo:hi].copy_(tensor)
        used.add(ck)
    return value


def _tie_lm_head(model: CausalLM, folder, files, handles, used: set, dtype: torch.dtype,
                 head_dev: torch.device, head_name: str = "lm_head.weight") -> None:
    """A tied model's LM head, as transformers sets it: the embeddings, unless the checkpoint
    holds an lm_head (`head_name`) of other values (kept apart, with a warning)."""
    embed_name = "model.embed_tokens.weight"
    embed = model.model.embed_tokens.weight
    head = None
    if head_name in files and head_name not in used:
        head = _read_tensor(folder, files, handles, head_name)
        if head.dtype not in FLOAT_DTYPES or tuple(head.shape) != tuple(embed.shape):
            raise ModelLoadError(f"tensor {head_name!r} in {files[head_name]} is {head.dtype} of shape "
                                 f"{tuple(head.shape)}, expected a float tensor of shape {tuple(embed.shape)}")
        # compared on the host: a device copy of either would sit outside the memory budget
        if torch.equal(head.to(dtype), embed.detach().cpu()):
            head = None
        else:
            log.warning("%s: tie_word_embeddings is set but %s differs from %s: the two are kept apart, "
                        "as transformers does", folder, head_name, embed_name)
    if head is not None:
        model.lm_head.weight = nn.Parameter(head.to(device=head_dev, dtype=dtype), requires_grad=False)
    elif _same_device(embed.device, head_dev):
        model.lm_head.weight = embed
    else:
        model.lm_head.weight = nn.Parameter(embed.detach().to(head_dev), requires_grad=False)


def load_model(
    path: str | os.PathLike,
    dtype: str = "auto",
    device: str = "cpu",
    max_memory_bytes: dict | None = None,
) -> CausalLM:
    """Builds our decoder from a Hugging Face folder, reading each tensor onto its device."""
    folder = Path(path)
    hf_config = load_hf_config(folder)
    _refuse_quantized(hf_config, folder)
    args = ModelArgs.from_hf(hf_config)
    torch_dtype = resolve_dtype(dtype, hf_config)
    files = _weight_files(folder)
    embed_name, head_name = "model.embed_tokens.weight", "lm_head.weight"
    # the checkpoint tensor a parameter is read from, where not its own name
    source: dict[str, str] = _language_model_names(files) if args.multimodal else {}
    with torch.device("meta"):
        model = CausalLM(args, hf_config)
        if args.tie_embeddings and all(source.get(n, n) in files for n in (embed_name, head_name)):
            # a tied checkpoint holding a head of its own may keep it apart (_tie_lm_head, as
            # Mistral Small 3.1's does): the placement budgets it as a tensor of its own
            model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight), requires_grad=False)
    placement = plan_placement(model, torch_dtype, device, max_memory_bytes)
    handles: dict[Path, object] = {}
    expected = dict(model.named_parameters())
    if args.tie_embeddings:
        # As transformers: a tied checkpoint may hold either tensor, and one holding both with
        # different values keeps them apart (compared below).
        expected.pop(head_name, None)
        if source.get(embed_name, embed_name) not in files and source.get(head_name, head_name) in files:
            source[embed_name] = source.get(head_name, head_name)
    used: set[str] = set()
    for name, param in expected.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = _read_parameter(folder, files, handles, module, module_name, name, param, source, torch_dtype,
                                _device_for(name, placement), used)
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    if args.tie_embeddings:
        head_ck = source.get(head_name, head_name)
        _tie_lm_head(model, folder, files, handles, used, torch_dtype, torch.device(_device_for(head_name, placement)),
                     head_ck)
        used.add(head_ck)  # read and compared, or the embeddings' own
    extra = sorted(n for n in set(files) - used if not (args.multimodal and n.startswith(_OTHER_TOWERS)))
    if extra:
        log.warning("ignoring %d unexpected tensors in %s, e.g. %s", len(extra), folder, extra[:3])
    for rotary in model.ropes.values():  # (built on CPU)
        rotary.inv_freq = rotary.inv_freq.to(_device_for("model.layers.0", placement))
    model.eval()
    log.info("loaded %s (%s, %s) from %s", args.architecture, torch_dtype, placement, folder)
    return model


def eos_token_ids(path: str | os.PathLike, hf_config, tokenizer) -> set[int]:
    """The tokens that end a generation, as vLLM takes them: the tokenizer's EOS and the
    generation config's, which is generation_config.json's eos_token_id when the file gives one
    (a chat model lists its end-of-turn token there, e.g. Llama 3 Instruct's <|eot_id|>) and
    config.json's otherwise (transformers' generate does the same without the tokenizer's)."""
    ids: set[int] = set()

    def add(v) -> None:
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, int) and not isinstance(x, bool) and x >= 0:
                ids.add(x)

    gen, gen_file = {}, Path(path) / "generation_config.json"
    if gen_file.is_file():
        try:
            gen = json.loads(gen_file.read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{gen_file} cannot be read: {type(e).__name__}: {e}") from e
        if not isinstance(gen, dict):
            raise ModelLoadError(f"{gen_file} must hold a JSON object")
    add(gen["eos_token_id"] if gen.get("eos_token_id") is not None else getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    return ids


def load_tokenizer_or_none(path: str | os.PathLike):
    """The folder's tokenizer, or None with a warning: a weights-only folder still serves token ids."""
    try:
        return load_tokenizer(path)
    except Exception as e:
        log.warning("no tokenizer in %s (%s): only token-id prompts are accepted", path, e)
        return None


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {e}") from e
