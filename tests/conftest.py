import os
import sys
from pathlib import Path

# One OpenMP thread (the C kernels' and torch's) unless the caller chose: read when the OpenMP
# runtime loads, so before torch. Tests that race a CPU worker against an emulated copy assume
# the step's kernels do not take the worker's core (`pytest` alone gets what CI sets).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels run interpreted on CPU. The switch is read as `@triton.jit` decorates, triton's
    # own library functions (tl.sum's combine) included: set before anything imports triton, which
    # torch may do on its own (tests/triton_interpret.py re-imports our kernel modules, not triton's).
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
pytest_plugins = ("adapter_cases", "host_tier_cases", "pool_cases")  # fixtures shared by test files
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    """Every test session builds the embedded default in its own cache unless one is given."""
    if "CARASERVE_CACHE" not in os.environ:
        os.environ["CARASERVE_CACHE"] = str(tmp_path_factory.mktemp("caraserve-cache"))


@pytest.fixture(scope="module")
def fn():
    """The CPU LoRA kernel's entry point (the C library built for this machine)."""
    from caraserve import kernel_library

    f = kernel_library.kernel()
    if f is None:
        pytest.fail("the CPU LoRA kernel did not build (is a C compiler installed?)")
    return f


@pytest.fixture(params=[1, 2])
def threads(request):
    """Intra-op threads: with 2 the kernels share a call's work out over an OpenMP team."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)
