"""Holds only the ``--user-dir`` folder: fairseq puts this directory on ``sys.path``, so nothing else may
live here (a module beside the folder would become importable under a top-level name)."""
