"""A tiny random BERT saved as a user's bert-base-uncased download would be (config.json,
model.safetensors, vocab.txt, tokenizer files): the phrase encoder of the GCG recall tests."""

from pathlib import Path

WORDS = ("the", "a", "red", "blue", "green", "circle", "square", "ball", "man", "woman", "dog", "on", "left",
         "right", "of")


def save_tiny_bert(directory: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") + WORDS) + "\n")
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=5 + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    BertTokenizer(str(vocab)).save_pretrained(directory)
    return directory
