"""transformers `XCLIPModel` -> `models.xclip.XCLIP` (inside the zero-shot classifier).

Every size is read from the checkpoint's `config.json` (`text_config`, `vision_config`,
the prompt generator's settings). The Flax tree may sit under `xclip/` (inside
`XCLIPZeroShot`) or at the top (the bare two-tower model): the rules accept both.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from dmd_jax.convert.mapping import ConversionError, Rule, conv, dense, layer_norm

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
INPUT_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # CLIP


def xclip_config(hf_config: dict[str, Any] | None) -> dict[str, Any]:
    """The `XCLIP` module's fields from a transformers config.json (its defaults elsewhere)."""
    if not hf_config:
        raise ConversionError("an X-CLIP checkpoint needs its config.json next to the weights "
                              "(or pass the checkpoint folder as --src)")
    text, vision = hf_config.get("text_config", {}), hf_config.get("vision_config", {})
    for tower, cfg in (("text", text), ("vision", vision)):
        if cfg.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ConversionError(f"{tower} hidden_act {cfg['hidden_act']!r} is not supported")
    return dict(
        num_frames=vision.get("num_frames", 8), image_size=vision.get("image_size", 224),
        patch_size=vision.get("patch_size", 32), vision_width=vision.get("hidden_size", 768),
        vision_layers=vision.get("num_hidden_layers", 12),
        vision_heads=vision.get("num_attention_heads", 12),
        vision_mlp=vision.get("intermediate_size", 3072),
        mit_width=vision.get("mit_hidden_size", 512), mit_layers=vision.get("mit_num_hidden_layers", 1),
        mit_heads=vision.get("mit_num_attention_heads", 8),
        mit_mlp=vision.get("mit_intermediate_size", 2048),
        vocab_size=text.get("vocab_size", 49408),
        context_length=text.get("max_position_embeddings", 77),
        text_width=text.get("hidden_size", 512), text_layers=text.get("num_hidden_layers", 12),
        text_heads=text.get("num_attention_heads", 8), text_mlp=text.get("intermediate_size", 2048),
        projection_dim=hf_config.get("projection_dim", 512),
        prompt_layers=hf_config.get("prompt_layers", 2),
        prompt_heads=hf_config.get("prompt_num_attention_heads", 8),
        prompt_alpha=hf_config.get("prompt_alpha", 0.1),
        eps=vision.get("layer_norm_eps", 1e-5))


def model_config(state_dict: dict[str, np.ndarray],
                 hf_config: dict[str, Any] | None) -> tuple[ml_collections.ConfigDict, None]:
    """`config.model` of the zero-shot classifier; its classes come from the user."""
    del state_dict
    return ml_collections.ConfigDict(dict(name="xclip", prompt_template="a video of {}.",
                                          dtype="float32", **xclip_config(hf_config))), None
