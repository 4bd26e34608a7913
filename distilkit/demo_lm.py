"""``distilkit demo lm``: distil a small GPT-2 into a smaller one on real English text, five ways.

Everything is built here, from text that ships with Python (no download):

* **text**: the help topics of ``pydoc_data.topics`` (Python's language reference, as ``help()`` shows it) and the
  docstrings of the standard library's top-level modules (module, class and function docstrings of at least 200
  characters), one document each, in a fixed order; every 10th document is held out;
* **tokenizer**: a byte-level BPE (Hugging Face ``tokenizers``) trained on the training documents, with
  ``<|endoftext|>`` between documents;
* **data**: each split's documents tokenized into one stream, cut into windows of ``seq_len`` tokens; a window's
  index is its example id (the top-k cache is keyed by it);
* **models**: a teacher GPT-2 (``teacher_layers`` × ``teacher_width``) trained on the labels first, and students
  (``student_layers`` × ``student_width``), built from ``transformers.GPT2Config``.

The five students of a seed start from the same initialisation and see the same windows in the same order; only
the loss differs (``kd_weight`` = w, the logits shifted by ``dk.adapters.hf(..., causal=True)`` and the batch by
``dk.adapters.causal``):

=============  ===========================================================================================
``labels``     ``hard_ce`` on the next tokens (the baseline: no teacher)
``kd``         w · ``kd_kl`` (dense logits, teacher run at each step) + (1 − w) · ``hard_ce``
``fused``      the same objective from ``dk.fused_linear_kd`` on the last hidden states and the ``lm_head``
               weights (the logits of neither model materialised)
``topk``       w · ``kd_kl`` against the teacher's top-``top_k`` read from a keyed cache written once before
               training (``dk.cache.write_topk``, float16; ``policy=topk_policy``) + (1 − w) · ``hard_ce``
``on_policy``  GKD (Agarwal et al., 2024): from step ``on_policy_start`` on, with probability λ the student
               continues the window's first ``prompt_len`` tokens by sampling (``generate``, temperature 1) and
               the batch is its own text: w · ``kd_kl`` on the generated tokens (no labels); otherwise, and
               before that step, the ``kd`` loss on the dataset window
=============  ===========================================================================================

Choices measured while setting the recipe (one seed, 400 steps, held-out perplexity; labels only 223.6, dense KD
189.5): the top-k cache with k = 32 of 2,048 classes keeps 64 % of the teacher's mass on average, and with
``policy="tail"`` it trained *worse* than labels only (246.3), with ``"renormalize"`` close to dense KD (196.8), as
k = 128 with ``"tail"`` (83 % kept, 197.5); so ``topk_policy="renormalize"``. On-policy from the first step (a
student that writes noise) gave 271.9, worse than labels only; from step 200, 201.6: ``on_policy_start=200``.
Held-out perplexity of real text rewards training on real text, which every generated batch gives up.

Reported per student: held-out perplexity (exp of the mean next-token cross-entropy over every held-out window)
every ``eval_every`` steps and after the last, and training tokens per second (predicted positions of the
training batches, over the training loop's wall time without the evaluations; the top-k cache's write is timed
apart). Each run writes into a new folder: TensorBoard logs per model, ``summary.json`` and ``curves.png``.

Measured results are in the README ("The LLM demo") and in ``notebooks/06_llm_distillation.ipynb``.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

import distilkit as dk

from .demo import _mean_std, _progress

VARIANTS = ("labels", "kd", "fused", "topk", "on_policy")
LABELS = {"labels": "labels only", "kd": "KD, dense kd_kl", "fused": "KD, fused head", "topk": "KD, top-k cache",
          "on_policy": "on-policy KD (GKD)"}
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class Recipe:
    """Every number of the LLM demo; ``quick()`` is a few-step version for tests."""

    vocab_size: int = 2048
    seq_len: int = 64  # tokens per window: the model reads 64 and is trained on 63 next-token predictions
    batch: int = 16
    teacher_layers: int = 4
    teacher_width: int = 128
    teacher_heads: int = 4
    teacher_steps: int = 1000
    teacher_lr: float = 2e-3
    student_layers: int = 2
    student_width: int = 64
    student_heads: int = 2
    steps: int = 400
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 50  # linear warm-up steps, then linear decay to 0 (teacher and students)
    kd_weight: float = 0.5  # w: loss = w · divergence + (1 − w) · cross-entropy
    temperature: float = 1.0
    top_k: int = 32
    topk_policy: str = "renormalize"  # dk.TopK's policy for the cached teacher (see the module docstring)
    on_policy_fraction: float = 0.5  # λ: the probability that a batch is generated by the student
    on_policy_start: int = 200  # GKD: dataset batches only before this step (a student that can write first)
    prompt_len: int = 16
    held_out_every: int = 10  # every 10th document is held out
    eval_every: int = 50
    log_every: int = 10
    text_chars: int | None = None  # cap on the characters of text used (None: all of it)

    def quick(self) -> Recipe:
        """A smoke test of every path (a small vocabulary, tiny models, a few steps): its numbers mean nothing."""
        return dataclasses.replace(self, vocab_size=384, seq_len=32, batch=4, teacher_layers=2, teacher_width=32,
                                   teacher_heads=2, teacher_steps=8, student_layers=1, student_width=16,
                                   student_heads=2, steps=6, warmup=2, top_k=8, prompt_len=8, on_policy_start=2,
                                   eval_every=3, log_every=2, text_chars=60_000)


# ------------------------------------------------------------------------------------------------ text and tokens
def documents() -> list[str]:
    """Python's help topics (``pydoc_data.topics``), then the docstrings (≥ 200 characters) of the standard
    library's top-level modules, each a document, in a fixed order (sorted topics; sorted files, each file's
    docstrings in ``ast.walk`` order)."""
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics)]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= 200:
                    docs.append(text)
    return docs


def split(docs: Sequence[str], every: int, chars: int | None = None) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: every ``every``-th document held out; with ``chars``, the first documents up to
    about that many characters in all."""
    if chars is not None:
        total, keep = 0, []
        for doc in docs:
            if total >= chars:
                break
            keep.append(doc)
            total += len(doc)
        docs = keep
    return [d for i, d in enumerate(docs) if i % every], [d for i, d in enumerate(docs) if not i % every]


def train_tokenizer(docs: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer (``tokenizers``) with ``vocab_size`` tokens, trained on ``docs``; its only
    special token is ``<|endoftext|>`` (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def windows(tokenizer, docs: Sequence[str], seq_len: int) -> Tensor:
    """The documents tokenized into one stream (``<|endoftext|>`` after each), cut into ``[N, seq_len]`` windows
    (the last, partial one dropped)."""
    eos = tokenizer.token_to_id(EOS)
    stream = [t for enc in tokenizer.encode_batch(list(docs)) for t in (*enc.ids, eos)]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


# ------------------------------------------------------------------------------------------------ models
def gpt2(vocab_size: int, layers: int, width: int, heads: int, seq_len: int):
    """A GPT-2 from a config (no download), its head tied to the embeddings as GPT-2's."""
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=width, n_layer=layers,
                                     n_head=heads, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def outputs(model, ids: Tensor, *, logits: bool = True) -> dict[str, Any]:
    """distilkit's outputs of a causal LM on ``ids``: logits and hidden states shifted (position i predicts token
    i + 1) and the ``lm_head`` weight, for the dense and the fused terms. ``logits=False`` runs the model without
    its head (``model.transformer``: the last hidden state is after the final layer norm, what the head reads), so
    the ``[B, L, V]`` logits are never computed: what the fused term wants."""
    mask = torch.ones_like(ids)
    if logits:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    else:
        out = model.transformer(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return dk.adapters.hf(out, causal=True, lm_head=model.lm_head.weight)


def perplexity(model, data: Tensor, batch: int = 64) -> float:
    """exp of the mean next-token cross-entropy of ``model`` over every position of the windows ``data``."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for rows in data.split(batch):
            logits = model(input_ids=rows, attention_mask=torch.ones_like(rows)).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(),
                                                             reduction="sum"))
            count += rows[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


# ------------------------------------------------------------------------------------------------ the losses
def specs(r: Recipe) -> dict[str, dk.Spec]:
    """The distilkit spec of each variant (``on_policy`` uses the ``kd`` spec: its generated batches carry no
    labels, so its cross-entropy term is 0 there — a fully masked term is 0)."""
    w = r.kd_weight
    if not 0 < w <= 1:  # the fused term carries the cross-entropy as ce_weight = (1 − w) / w
        raise ValueError(f"demo_lm.specs: expected kd_weight in (0, 1], got {w!r} (0 is the 'labels' variant).")
    hard = dk.hard_ce.on("logits", labels="labels").named("ce")
    kd = (w * dk.kd_kl.on("logits", mask="mask", temperature=r.temperature).named("kd")
          + (1 - w) * hard)
    fused = w * dk.fused_linear_kd.on([("hidden", -1), "lm_head"], labels="labels", temperature=r.temperature,
                                      ce_weight=(1 - w) / w).named("fused")
    return {"labels": hard, "kd": kd, "fused": fused, "topk": kd, "on_policy": kd}


class Trained(NamedTuple):
    """A trained model, its held-out perplexity curve (``(steps done, perplexity)`` pairs) and its training
    throughput (predicted tokens per second of the training loop, evaluations excluded)."""

    model: Any
    curve: list[tuple[int, float]]
    tokens_per_s: float
    generated_batches: int = 0  # on_policy: the batches the student wrote


def _schedule(r: Recipe, steps: int) -> Callable[[int], float]:
    return lambda i: min((i + 1) / max(r.warmup, 1), max(0.0, (steps - i) / max(steps - r.warmup, 1)))


def _train(r: Recipe, model, steps: int, lr: float, batch_fn: Callable[[int], Tensor], loss_fn, *, held_out: Tensor,
           writer, progress: bool, desc: str) -> Trained:
    """The loop every model goes through: ``loss_fn(i, ids)`` → a step output, AdamW with warm-up and linear decay,
    held-out perplexity every ``r.eval_every`` steps, training time apart from evaluation time."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=r.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(r, steps))
    curve = [(0, perplexity(model, held_out))]
    trained_s, tokens = 0.0, 0
    model.train()
    with _progress(steps, desc, progress) as bar:
        for i in range(steps):
            start = time.perf_counter()
            ids = batch_fn(i)
            out = loss_fn(i, ids)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            trained_s += time.perf_counter() - start
            tokens += len(ids) * (r.seq_len - 1)
            if writer is not None:
                writer.log({**out.metrics, "lr": sched.get_last_lr()[0]}, i)
            if (i + 1) % r.eval_every == 0 or i + 1 == steps:
                curve.append((i + 1, perplexity(model, held_out)))
                if writer is not None:
                    writer.log({"perplexity/held_out": curve[-1][1]}, i + 1)
            bar.update()
    return Trained(model.eval(), curve, tokens / max(trained_s, 1e-9))


def _batches(n: int, batch: int, seed: int) -> Callable[[int], Tensor]:
    """Window ids for step i: the windows in a fresh random order each epoch, drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)

    def ids(i: int) -> Tensor:
        nonlocal order
        while len(order) < (i + 1) * batch:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        return order[i * batch:(i + 1) * batch]

    return ids


def train_teacher(r: Recipe, train: Tensor, held_out: Tensor, *, writer=None, progress: bool = True) -> Trained:
    """The teacher, trained on the next tokens of the training windows (``hard_ce`` through a distilkit step)."""
    torch.manual_seed(0)
    teacher = gpt2(r.vocab_size, r.teacher_layers, r.teacher_width, r.teacher_heads, r.seq_len)
    step = dk.make_step(specs(r)["labels"], compile=False)

    def loss(i: int, ids: Tensor):
        return step(outputs(teacher, train[ids]), {}, dk.adapters.causal({"input_ids": train[ids]}), step=i)

    return _train(r, teacher, r.teacher_steps, r.teacher_lr, _batches(len(train), r.batch, 10_000), loss,
                  held_out=held_out, writer=writer, progress=progress, desc="teacher")


def write_cache(r: Recipe, teacher, train: Tensor, path: str | os.PathLike) -> dict:
    """The teacher's top-``r.top_k`` at every position of every training window, keyed by window index."""
    def logits(batch):
        ids = batch["input_ids"]
        return teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    items = ({"ids": ids, "input_ids": train[ids]} for ids in torch.arange(len(train)).split(64))
    with torch.no_grad():
        return dk.cache.write_topk(path, items, k=r.top_k, dtype="float16", teacher_fn=logits)


def train_student(r: Recipe, variant: str, train: Tensor, held_out: Tensor, *, teacher=None, cache=None,
                  seed: int = 0, writer=None, progress: bool = True) -> Trained:
    """One student of ``variant`` (one of :data:`VARIANTS`); ``teacher`` for kd/fused/on_policy, ``cache`` (a
    :func:`dk.cache.read_topk`) for topk."""
    if variant not in VARIANTS:
        raise ValueError(f"demo_lm.train_student: expected variant in {VARIANTS}, got {variant!r}.")
    torch.manual_seed(seed)
    student = gpt2(r.vocab_size, r.student_layers, r.student_width, r.student_heads, r.seq_len)
    spec = specs(r)[variant]
    step = dk.make_step(spec, compile=False)
    sampler = torch.Generator().manual_seed(seed + 1_000)
    generated = 0
    if writer is not None:
        writer.log_config(spec)

    def loss(i: int, ids: Tensor):
        tokens = train[ids]
        batch = dk.adapters.causal({"input_ids": tokens})
        if variant == "labels":
            return step(outputs(student, tokens), {}, batch, step=i)
        if variant == "topk":
            t = cache.teacher(ids, r.seq_len - 1, policy=r.topk_policy)
            batch["mask"] = batch["mask"] & t.mask
            return step(outputs(student, tokens), {"logits": t.topk}, batch, step=i)
        if variant == "on_policy" and float(torch.rand((), generator=sampler)) < r.on_policy_fraction \
                and i >= r.on_policy_start:  # a draw at every step, warm-up included
            nonlocal generated
            generated += 1
            tokens, batch = _generated(r, student, tokens)
        dense = variant != "fused"  # the fused term reads hidden states and head weights only
        with torch.no_grad():
            t = outputs(teacher, tokens, logits=dense)
        return step(outputs(student, tokens, logits=dense), t, batch, step=i)

    done = _train(r, student, r.steps, r.lr, _batches(len(train), r.batch, seed), loss, held_out=held_out,
                  writer=writer, progress=progress, desc=f"seed {seed}: {variant}")
    return done._replace(generated_batches=generated)


def _generated(r: Recipe, student, tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The student's continuation of each window's first ``prompt_len`` tokens (sampled at temperature 1, to the
    window's length) and its batch: the KD mask on the generated tokens, no labels."""
    prompt = tokens[:, : r.prompt_len]
    new = r.seq_len - r.prompt_len
    student.eval()
    with torch.no_grad():
        ids = student.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0,
                               temperature=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    # min_new_tokens: every continuation has the window's length (<|endoftext|> is not sampled until then)
    student.train()
    labels = ids.clone()
    labels[:, : r.prompt_len] = -100  # distil the continuation only
    batch = dk.adapters.causal({"input_ids": ids, "labels": labels})
    return ids, {**batch, "labels": torch.full_like(batch["labels"], -100)}


# ------------------------------------------------------------------------------------------------ the demo
def run(out: str | os.PathLike, *, seeds: int = 3, quick: bool = False, recipe: Recipe | None = None,
        variants: Sequence[str] = VARIANTS, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
    """Run the demo, write TensorBoard logs, ``summary.json`` and ``curves.png`` into ``out`` (a new or empty
    directory; :func:`~distilkit.demo.new_run_dir` makes one) and return the summary. ``threads``: torch's intra-op
    threads during the run (restored after; None keeps the current setting)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"demo_lm.run: expected seeds to be an int >= 1, got {seeds!r}.")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"demo_lm.run: expected variants from {VARIANTS}, got {list(variants)!r}.")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"demo_lm.run: expected out to be a new or empty directory (runs must not mix), got "
                         f"{str(out)!r}.")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(out, seeds, recipe or Recipe(), quick, tuple(variants), progress)
    finally:
        torch.set_num_threads(previous)


class Data(NamedTuple):
    """The demo's data: the tokenizer, the training and held-out windows ``[N, seq_len]``, and what they hold."""

    tokenizer: Any
    train: Tensor
    held_out: Tensor
    stats: dict[str, Any]


def prepare(r: Recipe) -> Data:
    """Documents, split, tokenizer and windows for the recipe ``r``."""
    docs_train, docs_held = split(documents(), r.held_out_every, r.text_chars)
    tokenizer = train_tokenizer(docs_train, r.vocab_size)
    train, held_out = windows(tokenizer, docs_train, r.seq_len), windows(tokenizer, docs_held, r.seq_len)
    stats = {"text": "pydoc_data.topics (Python's help topics) + docstrings of the standard library's top-level "
                     "modules",
             "documents": {"train": len(docs_train), "held_out": len(docs_held)},
             "characters": {"train": sum(map(len, docs_train)), "held_out": sum(map(len, docs_held))},
             "tokens": {"train": train.numel(), "held_out": held_out.numel()}}
    return Data(tokenizer, train, held_out, stats)


def compare(r: Recipe, data: Data, teacher, *, seeds: int = 3, variants: Sequence[str] = VARIANTS,
            out: str | os.PathLike | None = None, progress: bool = True, cache=None) -> dict[str, Any]:
    """Train a student of each variant for each seed (seed-major) against the trained ``teacher``; the top-k cache
    (for ``"topk"``) is ``cache`` (a :func:`dk.cache.read_topk` of :func:`write_cache`), or written once into a
    temporary directory. With ``out``, TensorBoard logs go to
    ``out/seed<k>/<variant>``. Returns ``{"students", "curves", "cache"}``: per variant the final held-out
    perplexity and tokens per second of each seed and their mean (± std), the curves, the cache's write time and
    coverage."""
    students: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    result: dict[str, Any] = {"students": students, "curves": curves, "cache": None}
    with tempfile.TemporaryDirectory(prefix="distilkit-demo-lm-") as scratch:
        if cache is not None:
            info = cache.info
            result["cache"] = {"write_s": None, "positions": info["positions"],
                               "bytes_per_position": info["bytes_per_position"], "kept_mass": info["coverage"]}
        elif "topk" in variants:
            began = time.perf_counter()
            info = write_cache(r, teacher, data.train, Path(scratch) / "topk")
            cache = dk.cache.read_topk(Path(scratch) / "topk")
            result["cache"] = {"write_s": time.perf_counter() - began, "positions": info["positions"],
                               "bytes_per_position": info["bytes_per_position"], "kept_mass": info["coverage"]}
        for seed in range(seeds):
            for variant in variants:
                logs = (contextlib.nullcontext() if out is None
                        else dk.tensorboard.Writer(Path(out) / f"seed{seed}" / variant, every=r.log_every))
                with logs as writer:
                    got = train_student(r, variant, data.train, data.held_out, teacher=teacher, cache=cache,
                                        seed=seed, writer=writer, progress=progress)
                result["student_parameters"] = sum(p.numel() for p in got.model.parameters())
                entry = students.setdefault(variant, {"perplexity": [], "tokens_per_s": [], "generated_batches": []})
                entry["perplexity"].append(got.curve[-1][1])
                entry["tokens_per_s"].append(got.tokens_per_s)
                entry["generated_batches"].append(got.generated_batches)
                curve = curves.setdefault(variant, {"steps": [k for k, _ in got.curve], "perplexity": []})
                curve["perplexity"].append([p for _, p in got.curve])
        del cache
    for entry in students.values():
        entry["perplexity_mean"], entry["perplexity_std"] = _mean_std(entry["perplexity"])
        entry["tokens_per_s_mean"] = statistics.fmean(entry["tokens_per_s"])
    return result


def summarize(r: Recipe, data: Data, teacher: Trained, compared: dict[str, Any], *, seeds: int,
              quick: bool = False) -> dict[str, Any]:
    """The JSON-ready summary of a run (what ``summary.json`` holds, and what :func:`table` and
    :func:`plot_curves` read)."""
    variants = list(compared["students"])
    return {
        **data.stats,
        "teacher": {"perplexity": teacher.curve[-1][1], "tokens_per_s": teacher.tokens_per_s,
                    "parameters": sum(p.numel() for p in teacher.model.parameters())},
        "student_parameters": compared.get("student_parameters"),
        "students": compared["students"],
        "cache": compared["cache"],
        "curves": {"teacher": {"steps": [k for k, _ in teacher.curve], "perplexity": [p for _, p in teacher.curve]},
                   **compared["curves"]},
        "seeds": list(range(seeds)), "quick": quick, "recipe": dataclasses.asdict(r),
        "specs": {v: json.loads(dk.to_config(s).model_dump_json()) for v, s in specs(r).items() if v in variants},
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "plot": None, "plot_note": None,
    }


def _run(out: Path, seeds: int, r: Recipe, quick: bool, variants: tuple[str, ...], progress: bool) -> dict:
    start = time.perf_counter()
    if quick:
        r = r.quick()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(r)
    with dk.tensorboard.Writer(out / "teacher", every=r.log_every) as writer:
        teacher = train_teacher(r, data.train, data.held_out, writer=writer, progress=progress)
    compared = compare(r, data, teacher.model, seeds=seeds, variants=variants, out=out, progress=progress)
    summary = summarize(r, data, teacher, compared, seeds=seeds, quick=quick)
    summary["plot_note"] = plot_curves(summary, out / "curves.png")
    summary["plot"] = "curves.png" if summary["plot_note"] is None else None
    summary["wall_time_s"] = round(time.perf_counter() - start, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return summary


def table(summary: dict[str, Any]) -> str:
    """The results as a plain-text table: held-out perplexity (mean ± std over the seeds) and tokens per second."""
    r, students = summary["recipe"], summary["students"]
    seeds = len(summary["seeds"])
    lines = [f"{'model':<24}{'held-out perplexity':<24}{'vs labels only':<16}training tokens/s", "-" * 80,
             f"{'teacher':<24}{summary['teacher']['perplexity']:<24.2f}{'':<16}"
             f"{summary['teacher']['tokens_per_s']:,.0f}"]
    base = students.get("labels", {}).get("perplexity_mean")
    for variant, entry in students.items():
        ppl = f"{entry['perplexity_mean']:.2f} ± {entry['perplexity_std']:.2f}" if seeds > 1 else \
            f"{entry['perplexity_mean']:.2f}"
        gain = "" if base is None or variant == "labels" else f"{entry['perplexity_mean'] / base - 1:+.1%}"
        lines.append(f"{LABELS[variant]:<24}{ppl:<24}{gain:<16}{entry['tokens_per_s_mean']:,.0f}")
    lines.append("-" * 80)
    lines.append(f"teacher GPT-2 {r['teacher_layers']}×{r['teacher_width']} "
                 f"({summary['teacher']['parameters']:,} parameters), students {r['student_layers']}×"
                 f"{r['student_width']} ({summary['student_parameters']:,}); vocabulary {r['vocab_size']}, "
                 f"windows of {r['seq_len']}, {r['steps']} steps of {r['batch']}.")
    lines.append(f"{summary['tokens']['train']:,} training and {summary['tokens']['held_out']:,} held-out tokens; "
                 + (f"{seeds} seeds (mean ± std)." if seeds > 1 else "1 seed."))
    if summary.get("cache"):
        c = summary["cache"]
        written = "" if c["write_s"] is None else f"written in {c['write_s']:.1f} s (not in its tokens/s), "
        lines.append(f"top-{r['top_k']} cache ({r['topk_policy']}): {written}"
                     f"{c['bytes_per_position']:.0f} B/position, kept mass {c['kept_mass']['mean']:.3f} on average.")
    if summary["quick"]:
        lines.append(f"WARNING: --quick trains for {r['steps']} steps on tiny models: a smoke test of every path. "
                     "These numbers mean nothing;")
        lines.append("run 'distilkit demo lm' without --quick for the comparison.")
    return "\n".join(lines)


COLOURS = {"labels": "tab:orange", "kd": "tab:blue", "fused": "tab:cyan", "topk": "tab:green",
           "on_policy": "tab:purple"}


def plot_curves(summary: dict[str, Any], path: str | os.PathLike) -> str | None:
    """Held-out perplexity against the optimizer step (mean over seeds, band min–max) and training tokens per
    second, drawn into the PNG ``path`` (matplotlib's Agg canvas). Returns None, or why nothing was drawn."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        return f"curves.png needs matplotlib: pip install 'distilkit[demo]' ({error})"
    r, curves, students = summary["recipe"], summary["curves"], summary["students"]
    seeds = len(summary["seeds"])
    fig = Figure(figsize=(12, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    title = (f"distilkit demo lm: GPT-2 {r['teacher_layers']}×{r['teacher_width']} → {r['student_layers']}×"
             f"{r['student_width']} on Python's own documentation ({seeds} seed{'s' if seeds > 1 else ''}"
             + ("; band: min–max" if seeds > 1 else "") + ")")
    if summary["quick"]:
        title += f"\nWARNING --quick: {r['steps']} steps on tiny models, a smoke test whose numbers mean nothing"
    fig.suptitle(title)
    ax, bars = fig.subplots(1, 2, width_ratios=[2, 1])
    for variant in students:
        steps, runs = curves[variant]["steps"], curves[variant]["perplexity"]
        by_step = list(zip(*runs, strict=True))
        mean = [statistics.fmean(v) for v in by_step]
        ax.plot(steps, mean, color=COLOURS[variant], linewidth=2, label=f"{LABELS[variant]} ({mean[-1]:.1f})")
        if seeds > 1:
            ax.fill_between(steps, [min(v) for v in by_step], [max(v) for v in by_step], color=COLOURS[variant],
                            alpha=0.2, linewidth=0)
    ax.axhline(summary["teacher"]["perplexity"], color="0.45", linestyle="--",
               label=f"teacher ({summary['teacher']['perplexity']:.1f})")
    ax.set_yscale("log")
    finals = [e["perplexity_mean"] for e in students.values()]
    low, high = min(summary["teacher"]["perplexity"], *finals) * 0.9, max(finals) * 3
    ax.set_ylim(low, high)
    ticks = [m * 10**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
             for m in (1, 1.5, 2, 3, 5, 7)]
    ax.set_yticks([t for t in ticks if low <= t <= high], [f"{t:g}" for t in ticks if low <= t <= high])
    ax.minorticks_off()
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right")
    names = list(students)
    bars.barh([LABELS[v] for v in names], [students[v]["tokens_per_s_mean"] for v in names],
              color=[COLOURS[v] for v in names])
    bars.invert_yaxis()
    bars.set_xlabel("training tokens per second")
    bars.set_title(f"throughput ({summary['machine']}, {summary['torch_threads']} threads)", fontsize=10)
    fig.savefig(path)
    return None
