"""X-CLIP (video-language) in Flax Linen, computing transformers' `XCLIPModel`.

Video side: a CLIP ViT over each frame whose layers also exchange one *message token*
per frame (cross-frame communication), the frame embeddings fused by the multi-frame
integration transformer (MIT). Text side: the causal CLIP text transformer, pooled at
the end-of-text token. The video-specific prompt generator lets each text embedding
attend to the clip's patch features before the cosine similarity.

`XCLIP` is the two-tower model (`logits_per_video` for any texts). `Model` (the
classifier protocol of `dmd_jax.models`) turns it into a zero-shot classifier: the text
embeddings of the class prompts are computed once and stored as a variable collection
(`text`), so a clip costs only the video tower and the prompt generator; `with_classes`
re-prompts it for another dataset's class names.

Layer-norm epsilons and activations are per tower, as transformers' config has them:
the vision tower, the multi-frame transformer and the prompt generator's input norm use
`vision_config`'s; the text tower and the prompt generator's layers `text_config`'s
epsilon; the prompt generator's MLP `prompt_hidden_act`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from dmd_jax import text as text_lib
from dmd_jax.errors import ConfigValueError
from dmd_jax.models.videomae import attention

# CLIP's pixel statistics (converted checkpoints store their processor's own in model.json).
INPUT_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' activation names (ACT2FN) that these towers may use.
ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    if name not in ACTIVATIONS:
        raise ConfigValueError(f"activation {name!r} is not supported; supported: "
                               f"{sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections (CLIP's layout)."""

    num_heads: int
    bias: bool = True
    out_name: str = "out_proj"
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, q_in, kv_in=None, causal: bool = False):
        kv_in = q_in if kv_in is None else kv_in
        dim = q_in.shape[-1]
        heads = lambda t: rearrange(t, "b n (h d) -> b n h d", h=self.num_heads)
        q = heads(nn.Dense(dim, use_bias=self.bias, dtype=self.dtype, name="q_proj")(q_in))
        k = heads(nn.Dense(dim, use_bias=self.bias, dtype=self.dtype, name="k_proj")(kv_in))
        v = heads(nn.Dense(dim, use_bias=self.bias, dtype=self.dtype, name="v_proj")(kv_in))
        out = attention(q, k, v, self.impl, causal)
        return nn.Dense(dim, dtype=self.dtype, name=self.out_name)(
            rearrange(out, "b n h d -> b n (h d)"))


class MLP(nn.Module):
    hidden: int
    dtype: Any = jnp.float32
    act: str = "quick_gelu"

    @nn.compact
    def __call__(self, x):
        y = activation(self.act)(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer (text tower and MIT)."""

    num_heads: int
    mlp_dim: int
    eps: float = 1e-5
    act: str = "quick_gelu"
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, causal: bool = False):
        norm = lambda name: nn.LayerNorm(self.eps, dtype=self.dtype, name=name)
        x = x + Attention(self.num_heads, dtype=self.dtype, impl=self.impl, name="self_attn")(
            norm("layer_norm1")(x), causal=causal)
        return x + MLP(self.mlp_dim, self.dtype, self.act, name="mlp")(norm("layer_norm2")(x))


class VisionLayer(nn.Module):
    """A CLIP ViT layer plus X-CLIP's cross-frame message token."""

    num_heads: int
    mlp_dim: int
    num_frames: int
    eps: float = 1e-5
    act: str = "quick_gelu"
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):  # (batch * frames, tokens, dim)
        norm = lambda name: nn.LayerNorm(self.eps, dtype=self.dtype, name=name)
        attend = lambda name: Attention(self.num_heads, dtype=self.dtype, impl=self.impl,
                                        name=name)
        tokens = x.shape[1]
        msg = nn.Dense(x.shape[-1], dtype=self.dtype, name="message_fc")(x[:, 0])
        msg = rearrange(msg, "(b t) d -> b t d", t=self.num_frames)
        msg = msg + attend("message_attn")(norm("message_ln")(msg))
        x = jnp.concatenate([x, rearrange(msg, "b t d -> (b t) 1 d")], axis=1)
        x = x + attend("self_attn")(norm("layer_norm1")(x))
        x = x[:, :tokens]
        return x + MLP(self.mlp_dim, self.dtype, self.act, name="mlp")(norm("layer_norm2")(x))


class PromptLayer(nn.Module):
    num_heads: int
    eps: float = 1e-5
    act: str = "quick_gelu"
    dtype: Any = jnp.float32
    impl: str = "auto"

    @nn.compact
    def __call__(self, text, visual):
        norm = lambda name: nn.LayerNorm(self.eps, dtype=self.dtype, name=name)
        text = text + Attention(self.num_heads, bias=False, out_name="proj", dtype=self.dtype,
                                impl=self.impl, name="cross_attn")(norm("norm1")(text), visual)
        hidden = nn.Dense(4 * text.shape[-1], dtype=self.dtype, name="mlp_fc1")(norm("norm3")(text))
        y = activation(self.act)(hidden)
        return text + nn.Dense(text.shape[-1], dtype=self.dtype, name="mlp_fc2")(y)


class XCLIP(nn.Module):
    """The two towers: `__call__(video, input_ids) -> logits_per_video (B, K)`."""

    num_frames: int = 8
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    mit_width: int = 512
    mit_layers: int = 1
    mit_heads: int = 8
    mit_mlp: int = 2048
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp: int = 2048
    projection_dim: int = 512
    prompt_layers: int = 2
    prompt_heads: int = 8
    prompt_alpha: float = 0.1
    vision_eps: float = 1e-5  # vision tower, MIT, the prompt generator's input norm
    text_eps: float = 1e-5  # text tower, the prompt generator's layers
    vision_act: str = "quick_gelu"  # vision tower and MIT
    text_act: str = "quick_gelu"
    prompt_act: str = "quick_gelu"
    dtype: Any = jnp.float32  # runtime setting
    attention_impl: str = "auto"  # runtime setting

    def setup(self):
        dt, impl, v_eps, t_eps = self.dtype, self.attention_impl, self.vision_eps, self.text_eps
        self.class_embedding = self.param("class_embedding", nn.initializers.normal(0.02),
                                          (self.vision_width,))
        self.patch_embedding = nn.Conv(self.vision_width, (self.patch_size, self.patch_size),
                                       strides=self.patch_size, padding="VALID", use_bias=False,
                                       dtype=dt)
        self.position_embedding = self.param(
            "position_embedding", nn.initializers.normal(0.02),
            ((self.image_size // self.patch_size) ** 2 + 1, self.vision_width))
        self.pre_layernorm = nn.LayerNorm(v_eps, dtype=dt)
        self.vision = [VisionLayer(self.vision_heads, self.vision_mlp, self.num_frames, v_eps,
                                   self.vision_act, dt, impl)
                       for _ in range(self.vision_layers)]
        self.post_layernorm = nn.LayerNorm(v_eps, dtype=dt)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=dt)
        self.mit_position_embedding = self.param(
            "mit_position_embedding", nn.initializers.normal(0.02), (self.num_frames, self.mit_width))
        self.mit = [EncoderLayer(self.mit_heads, self.mit_mlp, v_eps, self.vision_act, dt, impl)
                    for _ in range(self.mit_layers)]
        self.prompts_visual_layernorm = nn.LayerNorm(v_eps, dtype=dt)
        self.prompts_visual_projection = self.param(
            "prompts_visual_projection", nn.initializers.normal(0.02),
            (self.vision_width, self.projection_dim))
        self.token_embedding = nn.Embed(self.vocab_size, self.text_width, dtype=dt)
        self.text_position_embedding = self.param(
            "text_position_embedding", nn.initializers.normal(0.01),
            (self.context_length, self.text_width))
        self.text = [EncoderLayer(self.text_heads, self.text_mlp, t_eps, self.text_act, dt, impl)
                     for _ in range(self.text_layers)]
        self.final_layer_norm = nn.LayerNorm(t_eps, dtype=dt)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=dt)
        self.prompt_layernorm = nn.LayerNorm(v_eps, dtype=dt)
        self.prompt = [PromptLayer(self.prompt_heads, t_eps, self.prompt_act, dt, impl)
                       for _ in range(self.prompt_layers)]
        self.prompt_alpha_param = self.param(
            "prompt_alpha", lambda _, shape: jnp.full(shape, self.prompt_alpha), (self.projection_dim,))
        self.logit_scale = self.param("logit_scale", lambda _: jnp.asarray(2.6592))

    def encode_video(self, video: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Normalised clips `(B, T, H, W, 3)` -> (video embedding `(B, P)`, patch features
        averaged over frames `(B, N, P)`, which the prompt generator reads)."""
        b = video.shape[0]
        x = self.patch_embedding(rearrange(video.astype(self.dtype), "b t h w c -> (b t) h w c"))
        x = rearrange(x, "bt h w d -> bt (h w) d")
        cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embedding.astype(x.dtype)
        x = self.pre_layernorm(x)
        for layer in self.vision:
            x = layer(x)
        frames = self.visual_projection(self.post_layernorm(x[:, 0]))
        frames = rearrange(frames, "(b t) p -> b t p", b=b)
        fused = frames + self.mit_position_embedding.astype(frames.dtype)
        for layer in self.mit:
            fused = layer(fused)
        video_embeds = (fused + frames).mean(axis=1)
        patches = self.prompts_visual_layernorm(x[:, 1:]) @ self.prompts_visual_projection.astype(x.dtype)
        patches = rearrange(patches, "(b t) n p -> b t n p", b=b).mean(axis=1)
        return video_embeds, patches

    def encode_text(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        """Token ids `(K, L)` -> projected text embeddings `(K, P)` (before the prompts)."""
        x = self.token_embedding(input_ids)
        x = x + self.text_position_embedding[: input_ids.shape[1]].astype(x.dtype)
        for layer in self.text:
            x = layer(x, causal=True)
        x = self.final_layer_norm(x)
        # Pool at the end-of-text token: the largest id in CLIP's vocabulary.
        pooled = jnp.take_along_axis(x, jnp.argmax(input_ids, axis=-1)[:, None, None], axis=1)[:, 0]
        return self.text_projection(pooled)

    def similarity(self, video_embeds, patches, text_embeds) -> jnp.ndarray:
        """`logits_per_video (B, K)`: prompt-adapted text vs video, cosine x exp(scale)."""
        text = jnp.broadcast_to(text_embeds, (video_embeds.shape[0], *text_embeds.shape))
        visual = self.prompt_layernorm(patches)
        prompt = text
        for layer in self.prompt:
            prompt = layer(prompt, visual)
        text = text + self.prompt_alpha_param.astype(text.dtype) * prompt
        video = video_embeds / jnp.linalg.norm(video_embeds, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        return jnp.exp(self.logit_scale) * jnp.einsum("bd,bkd->bk", video, text).astype(jnp.float32)

    def __call__(self, video: jnp.ndarray, input_ids: jnp.ndarray) -> jnp.ndarray:
        video_embeds, patches = self.encode_video(video)
        return self.similarity(video_embeds, patches, self.encode_text(input_ids))


class Model(XCLIP):
    """Zero-shot classifier: `(logits over the classes, video embedding)` per clip.

    The class prompts' text embeddings live in the `text` collection (`embeds`,
    `(num_classes, P)`), computed once by `class_text_embeddings`; the text tower's
    parameters stay, so `with_classes` can prompt for other classes later.
    """

    num_classes: int = 0
    prompt_template: str = "a video of {}."

    def setup(self):
        super().setup()
        # The text tower alone (encode_text, to prompt new classes) runs without them.
        if self.is_initializing() or self.has_variable("text", "embeds"):
            self.embeds = self.variable("text", "embeds", jnp.zeros,
                                        (self.num_classes, self.projection_dim), jnp.float32)

    def __call__(self, video: jnp.ndarray, train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
        del train
        embeds = self.embeds
        if self.is_initializing():  # create the text tower's parameters too
            self.encode_text(jnp.zeros((1, self.context_length), jnp.int32))
        video_embeds, patches = self.encode_video(video)
        logits = self.similarity(video_embeds, patches, embeds.value)
        return logits, video_embeds.astype(jnp.float32)


def class_text_embeddings(model: XCLIP, params, tokenizer, class_names: tuple[str, ...],
                          template: str) -> jnp.ndarray:
    """The projected text embedding of each class's prompt, computed once (the text
    tower's parameters are an argument of the compiled function, not constants)."""
    ids = text_lib.tokenize(tokenizer, text_lib.prompts(class_names, template),
                            model.context_length)
    encode = jax.jit(lambda p, i: model.apply({"params": p}, i, method=XCLIP.encode_text))
    return encode(params, ids)


def with_classes(model, class_names: tuple[str, ...], directory: str):
    """The zero-shot `model` (a `model_store.LoadedModel` of this module) answering over
    `class_names`: their prompts encoded by its text tower, with the tokenizer kept in its
    model directory."""
    tokenizer = text_lib.load_tokenizer(directory)
    embeds = class_text_embeddings(model.module, model.variables["params"], tokenizer,
                                   class_names, model.module.prompt_template)
    module = model.module.clone(num_classes=len(class_names))
    variables = {**model.variables, "text": {"embeds": embeds}}
    return dataclasses.replace(model, module=module, variables=variables,
                               class_names=tuple(class_names))

