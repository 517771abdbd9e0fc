"""Shared fixtures: tiny Hugging Face models built locally from configs (no hub access needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT classifier saved with the embedded model's tokenizer, as a local model directory."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lorakit.jobs.models import resolve_model

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2))


CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)  # SmolLM2-Instruct's template (ChatML) with a shorter default system turn


def chat_tokenizer():
    """A small byte-level BPE tokenizer with ChatML special tokens and chat template, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        "What is 2 plus 3? The answer is 5. #### 5",
        "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
        "You are a helpful assistant. user assistant system",
    ] * 20
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_chat_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config)


ARITHMETIC = [
    (f"What is {a} plus {b}?", f"The answer is {a + b}. #### {a + b}") for a in range(1, 7) for b in (2, 5)
]


def tiny_chat_sft(pairs=ARITHMETIC, max_length: int = 96):
    """``(tokenizer, data, base)``: question/answer pairs as chat SFT data (loss on the answers) for a tiny
    chat Llama."""
    from lorakit.data import chat
    from lorakit.data.datasets import tokenize_causal

    tokenizer = chat_tokenizer()
    examples = chat.examples_from_pairs(*zip(*pairs, strict=True))
    data = tokenize_causal(examples, tokenizer, tokenizer.chat_template, max_length)
    return tokenizer, data, tiny_chat_llama(len(tokenizer)).eval()


@pytest.fixture(scope="session")
def chat_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a ChatML tokenizer and chat template, saved as a local model directory."""
    out = tmp_path_factory.mktemp("chat-llama")
    tokenizer = chat_tokenizer()
    tiny_chat_llama(len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
