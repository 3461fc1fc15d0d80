"""Which images a process makes, and under which names: one process, or several under accelerate's launcher
(`ldm sample --gpus N`, or `accelerate launch -m ldm_cli sample ...` on one or many machines).

The jobs are cut into batches exactly as one process would cut them (consecutive jobs of equal settings, at most
--batch-size each), and the batches dealt out in turn: batch b to process b mod N. A batch is made whole by one
process, so every image is the one a single process makes (same seed, same batch, same bits on a batch-invariant
device), and it gets the name the single process would give it: its number in the run is fixed before any image
is made (the first free number, read by the first process and sent to all), never by who finishes first.

--skip-existing: a job is done when a PNG in the output folder records it (its `ldm` metadata: model, LoRAs,
embeddings, prompt, seed and settings, the version aside). Images are written atomically, so a killed run leaves
whole images or none; started again, it makes only what is missing, numbered after what is there.
"""

import os
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from ldm_cli.io import images


def processes(device: str):
    """accelerate's PartialState when this process is one of several it launched, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


def shared(value, procs):
    """The first process's `value`, on every process (a random default seed, the plan's numbers)."""
    if procs is None:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def shared_seed(jobs: list, seed_given: bool, procs) -> list:
    """With several processes and no --seed, the first process's random seed for all of them."""
    if procs is None or seed_given:
        return jobs
    from dataclasses import replace

    offset = shared(jobs[0].seed, procs) - jobs[0].seed
    return [replace(j, seed=j.seed + offset) for j in jobs]


def file_name(job, index: int) -> str:
    source = f"{images.slug(Path(job.init_image).stem, 24)}-" if job.init_image else ""
    return f"{index:05d}-{job.seed}-{source}{images.slug(job.prompt)}.png"


@dataclass
class Plan:
    out_dir: Path
    jobs: list  # the jobs to make, in the order of the run
    paths: list[Path]  # their files
    batches: list[list[int]]  # indices into jobs, as one process batches them
    rank: int = 0
    world: int = 1
    skipped: int = 0  # jobs already done (--skip-existing)
    _seen: dict = field(default_factory=dict)

    def mine(self) -> list[list[int]]:
        return self.batches[self.rank::self.world]

    def done(self, own: int) -> int:
        """Images written so far by every process (this one's `own` count, the others' read off the disk:
        each writes its batches in order, so a pointer per process only moves forward)."""
        total = own
        for r in range(self.world):
            if r == self.rank:
                continue
            theirs = [k for b in self.batches[r::self.world] for k in b]
            at = self._seen.get(r, 0)
            while at < len(theirs) and self.paths[theirs[at]].exists():
                at += 1
            self._seen[r] = at
            total += at
        return total


def plan(jobs: list, out_dir: Path, batch_size: int, overwrite: bool, skip_existing: bool, made_with, procs) -> Plan:
    """The run's plan, the same on every process. `made_with(job)` is the metadata dict a job's PNG records."""
    import json

    first = procs is None or procs.is_main_process
    decided = None
    if first:
        todo = list(range(len(jobs)))
        if skip_existing:
            from ldm_cli.io.metadata import recorded_jobs

            done = recorded_jobs(out_dir)
            todo = [k for k in todo if json.dumps(made_with(jobs[k]), sort_keys=True) not in done]
        decided = (0 if overwrite else images.next_index(out_dir), todo)
    start, todo = shared(decided, procs)
    run = [jobs[k] for k in todo]
    batches, k = [], 0
    for _, same in groupby(run, key=lambda j: (j.settings, j.init_image is None)):
        n = len(list(same))
        batches += [list(range(k + i, k + min(i + batch_size, n))) for i in range(0, n, batch_size)]
        k += n
    return Plan(out_dir, run, [out_dir / file_name(j, start + i) for i, j in enumerate(run)], batches,
                procs.process_index if procs else 0, procs.num_processes if procs else 1, len(jobs) - len(run))


def gather(items: list, procs) -> list:
    """Every process's items on the first process (in process order), [] on the others."""
    if procs is None:
        return items
    from accelerate.utils import gather_object

    everything = gather_object([items])
    return [x for part in everything for x in part] if procs.is_main_process else []
