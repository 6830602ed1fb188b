"""One optimizer step: micro-batches scanned for gradient accumulation, the loss normalized by the
global loss weight (supervised-token count, or InternVL's sample / square weights), a
non-finite guard, and AdamW. Pure function of (state, frozen params, batch); jitted once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmjax.data.batch import IMAGE_TOKEN_KEYS, ROW_KEYS
from mmjax.train import loss as loss_lib
from mmjax.train.state import TrainState


def language_model(model):
    return getattr(model, "language_model", model)


def model_hidden(model, batch: dict, rng: jax.Array | None, train: bool):
    """Final-normed decoder hidden states (B, T, H) for a batch, plus a flag that is True when
    the number of image-context tokens does not match the real tiles (never silently trained on)."""
    lm = language_model(model)
    image_mask = None
    if lm is model:
        embeds = lm.embed(batch["input_ids"])
        mismatch = jnp.zeros((), bool)
    elif IMAGE_TOKEN_KEYS[0] in batch:   # XComposer2: image tokens placed by position (no count to mismatch)
        embeds, image_mask = model.embed_multimodal(batch["input_ids"], batch["pixel_values"], batch["image_token"],
                                                    batch["image_tile"], check=False)
        mismatch = jnp.zeros((), bool)
    else:   # tiles in the batch layout of mmjax.data.batch: (rows * tiles per row, H, W, 3)
        embeds, mismatch = model.embed_multimodal(
            batch["input_ids"], batch["pixel_values"], batch["image_flags"],
            deterministic=not train, rngs=rng if train else None, check=False)
    hidden, _ = lm.decode_embeds(embeds, batch["segment_ids"], batch["positions"], image_mask=image_mask)
    return hidden, mismatch


def micro_loss(model, micro: dict, rng, chunk_size: int, train: bool = True):
    """(sum of w * CE, sum of w, correct supervised tokens, mismatch flag) for one micro-batch."""
    hidden, mismatch = model_hidden(model, micro, rng, train)
    targets, weights = loss_lib.shift_targets(micro["labels"], micro["loss_weights"], micro["segment_ids"])
    lm = language_model(model)
    head, transposed = lm.output_head()
    lsum, wsum, correct = loss_lib.chunked_cross_entropy(
        hidden.astype(lm.dtype), head, targets, weights, chunk_size, transpose_head=transposed)
    return lsum, wsum, correct, mismatch


def split_micro(batch: dict, grad_accum: int) -> dict:
    """Every ``ROW_KEYS`` array (B rows, or B * K tiles) -> (grad_accum, its share, ...).

    Micro-batch m takes the rows m, m + grad_accum, m + 2 * grad_accum, ... (with their tiles):
    rows are sharded over devices in contiguous blocks, so each device holds an equal part of
    every micro-batch and the split needs no communication."""
    rows = batch["input_ids"].shape[0]
    out = {}
    for k, v in batch.items():
        if k in ROW_KEYS or k in IMAGE_TOKEN_KEYS:
            per_row = v.shape[0] // rows
            x = v.reshape((rows // grad_accum, grad_accum, per_row) + v.shape[1:])
            x = jnp.moveaxis(x, 1, 0)
            out[k] = x.reshape((grad_accum, rows // grad_accum * per_row) + v.shape[1:])
    return out


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    grad_accum: int, chunk_size: int, update_mask=None, lora_dropout: bool = False) -> Callable:
    """``step(state, frozen, rest, batch) -> (state, metrics)`` on a batch in the layout of
    ``mmjax.data.batch``."""

    def step(state: TrainState, frozen, rest, batch):
        micro = split_micro(batch, grad_accum)
        rng, step_rng = jax.random.split(state.rng)

        # the normalizer is the whole global batch's weight, known before any forward pass
        _, w_all = loss_lib.shift_targets(batch["labels"], batch["loss_weights"], batch["segment_ids"])
        total_w = jnp.maximum(jnp.sum(w_all), 1e-9)

        def one(params, mb, r):
            def f(p):
                # copy: LoRA dropout writes its key into `rest`, which belongs to the outer trace
                model = nnx.merge(graphdef, p, frozen, rest, copy=True)
                if lora_dropout:
                    from mmjax.models.lora import set_lora_dropout_key
                    set_lora_dropout_key(model, jax.random.fold_in(r, 1))
                lsum, wsum, correct, mismatch = micro_loss(model, mb, r, chunk_size, train=True)
                return lsum / total_w, (lsum, correct, mismatch)
            (_, aux), g = jax.value_and_grad(f, has_aux=True)(params)
            return g, aux

        def body(carry, xs):
            g_acc, lsum_acc, corr_acc, mm_acc = carry
            mb, r = xs
            g, (lsum, correct, mismatch) = one(state.params, mb, r)
            g_acc = jax.tree.map(jnp.add, g_acc, g)
            return (g_acc, lsum_acc + lsum, corr_acc + correct, mm_acc | mismatch), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        rngs = jax.random.split(step_rng, grad_accum)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.zeros((), bool))
        (grads, loss_sum, correct, mismatch), _ = jax.lax.scan(body, init, (micro, rngs))

        loss = loss_sum / total_w
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~mismatch
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        if update_mask is not None:
            updates = jax.tree.map(lambda u, m: u if m is None else u * m, updates, update_mask,
                                   is_leaf=lambda x: x is None)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(ok, new, old)
        streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
        new_state = TrainState(
            step=state.step + 1,
            params=jax.tree.map(keep, new_params, state.params),
            opt_state=jax.tree.map(keep, new_opt, state.opt_state),
            rng=rng,
            nonfinite_streak=streak,
            nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32),
        )
        supervised = jnp.sum(w_all > 0)
        metrics = {
            "train/loss": loss,
            "train/grad_norm": grad_norm,
            # skipped steps do not advance the optimizer's schedule count
            "train/lr": schedule(state.step - state.nonfinite_total),
            "train/token_accuracy": correct / jnp.maximum(supervised, 1),
            "train/supervised_tokens": supervised,
            "train/real_tokens": jnp.sum(batch["segment_ids"] > 0),
            "train/tiles": jnp.sum(batch["image_flags"]) if "image_flags" in batch else jnp.zeros((), jnp.int32),
            "train/skipped": (~ok).astype(jnp.int32),
            "train/nonfinite_streak": streak,
            "train/image_token_mismatch": mismatch.astype(jnp.int32),
        }
        return new_state, metrics

    return step


def init_state(params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed), nonfinite_streak=jnp.zeros((), jnp.int32),
                      nonfinite_total=jnp.zeros((), jnp.int32))
