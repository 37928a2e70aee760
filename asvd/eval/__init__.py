"""Evaluation tools: attention-share probe plots (the paper's motivation figure)."""

from asvd.eval.attention import attention_shares, plot_attention_shares

__all__ = ["attention_shares", "plot_attention_shares"]
