"""The inference API: ``model.load(run_folder)`` -> ``fill_mask``, ``summarize`` and
``generate(texts, task=...)`` for the run's named text-to-text tasks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from model.config import MiniTuringConfig
from model.files import atomic_write_text
from model.generate import DecodingConfig, generate
from model.tokenizer import DEFAULT_TASK, TokenizerError, check_compatible, load_tokenizer
from model.transformer import MiniTuringModel, never_predicted

MASK_LITERAL = "[MASK]"
GENERATION_FILE = "generation_config.json"
# summarize's decoding when neither the call nor the run folder says otherwise.
DEFAULT_GENERATION = dict(
    max_new_tokens=32, num_beams=4, length_penalty=1.0, no_repeat_ngram_size=3, min_new_tokens=1
)


class RunFolderError(ValueError):
    """A folder that is not a loadable run, or whose parts disagree."""


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MiniTuringModel, object]:
    """The model and tokenizer of a run folder, checked against each other."""
    folder = Path(path)
    if not folder.is_dir():
        raise RunFolderError(f"{folder} is not a folder: expected a run folder (e.g. runs/default)")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise RunFolderError(f"{folder} is not a complete run folder: {name} is missing")
    try:
        config = MiniTuringConfig.from_pretrained(folder)
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise RunFolderError(
            f"{folder / 'config.json'} is not a valid minituring config: {err}"
        ) from None
    tokenizer = load_tokenizer(folder)
    try:
        check_compatible(tokenizer, config, where=str(folder))
    except TokenizerError as err:
        raise RunFolderError(str(err)) from None
    model = MiniTuringModel(config)
    against = str(folder / "config.json")
    model.load_state_dict(checked_weights(folder / "model.safetensors", model, against=against))
    return model.to(device).eval(), tokenizer


def checked_weights(
    path: Path, model: torch.nn.Module | None = None, *, against: str = "the model"
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (never a pickle), checked against ``model``'s parameter
    names and shapes when given. A ``RunFolderError`` names the file, what it should have
    matched (``against``) and the first five keys missing, unexpected or mis-shaped."""
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise RunFolderError(
            f"{path} is not a valid safetensors file ({err}); "
            "weights are only ever read from safetensors"
        ) from None
    if model is None:
        return weights
    return matching_weights(weights, model, path, against=against)


def matching_weights(
    weights: dict[str, torch.Tensor], model: torch.nn.Module, path: Path, *, against: str
) -> dict[str, torch.Tensor]:
    """``weights`` (read from ``path``) checked against ``model``'s parameter names and shapes,
    as :func:`checked_weights` checks them."""
    expected = model.state_dict()
    problems = [f"{k} is missing" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [
        f"{k} has shape {tuple(weights[k].shape)}, config implies {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if problems:
        raise RunFolderError(f"{path} does not match {against}: " + "; ".join(problems[:5]))
    return weights


class LM:
    """A trained model with its tokenizer, ready to fill masks and summarize."""

    def __init__(
        self,
        model: MiniTuringModel,
        tokenizer,
        source_len: int | None = None,
        generation: dict | None = None,
        task_generation: dict[str, dict] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.source_len = source_len or self.config.length("source_len")
        # The decoding defaults of summarize: the run's, over the package's.
        self.generation = {**DEFAULT_GENERATION, **(generation or {})}
        # Each named task's: its own, from the run's training targets, over the package's.
        self.task_generation = {
            task: {**DEFAULT_GENERATION, **(task_generation or {}).get(task, {})}
            for task in self.task_tokens
        }

    @property
    def task_tokens(self) -> dict[str, int]:
        """The named tasks the model was trained on, name -> the id of its token."""
        return dict(getattr(self.config, "task_tokens", None) or {})

    @property
    def tasks(self) -> list[str]:
        """What ``generate(task=...)`` accepts: ``summarize`` and the run's named tasks."""
        return [DEFAULT_TASK, *self.task_tokens]

    def generation_for(self, task: str) -> dict:
        """A task's decoding defaults (``generation_config.json``, else the package's)."""
        self._check_task(task)
        return self.generation if task == DEFAULT_TASK else self.task_generation[task]

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(
                f"unknown task {task!r}: this model was trained on {', '.join(self.tasks)}"
            )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ fill-mask

    @torch.inference_mode()
    def fill_mask(self, text: str | list[str], top_k: int = 5):
        """Top-k predictions for each ``[MASK]``.

        One text with one mask -> a list of {"token", "token_id", "score", "sequence"};
        with several masks -> one such list per mask; a list of texts -> one result per text.
        A text without a mask (``""`` included) is a ``ValueError``.
        """
        if isinstance(text, str):
            return self._fill_batch([text], top_k)[0]
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            raise TypeError("fill_mask expects a string or a list of strings")
        return self._fill_batch(text, top_k)

    def _fill_batch(self, texts: list[str], top_k: int) -> list:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not texts:
            return []
        tok, limit = self.tokenizer, self.config.position_limit  # None: rotary, no limit
        encoded = []
        for i, text in enumerate(texts):
            if MASK_LITERAL not in text and tok.mask_token not in text:
                raise ValueError(f"text {i} has no {MASK_LITERAL} to fill: {text[:80]!r}")
            ids = tok(text.replace(MASK_LITERAL, tok.mask_token))["input_ids"]
            if limit is not None and len(ids) > limit:
                raise ValueError(
                    f"text {i} is {len(ids)} tokens long; the model reads at most {limit}: shorten it"
                )
            encoded.append(ids)
        length = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), length), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
            attention[i, : len(e)] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        logits = self.model(ids, attention_mask=attention).logits.float()
        logits = logits.masked_fill(never_predicted(self.config, device=self.device), float("-inf"))
        probs = logits.softmax(-1)
        results = []
        for i, e in enumerate(encoded):
            positions = [p for p, t in enumerate(e) if t == tok.mask_token_id]
            per_mask = []
            for p in positions:
                scores, top = probs[i, p].topk(min(top_k, probs.shape[-1]))
                options = []
                for score, token_id in zip(scores.tolist(), top.tolist(), strict=True):
                    filled = list(e)
                    filled[p] = token_id
                    options.append(
                        {
                            "token": tok.decode([token_id]),
                            "token_id": token_id,
                            "score": score,
                            "sequence": tok.decode(filled, skip_special_tokens=True).strip(),
                        }
                    )
                per_mask.append(options)
            results.append(per_mask[0] if len(per_mask) == 1 else per_mask)
        return results

    # ------------------------------------------------------------------ summarize, generate

    def summarize(
        self,
        text: str | list[str],
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        min_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 16,
        max_source_tokens: int | None = None,
    ) -> str | list[str]:
        """A summary per document: ``generate(text, task="summarize", ...)``. Documents longer
        than ``max_source_tokens`` (default: the model's source length from training) are
        truncated to their beginning; a model with learned positions reads at most its
        positions less ``max_new_tokens``, one with rotary positions (``position: rope``) any
        length. The decoding options left out (None) come from the run's
        ``generation_config.json``, else ``DEFAULT_GENERATION``; ``num_beams`` is 1 when
        sampling. An empty or whitespace-only document gets ``""``, without running the model
        (the others in a list are summarized as usual, in order)."""
        return self.generate(
            text,
            task=DEFAULT_TASK,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            max_source_tokens=max_source_tokens,
        )

    @torch.inference_mode()
    def generate(
        self,
        text: str | list[str],
        task: str = DEFAULT_TASK,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        length_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
        min_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 16,
        max_source_tokens: int | None = None,
    ) -> str | list[str]:
        """The output of ``task`` (``summarize``, or a named task of the run: ``lm.tasks``) for
        each text, as ``summarize`` describes, decoded with that task's defaults (its own
        ``generation_config.json`` entry) under the options given. A named task's source
        starts with its token, as in training."""
        self._check_task(task)
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{'summarize' if task == DEFAULT_TASK else 'generate'} expects a "
                            "string or a list of strings")  # fmt: skip
        given = dict(
            max_new_tokens=max_new_tokens,
            num_beams=num_beams if num_beams is not None else (1 if do_sample else None),
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            min_new_tokens=min_new_tokens,
        )
        defaults = self.generation_for(task)
        options = {**defaults, **{k: v for k, v in given.items() if v is not None}}
        cfg = DecodingConfig(
            **options, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p
        )
        cfg.validate()
        max_new_tokens = cfg.max_new_tokens
        tok = self.tokenizer
        room = max_source_tokens if max_source_tokens is not None else self.source_len
        if room < 3:
            raise ValueError(f"max_source_tokens must be >= 3 (a word and the frame), got {room}")
        limit = self.config.position_limit  # None: rotary positions, no limit
        if limit is not None and limit - max_new_tokens < 3:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for the source in "
                f"{limit} positions"
            )
        if limit is not None:
            room = min(room, limit - max_new_tokens)
        # Nothing to summarize is summarized by nothing: the model would make text up.
        wanted = [i for i, t in enumerate(texts) if t.strip()]
        head = [tok.cls_token_id]
        if task != DEFAULT_TASK:
            head.append(self.task_tokens[task])
        sources = []
        for i in wanted:
            body = tok(texts[i], add_special_tokens=False)["input_ids"][: room - 1 - len(head)]
            sources.append([*head, *body, tok.sep_token_id])
        generator = None
        if do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        outputs = []
        for start in range(0, len(sources), batch_size):
            outputs += generate(self.model, sources[start : start + batch_size], cfg, generator)
        summaries = [""] * len(texts)
        for i, s in zip(wanted, tok.batch_decode(outputs, skip_special_tokens=True), strict=True):
            summaries[i] = s.strip()
        return summaries[0] if single else summaries


def load(path: str | Path, device: str | torch.device = "cpu") -> LM:
    """Load a run folder for inference (CPU by default)."""
    model, tokenizer = load_model(path, device)
    return LM(
        model,
        tokenizer,
        generation=read_generation_config(path),
        task_generation=read_task_generation(path),
    )


# generation_config.json's entry for the named tasks' decoding defaults, each under its name.
TASKS_KEY = "tasks"


def _checked_options(options: dict, where: str = "") -> None:
    unknown = set(options) - set(DEFAULT_GENERATION)
    if unknown:
        raise TypeError(f"not decoding options{where}: {', '.join(sorted(unknown))}")
    GenerationConfig(**options).validate()  # what transformers would refuse, refused here


def save_generation_config(
    folder: str | Path, tasks: dict[str, dict] | None = None, **options
) -> None:
    """Write the run's decoding defaults as ``generation_config.json`` (Hugging Face's file:
    ``GenerationConfig.from_pretrained(folder)`` reads it), atomically: ``summarize``'s at the
    top level, and each named task's (``tasks``, name -> options) under ``"tasks"``, which a
    run without named tasks does not write."""
    _checked_options(options)
    values = dict(options)
    if tasks:
        for name, task_options in tasks.items():
            _checked_options(task_options, f" of task {name}")
        values[TASKS_KEY] = {name: dict(task_options) for name, task_options in tasks.items()}
    atomic_write_text(Path(folder) / GENERATION_FILE, json.dumps(values, indent=2) + "\n")


def _generation_values(folder: str | Path) -> dict:
    path = Path(folder) / GENERATION_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path} is not a valid generation config: {err}") from None
    if not isinstance(values, dict) or not isinstance(values.get(TASKS_KEY, {}), dict):
        raise RunFolderError(f"{path} is not a valid generation config: expected an object")
    return values


def read_generation_config(folder: str | Path) -> dict:
    """The decoding options a run folder's ``generation_config.json`` sets for ``summarize``
    (none without it)."""
    values = _generation_values(folder)
    return {k: values[k] for k in DEFAULT_GENERATION if k in values}


def read_task_generation(folder: str | Path) -> dict[str, dict]:
    """The decoding options ``generation_config.json`` sets for each named task, by name."""
    tasks = _generation_values(folder).get(TASKS_KEY, {})
    return {
        name: {k: v[k] for k in DEFAULT_GENERATION if k in v}
        for name, v in tasks.items()
        if isinstance(v, dict)
    }
