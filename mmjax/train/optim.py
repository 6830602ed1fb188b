"""Optimizer and schedule: AdamW with warmup + cosine (or constant), global-norm clipping, a weight-decay mask.

Only trainable parameters ever reach the optimizer (frozen ones are split off before
``optax.init``), so frozen parameters hold no optimizer state at all.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import optax


def warmup_cosine(lr: float, total_steps: int, warmup_ratio: float = 0.03, warmup_steps: int | None = None,
                  min_lr_ratio: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 then cosine decay to ``min_lr_ratio * lr`` (HF ``cosine`` semantics:
    warmup = ceil(ratio * total))."""
    total_steps = max(int(total_steps), 1)
    if warmup_steps is None:
        warmup_steps = math.ceil(warmup_ratio * total_steps)
    warmup_steps = min(int(warmup_steps), total_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / jnp.maximum(warmup_steps, 1)
        progress = (step - warmup_steps) / jnp.maximum(total_steps - warmup_steps, 1)
        progress = jnp.clip(progress, 0.0, 1.0)
        cos = lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule


def warmup_constant(lr: float, total_steps: int, warmup_ratio: float = 0.0, warmup_steps: int | None = None
                    ) -> optax.Schedule:
    """Linear warmup from 0 (``ceil(ratio * total)`` steps, HF ``constant_with_warmup``), then ``lr``."""
    if warmup_steps is None:
        warmup_steps = math.ceil(warmup_ratio * max(int(total_steps), 1))
    warmup_steps = int(warmup_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return jnp.where(step < warmup_steps, lr * step / max(warmup_steps, 1), jnp.asarray(lr, jnp.float32))

    return schedule


SCHEDULES = ("cosine", "constant")


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
    """``cfg.schedule``: ``cosine`` (warmup, then cosine to ``min_lr_ratio * lr``) or ``constant``
    (warmup, then ``lr``); warmup from ``warmup_ratio`` or ``warmup_steps``."""
    name = cfg.get("schedule", "cosine")
    if name == "cosine":
        return warmup_cosine(cfg.lr, total_steps, cfg.warmup_ratio, cfg.get("warmup_steps", None),
                             cfg.get("min_lr_ratio", 0.0))
    if name == "constant":
        return warmup_constant(cfg.lr, total_steps, cfg.warmup_ratio, cfg.get("warmup_steps", None))
    raise ValueError(f"optim.schedule={name!r}: choose one of {SCHEDULES}")


def decay_mask(params, no_decay_patterns: tuple[str, ...] = ()):
    """True where weight decay applies. Upstream (DeepSpeed-owned AdamW) decays every trainable
    parameter, so the default pattern list is empty; patterns are regexes over '/'-joined paths."""
    compiled = [re.compile(p) for p in no_decay_patterns]

    def f(path, _):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        return not any(c.search(name) for c in compiled)

    return jax.tree_util.tree_map_with_path(f, params)


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``cfg`` is the config's ``optim`` block: lr, schedule, weight_decay, b1, b2, eps, clip_norm,
    warmup_ratio, min_lr_ratio, no_decay (tuple of regexes)."""
    schedule = make_schedule(cfg, total_steps)
    no_decay = tuple(cfg.get("no_decay", ()))
    chain = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=(lambda p: decay_mask(p, no_decay)) if no_decay else None))
    return optax.chain(*chain), schedule
