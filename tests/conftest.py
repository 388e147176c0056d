import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def lm_data_bin(tmp_path_factory):
    """A fairseq data-bin of the toy language (tests/helpers.py), word level: 1500 / 100 / 100 sentences."""
    from helpers import lm_text

    from fff_moe_plugin.experiments.lm.data_bin import make_data_bin

    out = tmp_path_factory.mktemp("lm")
    return make_data_bin({"train": lm_text(1500, 0), "valid": lm_text(100, 1), "test": lm_text(100, 2)}, out)


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    """The device a test builds its tensors and modules on: "cpu", and "cuda" where a CUDA device exists (the
    cuda case skips itself elsewhere; ``pytest -k cuda`` selects the cuda cases on a GPU machine)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False); benchmarks/gpu_check.sh runs the "
                    "cuda cases on a GPU machine")
    return request.param


# DeepSpeed's CPU accelerator all-reduces through shared-memory files (/dev/shm/deepspeed_allreduce_buffer_*, 67 MB
# per rank) that it never unlinks, so every multi-rank DeepSpeed test would leave them behind in RAM (sglang PR
# 38638 records the same leak filling /dev/shm). The files this session created are removed when it ends.
_SHM = "/dev/shm"
_SHM_PREFIX = "deepspeed_allreduce_buffer_"


def _shm_buffers() -> set[str]:
    import os

    try:
        return {n for n in os.listdir(_SHM) if n.startswith(_SHM_PREFIX)}
    except OSError:  # no /dev/shm (not Linux)
        return set()


def pytest_sessionstart(session):
    session.config._fff_moe_shm_before = _shm_buffers()


def pytest_sessionfinish(session, exitstatus):
    import os

    for name in _shm_buffers() - getattr(session.config, "_fff_moe_shm_before", set()):
        try:
            os.unlink(os.path.join(_SHM, name))
        except OSError:
            pass
