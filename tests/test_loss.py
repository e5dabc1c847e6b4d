"""Reranker losses and group metrics (rows group-major, positives first).

Every loss is checked in value and gradient against a reference written here from its published definition
(loops over groups and pairs on float64 scalars, never our module), and where sentence-transformers 6.3.0 has the
loss, against its own class driven with fixed logits through a stand-in CrossEncoder.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from megarank.training.loss import LOSS_NAMES, NEEDS_TEACHER, group_loss, group_metrics

# Two groups of 3 passages: [positive, negative, negative].
SCORES = [[2.0, 1.0, 0.5], [-1.0, 0.25, 3.0]]
ONE_POS = [[1.0, 0.0, 0.0]] * 2

# G=3 groups of n=5: graded, single positive, several positives of one grade.
REL = [[2.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]]
G, N = 3, 5


def _flat(rows, column=True, dtype=torch.float32):
    t = torch.tensor(rows, dtype=dtype).reshape(-1)
    return t.unsqueeze(1) if column else t  # the model returns [G*n, 1]


def _rel(rows):
    return torch.tensor(rows, dtype=torch.float32)


def _random(seed, shape=(G * N, 1)):
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_(True)


def _teacher(seed=7):
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(G, N, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Naive references: loops over groups / pairs on 0-d float64 tensors (so autograd gives reference gradients).
# s: [G, n] float64 tensor (requires grad), rel / t: nested lists of floats.

def _log_softmax(row):
    lse = torch.log(sum(torch.exp(x) for x in row))
    return [x - lse for x in row]


def _softmax_list(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [x / sum(e) for x in e]


def _log2_sigmoid(x):
    return torch.log(1.0 / (1.0 + torch.exp(-x))) / math.log(2.0)


def ref_listwise(s, rel):
    losses = []
    for row, labels in zip(s, rel):
        pos = [i for i, r in enumerate(labels) if r > 0]
        ls = _log_softmax(row)
        losses.append(-sum(ls[i] for i in pos) / len(pos))
    return sum(losses) / len(losses)


def ref_pointwise(s, rel):
    losses = []
    for row, labels in zip(s, rel):
        per = []
        for x, r in zip(row, labels):
            p = 1.0 / (1.0 + torch.exp(-x))
            y = 1.0 if r > 0 else 0.0
            per.append(-(y * torch.log(p) + (1 - y) * torch.log(1 - p)))
        losses.append(sum(per) / len(per))
    return sum(losses) / len(losses)


def ref_kl(s, t, temperature):
    losses = []
    for row, trow in zip(s, t):
        p = _softmax_list([x / temperature for x in trow])
        ls = _log_softmax(row)
        losses.append(sum(pi * (math.log(pi) - lq) for pi, lq in zip(p, ls)))
    return sum(losses) / len(losses)


def ref_margin_mse(s, t):
    losses = []
    for row, trow in zip(s, t):
        per = [((row[0] - row[j]) - (trow[0] - trow[j])) ** 2 for j in range(1, len(row))]
        losses.append(sum(per) / len(per))
    return sum(losses) / len(losses)


def ref_mse(s, t):
    losses = [sum((x - y) ** 2 for x, y in zip(row, trow)) / len(row) for row, trow in zip(s, t)]
    return sum(losses) / len(losses)


def ref_listnet(s, rel):
    losses = []
    for row, labels in zip(s, rel):
        target = _softmax_list(labels)
        losses.append(-sum(p * lq for p, lq in zip(target, _log_softmax(row))))
    return sum(losses) / len(losses)


def ref_plistmle(s, rel):
    """Position-aware ListMLE (Lan et al. 2014) with ST's default weights 2^(n-r) - 1 normalised to sum 1 (+1e-10);
    the target permutation sorts by label, descending; Python's sort is stable: ties keep input order."""
    losses = []
    for row, labels in zip(s, rel):
        n = len(row)
        perm = sorted(range(n), key=lambda i: -labels[i])
        w = [2.0 ** (n - r) - 1.0 for r in range(1, n + 1)]
        w = [x / (sum(w) + 1e-10) for x in w]
        loss = 0.0
        for r in range(n):
            rest = torch.log(sum(torch.exp(row[perm[k]]) for k in range(r, n)))
            loss = loss - w[r] * (row[perm[r]] - rest)
        losses.append(loss)
    return sum(losses) / len(losses)


def ref_lambda(s, rel, mu=10.0):
    """LambdaLoss (Wang et al. 2018), NDCG-Loss2++: positions in the model's ranking, D(r) = log2(1 + r),
    G = (2^rel - 1) / maxDCG, weight |G_i - G_j| (mu |1/D(|i-j|) - 1/D(|i-j|+1)| + |1/D(i) - 1/D(j)|),
    loss -weight log2 sigmoid(s_i - s_j) over rank pairs with rel_i > rel_j; mean over a group's pairs."""
    D = lambda r: math.log2(1.0 + r)  # noqa: E731
    losses = []
    for row, labels in zip(s, rel):
        n = len(row)
        ranking = sorted(range(n), key=lambda i: -row[i].item())
        max_dcg = sum((2.0 ** y - 1.0) / D(r) for r, y in enumerate(sorted(labels, reverse=True), start=1))
        gain = [(2.0 ** labels[d] - 1.0) / max_dcg for d in ranking]
        terms = []
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                di, dj = ranking[i - 1], ranking[j - 1]
                if labels[di] <= labels[dj]:
                    continue
                delta = abs(1.0 / D(abs(i - j)) - 1.0 / D(abs(i - j) + 1))
                w = abs(gain[i - 1] - gain[j - 1]) * (mu * delta + abs(1.0 / D(i) - 1.0 / D(j)))
                terms.append(-w * _log2_sigmoid(row[di] - row[dj]))
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


def ref_ranknet(s, rel):
    losses = []
    for row, labels in zip(s, rel):
        terms = [-_log2_sigmoid(row[i] - row[j]) for i in range(len(row)) for j in range(len(row)) if labels[i] > labels[j]]
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses)


REFERENCES = {
    "listwise": lambda s, rel, t: ref_listwise(s, rel),
    "pointwise": lambda s, rel, t: ref_pointwise(s, rel),
    "kl": lambda s, rel, t: ref_kl(s, t, 1.0),
    "margin_mse": lambda s, rel, t: ref_margin_mse(s, t),
    "mse": lambda s, rel, t: ref_mse(s, t),
    "listnet": lambda s, rel, t: ref_listnet(s, rel),
    "plistmle": lambda s, rel, t: ref_plistmle(s, rel),
    "lambda": lambda s, rel, t: ref_lambda(s, rel),
    "ranknet": lambda s, rel, t: ref_ranknet(s, rel),
}


def _check_against_reference(name, ref, scores, rel_rows, teacher=None, **kw):
    got = group_loss(name, scores, _rel(rel_rows), teacher, **kw)
    (g_got,) = torch.autograd.grad(got, scores)
    t_rows = teacher.tolist() if teacher is not None else None
    expected = ref(scores.reshape(len(rel_rows), -1), rel_rows, t_rows)
    (g_ref,) = torch.autograd.grad(expected, scores)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-12, msg=f"{name} value")
    torch.testing.assert_close(g_got, g_ref, rtol=1e-9, atol=1e-12, msg=f"{name} gradient")


def test_the_loss_names_and_the_teacher_losses():
    assert LOSS_NAMES == ("listwise", "pointwise", "kl", "margin_mse", "mse", "listnet", "plistmle", "lambda", "ranknet")
    assert NEEDS_TEACHER == {"kl", "margin_mse", "mse"}
    assert set(REFERENCES) == set(LOSS_NAMES)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_loss_matches_its_reference_in_value_and_gradient(name, seed):
    teacher = _teacher(seed + 11) if name in NEEDS_TEACHER else None
    _check_against_reference(name, REFERENCES[name], _random(seed), REL, teacher)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_kl_puts_the_temperature_on_the_teacher_only_without_a_t_squared_factor(temperature):
    _check_against_reference("kl", lambda s, rel, t: ref_kl(s, t, temperature), _random(3), REL, _teacher(),
                             teacher_temperature=temperature)


def test_kl_has_the_gradients_of_flagembeddings_soft_label_cross_entropy():
    """KL(p_t || p_s) = -sum p_t log p_s - H(p_t): FlagEmbedding's soft CE (AbsModeling.py:91) minus a constant."""
    scores, teacher = _random(4), _teacher()
    kl = group_loss("kl", scores, _rel(REL), teacher)
    p_t = teacher.softmax(dim=1)
    soft_ce = -(torch.log_softmax(scores.reshape(G, N), dim=1) * p_t).sum(dim=1).mean()
    entropy = -(p_t * p_t.log()).sum(dim=1).mean()
    torch.testing.assert_close(kl, soft_ce - entropy, rtol=1e-10, atol=1e-12)
    g_kl, g_ce = (torch.autograd.grad(x, scores)[0] for x in (kl, soft_ce))
    torch.testing.assert_close(g_kl, g_ce, rtol=1e-10, atol=1e-12)


def test_plistmle_ranks_by_relevance_with_ties_in_input_order_even_when_positives_are_not_sorted_by_grade():
    rel = [[1.0, 2.0, 0.0, 0.0, 0.0], [1.0, 3.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]]
    _check_against_reference("plistmle", REFERENCES["plistmle"], _random(5), rel)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_is_the_mean_over_groups_of_the_loss_of_each_group(name):
    scores, rel = _random(6), _rel(REL)
    teacher = _teacher() if name in NEEDS_TEACHER else None
    whole = group_loss(name, scores, rel, teacher)
    per_group = [group_loss(name, scores[g * N:(g + 1) * N], rel[g:g + 1], None if teacher is None else teacher[g:g + 1])
                 for g in range(G)]
    torch.testing.assert_close(whole, torch.stack(per_group).mean(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Distillation: teacher required, mixing with the hard-label listwise CE.

@pytest.mark.parametrize("name", sorted(NEEDS_TEACHER))
def test_a_teacher_loss_without_a_teacher_is_a_value_error_naming_the_loss(name):
    with pytest.raises(ValueError, match=name):
        group_loss(name, torch.zeros(G * N), _rel(REL))


@pytest.mark.parametrize("name", sorted(NEEDS_TEACHER))
def test_distill_weight_mixes_the_distillation_loss_with_the_hard_label_listwise_loss(name):
    scores, rel, teacher = _random(8), _rel(REL), _teacher()
    distill = group_loss(name, scores, rel, teacher)
    hard = group_loss("listwise", scores, rel)
    mixed = group_loss(name, scores, rel, teacher, distill_weight=0.3)
    torch.testing.assert_close(mixed, 0.3 * distill + 0.7 * hard, rtol=1e-12, atol=1e-12)
    g_mixed, g_d, g_h = (torch.autograd.grad(x, scores)[0] for x in (mixed, distill, hard))
    torch.testing.assert_close(g_mixed, 0.3 * g_d + 0.7 * g_h, rtol=1e-12, atol=1e-12)
    assert group_loss(name, scores, rel, teacher, distill_weight=0.0).item() == hard.item()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="distill_weight"):
            group_loss(name, scores, rel, teacher, distill_weight=bad)


def test_unknown_names_and_bad_temperatures_are_rejected():
    with pytest.raises(ValueError, match="unknown loss"):
        group_loss("hinge", torch.zeros(G * N), _rel(REL))
    with pytest.raises(ValueError, match="teacher_temperature"):
        group_loss("kl", torch.zeros(G * N), _rel(REL), _teacher(), teacher_temperature=0.0)


# ---------------------------------------------------------------------------------------------------------------
# listwise / pointwise: today's behaviour with one positive first.

def _listwise_by_hand(rows):
    losses = [-(row[0] - math.log(sum(math.exp(s) for s in row))) for row in rows]
    return sum(losses) / len(losses)


def _bce(logit, label):
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


@pytest.mark.parametrize("column", [True, False], ids=["[G*n,1]", "[G*n]"])
def test_listwise_loss_is_softmax_cross_entropy_with_the_positive_as_target(column):
    loss = group_loss("listwise", _flat(SCORES, column), _rel(ONE_POS))
    assert loss.item() == pytest.approx(_listwise_by_hand(SCORES), rel=1e-6)
    # the first group by hand, digit by digit: -log(e^2 / (e^2 + e^1 + e^0.5))
    assert group_loss("listwise", _flat(SCORES[:1]), _rel(ONE_POS[:1])).item() == pytest.approx(0.4643688, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_listwise_with_one_positive_is_exactly_cross_entropy_with_target_0(dtype):
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(4 * 6, 1, generator=g).to(dtype).requires_grad_(True)
    rel = torch.zeros(4, 6)
    rel[:, 0] = torch.tensor([1.0, 2.0, 1.0, 3.0])  # one positive of any grade
    ours = group_loss("listwise", scores, rel)
    (g_ours,) = torch.autograd.grad(ours, scores)
    today = F.cross_entropy(scores.reshape(4, 6).float(), torch.zeros(4, dtype=torch.long))
    (g_today,) = torch.autograd.grad(today, scores)
    assert torch.equal(ours, today) and torch.equal(g_ours, g_today)


def test_listwise_gradient_is_softmax_minus_the_uniform_target_over_the_positives():
    scores = _flat(SCORES).requires_grad_(True)
    group_loss("listwise", scores, _rel(ONE_POS)).backward()
    expected = torch.softmax(torch.tensor(SCORES), dim=1)
    expected[:, 0] -= 1.0
    torch.testing.assert_close(scores.grad.reshape(2, 3), expected / 2, rtol=1e-6, atol=1e-7)
    # two positives of different grades: target 1/2 each, whatever the grade
    scores = _flat(SCORES).requires_grad_(True)
    group_loss("listwise", scores, _rel([[2.0, 1.0, 0.0], [1.0, 0.0, 0.0]])).backward()
    expected = torch.softmax(torch.tensor(SCORES), dim=1)
    expected[0, :2] -= 0.5
    expected[1, 0] -= 1.0
    torch.testing.assert_close(scores.grad.reshape(2, 3), expected / 2, rtol=1e-6, atol=1e-7)


def test_listwise_loss_of_equal_scores_is_log_group_size_and_does_not_depend_on_a_shift():
    rel = torch.zeros(2, 5)
    rel[:, 0] = 1.0
    assert group_loss("listwise", torch.zeros(10, 1), rel).item() == pytest.approx(math.log(5), rel=1e-6)
    # two positives: the cross-entropy to the uniform target over them, -(log(1/5) + log(1/5)) / 2, is still log 5
    # (not -log P(a positive) = log(5/2))
    rel[1, :2] = 1.0
    assert group_loss("listwise", torch.zeros(10, 1), rel).item() == pytest.approx(math.log(5), rel=1e-6)
    shifted = [[s + 100.0 for s in row] for row in SCORES]
    assert group_loss("listwise", _flat(shifted), _rel(ONE_POS)).item() == pytest.approx(_listwise_by_hand(SCORES), rel=1e-5)


def test_pointwise_loss_is_bce_with_label_one_for_the_positives_only():
    rel = [[1.0, 0.0, 0.0], [3.0, 1.0, 0.0]]
    loss = group_loss("pointwise", _flat(SCORES), _rel(rel))
    by_hand = [_bce(s, 1.0 if r > 0 else 0.0) for row, lr in zip(SCORES, rel) for s, r in zip(row, lr)]
    assert loss.item() == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-6)


def test_rows_not_matching_the_groups_are_rejected():
    with pytest.raises(ValueError, match="7 scores"):
        group_loss("listwise", torch.zeros(7, 1), _rel([[1.0, 0.0, 0.0]] * 2))
    with pytest.raises(ValueError, match="teacher"):
        group_loss("mse", torch.zeros(6, 1), _rel([[1.0, 0.0, 0.0]] * 2), torch.zeros(2, 4))


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bf16_scores_give_a_float32_loss_and_bf16_gradients(name):
    scores = _random(10).detach().to(torch.bfloat16).requires_grad_(True)
    teacher = _teacher().float() if name in NEEDS_TEACHER else None
    loss = group_loss(name, scores, _rel(REL), teacher)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, scores)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    # the same as the float32 computation on the same (bf16-representable) values
    ref = group_loss(name, scores.detach().float(), _rel(REL), teacher)
    assert loss.item() == ref.item()
    assert group_loss(name, scores.detach().half(), _rel(REL), teacher).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Metrics.

def test_group_metrics_accuracy_and_mrr_count_ties_against_the_positive():
    rows = [
        [3.0, 1.0, 2.0, 0.0],  # positive first: rank 1
        [1.0, 2.0, 0.0, 0.5],  # one negative above: rank 2
        [1.0, 1.0, 0.0, 0.0],  # tied with one negative: counts against -> rank 2
        [0.0, 0.0, 0.0, 0.0],  # tied with all three: rank 4
        [0.0, 1.0, 2.0, 3.0],  # last: rank 4
    ]
    m = group_metrics(_flat(rows), _rel([[1.0, 0.0, 0.0, 0.0]] * 5))
    ranks = [1, 2, 2, 4, 4]
    assert m["acc"].item() == pytest.approx(1 / 5)
    assert m["mrr"].item() == pytest.approx(sum(1 / r for r in ranks) / 5, rel=1e-6)


def test_group_metrics_use_the_best_ranked_of_several_positives_and_ties_with_negatives_count_against():
    rows = [
        [0.0, 5.0, 1.0, 2.0],  # second positive on top: rank 1
        [1.0, 0.5, 3.0, 0.0],  # best positive (1.0) below one negative: rank 2
        [2.0, 2.0, 2.0, 0.0],  # positives tied with each other and with a negative: rank 2
        [1.0, 3.0, 3.0, 4.0],  # best positive 3.0 tied with one negative, below another: rank 3
        [1.0, 1.0, 1.0, 0.0],  # one positive, tied with two negatives: rank 3
    ]
    rel = [[1.0, 2.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    m = group_metrics(_flat(rows), _rel(rel))
    ranks = [1, 2, 2, 3, 3]
    assert m["acc"].item() == pytest.approx(1 / 5)
    assert m["mrr"].item() == pytest.approx(sum(1 / r for r in ranks) / 5, rel=1e-6)


def test_group_metrics_need_no_grad_and_accept_a_flat_vector_and_bf16():
    scores = _flat(SCORES, column=False).requires_grad_(True)
    m = group_metrics(scores, _rel(ONE_POS))
    assert not m["acc"].requires_grad and not m["mrr"].requires_grad
    # group 1: positive first (rank 1); group 2: positive last (rank 3)
    assert m["acc"].item() == pytest.approx(0.5)
    assert m["mrr"].item() == pytest.approx((1 + 1 / 3) / 2)
    m = group_metrics(scores.detach().to(torch.bfloat16), _rel(ONE_POS))
    assert m["acc"].dtype == torch.float32 and m["mrr"].item() == pytest.approx((1 + 1 / 3) / 2)


# ---------------------------------------------------------------------------------------------------------------
# The peer library: sentence-transformers' own cross-encoder losses, driven with fixed logits.

@pytest.fixture(scope="module")
def st():
    """sentence-transformers' cross-encoder losses and a stand-in CrossEncoder: ``preprocess`` turns each (query,
    document) pair into the index its document string names, ``forward`` returns the given logits at those indices,
    so the loss classes run their own code on our logits (and backpropagate into them)."""
    ce = pytest.importorskip("sentence_transformers.cross_encoder", reason="sentence-transformers not installed")
    from sentence_transformers.cross_encoder import losses
    from torch import nn

    class FixedLogits(ce.CrossEncoder):
        def __init__(self, logits):
            nn.Module.__init__(self)  # no transformer behind it
            self.logits = logits

        num_labels = property(lambda self: 1)
        device = property(lambda self: self.logits.device)

        def preprocess(self, pairs, prompt=None, task=None):
            return {"index": torch.tensor([int(doc) for _, doc in pairs])}

        def forward(self, features):
            return {"scores": self.logits.reshape(-1)[features["index"]]}

    return losses, FixedLogits


def _listwise_inputs(n_groups, n):
    queries = [f"q{g}" for g in range(n_groups)]
    docs = [[str(g * n + i) for i in range(n)] for g in range(n_groups)]
    return [queries, docs]


def _st_value_and_grad(loss, scores):
    value = loss()
    return value, torch.autograd.grad(value, scores)[0]


def _ours_value_and_grad(name, scores, rel, teacher=None):
    value = group_loss(name, scores, rel, teacher)
    return value, torch.autograd.grad(value, scores)[0]


def _assert_close_f32(ours, theirs, what):
    """ST computes the listwise losses in float32 (``logits.float()``), ours here in float64."""
    torch.testing.assert_close(ours[0], theirs[0].to(ours[0].dtype), rtol=2e-6, atol=2e-6, msg=f"{what} value")
    torch.testing.assert_close(ours[1], theirs[1].to(ours[1].dtype), rtol=2e-5, atol=2e-6, msg=f"{what} gradient")


def test_the_sentence_transformers_defaults_we_follow(st):
    losses, FixedLogits = st
    from torch import nn

    model = FixedLogits(torch.zeros(1))
    assert isinstance(losses.MSELoss(model).activation_fn, nn.Identity)
    assert isinstance(losses.MarginMSELoss(model).activation_fn, nn.Identity)
    lam = losses.LambdaLoss(model)
    assert type(lam.weighting_scheme) is losses.NDCGLoss2PPScheme and lam.weighting_scheme.mu == 10.0
    assert (lam.k, lam.sigma, lam.eps, lam.reduction_log) == (None, 1.0, 1e-10, "binary")
    rn = losses.RankNetLoss(model)
    assert type(rn.weighting_scheme) is losses.NoWeightingScheme and (rn.k, rn.sigma, rn.reduction_log) == (None, 1.0, "binary")
    pl = losses.PListMLELoss(model)
    assert type(pl.lambda_weight) is losses.PListMLELambdaWeight and pl.lambda_weight.rank_discount_fn is None
    assert pl.respect_input_order is True and pl.eps == 1e-10


@pytest.mark.parametrize("name, cls", [("listnet", "ListNetLoss"), ("plistmle", "PListMLELoss")])
def test_listnet_and_plistmle_match_sentence_transformers(st, name, cls):
    losses, FixedLogits = st
    scores, rel = _random(12), _rel(REL)  # REL's groups are sorted by relevance: ST's respect_input_order applies
    loss = getattr(losses, cls)(FixedLogits(scores))
    theirs = _st_value_and_grad(lambda: loss(_listwise_inputs(G, N), list(rel)), scores)
    _assert_close_f32(_ours_value_and_grad(name, scores, rel), theirs, name)


def test_plistmle_on_groups_not_sorted_by_relevance_is_st_on_the_stably_sorted_groups(st):
    losses, FixedLogits = st
    scores = _random(13)
    rel = _rel([[1.0, 2.0, 0.0, 0.0, 0.0], [1.0, 3.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    order = rel.sort(dim=1, descending=True, stable=True).indices
    flat_order = (order + torch.arange(G)[:, None] * N).reshape(-1)
    loss = losses.PListMLELoss(FixedLogits(scores.reshape(-1)[flat_order]))
    theirs = _st_value_and_grad(lambda: loss(_listwise_inputs(G, N), list(rel.gather(1, order))), scores)
    _assert_close_f32(_ours_value_and_grad("plistmle", scores, rel), theirs, "plistmle")


@pytest.mark.parametrize("name, cls", [("lambda", "LambdaLoss"), ("ranknet", "RankNetLoss")])
def test_lambda_and_ranknet_match_sentence_transformers_per_group(st, name, cls):
    """ST averages over all valid pairs of the batch, we over each group's pairs, then over groups: equal per group,
    equal for a batch whose groups have as many pairs, and for REL (7, 4 and 6 pairs) ST's is the pair-weighted mean."""
    losses, FixedLogits = st
    scores, rel = _random(14), _rel(REL)
    # one group at a time, then the mean over groups: our reduction
    per_group = []
    for g in range(G):
        loss = getattr(losses, cls)(FixedLogits(scores[g * N:(g + 1) * N]))
        per_group.append(loss(_listwise_inputs(1, N), [rel[g]]))
    theirs = torch.stack(per_group).mean()
    theirs = (theirs, torch.autograd.grad(theirs, scores)[0])
    _assert_close_f32(_ours_value_and_grad(name, scores, rel), theirs, name)

    # groups with the same labels: ST's batch reduction is ours
    same = _rel([REL[0]] * G)
    loss = getattr(losses, cls)(FixedLogits(scores))
    theirs = _st_value_and_grad(lambda: loss(_listwise_inputs(G, N), list(same)), scores)
    _assert_close_f32(_ours_value_and_grad(name, scores, same), theirs, f"{name} same labels")

    # REL: ST weights each group by its number of valid pairs
    pairs = torch.tensor([7.0, 4.0, 6.0], dtype=torch.float64)
    ours_each = torch.stack([group_loss(name, scores[g * N:(g + 1) * N], rel[g:g + 1]) for g in range(G)])
    theirs = loss(_listwise_inputs(G, N), list(rel))
    torch.testing.assert_close((ours_each * pairs).sum() / pairs.sum(), theirs.double(), rtol=2e-6, atol=2e-6)
    assert abs(ours_each.mean().item() - theirs.item()) > 1e-3


def test_margin_mse_matches_sentence_transformers(st):
    losses, FixedLogits = st
    scores, rel, teacher = _random(15), _rel(REL), _teacher()
    loss = losses.MarginMSELoss(FixedLogits(scores))
    # (query, positive, negative_1, ..., negative_4) columns; labels the teacher's n scores (ST takes the margins)
    columns = [[f"q{g}" for g in range(G)]] + [[str(g * N + i) for g in range(G)] for i in range(N)]
    theirs = _st_value_and_grad(lambda: loss(columns, teacher), scores)
    _assert_close_f32(_ours_value_and_grad("margin_mse", scores, rel, teacher), theirs, "margin_mse")


def test_mse_matches_sentence_transformers(st):
    losses, FixedLogits = st
    scores, rel, teacher = _random(16), _rel(REL), _teacher()
    loss = losses.MSELoss(FixedLogits(scores))
    pairs = [[f"q{i // N}" for i in range(G * N)], [str(i) for i in range(G * N)]]
    theirs = _st_value_and_grad(lambda: loss(pairs, teacher.reshape(-1)), scores)
    _assert_close_f32(_ours_value_and_grad("mse", scores, rel, teacher), theirs, "mse")
