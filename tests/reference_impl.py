"""Straightforward re-derivations of the official computations, independent of llm2clip_hf. Tests compare the
package against these.

What is official and what remains a re-derivation (issue 33 item 2). llm2vec 0.2.3 itself runs here (a separate
environment: transformers 4.44.2, peft 0.12.0), so its ``LLM2Vec.from_pretrained`` + ``encode`` now give committed
fixtures (tests/fixtures/llm2vec_official, scripts/parity/make_llm2vec_fixtures.py, tests/test_llm2vec_official.py),
which also check ``llm2vec_prepare_for_tokenization`` and ``llm2vec_cut_text`` below against the official strings.
The ``llm2vec_*`` functions stay because tests/test_llm2vec_adapters.py and tests/test_text_model.py use them for what
those fixtures do not cover (LLM2CLIP's fork: ``extra_model_name_or_path``, ``doc_max_length`` 512; free
``text_template``; ``adapter_model.bin``; the tiny_llm tokenizers); ``llm2vec_load`` makes every architecture
bidirectional, unlike llm2vec 0.2.3, whose ``Qwen2BiModel`` stays causal under transformers 4.44. The fork
(microsoft/LLM2CLIP ``llm2clip/llm2vec``) imports in the same environment but has not been run for fixtures yet.
Everything else here remains a re-derivation because the official code cannot run on this machine: microsoft/LLM2CLIP's
``llm2clip/eva_clip`` (EVA02 / rope / ``TextProj`` / ``CustomCLIP`` / OpenAI-CLIP ``VisionTransformer``) imports timm
at module level (``eva_vit_model.py``, ``transformer.py``, ``timm_model.py``) and torchvision (``utils.py``:
``torchvision.ops.misc.FrozenBatchNorm2d``), and timm (for the SigLIP tower) imports torchvision too; the only
torchvision for torch 2.13 is PyPI's 0.28.0, a CUDA build whose ``_C.so`` needs ``libtorch_cuda.so``,
``libc10_cuda.so`` and ``libcudart.so.13`` (readelf), absent beside the CPU torch here. The ``hf_*`` functions
re-derive published Hub files' layouts (``LLM2CLIP-Openai-*``, ``LLM2CLIP-EVA02-*``), which cannot be read without
Hub access; ``hf_eva02_state_dict`` is inferred, not confirmed against the published file.

Each function follows the official source named here (paths as in the GitHub repositories, checked against
microsoft/LLM2CLIP at commit cba3b45 and McGill-NLP/llm2vec at commit 312adcf; ``llm2vec_prepare_for_tokenization``
against the llm2vec 0.2.3 PyPI source):

* ``rope_angle`` / ``rope_rotate``: microsoft/LLM2CLIP ``llm2clip/eva_clip/rope.py``, class
  ``VisionRotaryEmbeddingFast`` (``freqs_for='lang'`` frequencies ``theta ** -(arange(0, dim, 2) / dim)`` over
  half the head, positions ``arange(ft_seq_len) / ft_seq_len * pt_seq_len``, each frequency repeated for a
  channel pair, rows then columns) and ``rotate_half`` in the same file; applied to every token but the class
  token in ``Attention.forward`` of ``llm2clip/eva_clip/eva_vit_model.py``.
* ``eva02_image_features``: microsoft/LLM2CLIP ``llm2clip/eva_clip/eva_vit_model.py``, class
  ``EVAVisionTransformer`` (``forward_features``: patch embed, class token, absolute position embedding, blocks,
  ``norm``, class token; ``forward``: ``head``) with its ``Attention`` (``q_proj``/``k_proj``/``v_proj``, the
  k projection without bias, ``inner_attn_ln``, ``proj``) and ``SwiGLU`` (``w1``, ``w2``, ``ffn_ln``, ``w3``)
  classes; LayerNorm eps 1e-6 as ``_build_vision_tower`` in ``llm2clip/eva_clip/model.py`` passes it.
* ``text_adapter_features``: microsoft/LLM2CLIP ``llm2clip/eva_clip/model.py``, classes ``TextProj``
  (``forward``: L2-normalise unless ``l2_norm=False`` as ``LLM2VecTextTransformer`` of ``llm_model.py`` calls it
  for the SigLIP2 model (adapter under ``text.text_proj.text_adaptor``), then ``text_adaptor`` = 4 ``LinearBlock``,
  ``nn.LayerNorm``, ``nn.Linear``) and ``LinearBlock`` (``x + fn(ln(x))``, ``fn`` = Linear, GELU, Dropout, Linear).
* ``openai_clip_image_features`` / ``openai_clip_state_dict``: microsoft/LLM2CLIP ``llm2clip/eva_clip/transformer.py``,
  class ``VisionTransformer`` (``conv1`` without bias, ``class_embedding``, ``positional_embedding``, ``ln_pre``,
  ``transformer.resblocks`` of ``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (``in_proj_weight`` rows q,
  k, v) and ``mlp.c_fc`` / ``c_proj``, ``ln_post`` on the class token, ``x @ proj``), built by ``_build_vision_tower``
  of ``llm2clip/eva_clip/model.py`` for ``model_configs/OpenaiCLIP-*.json``; QuickGELU as the OpenAI-pretrained path
  builds it (``build_model_from_openai_state_dict(quick_gelu=True)``), LayerNorm eps 1e-5 (``nn.LayerNorm``).
* ``timm_siglip_image_features`` / ``timm_siglip_state_dict``: ``TimmModel`` of ``llm2clip/eva_clip/timm_model.py``
  around huggingface/pytorch-image-models (commit aa4b585) ``timm/models/vision_transformer.py`` (``VisionTransformer``:
  ``forward_features`` = patch_embed, ``_pos_embed`` without class token, blocks, ``norm``; ``forward_head`` =
  ``attn_pool``; ``vit_so400m_patch14_siglip_224``: nn.GELU, timm LayerNorm eps 1e-6) and
  ``timm/layers/attention_pool.py`` ``AttentionPoolLatent.forward`` (``q(latent)``, ``kv`` reshaped (2, heads,
  head_dim): k rows then v rows, ``proj``, ``x + mlp(norm(x))``, token 0).
* ``hf_openai_state_dict`` / ``hf_openai_config``: the ``LLM2CLIP-Openai-*`` Hub repos' layout (transformers-4.40
  CLIP naming; ``config.json`` as published for LLM2CLIP-Openai-L-14-224; the adapter as
  ``text_adapter.adaptor[0..5]``, seen in third-party code using the repo). ``hf_eva02_state_dict``: the
  ``LLM2CLIP-EVA02-*`` Hub repos' ``pytorch_model.bin``, renamed as a copy of EVA-CLIP's
  ``convert_evaclip_pytorch_to_hf.py`` renames (inferred; not confirmed against the published file).
* ``official_state_dict``: key names of the modules above, as ``CustomCLIP`` in ``llm2clip/eva_clip/model.py``
  nests them (``visual.*``, ``text.text_adaptor.*``); ``q_bias_naming`` gives the ``attn.q_bias``/``attn.v_bias``
  parameters of ``Attention``'s fused-qkv branch.
* ``llm2vec_encode``: McGill-NLP/llm2vec ``llm2vec/llm2vec.py``, class ``LLM2Vec`` (``_convert_to_str``,
  ``prepare_for_tokenization``, ``tokenize``, ``get_pooling``, ``encode``). microsoft/LLM2CLIP vendors this
  file as ``llm2clip/llm2vec/llm2vec.py`` with ``doc_max_length`` forced to 512.
* ``llm2vec_load``: the same file's ``LLM2Vec.from_pretrained`` (llm2vec 0.2.3): the model class loaded from the
  adapter folder (transformers takes the base weights from the adapter's ``base_model_name_or_path`` and attaches
  the adapter), merged (``merge_and_unload``); a ``peft_model_name_or_path`` adapter applied on top, unmerged
  unless ``merge_peft``; LLM2CLIP's fork merges each ``extra_model_name_or_path`` adapter in turn, before it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------- EVA02 / eva_clip
def rope_angle(row: int, col: int, channel: int, head_dim: int, grid: int, pretrain_grid: int = 16,
               theta: float = 10000.0) -> float:
    """Angle of one channel of one patch: the first half of the head rotates with the row, the second with the
    column; channels 2j and 2j+1 of an axis share frequency theta^(-2j/axis_dim)."""
    axis_dim = head_dim // 2
    position = (row if channel < axis_dim else col) / grid * pretrain_grid
    j = (channel % axis_dim) // 2
    return position * theta ** (-(2 * j) / axis_dim)


def rope_rotate(x: torch.Tensor, grid: int, pretrain_grid: int = 16) -> torch.Tensor:
    """Apply 2-D RoPE to ``(tokens=grid*grid, head_dim)`` with explicit 2x2 rotations of channel pairs."""
    tokens, head_dim = x.shape
    out = torch.empty_like(x, dtype=torch.float64)
    for token in range(tokens):
        row, col = divmod(token, grid)
        for pair in range(head_dim // 2):
            a, b = x[token, 2 * pair].double(), x[token, 2 * pair + 1].double()
            angle = rope_angle(row, col, 2 * pair, head_dim, grid, pretrain_grid)
            out[token, 2 * pair] = a * math.cos(angle) - b * math.sin(angle)
            out[token, 2 * pair + 1] = b * math.cos(angle) + a * math.sin(angle)
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def eva02_image_features(sd: dict[str, torch.Tensor], pixels: torch.Tensor, num_heads: int,
                         pretrain_grid: int = 16) -> torch.Tensor:
    """eva_clip ``visual(x)`` = ``head(norm(blocks(x))[:, 0])`` from an official-named state dict, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    pixels = pixels.double()
    w = sd["visual.patch_embed.proj.weight"]
    patch = w.shape[-1]
    x = F.conv2d(pixels, w, sd["visual.patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    grid = pixels.shape[-1] // patch
    x = torch.cat([sd["visual.cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["visual.pos_embed"]
    depth = len({k.split(".")[2] for k in sd if k.startswith("visual.blocks.")})
    eps = 1e-6
    for i in range(depth):
        p = f"visual.blocks.{i}."
        h = layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        q = h @ sd[p + "attn.q_proj.weight"].t() + sd[p + "attn.q_proj.bias"]
        k = h @ sd[p + "attn.k_proj.weight"].t()
        v = h @ sd[p + "attn.v_proj.weight"].t() + sd[p + "attn.v_proj.bias"]
        batch, tokens, width = q.shape
        head_dim = width // num_heads
        heads_out = []
        for b in range(batch):
            per_head = []
            for hd in range(num_heads):
                sl = slice(hd * head_dim, (hd + 1) * head_dim)
                qh, kh, vh = q[b, :, sl], k[b, :, sl], v[b, :, sl]
                qh = torch.cat([qh[:1], rope_rotate(qh[1:], grid, pretrain_grid)])
                kh = torch.cat([kh[:1], rope_rotate(kh[1:], grid, pretrain_grid)])
                attn = torch.softmax(qh @ kh.t() / math.sqrt(head_dim), dim=-1)
                per_head.append(attn @ vh)
            heads_out.append(torch.cat(per_head, dim=-1))
        a = torch.stack(heads_out)
        a = layer_norm(a, sd[p + "attn.inner_attn_ln.weight"], sd[p + "attn.inner_attn_ln.bias"], eps)
        x = x + a @ sd[p + "attn.proj.weight"].t() + sd[p + "attn.proj.bias"]
        h = layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        g = F.silu(h @ sd[p + "mlp.w1.weight"].t() + sd[p + "mlp.w1.bias"]) * (h @ sd[p + "mlp.w2.weight"].t() + sd[p + "mlp.w2.bias"])
        g = layer_norm(g, sd[p + "mlp.ffn_ln.weight"], sd[p + "mlp.ffn_ln.bias"], eps)
        x = x + g @ sd[p + "mlp.w3.weight"].t() + sd[p + "mlp.w3.bias"]
    cls = layer_norm(x[:, 0], sd["visual.norm.weight"], sd["visual.norm.bias"], eps)
    return cls @ sd["visual.head.weight"].t() + sd["visual.head.bias"]


def text_adapter_features(sd: dict[str, torch.Tensor], embeddings: torch.Tensor, prefix: str = "text.text_adaptor.",
                          l2_normalize: bool = True) -> torch.Tensor:
    """Official ``TextProj``: L2-normalise (``l2_norm=True``, the default; the SigLIP2 model's
    ``LLM2VecTextTransformer`` passes ``l2_norm=False``), residual blocks ``x + W2 gelu(W1 ln(x))``, LayerNorm,
    Linear (float64). ``prefix`` is where the checkpoint keeps ``text_adaptor``."""
    sd = {k: v.double() for k, v in sd.items()}
    x = embeddings.double()
    if l2_normalize:
        x = x / x.norm(dim=-1, keepdim=True)
    blocks = len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix) and ".fn." in k})
    for i in range(blocks):
        p = f"{prefix}{i}."
        h = layer_norm(x, sd[p + "ln.weight"], sd[p + "ln.bias"], 1e-5)
        h = F.gelu(h @ sd[p + "fn.0.weight"].t() + sd[p + "fn.0.bias"])
        x = x + h @ sd[p + "fn.3.weight"].t() + sd[p + "fn.3.bias"]
    x = layer_norm(x, sd[f"{prefix}{blocks}.weight"], sd[f"{prefix}{blocks}.bias"], 1e-5)
    return x @ sd[f"{prefix}{blocks + 1}.weight"].t() + sd[f"{prefix}{blocks + 1}.bias"]


def official_state_dict(width: int, depth: int, patch: int, grid: int, mlp: int, proj: int, llm_dim: int,
                        seed: int = 0, q_bias_naming: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors under the official eva_clip key names and shapes (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "visual.cls_token": r(1, 1, width), "visual.pos_embed": r(1, grid * grid + 1, width),
        "visual.patch_embed.proj.weight": r(width, 3, patch, patch), "visual.patch_embed.proj.bias": r(width),
        "visual.rope.freqs_cos": torch.ones(grid * grid, width), "visual.rope.freqs_sin": torch.zeros(grid * grid, width),
        "visual.norm.weight": 1 + r(width), "visual.norm.bias": r(width),
        "visual.head.weight": r(proj, width), "visual.head.bias": r(proj),
    }
    for i in range(depth):
        p = f"visual.blocks.{i}."
        q_bias, v_bias = ("attn.q_bias", "attn.v_bias") if q_bias_naming else ("attn.q_proj.bias", "attn.v_proj.bias")
        sd.update({
            p + "norm1.weight": 1 + r(width), p + "norm1.bias": r(width),
            p + "norm2.weight": 1 + r(width), p + "norm2.bias": r(width),
            p + "attn.q_proj.weight": r(width, width), p + q_bias: r(width),
            p + "attn.k_proj.weight": r(width, width),
            p + "attn.v_proj.weight": r(width, width), p + v_bias: r(width),
            p + "attn.inner_attn_ln.weight": 1 + r(width), p + "attn.inner_attn_ln.bias": r(width),
            p + "attn.proj.weight": r(width, width), p + "attn.proj.bias": r(width),
            p + "attn.rope.freqs_cos": torch.ones(grid * grid, width), p + "attn.rope.freqs_sin": torch.zeros(grid * grid, width),
            p + "mlp.w1.weight": r(mlp, width), p + "mlp.w1.bias": r(mlp),
            p + "mlp.w2.weight": r(mlp, width), p + "mlp.w2.bias": r(mlp),
            p + "mlp.ffn_ln.weight": 1 + r(mlp), p + "mlp.ffn_ln.bias": r(mlp),
            p + "mlp.w3.weight": r(width, mlp), p + "mlp.w3.bias": r(width),
        })
    for i in range(4):
        p = f"text.text_adaptor.{i}."
        sd.update({
            p + "fn.0.weight": r(2 * llm_dim, llm_dim), p + "fn.0.bias": r(2 * llm_dim),
            p + "fn.3.weight": r(llm_dim, 2 * llm_dim), p + "fn.3.bias": r(llm_dim),
            p + "ln.weight": 1 + r(llm_dim), p + "ln.bias": r(llm_dim),
        })
    sd.update({
        "text.text_adaptor.4.weight": 1 + r(llm_dim), "text.text_adaptor.4.bias": r(llm_dim),
        "text.text_adaptor.5.weight": r(proj, llm_dim), "text.text_adaptor.5.bias": r(proj),
    })
    return sd


# ----------------------------------------------------------------------------------------------- other towers
def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v per head, heads = consecutive channel slices, concatenated (float64)."""
    head_dim = q.shape[-1] // num_heads
    out = []
    for h in range(num_heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        weights = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        out.append(weights @ v[..., sl])
    return torch.cat(out, dim=-1)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def openai_clip_image_features(sd: dict[str, torch.Tensor], pixels: torch.Tensor, num_heads: int, eps: float = 1e-5,
                               activation=quick_gelu) -> torch.Tensor:
    """eva_clip ``VisionTransformer.forward`` (``llm2clip/eva_clip/transformer.py``) from official keys, float64:
    ``conv1`` (no bias), class embedding + ``positional_embedding``, ``ln_pre``, resblocks ``x + attn(ln_1(x))``
    (``nn.MultiheadAttention``: ``in_proj_weight`` rows q, k, v; ``out_proj``) and ``x + c_proj(act(c_fc(ln_2(x))))``
    with QuickGELU (the OpenAI-pretrained path), ``ln_post`` on the class token, ``@ proj``."""
    sd = {k: v.double() for k, v in sd.items()}
    w = sd["visual.conv1.weight"]
    x = F.conv2d(pixels.double(), w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = layer_norm(x, sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], eps)
    depth = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    for i in range(depth):
        p = f"visual.transformer.resblocks.{i}."
        h = layer_norm(x, sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], eps)
        qkv = h @ sd[p + "attn.in_proj_weight"].t() + sd[p + "attn.in_proj_bias"]
        q, k, v = qkv.chunk(3, dim=-1)
        a = multi_head_attention(q, k, v, num_heads)
        x = x + a @ sd[p + "attn.out_proj.weight"].t() + sd[p + "attn.out_proj.bias"]
        h = layer_norm(x, sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], eps)
        h = activation(h @ sd[p + "mlp.c_fc.weight"].t() + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].t() + sd[p + "mlp.c_proj.bias"]
    cls = layer_norm(x[:, 0], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], eps)
    return cls @ sd["visual.proj"]


def timm_siglip_image_features(sd: dict[str, torch.Tensor], pixels: torch.Tensor, num_heads: int, eps: float = 1e-6,
                               activation=exact_gelu) -> torch.Tensor:
    """eva_clip ``TimmModel`` with timm's ``vit_so400m_patch14_siglip_224`` trunk (pool ``map``, proj ``none``), from
    official keys, float64. timm ``VisionTransformer``: ``patch_embed.proj`` (with bias), ``+ pos_embed`` (no class
    token), blocks ``x + attn(norm1(x))`` (``qkv`` rows q, k, v; ``proj``) and ``x + fc2(gelu(fc1(norm2(x))))``
    (exact GELU, LayerNorm eps 1e-6), final ``norm``; ``AttentionPoolLatent``: query ``q(latent)``, keys and values
    ``kv(x)`` (rows k then v), attention, ``proj``, then ``x + mlp(norm(x))`` and the single latent token."""
    sd = {k: v.double() for k, v in sd.items()}
    t = "visual.trunk."
    w = sd[t + "patch_embed.proj.weight"]
    x = F.conv2d(pixels.double(), w, sd[t + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = x + sd[t + "pos_embed"]
    width = x.shape[-1]
    depth = len({k.split(".")[3] for k in sd if k.startswith(t + "blocks.")})
    for i in range(depth):
        p = f"{t}blocks.{i}."
        h = layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = h @ sd[p + "attn.qkv.weight"].t() + sd[p + "attn.qkv.bias"]
        a = multi_head_attention(qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:], num_heads)
        x = x + a @ sd[p + "attn.proj.weight"].t() + sd[p + "attn.proj.bias"]
        h = layer_norm(x, sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        h = activation(h @ sd[p + "mlp.fc1.weight"].t() + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].t() + sd[p + "mlp.fc2.bias"]
    x = layer_norm(x, sd[t + "norm.weight"], sd[t + "norm.bias"], eps)
    p = t + "attn_pool."
    q = sd[p + "latent"].expand(x.shape[0], -1, -1) @ sd[p + "q.weight"].t() + sd[p + "q.bias"]
    kv = x @ sd[p + "kv.weight"].t() + sd[p + "kv.bias"]
    a = multi_head_attention(q, kv[..., :width], kv[..., width:], num_heads)
    y = a @ sd[p + "proj.weight"].t() + sd[p + "proj.bias"]
    h = layer_norm(y, sd[p + "norm.weight"], sd[p + "norm.bias"], eps)
    y = y + activation(h @ sd[p + "mlp.fc1.weight"].t() + sd[p + "mlp.fc1.bias"]) @ sd[p + "mlp.fc2.weight"].t() \
        + sd[p + "mlp.fc2.bias"]
    return y[:, 0]


def _random(seed: int):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    return r


def adapter_state_dict(prefix: str, llm_dim: int, proj: int, seed: int = 1, blocks: int = 4,
                       expansion: int = 2) -> dict[str, torch.Tensor]:
    """``TextProj.text_adaptor`` tensors (``LinearBlock`` = ``fn.0``, ``fn.3``, ``ln``; then LayerNorm, Linear)."""
    r = _random(seed)
    sd = {}
    for i in range(blocks):
        p = f"{prefix}{i}."
        sd.update({
            p + "fn.0.weight": r(expansion * llm_dim, llm_dim), p + "fn.0.bias": r(expansion * llm_dim),
            p + "fn.3.weight": r(llm_dim, expansion * llm_dim), p + "fn.3.bias": r(llm_dim),
            p + "ln.weight": 1 + r(llm_dim), p + "ln.bias": r(llm_dim),
        })
    sd.update({f"{prefix}{blocks}.weight": 1 + r(llm_dim), f"{prefix}{blocks}.bias": r(llm_dim),
               f"{prefix}{blocks + 1}.weight": r(proj, llm_dim), f"{prefix}{blocks + 1}.bias": r(proj)})
    return sd


def open_clip_text_tower(prefix: str = "text.", width: int = 32, context: int = 8, vocab: int = 50, proj: int = 24,
                         seed: int = 2) -> dict[str, torch.Tensor]:
    """An open_clip ``TextTransformer`` (one resblock): under ``text.`` as EVA-CLIP's ``CustomCLIP`` nests it, or at the
    top level (``prefix=""``) as open_clip's ``CLIP`` does."""
    r = _random(seed)
    p = prefix + "transformer.resblocks.0."
    return {
        prefix + "token_embedding.weight": r(vocab, width), prefix + "positional_embedding": r(context, width),
        p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
        p + "attn.in_proj_weight": r(3 * width, width), p + "attn.in_proj_bias": r(3 * width),
        p + "attn.out_proj.weight": r(width, width), p + "attn.out_proj.bias": r(width),
        p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
        p + "mlp.c_fc.weight": r(4 * width, width), p + "mlp.c_fc.bias": r(4 * width),
        p + "mlp.c_proj.weight": r(width, 4 * width), p + "mlp.c_proj.bias": r(width),
        prefix + "ln_final.weight": 1 + r(width), prefix + "ln_final.bias": r(width),
        prefix + "text_projection": r(width, proj),
    }


def openai_clip_state_dict(width: int, depth: int, patch: int, grid: int, mlp: int, proj: int, llm_dim: int | None,
                           seed: int = 0, adapter_prefix: str = "text.text_adaptor.") -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of eva_clip's OpenAI-CLIP ``VisionTransformer`` as
    ``CustomCLIP.visual`` (``model_configs/OpenaiCLIP-*.json``), with the ``TextProj`` adapter unless ``llm_dim`` is
    ``None``."""
    r = _random(seed)
    v = "visual."
    sd = {
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        v + "conv1.weight": r(width, 3, patch, patch), v + "class_embedding": r(width),
        v + "positional_embedding": r(grid * grid + 1, width),
        v + "ln_pre.weight": 1 + r(width), v + "ln_pre.bias": r(width),
        v + "ln_post.weight": 1 + r(width), v + "ln_post.bias": r(width), v + "proj": r(width, proj, scale=0.2),
    }
    for i in range(depth):
        p = f"{v}transformer.resblocks.{i}."
        sd.update({
            p + "ln_1.weight": 1 + r(width), p + "ln_1.bias": r(width),
            p + "attn.in_proj_weight": r(3 * width, width, scale=0.15), p + "attn.in_proj_bias": r(3 * width),
            p + "attn.out_proj.weight": r(width, width, scale=0.15), p + "attn.out_proj.bias": r(width),
            p + "ln_2.weight": 1 + r(width), p + "ln_2.bias": r(width),
            p + "mlp.c_fc.weight": r(mlp, width, scale=0.15), p + "mlp.c_fc.bias": r(mlp, scale=0.5),
            p + "mlp.c_proj.weight": r(width, mlp, scale=0.15), p + "mlp.c_proj.bias": r(width),
        })
    if llm_dim is not None:
        sd.update(adapter_state_dict(adapter_prefix, llm_dim, proj, seed=seed + 1))
    return sd


def timm_siglip_state_dict(width: int, depth: int, patch: int, grid: int, mlp: int, llm_dim: int | None,
                           seed: int = 0, adapter_prefix: str = "text.text_proj.text_adaptor.",
                           logit_bias: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of eva_clip's ``TimmModel`` around timm's SigLIP ViT
    (``visual.trunk.*``, ``attn_pool`` = ``AttentionPoolLatent``; ``visual.head`` empty), with the adapter under
    ``LLM2VecTextTransformer.text_proj`` (projection width = tower width) unless ``llm_dim`` is ``None``."""
    r = _random(seed)
    t = "visual.trunk."
    sd = {
        "logit_scale": torch.tensor(math.log(10.0)),
        t + "patch_embed.proj.weight": r(width, 3, patch, patch), t + "patch_embed.proj.bias": r(width),
        t + "pos_embed": r(1, grid * grid, width),
        t + "norm.weight": 1 + r(width), t + "norm.bias": r(width),
    }
    if logit_bias:
        sd["logit_bias"] = torch.tensor(-10.0)
    for i in range(depth):
        p = f"{t}blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + r(width), p + "norm1.bias": r(width),
            p + "attn.qkv.weight": r(3 * width, width, scale=0.15), p + "attn.qkv.bias": r(3 * width),
            p + "attn.proj.weight": r(width, width, scale=0.15), p + "attn.proj.bias": r(width),
            p + "norm2.weight": 1 + r(width), p + "norm2.bias": r(width),
            p + "mlp.fc1.weight": r(mlp, width, scale=0.15), p + "mlp.fc1.bias": r(mlp, scale=0.5),
            p + "mlp.fc2.weight": r(width, mlp, scale=0.15), p + "mlp.fc2.bias": r(width),
        })
    p = t + "attn_pool."
    sd.update({
        p + "latent": r(1, 1, width, scale=0.5),
        p + "q.weight": r(width, width, scale=0.15), p + "q.bias": r(width),
        p + "kv.weight": r(2 * width, width, scale=0.15), p + "kv.bias": r(2 * width),
        p + "proj.weight": r(width, width, scale=0.15), p + "proj.bias": r(width),
        p + "norm.weight": 1 + r(width), p + "norm.bias": r(width),
        p + "mlp.fc1.weight": r(mlp, width, scale=0.15), p + "mlp.fc1.bias": r(mlp, scale=0.5),
        p + "mlp.fc2.weight": r(width, mlp, scale=0.15), p + "mlp.fc2.bias": r(width),
    })
    if llm_dim is not None:
        sd.update(adapter_state_dict(adapter_prefix, llm_dim, width, seed=seed + 1))
    return sd


def hf_openai_state_dict(sd: dict[str, torch.Tensor], text_tower: bool = False) -> dict[str, torch.Tensor]:
    """An eva_clip OpenAI-CLIP state dict (``openai_clip_state_dict``) laid out as the ``LLM2CLIP-Openai-*`` Hub repos
    store it (transformers-4.40 ``CLIPModel`` naming: ``CLIPVisionTransformer`` under ``vision_model.``, attention
    q/k/v/out_proj, ``visual_projection`` = ``nn.Linear`` without bias, i.e. ``proj`` transposed; the adapter
    ``LLM2CLIP_Adapter.adaptor`` under ``text_adapter.``), optionally with a transformers CLIP text tower."""
    out = {
        "logit_scale": sd["logit_scale"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
    }
    depth = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    for i in range(depth):
        p, o = f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        weights, biases = sd[p + "attn.in_proj_weight"].chunk(3), sd[p + "attn.in_proj_bias"].chunk(3)
        for name, weight, bias in zip("qkv", weights, biases):
            out[o + f"self_attn.{name}_proj.weight"], out[o + f"self_attn.{name}_proj.bias"] = weight, bias
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for leaf in ("weight", "bias"):
                out[o + f"{ours}.{leaf}"] = sd[p + f"{theirs}.{leaf}"]
    for key, value in sd.items():
        if key.startswith("text.text_adaptor."):
            out["text_adapter.adaptor." + key[len("text.text_adaptor."):]] = value
    if text_tower:
        r = _random(3)
        out.update({"text_model.embeddings.token_embedding.weight": r(50, 32),
                    "text_model.embeddings.position_embedding.weight": r(8, 32),
                    "text_model.encoder.layers.0.self_attn.q_proj.weight": r(32, 32),
                    "text_model.final_layer_norm.weight": 1 + r(32), "text_projection.weight": r(24, 32),
                    "vision_model.embeddings.position_ids":
                        torch.arange(sd["visual.positional_embedding"].shape[0])[None]})
    return out


def hf_openai_config(sd: dict[str, torch.Tensor], num_heads: int) -> dict:
    """``config.json`` as the ``LLM2CLIP-Openai-*`` repos publish it (CLIPConfig, transformers 4.40; the vision
    config names neither ``hidden_act`` nor ``image_size``, whose defaults are quick_gelu and 224)."""
    width = sd["visual.conv1.weight"].shape[0]
    mlp = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return {
        "architectures": ["LLM2CLIPModel"], "model_type": "clip", "projection_dim": sd["visual.proj"].shape[1],
        "auto_map": {"AutoConfig": "configuration_clip.CLIPConfig", "AutoModel": "modeling_clip.LLM2CLIPModel"},
        "text_config": {"model_type": "clip_text_model"}, "transformers_version": "4.40.2",
        "vision_config": {"hidden_size": width, "intermediate_size": mlp, "model_type": "clip_vision_model",
                          "num_attention_heads": num_heads,
                          "num_hidden_layers": len({k.split(".")[3] for k in sd if ".resblocks." in k}),
                          "patch_size": sd["visual.conv1.weight"].shape[-1],
                          "projection_dim": sd["visual.proj"].shape[1]},
    }


def hf_eva02_state_dict(sd: dict[str, torch.Tensor], q_bias_naming: bool = True,
                        inner_ln_name: str = "inner_self_attn_ln") -> dict[str, torch.Tensor]:
    """An eva_clip EVA02 state dict (``official_state_dict``) renamed as EVA-CLIP's ``convert_evaclip_pytorch_to_hf.py``
    renames it for the ``LLM2CLIP-EVA02-*`` Hub repos (vision only: ``cls_token`` -> ``embeddings.class_embedding``
    ``[w]``, ``pos_embed`` -> ``embeddings.position_embedding.weight`` ``[N, w]``, ``blocks`` -> ``encoder.layers``,
    ``norm1/2`` -> ``layer_norm1/2``, ``attn`` -> ``self_attn`` (also inside ``inner_attn_ln``), ``attn.proj`` ->
    ``out_proj``, ``norm`` -> ``post_layernorm``, ``head`` -> ``visual_projection``; RoPE tables kept)."""
    out = {
        "vision_model.embeddings.class_embedding": sd["visual.cls_token"][0, 0],
        "vision_model.embeddings.position_embedding.weight": sd["visual.pos_embed"][0],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.patch_embed.proj.weight"],
        "vision_model.embeddings.patch_embedding.bias": sd["visual.patch_embed.proj.bias"],
        "vision_model.post_layernorm.weight": sd["visual.norm.weight"],
        "vision_model.post_layernorm.bias": sd["visual.norm.bias"],
        "visual_projection.weight": sd["visual.head.weight"], "visual_projection.bias": sd["visual.head.bias"],
        "vision_model.rope.freqs_cos": sd["visual.rope.freqs_cos"],
        "vision_model.rope.freqs_sin": sd["visual.rope.freqs_sin"],
    }
    depth = len({k.split(".")[2] for k in sd if k.startswith("visual.blocks.")})
    for i in range(depth):
        p, o = f"visual.blocks.{i}.", f"vision_model.encoder.layers.{i}."
        renames = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.q_proj.weight": "self_attn.q_proj.weight",
                   "attn.k_proj.weight": "self_attn.k_proj.weight", "attn.v_proj.weight": "self_attn.v_proj.weight",
                   "attn.proj": "self_attn.out_proj", "attn.inner_attn_ln": f"self_attn.{inner_ln_name}",
                   "mlp.w1": "mlp.w1", "mlp.w2": "mlp.w2", "mlp.w3": "mlp.w3", "mlp.ffn_ln": "mlp.ffn_ln"}
        for theirs, ours in renames.items():
            for leaf in ("", ".weight", ".bias"):
                if p + theirs + leaf in sd and (leaf or theirs.endswith("weight")):
                    out[o + ours + leaf] = sd[p + theirs + leaf]
        for name in "qv":
            bias = sd.get(p + f"attn.{name}_proj.bias", sd.get(p + f"attn.{name}_bias"))
            out[o + (f"self_attn.{name}_bias" if q_bias_naming else f"self_attn.{name}_proj.bias")] = bias
        out[o + "self_attn.rope.freqs_cos"] = sd[p + "attn.rope.freqs_cos"]
        out[o + "self_attn.rope.freqs_sin"] = sd[p + "attn.rope.freqs_sin"]
    return out


# ----------------------------------------------------------------------------------------------- llm2vec encode
SEPARATOR = "!@#$%^&*()"


def llm2vec_cut_text(tokenizer, text, max_length=512, doc_max_length=400):
    """``LLM2Vec._convert_to_str``'s word cut: count the text's tokens (alone, no special tokens, truncated at
    ``max_length``); while above ``doc_max_length``, keep ``int(len(text.split()) * doc_max_length / count)``
    words joined by single spaces and count again."""
    def count(t):
        return len(tokenizer(t, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                             add_special_tokens=False)["input_ids"][0])

    length = count(text)
    while length > doc_max_length:
        reduction_ratio = doc_max_length / length
        reduced_length = int(len(text.split()) * reduction_ratio)
        text = " ".join(text.split()[:reduced_length])
        length = count(text)
    return text


def llm2vec_prepare_for_tokenization(text, pooling_mode, config, name_or_path=None):
    """``LLM2Vec.prepare_for_tokenization`` of llm2vec 0.2.3 (PyPI): chat wrappers chosen by checkpoint name
    (Llama-3-Instruct returns at once), then under ``eos_token`` pooling ``"<|end_of_text|>"`` for
    Meta-Llama-3-8B, the text ``" </s>"`` for any Llama / Mistral config, ``"<eos>"`` for Gemma, ``"<|endoftext|>"``
    for Qwen2. Checked against the official strings in tests/fixtures/llm2vec_official (test_llm2vec_official)."""
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    if name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct":
        return "<|start_header_id|>user<|end_header_id|>\n\n" + text.strip() + "<|eot_id|>"
    if name_or_path in ("mistralai/Mistral-7B-Instruct-v0.2", "meta-llama/Llama-2-7b-chat-hf"):
        text = "[INST] " + text.strip() + " [/INST]"
    if name_or_path == "google/gemma-2-9b-it":
        text = "<bos><start_of_turn>user\n" + text.strip() + "<end_of_turn>"
    if name_or_path in ("Qwen/Qwen2-1.5B-Instruct", "Qwen/Qwen2-7B-Instruct"):
        text = "<|im_start|>user\n" + text.strip() + "<|im_end|>"
    if pooling_mode == "eos_token":
        if name_or_path == "meta-llama/Meta-Llama-3-8B":
            text = text.strip() + "<|end_of_text|>"
        elif isinstance(config, (LlamaConfig, MistralConfig)):
            text = text.strip() + " </s>"
        elif isinstance(config, GemmaConfig):
            text = text.strip() + "<eos>"
        elif isinstance(config, Qwen2Config):
            text = text.strip() + "<|endoftext|>"
    return text


def llm2vec_encode(llm, tokenizer, texts, instruction=None, pooling_mode="mean", max_length=512,
                   template=None, batch_size=4, doc_max_length=512) -> torch.Tensor:
    """llm2vec ``LLM2Vec.encode`` semantics: cut each text to ``doc_max_length`` tokens by words
    (``llm2vec_cut_text``; upstream's default is 400, LLM2CLIP's vendored copy 512), then
    ``instruction.strip() + " " + SEP + text``, optional chat wrapper around the stripped string, split at SEP,
    pool the last ``len(tokenize(tail, no special tokens))`` positions of the left-padded batch. ``llm`` is a
    bidirectional transformers base model."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [llm2vec_cut_text(tokenizer, t, max_length, doc_max_length) for t in texts]
    joined = [f"{instruction.strip()} {SEPARATOR}{t}" if instruction else f"{SEPARATOR}{t}" for t in texts]
    if template is not None:
        prefix, suffix = template.split("{text}")
        joined = [prefix + s.strip() + suffix for s in joined]
    joined = [llm2vec_prepare_for_tokenization(s, pooling_mode, llm.config) for s in joined]
    outputs = []
    for start in range(0, len(joined), batch_size):
        chunk = joined[start:start + batch_size]
        tails = [c.split(SEPARATOR)[1] for c in chunk]
        originals = ["".join(c.split(SEPARATOR)) for c in chunk]
        enc = tokenizer(originals, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        with torch.no_grad():
            hidden = llm(**enc).last_hidden_state
        for row, tail in enumerate(tails):
            n = len(tokenizer(tail, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"])
            states = hidden[row, -n:]
            if pooling_mode == "mean":
                outputs.append(states.mean(0))
            elif pooling_mode == "weighted_mean":
                weights = torch.arange(1, n + 1, dtype=states.dtype)
                outputs.append((states * (weights / weights.sum())[:, None]).sum(0))
            else:
                outputs.append(hidden[row, -1])
    return torch.stack(outputs).float()


def llm2vec_load(mntp_dir, peft_dir=None, extra_dirs=(), merge_peft=False):
    """``LLM2Vec.from_pretrained(mntp_dir, peft_model_name_or_path=peft_dir)`` with the fork's ``extra_model_name_or_path``:
    the bidirectional base model and the tokenizer of ``mntp_dir``, through transformers and peft directly."""
    import json
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    base = json.loads((Path(mntp_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(base)
    config.is_causal = False
    model = AutoModel.from_pretrained(base, config=config)
    model = PeftModel.from_pretrained(model, str(mntp_dir)).merge_and_unload()
    for extra in extra_dirs:
        model = PeftModel.from_pretrained(model, str(extra)).merge_and_unload()
    if peft_dir is not None:
        model = PeftModel.from_pretrained(model, str(peft_dir))
        if merge_peft:
            model = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(mntp_dir))
    tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
