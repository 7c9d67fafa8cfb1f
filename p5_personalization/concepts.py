"""The course's textual-inversion `input.json`, and where learned token embeddings live on disk.

input.json maps "0", "1", ... to
    {"src_image": "<folder of the concept's photos>" (or a list, for prompts with several concepts),
     "token_name": "<new1>" (or a list),
     "prompt": ["A <new1> ...", ...], "prompt_4_clip_eval": ["A dog ...", ...], "baseline": [[img, text], ...]}
`prompt_4_clip_eval[p]` is `prompt[p]` with the token replaced by plain words (what CLIP scores against);
`baseline[p]` is the (image score, text score) pair that prompt must reach.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError
from common.fileio import read_json

TOKEN_RE = re.compile(r"<[^<>\s]+>")


@dataclass
class Case:
    key: str                          # "0", "1", ...: the output folder name
    src_image: list[str]              # folder name(s) of the concept photos (several for multi-concept prompts)
    tokens: list[str]                 # token_name (a list when a case names several)
    prompts: list[str]
    eval_prompts: list[str] = field(default_factory=list)
    baseline: list[tuple[float, float]] = field(default_factory=list)

    def prompt_tokens(self) -> list[str]:
        """Every <token> written in this case's prompts and token_name, in first-seen order."""
        seen = list(self.tokens)
        for p in self.prompts:
            for t in TOKEN_RE.findall(p):
                if t not in seen:
                    seen.append(t)
        return seen


def _strings(v, where: str) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(s, str) and s.strip() for s in v):
        raise UserError(f"{where}: expected a non-empty list of non-empty strings")
    return list(v)


def read_input_json(path: str, need_eval: bool = False) -> list[Case]:
    """Parse and check input.json; `need_eval` also requires prompt_4_clip_eval (baseline stays optional)."""
    p = Path(path)
    raw = read_json(p, "input json")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{p}: expected an object mapping \"0\", \"1\", ... to concept entries")
    cases = []
    for key, v in raw.items():
        where = f"{p}: entry {key!r}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key) or key in (".", ".."):
            raise UserError(f"{where}: the key names an output folder, so it must be a plain name like \"0\"")
        if not isinstance(v, dict):
            raise UserError(f"{where}: expected an object with src_image, token_name and prompt")
        for name in ("src_image", "token_name", "prompt"):
            if name not in v:
                raise UserError(f"{where}: missing \"{name}\"")
        src = _strings(v["src_image"], f"{where} src_image")
        tokens = _strings(v["token_name"], f"{where} token_name")
        for t in tokens:
            if not TOKEN_RE.fullmatch(t):
                raise UserError(f"{where}: token_name {t!r} must look like <name> (no spaces)")
        prompts = _strings(v["prompt"], f"{where} prompt")
        evals = _strings(v["prompt_4_clip_eval"], f"{where} prompt_4_clip_eval") if "prompt_4_clip_eval" in v else []
        if evals and len(evals) != len(prompts):
            raise UserError(f"{where}: {len(prompts)} prompts but {len(evals)} prompt_4_clip_eval entries")
        baseline = []
        if "baseline" in v:
            b = v["baseline"]
            ok = isinstance(b, list) and all(isinstance(x, list) and len(x) == 2 and
                                             all(isinstance(y, (int, float)) and not isinstance(y, bool) for y in x)
                                             for x in b)
            if not ok:
                raise UserError(f"{where}: \"baseline\" must be a list of [image score, text score] pairs")
            if len(b) != len(prompts):
                raise UserError(f"{where}: {len(prompts)} prompts but {len(b)} baseline pairs")
            baseline = [(float(x[0]), float(x[1])) for x in b]
        if need_eval and not evals:
            raise UserError(f"{where}: evaluation needs \"prompt_4_clip_eval\"")
        cases.append(Case(key, src, tokens, prompts, evals, baseline))
    return cases


def token_file_stem(token: str) -> str:
    """File name (without suffix) of a token's learned embedding: '<new1>' -> 'new1'."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", token.strip("<>")).strip("._")
    if not stem:
        raise UserError(f"token {token!r}: needs at least one letter or digit inside the brackets")
    return stem


def find_concept_photos(input_dir: str, case: Case) -> list[Path]:
    """The photo folder of each src_image: INPUT_DIR/<src_image>, or INPUT_DIR/<key> as the course's data lays
    out a single-concept entry."""
    root = Path(input_dir)
    found = []
    for name in case.src_image:
        cands = [root / name] + ([root / case.key] if len(case.src_image) == 1 else [])
        hit = next((c for c in cands if c.is_dir()), None)
        if hit is None:
            also = f" or {case.key!r}" if len(case.src_image) == 1 else ""
            raise UserError(f"{root}: no folder {name!r}{also} holding the photos of entry {case.key!r} (src_image)")
        found.append(hit)
    return found
