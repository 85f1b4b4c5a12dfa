"""Summary decoding with a KV cache: greedy, beam search, top-k / top-p sampling.

Sources are left-padded to one length and encoded once (prefix-LM: the source sees itself
bidirectionally); every new token then attends to the cached source and earlier output.
A model with copy attention gives its copy mixture's log-probabilities as the logits, the
copy distribution read off the cached source (shared by a document's beams) at every step;
the strategies below treat them as any logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.cache import KVCache
from model.losses import autocast_dtype
from model.transformer import MiniTuringModel, never_predicted


@dataclass
class DecodingConfig:
    max_new_tokens: int = 32
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 1

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("choose sampling (do_sample) or beam search (num_beams > 1), not both")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


def _left_pad(sources: list[list[int]], pad_id: int, device: torch.device):
    length = max(len(s) for s in sources)
    ids = torch.full((len(sources), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sources), length), dtype=torch.long)
    for i, s in enumerate(sources):
        ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, length - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _rows(mask: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if mask is None else mask[index]


def _banned_ngram_tokens(generated: list[list[int]], n: int) -> list[list[int]]:
    """For each row, the tokens that would repeat an n-gram already in that row."""
    banned = []
    for seq in generated:
        if n <= 0 or len(seq) < n:
            banned.append([])
            continue
        prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
        row = [
            seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix
        ]
        banned.append(row)
    return banned


class Decoder:
    """Holds the per-batch decoding state shared by the three strategies."""

    def __init__(self, model: MiniTuringModel, sources: list[list[int]], cfg: DecodingConfig):
        cfg.validate()
        self.model, self.cfg = model, cfg
        conf = model.config
        self.eos = conf.eos_token_id
        self.pad = conf.pad_token_id
        self.device = next(model.parameters()).device
        # The cache holds keys and values as the layers make them: in the autocast dtype if on.
        self.dtype = autocast_dtype(self.device.type, next(model.parameters()).dtype)
        self.ids, self.mask = _left_pad(sources, self.pad, self.device)
        # Sources of one length need no mask at all: attention then takes its unmasked kernel.
        self.padded = not bool(self.mask.all())
        self.source_len = self.ids.shape[1]
        # Rotary positions have no limit: only a learned table's size bounds the sequence.
        limit = conf.position_limit
        if limit is not None and self.source_len + cfg.max_new_tokens > limit:
            raise ValueError(
                f"source ({self.source_len} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                f"exceeds the model's {limit} positions"
            )
        self.never = never_predicted(conf, allow=self.eos, device=self.device)

    def encode(self, repeat: int) -> tuple[torch.Tensor, KVCache, torch.Tensor, torch.Tensor]:
        """Run the source through the model once; with ``repeat`` > 1 beams, the cached source
        is shared by a document's beams (not copied) and the rest repeated for each beam."""
        b = self.ids.shape[0]
        cache = KVCache(
            self.model.config,
            b,
            self.source_len + self.cfg.max_new_tokens,
            dtype=self.dtype,
            device=self.device,
        )
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        # The source sees itself both ways: no prefix-LM mask is needed while it is alone.
        mask = self.mask if self.padded else None  # None: no padding anywhere, ever
        out = self.model(
            self.ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            last_token_only=True,
        )
        logits = out.logits.float()
        next_pos = positions[:, -1] + 1
        if repeat > 1:
            index = torch.arange(b, device=self.device).repeat_interleave(repeat)
            cache.share(repeat)
            logits, mask, next_pos = logits[index], _rows(mask, index), next_pos[index]
        return logits, cache, mask, next_pos

    def step(self, tokens: torch.Tensor, cache: KVCache, mask, pos: torch.Tensor):
        """One new token a row; ``mask`` (rows, keys so far) marks real positions, or is None
        when no source was padded."""
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = self.model(
            tokens.view(-1, 1),
            attention_mask=mask,
            position_ids=pos.view(-1, 1),
            cache=cache,
            last_token_only=True,
        )
        return out.logits.float(), mask, pos + 1

    def allowed(self, logits: torch.Tensor, generated: list[list[int]], step: int) -> torch.Tensor:
        """The logits with every token that may not come next at -inf (never-predicted ids,
        end-of-sequence before min_new_tokens, repeated n-grams); scaled by the temperature
        when sampling. Their log_softmax gives the log-probabilities; greedy needs only argmax."""
        logits = logits / self.cfg.temperature if self.cfg.do_sample else logits
        logits = logits.masked_fill(self.never, float("-inf"))
        if step < self.cfg.min_new_tokens:
            logits[:, self.eos] = float("-inf")
        banned = _banned_ngram_tokens(generated, self.cfg.no_repeat_ngram_size)
        rows = [row for row, tokens in enumerate(banned) for _ in tokens]
        if rows:  # one indexed write for the whole batch
            cols = [token for tokens in banned for token in tokens]
            logits[rows, cols] = float("-inf")
        return logits


# ---------------------------------------------------------------------------- strategies


def _sample(logp: torch.Tensor, top_k: int, top_p: float, generator) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logp, min(top_k, logp.shape[-1]), dim=-1).values[:, -1:]
        logp = logp.masked_fill(logp < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = torch.sort(logp, descending=True, dim=-1)
        cumulative = sorted_logp.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop = cumulative - sorted_logp.softmax(-1) >= top_p
        sorted_logp = sorted_logp.masked_fill(drop, float("-inf"))
        logp = torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_logp)
    return torch.multinomial(logp.softmax(-1), 1, generator=generator).squeeze(-1)


def _greedy_or_sample(dec: Decoder, generator) -> list[list[int]]:
    cfg = dec.cfg
    logits, cache, mask, pos = dec.encode(1)
    b = logits.shape[0]
    generated: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b  # a finished row goes on feeding end-of-sequence, ignored
    for step in range(cfg.max_new_tokens):
        logits = dec.allowed(logits, generated, step)
        if cfg.do_sample:
            tokens = _sample(logits.log_softmax(-1), cfg.top_k, cfg.top_p, generator)
        else:
            tokens = logits.argmax(-1)
        chosen = tokens.tolist()
        for row, tok in enumerate(chosen):
            if done[row]:
                chosen[row] = dec.eos
            else:
                generated[row].append(tok)
                done[row] = tok == dec.eos
        if all(done) or step == cfg.max_new_tokens - 1:
            break
        tokens = torch.tensor(chosen, device=dec.device)
        logits, mask, pos = dec.step(tokens, cache, mask, pos)
    return [[t for t in g if t != dec.eos] for g in generated]


def _beam_search(dec: Decoder) -> list[list[int]]:
    cfg, k = dec.cfg, dec.cfg.num_beams
    logits, cache, mask, pos = dec.encode(k)
    b = logits.shape[0] // k
    vocab = logits.shape[-1]
    # Only the first beam is live at the start, so the k beams begin with k different tokens.
    scores = torch.full((b, k), float("-inf"), device=dec.device)
    scores[:, 0] = 0.0
    beams: list[list[int]] = [[] for _ in range(b * k)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    closed = [False] * b

    def normalised(score: float, length: int) -> float:
        return score / (max(length, 1) ** cfg.length_penalty)

    for step in range(cfg.max_new_tokens):
        logp = dec.allowed(logits, beams, step).log_softmax(-1)
        candidates = (scores.view(-1, 1) + logp).view(b, k * vocab)
        top_scores, top_index = torch.topk(candidates, 2 * k, dim=-1)
        top_scores, top_index = top_scores.tolist(), top_index.tolist()
        # The next beams, kept in lists and made tensors once (no per-element tensor writes).
        next_scores = [[float("-inf")] * k for _ in range(b)]
        next_tokens = [dec.eos] * (b * k)
        source_beam = list(range(b * k))
        new_beams: list[list[int]] = [[] for _ in range(b * k)]
        for i in range(b):
            if closed[i]:
                for j in range(k):
                    new_beams[i * k + j] = beams[i * k + j]
                continue
            filled = 0
            for score, index in zip(top_scores[i], top_index[i], strict=True):
                if score == float("-inf"):
                    break
                beam, token = divmod(index, vocab)
                history = beams[i * k + beam]
                if token == dec.eos:
                    finished[i].append((normalised(score, len(history) + 1), history))
                    continue
                next_scores[i][filled] = score
                next_tokens[i * k + filled] = token
                source_beam[i * k + filled] = i * k + beam
                new_beams[i * k + filled] = history + [token]
                filled += 1
                if filled == k:
                    break
            best_live = next_scores[i][0]
            if len(finished[i]) >= k:
                worst_kept = sorted(s for s, _ in finished[i])[-k]
                # Scores only fall as hypotheses grow, so a live beam cannot overtake.
                if normalised(best_live, step + 1) <= worst_kept or best_live == float("-inf"):
                    closed[i] = True
        beams, scores = new_beams, torch.tensor(next_scores, device=dec.device)
        if all(closed) or step == cfg.max_new_tokens - 1:
            break
        index = torch.tensor(source_beam, device=dec.device)
        # A beam only ever continues a beam of the same document: the source part stays.
        cache.reorder(index, start=dec.source_len)
        mask, pos = _rows(mask, index), pos[index]
        tokens = torch.tensor(next_tokens, device=dec.device)
        logits, mask, pos = dec.step(tokens, cache, mask, pos)

    results = []
    for i in range(b):
        pool = list(finished[i])
        if not closed[i]:
            for j in range(k):
                s = scores[i, j].item()
                if s != float("-inf"):
                    pool.append((normalised(s, len(beams[i * k + j])), beams[i * k + j]))
        results.append(max(pool, key=lambda p: p[0])[1] if pool else [])
    return results


@torch.inference_mode()
def generate(
    model: MiniTuringModel,
    sources: list[list[int]],
    cfg: DecodingConfig | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Generate a target for each source (token ids including the [CLS] ... [SEP] frame).

    Returns the generated token ids per source, without the end-of-sequence token.
    """
    cfg = cfg or DecodingConfig()
    if not sources:
        return []
    if any(len(s) == 0 for s in sources):
        raise ValueError("every source must have at least one token")
    was_training = model.training
    model.eval()
    try:
        dec = Decoder(model, sources, cfg)
        if cfg.num_beams > 1:
            return _beam_search(dec)
        return _greedy_or_sample(dec, generator)
    finally:
        model.train(was_training)
