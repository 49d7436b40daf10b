"""Model and tokenizer: the offline tiny model, and loading from a path or a hub id.

The tiny model is a real `LlamaForCausalLM` built from a config, with a real
`PreTrainedTokenizerFast` over characters, so every code path (chat template, generate,
save_pretrained/from_pretrained, vLLM) is the one a Qwen model takes on a GPU.

Why Llama and not Qwen2 for the tiny model: transformers 5.x maps `model_type: qwen2` to
Qwen2Tokenizer on load and silently drops the spaces/newlines of a custom tokenizer.
"""

import os
import string
import sys

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

TINY = "tiny"
"""The `--model` value that builds a fresh tiny model and tokenizer offline."""

PAD, BOS, IM_START, IM_END, UNK = "<|endoftext|>", "<|bos|>", "<|im_start|>", "<|im_end|>", "<unk>"

# ChatML, as Qwen writes it; the assistant turn ends with <|im_end|>, which is also the EOS.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per printable ASCII character, plus specials.

    >>> tok = build_char_tokenizer(); tok.decode(tok("12 + 3\\n")["input_ids"])
    '12 + 3\\n'
    """
    specials = [PAD, BOS, IM_START, IM_END, UNK]
    chars = list(string.printable)  # digits, letters, punctuation, whitespace
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token; specials are matched first as added tokens.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters back without inserting spaces
    # Special tokens are handled by the tokenizer as whole units, never split into characters.
    tok.add_special_tokens(specials)
    # Role names as single (non-special) tokens: the chat template costs 13 tokens for a
    # 2-digit sum instead of 24, and training is ~1.7x faster at equal content.
    tok.add_tokens(["system", "user", "assistant"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=IM_END,
        unk_token=UNK,
        padding_side="left",  # generation appends on the right, so prompts are left-padded
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )


def build_tiny_model(tokenizer, hidden_size=128, num_layers=2, num_heads=4, seed=0):
    """A ~0.5M-parameter Llama with tied embeddings: ~30k tok/s training on 2 CPU cores."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def pick_device(device: str) -> torch.device:
    """`auto` -> cuda if available, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> bf16 on a GPU that supports it, fp32 otherwise (CPU bf16 is slow and lossy)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def looks_like_path(name: str) -> bool:
    """A hub id is `org/name`; it is a local path if it exists, starts with `.`, `/`, `~`, has
    another number of slashes, or its first part is a local folder or `runs` (our run folders):
    `runs/sft` before `python sft.py` must say "no such folder", not query the hub."""
    first = name.split("/")[0]
    return (name.startswith((".", "/", "~")) or name.count("/") != 1 or os.path.exists(name)
            or first == "runs" or os.path.isdir(first))


def load_model_and_tokenizer(name: str, device: torch.device, dtype: torch.dtype, hint: str = ""):
    """Load a causal LM and its tokenizer from a local folder or a hub id.

    A missing local folder or an unreachable hub exits with one line that says what to do
    (`hint`, e.g. "run `python sft.py` first"), not a stack trace from deep inside transformers.
    """
    if looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        sys.exit(f"error: --model {name}: no such folder. {hint}".rstrip())
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except OSError as e:  # not found on the hub, or no network
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"error: --model {name}: could not load ({first}). {hint}".rstrip())
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # e.g. Llama-style hub tokenizers
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's (Qwen has two)."""
    ids = {tokenizer.eos_token_id}
    gen = model.generation_config.eos_token_id
    ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return sorted(i for i in ids if i is not None)
