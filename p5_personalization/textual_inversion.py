"""Textual inversion (Gal et al., 2022) pieces shared by training and generation.

Token convention (the same as diffusers' `load_textual_inversion`, so files move freely between the two):
a token learned with N vectors is N tokenizer entries `<tok>`, `<tok>_1`, ..., `<tok>_{N-1}`, and a
prompt's `<tok>` is rewritten to `<tok> <tok>_1 ... <tok>_{N-1}` before tokenising.

File format: `<name>.safetensors` holding one tensor named by the token, shape (N, D) (diffusers'
`learned_embeds.safetensors` layout; `pipeline.load_textual_inversion(path)` reads it), plus
`<name>.json` beside it with how it was trained.

During training the text encoder's token embedding is replaced by `NewTokenEmbedding`: the original
table is a frozen tensor and only the new tokens' vectors are a Parameter, so every other row stays
bit-identical by construction (no gradient, no optimiser state and no weight decay ever touch it).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError, one_line
from common.fileio import atomic_path, write_text_atomic

KV_FILE = "cross_attn_kv.safetensors"      # the joint method's fine-tuned cross-attention keys/values


def vector_tokens(token: str, num_vectors: int) -> list[str]:
    """Tokenizer entries of a learned token: <tok>, <tok>_1, ..., <tok>_{N-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, num_vectors: dict[str, int]) -> str:
    """Write each multi-vector token out as all of its entries ('a <t>' -> 'a <t> <t>_1 <t>_2')."""
    for token, n in num_vectors.items():
        if n > 1:
            spelled = " ".join(vector_tokens(token, n))
            prompt = re.sub(re.escape(token) + r"(?!_\d)", lambda _m, r=spelled: r, prompt)
    return prompt


def check_new_token(tokenizer, token: str, num_vectors: int) -> None:
    vocab = tokenizer.get_vocab()
    taken = [t for t in vector_tokens(token, num_vectors) if t in vocab]
    if taken:
        raise UserError(f"--token {token}: {taken[0]!r} is already in the tokenizer's vocabulary; "
                        f"choose a new name such as <my-{token.strip('<>').strip('|') or 'concept'}>")
    if num_vectors < 1:
        raise UserError(f"--vectors must be >= 1, got {num_vectors}")


def init_vectors(tokenizer, embedding: torch.Tensor, init_word: str, num_vectors: int) -> torch.Tensor:
    """(N, D) starting vectors: the init word's token embeddings one-to-one when it has N tokens, else
    (every vector) the mean of its token embeddings."""
    ids = tokenizer.encode(init_word, add_special_tokens=False)
    if not ids:
        raise UserError(f"--init-word {init_word!r}: tokenises to nothing; give a word such as 'dog' or 'painting'")
    rows = embedding[torch.tensor(ids)].detach().float()
    if len(ids) == num_vectors:
        return rows.clone()
    return rows.mean(0, keepdim=True).repeat(num_vectors, 1)


class NewTokenEmbedding(nn.Module):
    """Token embedding = a frozen table for ids < first_new, plus trainable vectors for the new ids."""

    def __init__(self, base_weight: torch.Tensor, new_vectors: torch.Tensor):
        super().__init__()
        self.register_buffer("base", base_weight.detach().clone(), persistent=False)
        self.new = nn.Parameter(new_vectors.detach().clone().to(base_weight.dtype))
        self.first_new = base_weight.shape[0]
        self.num_embeddings = self.first_new + len(new_vectors)
        self.embedding_dim = base_weight.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.first_new
        emb = nn.functional.embedding(ids.clamp(max=self.first_new - 1), self.base)
        new = nn.functional.embedding((ids - self.first_new).clamp(min=0), self.new)
        return torch.where(is_new[..., None], new.to(emb.dtype), emb)

    @property
    def weight(self) -> torch.Tensor:
        """The full (V + K, D) table as it currently stands (what an nn.Embedding would hold)."""
        return torch.cat([self.base, self.new.detach().to(self.base.dtype)])


def add_tokens(
    tokenizer, text_encoder, embeddings: dict[str, torch.Tensor], trainable: bool = False
) -> dict[str, list[int]]:
    """Add learned tokens (token -> (N, D) vectors) to a tokenizer and text encoder, in place.

    trainable=False: the text encoder gets an ordinary, larger nn.Embedding (inference).
    trainable=True: it gets a NewTokenEmbedding whose `.new` Parameter holds all new vectors, in the order
    given (training). Returns token -> the ids of its entries.
    """
    emb = text_encoder.get_input_embeddings()
    base = emb.weight.detach()
    dim = base.shape[1]
    all_new, names = [], []
    for token, vecs in embeddings.items():
        if vecs.ndim != 2 or vecs.shape[1] != dim:
            raise UserError(f"embedding of {token}: shape {tuple(vecs.shape)} does not fit this text encoder "
                            f"(expected (N, {dim}); was it learned on another Stable Diffusion version?)")
        check_new_token(tokenizer, token, len(vecs))
        names += vector_tokens(token, len(vecs))
        all_new.append(vecs.to(base.dtype).to(base.device))
    if len(set(names)) != len(names):
        raise UserError(f"tokens {list(embeddings)} overlap (the same name twice?)")
    first = base.shape[0]
    if len(tokenizer) != first:
        raise UserError(
            f"tokenizer has {len(tokenizer)} entries but the text encoder {first}: add tokens to both together"
        )
    added = tokenizer.add_tokens(names)
    if added != len(names):
        raise UserError(f"could not add the tokens {names} to the tokenizer")
    new = torch.cat(all_new)
    if trainable:
        text_encoder.set_input_embeddings(NewTokenEmbedding(base, new))
    else:
        table = nn.Embedding(first + len(new), dim, device=base.device, dtype=base.dtype)
        with torch.no_grad():
            table.weight.copy_(torch.cat([base, new]))
        table.requires_grad_(emb.weight.requires_grad)
        text_encoder.set_input_embeddings(table)
    text_encoder.config.vocab_size = first + len(new)
    ids, start = {}, first
    for token, vecs in embeddings.items():
        ids[token] = list(range(start, start + len(vecs)))
        start += len(vecs)
    for token, token_ids in ids.items():
        got = tokenizer.convert_tokens_to_ids(vector_tokens(token, len(token_ids)))
        if got != token_ids:
            raise RuntimeError(f"tokenizer gave ids {got} to {token}, expected {token_ids}")
    return ids


def save_embedding(path: str | os.PathLike, token: str, vectors: torch.Tensor, info: dict) -> Path:
    """diffusers' textual-inversion format: {token: (N, D)} as safetensors, plus a JSON sidecar."""
    from safetensors.torch import save_file

    from common.checkpoint import sort_metadata
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({token: vectors.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={"format": "pt", "token": token})
        sort_metadata(tmp)  # two keys: unsorted, their order (and the bytes) would vary from run to run
    meta = dict(info, token=token, vectors=int(vectors.shape[0]), dim=int(vectors.shape[1]))
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def load_embedding(path: str | os.PathLike, token: str | None = None) -> tuple[str, torch.Tensor]:
    """(token, (N, D) vectors) of a diffusers-format textual-inversion file (.safetensors or .bin)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: learned embedding not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: report it, do not trace back
        raise UserError(f"{path}: not a readable embedding file ({one_line(e, 150)})") from None
    if isinstance(sd, dict) and "string_to_param" in sd:  # AUTOMATIC1111 layout
        name, vec = sd.get("name", token), sd["string_to_param"]["*"]
    elif isinstance(sd, dict) and len(sd) == 1:
        name, vec = next(iter(sd.items()))
    else:
        raise UserError(f"{path}: expected one tensor named by its token (diffusers' textual-inversion format)")
    if not torch.is_tensor(vec):
        raise UserError(f"{path}: the embedding is not a tensor")
    vec = vec[None] if vec.ndim == 1 else vec
    if token is not None and name != token:
        raise UserError(f"{path}: holds the embedding of {name!r}, not {token!r}")
    if not vec.is_floating_point() or not torch.isfinite(vec).all():
        # a diverged training run: NaN/inf vectors would give all-black images without a word
        raise UserError(f"{path}: the embedding {name!r} contains NaN or infinity (or is not floating point); "
                        f"retrain it (a lower --lr?)")
    return name, vec.float()


def cross_attention_kv_names(unet) -> list[str]:
    """Parameter names of the UNet's cross-attention key and value projections (attn2.to_k / attn2.to_v)."""
    return [n for n, _ in unet.named_parameters() if re.search(r"attn2\.to_[kv]\.weight$", n)]


def save_kv(path: str | os.PathLike, unet, info: dict) -> Path:
    from safetensors.torch import save_file
    params = dict(unet.named_parameters())
    tensors = {n: params[n].detach().float().cpu().contiguous() for n in cross_attention_kv_names(unet)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"kind": "cross_attention_kv"})
    write_text_atomic(path.with_suffix(".json"), json.dumps(dict(info, tensors=len(tensors)), indent=2,
                                                            sort_keys=True) + "\n")
    return path


def load_kv(path: str | os.PathLike, unet) -> int:
    """Copy fine-tuned cross-attention K/V weights into a UNet; returns how many tensors were replaced."""
    from safetensors.torch import load_file
    path = Path(path)
    try:
        sd = load_file(str(path))
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable safetensors file ({one_line(e, 150)})") from None
    params = dict(unet.named_parameters())
    names = cross_attention_kv_names(unet)
    if set(sd) != set(names):
        raise UserError(f"{path}: its {len(sd)} tensors are not this UNet's {len(names)} cross-attention K/V "
                        f"weights (trained on another Stable Diffusion?)")
    for n in names:
        if sd[n].shape != params[n].shape:
            raise UserError(f"{path}: {n} has shape {tuple(sd[n].shape)}, the UNet {tuple(params[n].shape)}")
    from common.checkpoint import check_finite
    check_finite(sd, path)
    with torch.no_grad():
        for n in names:
            params[n].copy_(sd[n].to(params[n].dtype))
    return len(names)
