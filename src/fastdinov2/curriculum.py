"""The frequency curriculum as data: which stage, crop sizes and batch size apply at any global step.

A run is a list of stages (``cfg.curriculum.stages``). Each stage has a length in epochs, crop sizes, a
low-pass method, an optional per-GPU batch size and noise-patching settings. Everything here is a pure
function of (config, dataset length, world size): the stage of step ``s``, the epoch it falls in and the
number of samples consumed before it (the data position) never depend on what happened earlier in the
run, so restarts, resumes and data-loader workers all agree.

Samples are consumed as one endless stream of per-epoch permutations; a step takes the next
``global_batch`` positions of that stream, so the data position of step ``s`` is the sum of the global
batch sizes of the steps before it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from fastdinov2.config import Config, NoiseConfig, stage_epochs


@dataclass(frozen=True)
class StagePlan:
    """One stage resolved to global steps. ``end_step`` is exclusive."""

    index: int
    name: str
    start_step: int
    end_step: int
    start_epoch: float
    epochs: float
    batch_size_per_gpu: int
    global_batch: int  # batch_size_per_gpu * world_size * grad_accum_steps: images per optimizer step
    steps_per_epoch: float  # dataset_len / global_batch: the stream is continuous, no image is dropped per epoch
    global_size: int
    local_size: int
    lowpass: str
    noise: NoiseConfig
    start_sample: int  # data-stream position of the stage's first step

    @property
    def num_steps(self) -> int:
        return self.end_step - self.start_step


class Curriculum:
    """Resolve ``cfg.curriculum.stages`` into step ranges for a dataset of ``dataset_len`` images."""

    def __init__(self, cfg: Config, dataset_len: int, world_size: int = 1) -> None:
        if dataset_len <= 0:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        self.dataset_len = dataset_len
        self.world_size = world_size
        self.grad_accum_steps = cfg.train.grad_accum_steps
        plans: list[StagePlan] = []
        step, epoch, sample = 0, 0.0, 0
        for i, (st, n_epochs) in enumerate(zip(cfg.curriculum.stages, stage_epochs(cfg), strict=True)):
            per_gpu = st.batch_size_per_gpu or cfg.train.batch_size_per_gpu
            global_batch = per_gpu * world_size * cfg.train.grad_accum_steps
            # A stage of E epochs takes E * N images of the stream (rounded to whole steps); an epoch is not
            # cut to a multiple of the global batch, which would drop N % global_batch images per epoch.
            steps_per_epoch = dataset_len / global_batch
            n_steps = max(1, round(n_epochs * steps_per_epoch))
            plans.append(
                StagePlan(
                    index=i,
                    name=st.name,
                    start_step=step,
                    end_step=step + n_steps,
                    start_epoch=epoch,
                    epochs=n_epochs,
                    batch_size_per_gpu=per_gpu,
                    global_batch=global_batch,
                    steps_per_epoch=steps_per_epoch,
                    global_size=st.global_size,
                    local_size=st.local_size,
                    lowpass=st.lowpass,
                    noise=st.noise,
                    start_sample=sample,
                )
            )
            step += n_steps
            epoch += n_epochs
            sample += n_steps * global_batch
        self.stages = plans
        self.total_steps = step
        self._starts = [p.start_step for p in plans]

    def stage_at(self, step: int) -> StagePlan:
        """The stage that global step ``step`` (0-based) belongs to; steps past the end map to the last."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.stages[max(0, bisect.bisect_right(self._starts, step) - 1)]

    def epoch_at(self, step: int) -> float:
        """Fractional epoch at the start of ``step`` (stage-wise, in that stage's steps per epoch)."""
        st = self.stage_at(step)
        return st.start_epoch + (step - st.start_step) / st.steps_per_epoch

    def steps_for_epochs(self, epochs: float, start_stage: int = 0) -> int:
        """How many steps the first ``epochs`` epochs take, counted from the start of ``start_stage``."""
        remaining, steps = epochs, 0
        for st in self.stages[start_stage:]:
            if remaining <= st.epochs:
                return steps + round(remaining * st.steps_per_epoch)
            remaining -= st.epochs
            steps += st.num_steps
        return steps

    def sample_position(self, step: int) -> int:
        """Data-stream position (global sample count) at the start of ``step``."""
        st = self.stage_at(step)
        return st.start_sample + (step - st.start_step) * st.global_batch

    def step_covering(self, position: int) -> int:
        """The step whose global batch holds data position ``position`` (``>= total_steps`` past the end)."""
        for st in self.stages:
            if position < st.start_sample + st.num_steps * st.global_batch:
                return st.start_step + (position - st.start_sample) // st.global_batch
        last = self.stages[-1]
        return last.end_step + (position - last.start_sample - last.num_steps * last.global_batch) // last.global_batch

    def resume_step(self, position: int) -> int:
        """The first step that starts at or after data position ``position``, at most ``total_steps``.

        This is how a checkpoint continues at another world size (or global batch): the data position
        (images consumed) is carried over, never the raw step counter. No image is fed twice; fewer than one
        global batch of the stream is skipped when ``position`` falls inside a step.
        """
        if position <= 0:
            return 0
        return min(self.total_steps, self.step_covering(position - 1) + 1)

    def describe(self) -> str:
        lines = []
        for st in self.stages:
            n = st.noise
            noise = {"none": "off", "gaussian": f"gaussian max {n.max_scale:g}",
                     "blur": f"blur sigma {n.blur_sigma_min:g}-{n.blur_sigma_max:g}"}.get(n.kind, n.kind)
            if n.kind != "none" and n.p != 1.0:
                noise += f" (p {n.p:g})"
            lines.append(
                f"stage {st.index} '{st.name}': steps {st.start_step}-{st.end_step - 1} "
                f"({st.epochs:g} ep), crops {st.global_size}/{st.local_size} ({st.lowpass}), "
                f"batch {st.batch_size_per_gpu}/gpu, noise {noise}"
            )
        return "\n".join(lines)
