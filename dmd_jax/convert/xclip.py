"""transformers `XCLIPModel` -> `models.xclip.XCLIP` (inside the zero-shot classifier).

Every size, epsilon and activation is read from the checkpoint's `config.json`
(`text_config`, `vision_config`, the prompt generator's settings); a field the
converter does not understand is refused by name (`hf_config`). The Flax tree may sit
under `xclip/` (older exports) or at the top (`models.xclip.Model`): the rules accept both.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from dmd_jax.convert.hf_config import HFConfig
from dmd_jax.convert.mapping import ConversionError, Rule, conv, dense, layer_norm
from dmd_jax.convert.videomae import square_size
from dmd_jax.models.xclip import ACTIVATIONS

_ = r"(?:xclip/)?"  # optional prefix; non-capturing, so layer numbers stay group 1
_V, _VS = rf"{_}vision_(\d+)", r"vision_model.encoder.layers.\1"
_M, _MS = rf"{_}mit_(\d+)", r"mit.encoder.layers.\1"
_T, _TS = rf"{_}text_(\d+)", r"text_model.encoder.layers.\1"
_P, _PS = rf"{_}prompt_(\d+)", r"prompts_generator.decoder.\1"


def _transformer_layer(flax: str, torch: str) -> tuple[Rule, ...]:
    return (*layer_norm(rf"{flax}/layer_norm([12])", rf"{torch}.layer_norm\2"),
            *dense(rf"{flax}/self_attn/([qkv]|out)_proj", rf"{torch}.self_attn.\2_proj"),
            *dense(rf"{flax}/mlp/fc([12])", rf"{torch}.mlp.fc\2"))


RULES: tuple[Rule, ...] = (
    Rule(rf"params/{_}class_embedding", "vision_model.embeddings.class_embedding"),
    Rule(rf"params/{_}patch_embedding/kernel", "vision_model.embeddings.patch_embedding.weight",
         conv),
    Rule(rf"params/{_}position_embedding", "vision_model.embeddings.position_embedding.weight"),
    *layer_norm(rf"{_}pre_layernorm", "vision_model.pre_layernorm"),
    *_transformer_layer(_V, _VS),
    *dense(rf"{_V}/message_fc", rf"{_VS}.message_fc"),
    *layer_norm(rf"{_V}/message_ln", rf"{_VS}.message_ln"),
    *dense(rf"{_V}/message_attn/([qkv]|out)_proj", rf"{_VS}.message_attn.\2_proj"),
    *layer_norm(rf"{_}post_layernorm", "vision_model.post_layernorm"),
    *dense(rf"{_}visual_projection", "visual_projection", bias=False),
    Rule(rf"params/{_}mit_position_embedding", "mit.position_embedding", lambda x: x[0]),
    *_transformer_layer(_M, _MS),
    *layer_norm(rf"{_}prompts_visual_layernorm", "prompts_visual_layernorm"),
    Rule(rf"params/{_}prompts_visual_projection", "prompts_visual_projection"),
    Rule(rf"params/{_}token_embedding/embedding", "text_model.embeddings.token_embedding.weight"),
    Rule(rf"params/{_}text_position_embedding", "text_model.embeddings.position_embedding.weight"),
    *_transformer_layer(_T, _TS),
    *layer_norm(rf"{_}final_layer_norm", "text_model.final_layer_norm"),
    *dense(rf"{_}text_projection", "text_projection", bias=False),
    *layer_norm(rf"{_}prompt_layernorm", "prompts_generator.layernorm"),
    *layer_norm(rf"{_P}/norm([13])", rf"{_PS}.norm\2"),
    *dense(rf"{_P}/cross_attn/([qkv])_proj", rf"{_PS}.cross_attn.\2_proj", bias=False),
    *dense(rf"{_P}/cross_attn/proj", rf"{_PS}.cross_attn.proj"),
    *dense(rf"{_P}/mlp_fc1", rf"{_PS}.mlp.0"),
    *dense(rf"{_P}/mlp_fc2", rf"{_PS}.mlp.3"),
    Rule(rf"params/{_}prompt_alpha", "prompts_generator.alpha"),
    Rule(rf"params/{_}logit_scale", "logit_scale"),
)
IGNORE = (r".*position_ids",)  # index buffers some checkpoints carry
USES_CONFIG = True
_TRAINING_ONLY = ("attention_dropout", "dropout", "drop_path_rate", "initializer_range",
                  "initializer_factor")


def model_config(state_dict: dict[str, np.ndarray],
                 hf: HFConfig | None) -> tuple[ml_collections.ConfigDict, None, tuple[int, int]]:
    """`(config.model, None, (frames, size))` of the zero-shot classifier (its classes come
    from the user); every config.json field honoured, known irrelevant, or refused."""
    del state_dict
    if hf is None:
        raise ConversionError("an X-CLIP checkpoint needs its config.json next to the weights "
                              "(or pass the checkpoint folder as --src)")
    acts = tuple(ACTIVATIONS)
    text, vision = hf.sub("text_config"), hf.sub("vision_config")
    hf.ignore("logit_scale_init_value",  # the trained logit_scale is a tensor
              "prompt_attention_dropout", "prompt_projection_dropout", *_TRAINING_ONLY)
    for legacy in ("text_config_dict", "vision_config_dict"):
        hf.ignore_if(legacy, None)
    for tower in (text, vision):
        tower.ignore(*_TRAINING_ONLY, "projection_dim")  # the model's, read from the top
    vision.choice("num_channels", (3,), 3)
    size = square_size(vision, "image_size", 224)
    fields = dict(
        num_frames=vision.get("num_frames", 8), image_size=size,
        patch_size=vision.get("patch_size", 32), vision_width=vision.get("hidden_size", 768),
        vision_layers=vision.get("num_hidden_layers", 12),
        vision_heads=vision.get("num_attention_heads", 12),
        vision_mlp=vision.get("intermediate_size", 3072),
        mit_width=vision.get("mit_hidden_size", 512),
        mit_layers=vision.get("mit_num_hidden_layers", 1),
        mit_heads=vision.get("mit_num_attention_heads", 8),
        mit_mlp=vision.get("mit_intermediate_size", 2048),
        vocab_size=text.get("vocab_size", 49408),
        context_length=text.get("max_position_embeddings", 77),
        text_width=text.get("hidden_size", 512), text_layers=text.get("num_hidden_layers", 12),
        text_heads=text.get("num_attention_heads", 8), text_mlp=text.get("intermediate_size", 2048),
        projection_dim=hf.get("projection_dim", 512),
        prompt_layers=hf.get("prompt_layers", 2),
        prompt_heads=hf.get("prompt_num_attention_heads", 8),
        prompt_alpha=hf.get("prompt_alpha", 0.1),
        vision_eps=float(vision.get("layer_norm_eps", 1e-5)),
        text_eps=float(text.get("layer_norm_eps", 1e-5)),
        vision_act=vision.choice("hidden_act", acts, "quick_gelu"),
        text_act=text.choice("hidden_act", acts, "quick_gelu"),
        prompt_act=hf.choice("prompt_hidden_act", acts, "quick_gelu"))
    # The text tower pools at the largest token id (transformers forces this legacy rule
    # for X-CLIP whatever eos_token_id says), so the token ids are bookkeeping here.
    text.ignore("bos_token_id", "eos_token_id", "pad_token_id")
    config = ml_collections.ConfigDict(dict(name="xclip", prompt_template="a video of {}.",
                                            **fields))
    return config, None, (int(fields["num_frames"]), size)
