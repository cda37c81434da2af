"""The losses of the paper, each one short pure function (blip_facts §2.5, §3)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def lm_loss(logits, ids, mask, *, label_smoothing: float = 0.1, prompt_length: int = 0,
            reduction: str = "mean"):
  """Causal LM loss of the image-grounded decoder (official BertLMHeadModel).

  logits[:, t] predicts ids[:, t+1]; padding (mask 0) and the first `prompt_length` tokens are not
  targets; [SEP] is. Cross-entropy with label smoothing as torch: (1-e)*nll + e*mean_v(-log p_v).
  reduction 'mean': over all target tokens of the batch; 'none': summed per sequence [B].
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = ids[:, 1:]
  valid = mask[:, 1:].astype(bool) & (jnp.arange(1, ids.shape[1]) >= prompt_length)[None]
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  smooth = -logp.mean(axis=-1)
  tok = ((1.0 - label_smoothing) * nll + label_smoothing * smooth) * valid
  if reduction == "none":
    return tok.sum(axis=1)
  return tok.sum() / jnp.maximum(valid.sum(), 1)
