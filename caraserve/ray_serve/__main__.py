"""python -m caraserve.ray_serve: engine replicas on Ray Serve behind one OpenAI-compatible
ingress (Hydra entry point; conf/ray_serve.yaml).

    python -m caraserve.ray_serve [model.path=DIR adapters.dir=DIR cluster.replicas=N
        router.policy=rank_aware server.host=H server.port=P ray.address=auto ...]

Starts a local Ray instance (files under ray.temp_dir), or joins one with ray.address=auto,
deploys the application and serves until SIGTERM / SIGINT, then drains (new calls get 503 while
running ones finish, for at most server.drain_timeout_s) and shuts Serve down.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading

import hydra
from omegaconf import DictConfig, OmegaConf

from caraserve.cli import config_task, exit_now, listen, run
from caraserve.ray_serve.app import app_config, check_local, deploy, start_ray

log = logging.getLogger("caraserve.ray_serve")


@hydra.main(config_path="../../conf", config_name="ray_serve", version_base="1.3")
@config_task
def main(cfg: DictConfig) -> None:
    composed = OmegaConf.to_container(cfg, resolve=True)
    app_cfg = app_config(composed)  # a configuration mistake stops here, before Ray starts
    check_local(app_cfg)
    if not app_cfg.ray.address:  # Serve's proxy binds the port on this machine: one line now if it cannot
        listen(app_cfg.server).close()
    faulthandler.enable()  # a crash inside Ray's shutdown leaves the Python stacks in the log
    import ray
    from ray import serve

    stop, deployed = threading.Event(), threading.Event()

    def on_signal(*_):
        stop.set()
        if not deployed.is_set():  # a long deploy (compiling) is cut short; what runs already drains
            raise KeyboardInterrupt

    start_ray(app_cfg.ray)  # (an address it cannot join is a one-line error: nothing to shut down yet)
    try:
        # After ray.init, whose own handlers they replace, and before the application is deployed:
        # the ingress may answer while serve.run is still returning, and a signal then must drain
        # too (Ray's own handler would end the process and, with it, a local instance).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        try:
            deploy(app_cfg)
        except KeyboardInterrupt:  # on_signal during the deploy
            log.info("stopped while deploying")
        else:
            deployed.set()
            log.info("serving on http://%s:%d with %d replicas, policy %s", app_cfg.server.host,
                     app_cfg.server.port, app_cfg.replicas.replicas, app_cfg.routing.policy)
        stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not interrupt the shutdown
            signal.signal(sig, signal.SIG_IGN)
        drain(app_cfg)
        log.info("shutting down")
        serve.shutdown()
        ray.shutdown()


def drain(app_cfg) -> None:
    """As the plain server does on SIGTERM: new calls are refused (503) while those being answered
    finish, for at most server.drain_timeout_s, before Serve stops the replicas under them."""
    from ray import serve

    timeout = app_cfg.server.drain_timeout_s
    try:
        handle = serve.get_app_handle(app_cfg.ray.app_name)
        left = handle.drain.remote(timeout).result(timeout_s=timeout + 10)
    except Exception as e:  # (not deployed yet, or the ingress is gone: nothing to wait for)
        log.warning("draining the ingress failed (%s): shutting down at once", type(e).__name__)
        return
    if left:
        log.warning("drain timed out (server.drain_timeout_s=%s) with %d calls still running", timeout, left)
    else:
        log.info("drained")


if __name__ == "__main__":
    status = run(main)
    # Serve and Ray are shut down: end here, without the interpreter's finalization, which can
    # abort (SIGABRT) while Ray's C++ threads are still unwinding.
    exit_now(status)
