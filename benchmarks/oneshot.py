"""One-shot pruning quality: validation perplexity of the small GPT on the embedded Python-source corpus after
magnitude, Wanda, SparseGPT and OWL one-shot pruning, before and after a short recovery fine-tune, over seeds.

    .venv/bin/python benchmarks/oneshot.py                    # 3 seeds, one after the other
    .venv/bin/python benchmarks/oneshot.py --quick            # one seed, short runs: a smoke test
    .venv/bin/python benchmarks/oneshot.py --seeds 0 --json s0.json & ...   # one process per seed, then:
    .venv/bin/python benchmarks/oneshot.py --combine s0.json s1.json s2.json
    .venv/bin/python benchmarks/oneshot.py --seq-len 256 --train-steps 800 --finetune-steps 50 --calibration 128 \
        --eval-windows 128                                    # a stronger model, on a quiet machine
    .venv/bin/python benchmarks/oneshot.py --seq-len 256 --dense-run RUN0 RUN1 RUN2   # trained dense models:
        # one run directory per seed of `scripts/train.py experiment=pysource_gpt pruning.sparsity=0 seed=S`
    .venv/bin/python benchmarks/oneshot.py --seq-len 256 --dense-run RUN0 RUN1 RUN2 --outliers   # no pruning: the
        # dense models' outlier profile that Wanda and OWL rest on (see below)

The defaults are sized for a shared 2-core machine (each training step of the GPT at seq_len 64 took about 5 s
there under a load of 12): a short dense run, a 5-step recovery. Perplexity does not depend on the load; the
time does, and only perplexity is reported.

For each seed:

1. **Dense model**: :class:`lightning_prune.models.GPT` (``model=gpt_tiny``: hidden 128, 4 layers, 8 query heads
   sharing 4 key/value heads, SwiGLU 384, tied embeddings, 0.82M parameters) trained from that seed for
   ``--train-steps`` steps of 16 windows of ``--seq-len`` bytes of :class:`lightning_prune.data.PySourceDataModule`
   (the standard library's sources), AdamW lr 3e-3, betas (0.9, 0.95), weight decay 0.1, 50 warm-up steps, cosine
   to 0.1x, in a plain PyTorch loop. With ``--dense-run`` (one training run directory per seed, e.g. the dense
   runs of ``scripts/train.py -m experiment=pysource_gpt seed=0,1,2 pruning.sparsity=0``), the dense model is the
   network of that run's newest checkpoint instead, rebuilt from the run's Hydra config; ``--seq-len`` must be the
   run's (256 for ``experiment=pysource_gpt``).
2. **One-shot pruning** of a copy of the dense model with :func:`lightning_prune.oneshot.prune_one_shot` from
   ``--calibration`` training windows (drawn once per seed, the same for every variant): magnitude, Wanda and
   SparseGPT at 50/60/70% unstructured and at 2:4 and 4:8; Wanda and SparseGPT with OWL's layer sparsity
   (``allocation="owl"``, same total) at 50/60/70%. The decoder layers are pruned (every ``nn.Linear`` inside them:
   q/k/v/o and gate/up/down); the embedding (tied with the output head) stays dense, as in the papers.
3. **Recovery**: ``--finetune-steps`` AdamW steps (lr 3e-4, weight decay 0) with the masks fixed
   (:meth:`lightning_prune.masks.MaskSet.attach`: pruned weights stay exactly zero), on the same batches for every
   variant.

``--outliers`` prunes nothing: on each seed's dense model and its calibration windows it prints what Wanda and OWL
rest on, per block: OWL's outlier ratio (the fraction of the block's Wanda scores ``|W_ij| * ||X_j||_2`` above 5
times their mean), the sparsity OWL gives the block at 70%, and the spread of the input-feature norms ``||X_j||_2``
of its linear layers (largest over median, the largest over the block's layers). Trained LLMs have a few input
features of very large magnitude (Dettmers et al., 2022), which Wanda's scaling protects and OWL's ratios count.

Perplexity is ``exp`` of the mean next-byte cross-entropy on the validation split's first ``--eval-windows``
fixed windows (:func:`lightning_prune.models.evaluate_perplexity`): it does not depend on the machine's load. The
table gives mean ± std over seeds, the increase over dense, and the issue's targets.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from typing import Any

from _common import environment, markdown_table, mean_std

#: variant name -> (method, structure, sparsity, allocation)
VARIANTS: dict[str, tuple[str, str, float | None, str | None]] = {}
for _s in (0.5, 0.6, 0.7):
    for _m in ("magnitude", "wanda", "sparsegpt"):
        VARIANTS[f"{_m} {int(_s * 100)}%"] = (_m, "unstructured", _s, None)
    for _m in ("wanda", "sparsegpt"):
        VARIANTS[f"{_m}+owl {int(_s * 100)}%"] = (_m, "unstructured", _s, "owl")
for _p in ("2:4", "4:8"):
    for _m in ("magnitude", "wanda", "sparsegpt"):
        VARIANTS[f"{_m} {_p}"] = (_m, _p, None, None)


def _batches(loader: Any, n: int, seed: int) -> list[Any]:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                return out
    return out


def _train(model: Any, batches: list[Any], lr: float, warmup: int, weight_decay: float) -> None:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    total = len(batches)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if warmup > 0 else None
    model.train()
    began = time.perf_counter()
    for step, (x, y) in enumerate(batches):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}: loss {loss.item():.3f} ({time.perf_counter() - began:.0f} s)", flush=True)
    model.eval()


def _finetune(model: Any, masks: Any, batches: list[Any], lr: float) -> None:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    masks.attach([opt])
    try:
        model.train()
        for x, y in batches:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        masks.detach()
        model.eval()


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import torch

    from lightning_prune.data import PySourceDataModule
    from lightning_prune.models import GPT, GPTConfig

    data = PySourceDataModule(
        seq_len=args.seq_len,
        batch_size=16,
        seed=seed,
        samples_per_epoch=16 * (args.train_steps + args.finetune_steps + args.calibration),
        max_eval_windows=args.eval_windows,
    )
    data.setup("fit")
    stream = _batches(data.train_dataloader(), args.train_steps + args.finetune_steps + 8, seed)
    train_batches = stream[: args.train_steps]
    tune_batches = stream[args.train_steps : args.train_steps + args.finetune_steps]
    calib_inputs = torch.cat([x for x, _ in stream[args.train_steps + args.finetune_steps :]])[: args.calibration]
    calibration = list(calib_inputs.split(16))
    val = data.val_dataloader()

    torch.manual_seed(seed)
    if args.dense_run:
        dense = _trained_dense(args.dense_run[args.seeds.index(seed)], args.seq_len)
        if args.outliers:  # printed only: no variant is pruned
            _outlier_profile(seed, dense, calibration)
            return {}
        return _prune_variants(seed, dense, calibration, tune_batches, val, args)
    config = GPTConfig(
        vocab_size=256,
        max_position_embeddings=args.seq_len,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=384,
    )
    dense = GPT(config)
    began = time.perf_counter()
    _train(dense, train_batches, lr=3e-3, warmup=min(50, args.train_steps // 4), weight_decay=0.1)
    print(f"seed {seed}: dense model trained in {time.perf_counter() - began:.0f} s", flush=True)
    return _prune_variants(seed, dense, calibration, tune_batches, val, args)


def _export_script() -> Any:
    """``scripts/export.py``, whose checkpoint reader (``torch.load`` with ``weights_only=True``) this script shares."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "export.py"
    spec = importlib.util.spec_from_file_location("lightning_prune_export_script", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _trained_dense(run: str, seq_len: int) -> Any:
    """The network of the newest checkpoint under the training run directory ``run``, rebuilt from its Hydra
    config (``<run>/.hydra/config.yaml``)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from lightning_prune.app.train import instantiate_module
    from lightning_prune.models import GPT

    folder = Path(run)
    config = folder / ".hydra" / "config.yaml"
    checkpoints = sorted(folder.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not config.is_file() or not checkpoints:
        raise SystemExit(
            f"--dense-run {run!r}: expected a training run directory with .hydra/config.yaml and a *.ckpt."
        )
    module = instantiate_module(OmegaConf.load(config))
    state = _export_script().load_checkpoint(checkpoints[-1])["state_dict"]  # weights_only, configs allowed
    module.load_state_dict(state)
    dense = module.model
    if not isinstance(dense, GPT) or dense.config.max_position_embeddings != seq_len:
        raise SystemExit(
            f"--dense-run {run!r}: its model is {type(dense).__name__} with "
            f"{getattr(getattr(dense, 'config', None), 'max_position_embeddings', '?')} positions; this benchmark "
            f"needs lightning_prune's GPT with --seq-len ({seq_len}) positions."
        )
    print(f"dense model: {checkpoints[-1]} ({sum(p.numel() for p in dense.parameters()):,} parameters)", flush=True)
    return dense.eval()


def _prune_variants(
    seed: int, dense: Any, calibration: list[Any], tune_batches: list[Any], val: Any, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Every variant of :data:`VARIANTS` pruned from a copy of ``dense``, before and after recovery."""
    from lightning_prune.masks import MaskSet, prunable_parameters
    from lightning_prune.models.language import evaluate_perplexity
    from lightning_prune.oneshot import prune_one_shot

    results: dict[str, dict[str, float]] = {}
    dense_ppl = evaluate_perplexity(dense, val)
    tuned = copy.deepcopy(dense)  # the dense model fine-tuned as long, so recovery is compared like for like
    _finetune(tuned, MaskSet(prunable_parameters(tuned)), tune_batches, lr=args.finetune_lr)
    results["dense"] = {"before": dense_ppl, "after": evaluate_perplexity(tuned, val), "sparsity": 0.0}
    print(f"seed {seed}: dense ppl {dense_ppl:.3f}", flush=True)
    for name, (method, structure, sparsity, allocation) in VARIANTS.items():
        model = copy.deepcopy(dense)
        tick = time.perf_counter()
        masks, report = prune_one_shot(
            model,
            calibration,
            method=method,
            sparsity=sparsity,
            structure=structure,
            allocation=allocation,
            num_samples=None,
            error_batches=0,
        )
        seconds = time.perf_counter() - tick
        before = evaluate_perplexity(model, val)
        _finetune(model, masks, tune_batches, lr=args.finetune_lr)
        exact = all(bool((p[~m] == 0).all()) for p, m in zip(masks.params, masks.masks))
        after = evaluate_perplexity(model, val)
        results[name] = {
            "before": before,
            "after": after,
            "sparsity": report.sparsity,
            "seconds": seconds,
            "exact": float(exact),
        }
        print(
            f"seed {seed}: {name:<20} sparsity {report.sparsity:.4f} ppl {before:8.3f} -> {after:7.3f} "
            f"(prune {seconds:.1f} s, masks exact after fine-tune: {exact})",
            flush=True,
        )
    return results


def _outlier_profile(seed: int, dense: Any, calibration: list[Any], sparsity: float = 0.7) -> list[dict[str, float]]:
    """Per block of ``dense``: OWL's outlier ratio, OWL's sparsity at ``sparsity`` and the spread of the input
    feature norms (largest over median) of its linear layers, from the calibration windows."""
    import torch
    from torch import nn

    from lightning_prune.oneshot import OWL

    squares: dict[str, Any] = {}
    linears: dict[str, Any] = {}
    hooks = []
    for b, block in enumerate(dense.layers):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                key = f"layers.{b}.{name}.weight"
                linears[key] = module
                squares[key] = torch.zeros(module.in_features, dtype=torch.float64)

                def hook(_: Any, inputs: tuple[Any, ...], __: Any, key: str = key) -> None:
                    x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                    squares[key] += (x * x).sum(0)

                hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for x in calibration:
                dense(x)
    finally:
        for h in hooks:
            h.remove()
    owl = OWL()
    norms = {key: squares[key].sqrt().float() for key in squares}
    for b in range(len(dense.layers)):
        owl.observe_block(
            b, [(k, linears[k].weight.detach(), norms[k]) for k in linears if k.startswith(f"layers.{b}.")]
        )
    ratios = owl.ratios()
    targets = owl.targets({k: linears[k].weight.numel() for k in linears}, sparsity)
    profile = []
    for b in range(len(dense.layers)):
        keys = [k for k in linears if k.startswith(f"layers.{b}.")]
        spread = max(float(norms[k].max() / norms[k].median().clamp_min(1e-30)) for k in keys)
        profile.append({"ratio": ratios[keys[0]], "target": targets[keys[0]], "spread": spread})
        print(
            f"seed {seed}: block {b}: OWL outlier ratio {ratios[keys[0]]:.4%}, OWL sparsity at "
            f"{sparsity:.0%} {targets[keys[0]]:.4f}, input-norm spread (max / median) {spread:.2f}",
            flush=True,
        )
    return profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--finetune-steps", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument(
        "--dense-run",
        nargs="+",
        default=None,
        help="training run directories, one per seed in --seeds order, whose newest checkpoint is the dense model",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--outliers", action="store_true", help="with --dense-run: print the dense models' outlier profile, no pruning"
    )
    parser.add_argument("--json", default=None, help="write every figure to this file")
    parser.add_argument("--threads", type=int, default=1, help="perplexity does not depend on it; 1 avoids stalls")
    parser.add_argument(
        "--combine", nargs="+", default=None, help="print the table of the --json files of earlier runs (one per seed)"
    )
    args = parser.parse_args()
    if args.dense_run and len(args.dense_run) != len(args.seeds):
        parser.error(
            f"--dense-run needs one run directory per seed: {len(args.seeds)} seeds, {len(args.dense_run)} runs"
        )
    if args.outliers and not args.dense_run:
        parser.error("--outliers needs --dense-run (one trained dense run directory per seed)")
    if args.quick:
        args.seeds, args.train_steps, args.finetune_steps, args.calibration, args.eval_windows = [0], 60, 5, 32, 32

    if args.combine:
        runs: dict[int, dict[str, dict[str, float]]] = {}
        dense_runs: list[str] = []  # every file's own dense runs, not only the last file's
        for path in args.combine:
            with open(path) as f:
                saved = json.load(f)
            runs.update({int(k): v for k, v in saved["runs"].items()})
            given = {k: v for k, v in saved["args"].items() if k not in ("seeds", "json", "combine", "threads")}
            vars(args).update(given)
            dense_runs += saved["args"].get("dense_run") or []
        args.seeds = sorted(runs)
        args.dense_run = dense_runs or None
    else:
        import torch

        torch.set_num_threads(args.threads)
        runs = {seed: run_seed(seed, args) for seed in args.seeds}
        if args.outliers:
            return
    names = ["dense", *VARIANTS]

    def values(name: str, key: str) -> list[float]:
        return [runs[s][name][key] for s in args.seeds]

    def increase(name: str, key: str) -> list[float]:
        return [runs[s][name][key] - runs[s]["dense"][key] for s in args.seeds]

    rows = []
    for name in names:
        rows.append(
            [
                name,
                f"{statistics.mean(values(name, 'sparsity')):.3f}",
                mean_std(values(name, "before"), digits=3),
                mean_std(increase(name, "before"), digits=3, signed=True),
                mean_std(values(name, "after"), digits=3),
                mean_std(increase(name, "after"), digits=3, signed=True),
            ]
        )
    mean = statistics.mean

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    checks = []
    mag50 = mean(increase("magnitude 50%", "before"))
    for m in ("wanda", "sparsegpt"):
        inc = mean(increase(f"{m} 50%", "before"))
        checks.append(
            f"- 50% unstructured, {m}: ppl increase {inc:+.3f} vs magnitude {mag50:+.3f} "
            f"(ratio {inc / mag50 if mag50 else float('nan'):.3f}; target <= 1/3): {verdict(inc <= mag50 / 3)}"
        )
    sg, wa = mean(values("sparsegpt 2:4", "before")), mean(values("wanda 2:4", "before"))
    checks.append(f"- 2:4, SparseGPT {sg:.3f} vs Wanda {wa:.3f} (target SparseGPT <= Wanda): {verdict(sg <= wa)}")
    for m in ("wanda", "sparsegpt"):
        owl, uni = mean(values(f"{m}+owl 70%", "before")), mean(values(f"{m} 70%", "before"))
        checks.append(f"- 70%, {m}: OWL {owl:.3f} vs uniform {uni:.3f} (target OWL < uniform): {verdict(owl < uni)}")
    per_seed_owl = [
        f"seed {s}: "
        + ", ".join(
            f"{m} {runs[s][f'{m}+owl 70%']['before'] - runs[s][f'{m} 70%']['before']:+.3f}"
            for m in ("wanda", "sparsegpt")
        )
        for s in args.seeds
    ]
    exact = all(runs[s][n]["exact"] == 1.0 for s in args.seeds for n in VARIANTS)
    print()
    print(
        environment(
            threads=args.threads,
            extra={
                "model": "GPT h128 x4 layers (0.82M params), byte vocabulary, seq_len "
                + (
                    f"{args.seq_len}, dense models from the runs {' '.join(args.dense_run)}"
                    if args.dense_run
                    else f"{args.seq_len}, batch 16, {args.train_steps} dense steps"
                ),
                "one-shot": f"{args.calibration} calibration windows; recovery {args.finetune_steps} AdamW steps at "
                f"lr {args.finetune_lr:g}, masks fixed",
                "eval": f"validation perplexity on {args.eval_windows} fixed windows of {args.seq_len} bytes",
                "seeds": " ".join(map(str, args.seeds)),
            },
        )
    )
    print()
    print("Targets (on the mean over seeds, perplexity before recovery):")
    print("\n".join(checks))
    print("OWL minus uniform at 70% per seed: " + "; ".join(per_seed_owl))
    print(f"Masks exact (pruned weights zero) after every recovery fine-tune: {exact}")
    print()
    print(
        markdown_table(
            [
                "variant",
                "sparsity (pruned layers)",
                "ppl one-shot",
                "increase",
                f"ppl after {args.finetune_steps}-step recovery",
                "increase",
            ],
            rows,
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": {str(k): v for k, v in runs.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
