"""Tiny randomly initialised models for unit tests: no files, fixed seed, built in milliseconds.

Every builder returns an fp32 model in eval mode whose weights depend only on ``seed``; the global
torch RNG state is left as it was. The causal LMs use a 256-token byte vocabulary that
:class:`ByteTokenizer` speaks, so the text pipeline (windows, perplexity) runs end to end on them.

| builder        | architecture                                  | linear layers        |
|----------------|-----------------------------------------------|----------------------|
| tiny_llama     | LlamaForCausalLM, 2 layers, hidden 64, GQA 4/2 | nn.Linear, untied head |
| tiny_gpt2      | GPT2LMHeadModel, 2 layers, hidden 64           | transformers Conv1D (weight is (in, out)), tied head |
| tiny_opt       | OPTForCausalLM, 2 layers, hidden 64            | nn.Linear with bias, tied head |
| tiny_gemma3    | Gemma3ForCausalLM, 3 layers (sliding, sliding, global), hidden 64 | nn.Linear, tied head |
| tiny_cnn       | Conv-BN-ReLU6, depthwise + pointwise, Linear head, input 3x32x32, 10 classes | |

:func:`tiny_hf` builds a tiny random model of any family in :data:`FAMILIES` (one per transformers model class
lowbit is tested on: decoders, a mixture of experts, a state-space model, encoders, encoder-decoders for text
and speech, a vision transformer), and :func:`example_inputs` the keyword inputs its forward takes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB_SIZE = 256
HIDDEN = 64
N_LAYERS = 2
N_HEADS = 4
MAX_POSITIONS = 512
CNN_INPUT = (3, 32, 32)
CNN_CLASSES = 10


def tiny_llama(seed: int = 0) -> nn.Module:
    """LlamaForCausalLM: 2 layers, hidden 64, 4 query / 2 key-value heads, MLP 128, vocab 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS // 2,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
        bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
    )
    return _seeded(lambda: LlamaForCausalLM(config), seed)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    """GPT2LMHeadModel: 2 layers, hidden 64, 4 heads, vocab 256 (its linears are Conv1D)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=MAX_POSITIONS, n_embd=HIDDEN, n_layer=N_LAYERS,
        n_head=N_HEADS, bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
    )
    return _seeded(lambda: GPT2LMHeadModel(config), seed)


def tiny_opt(seed: int = 0) -> nn.Module:
    """OPTForCausalLM: 2 layers, hidden 64, 4 heads, FFN 128, vocab 256."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, num_hidden_layers=N_LAYERS, ffn_dim=2 * HIDDEN,
        num_attention_heads=N_HEADS, max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=HIDDEN,
        pad_token_id=0, bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
    )
    return _seeded(lambda: OPTForCausalLM(config), seed)


def tiny_gemma3(seed: int = 0) -> nn.Module:
    """Gemma3ForCausalLM: 3 layers (two sliding-window of 16 tokens, one global), hidden 64, 4/2 heads of 16,
    MLP 128, vocab 256. Its layers get different masks and rotary tables: a test of per-block arguments."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=3,
        num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS // 2, head_dim=HIDDEN // N_HEADS,
        max_position_embeddings=MAX_POSITIONS, sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        pad_token_id=0, bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
    )
    return _seeded(lambda: Gemma3ForCausalLM(config), seed)


def tiny_cnn(seed: int = 0) -> nn.Module:
    """A MobileNet-like CNN for (N, 3, 32, 32) inputs -> (N, 10) logits, with non-trivial BN stats."""

    def build() -> nn.Module:
        model = TinyCNN()
        for module in model.modules():  # random running stats so BN folding is not an identity
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.normal_(module.bias, 0.0, 0.1)
        return model

    return _seeded(build, seed)


_TEXT = {"vocab_size": VOCAB_SIZE, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_HEADS = {"num_attention_heads": N_HEADS, "num_key_value_heads": N_HEADS // 2, "head_dim": HIDDEN // N_HEADS}
_DECODER = {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": N_LAYERS,
            "max_position_embeddings": MAX_POSITIONS, **_HEADS, **_TEXT}
_ENC_DEC = {"d_model": HIDDEN, "encoder_layers": N_LAYERS, "decoder_layers": N_LAYERS,
            "encoder_attention_heads": N_HEADS, "decoder_attention_heads": N_HEADS, "encoder_ffn_dim": 2 * HIDDEN,
            "decoder_ffn_dim": 2 * HIDDEN, **_TEXT}
# family -> (transformers config class, model class, config arguments): 2 blocks per stack, width 64
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _DECODER),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**_DECODER, "sliding_window": 16}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": HIDDEN, "n_layer": N_LAYERS, "n_head": N_HEADS,
                                               "n_positions": MAX_POSITIONS, **_TEXT}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"hidden_size": HIDDEN, "num_hidden_layers": N_LAYERS,
                                            "ffn_dim": 2 * HIDDEN, "num_attention_heads": N_HEADS,
                                            "word_embed_proj_dim": HIDDEN, "max_position_embeddings": MAX_POSITIONS,
                                            **_TEXT}),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**_DECODER, "moe_intermediate_size": HIDDEN // 2,
                                                            "num_experts": 4, "num_experts_per_tok": 2}),
    "mamba": ("MambaConfig", "MambaForCausalLM", {"hidden_size": HIDDEN, "state_size": 8,
                                                  "num_hidden_layers": N_LAYERS, "expand": 2, "conv_kernel": 4,
                                                  **_TEXT}),
    "bert": ("BertConfig", "BertForMaskedLM", {"hidden_size": HIDDEN, "num_hidden_layers": N_LAYERS,
                                               "num_attention_heads": N_HEADS, "intermediate_size": 2 * HIDDEN,
                                               "max_position_embeddings": MAX_POSITIONS, **_TEXT}),
    "t5": ("T5Config", "T5ForConditionalGeneration", {"d_model": HIDDEN, "d_kv": HIDDEN // N_HEADS,
                                                      "d_ff": 2 * HIDDEN, "num_layers": N_LAYERS,
                                                      "num_heads": N_HEADS, "decoder_start_token_id": 0, **_TEXT}),
    "bart": ("BartConfig", "BartForConditionalGeneration", {**_ENC_DEC, "max_position_embeddings": MAX_POSITIONS,
                                                            "decoder_start_token_id": 2}),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration", {
        **_ENC_DEC, "num_mel_bins": 16, "max_source_positions": 16, "max_target_positions": 64,
        "decoder_start_token_id": 1, "suppress_tokens": [], "begin_suppress_tokens": []}),
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", {  # a CLIP vision tower, a projector, a Llama
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
                          "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEADS, "image_size": 32,
                          "patch_size": 8},
        "text_config": {"model_type": "llama", **_DECODER}, "image_token_id": VOCAB_SIZE - 1,
        "projector_hidden_act": "gelu", "vision_feature_layer": -1}),
    "vit": ("ViTConfig", "ViTForImageClassification", {"hidden_size": HIDDEN, "num_hidden_layers": N_LAYERS,
                                                       "num_attention_heads": N_HEADS, "intermediate_size": 2 * HIDDEN,
                                                       "image_size": 32, "patch_size": 8, "num_labels": 10}),
}


def tiny_hf(family: str, seed: int = 0) -> nn.Module:
    """A tiny random transformers model of ``family`` (a key of :data:`FAMILIES`), fp32, eval mode."""
    import transformers

    if family not in FAMILIES:
        raise KeyError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")
    config_cls, model_cls, kwargs = FAMILIES[family]
    config = getattr(transformers, config_cls)(**kwargs)
    return _seeded(lambda: getattr(transformers, model_cls)(config), seed)


# decoder families the exports cover: family -> (transformers config class, model class)
DECODERS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
            "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM")}


def tiny_decoder(family: str, seed: int = 0, **config: Any) -> nn.Module:
    """A tiny random causal LM of ``family`` (a key of :data:`DECODERS`; ``config`` overrides the tiny decoder's
    settings) whose biases and norm gains are random too: zeros and ones would hide a tensor an export drops or
    stores without its offset."""
    import transformers

    config_cls, model_cls = DECODERS[family]
    settings = {**_DECODER, **config}

    def build() -> nn.Module:
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**settings))
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.data.normal_(0, 0.1).add_(0.0 if name.endswith("bias") else 1.0)
        return model

    return _seeded(build, seed)


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs for one forward pass of a tiny model (token ids, decoder ids, mel features or pixels)."""
    config = getattr(model, "config", None)
    g = torch.Generator().manual_seed(seed)
    if config is None:  # tiny_cnn
        return {"x": torch.randn(batch, *CNN_INPUT, generator=g)}
    if getattr(config, "model_type", None) == "vit":
        return {"pixel_values": torch.randn(batch, 3, config.image_size, config.image_size, generator=g)}
    if getattr(config, "model_type", None) == "llava":  # a prompt holding one image's tokens, then text
        vision = config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        ids = torch.randint(3, VOCAB_SIZE - 1, (batch, patches + 1 + seq), generator=g)
        ids[:, 1:1 + patches] = config.image_token_id
        return {"input_ids": ids,
                "pixel_values": torch.randn(batch, 3, vision.image_size, vision.image_size, generator=g)}
    ids = torch.randint(3, VOCAB_SIZE, (batch, seq), generator=g)
    if getattr(config, "model_type", None) == "whisper":
        frames = 2 * config.max_source_positions
        return {"input_features": torch.randn(batch, config.num_mel_bins, frames, generator=g),
                "decoder_input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, VOCAB_SIZE, (batch, seq), generator=g)}
    return {"input_ids": ids}


class TinyCNN(nn.Module):
    """stem 3->16 (3x3, stride 2) -> depthwise 16 (3x3) -> pointwise 16->32 -> conv 32->32 (3x3, stride 2)
    -> global average pool -> Linear 32->10. Each conv is followed by BatchNorm2d and ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(3, 16, kernel=3, stride=2),           # (N, 16, 16, 16)
            *_conv_bn(16, 16, kernel=3, stride=1, groups=16),  # depthwise, (N, 16, 16, 16)
            *_conv_bn(16, 32, kernel=1, stride=1),          # pointwise, (N, 32, 16, 16)
            *_conv_bn(32, 32, kernel=3, stride=2),          # (N, 32, 8, 8)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, CNN_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 10)
        return self.classifier(self.pool(self.features(x)).flatten(1))


class ByteTokenizer:
    """UTF-8 byte tokenizer for the tiny LMs: token id = byte value, vocabulary 256.

    Mirrors the small part of the Hugging Face tokenizer protocol lowbit uses. ``bos_token_id`` is 1
    and ``eos_token_id`` 2 (the control bytes SOH/STX, which do not occur in ordinary text).
    """

    vocab_size = VOCAB_SIZE
    bos_token_id = 1
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = False, **_: Any) -> dict[str, list[int]]:
        ids = list(text.encode("utf-8"))
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids: Any, **_: Any) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_hf_tokenizer(image_token: bool = False) -> Any:
    """A Hugging Face fast tokenizer for the tiny transformers models (vocabulary :data:`VOCAB_SIZE`): byte-level,
    token id = byte value for bytes 5..255; ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2 (appended to every text, as T5's
    and BART's tokenizers end a source), ``<unk>`` 3 (bytes 0..4), ``<mask>`` 4. ``save_pretrained`` it next to
    a tiny model's ``config.json`` to give a folder the CLI can calibrate and evaluate on text. ``image_token``:
    id 255 is the special token ``<image>`` instead of byte 255 (the tiny LLaVA's ``image_token_id``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # the byte-level pre-tokenizer's byte -> character map: printable Latin-1 bytes stand for themselves, the
    # others for the characters from U+0100 on, in byte order
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    chars = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]
    vocab = {**{t: i for i, t in enumerate(specials)}, **{chars[b]: b for b in range(len(specials), VOCAB_SIZE)}}
    if image_token:
        del vocab[chars[VOCAB_SIZE - 1]]
        vocab["<image>"] = VOCAB_SIZE - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    if image_token:
        from tokenizers import AddedToken

        tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 2)])
    extra = {"extra_special_tokens": {"image_token": "<image>"}} if image_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>", **extra)


TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                      "<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}")


def tiny_llava_processor() -> Any:
    """A LLaVA processor for the tiny ``llava`` family: 32 x 32 CLIP-style images (16 patch tokens), the tiny
    tokenizer with ``<image>`` as token 255, and a small chat template. ``save_pretrained`` it next to the tiny
    model's ``config.json`` to give a folder the CLI can calibrate and evaluate on images with a prompt."""
    import transformers

    # the PIL image processor when transformers has it (the default one asks for torchvision)
    image_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    image_processor = image_cls(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tiny_hf_tokenizer(image_token=True),
                                       patch_size=8, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1, chat_template=TINY_CHAT_TEMPLATE,
                                       image_token="<image>")


# ---------------------------------------------------------------------------------------------
# helpers


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU6()]


def _seeded(build: Any, seed: int) -> nn.Module:
    """Run ``build()`` under ``torch.manual_seed(seed)`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.float().eval()
