"""A character-level tokenizer in the standard HF format for the embedded model (`tokenizer.json`).

Printable ASCII plus newline, and the special tokens a masked-diffusion LM needs: EOS (`<|endoftext|>`, also the
answer padding, as in LLaDA's SFT), mask (`<|mdm_mask|>`), pad and unk. Character level keeps every digit its own
token, which is what makes arithmetic learnable for a small model.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS, MASK, PAD, UNK = "<|endoftext|>", "<|mdm_mask|>", "<|pad|>", "<unk>"
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Build the tokenizer; ids are stable: characters first, then EOS, mask, pad, unk."""
    vocab = {token: i for i, token in enumerate(CHARS + [EOS, MASK, PAD, UNK])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, mask_token=MASK, pad_token=PAD, unk_token=UNK
    )
