"""The built-in tiny model: a 2-layer Llama with random weights and a tokenizer made locally.

It lets the whole pipeline (4-bit load, LoRA, merge, registry) run offline on a CPU in minutes.
Building is deterministic: the same seed gives the same weights and the same tokenizer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# Each turn ends with EOS, so EOS closes every assistant reply and is learned.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOS + "\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# A fixed corpus so the tokenizer never depends on the user's data.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A model learns patterns from data.
Fine-tuning adapts a pretrained language model to a task with a small dataset.
Low-rank adapters train two small matrices per layer while the base weights stay frozen.
Quantization stores weights in four bits; computation runs in bfloat16 or float32.
### Instruction: ### Input: ### Response: Question: Answer: user assistant system
What is the capital of France? The capital of France is Paris.
Translate to French: good morning -> bonjour. Summarize the text in one sentence.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Colors: red green blue yellow black white.
def add(a, b): return a + b  # Python code, lists [1, 2, 3] and dicts {"k": "v"}.
"""

TINY_SHAPE = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def build_tiny_tokenizer(vocab_size: int = TINY_SHAPE["vocab_size"]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a fixed corpus, with BOS/EOS/PAD and a chat template."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK, "<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.strip().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=TINY_SHAPE["max_position_embeddings"],
        padding_side="right",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama sized for CPU tests (hidden 64, 4 heads)."""
    config = LlamaConfig(
        **{**TINY_SHAPE, "vocab_size": len(tokenizer)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    return model


def ensure_tiny_model(cache_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny model into cache_dir/tiny-llama once (safetensors) and return its path."""
    target = Path(cache_dir) / "tiny-llama"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        tokenizer = build_tiny_tokenizer()
        build_tiny_model(tokenizer, seed=seed).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent build finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
