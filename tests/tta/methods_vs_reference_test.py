"""dmd_jax's adaptation methods against PyTorch re-statements of the published steps.

Each reference below is written here from the papers and the authors' code
(DequanWang/tent, mr-eggplant/EATA, mr-eggplant/SAR, chenyaofo/CEMA), on the same random
pytorchvideo X3D that `dmd_jax.convert` turns into the dmd_jax edge, and both run the same
batches for several steps: the scored logits of every step and the adapted normalisation
parameters must agree within float32 tolerance. One deliberate difference from the
authors' code: theirs select the layers to adapt with `isinstance(m, nn.BatchNorm2d)`, so
on a video network (BatchNorm3d) they would adapt nothing; the re-statements adapt the
BatchNorm3d layers, as dmd_jax does.

The float32 drift check compares each framework's float32 Tent gradient with its float64
one on the same (float32) input: dmd_jax's may not be worse than PyTorch's.
"""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from dmd_jax import convert, model_store, parallel, tta
from dmd_jax.convert import mapping
from dmd_jax.convert import x3d as x3d_rules
from dmd_jax.tta.adaptable import Adaptable
from dmd_jax.tta.base import Context

torch = pytest.importorskip("torch")
F = torch.nn.functional

FRAMES, SIZE, CLASSES, BATCH = 4, 32, 5, 8
# Larger than the papers' 2.5e-4, so that a few steps move a random model measurably, and
# small enough that the two implementations' float rounding (3e-5 in the logits of the
# unadapted model, in float64 too) is not amplified into different trajectories: at 0.02
# Tent's logits part by 2e-2 at the third step and by 1.0 at the fourth, in float32 and
# float64 alike (2-core CPU, measured): X3D with batch statistics is ill-conditioned.
LR = 0.002
MARGIN = 0.9  # E0 = 0.9 ln C: on a random model 0.4 ln C would filter out every clip


def _torch_x3d(seed: int):
    from dmd_jax.references import pytorchvideo_create_x3d

    torch.manual_seed(seed)
    model = pytorchvideo_create_x3d()(
        input_clip_length=FRAMES, input_crop_size=SIZE, model_num_class=CLASSES,
        width_factor=0.5, depth_factor=1.0, head_dim_out=64, dropout_rate=0.0,
        head_activation=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, torch.nn.Linear):
                # confident enough that the reliability filters let some clips through
                module.weight.normal_(0.0, 6.0 / module.in_features ** 0.5)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(torch edge, dmd_jax edge, torch cloud, dmd_jax cloud): the same weights each."""
    root = tmp_path_factory.mktemp("reference")
    out = []
    for seed in (0, 1):
        reference = _torch_x3d(seed)
        torch.save({"model_state": reference.state_dict()}, root / f"x3d{seed}.pyth")
        convert.convert("x3d", str(root / f"x3d{seed}.pyth"), str(root / f"flax{seed}"),
                        frames=FRAMES, size=SIZE)
        loaded = model_store.load(str(root / f"flax{seed}"), runtime={"depthwise_impl": "xla"})
        out += [reference, Adaptable.of(loaded)]
    return out


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, (BATCH, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
            for _ in range(4)]


def torch_input(clips: np.ndarray, dtype=None):
    """The normalised clips exactly as dmd_jax computes them (float32), channels first."""
    x = (clips.astype(np.float32) / np.float32(255.0) - np.float32(0.45)) / np.float32(0.225)
    t = torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 4, 1, 2, 3))))
    return t if dtype is None else t.to(dtype)


def configure(model):
    """As the authors' `configure_model`: train mode, batch statistics, only the norm
    layers' affine parameters trainable (BatchNorm3d here, see the module docstring)."""
    model = copy.deepcopy(model).train()
    model.requires_grad_(False)
    params = []
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.requires_grad_(True)
            module.track_running_stats, module.running_mean, module.running_var = False, None, None
            params += [module.weight, module.bias]
    return model, params


def entropy(logits):
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def torch_norm_params(model, keys) -> dict[str, np.ndarray]:
    """The model's BatchNorm scale/bias under dmd_jax's flat keys ('stem/norm/scale'), found
    through the converter's own key map."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {}
    for key in keys:
        torch_key, transform = mapping._source(f"params/{key}", x3d_rules.RULES, state)
        out[key] = transform(state[torch_key])
    return out


def assert_same_run(edge, jax_logits, jax_params, torch_logits, torch_model, atol=2e-4,
                    moved=True):
    """Every step's scored logits and the final norm parameters agree, and (`moved`) the
    parameters moved: the comparison is not of two unadapted models."""
    for step, (ours, theirs) in enumerate(zip(jax_logits, torch_logits)):
        np.testing.assert_allclose(ours, theirs, atol=atol, rtol=1e-3, err_msg=f"step {step}")
    ours = jax.device_get(jax_params)
    theirs = torch_norm_params(torch_model, sorted(ours))
    for key, value in ours.items():
        np.testing.assert_allclose(value, theirs[key], atol=atol, rtol=1e-3, err_msg=key)
    change = max(np.max(np.abs(ours[k] - edge.source_norm_affine[k])) for k in ours)
    assert change > 1e-4 if moved else change == 0.0


def method(name: str, edge: Adaptable, foundation=None, clean=(), **settings):
    adapt = tiny_config("", "adapt").adapt
    for key in ("tent", "eata", "sar"):
        adapt[key].learning_rate = LR
    adapt.cema.update(edge_learning_rate=LR, foundation_learning_rate=LR)
    implementation = adapt.variants[name].method if name in adapt.variants else name
    if settings:
        adapt[implementation].update(settings)
    mesh = parallel.make_mesh(1)
    context = Context(name, mesh, 0, BATCH, foundation=lambda: foundation,
                      clean_batches=lambda split, count: iter(
                          parallel.to_global(c, mesh) for c in clean))
    return tta.build(adapt, name, edge, context), mesh


def run_jax(m, mesh, batches):
    results = [m.process(parallel.to_global(b, mesh)) for b in batches]
    return [r.logits for r in results], results


def test_norm_and_tent_equal_their_reference(models, batches):
    torch_edge, edge = models[0], models[1]
    norm, mesh = method("norm", edge)
    reference, _ = configure(torch_edge)
    with torch.no_grad():
        expected = [reference(torch_input(b)).numpy() for b in batches]
    np.testing.assert_allclose(run_jax(norm, mesh, batches)[0], expected, atol=2e-4, rtol=1e-3)

    tent, mesh = method("tent", edge)
    reference, params = configure(torch_edge)
    optimizer = torch.optim.SGD(params, LR, momentum=0.9)
    expected = []
    for b in batches:  # Tent's forward_and_adapt: predict, entropy, backward, step
        logits = reference(torch_input(b))
        entropy(logits).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(logits.detach().numpy())
    ours, _ = run_jax(tent, mesh, batches)
    assert_same_run(edge, ours, tent.state["params"], expected, reference)
    assert not np.allclose(ours[-1], run_jax(norm, mesh, batches[-1:])[0][0], atol=1e-3)


def test_eata_equals_its_reference(models, batches):
    torch_edge, edge = models[0], models[1]
    e0 = MARGIN * math.log(CLASSES)
    d_margin = 0.05 * math.sqrt(1000 / CLASSES)
    clean = batches[:2]
    # EATA weights each clip's entropy by exp(E0 - H), up to exp(E0) = 4.3 here: a quarter
    # of Tent's rate keeps its steps as large as Tent's. At Tent's rate the two sides part
    # by 5e-3 in the logits at the fourth step on an Intel Xeon CPU (1e-4 before it, the
    # same clips selected at every step; within 2e-4 on AMD EPYC): rounding amplified.
    lr = LR / 4
    eata, mesh = method("eata", edge, clean=clean, fisher_clips=2 * BATCH,
                        redundancy_margin=round(d_margin, 2), margin_reference_classes=0,
                        fisher_alpha=50.0, margin_factor=MARGIN, learning_rate=lr)
    d_margin = round(d_margin, 2)
    # The authors' Fisher: squared gradients of the cross-entropy to the model's own
    # predictions, per clean batch, averaged over the batches.
    reference, params = configure(torch_edge)
    fishers = [torch.zeros_like(p) for p in params]
    for b in clean:
        logits = reference(torch_input(b))
        F.cross_entropy(logits, logits.argmax(1)).backward()
        for f, p in zip(fishers, params):
            f += p.grad.detach() ** 2
            p.grad = None
    fishers = [f / len(clean) for f in fishers]
    anchors = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr, momentum=0.9)
    probs_ema, expected, chosen = None, [], []
    for b in batches:  # forward_and_adapt_eata
        logits = reference(torch_input(b))
        ent = entropy(logits)
        ids1 = torch.where(ent < e0)[0]
        kept = ent[ids1]
        if probs_ema is not None:
            cos = F.cosine_similarity(probs_ema[None], logits[ids1].softmax(1), dim=1)
            ids2 = torch.where(cos.abs() < d_margin)[0]
            kept, selected = kept[ids2], logits[ids1][ids2]
            ids1 = ids1[ids2]
        else:
            selected = logits[ids1]
        mask = np.zeros(len(logits), bool)
        mask[ids1.numpy()] = True
        chosen.append(mask)
        if len(selected):
            new = selected.softmax(1).mean(0).detach()
            probs_ema = new if probs_ema is None else 0.9 * probs_ema + 0.1 * new
        loss = (kept * torch.exp(e0 - kept.detach())).mean()
        loss = loss + sum(50.0 * (f * (p - a) ** 2).sum() for f, p, a in zip(fishers, params, anchors))
        if len(kept):
            loss.backward()
            optimizer.step()
        optimizer.zero_grad()
        expected.append(logits.detach().numpy())
    ours, results = run_jax(eata, mesh, batches)
    assert sum(r.learned_from.sum() for r in results) > 0  # the filters let clips through
    for step, (r, mask) in enumerate(zip(results, chosen)):  # the same clips, each step
        np.testing.assert_array_equal(np.asarray(r.learned_from, bool), mask, f"step {step}")
    assert_same_run(edge, ours, eata.state["params"], expected, reference)


def torch_sar(torch_edge, batches, bound):
    """SAR's forward_and_adapt_sar (SAM's two steps) then SAR.forward's reset rule, as the
    authors' code; returns the scored logits, the model, the loss average after each
    batch and the number of resets."""
    e0, rho = MARGIN * math.log(CLASSES), 0.05
    reference, params = configure(torch_edge)
    source_state = copy.deepcopy(reference.state_dict())
    optimizer = torch.optim.SGD(params, LR, momentum=0.9)
    ema, expected, emas, resets = None, [], [], 0
    for b in batches:
        x = torch_input(b)
        logits = reference(x)
        ent = entropy(logits)
        ids1 = torch.where(ent < e0)[0]
        ent[ids1].mean().backward()
        grad_norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2)
        old = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.add_(p.grad * (rho / (grad_norm + 1e-12)))
                p.grad = None
        ent2 = entropy(reference(x))[ids1]
        second = ent2[torch.where(ent2 < e0)[0]].mean()
        if not np.isnan(second.item()):
            ema = second.item() if ema is None else 0.9 * ema + 0.1 * second.item()
        second.backward()
        with torch.no_grad():
            for p, o in zip(params, old):
                p.data = o
        optimizer.step()
        optimizer.zero_grad()
        if ema is not None and ema < bound:  # the parameters go back; momentum, ema stay
            reference.load_state_dict(source_state, strict=False)
            resets += 1
        expected.append(logits.detach().numpy())
        emas.append(ema)
    return expected, reference, emas, resets


def test_sar_equals_its_reference(models, batches):
    """One run through both of SAR's paths: the reset bound is set between the loss
    average after the second and the third batch, so the first two batches adapt and the
    last two reset (parameters to the source; momentum and the average carry over)."""
    torch_edge, edge = models[0], models[1]
    _, _, emas, _ = torch_sar(torch_edge, batches, bound=-1.0)  # the averages, never reset
    assert emas[2] < emas[1], emas  # falling: a bound between them resets from batch 3 on
    bound = (emas[1] + emas[2]) / 2
    expected, reference, _, resets = torch_sar(torch_edge, batches, bound)
    sar, mesh = method("sar", edge, reset_loss_ema=bound, margin_factor=MARGIN)
    ours, results = run_jax(sar, mesh, batches)
    assert [r.self_resets for r in results] == [0, 0, 1, 1] and resets == 2
    # SAM's ascent step makes SAR the most sensitive to rounding: a wider tolerance. The
    # last batch reset: its parameters are the source's again.
    assert_same_run(edge, ours, sar.state["params"], expected, reference, atol=6e-4,
                    moved=False)
    unadapted, _ = configure(torch_edge)
    with torch.no_grad():  # batch 1 was scored by the model batch 0 had adapted
        assert not np.allclose(ours[1], unadapted(torch_input(batches[1])).numpy(), atol=1e-3)


def test_cema_cloud_step_equals_its_reference(models, batches):
    """One CEMA cloud step on 8 new + 8 replayed clips, as the authors' `infer`: the
    foundation model by weighted entropy on the new clips, then the edge copy by weighted
    entropy plus distillation from the updated foundation model, on new + replayed."""
    torch_edge, edge, torch_cloud, cloud_model = models
    e0 = 0.4 * math.log(CLASSES)
    m, mesh = method("cloud_all", edge, foundation=cloud_model, new_per_step=8,
                     replay_per_step=8, replay_from=16)
    new, replay = batches[0], batches[1]
    loss = m.cloud._run_step(new, replay)

    foundation, f_params = configure(torch_cloud)
    student, s_params = configure(torch_edge)
    f_opt = torch.optim.SGD(f_params, LR, momentum=0.9)
    s_opt = torch.optim.SGD(s_params, LR, momentum=0.9)
    ent = entropy(foundation(torch_input(new)))
    (ent * torch.exp(e0 - ent.detach())).mean().backward()
    f_opt.step()
    both = torch.cat([torch_input(new), torch_input(replay)])
    with torch.no_grad():
        target = foundation(both)
    source = student(both)
    ent_s, ent_t = entropy(source), entropy(target)
    w_t = torch.exp(e0 - ent_t)
    kl = F.kl_div(F.log_softmax(source, -1), F.softmax(target, -1), reduction="none").sum(-1)
    ce = F.cross_entropy(source, target.argmax(-1), reduction="none")
    expected_loss = (3.0 * (ent_s * torch.exp(e0 - ent_s.detach())).mean()
                     + 3.0 * (kl * w_t).mean() + 1.0 * (ce * w_t).mean())
    expected_loss.backward()
    s_opt.step()
    np.testing.assert_allclose(loss, expected_loss.item(), rtol=1e-4)
    ours = jax.device_get(m.cloud.state["edge"])
    theirs = torch_norm_params(student, sorted(ours))
    for key, value in ours.items():
        np.testing.assert_allclose(value, theirs[key], atol=2e-5, rtol=1e-4, err_msg=key)


def torch_lame(unary, features, knn=5, steps=100):
    """LAME as the paper and fiveai/LAME state it: a Gaussian affinity whose width is the
    mean distance to the k-th nearest clip (itself counted), then bound updates
    y <- softmax(-unary + W y) until the energy's relative change is <= 1e-8."""
    features = F.normalize(features, dim=-1)
    distance = torch.cdist(features, features)
    width = distance.sort(-1).values[:, knn - 1].mean()
    kernel = torch.exp(-distance ** 2 / (2 * width ** 2))
    y, old = (-unary).softmax(-1), float("inf")
    for i in range(steps):
        pairwise = kernel @ y
        y = (-unary + pairwise).softmax(-1)
        energy = (unary * y - pairwise * y + y * torch.log(y.clamp_min(1e-20))).sum().item()
        if i > 1 and abs(energy - old) <= 1e-8 * abs(old):
            break
        old = energy
    return y


def test_lame_equals_its_reference(models, batches):
    """LAME on the source model (eval mode: running statistics, as the authors' code):
    the same assignments from the same logits and pooled features."""
    torch_edge, edge = models[0], models[1]
    lame, mesh = method("lame", edge)
    reference = copy.deepcopy(torch_edge).eval()
    pooled = {}
    reference.blocks[-1].pool.register_forward_hook(
        lambda module, args, out: pooled.update(features=out.flatten(1)))
    for b in batches[:2]:
        with torch.no_grad():
            logits = reference(torch_input(b))
            expected = torch_lame(-torch.log(logits.softmax(1) + 1e-10), pooled["features"])
        ours = np.exp(lame.process(parallel.to_global(b, mesh)).logits)
        np.testing.assert_allclose(ours, expected.numpy(), atol=2e-4)
    # The random model is too sure of itself for LAME to move its labels; on unsure
    # logits and clustered features it must, and the same way as the reference.
    from dmd_jax.tta import lame as lame_module

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    features = np.repeat(centres, 8, axis=0) + 0.3 * rng.normal(size=(24, 16))
    logits = 0.5 * rng.normal(size=(24, CLASSES))
    ours = lame_module.laplacian_assignment(
        jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)),
        lame_module.affinity(lame_module.normalize(jnp.asarray(features, jnp.float32)), "rbf", 5),
        1.0, 100)
    expected = torch_lame(-torch.log(torch.tensor(logits).softmax(1) + 1e-10),
                          torch.tensor(features)).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert np.mean(expected.argmax(1) != logits.argmax(1)) > 0.2  # the labels moved
    for cluster in expected.argmax(1).reshape(3, 8):  # towards one label per cluster
        assert np.bincount(cluster).max() >= 6


def test_vitta_equals_its_reference(models, batches):
    """ViTTA as wlin-at/ViTTA's defaults state it, for three batches: source running
    statistics in the forward pass, every parameter adapting by SGD with weight decay,
    the moving average (from 0) of the last two stages' BatchNorm output statistics
    aligned with the clean clips' by L1, plus 0.1 x the views' L1 prediction consistency.
    Both sides get the same two augmented views of each batch (dmd_jax's `augment`): the
    comparison is of the algorithm, not of a random crop."""
    from dmd_jax.tta import vitta

    torch_edge, edge = models[0], models[1]
    clean = batches[:2]
    m, mesh = method("vitta", edge, clean=clean, learning_rate=LR)
    cfg = m.cfg
    reference = copy.deepcopy(torch_edge).eval()
    norms = [module for block in reference.blocks[3:5] for module in block.modules()
             if isinstance(module, torch.nn.BatchNorm3d)]
    assert len(norms) == len(m._source_stats)
    outputs = {}
    for i, module in enumerate(norms):
        module.register_forward_hook(lambda mod, args, out, i=i: outputs.update({i: out}))

    def statistics():
        return [(outputs[i].mean((0, 2, 3, 4)), outputs[i].var((0, 2, 3, 4), unbiased=False))
                for i in range(len(norms))]

    source = []
    with torch.no_grad():
        for b in clean:
            reference(torch_input(b))
            source.append(statistics())
    source = [(torch.stack([s[i][0] for s in source]).mean(0),
               torch.stack([s[i][1] for s in source]).mean(0)) for i in range(len(norms))]
    optimizer = torch.optim.SGD(reference.parameters(), LR, momentum=0.9, weight_decay=5e-4)
    ema = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in source]
    expected, expected_loss = [], []
    for step, b in enumerate(batches[:3]):
        with torch.no_grad():
            expected.append(reference(torch_input(b)).numpy())
        views = np.concatenate([np.asarray(vitta.augment(
            jnp.asarray(b), jax.random.fold_in(jax.random.key(0), step * 2 + v),
            cfg.min_frames_fraction, cfg.min_crop_fraction)) for v in range(2)])
        logits = reference(torch_input(views))
        ema = [(0.1 * mean + 0.9 * old_mean.detach(), 0.1 * var + 0.9 * old_var.detach())
               for (mean, var), (old_mean, old_var) in zip(statistics(), ema)]
        align = sum((mean - src_mean).abs().mean() + (var - src_var).abs().mean()
                    for (mean, var), (src_mean, src_var) in zip(ema, source))
        probs = logits.softmax(-1).reshape(2, BATCH, -1)
        consistency = (probs - probs.mean(0)).abs().sum() / 2 / BATCH  # theirs: batch 1
        loss = align + 0.1 * consistency
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        expected_loss.append(loss.item())
    ours, results = run_jax(m, mesh, batches[:3])
    np.testing.assert_allclose([r.loss for r in results], expected_loss, rtol=1e-3)
    for step, (a, b) in enumerate(zip(ours, expected)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-3, err_msg=f"step {step}")
    unadapted = np.asarray(edge.model.apply(edge.model.variables, jnp.asarray(batches[2]))[0])
    assert not np.allclose(ours[2], unadapted, atol=1e-3)  # the model moved


def test_float32_gradients_drift_no_more_than_pytorchs(models, batches):
    """Tent's gradient in float32 against float64, the same float32 input on both sides:
    dmd_jax's error is at most twice PyTorch's (the E[x^2]-E[x]^2 variance of Flax's
    BatchNorm is not used: test-time BatchNorm computes the variance in two passes)."""
    torch_edge, edge = models[0], models[1]
    clips = batches[0]

    def jax_gradient(dtype):
        cast = lambda t: jax.tree.map(  # noqa: E731
            lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype,
                                                             jnp.floating) else a, t)
        affine, constants = cast(edge.source_norm_affine), cast(edge.constants())
        loss = lambda p: jnp.mean(entropy_jax(edge.logits(p, constants, jnp.asarray(clips))))  # noqa: E731
        grads = jax.jit(jax.grad(loss))(affine)
        return np.concatenate([np.asarray(grads[k], np.float64).ravel() for k in sorted(grads)])

    def torch_gradient(dtype):
        model, params = configure(copy.deepcopy(torch_edge).to(dtype))
        grads = torch.autograd.grad(entropy(model(torch_input(clips, dtype))).mean(), params)
        return np.concatenate([g.double().numpy().ravel() for g in grads])

    with jax.enable_x64(True):
        exact = jax_gradient(jnp.float64)
    ours = np.linalg.norm(jax_gradient(jnp.float32) - exact) / np.linalg.norm(exact)
    exact_t = torch_gradient(torch.float64)
    theirs = np.linalg.norm(torch_gradient(torch.float32) - exact_t) / np.linalg.norm(exact_t)
    assert ours <= 2 * theirs + 1e-7, (ours, theirs)


def entropy_jax(logits):
    from dmd_jax import confidence
    return confidence.entropy(logits)
