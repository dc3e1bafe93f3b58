"""Runtime adapter management behind /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's):
a load registers an adapter folder under the allowed roots and reads its weights at once; an
unload stops new requests for it, waits for its running ones, and removes it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from caraserve.lora.adapter_files import AdapterError, AdapterReadError, RegistryFullError, check_name
from caraserve.lora.adapter_info import UnknownAdapterError
from caraserve.serve import protocol as proto
from caraserve.serve.async_engine import AsyncEngine
from caraserve.serve.http import AdapterCapacity, BadRequest, Conflict, InternalError, NotFound

log = logging.getLogger(__name__)


class AdapterAdmin:
    def __init__(self, async_engine: AsyncEngine, served_name: str, adapter_roots: list[Path],
                 unload_timeout_s: float):
        self.async_engine, self.engine = async_engine, async_engine.engine
        self.served_name, self.adapter_roots, self.unload_timeout_s = served_name, adapter_roots, unload_timeout_s

    async def load(self, body: proto.LoadLoraRequest) -> dict:
        try:
            check_name(body.lora_name)
        except AdapterError as e:
            raise BadRequest(str(e)) from e
        try:
            resolved = Path(body.lora_path).expanduser().resolve()
        except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, symlink loops, unknown ~user
            raise BadRequest(f"lora_path {body.lora_path!r} is not a usable path ({e})") from e
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.adapter_roots):
            raise BadRequest(f"lora_path {body.lora_path!r} is outside the allowed adapter roots "
                             f"(adapters.allowed_roots)")
        if body.lora_name == self.served_name:
            raise BadRequest(f"{body.lora_name!r} is the base model's name")
        try:
            info = await asyncio.get_running_loop().run_in_executor(
                None, self.engine.register_adapter, body.lora_name, resolved)
        except RegistryFullError as e:  # the operator's limit, which an unload clears: come back later
            raise AdapterCapacity(str(e)) from e
        except AdapterError as e:
            raise BadRequest(str(e)) from e
        except (OSError, ValueError) as e:  # unreadable files of the caller's choosing
            raise BadRequest(f"adapter {body.lora_name!r} cannot be read ({type(e).__name__}: {e})") from e
        # Its weights are read now (into the host tier), as vLLM's load does: weights that cannot
        # be served (NaN, Inf) are refused to this call, not to the adapter's first request.
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.store.get, info.name)
        except (AdapterReadError, UnknownAdapterError):  # an I/O error that may pass, or unloaded meanwhile
            log.warning("adapter %s: its weights were not read at load", info.name, exc_info=True)
        except Exception as e:  # weights refused (400), or a failure of the machine's: nothing of it stays
            with contextlib.suppress(TimeoutError, AdapterError, UnknownAdapterError):
                await self.async_engine.retire_adapter(info.name, self.unload_timeout_s)
            if isinstance(e, AdapterError):
                raise BadRequest(str(e)) from e
            raise InternalError(f"adapter {info.name!r} could not be read ({type(e).__name__}: {e})") from e
        return {"status": "ok", "lora_name": info.name, "rank": info.rank}

    async def unload(self, body: proto.UnloadLoraRequest) -> dict:
        if not self.async_engine.is_serving(body.lora_name):
            raise NotFound(f"adapter {body.lora_name!r} is not loaded")
        try:
            await self.async_engine.retire_adapter(body.lora_name, self.unload_timeout_s)
        except (TimeoutError, AdapterError) as e:  # still in use: the caller may retry later
            raise Conflict(f"cannot unload adapter {body.lora_name!r}: {e}") from e
        return {"status": "ok", "lora_name": body.lora_name}
