"""``fff-moe user-dir``: print the folder to pass to fairseq's ``--user-dir``."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true",
                   help="also import the plugin and list the architectures and criterion it registers")


def run(args: argparse.Namespace) -> int:
    from ..integrations.fairseq import user_dir

    print(user_dir())
    if args.check:
        from ..integrations.fairseq import require_fairseq

        require_fairseq()
        from fairseq import utils
        from fairseq.criterions import CRITERION_REGISTRY
        from fairseq.models import ARCH_MODEL_NAME_REGISTRY

        utils.import_user_module(argparse.Namespace(user_dir=user_dir()))
        from ..integrations.fairseq.architectures import ARCHITECTURES

        for name in ("transformer_lm_fff", "transformer_lm_sigma_moe", "transformer_lm_pkm", *ARCHITECTURES):
            print(f"  --arch {name}  (model {ARCH_MODEL_NAME_REGISTRY[name]})")
        print(f"  --criterion cross_entropy_fff  ({CRITERION_REGISTRY['cross_entropy_fff'].__module__})")
    return 0
