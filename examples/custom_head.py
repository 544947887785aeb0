"""A head of your own on READ's cache: a plain PyTorch loop over `read_cache.CacheDataset` (docs/your-own-loop.md).

    python examples/custom_head.py CACHE_FOLDER --epochs 3 --workers 2

The cache is whatever `read-cache build` wrote (e.g. `read-cache build --model t5-small --task sst2`). The
backbone is never loaded: each batch holds the frozen states of its examples' tokens, and this head mean-pools
the last encoder layer per example and puts a two-layer MLP on top. Prints each epoch's loss and validation
score (the task's GLUE metric); `main` returns the last.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import read_cache
from read_cache import CacheDataset
from read_cache.tasks.metrics import score
from read_cache.tasks.specs import TaskSpec, get_task


class MeanPoolHead(nn.Module):
    """The last encoder layer's token states, averaged per example, through a small MLP."""

    def __init__(self, d_model: int, n_out: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, n_out))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = batch["enc"][:, -1]  # [T_b, d]: every real token of the batch (no padding), last encoder layer
        example = batch["token_example"]  # [T_b]: the row in the batch each token belongs to
        n = len(batch["rows"])
        sums = torch.zeros(n, tokens.shape[1]).index_add_(0, example, tokens)
        counts = torch.bincount(example, minlength=n).clamp(min=1).unsqueeze(1)
        return self.mlp(sums / counts)


def loss_of(task: TaskSpec, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if task.is_regression:
        return nn.functional.mse_loss(outputs.squeeze(-1), labels.float())
    return nn.functional.cross_entropy(outputs, labels.long())


@torch.no_grad()
def validate(head: MeanPoolHead, task: TaskSpec, loader: DataLoader) -> dict[str, Any]:
    head.eval()
    outputs, labels = [], []
    for batch in loader:
        outputs.append(head(batch))
        labels.append(batch["label"])
    joined = torch.cat(outputs)
    predictions = joined.squeeze(-1) if task.is_regression else joined.argmax(-1)
    return score(task, predictions.numpy(), torch.cat(labels).numpy())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: read in this process)")
    args = parser.parse_args(argv)

    cache = read_cache.open_cache(args.cache)
    task = get_task(cache.task)
    torch.manual_seed(0)
    head = MeanPoolHead(cache.geometry.d_model, 1 if task.is_regression else task.num_labels)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr)

    # batch_size=None: the dataset already yields whole batches (as the reader cuts them), the loader only moves them.
    train = CacheDataset(args.cache, split="train", batch_size=args.batch_size, shuffle=True, seed=0)
    train_loader = DataLoader(train, batch_size=None, num_workers=args.workers)
    validation_loader = DataLoader(CacheDataset(args.cache, split="validation", batch_size=args.batch_size, shuffle=False), batch_size=None)
    result: dict[str, Any] = {}
    for epoch in range(args.epochs):
        train.set_epoch(epoch)  # a new shuffle each epoch, the same for the same seed
        head.train()
        total, seen = 0.0, 0
        for batch in train_loader:
            # Under torchrun a rank whose share ran out repeats a batch with weight 0 (the ranks stay in step).
            loss = loss_of(task, head(batch), batch["label"]) * batch.get("weight", 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(batch["rows"]), seen + len(batch["rows"])
        result = {"epoch": epoch + 1, "loss": total / max(seen, 1), "validation": validate(head, task, validation_loader)}
        print(f"epoch {result['epoch']}: loss {result['loss']:.4f}, validation {result['validation']['metric']} {result['validation']['score']:.4f}", flush=True)
    return result


if __name__ == "__main__":
    main()
