"""Conditional flow-matching training of the EGNN vector field, resumable and DDP-ready.

Batches are ragged (atoms of all molecules concatenated, ``mol_ptr`` offsets), so one molecule and many
peptides of different sizes train through the same code without padding. Per molecule (docs/model.md):
t ~ U(0, 1), x0 ~ prior, noise ~ prior, x_t = (1 - t) x0 + t x1 + sigma noise, target u = x1 - x0,
loss_b = |v(t, x_t) - u|^2 / (3 n_b), averaged over the batch.

Exact resume: the checkpoint holds the model, Adam, the step schedule, EMA weights, every rank's noise
generator and the position in the data (epoch, batch within the epoch); a restarted run skips the
batches already consumed in the current epoch and continues bit for bit. Data must therefore be
deterministic per epoch (``RaggedLoader`` is: it shuffles with seed + epoch).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tbg.errors import InputError
from tbg.flow import distributed as D
from tbg.flow.checkpointing import Checkpoints, CsvLog
from tbg.flow.coupling import Coupling, couple, interchangeable_groups
from tbg.flow.prior import center_ragged, sample_ragged
from tbg.nn.checkpoint import egnn_state, save_published
from tbg.nn.egnn import EGNN
from tbg.nn.layout import molecule_index

log = logging.getLogger("tbg")

__all__ = ["TrainConfig", "TrainResult", "RaggedLoader", "flow_matching_loss", "train"]


class RaggedBatchLike(Protocol):
    x: Tensor  # [M, 3] model units
    features: Tensor  # [M, F]
    mol_ptr: Tensor  # [B + 1] int64


@dataclass
class TrainConfig:
    """Flow-matching training options. Steps count optimizer updates (one batch per rank each)."""

    n_steps: int = 1000
    lr: float = 5e-4
    lr_milestones: tuple[int, ...] = ()  # steps at which the learning rate is multiplied by lr_gamma
    lr_gamma: float = 0.1
    sigma: float = 0.01
    coupling: Coupling = "independent"  # or "aligned": x0 moved to its symmetry image closest to x1 (tbg.flow.coupling)
    grad_clip: float | None = None  # max global gradient norm
    ema_decay: float | None = None  # e.g. 0.999; validation and the final model then use the EMA weights
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    validate_every: int = 100
    log_every: int = 10
    backend: str = "auto"
    progress: bool = True
    resume: bool = True

    def __post_init__(self) -> None:
        self.lr_milestones = tuple(int(m) for m in self.lr_milestones)
        if self.n_steps < 0 or self.checkpoint_every < 1 or self.validate_every < 1 or self.log_every < 1:
            raise ValueError("n_steps must be >= 0 and checkpoint_every, validate_every, log_every >= 1")
        if self.sigma < 0 or self.lr <= 0:
            raise ValueError(f"need sigma >= 0 and lr > 0, got {self.sigma}, {self.lr}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.coupling not in ("independent", "aligned"):
            raise ValueError(f"coupling must be 'independent' or 'aligned', got {self.coupling!r}")


@dataclass
class TrainResult:
    step: int
    train_loss: float  # mean over the last log window
    val_loss: float | None
    model_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # rows of train_log.csv (rank 0)


class RaggedLoader:
    """Deterministic, shardable batches over a sequence of items.

    ``collate(items) -> RaggedBatch`` builds a batch (default: ``tbg.chem.data.collate_ragged``). Each epoch
    the indices are shuffled with ``seed + epoch`` (call ``set_epoch``) and rank r of W takes every W-th
    index, every rank the same number of batches so DDP steps stay in lockstep.
    """

    def __init__(self, items: Sequence[Any], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, collate: Callable[[list[Any]], Any] | None = None,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if collate is None:
            from tbg.chem.data import collate_ragged as collate  # noqa: PLC0415 - optional dependency
        self.items, self.batch_size, self.shuffle, self.seed = items, batch_size, shuffle, seed
        self.drop_last, self.collate, self.epoch = drop_last, collate, 0
        self.rank = D.rank() if rank is None else rank
        self.world_size = D.world_size() if world_size is None else world_size
        if len(items) < self.world_size:
            raise ValueError(f"{len(items)} items cannot be shared by {self.world_size} ranks")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        n = len(self.items)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_rank = n // self.world_size
        return order[self.rank::self.world_size][:per_rank]

    def __len__(self) -> int:
        per_rank = len(self.items) // self.world_size
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __iter__(self):
        idx = self._indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.collate([self.items[i] for i in idx[start:start + self.batch_size]])


def _aligned(x0: Tensor, x1: Tensor, features: Tensor, mol_ptr: Tensor,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The aligned coupling (tbg.flow.coupling) on a ragged batch: molecules with the same size and features
    are aligned together in dense form."""
    sizes = mol_ptr.diff().tolist()
    x0_out, x1_out = torch.empty_like(x0), torch.empty_like(x1)
    kinds: dict[tuple, list[int]] = {}
    n0 = sizes[0] if sizes else 0
    if all(n == n0 for n in sizes) and torch.equal(features, features[:n0].repeat(len(sizes), 1)):
        kinds[(n0, ())] = list(range(len(sizes)))  # one molecule in every slot (single-molecule training)
    for b, n in enumerate(sizes if not kinds else []):
        f = features[mol_ptr[b]:mol_ptr[b + 1]]
        kinds.setdefault((n, tuple(f.reshape(-1).tolist())), []).append(b)
    for (n, _), members in kinds.items():
        atoms = torch.cat([torch.arange(int(mol_ptr[b]), int(mol_ptr[b]) + n) for b in members]).to(x0.device)
        groups = interchangeable_groups(features[atoms[:n]])
        a, b_ = couple(x0[atoms].view(-1, n, 3), x1[atoms].view(-1, n, 3), groups, generator=generator)
        x0_out[atoms], x1_out[atoms] = a.reshape(-1, 3), b_.reshape(-1, 3)
    return x0_out, x1_out


def flow_matching_loss(model: Callable[..., Tensor], batch: RaggedBatchLike, *, sigma: float = 0.01,
                       generator: torch.Generator | None = None, backend: str = "auto",
                       coupling: Coupling = "independent") -> Tensor:
    """Conditional flow-matching loss of every molecule in a ragged batch, [B] (see module docstring)."""
    ptr = batch.mol_ptr
    if batch.x.dim() != 2 or batch.x.shape[1] != 3:
        raise ValueError(f"batch.x must be ragged [M, 3], got {tuple(batch.x.shape)}")
    x1 = center_ragged(batch.x, ptr)
    x0 = sample_ragged(ptr, generator=generator, dtype=x1.dtype)
    if coupling == "aligned":
        x0, x1 = _aligned(x0, x1, batch.features, ptr, generator)
    noise = sample_ragged(ptr, generator=generator, dtype=x1.dtype)
    n_mol = ptr.numel() - 1
    t = torch.rand(n_mol, generator=generator, device=x1.device, dtype=x1.dtype)
    mol = molecule_index(ptr)
    tt = t[mol].unsqueeze(1)
    xt = (1 - tt) * x0 + tt * x1 + sigma * noise
    v = model(t, xt, batch.features, mol_ptr=ptr, backend=backend)
    sq = (v - (x1 - x0)).pow(2).sum(1)
    per_mol = torch.zeros(n_mol, dtype=sq.dtype, device=sq.device).index_add_(0, mol, sq)
    return per_mol / (3 * ptr.diff().to(sq.dtype))


def _to_device(batch: Any, device: torch.device) -> Any:
    return batch.to(device) if hasattr(batch, "to") else batch


class _EMA:
    """Exponential moving average of the weights. The decay warms up as min(decay, (1 + step) / (10 + step)):
    with a fixed 0.999 the average of a short run would still be 82% the random initial weights at step
    200; past a few thousand steps the warm-up no longer matters (its weight has decayed below float
    precision)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step ``step`` (0 for the first)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v, 1 - decay)

    def swap(self, model: torch.nn.Module) -> None:
        """Exchange the model's weights with the EMA weights (call twice to restore)."""
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        self.shadow = current


# Columns of train_log.csv.
LOG_FIELDS = ("step", "epoch", "lr", "loss", "val_loss", "grad_norm", "seconds")


class _TensorBoard:
    """The scalars of train_log.csv in TensorBoard (out/tensorboard) when it is installed."""

    def __init__(self, out: Path, resume_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.writer = None

    def write(self, row: dict[str, Any]) -> None:
        if self.writer is not None:
            for k in ("lr", "loss", "val_loss", "grad_norm"):
                if row.get(k) not in (None, ""):
                    self.writer.add_scalar(k, float(row[k]), row["step"])


def _validate(model: EGNN, val_data: Iterable[Any], cfg: TrainConfig, device: torch.device) -> float:
    """Mean per-molecule loss over the validation batches (all ranks), with fixed noise so that
    values are comparable between steps."""
    g = torch.Generator(device=device).manual_seed(cfg.seed + 7919 + D.rank())
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in val_data:
            per = flow_matching_loss(model, _to_device(batch, device), sigma=cfg.sigma, generator=g,
                                     backend=cfg.backend, coupling=cfg.coupling)
            total += torch.stack([per.sum().double(), torch.tensor(per.numel(), dtype=torch.float64,
                                                                   device=device)])
    model.train(was_training)
    if D.world_size() > 1:
        torch.distributed.all_reduce(total)
    if total[1] == 0:
        raise ValueError("validation data yielded no molecules")
    return float(total[0] / total[1])


def train(model: EGNN, train_data: Iterable[Any], out_dir: str | Path, config: TrainConfig | None = None, *,
          val_data: Iterable[Any] | None = None, on_start: Callable[[int], None] | None = None,
          meta: Mapping[str, Any] | None = None) -> TrainResult:
    """Train ``model`` by flow matching on ragged batches from ``train_data`` (re-iterated every epoch;
    ``set_epoch`` is called when present) and write to ``out_dir``:

    - ``checkpoints/step_XXXXXXXX.pt`` every ``checkpoint_every`` steps: published layout plus our state
      (optimizer, schedule, EMA, RNG, data position) under ``"tbg"`` -> ``"train_state"``;
    - ``model.pt`` at the end: the final (EMA if enabled) weights in the published layout;
    - ``train_log.csv`` (and TensorBoard when installed).

    With ``config.resume`` an existing run in out_dir continues from its newest (readable) checkpoint
    exactly; one past ``n_steps`` is refused (InputError). ``on_start(step)``, if given, is called on rank 0
    with the step the run starts from, once the run is known to go ahead. ``meta``: entries added to the
    "tbg" metadata of every checkpoint and of model.pt (e.g. the frames held out). Under torchrun, wraps the
    model in DistributedDataParallel (the loader must shard by rank).
    """
    cfg = config or TrainConfig()
    D.init_distributed()
    rank, world = D.rank(), D.world_size()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.lr_milestones), gamma=cfg.lr_gamma)
    ema = _EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + rank)
    step = epoch = batch_in_epoch = 0

    checkpoints = Checkpoints(out, "train_state", "a flow-matching training checkpoint", keep=cfg.keep_checkpoints,
                              meta=meta)
    if not cfg.resume and (ckpt := checkpoints.latest()) is not None:
        raise FileExistsError(f"{out} already holds checkpoints ({ckpt.name}); pass resume=True to continue that "
                              f"run or use another output folder")
    if (found := checkpoints.load_latest()) is not None:
        ckpt, state = found
        ts = state["tbg"]["train_state"]
        if ts["world_size"] != world:
            raise RuntimeError(f"{ckpt} was written by {ts['world_size']} processes; resume with the same number "
                               f"(this run has {world})")
        model.load_state_dict(egnn_state(state))
        optimizer.load_state_dict(state["optimizer_state_dict"])
        scheduler.load_state_dict(ts["scheduler"])
        if ema is not None:
            if ts.get("ema") is None:
                raise RuntimeError(f"{ckpt} has no EMA weights but ema_decay is set")
            ema.shadow = {k: v.to(device) for k, v in ts["ema"].items()}
        gen.set_state(ts["rng"][rank])
        step, epoch, batch_in_epoch = ts["step"], ts["epoch"], ts["batch_in_epoch"]
        if step > cfg.n_steps:  # the model at n_steps is gone: only the newest checkpoints are kept
            raise InputError(f"{out} holds a training run at step {step}, past the {cfg.n_steps} steps asked "
                             f"for; ask for at least {step} steps to continue it, or train in a new folder")
        if rank == 0:
            log.info("resuming from %s at step %d (epoch %d, batch %d)", ckpt, step, epoch, batch_in_epoch)

    if on_start is not None and rank == 0:
        on_start(step)
    net: Callable[..., Tensor] = model
    if world > 1:
        # find_unused_parameters: the published network computes embedding_out and the last layer's
        # node update, which the vector field never uses, so they get no gradient.
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    csv_log = CsvLog(out / "train_log.csv", LOG_FIELDS, step, int_fields=("step", "epoch")) if rank == 0 else None
    tensorboard = _TensorBoard(out, step) if rank == 0 else None
    # The rows logged so far, including those of earlier runs of this training (resume).
    history: list[dict[str, Any]] = list(csv_log.previous) if csv_log is not None else []
    window: list[float] = []
    val_loss: float | None = next((r["val_loss"] for r in reversed(history) if r["val_loss"] != ""), None)
    t_start = time.perf_counter()

    def save_checkpoint() -> None:
        rngs = D.all_gather_object(gen.get_state())
        if rank != 0:
            return
        train_state = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "world_size": world,
                       "scheduler": scheduler.state_dict(), "rng": rngs, "config": asdict(cfg),
                       "ema": None if ema is None else {k: v.cpu() for k, v in ema.shadow.items()}}
        checkpoints.save(step, model, optimizer, train_state, epoch=epoch)

    def validate() -> float:
        if ema is not None:
            ema.swap(model)
        try:
            return _validate(model, val_data, cfg, device)
        finally:
            if ema is not None:
                ema.swap(model)

    pbar = tqdm(total=cfg.n_steps, initial=step, disable=not cfg.progress or rank != 0, desc="train")
    while step < cfg.n_steps:
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        n_seen = 0
        for b, batch in enumerate(train_data):
            n_seen += 1
            if b < batch_in_epoch:
                continue  # consumed before the restart
            loss = flow_matching_loss(net, _to_device(batch, device), sigma=cfg.sigma, generator=gen,
                                      backend=cfg.backend, coupling=cfg.coupling).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model, step)
            step, batch_in_epoch = step + 1, b + 1
            loss_val = loss.detach()
            if world > 1:
                torch.distributed.all_reduce(loss_val)
                loss_val /= world
            window.append(float(loss_val))
            pbar.update(1)
            is_val = val_data is not None and (step % cfg.validate_every == 0 or step == cfg.n_steps)
            if is_val:
                val_loss = validate()
            if step % cfg.log_every == 0 or is_val or step == cfg.n_steps:
                row = {"step": step, "epoch": epoch, "lr": lr, "loss": sum(window) / len(window),
                       "val_loss": val_loss if is_val else "", "grad_norm": grad_norm,
                       "seconds": round(time.perf_counter() - t_start, 3)}
                window = []
                if csv_log is not None:
                    csv_log.write(row)
                    tensorboard.write(row)
                    history.append(row)
                    pbar.set_postfix(loss=f"{row['loss']:.4g}")
            if step % cfg.checkpoint_every == 0:
                save_checkpoint()
            if step >= cfg.n_steps:
                break
        else:
            if n_seen == 0:
                raise ValueError("train_data yielded no batches")
            epoch, batch_in_epoch = epoch + 1, 0
    pbar.close()
    if step % cfg.checkpoint_every != 0:
        save_checkpoint()

    model_path = out / "model.pt"
    if rank == 0:
        if ema is not None:
            ema.swap(model)
        save_published(model_path, model, global_it=step, tbg={**(meta or {}), "ema": ema is not None})
        if ema is not None:
            ema.swap(model)
    D.barrier()
    last = history[-1]["loss"] if history else math.nan
    return TrainResult(step, last, val_loss, model_path, history)
