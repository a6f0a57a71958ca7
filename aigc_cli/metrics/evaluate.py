"""`aigc eval`: generate images (or read a folder of them), embed them with a feature extractor
(Inception by default, or a domain classifier), and compare them with real data's reference
statistics (FID, KID, precision/recall; IS needs only the generated side); for VAEs also score
reconstructions of held-out real images and report bits per dimension.

Generation and embedding share one batch loop: a batch is generated, embedded, and only its
features (and, for IS, class probabilities) are kept, so --n 50000 never holds 50k images."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shlex
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import checkpoint as ckpt_io
from .. import progress
from ..config import EVAL_METRICS
from ..data import has_test_split, load_images
from ..errors import UsageError, one_line
from ..image_npz import image_npz_writer, is_npz, load_images as load_npz_images
from ..losses import decoded_image, vae_terms
from ..sampling import copied_norms, from_uint8, generate, generator_from, latent_batches, latents, png_name, save_png
from ..training.ema import norm_layers
from ..training.precision import Precision, resolve_device, slow_precision_note
from .extractors import ClassifierFeatures, extractor_precision, make_extractor  # noqa: F401 (re-export)
from .fid import frechet_distance, kid
from ..data.lazy import pick
from ..data.native import load_folder_native, real_indices
from .reference import (EvaluationStopped, FeatureStats, Reference, data_identity, default_stats_dir, load_npz,
                        load_real, reference_for)
from .scores import inception_score, precision_recall

GAN_METRICS = EVAL_METRICS  # what train.eval_metric may name: all of aigc's GAN metrics
VAE_METRICS = ("recon_mse", "neg_elbo", "bpd")
METRICS = GAN_METRICS + VAE_METRICS
NEEDS_REAL = ("fid", "kid", "precision", "recall")
NEEDS_REAL_FEATURES = ("kid", "precision", "recall")
IS_SPLITS, PR_K, KID_SUBSETS = 10, 3, 100


def parse_metrics(text: str | None) -> list[str] | None:
    """`--metrics fid,kid,...` -> list (None: the default set). Unknown names are a UsageError."""
    if text is None or not text.strip():
        return None
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    if not names:
        raise UsageError(f"--metrics {text!r} names no metric; choose from {', '.join(METRICS)} (or leave it out for all)")
    if len(names) < len(text.split(",")):  # `fid,,kid`: a metric left out by a typo more often than a wish
        raise UsageError(f"--metrics {text!r}: an empty item in the comma list; name a metric between each two commas")
    bad = [s for s in names if s not in METRICS]
    if bad:
        raise UsageError(f"--metrics: unknown metric {bad[0]!r}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def choose_metrics(asked: list[str] | None, *, vae_possible: bool, vae_reason: str,
                   real_features: bool, ref_note: str = "") -> list[str]:
    """The metrics to compute: the ones asked (checked), or all that apply."""
    if asked is None:
        out = [m for m in GAN_METRICS if real_features or m not in NEEDS_REAL_FEATURES]
        return out + (list(VAE_METRICS) if vae_possible else [])
    vae = [m for m in asked if m in VAE_METRICS]
    if vae and not vae_possible:
        raise UsageError(f"--metrics {vae[0]}: {vae_reason}")
    need = [m for m in asked if m in NEEDS_REAL_FEATURES]
    if need and not real_features:
        raise UsageError(f"--metrics {need[0]}: {ref_note or 'the reference has no features'}; "
                         "with only mu and sigma, FID (and IS) can be computed")
    return asked


def score(metrics: list[str], *, fake: FeatureStats, probs: np.ndarray | None, ref: Reference | None,
          seed: int, warn=None) -> tuple[dict, dict]:
    """The requested metrics from the generated side's features/probabilities and the reference;
    returns (metrics, protocol facts). A metric too few images allow is None, and `warn` says why."""
    warn = warn or (lambda message: None)
    out: dict = {}
    proto: dict = {}
    if "fid" in metrics:
        mu, sigma = fake.mu_sigma()
        if mu.shape != ref.mu.shape:
            raise UsageError(f"the reference statistics have {ref.mu.shape[0]} features, the extractor gives "
                             f"{mu.shape[0]}: they were computed with another extractor")
        out["fid"] = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    f_fake = fake.features()
    if "kid" in metrics:
        f_real = ref.features
        if min(len(f_fake), len(f_real)) < 2:
            raise UsageError(f"KID needs at least 2 images on each side, got {len(f_fake)} generated and "
                             f"{len(f_real)} real")
        subset = min(1000, max(2, min(len(f_fake), len(f_real)) // 2))
        out["kid"], out["kid_std"] = kid(f_fake, f_real, subsets=KID_SUBSETS, subset_size=subset, seed=seed)
        proto.update(kid_subsets=KID_SUBSETS, kid_subset_size=subset)
    if "is" in metrics:
        if len(probs) >= IS_SPLITS:
            out["is"], out["is_std"] = inception_score(probs, splits=IS_SPLITS, seed=seed)
        else:
            out["is"] = out["is_std"] = None
            warn(f"IS needs at least {IS_SPLITS} generated images (one per split), got {len(probs)}: n/a")
        proto["is_splits"] = IS_SPLITS
    if "precision" in metrics or "recall" in metrics:
        pr = (None, None)
        if min(len(f_fake), len(ref.features)) > PR_K:
            pr = precision_recall(ref.features, f_fake, k=PR_K)
        else:
            warn(f"precision and recall need more than {PR_K} images on each side (k={PR_K} neighbours), got "
                 f"{len(f_fake)} generated and {len(ref.features)} real: n/a")
        for name, value in zip(("precision", "recall"), pr):
            if name in metrics:
                out[name] = value
        proto["pr_k"] = PR_K
    return out, proto


def seeded_inputs(model_cfg, n: int, seed: int, class_counts: list[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents for n images, and for a conditional model classes drawn at random: as often as the training
    data had them (`class_counts`; StyleGAN2-ADA draws the data's labels too), else uniformly. The real
    side is a random subset of the data, with its class mix: uniform classes on data with unequal ones
    scored a perfect generator as far from the data."""
    labels = None
    if model_cfg.conditional:
        gen = torch.Generator().manual_seed(seed + 1)
        if class_counts:
            weights = torch.tensor(class_counts, dtype=torch.float64)
            labels = torch.multinomial(weights, n, replacement=True, generator=gen)
        else:
            labels = torch.randint(model_cfg.num_classes, (n,), generator=gen)
    return latents(n, model_cfg.latent_dim, seed), labels


class FakeEmbedder:
    """Accumulates the generated side batch by batch: feature statistics (plus the features when
    KID/PR need them) and class probabilities when IS needs them."""

    def __init__(self, extractor, metrics: list[str], save_dir: str | os.PathLike | None = None,
                 sink: Callable[[torch.Tensor], None] | None = None, n: int = 0):
        """save_dir: each of the n images also written as a PNG there; sink: each batch also handed to it,
        on the CPU."""
        self.extractor, self.sink = extractor, sink
        self.stats = FeatureStats(keep=any(m in metrics for m in NEEDS_REAL_FEATURES))
        self.want_probs = "is" in metrics
        self.want_feats = any(m in metrics for m in NEEDS_REAL)
        self.probs: list[torch.Tensor] = []
        self.save_dir = Path(save_dir) if save_dir else None
        self.count, self.n = 0, n

    @torch.inference_mode()
    def add(self, images: torch.Tensor, batch_size: int) -> None:
        if self.save_dir is not None:
            for i, img in enumerate(images.cpu()):
                save_png(img, self.save_dir / png_name(self.count + i, self.n), sweep=False)  # swept once: filling()
        if self.sink is not None:
            self.sink(images.cpu())
        self.count += len(images)
        if self.want_feats or self.want_probs:
            f, p = self.extractor.embed(images, batch_size, on_device=True)
            if self.want_feats:
                self.stats.add(f)
            if self.want_probs:
                self.probs.append(p)
        progress.advance(len(images))

    def add_generated(self, G, z: torch.Tensor, labels: torch.Tensor | None, amp, batch_size: int,
                      should_stop: Callable[[], bool] | None = None) -> None:
        """Generate and embed batch by batch: no more than one batch of images exists at a time.
        `should_stop()` true before a batch raises EvaluationStopped."""
        for i, chunk in enumerate(z.split(batch_size)):
            if should_stop is not None and should_stop():
                raise EvaluationStopped
            y = None if labels is None else labels[i * batch_size:(i + 1) * batch_size]
            # Left on the device: the extractor takes them from there, with no round trip through the host.
            self.add(generate(G, chunk, amp, batch_size, labels=y, to_cpu=False), batch_size)

    def all_probs(self) -> np.ndarray | None:
        return torch.cat(self.probs).cpu().double().numpy() if self.probs else None


def check_reference_matches(ref: Reference, extractor, warn) -> None:
    """A reference from a file must come from the same extractor (its features mean nothing otherwise)."""
    p = ref.protocol
    ours = extractor.protocol
    if "weights_sha256" in p and p["weights_sha256"] != ours.get("weights_sha256"):
        raise UsageError(f"the reference ({ref.source}) was computed with {p.get('extractor', 'another extractor')} "
                         f"(weights sha256 {str(p['weights_sha256'])[:12]}...), not with {ours.get('extractor')} "
                         f"({str(ours.get('weights_sha256'))[:12]}...): recompute it with `aigc eval stats`")
    dim = ours.get("feature_dim")
    if dim is not None and ref.mu.shape[0] != dim:
        raise UsageError(f"the reference ({ref.source}) has {ref.mu.shape[0]} features, {ours.get('extractor')} "
                         f"gives {dim}: it was computed with another extractor")
    if not p:
        same = ("Inception weights" if str(ours.get("extractor", "")).startswith("inception")
                else f"features ({ours.get('extractor')})")
        warn(f"the reference ({ref.source}) does not say how it was computed (a pytorch-fid file?): "
             f"FID is only comparable if it used the same {same} and resizing")
    theirs, now = p.get("extractor_precision"), ours.get("precision")
    if theirs and now and theirs != now:
        warn(f"the reference ({ref.source}) was computed with the extractor in {theirs}, these features in {now}: "
             f"precision moves features (bf16 by about 1%); pass --precision {theirs} to compare like with like")


def check_reference_extractor(ref: Reference | None, features: str | None) -> None:
    """Before the extractor opens: a reference of a classifier's features scored with Inception (no
    --features) asked for Inception weights, which were not the problem."""
    made_by = str(ref.protocol.get("extractor", "")) if ref is not None else ""
    if made_by.startswith("classifier:") and not features:
        raise UsageError(f"the reference ({ref.source}) holds features of {made_by}: pass --features "
                         f"{made_by.removeprefix('classifier:')} to score against it")


def _say_if_sides_differ(ref: Reference, shape: list[int], fake_is: str, data: str | None, warn,
                         root: str | None = None, inception_weights: str | None = None) -> None:
    """Real and generated images resized to the extractor's input from different sizes differ in
    blur alone, which FID counts (28x28 Fashion-MNIST against the same images at 32x32: 9 against 53).
    shape: the generated images' (C, H, W), or (H, W) where their channels are not known (--fake files,
    read as RGB whatever they were). The remedy makes the reference again from its own data and split."""
    theirs = ref.protocol.get("real_shape")
    if not theirs or list(theirs)[-len(shape):] == list(shape):
        return
    what = "channels" if list(theirs[1:]) == list(shape[-2:]) else "sizes"
    channels = shape[0] if len(shape) == 3 else theirs[0]
    data = ref.protocol.get("real_source") or data  # a --ref of other data: that data, not the model's
    hint = ""
    if what == "sizes" and shape[-2] == shape[-1]:
        # The whole command, so that the file it writes passes check_reference_matches; a new name, so that
        # following it overwrites no reference of the user's.
        extractor = str(ref.protocol.get("extractor", ""))
        features = f" --features {shlex.quote(extractor.removeprefix('classifier:'))}" if extractor.startswith("classifier:") else ""
        features += f" --inception-weights {shlex.quote(inception_weights)}" if inception_weights and not features else ""
        features += f" --data-root {shlex.quote(root)}" if root else ""
        features += " --split test" if ref.protocol.get("real_split") == "test" else ""
        out = f"ref-{channels}x{shape[-1]}.npz"
        hint = (f"; to score as `aigc eval CHECKPOINT` does, make the reference at their size with `aigc eval stats "
                f"--data {shlex.quote(data) if data else 'SOURCE'} --resolution {shape[-1]} --channels {channels}{features} "
                f"--out {out}` and pass --ref {out}")
    warn(f"the real images are {'x'.join(map(str, theirs))}, {fake_is} {'x'.join(map(str, shape))}: the two "
         f"sides reach the extractor from different {what}{hint}")


def _data_folder(source: str, root: str | None) -> str:
    """Where a data source's files are (a built-in name as found without downloading, e.g. fashion-mnist in
    /usr/share/datasets), so that one data set named two ways is seen as one; the name where not found."""
    from ..data import find_builtin

    try:
        if source in ("mnist", "fashion-mnist", "cifar10"):
            return os.path.realpath(find_builtin(source, root, download=False)[1])
    except UsageError:
        return source
    return data_identity(source)


def _say_if_unused(ref: str | None, chosen: list[str], warn) -> None:
    if ref and not any(x in chosen for x in NEEDS_REAL):
        warn(f"--ref {ref} was not used: {', '.join(chosen)} need{'s' if len(chosen) == 1 else ''} "
             "no real statistics")


def _say_if_few_for_fid(chosen: list[str], n_fake: int, n_real: int | None, extractor, warn) -> None:
    """FID's covariances are rank-deficient below the feature count (2048 for Inception), and the score
    is then biased far upward: such a number compares only with FIDs from the same image counts."""
    dims = extractor.protocol.get("feature_dim") if extractor is not None else None
    counts = [n for n in (n_fake, n_real) if n]
    if "fid" not in chosen or not dims or not counts or min(counts) >= dims:
        return
    sides = f"{n_fake} generated" + (f" and {n_real} real" if n_real else "")
    warn(f"FID from {sides} images, fewer than the {dims} feature dimensions, is biased upward: "
         "compare it only with FIDs from the same numbers of images (10,000 or 50,000 is usual)")


def open_extractor(features, inception_weights, device, precision, download_weights: bool = False, warn=None,
                   precision_said: bool = False):
    """The extractor for --features (else Inception); `warn` hears of a precision that is slow there
    (unless `precision_said`: `aigc eval CHECKPOINT` has warned for the generator at the same precision)
    and of a damaged newest checkpoint in a --features run folder, passed over."""
    if warn is not None and not precision_said and (slow := slow_precision_note(extractor_precision(precision), device)):
        warn(slow)
    if download_weights and not features:
        from .weights import ensure_weights  # noqa: PLC0415

        # to where the file is looked for: --inception-weights, $AIGC_INCEPTION_WEIGHTS, else the hub cache
        inception_weights = str(ensure_weights(inception_weights, download=True))
    return make_extractor(features, inception_weights, device, precision, warn=warn)


def evaluate(ckpt: ckpt_io.Checkpoint, *, data: str, root: str | None, download: bool, features: str | None,
             n: int, batch_size: int, seed: int, device: str, precision: str, warn, ema: bool = True,
             metrics: list[str] | None = None, inception_weights: str | None = None,
             stats_dir: str | os.PathLike | None = "default", ref: str | None = None,
             save_fakes: str | None = None, download_weights: bool = False, extractor=None) -> dict:
    """Score a checkpoint. metrics None: all that apply. stats_dir "default": $AIGC_CACHE_DIR/stats;
    None: no cache. ref: a statistics npz used instead of real data."""
    G, amp = generator_from(ckpt, device, precision, ema=ema, warn=warn)
    label, m = ckpt.generator_weights(ema)[1], ckpt.config.model
    has_encoder = bool(ckpt.net_state("E"))
    vae_possible = m.kind == "vae" and has_encoder
    vae_reason = ("an exported VAE decoder has no encoder: pass the training checkpoint or run folder"
                  if m.kind == "vae" else f"applies to VAEs, not to a {m.kind}")
    reference = load_npz(ref) if ref else None
    chosen = choose_metrics(metrics, vae_possible=vae_possible, vae_reason=vae_reason,
                            real_features=reference is None or reference.features is not None,
                            ref_note=f"--ref {ref} holds only mu and sigma (no features)")
    _say_if_unused(ref, chosen, warn)
    if metrics is None and m.kind == "vae" and not has_encoder:
        warn(f"no {', '.join(VAE_METRICS)}: {vae_reason}")
    if extractor is None and any(x in chosen for x in GAN_METRICS):
        check_reference_extractor(reference, features)
        extractor = open_extractor(features, inception_weights, amp.device, precision, download_weights, warn,
                                   precision_said=True)
    # Said once the real data has loaded: a --data that does not exist is then one error line, alone.
    other_data = (isinstance(extractor, ClassifierFeatures) and reference is None
                  and _data_folder(extractor.data_source, extractor.data_root) != _data_folder(data, root))
    protocol: dict = {}
    if extractor is not None:
        protocol.update(extractor.protocol)
        protocol["extractor_precision"] = extractor.protocol.get("precision")
    generating = any(x in chosen for x in GAN_METRICS) or bool(save_fakes)  # the VAE scores generate nothing
    shape = [m.channels, m.resolution, m.resolution]
    # Protocol keys are only ever added (README): n_fake is 0 when only the VAE scores were asked for.
    protocol.update({"n_fake": n if generating else 0, "seed": seed, "precision": amp.name,
                     "generator_weights": label, "generated_shape": shape})
    if any(x in chosen for x in NEEDS_REAL):
        if reference is None:
            # Real images take the generator's channels and resolution first, so both sides then go
            # through the same conversion to the extractor's input: a perfect generator scores near 0.
            reference = real_reference(data, extractor=extractor, n=n, seed=seed, batch_size=batch_size,
                                       stats_dir=_stats_dir(stats_dir), warn=warn, root=root, download=download,
                                       strict=ckpt.config.data.strict, channels=m.channels, resolution=m.resolution,
                                       lazy_above_mb=ckpt.config.data.device_max_mb)
        else:
            check_reference_matches(reference, extractor, warn)
            _say_if_sides_differ(reference, shape, "the generator draws", data, warn, root, inception_weights)
        protocol.update(_reference_protocol(reference))
    if other_data:
        warn(f"the feature classifier was trained on '{extractor.data_source}', the real data is '{data}': "
             "distances in its feature space may mean little")
    _say_if_few_for_fid(chosen, n, reference.n if reference is not None else None, extractor, warn)
    z, labels = seeded_inputs(m, n, seed, ckpt.class_counts)
    if label == "G_ema" and norm_layers(G):  # whether generator_from measured them (its note says so too)
        protocol["ema_norms"] = "measured on loading" if copied_norms(ckpt, label) else "as saved"
    if m.conditional:
        protocol["fake_classes"] = "as in the training data" if ckpt.class_counts else "uniform"
    with contextlib.ExitStack() as saving:  # an .npz is complete once generation ends, whatever scoring does
        sink = None
        if save_fakes and is_npz(save_fakes):
            sink = saving.enter_context(image_npz_writer(save_fakes, n, None if labels is None else
                                                         lambda start, stop: labels[start:stop]))
        fake = FakeEmbedder(extractor, chosen, None if sink else save_fakes, sink, n)
        if generating:
            progress.phase("generating and embedding" if fake.want_feats or fake.want_probs else "generating", n)
            fake.add_generated(G, z, labels, amp, batch_size)
    values, extra = score(chosen, fake=fake.stats, probs=fake.all_probs(), ref=reference, seed=seed, warn=warn)
    protocol.update(extra)
    if save_fakes:
        protocol["saved_fakes"] = str(save_fakes)
    result = {"checkpoint": str(ckpt.step_file), "model": m.kind, "step": ckpt.step,
              "metrics": values, "protocol": protocol}
    if any(x in chosen for x in VAE_METRICS):
        scores = vae_scores(ckpt, data=data, root=root, n=n, batch_size=batch_size, seed=seed, amp=amp, warn=warn)
        for key in ("n_heldout", "heldout_data", "heldout_split", "bpd_formula"):  # protocol facts, not metrics
            if key in scores:
                protocol[key] = scores.pop(key)
        result["metrics"].update({k: v for k, v in scores.items() if k in chosen})
    return result


def evaluate_folder(fake_dir: str, *, data: str | None, root: str | None, download: bool, features: str | None,
                    n: int, batch_size: int, seed: int, device: str, precision: str, warn,
                    metrics: list[str] | None = None, inception_weights: str | None = None,
                    stats_dir: str | os.PathLike | None = "default", ref: str | None = None,
                    download_weights: bool = False, strict: bool = False, extractor=None) -> dict:
    """Score a folder of generated images (from any tool) against real data or a reference file.
    Both folders are read at their images' own size (the extractor resizes, as pytorch-fid does)."""
    dev = resolve_device(device)
    reference = load_npz(ref) if ref else None
    chosen = choose_metrics(metrics, vae_possible=False,
                            vae_reason="needs a VAE checkpoint; --fake scores images only",
                            real_features=reference is None or reference.features is not None,
                            ref_note=f"--ref {ref} holds only mu and sigma (no features)")
    _say_if_unused(ref, chosen, warn)
    needs_real = any(x in chosen for x in NEEDS_REAL)
    if needs_real and reference is None and not data:
        raise UsageError("--fake DIR needs --data SOURCE (or --ref FILE) for the real side")
    if extractor is None:  # before reading the folder: missing weights are said at once
        check_reference_extractor(reference, features)
        extractor = open_extractor(features, inception_weights, dev, precision, download_weights, warn)
    progress.phase(f"reading {fake_dir}")
    if os.path.isfile(os.path.expanduser(fake_dir)) and not is_npz(fake_dir):
        raise UsageError(f"--fake {one_line(str(fake_dir))}: is a file; --fake takes a folder of images or a .npz of them")
    if is_npz(fake_dir) and not os.path.isdir(os.path.expanduser(fake_dir)):
        fakes = load_npz_images(os.path.expanduser(fake_dir), n=n, seed=seed)
    else:
        fakes = load_folder_native(os.path.expanduser(fake_dir), warn=warn, strict=strict, what="--fake folder", n=n, seed=seed)
    if len(fakes) < 2:  # before the real side's statistics are computed, not after
        raise UsageError(f"--fake {one_line(str(fake_dir))}: holds 1 usable image; the scores need at least 2")
    protocol: dict = {**extractor.protocol, "extractor_precision": extractor.protocol.get("precision"),
                      "fake_folder": str(fake_dir), "n_fake": len(fakes), "seed": seed,
                      "precision": extractor_precision(precision),
                      "generated_shape": list(fakes.shape[1:])}
    if needs_real:
        if reference is None:
            reference = real_reference(data, extractor=extractor, n=n, seed=seed, batch_size=batch_size,
                                       stats_dir=_stats_dir(stats_dir), warn=warn, root=root, download=download,
                                       strict=strict, native_resolution=fakes.shape[3])
        else:
            check_reference_matches(reference, extractor, warn)
        # the --fake images are read as RGB whatever they were: only their size is compared
        _say_if_sides_differ(reference, list(fakes.shape[2:]), "the --fake images are", data, warn, root,
                             inception_weights)
        protocol.update(_reference_protocol(reference))
    _say_if_few_for_fid(chosen, len(fakes), reference.n if reference is not None else None, extractor, warn)
    fake = FakeEmbedder(extractor, chosen)
    progress.phase("embedding the --fake images", len(fakes))
    for chunk in fakes.split(batch_size):
        fake.add(chunk, batch_size)
    values, extra = score(chosen, fake=fake.stats, probs=fake.all_probs(), ref=reference, seed=seed, warn=warn)
    protocol.update(extra)
    # the keys of a checkpoint's scores too, empty: a script reads the same keys of either
    return {"checkpoint": None, "model": None, "step": None, "fake_folder": str(fake_dir), "metrics": values,
            "protocol": protocol}


def write_stats(data: str, out: str, *, root: str | None, download: bool, features: str | None, n: int,
                batch_size: int, seed: int, device: str, precision: str, warn, split: str = "train",
                resolution: int | None = None, channels: int | None = None, inception_weights: str | None = None,
                download_weights: bool = False, strict: bool = False, extractor=None) -> dict:
    """`aigc eval stats`: reference statistics of real data written to `out` (an npz for --ref)."""
    if not str(out).endswith(".npz"):
        raise UsageError(f"--out {out}: the statistics file name must end in .npz")
    from ..files import check_writable  # noqa: PLC0415
    from ..image_npz import check_replaceable  # noqa: PLC0415

    check_writable(out, "--out")  # before minutes of embedding, not after
    check_replaceable(out, "--out", images=False)
    dev = resolve_device(device)
    if extractor is None:
        extractor = open_extractor(features, inception_weights, dev, precision, download_weights, warn)
    from ..config import DataConfig  # noqa: PLC0415

    # as a default-config training reads the folder: decoded whole (and cached) up to data.device_max_mb,
    # above that streamed, so that only the n picked images are decoded, not a folder larger than memory
    reference = real_reference(data, extractor=extractor, n=n, seed=seed, batch_size=batch_size, stats_dir=None,
                               warn=warn, split=split, root=root, download=download, strict=strict,
                               channels=channels, resolution=resolution, lazy_above_mb=DataConfig.device_max_mb)
    from .reference import save_npz  # noqa: PLC0415

    path = save_npz(out, reference)
    return {"out": str(path), "feature_dim": int(reference.mu.shape[0]), "protocol": reference.protocol}


def real_reference(data: str, *, extractor, n: int, seed: int, batch_size: int, stats_dir, warn,
                   split: str = "train", should_stop: Callable[[], bool] | None = None, **load) -> Reference:
    """Reference statistics of a seeded subset of at most n real images of `data` (cached in stats_dir
    when given); `load` goes to load_real (root, download, strict, channels/resolution, ...)."""
    progress.phase(f"loading the real data ({data})")
    real, name = load_real(data, split=split, seed=seed, warn=warn, n=n, **load)
    picked = real_indices(len(real), n, seed)  # a folder's is picked already: then all of it
    real = pick(real, None, picked, warn, bool(load.get("strict")))[0]
    return reference_for(real, extractor=extractor, data=data_identity(data), data_name=name, split=split,
                         seed=seed, batch_size=batch_size, stats_dir=stats_dir, warn=warn, should_stop=should_stop)


def _stats_dir(stats_dir):
    if stats_dir == "default":
        return default_stats_dir()
    return Path(os.path.expanduser(str(stats_dir))) if stats_dir else None


def _reference_protocol(ref: Reference) -> dict:
    p = ref.protocol
    keep = ("real_data", "real_split", "real_shape", "n_real", "cache_key", "cache_file")
    out = {k: p[k] for k in keep if k in p}
    out["reference"] = ref.source
    if ref.n is not None:
        out["n_real"] = int(ref.n)
    return out


# --------------------------------------------------------------------------------------------------
# VAE scores


def bits_per_dim(neg_elbo: float, dims: int) -> float:
    """Bits per dimension of 8-bit data from a negative ELBO in nats per image on the [-1, 1] scale.

    x = u / 127.5 - 1 maps 8-bit values u to [-1, 1], so a density on u is the density on x divided by
    127.5 per dimension: -log p(u) = -log p(x) + D ln 127.5. Then bpd = (neg_elbo + D ln 127.5) / (D ln 2)."""
    return (neg_elbo + dims * math.log(127.5)) / (dims * math.log(2.0))


BPD_FORMULA = "bpd = (neg_elbo + D*ln(127.5)) / (D*ln(2)), D = C*H*W (density on the 8-bit scale, no dequantisation noise)"


@torch.inference_mode()
def vae_scores(ckpt, *, data, root, n, batch_size, seed, amp, warn) -> dict:
    """Reconstruction MSE (pixel scale [-1, 1], decoding the posterior mean), a one-sample estimate of
    the negative ELBO in nats per image, and bits per dimension (Gaussian decoder only), on the data
    source's held-out images (an image folder has none: its training images; `heldout_split` says which)."""
    none = {"recon_mse": None, "neg_elbo": None, "bpd": None}
    if not ckpt.net_state("E"):
        return none  # an exported decoder has no encoder
    m = ckpt.config.model
    E, G = (ckpt_io.build_net(ckpt, name).to(amp.device).eval() for name in ("E", "G"))
    try:
        # A folder too large to hold streams, as in training: only the n picked are decoded.
        test = load_images(data, channels=m.channels, resolution=m.resolution, root=root, download=False,
                           split="test", seed=seed, warn=warn, strict=ckpt.config.data.strict,
                           lazy_above_mb=ckpt.config.data.device_max_mb)
    except UsageError as e:  # e.g. an IDX folder without its t10k files: FID/KID still stand
        warn(f"no held-out images for the VAE scores ({e})")
        return none
    if m.conditional and test.labels is None:
        warn("the held-out images have no labels, which this conditional VAE needs: no VAE scores")
        return none
    if m.conditional and test.labels.numel() and int(test.labels.max()) >= m.num_classes:
        warn(f"the held-out images' labels run to {int(test.labels.max())}, and this conditional VAE has "
             f"{m.num_classes} classes (0 to {m.num_classes - 1}): other data than it learnt; no VAE scores")
        return none
    if m.conditional and ckpt.class_names and test.class_names and list(test.class_names) != ckpt.class_names:
        warn(f"the held-out images' classes ({', '.join(test.class_names)}) are not this conditional VAE's "
             f"({', '.join(ckpt.class_names)}): no VAE scores")
        return none
    idx = real_indices(len(test.images), n, seed)
    images, labels = pick(test.images, test.labels, idx, warn, ckpt.config.data.strict)
    labels = labels if m.conditional else None
    total = {"mse": 0.0, "neg_elbo": 0.0}
    start = 0
    # The posterior noise is the same per image whatever --batch-size cuts the images into.
    for noise in latent_batches(len(images), m.latent_dim, seed, batch_size):
        chunk = images[start:start + len(noise)]
        x = from_uint8(chunk.to(amp.device))
        y = labels[start:start + len(noise)].to(amp.device) if labels is not None else None
        start += len(noise)
        with amp.autocast():
            mu, logvar = E(x, y)
            eps = noise.to(amp.device)
            sampled = vae_terms(x, G.logits(mu + eps * (0.5 * logvar).exp(), y), mu, logvar,
                                ckpt.config.loss.recon_sigma, m.likelihood)
            mse = (x - decoded_image(G.logits(mu, y), m.likelihood)).pow(2).mean()
        total["mse"] += float(mse) * len(chunk)
        total["neg_elbo"] += float(sampled["neg_elbo"]) * len(chunk)
    neg_elbo = total["neg_elbo"] / len(images)
    dims = m.channels * m.resolution * m.resolution
    if m.likelihood == "gaussian":
        bpd, formula = bits_per_dim(neg_elbo, dims), BPD_FORMULA
    else:
        bpd, formula = None, ("none: a Bernoulli decoder's likelihood is not a density on 8-bit pixels "
                              "(it treats intensities in [0, 1] as probabilities)")
    return {"recon_mse": total["mse"] / len(images), "neg_elbo": neg_elbo, "bpd": bpd,
            "n_heldout": len(images), "heldout_data": test.name, "bpd_formula": formula,
            "heldout_split": "test" if has_test_split(data) else "train"}  # an image folder has no test split


# --------------------------------------------------------------------------------------------------
# Evaluation during training


class TrainingEvaluator:
    """In-process evaluation for the training loop: one metric (cfg.train.eval_metric) on
    cfg.train.eval_n generated images against the training data (train split, conformed to the
    model's channels and resolution), with reference statistics from the cache.

    The extractor is cfg.train.eval_features (a classifier checkpoint) or Inception ("") with weights
    from $AIGC_INCEPTION_WEIGHTS or the cache; missing weights raise UsageError here, at construction.
    `images` may pass the uint8 training images already in memory (saves loading them again).
    Computing the reference raises EvaluationStopped once `should_stop()` is true (a signal before the
    first step: on a CPU, 5000 Inception embeddings take minutes, longer than a batch system's grace)."""

    def __init__(self, cfg, device: torch.device, amp: Precision, warn: Callable[[str], None],
                 images: torch.Tensor | None = None, stats_dir: str | os.PathLike | None = "default",
                 should_stop: Callable[[], bool] | None = None, class_counts: list[int] | None = None):
        t, m = cfg.train, cfg.model
        self.metric, self.n, self.seed = t.eval_metric, t.eval_n, t.seed  # the metric checked by config.validate
        self.metrics = [self.metric]
        self.amp, self.device = amp, torch.device(device)
        self.batch_size = min(256, max(1, t.batch_size))
        try:
            self.extractor = make_extractor(t.eval_features or None, None, self.device,
                                            extractor_precision(t.precision), option="train.eval_features", warn=warn)
        except UsageError as e:  # its advice names `aigc eval`'s flags: say which setting led here
            advice = str(e).replace(" or --inception-weights PATH", "")  # not an option of `aigc train`
            raise UsageError(f"evaluation during training (train.eval_every={t.eval_every}): {advice}") from None
        self.reference = None
        if self.metric in NEEDS_REAL:
            common = dict(extractor=self.extractor, n=self.n, seed=t.seed, batch_size=self.batch_size,
                          stats_dir=_stats_dir(stats_dir), warn=warn, should_stop=should_stop)
            if images is None:
                self.reference = real_reference(cfg.data.source, **common, root=cfg.data.root or None,
                                                download=False, strict=cfg.data.strict, channels=m.channels,
                                                resolution=m.resolution, limit=cfg.data.limit,
                                                lazy_above_mb=cfg.data.device_max_mb)
            else:  # the training images, in memory or a lazy folder: only the n picked are decoded
                from ..data.transforms import conform  # noqa: PLC0415

                idx = real_indices(len(images), self.n, t.seed)
                picked = pick(images, None, idx, warn, cfg.data.strict)[0]  # a bad file is said, as in eval
                self.reference = reference_for(conform(picked.cpu(), m.channels, m.resolution),
                                               extractor=self.extractor, data=data_identity(cfg.data.source),
                                               data_name=cfg.data.source, split="train", seed=t.seed,
                                               batch_size=self.batch_size, stats_dir=common["stats_dir"], warn=warn,
                                               should_stop=should_stop)
        _say_if_few_for_fid(self.metrics, self.n, self.reference.n if self.reference is not None else None,
                            self.extractor, warn)
        self.z, self.labels = seeded_inputs(m, self.n, t.seed, class_counts)
        # What makes two scores comparable: the extractor's weights and input (not its path or precision), the
        # real images' contents, how many images are scored, and the seed that draws them.
        same = {k: v for k, v in self.extractor.protocol.items() if k not in ("extractor", "weights", "precision")}
        real = self.reference.protocol.get("real_content_sha256") if self.reference is not None else None
        self.setup = hashlib.sha256(json.dumps({"extractor": same, "real": real, "n": self.n, "seed": self.seed},
                                               sort_keys=True, default=str).encode()).hexdigest()[:16]

    def __call__(self, G: torch.nn.Module, step: int, amp: Precision | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """Scores of G now, at `step` (unread here; the tests' stand-ins score by it); `amp` is the run's
        current precision (a rollback may have left fp16). Raises EvaluationStopped as soon as
        `should_stop()` is true (a signal: the save must come first)."""
        was_training = G.training
        G.eval()
        try:
            fake = FakeEmbedder(self.extractor, self.metrics)
            fake.add_generated(G, self.z, self.labels, amp or self.amp, self.batch_size, should_stop)
            values, _ = score(self.metrics, fake=fake.stats, probs=fake.all_probs(), ref=self.reference,
                              seed=self.seed)
        finally:
            G.train(was_training)
        return {self.metric: values[self.metric]}
