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
