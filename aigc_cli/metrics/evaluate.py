"""`aigc eval`: generate images, embed them and real ones with a feature extractor, compare the two
distributions (Fréchet distance, KID); for VAEs also score reconstructions of held-out real images."""

from __future__ import annotations

import torch

from .. import checkpoint as ckpt_io
from ..data import load_images
from ..data.transforms import conform
from ..errors import UsageError
from ..losses import decoded_image, vae_terms
from ..models import build_nets
from ..sampling import from_uint8, generate, generator_from, latents
from ..training.precision import Precision
from .fid import fid_from_features, kid
from .scores import inception_score, precision_recall


class ClassifierFeatures:
    """The penultimate layer of a classifier trained by `aigc train` on the domain's labelled data."""

    def __init__(self, path: str, device: torch.device, amp: Precision):
        ck = ckpt_io.load(path)
        if ck.config.model.kind != "classifier":
            raise UsageError(f"--features {path}: expected a classifier checkpoint, got a {ck.config.model.kind}")
        self.C = build_nets(ck.config.model)["C"]
        ck.load_net("C", self.C)
        self.C.to(device).eval()
        self.cfg, self.device, self.amp = ck.config.model, device, amp
        self.data_source = ck.config.data.source
        self.name = f"classifier:{ck.path}"

    @torch.inference_mode()
    def embed(self, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features and class probabilities (for the Inception Score), float64 on the CPU."""
        images = conform(images, self.cfg.channels, self.cfg.resolution)
        feats, probs = [], []
        for chunk in images.split(batch_size):
            with self.amp.autocast():
                f = self.C.features(from_uint8(chunk.to(self.device)))
                logits = self.C.head(f)
            feats.append(f.float().cpu())
            probs.append(torch.softmax(logits.float(), 1).cpu())
        return torch.cat(feats).double(), torch.cat(probs).double()

    def __call__(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        return self.embed(images, batch_size)[0]


def extra_scores(f_real, f_fake, p_fake) -> dict:
    """Inception Score (10 splits) on the classifier's probabilities, and k=3 precision/recall on its
    features; None where there are too few samples for them."""
    out: dict = {"is": None, "is_std": None, "precision": None, "recall": None}
    if len(p_fake) >= 10:
        out["is"], out["is_std"] = inception_score(p_fake, splits=10)
    if min(len(f_real), len(f_fake)) > 3:
        out["precision"], out["recall"] = precision_recall(f_real, f_fake, k=3)
    return out


def real_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """A seeded subset of at most n indices, in order."""
    if total <= n:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def evaluate(ckpt: ckpt_io.Checkpoint, *, data: str, root: str | None, download: bool, features: str | None,
             n: int, batch_size: int, seed: int, device: str, precision: str, warn, ema: bool = True) -> dict:
    if not features:
        raise UsageError("--features CLASSIFIER_CKPT is required: train one with "
                         "`aigc train --preset fashion-mnist-classifier` (or --set model.kind=classifier on any labelled data)")
    G, amp = generator_from(ckpt, device, precision, ema=ema)
    extractor = ClassifierFeatures(features, amp.device, amp)
    fcfg, m = extractor.cfg, ckpt.config.model
    if extractor.data_source != data:
        warn(f"the feature classifier was trained on '{extractor.data_source}', the real data is '{data}': "
             "distances in its feature space may mean little")
    # Real images take the generator's channels and resolution first, so both sides then go through
    # the same conversion to the classifier's input: a perfect generator scores near 0.
    real = load_images(data, channels=m.channels, resolution=m.resolution, root=root, download=download,
                       split="train", seed=seed, warn=warn)
    real_images = real.images[real_indices(len(real.images), n, seed)]
    labels = None  # a conditional model draws classes uniformly at random
    if m.conditional:
        labels = torch.randint(m.num_classes, (n,), generator=torch.Generator().manual_seed(seed + 1))
    fake_images = generate(G, latents(n, m.latent_dim, seed), amp, batch_size, labels=labels)
    f_real = extractor(real_images, batch_size).numpy()
    f_fake, p_fake = (t.numpy() for t in extractor.embed(fake_images, batch_size))
    # Subsets of at most half the samples, so their spread (kid_std) means something at small --n.
    subset = min(1000, max(2, min(len(f_fake), len(f_real)) // 2))
    kid_mean, kid_std = kid(f_fake, f_real, subsets=100, subset_size=subset, seed=seed)
    result = {
        "checkpoint": str(ckpt.path), "model": ckpt.config.model.kind, "step": ckpt.step,
        "metrics": {"fid": fid_from_features(f_fake, f_real), "kid": kid_mean, "kid_std": kid_std,
                    **extra_scores(f_real, f_fake, p_fake)},
        "protocol": {"extractor": extractor.name, "feature_dim": int(f_real.shape[1]),
                     "extractor_resolution": fcfg.resolution, "extractor_channels": fcfg.channels,
                     "n_fake": len(fake_images), "n_real": len(real_images), "real_data": real.name,
                     "real_split": "train", "seed": seed, "precision": amp.name,
                     "generator_weights": "G_ema" if ema and ckpt.net_state("G_ema") else "G",
                     "kid_subsets": 100, "kid_subset_size": subset, "is_splits": 10, "pr_k": 3},
    }
    if ckpt.config.model.kind == "vae":
        scores = vae_scores(ckpt, data=data, root=root, n=n, batch_size=batch_size, seed=seed, amp=amp, warn=warn)
        for key in ("n_heldout", "heldout_data"):  # protocol facts, not metrics
            if key in scores:
                result["protocol"][key] = scores.pop(key)
        result["metrics"].update(scores)
    return result


@torch.inference_mode()
def vae_scores(ckpt, *, data, root, n, batch_size, seed, amp, warn) -> dict:
    """Reconstruction MSE (pixel scale [-1, 1], decoding the posterior mean) and a one-sample
    estimate of the negative ELBO in nats per image, on held-out images of the data source."""
    if not ckpt.net_state("E"):
        return {"recon_mse": None, "neg_elbo": None}  # an exported decoder has no encoder
    m = ckpt.config.model
    nets = build_nets(m)
    for name in ("E", "G"):
        ckpt.load_net(name, nets[name])
        nets[name].to(amp.device).eval()
    E, G = nets["E"], nets["G"]
    try:
        test = load_images(data, channels=m.channels, resolution=m.resolution, root=root, download=False,
                           split="test", seed=seed, warn=warn)
    except UsageError as e:  # e.g. an IDX folder without its t10k files: FID/KID still stand
        warn(f"no held-out images for the VAE scores ({e})")
        return {"recon_mse": None, "neg_elbo": None}
    if m.conditional and test.labels is None:
        warn("the held-out images have no labels, which this conditional VAE needs: no VAE scores")
        return {"recon_mse": None, "neg_elbo": None}
    idx = real_indices(len(test.images), n, seed)
    images = test.images[idx]
    labels = test.labels[idx] if m.conditional else None
    g = torch.Generator().manual_seed(seed)
    total = {"mse": 0.0, "neg_elbo": 0.0}
    for i, chunk in enumerate(images.split(batch_size)):
        x = from_uint8(chunk.to(amp.device))
        y = labels[i * batch_size:(i + 1) * batch_size].to(amp.device) if labels is not None else None
        with amp.autocast():
            mu, logvar = E(x, y)
            eps = torch.randn(mu.shape, generator=g).to(amp.device)
            sampled = vae_terms(x, G.logits(mu + eps * (0.5 * logvar).exp(), y), mu, logvar,
                                ckpt.config.loss.recon_sigma, m.likelihood)
            mse = (x - decoded_image(G.logits(mu, y), m.likelihood)).pow(2).mean()
        total["mse"] += float(mse) * len(chunk)
        total["neg_elbo"] += float(sampled["neg_elbo"]) * len(chunk)
    return {"recon_mse": total["mse"] / len(images), "neg_elbo": total["neg_elbo"] / len(images),
            "n_heldout": len(images), "heldout_data": test.name}
