"""Model families: what a trained network *is*, for :class:`diffusion.training.Trainer`. The Trainer owns the
network, its EMA, the optimizer and every random state; a family supplies the rest, given a network (the
training one or the EMA one):

    batch_losses(network, x0, labels, generator) -> [B]      the training loss of one batch
    sample(network, n, generator, labels, classifier) -> (samples on CPU, NFE per sample)
    heldout_likelihood(network)                               bits/dim, or NotImplementedError(likelihood_note)
    parameters()                                              what trains beside the network (a learned schedule)
    backward(loss, losses), state_dict(), load_state_dict(state), model_state(), load_model_state(state)
    sample_labels(n), decode(samples)

- :class:`GaussianFamily`: x_t = alpha x0 + sigma eps (``diffusion.processes``) with a parameterization, a loss
  weighting and a time sampler; sampled by ``factory.draw_samples`` (with classifier-free and classifier
  guidance), with a likelihood (the probability-flow ODE, on the path :meth:`GaussianFamily.ode_denoiser` picks,
  and the discrete bound).
- :class:`BlurFamily`: the Gaussian family on DCT coefficients (``diffusion.blur``), networks seeing pixels.
- :class:`LatentFamily`: the Gaussian family on a VAE's codes (``diffusion.latent``).
- :class:`RestorationFamily`: naive and cold diffusion (``diffusion.degradations``).

:func:`build_family` picks one from a trial config.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .blur import InBasis
from .config import TrialConfig
from .data import Dataset
from .degradations import COLD_SAMPLERS, build_degradation, restoration_loss
from .denoiser import Denoiser, network_denoiser
from .factory import build_process, continuous_limit, draw_samples
from .guidance import classifier_guided, round_robin_labels
from .latent import LIKELIHOOD_NOTE
from .bpd import heldout_likelihood
from .losses import WEIGHTINGS, TimeSampler, diffusion_loss, weighting_options
from .parameterizations import PARAMETERIZATIONS
from .registry import options_for
from .samplers import Progress, in_batches, step_callback
from .validation import RESTORATION_PROCESSES


class Family:
    """What every family shares: the config, the data set and its training split on ``device``, the classes of a
    class-conditional model, and the defaults of a family with nothing to train beside the network, no
    likelihood and no labels to sample."""

    likelihood_note: Optional[str] = None  # why the family has no bits/dim (None: it has them)
    learned_schedule = False  # a schedule trained with the network (``process.schedule: learned``)

    def __init__(self, cfg: TrialConfig, dataset: Dataset, device: torch.device):
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.num_classes = dataset.num_classes if cfg.model.class_conditional else None
        self.train_data = dataset.train.to(device)

    def parameters(self) -> list[torch.nn.Parameter]:
        return []

    def backward(self, loss: Tensor, losses: Tensor) -> None:
        """The gradients of a batch's mean loss ``loss`` (its per-example ``losses``, [B])."""
        loss.backward()

    def state_dict(self) -> dict:
        """The family's part of a checkpoint (the keys of a Gaussian model's, empty)."""
        return {"time_sampler": {}, "schedule": {}}

    def load_state_dict(self, state: dict) -> None:
        pass

    def model_state(self) -> dict:
        """What of the trained model lives outside the network (saved with the EMA weights)."""
        return {}

    def load_model_state(self, state: dict) -> None:
        pass

    def sample_labels(self, n: int) -> Optional[Tensor]:
        return None

    def decode(self, samples: Tensor) -> Tensor:
        """Samples as data (the identity, except for latent codes)."""
        return samples

    def heldout_likelihood(self, network: torch.nn.Module):
        raise NotImplementedError(self.likelihood_note)


class GaussianFamily(Family):
    """A Gaussian process x_t = alpha x0 + sigma eps, the network read through a parameterization, trained with a
    loss weighting on times from a time sampler (``losses.diffusion_loss``)."""

    def __init__(self, cfg: TrialConfig, dataset: Dataset, device: torch.device):
        super().__init__(cfg, dataset, device)
        self.process = build_process(cfg.process, tuple(dataset.shape))
        self.parameterization = PARAMETERIZATIONS.get(cfg.model.parameterization)
        self.weighting = WEIGHTINGS.get(cfg.loss.weighting)
        self.learned_schedule = self.process.learned
        if self.learned_schedule:  # VDM's schedule trains with the network, in the same optimizer
            self.process.schedule.to(device)
        self.learned_variance = cfg.model.variance == "learned_range"
        self.time_sampler = TimeSampler(self.process, **options_for(TimeSampler, cfg.loss))

    def denoiser(self, network: torch.nn.Module, labels: Optional[Tensor] = None,
                 guidance_scale: float = 1.0) -> Denoiser:
        """The network as a model of eps; for a class-conditional one, asked for ``labels`` (None: its
        unconditional model) with classifier-free guidance ``guidance_scale``."""
        return network_denoiser(network, self.parameterization, self.process, self.learned_variance, labels,
                                guidance_scale)

    # --- training ----------------------------------------------------------------------------
    def batch_losses(self, network: torch.nn.Module, x0: Tensor, labels: Optional[Tensor],
                     generator: torch.Generator) -> Tensor:
        """Per-example losses [B] of one batch (one network evaluation each): ``diffusion_loss``."""
        return diffusion_loss(self.denoiser(network, labels), self.weighting, x0, generator,
                              **options_for(diffusion_loss, self.cfg.loss, levels=self.dataset.levels,
                                            variance=self.cfg.model.variance,
                                            weighting_options=weighting_options(self.weighting, self.cfg.loss),
                                            time_sampler=self.time_sampler, reduction="none"))

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.process.parameters()) if self.learned_schedule else []

    def backward(self, loss: Tensor, losses: Tensor) -> None:
        """The network's gradient is that of E[L]. A learned schedule in continuous time with fixed end points
        does not change the expected bound, only its estimator's variance, so its gradient is that of E[L^2]
        (Kingma et al. 2021, sec. 5.2); in discrete time it is that of E[L], like the network's."""
        schedule_grads = None
        if self.learned_schedule and self.process.T is None:
            schedule_grads = torch.autograd.grad((losses**2).mean(), list(self.process.parameters()),
                                                 retain_graph=True)
        loss.backward()
        if schedule_grads is not None:
            for parameter, grad in zip(self.process.parameters(), schedule_grads):
                parameter.grad = grad

    def state_dict(self) -> dict:
        """The time sampler's loss history and the learned schedule."""
        return {"time_sampler": self.time_sampler.state_dict(), **self._schedule_state()}

    def load_state_dict(self, state: dict) -> None:
        self.time_sampler.load_state_dict(state["time_sampler"])
        self.load_model_state(state)

    def model_state(self) -> dict:
        """The learned schedule, if any (a user needs it to sample from the network)."""
        return self._schedule_state() if self.learned_schedule else {}

    def load_model_state(self, state: dict) -> None:
        if self.learned_schedule:
            self.process.schedule.load_state_dict(state["schedule"])

    def _schedule_state(self) -> dict:
        return {"schedule": self.process.schedule.state_dict() if self.learned_schedule else {}}

    # --- sampling ----------------------------------------------------------------------------
    def sample_labels(self, n: int) -> Optional[Tensor]:
        """The classes n samples are asked for (every class in turn) when sampling is conditional: a
        class-conditional model or classifier guidance; None otherwise."""
        if self.num_classes is None and self.cfg.sample.classifier_scale == 0:
            return None
        return round_robin_labels(n, self.dataset.num_classes)

    def sample(self, network: torch.nn.Module, n: int, generator: torch.Generator, labels: Optional[Tensor] = None,
               classifier: Optional[torch.nn.Module] = None, progress: Progress = None) -> tuple[Tensor, int]:
        """n samples by ``samplers.draw_samples``; ``labels [n]``: the class of each (default
        :meth:`sample_labels`); ``classifier``: the noise-conditional classifier of classifier guidance
        (``sample.classifier_scale`` > 0; Dhariwal & Nichol 2021); ``progress(done, total)``: told after every
        sampler step."""
        labels = self.sample_labels(n) if labels is None else labels
        options, scale = self.cfg.sample, self.cfg.sample.classifier_scale
        if scale > 0 and classifier is None:
            raise ValueError("sample.classifier_scale > 0 needs the noise-conditional classifier")

        def denoiser_for(start: int, size: int) -> Denoiser:
            batch = None if labels is None else labels[start:start + size].to(self.device)
            model = self.denoiser(network, batch if self.num_classes else None, options.guidance_scale)
            if scale > 0:
                model = classifier_guided(model, classifier.eval(), batch, scale)
            return model

        return draw_samples(denoiser_for, options, self.dataset.shape, n, generator, self.device,
                            variance=self.cfg.model.variance, process=self.process, progress=progress)

    # --- likelihood --------------------------------------------------------------------------
    def ode_denoiser(self, network: torch.nn.Module) -> tuple[Denoiser, str]:
        """The network (put in eval mode) on the path its probability-flow ODE runs on, with a note of that
        path for discrete models ("" for continuous ones): a discrete model runs through the continuous limit
        of its schedule (``factory.continuous_limit``) unless its parameterization reads the discrete step
        (``mean``), which stays on the discrete process."""
        network.eval()
        path, deviation = self.process, 0.0
        if not self.parameterization.needs_step:
            path, deviation = continuous_limit(self.cfg.process, self.process)
        ode = network_denoiser(network, self.parameterization, path, self.learned_variance)
        if self.process.T is None:
            return ode, ""
        limit = "continuous limit of the schedule" if path is not self.process else "the discrete process"
        return ode, f"{limit} (max |log-SNR difference| of the limit on the grid: {deviation:.3f})"

    def heldout_likelihood(self, network: torch.nn.Module):
        """Bits/dim of the first ``eval.bpd_n`` test examples (``diffusion.bpd.heldout_likelihood``), with
        a generator seeded from the trial seed; the tag ``bpd_ode.path`` names a discrete model's ODE path."""
        if self.likelihood_note:
            raise NotImplementedError(self.likelihood_note)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 2)
        x = self.dataset.test[: self.cfg.eval.bpd_n].to(self.device)
        ode, path_tag = self.ode_denoiser(network)
        result = heldout_likelihood(self.denoiser(network), x, self.dataset.levels, generator,
                                    **options_for(heldout_likelihood, self.cfg.eval,
                                                  renames={"rtol": "ode_rtol", "atol": "ode_atol",
                                                           "max_nfe": "ode_max_nfe", "probes": "hutchinson_probes",
                                                           "distribution": "probe"},
                                                  variance=self.cfg.model.variance,
                                                  batch_size=self.cfg.sample.batch_size, ode_denoiser=ode))
        if path_tag:
            result.tags["bpd_ode.path"] = path_tag
        return result


class BlurFamily(GaussianFamily):
    """Blur diffusion (Lee et al. 2022, ``diffusion.blur``): a Gaussian process per DCT frequency. Training and
    sampling are the Gaussian ones on the DCT coefficients u of the images (the loss's squared errors are the
    same in either basis: the DCT is orthonormal); the network sees pixels (``blur.InBasis``)."""

    likelihood_note = ("bits/dim are not computed for blur diffusion: its model is Gaussian per DCT frequency, "
                       "but this tool's discretized decoder and probability-flow ODE solve are written for one "
                       "alpha and sigma per example")

    def denoiser(self, network: torch.nn.Module, labels: Optional[Tensor] = None,
                 guidance_scale: float = 1.0) -> Denoiser:
        return super().denoiser(InBasis(network, self.process), labels, guidance_scale)

    def batch_losses(self, network: torch.nn.Module, x0: Tensor, labels: Optional[Tensor],
                     generator: torch.Generator) -> Tensor:
        return super().batch_losses(network, self.process.to_basis(x0), labels, generator)


class LatentFamily(GaussianFamily):
    """Latent diffusion (Rombach et al. 2022, ``diffusion.latent``): the Gaussian family on the codes of a VAE (the
    data set is ``latent.latent_dataset``'s). Samples are codes; :meth:`decode` turns them into images with the
    VAE, when it was given. Bits/dim of codes are not the data's: :attr:`likelihood_note`."""

    def __init__(self, cfg: TrialConfig, dataset: Dataset, device: torch.device,
                 vae: Optional[torch.nn.Module] = None):
        super().__init__(cfg, dataset, device)
        self.vae, self.likelihood_note = vae, LIKELIHOOD_NOTE

    def decode(self, samples: Tensor) -> Tensor:
        """Images from codes: the VAE's ``decode_codes``, ``sample.batch_size`` codes at a time."""
        if self.vae is None:
            raise ValueError("model.latent: decoding the codes needs the VAE (build_trainer(..., vae=...))")
        with torch.no_grad():
            return torch.cat([self.vae.decode_codes(z.to(self.device)).cpu()
                              for z in samples.split(self.cfg.sample.batch_size)])


class RestorationFamily(Family):
    """Naive and cold diffusion (Bansal et al. 2022, "Cold Diffusion"): a degradation D(x0, s), s = 0..T
    (``diffusion.degradations``), and a network R(x_s, s / T) that predicts x0, trained with the squared error
    of its prediction (``restoration_loss``) and sampled by ``denoise_renoise`` or ``cold_improved`` from draws
    of the degradation's prior. ``sample.steps`` is the NFE budget, as for every sampler: the step K between
    visited levels is round(T / steps). Such a model defines no likelihood (:attr:`likelihood_note` says why),
    and has no class conditioning or guidance."""

    likelihood_note = ("naive and cold diffusion define no likelihood: their degradations are not Gaussian "
                       "(deterministic, or salt and pepper), so there is no variational bound or ODE to integrate")

    def __init__(self, cfg: TrialConfig, dataset: Dataset, device: torch.device):
        super().__init__(cfg, dataset, device)
        process = cfg.process
        name = "naive" if process.name == "naive" else process.degradation
        self.degradation = build_degradation(name, int(process.T), tuple(dataset.shape),
                                             blur_sigma_max=process.blur_sigma_max, order_seed=cfg.seed)

    def restorer(self, network: torch.nn.Module):
        """``R(x_s, s) -> x0_hat`` for integer levels s [B]: the network sees the time s / T in [0, 1]."""
        T = self.degradation.T
        return lambda x_s, s: network(x_s, s.to(x_s.dtype) / T)

    def batch_losses(self, network: torch.nn.Module, x0: Tensor, labels: Optional[Tensor],
                     generator: torch.Generator) -> Tensor:
        """``restoration_loss`` (Bansal et al. 2022, eq. 1); a restorer has no labels."""
        return restoration_loss(self.restorer(network), self.degradation, x0, generator)

    def step_size(self) -> int:
        """K, the levels between two visited ones: round(T / sample.steps), at least 1 (every level without steps)."""
        T, steps = self.degradation.T, self.cfg.sample.steps
        return 1 if steps is None else max(1, round(T / steps))

    @property
    def prior_noise(self) -> float:
        """The std of the perturbation of x_T: ``sample.prior_noise``, else the degradation's default."""
        chosen = self.cfg.sample.prior_noise
        return self.degradation.prior_noise if chosen is None else float(chosen)

    def sample(self, network: torch.nn.Module, n: int, generator: torch.Generator, labels: Optional[Tensor] = None,
               classifier: Optional[torch.nn.Module] = None, progress: Progress = None) -> tuple[Tensor, int]:
        """n samples by the cold sampler ``sample.sampler`` from draws of the degradation's prior, each start
        perturbed by noise of std :attr:`prior_noise` (``labels`` and ``classifier`` do not apply);
        ``progress(done, total)``: told after every sampler step."""
        sampler = COLD_SAMPLERS.get(self.cfg.sample.sampler)
        restore = self.restorer(network)

        def draw(start: int, size: int) -> tuple[Tensor, int]:
            x_T = self.degradation.prior(size, self.train_data, generator)
            perturbation = None
            if self.prior_noise > 0:
                perturbation = self.prior_noise * torch.randn(x_T.shape, generator=generator, device=x_T.device)
            callback = step_callback(progress, start, self.cfg.sample.batch_size, n,
                                     len(range(self.degradation.T, 0, -self.step_size())))
            x, nfe = sampler(restore, self.degradation, x_T, generator=generator, step=self.step_size(),
                             perturbation=perturbation, callback=callback)
            return x.float(), nfe

        with torch.no_grad():
            return in_batches(n, self.cfg.sample.batch_size, draw)


def build_family(cfg: TrialConfig, dataset: Dataset, device: torch.device,
                 vae: Optional[torch.nn.Module] = None) -> Family:
    """The family of a trial: restoration for naive and cold diffusion, blur, latent (``model.latent``; ``vae``
    decodes its samples) or Gaussian. Builds the process, so a learned schedule's initial weights come from the
    global RNG: the caller seeds it first."""
    if cfg.process.name in RESTORATION_PROCESSES:
        return RestorationFamily(cfg, dataset, device)
    if cfg.process.name == "blur":
        return BlurFamily(cfg, dataset, device)
    if cfg.model.latent:
        return LatentFamily(cfg, dataset, device, vae)
    return GaussianFamily(cfg, dataset, device)
