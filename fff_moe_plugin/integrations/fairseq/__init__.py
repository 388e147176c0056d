"""fairseq integration: ``--arch transformer_lm_fff`` / ``transformer_lm_sigma_moe`` / ``transformer_lm_pkm``,
the parameter-equal preset architectures, and the criterion ``cross_entropy_fff``.

Pass :func:`user_dir` to fairseq's ``--user-dir`` (``fff-moe user-dir`` prints it). Importing this package
does not import fairseq; ``models``, ``architectures`` and ``criterion`` do (``pip install
fff-moe-plugin[fairseq]``).
"""

from __future__ import annotations

from pathlib import Path

USER_DIR_NAME = "fff_moe_fairseq"


def user_dir() -> str:
    """Path of the folder to give fairseq's ``--user-dir``."""
    return str(Path(__file__).resolve().parent / "fairseq_user_dir" / USER_DIR_NAME)


def require_fairseq() -> None:
    """Raise an ImportError saying how to install fairseq when it is missing."""
    try:
        import fairseq  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the fairseq integration needs fairseq: pip install 'fff-moe-plugin[fairseq]' "
            "(fairseq-fixed==0.12.3.1 on Python >= 3.11)"
        ) from e
