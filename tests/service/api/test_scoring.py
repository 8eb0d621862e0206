"""service.api.scoring against closed forms: a linear-Gaussian decoder, whose marginal
p(x) = N(b, W W^T + s^2 I) is known exactly, and Bernoulli and KL terms written out."""

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from models.config import VAEConfig
from service.api.scoring import kl_closed_form, log_px_given_z, score, threshold_at

D, P, S = 2, 5, 0.5
GAUSSIAN = VAEConfig(input_shape=(P,), latent_dim=D, likelihood="gaussian")


@pytest.fixture(scope="module")
def linear():
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(P, D)), rng.normal(size=P)
    x = rng.multivariate_normal(b, w @ w.T + S ** 2 * np.eye(P), size=6).astype(np.float32)
    # the exact posterior's mean and its marginal variances: a diagonal q close to it
    precision = np.eye(D) + w.T @ w / S ** 2
    cov = np.linalg.inv(precision)
    mu = (cov @ w.T @ (x.astype(np.float64) - b).T / S ** 2).T
    logvar = np.log(np.broadcast_to(np.diag(cov), mu.shape))

    def decode(z):
        mean = z.astype(np.float64) @ w.T + b
        return {"mean": mean.astype(np.float32),
                "log_scale": np.full_like(mean, math.log(S), dtype=np.float32)}

    exact = multivariate_normal(b, w @ w.T + S ** 2 * np.eye(P)).logpdf(x.astype(np.float64))
    return decode, x, mu.astype(np.float32), logvar.astype(np.float32), exact


def test_log_px_converges_to_the_exact_marginal_within_its_standard_error(linear):
    decode, x, mu, logvar, exact = linear
    got = score(decode, x, mu, logvar, GAUSSIAN, 4000, np.random.default_rng(1))
    assert got.log_px is not None and got.log_px_se is not None and got.ess is not None
    assert np.all(np.abs(got.log_px - exact) <= 4 * got.log_px_se + 1e-3), (
        got.log_px - exact, got.log_px_se)
    assert np.all((got.ess > 1) & (got.ess <= 4000))
    # the ELBO bounds log p(x) from below, and the KL is exact
    assert np.all(got.elbo <= exact + 4 * got.elbo_se)
    np.testing.assert_allclose(got.kl, kl_closed_form(mu, logvar).sum(1))


def test_the_standard_error_matches_the_spread_over_seeds(linear):
    decode, x, mu, logvar, _ = linear
    # a poorer proposal (twice the posterior's spread) so the error is well above rounding
    runs = [score(decode, x, mu, logvar + np.log(4.0), GAUSSIAN, 50,
                  np.random.default_rng(seed)) for seed in range(200)]
    spread = np.std([r.log_px for r in runs], axis=0, ddof=1)
    reported = np.mean([r.log_px_se for r in runs], axis=0)
    np.testing.assert_allclose(reported, spread, rtol=0.35)
    elbo_spread = np.std([r.elbo for r in runs], axis=0, ddof=1)
    np.testing.assert_allclose(np.mean([r.elbo_se for r in runs], axis=0), elbo_spread,
                               rtol=0.35)


def test_one_draw_has_no_standard_error_and_k0_no_log_px(linear):
    decode, x, mu, logvar, _ = linear
    got = score(decode, x, mu, logvar, GAUSSIAN, 0, np.random.default_rng(0))
    assert got.log_px is None and got.elbo_se is None and got.ess is None
    got = score(decode, x, mu, logvar, GAUSSIAN, 1, np.random.default_rng(0))
    assert got.log_px_se is None and got.log_px is not None
    np.testing.assert_allclose(got.ess, 1.0)


def test_bernoulli_and_gaussian_log_probabilities_written_out():
    rng = np.random.default_rng(2)
    x = rng.random((3, 1, 2, 2)).astype(np.float32)
    p = rng.uniform(0.05, 0.95, size=(3, 1, 2, 2)).astype(np.float32)
    want = [sum(xi * math.log(pi) + (1 - xi) * math.log(1 - pi)
                for xi, pi in zip(row.ravel().tolist(), prow.ravel().tolist(), strict=True))
            for row, prow in zip(x, p, strict=True)]
    bernoulli = VAEConfig(input_shape=(1, 2, 2))
    np.testing.assert_allclose(log_px_given_z(x, {"probs": p}, bernoulli), want, rtol=1e-6)
    # a probability float32 rounds to 1 is floored, not -inf
    assert np.isfinite(log_px_given_z(np.zeros((1, 1)), {"probs": np.ones((1, 1))},
                                      VAEConfig(input_shape=(1,)))).all()
    mean, log_scale = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)) * 0.3
    xs = rng.normal(size=(3, 4))
    want = [sum(-0.5 * ((a - m) / math.exp(s)) ** 2 - s - 0.5 * math.log(2 * math.pi)
                for a, m, s in zip(r, mr, sr, strict=True))
            for r, mr, sr in zip(xs.tolist(), mean.tolist(), log_scale.tolist(), strict=True)]
    np.testing.assert_allclose(
        log_px_given_z(xs, {"mean": mean, "log_scale": log_scale},
                       VAEConfig(input_shape=(4,), likelihood="gaussian")), want)


def test_threshold_interpolates_the_stored_quantiles():
    from models.evaluate import QUANTILE_LEVELS

    values = np.random.default_rng(3).normal(-100, 10, 997)
    stored = {"levels": QUANTILE_LEVELS.tolist(),
              "values": np.quantile(values, QUANTILE_LEVELS).tolist()}
    for fpr in (0.001, 0.01, 0.0123, 0.05, 0.5):
        # the share of held-out values below the threshold is the rate asked for
        below = (values < threshold_at(stored, fpr)).mean()
        assert abs(below - fpr) <= 1.5 / len(values), (fpr, below)


# -- (continuous) Bernoulli decoders whose logits reach +-30, through their ONNX files ----

LOGITS = np.array([-30.0, -25.0, -18.0, -16.0, -9.0, -2.7, -0.3, 0.0,
                   0.04, 0.6, 2.5, 8.0, 17.0, 21.0, 27.0, 30.0])  # one per value of an item


def sure_vae(likelihood):
    """A VAE whose decoder's logits are LOGITS plus at most 0.05 (tiny last-layer weights,
    LOGITS as its bias): most of its values far beyond |l| = 16.6, where float32
    probabilities round to 0 or 1."""
    import torch
    from torch import nn

    from models.vae import VAE

    cfg = VAEConfig(input_shape=(1, 4, 4), latent_dim=2, hidden=(8,), likelihood=likelihood)
    torch.manual_seed(0)
    vae = VAE(cfg).eval()
    last = [m for m in vae.decoder.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(0.05 / last.weight.abs().sum(1, keepdim=True).clamp(min=1e-9))
        last.bias.copy_(torch.from_numpy(LOGITS))
    return vae, cfg


def onnx_scorer(vae, cfg, folder, decoder_module=None):
    """The API's path: the encoder and decoder .onnx files in onnxruntime, scored by
    service.api.scoring; `decode` records the latent rows it was asked for."""
    import onnxruntime as ort
    import torch

    from models.export import export_module, export_vae, model_metadata

    files = export_vae(vae, str(folder), exporter="torchscript")
    decoder_path = files["decoder"].path
    if decoder_module is not None:  # a decoder file as exported before it had `logits`
        decoder_path = str(folder / "old-decoder.onnx")
        export_module(decoder_module, torch.randn(2, cfg.latent_dim), decoder_path, "z",
                      ("mean", "probs") if cfg.likelihood == "continuous_bernoulli"
                      else ("probs",), model_metadata(vae, "decoder"), "torchscript")
    encoder = ort.InferenceSession(files["encoder"].path, providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(decoder_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in decoder.get_outputs()]
    seen = []

    def decode(z):
        seen.append(z.copy())
        return dict(zip(names, decoder.run(names, {"z": z}), strict=True))

    def run(x, k=0):
        seen.clear()
        mu, logvar = encoder.run(None, {"x": x})
        got = score(decode, x, mu, logvar, cfg, k, np.random.default_rng(4))
        return got, np.concatenate(seen), names

    return run


def torch_log_px_given_z(vae, z, x):
    """torch's own distributions at the decoder's logits (float64), summed per item."""
    import torch

    with torch.no_grad():
        logits = vae.decoder(torch.from_numpy(z)).double().reshape(len(z), *x.shape[1:])
    value = torch.from_numpy(x.astype(np.float64))
    dist = (torch.distributions.ContinuousBernoulli(logits=logits)
            if vae.config.likelihood == "continuous_bernoulli"
            else torch.distributions.Bernoulli(logits=logits))
    return dist.log_prob(value).sum((1, 2, 3)).numpy()


def sure_items(n=6):
    """Grey items and, to be surely wrong somewhere, items of exact 0s and 1s."""
    rng = np.random.default_rng(5)
    x = rng.random((n, 1, 4, 4)).astype(np.float32)
    x[0], x[1] = 0.0, 1.0
    return x


@pytest.mark.parametrize("likelihood", ["continuous_bernoulli", "bernoulli"])
def test_scores_match_torch_for_logits_far_beyond_float32_probabilities(tmp_path, likelihood):
    """The old scorer clipped float32 probabilities to [2^-24, 1 - 2^-24]: a continuous
    Bernoulli lost log(|l| / 16.6) nats per value (-0.59 at l = -30) and a Bernoulli
    counted a sure-and-wrong value at 16.6 nats, not |l|: tens of nats per item here."""
    vae, cfg = sure_vae(likelihood)
    x = sure_items() if likelihood == "continuous_bernoulli" else (sure_items() > 0.5).astype(
        np.float32)
    run = onnx_scorer(vae, cfg, tmp_path)
    got, z, names = run(x)  # K = 0: one draw per item, its log p(x|z) is `reconstruction`
    want = torch_log_px_given_z(vae, z, x)
    # float32 logits from onnxruntime against torch's: within 1e-3 nats per item of 16 values
    np.testing.assert_allclose(got.reconstruction, want, rtol=0, atol=1e-3)
    assert names[-1] == "logits"
    got, z, _ = run(x, k=7)
    # the importance-sampled figures use the same per-draw terms
    assert np.all(np.isfinite(got.log_px))
    want = torch_log_px_given_z(vae, z, np.repeat(x[None], 7, 0).reshape(-1, 1, 4, 4))
    np.testing.assert_allclose(got.reconstruction, want.reshape(7, -1).mean(0), atol=1e-3)


def test_an_old_continuous_bernoulli_file_has_its_logits_recovered_from_its_mean(tmp_path):
    """A decoder file exported before `logits` was an output (`mean`, `probs`): the mean
    still resolves every logit (1 - mean ~ 1/l), so the figures stay close to torch's."""
    import torch

    from models.likelihoods import cb_mean
    from service.api.scoring import logits_source

    vae, cfg = sure_vae("continuous_bernoulli")

    class OldDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, z):
            logits = self.vae.decoder(z)
            return cb_mean(logits), torch.sigmoid(logits)

    run = onnx_scorer(vae, cfg, tmp_path, decoder_module=OldDecoder().eval())
    x = sure_items()
    got, z, names = run(x)
    assert names == ["mean", "probs"]
    assert logits_source(names, "continuous_bernoulli") == "recovered"
    want = torch_log_px_given_z(vae, z, x)
    np.testing.assert_allclose(got.reconstruction, want, rtol=0, atol=2e-3)


def test_recovered_logits_invert_the_mean_for_any_logit():
    import torch

    from models.likelihoods import cb_mean
    from service.api.scoring import logits_source, recover_cb_logits

    logits = np.concatenate([np.linspace(-60, 60, 20001), [-1e4, 1e4, 2.59, -2.61]])
    t = torch.from_numpy(logits)
    # from float64 outputs the inversion is exact ...
    got = recover_cb_logits(cb_mean(t).numpy(), torch.sigmoid(t).numpy())
    np.testing.assert_allclose(got, logits, rtol=1e-10, atol=1e-10)
    # ... and float32's rounding of the mean (3e-8) moves a logit l by about 3e-8 l^2
    t32 = t.float()
    got = recover_cb_logits(cb_mean(t32).numpy(), torch.sigmoid(t32).numpy())
    err = np.abs(got - t32.double().numpy())
    assert np.all(err <= 1e-6 + 1.5e-7 * logits ** 2), np.max(err / logits ** 2)
    assert logits_source(["probs"], "bernoulli") == "floored"
    assert logits_source(["probs", "logits"], "bernoulli") == "exported"
    assert logits_source(["mean", "log_scale"], "gaussian") is None
