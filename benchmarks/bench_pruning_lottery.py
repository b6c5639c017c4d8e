"""Lottery ticket with rewinding on Fashion-MNIST (LeNet-300-100): the rewound ticket at 80-90% sparsity against
the dense network and against a random re-initialisation of the same mask.

Run: .venv/bin/python benchmarks/bench_pruning_lottery.py [--quick] [--seeds 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from netshrink.data import fashion_mnist
from netshrink.sparsity.lottery import LotteryTicket, find_ticket


def lenet_300_100() -> nn.Module:
    """The fully connected network of Frankle & Carbin's MNIST experiments."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                         nn.Linear(100, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10k training images, short runs, one seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(1)  # training a small MLP: one thread avoids oversubscription on a shared CPU
    train = fashion_mnist("train", n=10000 if args.quick else None)
    test = fashion_mnist("test")
    seeds = 1 if args.quick else args.seeds
    config = dict(target_sparsity=args.sparsity, rounds=3 if args.quick else 5, rewind_step=100 if args.quick else 250,
                  train_steps=600 if args.quick else 4000, batch_size=128, lr=1.2e-3)
    results = []
    for seed in range(seeds):
        t0 = time.time()
        r = find_ticket(lenet_300_100, train, test, LotteryTicket(seed=seed, **config))
        results.append(r)
        print(f"\nseed {seed} ({time.time() - t0:.0f} s)\n{r.markdown()}")
    dense = [r.dense_accuracy for r in results]
    ticket = [r.ticket_accuracy for r in results]
    reinit = [r.random_reinit_accuracy for r in results]
    mean = statistics.mean
    print(f"\n## Lottery ticket, Fashion-MNIST, LeNet-300-100, {args.sparsity:.0%} sparsity, {seeds} seed(s)\n")
    print(f"config: {config}\n")
    print("| network | mean test accuracy | per seed |")
    print("|---|---|---|")
    for name, vals in (("dense", dense), ("ticket (IMP + rewind)", ticket), ("same mask, random re-init", reinit)):
        print(f"| {name} | {mean(vals):.4f} | {', '.join(f'{v:.4f}' for v in vals)} |")
    print(f"\nticket - dense: {100 * (mean(ticket) - mean(dense)):+.2f} points; "
          f"random re-init - ticket: {100 * (mean(reinit) - mean(ticket)):+.2f} points")


if __name__ == "__main__":
    main()
