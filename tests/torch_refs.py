"""Test-side knowledge of the PyTorch checkpoint layouts, written independently of asvd.ckpt.

Parity tests build original-Wan / Self-Forcing files by renaming real diffusers / transformers
state dicts with these tables (taken from Wan2.1's module layout: wan/modules/model.py and
wan/modules/t5.py), so a wrong mapping in asvd cannot hide behind a shared table.
"""

import re

# A tiny diffusers WanTransformer3DModel.
TINY_DIT = dict(
  patch_size=(1, 2, 2),
  num_attention_heads=2,
  attention_head_dim=16,
  in_channels=16,
  out_channels=16,
  text_dim=32,
  freq_dim=32,
  ffn_dim=64,
  num_layers=3,
  cross_attn_norm=True,
  qk_norm="rms_norm_across_heads",
  eps=1e-6,
)

# diffusers DiT key -> original Wan key (regex, replacement), applied in order.
DIT_DIFFUSERS_TO_WAN = [
  (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
  (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
  (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
  (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
  (r"^condition_embedder\.time_proj\.", "time_projection.1."),
  (r"^scale_shift_table$", "head.modulation"),
  (r"^proj_out\.", "head.head."),
  (r"\.scale_shift_table$", ".modulation"),
  (r"\.attn1\.", ".self_attn."),
  (r"\.attn2\.", ".cross_attn."),
  (r"\.to_q\.", ".q."),
  (r"\.to_k\.", ".k."),
  (r"\.to_v\.", ".v."),
  (r"\.to_out\.0\.", ".o."),
  (r"\.norm2\.", ".norm3."),
  (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
  (r"\.ffn\.net\.2\.", ".ffn.2."),
]


def dit_to_wan_names(sd):
  """A diffusers DiT state dict under original-Wan key names (same tensors)."""
  out = {}
  for k, v in sd.items():
    for pat, rep in DIT_DIFFUSERS_TO_WAN:
      k = re.sub(pat, rep, k)
    out[k] = v
  return out


# transformers umT5 (layer j, rest of key) -> Wan T5 block key.
_T5_LAYER = {
  ("0", "layer_norm.weight"): "norm1.weight",
  ("0", "SelfAttention.q.weight"): "attn.q.weight",
  ("0", "SelfAttention.k.weight"): "attn.k.weight",
  ("0", "SelfAttention.v.weight"): "attn.v.weight",
  ("0", "SelfAttention.o.weight"): "attn.o.weight",
  ("0", "SelfAttention.relative_attention_bias.weight"): "pos_embedding.embedding.weight",
  ("1", "layer_norm.weight"): "norm2.weight",
  ("1", "DenseReluDense.wi_0.weight"): "ffn.gate.0.weight",
  ("1", "DenseReluDense.wi_1.weight"): "ffn.fc1.weight",
  ("1", "DenseReluDense.wo.weight"): "ffn.fc2.weight",
}


def t5_to_wan_names(hf_state):
  """A transformers umT5 encoder state dict under Wan's T5Encoder key names."""
  out = {}
  for key, t in hf_state.items():
    if key == "shared.weight":
      out["token_embedding.weight"] = t
    elif key == "encoder.final_layer_norm.weight":
      out["norm.weight"] = t
    elif key.startswith("encoder.block."):
      parts = key.split(".")  # encoder.block.{i}.layer.{j}.<rest>
      out[f"blocks.{parts[2]}.{_T5_LAYER[(parts[4], '.'.join(parts[5:]))]}"] = t
  return out


def pad_text(ctx, text_len):
  """Wan's prompt encoding: zero rows up to text_len (512 for Wan); the DiT attends them too."""
  import numpy as np  # noqa: PLC0415

  return np.pad(ctx, ((0, 0), (0, text_len - ctx.shape[1]), (0, 0)))
