"""Byte-level text from the Python standard library's own source files, and a short
language-model training loop on it: shared by the language-model benchmarks (nothing is
downloaded; every Python ships these files)."""

from __future__ import annotations

import math
import sysconfig
import time
from pathlib import Path

import torch


def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """The standard library's top-level ``.py`` files as bytes: (training, held out), every
    tenth file (sorted by name) held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10 != 9)
    held_out = b"".join(f.read_bytes() for i, f in enumerate(files) if i % 10 == 9)
    as_tensor = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train), as_tensor(held_out)


def windows(
    data: torch.Tensor, count: int, generator: torch.Generator, context: int
) -> torch.Tensor:
    """``count`` random windows of ``context`` bytes, ``[count, context]``."""
    starts = torch.randint(0, len(data) - context, (count,), generator=generator)
    return torch.stack([data[s : s + context] for s in starts.tolist()])


def train_lm(
    model: torch.nn.Module,
    data: torch.Tensor,
    steps: int,
    batch_size: int,
    context: int,
    peak_lr: float,
    warmup_steps: int,
    log_every: int = 100,
) -> None:
    """AdamW on next-byte cross-entropy: a linear warm-up, then a cosine decay over ``steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        warmup = min(1.0, (step + 1) / warmup_steps)
        lr = peak_lr * warmup * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = windows(data, batch_size, generator, context)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % log_every == 0:
            elapsed = time.perf_counter() - start
            print(f"  step {step + 1:5d}  {elapsed:6.0f} s  loss {loss.item():.3f} nats/byte")
    model.eval()
