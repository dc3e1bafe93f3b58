"""python -m caraserve.ray_serve: engine replicas on Ray Serve behind one OpenAI-compatible
ingress (Hydra entry point; conf/ray_serve.yaml).

    python -m caraserve.ray_serve [model.path=DIR adapters.dir=DIR cluster.replicas=N
        router.policy=rank_aware server.host=H server.port=P ray.address=auto ...]

Starts a local Ray instance (files under ray.temp_dir), or joins one with ray.address=auto,
deploys the application and serves until SIGTERM / SIGINT, then shuts Serve down.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading

import hydra
from omegaconf import DictConfig, OmegaConf

from caraserve.cli import config_task, exit_now, run
from caraserve.ray_serve.app import app_config, check_local, deploy

log = logging.getLogger("caraserve.ray_serve")


@hydra.main(config_path="../../conf", config_name="ray_serve", version_base="1.3")
@config_task
def main(cfg: DictConfig) -> None:
    composed = OmegaConf.to_container(cfg, resolve=True)
    app_cfg = app_config(composed)  # a configuration mistake stops here, before Ray starts
    check_local(app_cfg)
    faulthandler.enable()  # a crash inside Ray's shutdown leaves the Python stacks in the log
    import ray
    from ray import serve

    stop = threading.Event()
    try:
        deploy(app_cfg)
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, whose own handlers they replace
            signal.signal(sig, lambda *_: stop.set())
        log.info("serving on http://%s:%d with %d replicas, policy %s", app_cfg.server.host, app_cfg.server.port,
                 app_cfg.replicas.replicas, app_cfg.routing.policy)
        stop.wait()
    finally:
        log.info("shutting down")
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not interrupt the shutdown
            signal.signal(sig, signal.SIG_IGN)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    status = run(main)
    # Serve and Ray are shut down: end here, without the interpreter's finalization, which can
    # abort (SIGABRT) while Ray's C++ threads are still unwinding.
    exit_now(status)
