"""Sharded checkpoints of FSDP runs with ``torch.distributed.checkpoint`` (DCP): no gather to rank 0.

A sharded checkpoint is a directory ``RUN_DIR/checkpoints/step_XXXXXXXX/`` holding DCP's files (one
``__R_0.distcp`` per rank and ``.metadata``) for the model and AdamW state, plus ``train_state.pt``
(rank 0): everything else a single-file checkpoint holds (step, configs, loader position, RNG states,
the run's progress). It is written as ``.step_XXXXXXXX.staging/`` and renamed only once every shard,
the metadata and ``train_state.pt`` are on disk, so a directory with the final name is always complete.

DCP reshards on load, so a checkpoint loads at any world size and into any mode: FSDP at another
width, DDP or one process (each rank then reads the full tensors), or a plain ``GPT`` on one CPU
process for ``sample``/``eval``/``inspect``/``--init-from``/``save_pretrained``.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2repro.errors import UserError, typed_first_line

log = logging.getLogger("gpt2repro")

TRAIN_STATE = "train_state.pt"
DCP_METADATA = ".metadata"
STAGING_SUFFIX = ".staging"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / TRAIN_STATE).is_file()


def staging_path(final: Path) -> Path:
    return final.parent / f".{final.name}{STAGING_SUFFIX}"


def _tensor_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Model (and optimizer) state keyed by parameter names: DTensor shards under FSDP, whole tensors
    otherwise; DCP fills or writes exactly these."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


@dataclass
class PendingSave:
    """A checkpoint being written; ``finish`` makes it count (rank 0 renames it into place)."""

    final: Path
    train_state: dict
    future: Future | None = None

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def finish(self) -> Path:
        if self.future is not None:
            self.future.result()  # re-raises a failed background write
        if dist.get_rank() == 0:
            from gpt2repro.checkpoint import atomic_save, write_checksum
            from gpt2repro.files import fsync_dir

            staging = staging_path(self.final)
            atomic_save(self.train_state, staging / TRAIN_STATE)
            write_checksum(staging)
            os.replace(staging, self.final)
            fsync_dir(self.final.parent)
        return self.final


def start_save(final: Path, model, optimizer, train_state: dict, *, use_async: bool, process_group=None):
    """Every rank writes its own shards into the staging directory; with ``use_async`` the write runs
    in the background (the step loop goes on) and the returned ``PendingSave`` is finished later."""
    import torch.distributed.checkpoint as dcp

    staging = staging_path(final)
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    dist.barrier()
    state = _tensor_state(model, optimizer)
    if use_async:
        future = dcp.async_save(state, checkpoint_id=str(staging), process_group=process_group)
        return PendingSave(final, train_state, future)
    dcp.save(state, checkpoint_id=str(staging))
    dist.barrier()
    return PendingSave(final, train_state)


def load_train_state(path: Path) -> dict:
    """The non-tensor part of a sharded checkpoint, marked with where its tensors are."""
    try:
        state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(
            f"sharded checkpoint {path} is unreadable ({typed_first_line(e, 120)}); "
            "delete it to fall back to the previous checkpoint"
        ) from e
    return {**state, "sharded_path": str(path)}


def load_tensors_into(path: Path, model: torch.nn.Module, optimizer=None) -> None:
    """Fill ``model`` (and ``optimizer``) from a sharded checkpoint, whatever they are now: FSDP shards
    of any width, DDP replicas or a plain model on one process (DCP reads the pieces each needs)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _tensor_state(model, optimizer)
    try:
        single = not (dist.is_available() and dist.is_initialized())  # e.g. `sample` on a laptop
        dcp.load(state, checkpoint_id=str(path), no_dist=single)
    except Exception as e:
        raise UserError(
            f"sharded checkpoint {path} does not match this model/optimizer "
            f"({typed_first_line(e)}); "
            "resume with the run's original model options"
        ) from e
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_into_shards(model, optimizer, full_model_sd: dict, full_optim_sd: dict | None = None) -> None:
    """Shard whole-tensor state (a single-file checkpoint, released weights) into an FSDP model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    if full_optim_sd is None:
        set_model_state_dict(model, full_model_sd, options=options)
    else:
        set_state_dict(
            model, optimizer, model_state_dict=full_model_sd, optim_state_dict=full_optim_sd, options=options
        )


def broadcast_full_into_shards(model, full_model_sd: dict | None) -> None:
    """Rank 0 alone holds the whole weights (``None`` elsewhere); each rank receives only its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_model_sd or {}, options=options)


def full_optimizer_state(model, optimizer) -> dict:
    """A plain model's optimizer state keyed by parameter names (what FSDP's loader understands)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
