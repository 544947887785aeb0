"""A random-init model of Qwen2-0.5B's public shape, for timing `build` and `train` on a decoder-only LM offline.

    python examples/random_qwen2_0p5b.py OUT_FOLDER [GLUE_DIR]
    read-cache build --model OUT_FOLDER --task sst2 --data-dir ../shared/glue --limit 2000 --out caches/qwen05b-sst2

No weights are downloaded (the hub is not reachable here): the shape is Qwen2-0.5B's config (hidden 896, 24 layers,
14 heads, 2 key-value heads, intermediate 4864, vocabulary 151,936, tied embeddings), the weights are random. The
tokenizer is a byte-level BPE (Qwen's kind) of 32,000 tokens trained here on SST-2's train sentences, so English
text splits into about as many tokens as under Qwen's own; its ids all fall inside the model's vocabulary.
No accuracy can come from random weights: this measures time and bytes only (docs/decoder-only.md).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

QWEN2_0P5B = dict(
    hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
    vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
)


def sst2_sentences(glue: Path) -> list[str]:
    with (glue / "SST-2" / "train.tsv").open() as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def make_tokenizer(glue: Path, folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=32000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    prompts = ["sst2 sentence: x\nanswer: negative", "sst2 sentence: x\nanswer: positive"] * 100
    core.train_from_iterator(sst2_sentences(glue) + prompts, trainer)
    # Qwen's tokenizer has no BOS and pads with <|endoftext|>, as here.
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(folder)


def main(out: Path, glue: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(glue, out)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN2_0P5B, bos_token_id=None, eos_token_id=0, pad_token_id=0)).eval()
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    model.save_pretrained(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).resolve().parents[2] / "shared" / "glue"))
