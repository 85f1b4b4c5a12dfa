"""The run folder's checkpoints: written atomically, read without ever running code.

Layout (a Hugging Face model folder plus the trainer's state)::

    RUN/config.json  tokenizer.json  tokenizer_config.json  model.safetensors  metrics.jsonl
    RUN/checkpoints/step-0000400/{model.safetensors, optimizer.pt, rng.pt, state.json}
    RUN/checkpoints/step-0000400/{dcp/, rng.pt, state.json}   under FSDP: sharded weights + optimizer
    RUN/checkpoints/latest        name of the newest complete checkpoint
    RUN/checkpoints/step-0000400/kept.safetensors   the kept weights, when not this step's

RUN/model.safetensors is the kept weights (``trainer/keep.py``: during a run the best
validation evaluation's, written when it happens by ``save_kept_weights``), else the latest
checkpoint's. A checkpoint holds the kept weights of its moment (a copy), so a resumed run
restores them with its state.

Writing never stores non-finite weights, and a failed write (disk full) leaves nothing
half-written behind; reading names the file at fault.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.api import RunFolderError, checked_weights
from model.config import MiniTuringConfig
from model.files import atomic_path, atomic_write_text, fsync_dir, fsync_file
from model.transformer import MiniTuringModel
from trainer.distributed import Env, full_state_dict, is_fsdp
from trainer.errors import TrainingError
from trainer.optim import optimizer_parts


def fsync_files(folder: Path) -> None:
    """Flush every file under ``folder`` to disk, so that once the folder is renamed into place
    its contents survive a power cut too, not only a crash."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fsync_file(path)


def _checkpoint_step(path: Path) -> int:
    """The step of a ``step-N`` checkpoint folder (numerically: names may outgrow the padding)."""
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.items()},
            str(tmp),
            metadata={"format": "pt"},
        )
        os.chmod(tmp, 0o644)


def _copy_weights(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src``, atomically. A copy, not a hard link: a file written
    over in place (``cp``) would change the checkpoint's copy too."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


class Checkpointer:
    """Saves and restores everything a run needs, atomically (the layout is the module's doc).

    A checkpoint is written under a temporary name and renamed when complete, then ``latest``
    is switched; a crash at any point leaves the previous one whole. Weights are safetensors;
    the optimizer is loaded with ``weights_only=True``: opening a run never executes code.
    """

    def __init__(self, folder: Path, keep: int, main: bool = True, every: int = 0) -> None:
        self.folder, self.keep, self.main = folder, max(keep, 1), main
        self.every = every  # --save-every: the steps whose checkpoints are on the schedule
        self.dir = folder / "checkpoints"

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names; if the pointer is missing or names no complete
        checkpoint (a crash between renaming the first checkpoint and writing the pointer),
        the newest complete ``step-*`` folder: a folder gets that name only once complete."""
        pointer = self.dir / "latest"
        if pointer.is_file():
            path = self.dir / pointer.read_text().strip()
            if path.name.startswith("step-") and (path / "state.json").is_file():
                return path
        complete = [p for p in self.dir.glob("step-*") if (p / "state.json").is_file()]
        return max(complete, key=_checkpoint_step) if complete else None

    def write(self, model: MiniTuringModel, optimizer, state: dict, export: bool = True) -> Path:
        """Write checkpoint ``step-N`` of ``state["step"]`` (weights, optimizer, RNG, state) and
        publish it, unchecked: ``save_checkpoint`` is the checked save. Called on every rank. A
        replicated model (one process, DDP) is written by rank 0 alone; a sharded one (FSDP)
        by all ranks together (see ``_save_sharded``). ``export``: these weights are the kept
        ones (RUN/model.safetensors); else RUN/model.safetensors already holds the kept ones."""
        if is_fsdp(model):
            return self._save_sharded(model, optimizer, state, export)
        if not self.main:
            return self.dir / f"step-{state['step']:07d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{state['step']:07d}"
        tmp = self.dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        weights = model.state_dict()
        _save_weights(weights, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        return self._publish(tmp, name, weights, state, export)

    def _publish(self, tmp: Path, name: str, weights: dict, state: dict, export: bool) -> Path:
        """Rank 0's part of every save, once the weights and optimizer are in ``tmp``: add the
        kept weights (unless they are these), the RNG and JSON state, flush, rename into place,
        switch ``latest``, export the weights for inference (if they are the kept ones),
        prune."""
        if not export:
            _copy_weights(self.folder / "model.safetensors", tmp / "kept.safetensors")
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        torch.save(rng, tmp / "rng.pt")
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        fsync_files(tmp)
        final = self.dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.dir)
        atomic_write_text(self.dir / "latest", name)
        if export:  # the folder's own model.safetensors: the kept weights, for inference
            _save_weights(weights, self.folder / "model.safetensors")
        self._prune(keep_name=name)
        return final

    def _save_sharded(self, model, optimizer, state: dict, export: bool) -> Path:
        """FSDP: every rank writes its own shards of the weights and optimizer state with
        torch.distributed.checkpoint into ``step-N/dcp/``, so no process ever holds the whole
        model or optimizer; rank 0 then adds the JSON state and renames the folder. Only the
        inference export (``RUN/model.safetensors``) is gathered, onto rank 0's CPU."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"step-{state['step']:07d}"
        tmp, final = self.dir / f".{name}.tmp", self.dir / name
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "dcp").mkdir(parents=True)
        torch.distributed.barrier()
        model_state, optim_state = get_state_dict(model, optimizer_parts(optimizer))
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
        weights = full_state_dict(model) if export else {}  # collective: every rank takes part
        if self.main:
            self._publish(tmp, name, weights, state, export)
        torch.distributed.barrier()
        return final

    def finish(self, path: Path, model: torch.nn.Module) -> None:
        """Redo the last steps of publishing ``path``, the export for inference and the pruning,
        which a crash right after ``latest`` was switched cuts short; a run resumed from it
        with nothing left to train would otherwise leave them undone; and put back the kept
        weights the checkpoint holds (a later evaluation of the abandoned run may have replaced
        them). Every rank calls it (the export is gathered under FSDP)."""
        kept = path / "kept.safetensors"
        weights = {} if kept.is_file() else full_state_dict(model)
        if self.main:
            if kept.is_file():
                _copy_weights(kept, self.folder / "model.safetensors")
            else:
                _save_weights(weights, self.folder / "model.safetensors")
            self._prune(keep_name=path.name)

    def _prune(self, keep_name: str) -> None:
        """Keep the newest ``keep`` checkpoints up to ``keep_name`` (complete, and named by
        ``latest`` by now). Later ones belong to a history abandoned when the run was resumed
        from an earlier checkpoint; they go too. So do older ones off the --save-every schedule
        (written when a signal stopped the run): once a newer checkpoint exists, the folder
        holds what a run never stopped would hold."""
        done = sorted((p for p in self.dir.glob("step-*") if p.is_dir()), key=_checkpoint_step)
        newest = _checkpoint_step(self.dir / keep_name)
        behind = [p for p in done if _checkpoint_step(p) <= newest]
        ahead = [p for p in done if _checkpoint_step(p) > newest]
        off = [p for p in behind if self.every and _checkpoint_step(p) % self.every]
        off = [p for p in off if p.name != keep_name]
        behind = [p for p in behind if p not in off]
        for old in behind[: -self.keep] + ahead + off:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, model: MiniTuringModel, optimizer) -> dict:
        """Restore into ``model`` (plain, DDP's inner module, or FSDP) whatever wrote ``path``:
        a sharded checkpoint is resharded to this run's ranks, a plain one is sharded on load."""
        if (path / "dcp").is_dir():
            check_sharded_metadata(path / "dcp")
            with _sharded_load_errors(path / "dcp"):
                _load_sharded(path / "dcp", model, optimizer)
        elif is_fsdp(model):
            _load_plain_into_fsdp(path, model, optimizer)
        else:
            model.load_state_dict(read_weights(path / "model.safetensors", model))
            _load_optimizer(optimizer, read_pickled(path / "optimizer.pt"), path / "optimizer.pt")
        rng = read_pickled(path / "rng.pt")
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            # A run saved on a box of 8 GPUs may resume on a machine with fewer.
            for i, cuda_state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, i)
        return read_state(path / "state.json")


def save_kept_weights(ckpt: Checkpointer, model, env: Env) -> None:
    """The model's weights now as RUN/model.safetensors, the kept weights (atomically; written
    by rank 0, gathered from every rank under FSDP)."""
    weights = full_state_dict(model) if is_fsdp(model) or env.main else {}
    if env.main:
        ckpt.folder.mkdir(parents=True, exist_ok=True)
        _save_weights(weights, ckpt.folder / "model.safetensors")


def kept_model(ckpt: Checkpointer, model: torch.nn.Module, device) -> MiniTuringModel:
    """A plain copy of ``model`` (plain or sharded) holding the kept weights, on ``device``."""
    with torch.device("meta"):
        replica = MiniTuringModel(model.config)
    path = ckpt.folder / "model.safetensors"
    replica.load_state_dict(read_weights(path, replica), assign=True)
    return replica.to(device)


def save_checkpoint(
    ckpt: Checkpointer, model, optimizer, state: dict, env: Env, export: bool = True
) -> None:
    """``ckpt.write``, refusing non-finite weights; a write that fails (disk full, a folder
    turned read-only) removes its partial files and says which checkpoint is intact."""
    name = f"step-{state['step']:07d}"
    bad = _non_finite_weights(model, env)
    if bad:
        raise TrainingError(
            f"the weights are not finite after step {state['step']} "
            f"({', '.join(bad[:3])}); they were not saved. {intact_checkpoint_note(ckpt)} "
            "Try a lower --lr or --clip-grad."
        )
    try:
        ckpt.write(model, optimizer, state, export)
    except OSError as err:
        shutil.rmtree(ckpt.dir / f".{name}.tmp", ignore_errors=True)
        with contextlib.suppress(OSError):
            (ckpt.folder / "model.safetensors.tmp").unlink(missing_ok=True)
        what = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        latest = ckpt.latest()
        if latest is not None and latest.name == name:
            problem = (
                f"checkpoint {name} is saved, but {ckpt.folder / 'model.safetensors'} "
                f"could not be updated ({what})."
            )
        else:
            problem = f"could not write checkpoint {name} in {ckpt.dir} ({what})."
        raise TrainingError(
            f"{problem} {intact_checkpoint_note(ckpt)} Make room (or fix the folder) and "
            f"continue with: python train.py --resume {ckpt.folder}"
        ) from None


def _non_finite_weights(model: torch.nn.Module, env: Env) -> list[str]:
    """Names of parameters holding NaN or infinity (on this process's shard), agreed by all."""
    bad = []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    if env.distributed:
        count = torch.tensor([len(bad)], device=env.device)
        torch.distributed.all_reduce(count)
        if int(count) and not bad:
            bad = ["parameters on another process"]
    return bad


def intact_checkpoint_note(ckpt: Checkpointer) -> str:
    """A sentence for an error message: which checkpoint a resumed run would continue from (the
    last complete one), or that there is none yet."""
    latest = ckpt.latest()
    if latest is None:
        return "No checkpoint of this run is complete yet."
    return f"The last complete checkpoint, {latest.name} in {ckpt.dir}, is intact."


# ---------------------------------------------------------------------------- reading


def read_weights(path: Path, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, checked against ``model``'s parameter names and shapes
    (``model.api.checked_weights``)."""
    if not path.is_file():
        raise TrainingError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return checked_weights(path, model, against="this run's model")
    except RunFolderError as err:
        raise TrainingError(str(err)) from None


def read_pickled(path: Path):
    """``torch.load`` restricted to tensors and plain containers (``weights_only``): whatever
    a checkpoint file holds, opening it never executes code."""
    if not path.is_file():
        raise TrainingError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        why = next((line.strip() for line in lines if "Unsupported" in line), None)
        if why is None:
            raise TrainingError(f"cannot read {path}: {lines[0] if lines else err}") from None
        raise TrainingError(
            f"refused to load {path}: it holds more than tensors and plain containers "
            f"({why}); checkpoints are read with torch.load(weights_only=True) and never run code"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise TrainingError(f"cannot read {path}: {str(err).splitlines()[0]}") from None


def read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise TrainingError(f"cannot read {path}: {err}") from None


def _load_optimizer(optimizer, state: dict, path: Path) -> None:
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as err:
        raise TrainingError(f"{path} does not fit this run's optimizer ({err})") from None


def _load_sharded(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Load a torch.distributed.checkpoint folder into this run's model and optimizer, whatever
    the number of ranks that wrote it: DCP reshards on load, into DTensors under FSDP or into
    plain tensors for one process or DDP (where every rank reads the whole state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer_parts(optimizer))
    state = {"model": model_state, "optim": optim_state}
    single = not torch.distributed.is_initialized()
    with warnings.catch_warnings():
        # One plain process reads every shard itself, which is what is meant here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=single, planner=safe_load_planner())
    set_state_dict(
        model,
        optimizer_parts(optimizer),
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
    )


def _load_plain_into_fsdp(path: Path, model: torch.nn.Module, optimizer) -> None:
    """A single-process or DDP checkpoint resumed under FSDP: every rank reads the full state and
    keeps its own shard. The optimizer's state is keyed by parameter index; this run's optimizer
    holds the same parameters in the same order (``make_optimizer``; with Muon, its groups then
    AdamW's), which gives their names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = read_pickled(path / "optimizer.pt")
    optim_state = {
        "state": {order[int(i)]: s for i, s in saved["state"].items()},
        "param_groups": [
            {**g, "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]
        ],
    }
    set_state_dict(
        model,
        optimizer_parts(optimizer),
        model_state_dict=read_weights(path / "model.safetensors"),
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )


# A sharded checkpoint (torch.distributed.checkpoint) unpickles its .metadata with plain pickle
# and its non-tensor entries (the optimizer's hyper-parameters) with weights_only=False: either
# could run code. The metadata is first read with an unpickler that admits only DCP's own
# record types, and the entries are read with weights_only=True.
_DCP_RECORD_MODULE = "torch.distributed.checkpoint.metadata"


_DCP_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == _DCP_RECORD_MODULE:
            import torch.distributed.checkpoint.metadata as records

            record = getattr(records, name, None)
            if isinstance(record, type):  # its dataclasses and enums; no functions
                return record
        raise pickle.UnpicklingError(f"Unsupported global: {module}.{name}")


def check_sharded_metadata(folder: Path) -> None:
    """Refuse a sharded checkpoint whose metadata holds anything but DCP's own records."""
    for path in sorted(folder.glob(".metadata*")):
        try:
            with open(path, "rb") as f:
                _DCPMetadataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise TrainingError(
                f"refused to load {path}: it holds more than checkpoint metadata ({err}); "
                "checkpoints never run code when opened"
            ) from None
        except Exception as err:  # a truncated or garbled file
            raise TrainingError(f"cannot read {path}: {err}") from None


def safe_load_planner():
    """DCP's default load planner, reading non-tensor entries with weights_only=True."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            plain = torch.load(value, weights_only=True)  # refuses anything but plain data
            again = io.BytesIO()
            torch.save(plain, again)
            again.seek(0)
            super().load_bytes(read_item, again)

    return SafeLoadPlanner()


@contextlib.contextmanager
def _sharded_load_errors(folder: Path):
    """DCP wraps every failure in a multi-line CheckpointException: say what went wrong."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as err:
        causes = [exc for exc, _ in err.failures.values()]
        if any(isinstance(exc, pickle.UnpicklingError) for exc in causes):
            raise TrainingError(
                f"refused to load {folder}: an entry holds more than tensors and plain "
                "data; checkpoints never run code when opened"
            ) from None
        first = str(causes[0]).splitlines()[0] if causes else str(err).splitlines()[0]
        raise TrainingError(f"cannot load the sharded checkpoint {folder}: {first}") from None


# The config fields that decide the weights: their shapes, the tokenizer they index, and the
# architecture that reads them.
WEIGHT_FIELDS = (
    "vocab_size", "tokenizer_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
    "max_position_embeddings", "copy_attention", "position", "norm", "bias", "ffn", "qk_norm",
)  # fmt: skip


def model_differences(saved: MiniTuringConfig, built: MiniTuringConfig, fields) -> list[str]:
    """Each of ``fields`` in which the model a folder holds (``saved``) and the one the options
    build differ, as a phrase for an error message."""
    return [
        f"{name} is {getattr(saved, name, None)!r} there, these options give "
        f"{getattr(built, name, None)!r}"
        for name in fields
        if getattr(saved, name, None) != getattr(built, name, None)
    ]


def check_resumed_model(saved: MiniTuringConfig, built: MiniTuringConfig, folder: Path) -> None:
    """A resumed run must build the model its folder holds: options that change it (or a
    config.json edited by hand) are refused, naming each difference."""
    differences = model_differences(saved, built, ("preset", *WEIGHT_FIELDS))
    if differences:
        raise TrainingError(
            f"--resume {folder}: the model in {folder / 'config.json'} is not the one "
            f"these options build: {'; '.join(differences)}. A resumed run keeps its model: "
            "drop the options that change it."
        )
