"""Train the three eFFF variants at one (leaf width, depth) on Fashion-MNIST or MNIST and print the result.

The whole grid of the paper, with tables and plots, is ``fff-moe repro-efff``; this script shows the same
protocol through the Python API: a validation split carved from the training set for every choice, the
test set opened once per run after selection, accuracies with hard routing.

    python examples/image_classification/efff_one_setting.py --dataset fashion-mnist --leaf-width 1 --depth 4
"""

from __future__ import annotations

import argparse

import torch

from fff_moe_plugin.experiments.efff import (
    VARIANTS,
    Schedule,
    SealedTestSet,
    Setting,
    load_dataset,
    run_one,
    split_for_selection,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    p.add_argument("--data-dir", default=None, help="directory with the IDX files (defaults: see the README)")
    p.add_argument("--leaf-width", type=int, default=1)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase1-epochs", type=int, default=5)
    p.add_argument("--phase2-epochs", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(1)
    dataset = load_dataset(args.dataset, args.data_dir)
    schedule = Schedule(phase1_epochs=args.phase1_epochs, phase2_epochs=args.phase2_epochs)
    selection, _ = split_for_selection(dataset, schedule.val_fraction, schedule.split_seed)
    print(f"{dataset.label}: {len(selection.fit_y)} fit / {len(selection.val_y)} validation / "
          f"{len(dataset.test_y)} test images")
    print(f"{'variant':10s} {'train (hard)':>12s} {'test':>7s} {'soft train':>10s} {'leaves used':>11s}")
    for variant in VARIANTS:
        test = SealedTestSet(dataset.test_x, dataset.test_y)  # each run opens its own sealed copy once
        r = run_one(variant, Setting(args.leaf_width, args.depth), args.seed, selection, test, schedule)
        print(f"{variant:10s} {r['train_acc_hard']:12.4f} {r['test_acc']:7.4f} {r['train_acc_soft']:10.4f} "
              f"{r['leaves_used_train']:>8d}/{r['leaves']}")


if __name__ == "__main__":
    main()
