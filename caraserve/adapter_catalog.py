"""The adapters an engine serves: registration (start-up folder, runtime loads, the resolver),
the checks a request's adapter must pass, and preloading. Holds the host tier (HostStore) and the
device slot pool (DevicePool) the scheduler and runner use."""

from __future__ import annotations

import logging
from pathlib import Path

from caraserve.config import AdapterConfig, ConfigError, CpuAssistConfig
from caraserve.lora.adapter_files import RegistryFullError, without_name
from caraserve.lora.checkpoint import AdapterError, check_name
from caraserve.lora.device_pool import DevicePool
from caraserve.lora.host_store import AdapterInfo, HostStore
from caraserve.request import CapacityError, RequestError

log = logging.getLogger(__name__)


class AdapterCatalog:
    def __init__(self, cfg: AdapterConfig, assist: CpuAssistConfig, model_args, dtype, layer_devices,
                 adapter_dir: Path | None):
        self.cfg = cfg
        self.store = HostStore(model_args, cfg.host_mem_bytes, dtype, max_registered=cfg.max_registered,
                               max_file_bytes=cfg.max_file_bytes, roots=self._roots(adapter_dir),
                               max_rank=cfg.max_rank)
        self.pool = DevicePool(model_args, cfg.rank_buckets, cfg.device_slots, dtype, layer_devices,
                               cfg.target_modules, assist.emulate_copy_gbps, assist.pipeline_layers)
        self.errors: dict[str, str] = {}  # start-up adapters refused, and why
        if adapter_dir is not None:
            self.register_dir(adapter_dir)

    def _roots(self, adapter_dir: Path | None) -> tuple | None:
        """Folders runtime loads may read from: adapters.allowed_roots (default adapters.dir) and
        the resolver's folders; None when there are none (no confinement)."""
        roots = tuple(self.cfg.allowed_roots or ((adapter_dir,) if adapter_dir else ())) + tuple(self.cfg.resolve_dirs)
        return roots or None

    def register_dir(self, root: Path) -> None:
        """The operator's start-up folder: every adapter in it, the broken ones reported."""
        ok, bad = self.store.register_dir(root)
        self.errors.update(bad)
        for name in ok:
            try:
                self.pool.check(self.store.info(name))
            except AdapterError as e:
                self.store.unregister(name)
                self.errors[name] = str(e)
                log.error("%s", e)
        log.info("%d adapters registered from %s (%d refused)", len(self.store.names()), root, len(bad))

    def register(self, name: str, path: str | Path) -> AdapterInfo:
        """Validates and registers one adapter at run time; on error nothing changes. Safe to call
        from any thread (the store has its own lock)."""
        info = self.store.register(name, path)
        try:
            self.pool.check(info)
        except AdapterError:
            self.store.unregister(name)
            raise
        self.errors.pop(name, None)  # a start-up refusal is history once the name serves
        return info

    def remove(self, name: str) -> None:
        """Forgets an adapter (the caller has made sure no request uses it)."""
        self.pool.evict(name)
        self.store.unregister(name)

    def resolve(self, name: str) -> bool:
        """Registers `<dir>/<name>` from the first of adapters.resolve_dirs that has it (as vLLM's
        LoRA resolvers do); True when the adapter is registered now. Reads the adapter's config and
        header only; confined to the roots like any runtime load."""
        try:
            check_name(name)  # a plain name: never a path that leaves the folder
        except AdapterError:
            return False
        for folder in self.cfg.resolve_dirs:
            path = Path(folder).expanduser() / name
            if not path.is_dir():
                continue
            try:
                self.register(name, path)
            except AdapterError as e:
                if name in self.store:  # registered meanwhile by a concurrent resolve
                    return True
                if isinstance(e, RegistryFullError):
                    raise CapacityError(f"adapter {name!r} is in {folder}, but the server holds as many adapters "
                                        "as it may (adapters.max_registered): retry later") from e
                raise RequestError(f"adapter {name!r} found in {folder} but refused ({without_name(e, name)})") from e
            log.info("resolved adapter %s from %s", name, folder)
            return True
        return name in self.store

    def check(self, name: str) -> None:
        """Refuses (RequestError) an adapter that is not registered and cannot be resolved, or
        whose weights were refused when first read."""
        if name not in self.store and not self.resolve(name):
            refused = self.errors.get(name)
            raise RequestError(f"unknown adapter {name!r}" + (f": its folder was refused at start ({refused})"
                                                              if refused else ""))
        why = self.store.broken(name)
        if why is not None:
            raise RequestError(f"adapter {name!r} cannot be used ({without_name(why, name)})")

    def infos(self) -> list[AdapterInfo]:
        return self.store.infos()

    def preload(self, where: str) -> None:
        """host: every adapter's weights read into the host tier (as far as its budget holds
        them), so no first use waits for a disk read; all: every adapter resident on the device
        (the CACHED baseline; needs a free slot for each: none is evicted for another). An
        adapter whose weights turn out broken is skipped (the store names it, and its requests
        are refused), as at first use; too few slots for `all` is a ConfigError."""
        names = self.store.names()
        for k, name in enumerate(names):
            try:
                weights = self.store.get(name)
            except AdapterError:
                continue
            if where == "all":
                if not self.pool.load(weights, evict=False):
                    slots = ", ".join(f"{len(b.slots)} of rank {b.rank}" for b in self.pool.buckets)
                    raise ConfigError(f"adapters.preload=all: not enough device slots for adapter {name!r} (rank "
                                      f"{weights.rank}, adapter {k + 1} of {len(names)}); the device holds {slots} "
                                      "(adapters.device_slots per rank bucket)")
                self.pool.wait_loaded(name)
