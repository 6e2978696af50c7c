"""Bench sections 4 and 5: clean and robust accuracy, computed as sharded, cached chunk units.

`evaluate` cuts the work into units (clean or one attack, on one chunk), computes this rank's share or
reads it from the chunk cache, merges the per-image results exactly over the ranks, and builds the
report's accuracy section from them: worst case, twin agreement, flags, chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rcdeploy.deploy.attack_figures import first_broken_by, gradient_masking_flags
from rcdeploy.deploy.bench_cache import ChunkCache, array_sha256, cache_key
from rcdeploy.deploy.bench_inputs import _UNIT_STRIDE, SUBSET_SEED, BenchImages, BenchSettings
from rcdeploy.deploy.progress import _ProgressSink
from rcdeploy.deploy.scoring import Scorer, _torch_threads
from rcdeploy.distributed import World
from rcdeploy.errors import UsageError
from rcdeploy.robustness import EPS_SLACK, WorstCase, chunk_seed, chunks, craft, owned

ATTACK_BATCH = 256  # images per attack call (twin autograd memory stays small at CIFAR size)
MIN_AGREEMENT_PCT = 99.0  # twin vs onnxruntime top-1 below this: white-box figures are suspect


def _pct(v: float) -> float:
    return 100.0 * float(v)


# ---------------------------------------------------------------------------- 4-5. clean and attacks
#
# The work is cut into units: (clean or attack a, chunk c), a chunk being `s.chunk` consecutive images
# (CHUNK_IMAGES, whatever --nproc is). Before a unit, the attack's generator and torch's global RNG (the
# twin's noise ops draw from it) are seeded with chunk_seed(seed, (a + 1) * _UNIT_STRIDE + c), and a
# stochastic graph's onnxruntime session is reopened on that seed, so a unit's per-image results are a
# function of the unit alone: any split of the units over ranks, and any rerun of a unit, gives the same
# results. Rank r of N takes every N-th unit (`owned`), reads it from the chunk cache or computes and
# saves it; the per-image arrays are then summed over the ranks (each image's slot is filled by exactly
# one rank, the others add zeros, so the sum is exact), and every figure is computed from the merged arrays
# exactly as for one process.


@dataclass(frozen=True)
class _Unit:
    attack: int  # index into the attack list; -1: the clean images
    chunk: int
    part: slice

    @property
    def number(self) -> int:
        """The unit's number for chunk_seed: distinct for every (attack, chunk)."""
        return (self.attack + 1) * _UNIT_STRIDE + self.chunk

    @property
    def size(self) -> int:
        return self.part.stop - self.part.start


class _Results:
    """Per-image results of every unit in zero-filled float64 arrays (the layout the ranks sum)."""

    def __init__(self, n: int, draws: int, attacks: int, n_chunks: int, n_units: int) -> None:
        z = np.zeros
        self.arrays: dict[str, np.ndarray] = {
            "clean_preds": z((draws, n)), "clean_agree": z(n), "classes": z(n_chunks),
            "preds": z((attacks, draws, n)), "agree": z((attacks, n)), "pert": z((attacks, n)),
            "in_range": z((attacks, n)), "queries": z((attacks, n)), "time_s": z((attacks, n_chunks)),
            "computed": z(n_units), "cached": z(n_units), "cache_failures": z(1),
        }

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def fill(self, unit: _Unit, data: dict[str, np.ndarray]) -> None:
        a, p, c = unit.attack, unit.part, unit.chunk
        if a < 0:
            self["clean_preds"][:, p] = data["preds"]
            self["classes"][c] = data["classes"]
            if "agree" in data:
                self["clean_agree"][p] = data["agree"]
            return
        self["preds"][a][:, p] = data["preds"]
        self["pert"][a, p] = data["pert"]
        self["in_range"][a, p] = data["in_range"]
        self["time_s"][a, c] = data["time_s"]
        for name in ("agree", "queries"):
            if name in data:
                self[name][a, p] = data[name]

    def merged(self, world: World) -> _Results:
        """The sum over ranks (in place; one all-reduce of every array packed together)."""
        if world.distributed:
            import torch

            names = list(self.arrays)
            flat = torch.from_numpy(np.concatenate([self.arrays[k].ravel() for k in names]))
            world.sum_(flat)
            out, at = flat.numpy(), 0
            for k in names:
                size = self.arrays[k].size
                self.arrays[k] = out[at : at + size].reshape(self.arrays[k].shape).copy()
                at += size
        return self


def evaluate(s: BenchSettings, images: BenchImages, scorer: Scorer) -> dict[str, Any]:
    """Clean and robust accuracy (the report's accuracy section), this rank's share of the chunks computed
    or read from the cache, merged exactly over the ranks; the per-image worst case, twin agreement, flags."""
    import torch

    from rcdeploy.attacks import parse_attacks

    attack_list = [] if s.no_attacks else parse_attacks(s.attack_spec, eps=images.eps, step=s.step,
                                                       restarts=s.restarts, eot=scorer.draws, seed=s.seed)
    scorer.attack_list = attack_list
    if scorer.twin is None and any(a.family != "square" for a in attack_list):
        raise UsageError(f"{s.path}: white-box attacks need the differentiable twin, which cannot be built "
                         f"({scorer.twin_error}); run squareN only") from None
    parts = chunks(images.n, s.chunk)
    units = [_Unit(a, c, p) for a in range(-1, len(attack_list)) for c, p in enumerate(parts)]
    cache = _open_cache(s, images, scorer, attack_list)
    local = _Results(images.n, scorer.draws, len(attack_list), len(parts), len(units))
    mine = owned(units, s.world.rank, s.world.size)
    seeds = [a.seed for a in attack_list]
    try:
        with _torch_threads(scorer.work_threads), torch.random.fork_rng(devices=[]), \
                _ProgressSink(s.progress) as sink:
            updates = _progress_tasks(s, sink, attack_list, [u for _, u in mine])
            for i, unit in mine:
                atk = attack_list[unit.attack] if unit.attack >= 0 else None
                name = cache.name(unit.attack, atk.name if atk is not None else "clean", unit.chunk)
                data = cache.load(name, _unit_shapes(unit, atk, scorer))
                if data is None:
                    data = _compute_unit(s, images, scorer, atk, unit)
                    cache.save(name, data)
                    local["computed"][i] = 1
                else:
                    local["cached"][i] = 1
                local.fill(unit, data)
                updates[unit.attack](advance=unit.size)
    finally:
        for atk, seed in zip(attack_list, seeds):
            atk.reseed(seed)  # the report's settings show the run's seed, not the last chunk's
    local["cache_failures"][0] = 1.0 if cache.failure else 0.0
    merged = local.merged(s.world)
    return _accuracy(s, images, scorer, merged, cache, len(units))


def _open_cache(s: BenchSettings, images: BenchImages, scorer: Scorer, attack_list: list[Any]) -> ChunkCache:
    """The chunk cache folder of these settings (no cache without attacks: clean scoring is one quick pass)."""
    if s.cache_dir is None or not attack_list:
        return ChunkCache(None)
    fields = {
        "model_sha256": s.model_sha256(), "images_sha256": array_sha256(images.x.numpy(), images.y.numpy()),
        "dataset": images.meta.name, "samples": images.n, "eps": images.eps,
        "attacks": [a.to_dict() for a in attack_list], "evaluation_draws": scorer.draws, "seed": s.seed,
        "isa": s.isa, "emulated": s.emulated, "runtime": s.runtime, "target": s.profile.name,
        "chunk_images": s.chunk, "twin": scorer.twin is not None,
    }
    key, described = cache_key(fields)
    return ChunkCache(s.cache_dir / key, described)


def _progress_tasks(s: BenchSettings, sink: _ProgressSink, attack_list: list[Any],
                    mine: list[_Unit]) -> dict[int, Callable[..., None]]:
    """One progress task per attack, over the images of this rank's chunks (clean scoring is quick: no bar)."""
    where = f", rank {s.world.rank} of {s.world.size}" if s.world.distributed else ""
    tasks: dict[int, Callable[..., None]] = {-1: lambda advance=0, description=None: None}
    for a in range(len(attack_list)):
        total = sum(u.size for u in mine if u.attack == a)
        atk = attack_list[a]
        source = "queries" if atk.black_box else atk.gradients
        tasks[a] = sink.task(f"{atk.name} ({_SOURCE_LABELS[source].format(runtime=s.runtime)}{where})", total)
    return tasks


def _unit_shapes(unit: _Unit, atk: Any, scorer: Scorer) -> dict[str, tuple[int, ...]]:
    """The arrays a unit's cache file must hold, with their shapes."""
    m = unit.size
    shapes: dict[str, tuple[int, ...]] = {"preds": (scorer.draws, m)}
    if scorer.twin is not None:
        shapes["agree"] = (m,)
    if atk is None:
        shapes["classes"] = ()
        return shapes
    shapes.update({"pert": (m,), "in_range": (m,), "time_s": ()})
    if hasattr(atk, "queries_used"):
        shapes["queries"] = (m,)
    return shapes


def _compute_unit(s: BenchSettings, images: BenchImages, scorer: Scorer, atk: Any,
                  unit: _Unit) -> dict[str, np.ndarray]:
    """One unit, from its own seed: the clean images scored, or an attack's images crafted and scored."""
    import torch

    seed = chunk_seed(s.seed, unit.number)
    torch.manual_seed(seed)
    scorer.reseed(seed)
    x, y = images.x[unit.part], images.y[unit.part]
    if atk is None:
        preds, classes = scorer.preds(x.numpy())
        _check_classes(s, images, classes)
        out = {"preds": preds.astype(np.int64), "classes": np.array(classes, dtype=np.int64)}
        scored = x
    else:
        atk.reseed(seed)
        made = craft(atk, scorer.gradient_model(atk), x, y, ATTACK_BATCH)
        scored = made.x_adv
        preds, _ = scorer.preds(scored.numpy())
        flat = scored.flatten(1)
        out = {"preds": preds.astype(np.int64), "pert": (flat - x.flatten(1)).abs().amax(1).numpy(),
               "in_range": ((flat.amin(1) >= 0.0) & (flat.amax(1) <= 1.0)).numpy(),
               "time_s": np.array(made.time_s)}
        if made.queries is not None:
            out["queries"] = made.queries.numpy()
    if scorer.twin is not None:
        out["agree"] = scorer.twin_agreement(scored, scorer.runtime_preds(scored.numpy(), preds))
    return out


def _check_classes(s: BenchSettings, images: BenchImages, classes: int) -> None:
    if classes < images.meta.num_classes:
        raise UsageError(f"{s.path}: the model outputs {classes} logits, dataset {images.meta.name!r} has "
                         f"{images.meta.num_classes} classes; pass the --dataset the model was trained on")


def _accuracy(s: BenchSettings, images: BenchImages, scorer: Scorer, r: _Results, cache: ChunkCache,
              n_units: int) -> dict[str, Any]:
    """The accuracy section from the merged per-image arrays (the same on every rank)."""
    y_np = images.y.numpy()
    n = images.n
    clean_preds = r["clean_preds"].astype(np.int64)
    scorer.classes, scorer.clean_preds = int(r["classes"].max()), clean_preds
    _check_classes(s, images, scorer.classes)
    accuracy: dict[str, Any] = {
        "samples": n,
        "test_split_images": images.n_total,
        "subset": "all test images" if n == images.n_total else
                  f"fixed random subset (seed {SUBSET_SEED}) of the test split",
        "evaluation_draws": scorer.draws,
        "clean_acc_pct": _pct((clean_preds == y_np[None]).mean(0).mean()),
        "clean_acc_draws_pct": [_pct((p == y_np).mean()) for p in clean_preds],
    }
    worst = WorstCase()
    worst.add("clean", (clean_preds == y_np[None]).mean(0))
    twin_info = _twin_info(s, scorer, r["clean_agree"] > 0.5)
    robust: list[dict[str, Any]] = []
    flags: list[str] = []
    adv_agree: list[np.ndarray] = []
    for a, atk in enumerate(scorer.attack_list):
        row, score = _attack_row(s, images, atk, r, a)
        worst.add(atk.name, score)
        if scorer.twin is not None:
            agree = r["agree"][a] > 0.5
            row["twin_agreement_pct"] = _pct(agree.mean())
            adv_agree.append(agree)
        if not row["within_eps"] or not row["in_unit_range"]:
            flags.append(f"{atk.name} produced images outside the eps ball or [0, 1] "
                         f"(max |x_adv - x| = {row['max_perturbation']:.6g}, eps {atk.eps:g}): its figure is invalid")
        robust.append(row)
    if scorer.twin is not None and adv_agree:
        twin_info["adversarial_agreement_pct"] = _pct(np.concatenate(adv_agree).mean())
    flags += _agreement_flags(s, scorer, twin_info) + gradient_masking_flags(robust, n)
    accuracy["robust"] = robust
    if robust:
        accuracy["worst_case_acc_pct"] = _pct(worst.worst.mean())
        accuracy["worst_case_over"] = worst.names
        accuracy["first_broken_by"] = first_broken_by(worst)
    accuracy["twin"] = twin_info
    accuracy["flags"] = flags
    accuracy["chunks"] = _chunk_section(s, r, cache, n_units)
    accuracy["per_image"] = {
        "test_index": [int(i) for i in images.index] if images.index is not None else None,
        "order": worst.names,
        "correct_draws": [[int(round(v)) for v in sc * scorer.draws] for sc in worst.scores],
        "of_draws": scorer.draws,
    }
    return accuracy


def _attack_row(s: BenchSettings, images: BenchImages, atk: Any, r: _Results,
                a: int) -> tuple[dict[str, Any], np.ndarray]:
    """One attack's report row from the merged arrays, and its per-image score."""
    y_np = images.y.numpy()
    preds = r["preds"][a].astype(np.int64)
    score = (preds == y_np[None]).mean(0)
    source = "queries" if atk.black_box else atk.gradients
    max_pert = float(r["pert"][a].max()) if images.n else 0.0
    time_s = float(r["time_s"][a].sum())
    row = {"name": atk.name, "family": atk.family, "settings": atk.to_dict(), "gradient_source": source,
           "gradients": _GRADIENT_TEXT[source].format(runtime=s.runtime),
           "robust_acc_pct": _pct(score.mean()),
           "robust_acc_draws_pct": [_pct((p == y_np).mean()) for p in preds],
           "max_perturbation": max_pert, "eps": atk.eps, "within_eps": bool(max_pert <= atk.eps + EPS_SLACK),
           "in_unit_range": bool((r["in_range"][a] > 0.5).all()), "time_s": time_s,
           "img_per_s": images.n / time_s if time_s else None}
    if atk.black_box and hasattr(atk, "queries_used"):
        q = r["queries"][a]
        row["queries_mean"] = float(q.mean())
        row["queries_max"] = int(q.max())
    return row, score


def _twin_info(s: BenchSettings, scorer: Scorer, clean_agree: np.ndarray) -> dict[str, Any]:
    """The twin's section: how it was built and its top-1 agreement with the runtime on clean images."""
    if scorer.twin is None:
        s.notes.append(f"twin unavailable ({scorer.twin_error}); no twin agreement reported")
        return {"available": False, "reason": str(scorer.twin_error)}
    info: dict[str, Any] = {"available": True, "build_s": scorer.twin_build_s, "straight_through": True,
                            "noise": scorer.stochastic, "isa": s.isa,
                            "clean_agreement_pct": _pct(clean_agree.mean())}
    if scorer.stochastic:
        s.notes.append("the graph draws noise: twin agreement compares one draw of each, so it is below "
                       "what a deterministic graph would give")
    return info


def _chunk_section(s: BenchSettings, r: _Results, cache: ChunkCache, n_units: int) -> dict[str, Any]:
    """How the work was cut, shared and resumed."""
    computed, cached = int(r["computed"].sum()), int(r["cached"].sum())
    if cached:
        s.notes.append(f"{cached} of {n_units} chunks read from the bench cache {cache.folder} (same model, images "
                       "and settings); delete it to compute them again")
    if r["cache_failures"][0] > 0:
        s.notes.append(f"the bench cache could not be written ({cache.failure or 'on another rank'}); "
                       "the results are complete, but an interrupted rerun would start over")
    return {"images_per_chunk": s.chunk, "chunks": n_units, "computed": computed, "from_cache": cached,
            "ranks": s.world.size, "cache_dir": str(cache.folder) if cache.folder is not None else None,
            "time_s_is": "attack rows' time_s: crafting seconds summed over chunks (over every rank with --nproc; "
                         "a chunk read from the cache counts the time it took when computed)"}


_SOURCE_LABELS = {"queries": "{runtime}", "ste": "twin gradients", "smooth": "smooth surrogate gradients"}
_GRADIENT_TEXT = {"queries": "none ({runtime} queries)", "ste": "differentiable twin, straight-through rounding",
                  "smooth": "smooth surrogate (the graph without rounding), images scored on {runtime}"}


def _agreement_flags(s: BenchSettings, scorer: Scorer, twin_info: dict[str, Any]) -> list[str]:
    flags = []
    for what in ("clean_agreement_pct", "adversarial_agreement_pct"):
        v = twin_info.get(what)
        if v is not None and v < MIN_AGREEMENT_PCT and not scorer.stochastic and not s.emulated:
            flags.append(f"the twin agrees with onnxruntime on only {v:.1f}% of {what.split('_')[0]} images: "
                         "white-box gradients may not reflect the deployed model")
    return flags
