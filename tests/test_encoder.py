"""The BERT encoder: pooling and padding behaviour on a tiny model, MiniLM parity with sentence-transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.checkpoints import load_model, resolve
from lmstack.config import from_name
from lmstack.models import build_model
from lmstack.models.encoder import Encoder, encode_texts, tokenize_batch

torch.set_num_threads(2)


def tiny(**overrides) -> Encoder:
    torch.manual_seed(0)
    return build_model(from_name("tiny-bert", **overrides)).eval()


def test_padding_does_not_change_embeddings() -> None:
    model = tiny()
    short = torch.tensor([[2, 17, 33, 3]])  # [1, 4]
    long = torch.tensor([[2, 40, 41, 42, 43, 44, 3]])  # [1, 7]
    batch = torch.zeros(2, 7, dtype=torch.long)  # [2, 7], pad id 0
    batch[0, :4], batch[1] = short[0], long[0]
    mask = (torch.arange(7) < torch.tensor([[4], [7]])).long()  # [2, 7]
    with torch.no_grad():
        together = model.embed(batch, mask)
        alone = torch.cat([model.embed(short, torch.ones_like(short)), model.embed(long, torch.ones_like(long))])
    torch.testing.assert_close(together, alone)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(2))


def test_pool_modes() -> None:
    hidden = torch.randn(2, 5, 8)  # [B, T, C]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    torch.testing.assert_close(Encoder.pool(hidden, mask, "cls"), hidden[:, 0])
    mean = Encoder.pool(hidden, mask, "mean")
    torch.testing.assert_close(mean[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(mean[1], hidden[1].mean(0))
    with pytest.raises(ValueError, match="unknown pooling mode"):
        Encoder.pool(hidden, mask, "max")


def test_mlm_head_is_tied_and_optional() -> None:
    model = tiny()
    hidden = torch.randn(3, 64)  # [N, C]: the objective passes only masked positions
    assert model.mlm_logits(hidden).shape == (3, 256)
    expected = model.mlm_norm(F.gelu(model.mlm_dense(hidden))) @ model.tok_emb.weight.t() + model.mlm_bias
    torch.testing.assert_close(model.mlm_logits(hidden), expected)
    bare = tiny(mlm_head=False)
    assert bare.num_params() == model.num_params() - (64 * 64 + 64 + 2 * 64 + 256)
    assert not any(k.startswith("mlm_") for k in bare.state_dict())
    with pytest.raises(RuntimeError, match="no MLM head"):
        bare.mlm_logits(hidden)


SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "Sentence embeddings map text to vectors so that similar meanings land close together.",
    "Paris is the capital of France.",
    "What is the capital city of France?",
    "I love pizza!",
    "Pizza is my favourite food, especially with mushrooms, olives and a lot of cheese.",
    "Café, naïve, résumé: accents are stripped or kept depending on the normalizer.",
    "GPU",
    "A",
    "Numbers like 3.14159 and 2,718 and dates such as 2024-06-01 split into several word pieces.",
    "Transformers use self-attention; BERT is bidirectional, GPT-2 is causal.",
    "日本語のテキストも処理できます。",
    "Emoji 🙂 and symbols ∑ ∫ √ are rare in the vocabulary.",
    "   leading and trailing spaces   ",
    "UPPERCASE TEXT IS LOWERCASED BY THE UNCASED MODEL",
    "The mitochondria is the powerhouse of the cell.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "How do I reset my password if I no longer have access to my email account?",
    "Retrieval-augmented generation finds relevant passages and gives them to the language model as context.",
    "short",
    "def f(x): return x ** 2  # code is text too",
    # Longer than sentence-transformers' max_seq_length (256): both sides must truncate the same way.
    " ".join(f"word{i} is followed by another word" for i in range(60)),
]


@pytest.mark.slow
def test_minilm_matches_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    loaded = load_model("minilm-l6", dtype="float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert loaded.config.pooling == "mean" and loaded.config.normalize_embeddings
    assert loaded.config.embed_max_len == 256 and not loaded.config.mlm_head and loaded.config.cls_pooler
    st = SentenceTransformer(str(resolve("minilm-l6")), device="cpu")
    assert st.max_seq_length == loaded.config.embed_max_len

    # Our tokenizer (the folder's tokenizer.json) adds [CLS] ... [SEP] through its post-processor.
    assert tokenizer.encode("Hello world.") == [101, 7592, 2088, 1012, 102]
    assert tokenizer.encode("Hello world.") == st.tokenizer("Hello world.")["input_ids"]
    # Padded, truncated batches: the same ids and masks as sentence-transformers' own tokenization.
    expected = st.tokenize(SENTENCES)
    input_ids, attention_mask = tokenize_batch(tokenizer, SENTENCES, 256, loaded.config.pad_token_id)
    torch.testing.assert_close(input_ids, expected["input_ids"])
    torch.testing.assert_close(attention_mask, expected["attention_mask"])
    assert input_ids.shape[1] == 256 and input_ids[-1, -1] == 102  # the long text is cut before its [SEP]

    ours = encode_texts(model, tokenizer, SENTENCES, batch_size=8)  # [N, 384], batches of mixed lengths
    ref = st.encode(SENTENCES, batch_size=8, convert_to_tensor=True, normalize_embeddings=True)
    assert ours.shape == (len(SENTENCES), 384)
    cosine = (ours * ref).sum(-1)  # both are unit vectors
    assert cosine.min().item() >= 0.9999, cosine
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
