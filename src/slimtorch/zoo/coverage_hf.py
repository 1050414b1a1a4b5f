"""Hugging Face ``transformers`` models for the coverage list, built from tiny configs (no hub).

Hidden size 32-64, 2 layers, vocabulary ``VOCAB``, sequences of ``SEQ`` tokens; the audio encoders
read 16 mel bins × 64 frames (Whisper) or 1 600 raw samples (Wav2Vec2). Each entry names the
output tensor compared (``last_hidden_state`` of encoders, ``logits`` of causal LMs).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .coverage_base import IMAGE, SEQ, VOCAB, Arch, seeded

HIDDEN, LAYERS, HEADS = 64, 2, 4


def tokens(seed: int, n: int) -> dict[str, Tensor]:
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def hf_images(seed: int, n: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, IMAGE // 2, IMAGE // 2, generator=g)}


def mel(seed: int, n: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(n, 16, 64, generator=g)}  # [N, mel bins, frames]


def waveform(seed: int, n: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_values": torch.randn(n, 1600, generator=g)}  # [N, samples]


def _hidden(out: Any) -> Tensor:
    return out.last_hidden_state


def _lm_logits(out: Any) -> Tensor:
    return out.logits


def hf_arch(name: str, kind: str, make: Callable[[Any], nn.Module], batch, output=_hidden
            ) -> Arch:
    def build():
        import transformers
        return make(transformers)
    return Arch(f"hf/{name}", "transformers", kind, seeded(build, batch), batch, output)


def _bert(t):
    return t.BertModel(t.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, intermediate_size=4 * HIDDEN,
                                    max_position_embeddings=64))


def _roberta(t):
    return t.RobertaModel(t.RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=4 * HIDDEN, max_position_embeddings=64))


def _distilbert(t):
    return t.DistilBertModel(t.DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS,
                                                n_heads=HEADS, hidden_dim=4 * HIDDEN,
                                                max_position_embeddings=64))


def _gpt2(t):
    return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                                          n_head=HEADS, n_positions=64))


def _llama(t):
    return t.LlamaForCausalLM(t.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=3 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
        max_position_embeddings=64))


def _t5_encoder(t):
    return t.T5EncoderModel(t.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS,
                                       d_ff=4 * HIDDEN, num_layers=LAYERS, num_heads=HEADS))


def _vit(t):
    return t.ViTModel(t.ViTConfig(image_size=IMAGE // 2, patch_size=8, hidden_size=HIDDEN,
                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=4 * HIDDEN), add_pooling_layer=False)


def _whisper_encoder(t):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    return WhisperEncoder(t.WhisperConfig(
        d_model=HIDDEN, encoder_layers=LAYERS, encoder_attention_heads=HEADS,
        encoder_ffn_dim=4 * HIDDEN, num_mel_bins=16, max_source_positions=32))


def _wav2vec2(t):
    return t.Wav2Vec2Model(t.Wav2Vec2Config(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=4 * HIDDEN, conv_dim=(32, 32, 32), conv_stride=(5, 2, 2),
        conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0))


HF_ARCHS = [
    hf_arch("bert", "text", _bert, tokens),
    hf_arch("roberta", "text", _roberta, tokens),
    hf_arch("distilbert", "text", _distilbert, tokens),
    hf_arch("gpt2", "text", _gpt2, tokens, _lm_logits),
    hf_arch("llama", "text", _llama, tokens, _lm_logits),
    hf_arch("t5_encoder", "text", _t5_encoder, tokens),
    hf_arch("vit", "vit", _vit, hf_images),
    hf_arch("whisper_encoder", "audio", _whisper_encoder, mel),
    hf_arch("wav2vec2", "audio", _wav2vec2, waveform),
]
