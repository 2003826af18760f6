"""Class conditioning, classifier-free guidance and classifier guidance, against the exact scores of a
two-class Gaussian data set and on a small trained model."""
import dataclasses
import math

import pytest
import torch

from diffusion.config import DataConfig, ModelConfig, ProcessConfig, SampleConfig, TrainConfig, TrialConfig
from diffusion.validation import validate
from diffusion.data import load_dataset
from diffusion.denoiser import Denoiser, network_denoiser
from diffusion.errors import ConfigError
from diffusion.guidance import classifier_guided, classifier_log_prob_grad, round_robin_labels
from diffusion.nets import UNet
from diffusion.parameterizations import PARAMETERIZATIONS
from diffusion.factory import build_process
from diffusion.factory import draw_samples
from diffusion.training import Trainer

DIM = 16


class TwoGaussians:
    """Classes y in {0, 1} with prior (0.3, 0.7) and x | y ~ N(mu_y, C): under x_t = alpha x0 + sigma eps,
    x_t | y ~ N(alpha mu_y, S) with S = alpha^2 C + sigma^2 I. Exact conditional and unconditional eps and the
    exact noisy classifier p(y | x_t), all in float64."""

    def __init__(self, process):
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
        self.cov = q @ torch.diag(torch.linspace(0.1, 1.0, DIM, dtype=torch.float64)) @ q.T
        self.means = torch.randn(2, DIM, generator=g, dtype=torch.float64)
        self.log_prior = torch.tensor([0.3, 0.7], dtype=torch.float64).log()
        self.process = process

    def _gaussians(self, t):
        alpha, sigma = self.process.alpha(t).double(), self.process.sigma(t).double()
        cov = alpha[:, None, None] ** 2 * self.cov + sigma[:, None, None] ** 2 * torch.eye(DIM, dtype=torch.float64)
        return alpha, sigma, cov

    def log_joint(self, x, t):
        """log p(x_t, y) for y = 0, 1: [B, 2]."""
        alpha, _, cov = self._gaussians(t)
        columns = []
        for y in range(2):
            dist = torch.distributions.MultivariateNormal(alpha[:, None] * self.means[y], covariance_matrix=cov)
            columns.append(dist.log_prob(x.double()) + self.log_prior[y])
        return torch.stack(columns, dim=1)

    def classifier(self, x, t):
        """Logits of the exact p(y | x_t) (t: the plain time)."""
        return self.log_joint(x, t)

    def eps(self, x, t, labels=None):
        """E[eps | x_t, y] (labels [B]) or E[eps | x_t] (labels None): -sigma * score, by autograd."""
        with torch.enable_grad():
            xx = x.double().detach().requires_grad_(True)
            joint = self.log_joint(xx, t)
            logp = joint.logsumexp(dim=1) if labels is None else joint.gather(1, labels[:, None]).squeeze(1)
            score = torch.autograd.grad(logp.sum(), xx)[0]
        return (-self.process.sigma(t).double()[:, None] * score).float()


@pytest.fixture
def two():
    return TwoGaussians(build_process(ProcessConfig(T=100)))


def test_classifier_guidance_at_scale_one_is_the_exact_conditional(two):
    """Bayes: score(x | y) = score(x) + grad log p(y | x). The guided unconditional model equals the conditional one."""
    x = torch.randn(64, DIM, generator=torch.Generator().manual_seed(1)) * 1.5
    t = torch.rand(64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    labels = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(3))
    unconditional = Denoiser(lambda x_t, tt: two.eps(x_t, tt), two.process)
    guided = classifier_guided(unconditional, two.classifier, labels, scale=1.0, network_time=False)
    exact = two.eps(x, t, labels)
    assert torch.allclose(guided.eps(x, t), exact, atol=1e-5)
    assert not torch.allclose(unconditional.eps(x, t), exact, atol=1e-2)  # guidance did something
    # the gradient itself against finite differences of the exact log p(y | x)
    grad = classifier_log_prob_grad(two.classifier, x[:2], t[:2], labels[:2])
    h = 1e-4
    for i in range(3):
        step = torch.zeros_like(x[:2]).double()
        step[:, i] = h
        log_post = lambda z: torch.log_softmax(two.log_joint(z, t[:2]), 1).gather(1, labels[:2, None]).squeeze(1)
        numeric = (log_post(x[:2].double() + step) - log_post(x[:2].double() - step)) / (2 * h)
        assert torch.allclose(grad[:, i].double(), numeric, atol=1e-4)


class ExactConditionalNetwork(torch.nn.Module):
    """A class-conditional 'network' whose eps output is exact: label 2 (the null label) is the unconditional model."""

    def __init__(self, two):
        super().__init__()
        self.two = two
        self.label_embedding = type("Labels", (), {"num_classes": 2})()

    def forward(self, x, t, labels=None):
        out = self.two.eps(x, t)
        if labels is not None:
            rows = labels != 2
            out[rows] = self.two.eps(x[rows], t[rows], labels[rows])
        return out


@pytest.mark.parametrize("scale", [0.0, 1.0, 3.0])
def test_classifier_free_guidance_equals_classifier_guidance_with_exact_models(two, scale):
    """eps_u + s (eps_c - eps_u) = eps_u - s sigma grad log p(y | x_t): the two guidance methods agree when both are exact
    (classifier-free in one call on a doubled batch, classifier guidance by autograd of the classifier)."""
    network = ExactConditionalNetwork(two)
    eps = PARAMETERIZATIONS.get("eps")
    x = torch.randn(32, DIM, generator=torch.Generator().manual_seed(4))
    t = torch.full((32,), 0.4)
    labels = torch.arange(32) % 2
    free = network_denoiser(network, eps, two.process, labels=labels, guidance_scale=scale)
    unconditional = network_denoiser(network, eps, two.process)
    by_classifier = classifier_guided(unconditional, two.classifier, labels, scale, network_time=False)
    assert torch.allclose(free.eps(x, t), by_classifier.eps(x, t), atol=1e-5)
    assert free.cost == (2 if scale not in (0.0, 1.0) else 1)
    if scale == 0.0:
        assert torch.equal(free.eps(x, t), unconditional.eps(x, t))


def test_guidance_scale_zero_samples_the_unconditional_model():
    """A class-conditional U-Net with random label embeddings: guidance scale 0 gives exactly the samples of its
    unconditional model (labels None), and scale 1 differs from both."""
    torch.manual_seed(0)
    network = UNet(1, channels=8, channel_mult=(1,), num_res_blocks=1, attention=False, groups=2, num_classes=10)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(0.02 * torch.randn_like(p))  # a non-zero output and label embeddings
    process = build_process(ProcessConfig(T=20))
    eps = PARAMETERIZATIONS.get("eps")
    labels = round_robin_labels(6, 10)
    options = SampleConfig(sampler="ddim", n=6, batch_size=3, steps=5)

    def draw(labels=None, scale=1.0):
        def make(start, size):
            batch = None if labels is None else labels[start:start + size]
            return network_denoiser(network, eps, process, labels=batch, guidance_scale=scale)

        return draw_samples(make, options, (1, 8, 8), 6, torch.Generator().manual_seed(5), torch.device("cpu"),
                            process=process)

    unconditional, nfe = draw()
    zero, _ = draw(labels=labels, scale=0.0)
    conditional, _ = draw(labels=labels, scale=1.0)
    guided, guided_nfe = draw(labels=labels, scale=2.0)
    assert torch.equal(zero, unconditional) and nfe == 5 and guided_nfe == 10
    assert not torch.equal(conditional, unconditional) and not torch.equal(guided, conditional)
    # the doubled batch of guidance equals two separate calls, and the labels matter
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5)
    one_call = network_denoiser(network, eps, process, labels=labels[:3], guidance_scale=2.0).eps(x, t)
    eps_c = network_denoiser(network, eps, process, labels=labels[:3]).eps(x, t)
    eps_u = network_denoiser(network, eps, process).eps(x, t)
    assert (eps_c - eps_u).abs().max() > 1e-3 * eps_u.abs().max()
    assert torch.allclose(one_call, eps_u + 2.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5 * eps_u.abs().max().item())


def test_label_dropout_rate_and_validation():
    cfg = TrialConfig(data=DataConfig(name="moons", n_points=400), process=ProcessConfig(T=50),
                      model=ModelConfig(arch="mlp", hidden=32, depth=2, class_conditional=True),
                      train=TrainConfig(steps=1, batch_size=8, cond_dropout=0.25))
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    labels = trainer.training_labels(torch.arange(300).repeat(10))
    dropped = (labels == 2).float().mean().item()
    assert abs(dropped - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(labels))
    kept = labels != 2
    assert torch.equal(labels[kept], trainer.train_labels[torch.arange(300).repeat(10)][kept])

    bad = [
        (dataclasses.replace(cfg, data=DataConfig(name="swiss_roll")), "data.name", "labelled"),
        (dataclasses.replace(cfg, train=TrainConfig(cond_dropout=0.0), sample=SampleConfig(guidance_scale=3.0)),
         "sample.guidance_scale", "cond_dropout"),
        (dataclasses.replace(cfg, model=ModelConfig(arch="mlp"), train=TrainConfig()), "sample.guidance_scale", None),
        (dataclasses.replace(cfg, train=TrainConfig(cond_dropout=1.0)), "train.cond_dropout", "[0, 1)"),
        (dataclasses.replace(cfg, model=ModelConfig(arch="mlp"), train=TrainConfig(cond_dropout=0.1)),
         "train.cond_dropout", "class_conditional"),
        (dataclasses.replace(cfg, sample=SampleConfig(classifier_scale=-1.0)), "sample.classifier_scale", ">= 0"),
    ]
    for config, key, words in bad:
        if key == "sample.guidance_scale" and words is None:
            config = dataclasses.replace(config, sample=SampleConfig(guidance_scale=2.0))
            words = "class_conditional"
        with pytest.raises(ConfigError) as error:
            validate(config)
        assert error.value.key == key and words in str(error.value), (key, str(error.value))


DIGITS_STEPS = 600  # training steps of the digits test: enough for recognisable digits


def _nearest_label(points, dataset):
    distances = torch.cdist(points, dataset.train)
    return dataset.train_labels[distances.argmin(dim=1)]


def test_trained_conditional_model_samples_its_requested_class():
    """A small class-conditional MLP on the two moons (label dropout 0.2): samples asked for a moon land on it
    (nearest training point's label) far above chance; the unconditional half (scale 0) does not follow labels;
    stronger guidance follows them at least as well."""
    cfg = TrialConfig(data=DataConfig(name="moons", n_points=2000), process=ProcessConfig(T=100),
                      model=ModelConfig(arch="mlp", hidden=64, depth=3, class_conditional=True),
                      train=TrainConfig(steps=1500, batch_size=128, lr=2e-3, warmup=50, ema_decay=0.99, cond_dropout=0.2),
                      sample=SampleConfig(sampler="ddim", steps=50, n=400, batch_size=400))
    dataset = load_dataset(cfg.data)
    trainer = Trainer(cfg, dataset, torch.device("cpu"))
    trainer.train()
    labels = round_robin_labels(400, 2)
    accuracy = {}
    for scale in (0.0, 1.0, 3.0):
        trainer.cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, guidance_scale=scale))
        samples, _ = trainer.sample(400, seed=1, labels=labels)
        accuracy[scale] = (_nearest_label(samples, dataset) == labels).float().mean().item()
    assert accuracy[1.0] > 0.9 and accuracy[3.0] >= accuracy[1.0] - 0.02, accuracy
    assert abs(accuracy[0.0] - 0.5) < 0.1, accuracy  # unconditional: half of the points on the asked-for moon


def test_trained_digits_model_samples_are_classified_as_their_requested_class(tmp_path):
    """The issue's figure in small: a class-conditional U-Net trained briefly on the 8x8 digits (label dropout
    0.1), sampled with DDIM for every class in turn; the data set's classifier (the `classifier` FID extractor's
    network, through the trial's metric) puts the conditional samples in their requested class far above the
    10 % of chance, guidance (scale 3) more often still, and the unconditional half (scale 0) near chance
    (measured: 0.68, 0.865 and 0.10; the classifier itself: 0.986)."""
    from diffusion.metrics import conditional_metrics

    torch.manual_seed(0)
    cfg = TrialConfig(data=DataConfig(name="digits"), process=ProcessConfig(T=1000),
                      model=ModelConfig(channels=16, channel_mult=[1, 2], groups=8, class_conditional=True),
                      train=TrainConfig(steps=DIGITS_STEPS, batch_size=64, lr=2e-3, warmup=50, ema_decay=0.99,
                                        cond_dropout=0.1),
                      sample=SampleConfig(sampler="ddim", steps=25, n=200, batch_size=200))
    dataset = load_dataset(cfg.data)
    trainer = Trainer(cfg, dataset, torch.device("cpu"))
    trainer.train()
    labels = round_robin_labels(200, 10)
    accuracy = {}
    for scale in (0.0, 1.0, 3.0):
        trainer.cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, guidance_scale=scale))
        samples, _ = trainer.sample(200, seed=1, labels=labels)
        metrics, _ = conditional_metrics(samples, labels, dataset, classifier_steps=300, cache_dir=str(tmp_path))
        accuracy[scale] = metrics["class_accuracy"]
    assert metrics["class_accuracy_reference"] > 0.9, metrics
    assert accuracy[1.0] > 0.5 and accuracy[3.0] > accuracy[1.0], accuracy
    assert accuracy[0.0] < 0.25, accuracy
