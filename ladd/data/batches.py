"""Which records each training batch holds, and reading them ahead of the loop.

`BucketBatches` is a pure function of a batch's position: epoch e shuffles each resolution bucket's records from
(seed, e, bucket), cuts the order into global batches (a bucket's last batch completed from the start of the same
order, as torch's DistributedSampler pads, so every record comes at least once an epoch and a bucket smaller than
a batch still trains), and shuffles the epoch's batches of every bucket together from (seed, e): each batch is
one bucket's, and buckets come by their share of the records. Every rank computes the same global batch and
reads only its rows of it, so ranks' shares are disjoint and the order does not depend on the world size; a run
resumed at position p reads what an uninterrupted one reads from p.

`Prefetcher` reads the next batches in a background thread while the loop trains on the current one (on a GPU,
where the loop mostly waits on the device); an error in it is raised where the loop takes that batch. On the
CPU the loop reads each batch itself: a reader thread beside torch's own CPU threads made the embedded default's
step 1.9x slower (0.092 against 0.048 s), reading in the loop costs 2 ms of its ~50.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from ladd.data.synthetic import SyntheticSet
from ladd.distributed import World
from ladd.generate import record_noise
from ladd.recipe import Recipe
from ladd.variants import backward_simulate, randn

if TYPE_CHECKING:
    from ladd.networks import Networks


class BucketBatches:
    def __init__(self, buckets: list[np.ndarray], batch_size: int, seed: int):
        self.buckets, self.batch_size, self.seed = [np.asarray(b) for b in buckets], batch_size, seed
        self.per_bucket = [-(-len(b) // batch_size) if len(b) else 0 for b in self.buckets]
        self.per_epoch = sum(self.per_bucket)
        if self.per_epoch == 0:
            raise ValueError("no records to draw batches from")
        self._epoch, self._orders, self._plan = None, [], None

    def _prepare(self, epoch: int) -> None:
        """This epoch's shuffled order of each bucket (O(records) indices, no data) and of its batches."""
        orders = []
        for b, records in enumerate(self.buckets):
            order = np.random.default_rng([self.seed, epoch, b]).permutation(records)
            pad = self.per_bucket[b] * self.batch_size - len(order)
            orders.append(np.concatenate([order, np.resize(order, pad)]) if pad else order)
        labels = np.repeat(np.arange(len(self.buckets)), self.per_bucket)
        chunks = np.concatenate([np.arange(n) for n in self.per_bucket])
        shuffle = np.random.default_rng([self.seed, epoch, len(self.buckets)]).permutation(self.per_epoch)
        self._epoch, self._orders, self._plan = epoch, orders, (labels[shuffle], chunks[shuffle])

    def __getitem__(self, position: int) -> tuple[int, np.ndarray]:
        """(bucket, the global batch's record indices) at `position` (0, 1, ... over all epochs)."""
        epoch, j = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._prepare(epoch)
        b, chunk = int(self._plan[0][j]), int(self._plan[1][j])
        return b, self._orders[b][chunk * self.batch_size : (chunk + 1) * self.batch_size]


class Prefetcher:
    """`produce(position)` for start, start + 1, ... computed up to `depth` ahead in a thread; next() in order.
    `depth` 0: each computed when asked, in the caller's thread."""

    def __init__(self, produce: Callable[[int], object], start: int, depth: int = 2):
        self._produce, self._position, self._thread = produce, start, None
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        if depth > 0:
            self._thread = threading.Thread(target=self._run, args=(produce, start), daemon=True, name="ladd-prefetch")
            self._thread.start()

    def _run(self, produce, position: int) -> None:
        while not self._stop.is_set():
            try:
                item = produce(position)
            except BaseException as e:  # handed to the loop, which raises it as its own
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            position += 1

    def __next__(self):
        if self._thread is None:
            self._position += 1
            return self._produce(self._position - 1)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


class StudentBatch(NamedTuple):
    """This rank's rows of one global batch: teacher latents x0 with their prompts' embeddings (c, p) and
    condition m, the global batch's student times t_all, the student's inputs x_t at this rank's times, which rows
    are simulated, and their step indices k."""

    x0: torch.Tensor
    c: torch.Tensor
    p: torch.Tensor
    m: torch.Tensor
    t_all: torch.Tensor
    x_t: torch.Tensor
    simulated: torch.Tensor
    k: torch.Tensor


class BatchSource:
    """Every batch and draw of a run: the synthetic set's shards, read ahead in a thread in `BucketBatches`' order
    (a pure function of the position, so a resumed run reads on from where its step left off), and the run's one
    CPU generator for every draw (the same on every rank: same draws on any device and world). Each rank keeps its
    own rows of every global batch."""

    def __init__(
        self,
        cfg,
        data: SyntheticSet,
        times,
        columns,
        inpainting: bool,
        world: World,
        gen,
        recipe: Recipe,
        nets: Networks,
        autocast,
        start_step: int,
    ):
        self.cfg, self.data, self.times, self.columns, self.inpainting = cfg, data, times, columns, inpainting
        self.world, self.device, self.gen, self.recipe, self.nets, self.autocast = (
            world,
            world.device,
            gen,
            recipe,
            nets,
            autocast,
        )
        self.mine = world.rows(cfg.batch_size)  # this rank's rows of every global batch (all of them in one process)
        # the rows read: this rank's own, or all where it simulates the whole batch's inputs
        self.loaded = slice(0, cfg.batch_size) if world.size > 1 and cfg.backward_share > 0 else self.mine
        self.batches = BucketBatches([b.records for b in data.buckets], cfg.batch_size, cfg.seed)
        # each step takes d_steps_per_g batches: a resumed run reads on from the position its step implies
        depth = cfg.prefetch if cfg.prefetch is not None else 4 if self.device.type == "cuda" else 0
        self.stream = Prefetcher(self._read, start_step * cfg.d_steps_per_g, depth)

    def _read(self, position: int) -> dict:
        """The global batch at `position`, this rank's `loaded` rows of it, read from the shards (in the prefetch
        thread)."""
        _, records = self.batches[position]
        reads_path = self.recipe.student_input.reads_path
        batch = self.data.read(records[self.loaded], trajectory=reads_path)
        if reads_path:
            batch["trajectory"] = batch["trajectory"][:, self.columns]
        return {k: v.pin_memory() for k, v in batch.items()} if self.device.type == "cuda" else batch

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        """Noise for the global batch from the shared stream; this rank's rows of it."""
        return randn((self.cfg.batch_size, *like.shape[1:]), self.gen, like)[self.mine]

    def next(self, probs: torch.Tensor) -> StudentBatch:
        """Phases 1-2 for the global batch, then this rank's rows of it: teacher latents x0 of one resolution
        bucket with their prompts' stored embeddings (LADD's "real" data), student step indices k from the
        (warm-up) probabilities, t = times[k], and the student's input x_t there (`student_input`); a
        `backward_share` of the t < 1 rows instead get the current student's own earlier steps (simulated for the
        global batch on every rank, so every rank runs the student equally often)."""
        cfg, gen, device, mine, loaded = self.cfg, self.gen, self.device, self.mine, self.loaded
        student_input, reads_path = self.recipe.student_input, self.recipe.student_input.reads_path
        batch = {k: v.to(device, non_blocking=True) for k, v in next(self.stream).items()}  # as stored (bf16 on GPU)
        batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
        x0, c, p = batch["latents"], batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        m = batch["condition"] if self.inpainting else x0.new_zeros(len(x0), 0, *x0.shape[2:])
        own = slice(mine.start - loaded.start, mine.stop - loaded.start)  # this rank's rows among those read
        k = torch.multinomial(probs, cfg.batch_size, replacement=True, generator=gen)
        t = self.times[k].to(device)
        start_noise = record_noise(batch["seed"][own].tolist(), x0.shape[1:]).to(device) if reads_path else None
        eps = self.noise(x0) if student_input.fresh_noise else None
        x_t = student_input.make(
            x0[own], t[mine], k[mine].to(device), start_noise, batch["trajectory"][own] if reads_path else None, eps
        )
        simulated = (k > 0) & (torch.rand(cfg.batch_size, generator=gen) < cfg.backward_share)
        if simulated.any():  # `loaded` holds every simulated row (all rows wherever this runs on several ranks)
            rows = torch.nonzero(simulated).flatten().to(device) - loaded.start
            with self.autocast:
                x_sim = backward_simulate(
                    self.nets.student_velocity,
                    k[simulated],
                    self.times.to(device),
                    c[rows],
                    p[rows],
                    x0[rows],
                    self.recipe.stochastic,
                    gen,
                    m[rows],
                )
            keep = (rows >= own.start) & (rows < own.stop)
            x_t[rows[keep] - own.start] = x_sim[keep]
        return StudentBatch(x0[own], c[own], p[own], m[own], t, x_t, simulated.to(device)[mine], k.to(device)[mine])

    def close(self) -> None:
        """The reader thread and the open shards go with the loop, however it ends."""
        self.stream.close()
        self.data.close()
