"""Straightforward re-derivations of the official computations, independent of llm2clip_hf. Tests compare the
package against these.

Each function follows the official source named here (paths as in the GitHub repositories, checked against
microsoft/LLM2CLIP at commit cba3b45 and McGill-NLP/llm2vec at commit 312adcf):

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
  (``forward``: L2-normalise, then ``text_adaptor`` = 4 ``LinearBlock``, ``nn.LayerNorm``, ``nn.Linear``) and
  ``LinearBlock`` (``x + fn(ln(x))``, ``fn`` = Linear, GELU, Dropout, Linear).
* ``official_state_dict``: key names of the modules above, as ``CustomCLIP`` in ``llm2clip/eva_clip/model.py``
  nests them (``visual.*``, ``text.text_adaptor.*``); ``q_bias_naming`` gives the ``attn.q_bias``/``attn.v_bias``
  parameters of ``Attention``'s fused-qkv branch.
* ``llm2vec_encode``: McGill-NLP/llm2vec ``llm2vec/llm2vec.py``, class ``LLM2Vec`` (``_convert_to_str``,
  ``prepare_for_tokenization``, ``tokenize``, ``get_pooling``, ``encode``). microsoft/LLM2CLIP vendors this
  file as ``llm2clip/llm2vec/llm2vec.py`` with ``doc_max_length`` forced to 512.
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


def text_adapter_features(sd: dict[str, torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """Official ``TextProj``: L2-normalise, residual blocks ``x + W2 gelu(W1 ln(x))``, LayerNorm, Linear (float64)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = embeddings.double()
    x = x / x.norm(dim=-1, keepdim=True)
    blocks = len({k.split(".")[2] for k in sd if k.startswith("text.text_adaptor.") and ".fn." in k})
    for i in range(blocks):
        p = f"text.text_adaptor.{i}."
        h = layer_norm(x, sd[p + "ln.weight"], sd[p + "ln.bias"], 1e-5)
        h = F.gelu(h @ sd[p + "fn.0.weight"].t() + sd[p + "fn.0.bias"])
        x = x + h @ sd[p + "fn.3.weight"].t() + sd[p + "fn.3.bias"]
    x = layer_norm(x, sd[f"text.text_adaptor.{blocks}.weight"], sd[f"text.text_adaptor.{blocks}.bias"], 1e-5)
    return x @ sd[f"text.text_adaptor.{blocks + 1}.weight"].t() + sd[f"text.text_adaptor.{blocks + 1}.bias"]


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
