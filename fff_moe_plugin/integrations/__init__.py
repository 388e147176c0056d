"""Adapters that bring the package's blocks into training frameworks (DeepSpeed, fairseq, Tutel).

Each sub-package imports its framework lazily and, when it is missing, raises an ImportError that says how
to install it. The core package imports none of them.
"""
