"""Model and tokenizer: the offline tiny model, and loading from a path or a hub id.

The tiny model is a real `LlamaForCausalLM` built from a config, with a real
`PreTrainedTokenizerFast` over characters, so every code path (chat template, generate,
save_pretrained/from_pretrained, vLLM) is the one a Qwen model takes on a GPU.

Why Llama and not Qwen2 for the tiny model: transformers 5.x maps `model_type: qwen2` to
Qwen2Tokenizer on load and silently drops the spaces/newlines of a custom tokenizer.

The Qwen path offline (`--model qwen2-tiny:random`, `--model qwen2.5-0.5b:random`): a Qwen2
with random weights and Qwen2.5's real tokenizer, built in common/qwen_offline.py.
"""

import os
import string
import sys

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from common.cli import arg_error
from common.qwen_offline import QWEN_SHAPES, build_qwen_model, build_qwen_tokenizer

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


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
"""What `from_pretrained` reads weights from: one file, or the index of a sharded checkpoint."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""Any of these makes a folder worth handing to AutoTokenizer (a saved run folder has the first two)."""


def check_model_folder(name: str, hint: str = ""):
    """Exit with one line unless the local folder `name` holds a model: config.json, weights, a tokenizer.

    Without this, `--model common` (a folder, but no model) ends in a transformers ValueError
    that says to install sentencepiece, which would not help.
    """
    path = os.path.expanduser(name)
    files = set(os.listdir(path))
    missing = [what for what, present in (
        ("config.json", "config.json" in files),
        ("model.safetensors or pytorch_model.bin", bool(files & set(WEIGHT_FILES))),
        ("tokenizer files", bool(files & set(TOKENIZER_FILES))),
    ) if not present]
    if not missing:
        return
    checkpoint, parent = os.path.join(name, "checkpoint"), os.path.dirname(os.path.normpath(name))
    if os.path.isfile(os.path.join(os.path.expanduser(checkpoint), "config.json")):  # stopped before its final save
        hint = f"Its last checkpoint holds one: pass --model {checkpoint}."
    elif "adapter_config.json" in files and os.path.isfile(os.path.join(os.path.expanduser(parent), "config.json")):
        hint = f"It holds LoRA adapters only: pass --model {parent} (the merged weights beside them)."
    elif not hint:
        hint = "Train one with `python sft.py` (it writes runs/sft), or pass a hub id or qwen2-tiny:random."
    what = "holds no model" if len(missing) == 3 else f"holds no complete model (no {', no '.join(missing)})"
    arg_error("model", f"{name} {what}; expected config.json, model.safetensors or pytorch_model.bin, and "
                       f"tokenizer.json. {hint}")


def load_model_and_tokenizer(name: str, device: torch.device, dtype: torch.dtype, hint: str = ""):
    """Load a causal LM and its tokenizer from a local folder, a hub id, or build one (QWEN_SHAPES).

    A missing local folder, a folder that holds no model, or an unreachable hub exits with one
    line that says what to do (`hint`; for runs/sft, the RL scripts' default, "run `python
    sft.py` first"), not a stack trace from deep inside transformers.
    """
    if name == "runs/sft" and not hint:
        hint = "Run `python sft.py` first (it writes runs/sft), or pass --model PATH."
    if name in QWEN_SHAPES:  # offline Qwen2: real tokenizer, random weights of a known shape
        tokenizer = build_qwen_tokenizer()
        return build_qwen_model(name, tokenizer, device).to(dtype=dtype), tokenizer
    if looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        sys.exit(f"error: --model {name}: no such folder. {hint}".rstrip())
    if os.path.isdir(os.path.expanduser(name)):
        check_model_folder(name, hint)
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


def trainable_parameters(model) -> list:
    """The parameters the optimizer updates: all of them, or only the LoRA adapters under --lora-rank."""
    return [p for p in model.parameters() if p.requires_grad]


def load_policy(args, device: torch.device, dtype: torch.dtype):
    """The model an RL script trains: --model loaded, with LoRA adapters when --lora-rank > 0 (only they
    train; the frozen reference is then the base with them off), in train mode. Returns (model,
    tokenizer, eos_ids)."""
    model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    if args.lora_rank:
        model = add_lora(model, args.lora_rank, args.lora_alpha)
    model.train()
    return model, tokenizer, eos_token_ids(model, tokenizer)


def frozen_reference(model, name: str, device: torch.device, dtype: torch.dtype):
    """pi_ref, the starting policy, frozen: a second copy loaded from `name`, or under LoRA the policy's
    base with its adapters disabled (the same tensors: a model's worth of memory saved)."""
    if hasattr(model, "disable_adapter"):
        return AdaptersOff(model)
    ref_model, _ = load_model_and_tokenizer(name, device, dtype)
    return ref_model.eval().requires_grad_(False)
