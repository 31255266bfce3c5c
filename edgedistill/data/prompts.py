"""Prompts for text-to-image generation: templates, diversification over contextual dimensions, weighted terms (P4).

P4 asks an LLM for options along a few contextual dimensions (place, time of day, camera angle, ...) and picks their
combinations with combinatorial testing: a pairwise covering array holds every pair of option values at least once
in far fewer rows than the full product (265 rows per class instead of 15^4 = 50,625). Prompts are comma-separated
lists whose terms carry weights, written ``(term:1.5)``; ``encode_weighted`` turns them into text embeddings.
"""
import logging
import re

import numpy as np

log = logging.getLogger(__name__)
WEIGHTED = re.compile(r"\(([^():]+):(\d+(?:\.\d+)?)\)")


# ---------------------------------------------------------------------------------------------------------------
# Pairwise covering arrays (AETG-style greedy)


def covering_array(sizes: list[int], seed: int = 0, candidates: int = 16) -> list[tuple[int, ...]]:
    """Rows of option indices, one per dimension, such that every pair of values of every two dimensions appears.

    Greedy in the manner of AETG: each new row is the best of ``candidates`` rows built one dimension at a time,
    each dimension taking the value that covers the most still-uncovered pairs. Early rows cover the most pairs, so
    a prefix of the array is itself a good partial cover. Deterministic for a given ``seed``.
    """
    if not sizes:
        return [()]
    if len(sizes) == 1:
        return [(v,) for v in range(sizes[0])]
    rng = np.random.default_rng(seed)
    D = len(sizes)
    uncovered = {(i, j): np.ones((sizes[i], sizes[j]), bool) for i in range(D) for j in range(i + 1, D)}
    left = sum(u.size for u in uncovered.values())
    rows = []
    while left:
        best, gain = max((_candidate_row(uncovered, sizes, rng) for _ in range(candidates)), key=lambda t: t[1])
        for (i, j), u in uncovered.items():
            u[best[i], best[j]] = False
        left -= gain
        rows.append(tuple(int(v) for v in best))
    return rows


def _candidate_row(uncovered: dict, sizes: list[int], rng) -> tuple[list[int], int]:
    D = len(sizes)
    order = rng.permutation(D)
    row = [-1] * D
    first = order[0]
    counts = np.zeros(sizes[first])  # uncovered pairs each value of the first dimension takes part in
    for (i, j), u in uncovered.items():
        if i == first:
            counts += u.sum(1)
        elif j == first:
            counts += u.sum(0)
    row[first] = _argmax(counts, rng)
    gain = 0
    for d in order[1:]:
        score = np.zeros(sizes[d])
        for k in range(D):
            if row[k] >= 0:
                score += uncovered[(k, d)][row[k]] if k < d else uncovered[(d, k)][:, row[k]]
        row[d] = _argmax(score, rng)
        gain += int(score[row[d]])
    return row, gain


def _argmax(scores, rng) -> int:
    best = np.flatnonzero(scores == scores.max())
    return int(best[rng.integers(len(best))])


def uncovered_pairs(rows, sizes: list[int]) -> list[tuple]:
    """Pairs ((dim i, value a), (dim j, value b)) that no row holds; empty for a covering array."""
    seen = {(i, r[i], j, r[j]) for r in rows for i in range(len(sizes)) for j in range(i + 1, len(sizes))}
    return [((i, a), (j, b)) for i in range(len(sizes)) for j in range(i + 1, len(sizes))
            for a in range(sizes[i]) for b in range(sizes[j]) if (i, a, j, b) not in seen]


# ---------------------------------------------------------------------------------------------------------------
# Prompt plans


def weighted(text: str, weight) -> str:
    return text if weight in (None, 1, 1.0) or not text else f"({text}:{float(weight):g})"


class PromptPlan:
    """The prompt of image ``index`` of a class: a template plus one option per dimension, from a covering array.

    With several templates, the template is one more dimension of the array, so templates and options mix evenly.
    ``weights`` maps ``class``, ``superclass`` or a dimension name to its term weight (P4: class 1.5, superclass 1.2).
    """

    def __init__(self, templates, dimensions: dict, weights: dict | None = None, superclass: str = "", seed: int = 0):
        self.templates, self.superclass, self.weights = list(templates), superclass, dict(weights or {})
        self.dimensions = {k: list(v) for k, v in dimensions.items()}
        axes = ([len(self.templates)] if len(self.templates) > 1 else []) + [len(v) for v in self.dimensions.values()]
        self.rows = covering_array(axes, seed)

    def __len__(self) -> int:
        return len(self.rows)

    def prompt(self, class_text: str, index: int) -> str:
        row = list(self.rows[index % len(self.rows)])
        template = self.templates[row.pop(0)] if len(self.templates) > 1 else self.templates[0]
        head = template.format(c=weighted(class_text, self.weights.get("class")),
                               superclass=weighted(self.superclass, self.weights.get("superclass")))
        terms = [weighted(opts[v], self.weights.get(dim)) for (dim, opts), v in zip(self.dimensions.items(), row)]
        return ", ".join([head] + terms)


# ---------------------------------------------------------------------------------------------------------------
# Options from a local LLM (P4 used Llama-2-7B-chat)


LLM_PROMPT = ("List {n} different, concrete options for the '{dimension}' of a photo of a {superclass}. "
              "Write one short option per line, with no numbering and no other text.")


LIST_MARKER = re.compile(r"^\s*(?:[-*\u2022\u2013]|\d+[.):]|\(\d+\))\s+")
# How chat models open and close an answer ("Sure! Here are 10 options:", "Let me know if you need more.").
CHATTER = re.compile(r"^(?:here(?:'s| is| are| you go)|sure\b|certainly\b|of course\b|absolutely\b|okay,|"
                     r"below (?:is|are)\b|i hope\b|hope (?:this|these|that)\b|let me know\b|feel free\b|i've\b|"
                     r"i have\b)", re.IGNORECASE)
QUOTES = "\"'`\u201c\u201d\u2018\u2019*_"


def parse_options(text: str, n: int) -> list[str]:
    """Options from an LLM answer, one per line, up to ``n``.

    Bullets, numbering, quotes and markdown emphasis are stripped; duplicates are dropped; so are the model's
    preamble and epilogue ("Here you go:", "Sure! Here are 10 options:", "Let me know if you need more."): a line
    ending in a colon or opening like chat, and, when the answer is a bulleted or numbered list, every line that is
    not an item of it.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(LIST_MARKER.match(line) for line in lines):
        lines = [LIST_MARKER.sub("", line, count=1) for line in lines if LIST_MARKER.match(line)]
    out = []
    for line in lines:
        option = line.strip(QUOTES + " ").rstrip(".,;").strip(QUOTES + " ")
        if (not option or option.endswith(":") or CHATTER.match(option) or len(option) > 80
                or option.lower() in {o.lower() for o in out}):
            continue
        out.append(option)
    return out[:n]


def llm_options(generate, dimension: str, superclass: str, n: int) -> list[str]:
    """Ask ``generate(prompt) -> text`` for ``n`` options of one contextual dimension."""
    options = parse_options(generate(LLM_PROMPT.format(n=n, dimension=dimension, superclass=superclass or "scene")), n)
    if len(options) < 2:
        raise ValueError(f"The LLM gave {len(options)} usable options for dimension {dimension!r}; "
                         f"write them into the recipe under synthetic.dimensions instead")
    return options


def local_llm(model: str, max_new_tokens: int = 400):
    """``generate(prompt) -> text`` from a transformers causal LM already on disk (never downloads); greedy, so
    every shard that asks gets the same options."""
    from ..utils import require

    transformers = require("transformers", "synth")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model, local_files_only=True)
        lm = transformers.AutoModelForCausalLM.from_pretrained(model, local_files_only=True).eval()
    except OSError as e:
        raise FileNotFoundError(f"The local LLM {model!r} (recipe key 'synthetic.llm') is not on disk; give a folder "
                                f"or a model already in the Hugging Face cache ({str(e).splitlines()[0][:160]})") from e

    def generate(prompt: str) -> str:
        import torch

        if getattr(tok, "chat_template", None):
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = lm.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


# ---------------------------------------------------------------------------------------------------------------
# Weighted prompts -> text embeddings


def parse_weighted(prompt: str) -> list[tuple[str, float]]:
    """``"a (keeshond:1.5) dog"`` -> [("a ", 1.0), ("keeshond", 1.5), (" dog", 1.0)]; other brackets stay text."""
    out, pos = [], 0
    for m in WEIGHTED.finditer(prompt):
        if m.start() > pos:
            out.append((prompt[pos:m.start()], 1.0))
        out.append((m.group(1), float(m.group(2))))
        pos = m.end()
    if pos < len(prompt):
        out.append((prompt[pos:], 1.0))
    return out


def plain_text(prompt: str) -> str:
    """The prompt with its weight markup removed (what a model without weighting would read)."""
    return "".join(t for t, _ in parse_weighted(prompt))


def weighted_tokens(tokenizer, prompt: str) -> tuple[list[int], list[float]]:
    """Token ids (BOS ... EOS, padded to the tokenizer's length) and one weight per token."""
    n = tokenizer.model_max_length
    ids, ws = [], []
    for text, w in parse_weighted(prompt):
        t = tokenizer(text, add_special_tokens=False).input_ids
        ids, ws = ids + t, ws + [w] * len(t)
    if len(ids) > n - 2:
        log.warning("Prompt truncated to %d tokens: %r", n - 2, prompt)
    ids, ws = ids[: n - 2], ws[: n - 2]
    pad = n - 2 - len(ids)
    return ([tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad,
            [1.0] + ws + [1.0] * (pad + 1))


def apply_weights(z, z_empty, w):
    """Move each token's embedding away from the empty prompt's by its weight (compel's convention): weight 1 keeps
    it, 1.5 pushes the term further, 0.5 fades it. Scaling by the empty prompt keeps the result in range."""
    return z_empty + (z - z_empty) * w[:, :, None]


def encode_weighted(tokenizer, text_encoder, prompts: list[str], layer: int = 0):
    """(hidden states [B, 77, D], pooled output) for weighted prompts.

    ``layer`` 0 takes the final (normed) hidden state as SD 1.x/2.x do; -2 takes the penultimate layer as SDXL does.
    With every weight 1 this equals the pipeline's own encoding.
    """
    import torch

    pairs = [weighted_tokens(tokenizer, p) for p in prompts + [""]]
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([p[0] for p in pairs], device=device)
    w = torch.tensor([p[1] for p in pairs[:-1]], device=device)
    with torch.no_grad():
        out = text_encoder(ids, output_hidden_states=layer != 0)
    z = (out[0] if layer == 0 else out.hidden_states[layer])
    z, z_empty, pooled = z[:-1], z[-1:], out[0][:-1] if out[0].ndim == 2 else None
    rows = (w != 1).any(dim=1)
    if rows.any():  # prompts without weights keep the pipeline's exact encoding
        z = torch.where(rows[:, None, None], apply_weights(z, z_empty, w.to(z.dtype)), z)
    return z, pooled
