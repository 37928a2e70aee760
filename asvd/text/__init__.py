"""Text conditioning: the umT5 tokenizer and prompt encoding for the DiT."""

from asvd.text.tokenizer import UMT5Tokenizer, clean_prompt, encode_prompts, load_tokenizer

__all__ = ["UMT5Tokenizer", "clean_prompt", "encode_prompts", "load_tokenizer"]
