"""The Ray Serve entry points' configuration, without starting Ray: the command line's one-line
errors, the Serve config file's application, the KubeRay example's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

from caraserve.ray_serve.app import app_builder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, needle", [("router.policy=nope", "router.policy='nope' is not a routing policy"),
                                              ("cluster.replicas=0", "cluster.replicas=0 must be >= 1"),
                                              ("ray.temp_dir=/tmp/" + "x" * 60, "ray.temp_dir")])
def test_bad_settings_are_one_line_and_exit_2_before_ray_starts(override, needle):
    r = subprocess.run([sys.executable, "-m", "caraserve.ray_serve", override], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("path", ["conf/ray/serve_config.yaml", "deploy/rayservice.yaml"])
def test_serve_config_files_build_the_application(path):
    doc = yaml.safe_load((ROOT / path).read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"]) if "spec" in doc else doc
    (app,) = serve_cfg["applications"]
    module, _, name = app["import_path"].partition(":")
    assert (module, name) == ("caraserve.ray_serve.app", "app_builder")
    built = app_builder(app["args"])
    assert type(built).__name__ == "Application"
