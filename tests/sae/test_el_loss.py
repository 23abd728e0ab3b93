"""ELEmbeddings NF1-NF4 on hand-built 2-D geometries: zero when the axiom holds, the hand value when not."""

from __future__ import annotations


import pytest
import torch

from protsae_cli.sae.el_loss import el_losses, el_losses_from_normal_forms, standardize_centres

G = 0.1  # margin


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def L(*rows):
    return torch.tensor(rows, dtype=torch.long)


def test_nf1_ball_inside_ball_is_free_and_outside_costs_distance():
    centres = T([0.0, 0.0], [0.5, 0.0], [3.0, 0.0])
    radii = T(1.0, 2.0, 1.0)
    rel = torch.zeros(1, 2)
    inside = el_losses(centres, radii, rel, nf1=L([0, 1]))
    assert inside["nf1"].item() == 0.0
    outside = el_losses(centres, radii, rel, nf1=L([0, 2]))  # |3| + 1 - 1 - 0.1
    assert outside["nf1"].item() == pytest.approx(2.9)
    both = el_losses(centres, radii, rel, nf1=L([0, 1], [0, 2]))  # mean over axioms
    assert both["nf1"].item() == pytest.approx(1.45)
    assert both["total"].item() == pytest.approx(1.45)


def test_nf2_intersection():
    rel = torch.zeros(1, 2)
    ok = el_losses(T([0.0, 0.0], [1.0, 0.0], [0.5, 0.0]), T(1.0, 1.0, 0.3), rel, nf2=L([0, 1, 2]))
    assert ok["nf2"].item() == 0.0
    # E far from both: |E-C| - rho_C - g + |E-D| - rho_D - g = (5-1.1) + (4-1.1)
    far_e = el_losses(T([0.0, 0.0], [1.0, 0.0], [5.0, 0.0]), T(1.0, 1.0, 0.3), rel, nf2=L([0, 1, 2]))
    assert far_e["nf2"].item() == pytest.approx(3.9 + 2.9)
    # C and D disjoint too: adds |C-D| - rho_C - rho_D - g = 10 - 2.1
    disjoint = el_losses(T([0.0, 0.0], [10.0, 0.0], [5.0, 0.0]), T(1.0, 1.0, 0.3), rel, nf2=L([0, 1, 2]))
    assert disjoint["nf2"].item() == pytest.approx(7.9 + 3.9 + 3.9)


def test_nf3_existential_left_translates_c_by_relation():
    centres = T([0.0, 0.0], [2.0, 0.0])
    radii = T(0.5, 1.0)
    ok = el_losses(centres, radii, T([2.0, 0.0]), nf3=L([0, 0, 1]))
    assert ok["nf3"].item() == 0.0
    bad = el_losses(centres, radii, T([-2.0, 0.0]), nf3=L([0, 0, 1]))  # |C+v-D| = 4; 4 + .5 - 1 - .1
    assert bad["nf3"].item() == pytest.approx(3.4)


def test_nf4_existential_right_translates_d_by_relation():
    centres = T([3.0, 0.0], [0.0, 0.0])
    radii = T(0.5, 0.5)
    ok = el_losses(centres, radii, T([3.0, 0.0]), nf4=L([0, 0, 1]))
    assert ok["nf4"].item() == 0.0
    bad = el_losses(centres, radii, T([-3.0, 0.0]), nf4=L([0, 0, 1]))  # |C-(D+v)| = 6; 6 - .5 - .5 - .1
    assert bad["nf4"].item() == pytest.approx(4.9)


def test_nf4_uses_class_radius_not_relation_index():
    # DeepGO-SE reads C's radius at the relation column; here R=1 would pick class 1's radius (0.1).
    centres = T([0.0, 0.0], [9.0, 9.0], [3.0, 0.0])
    radii = T(2.0, 0.1, 0.5)
    rel = torch.zeros(2, 2)
    out = el_losses(centres, radii, rel, nf4=L([0, 1, 2]))
    assert out["nf4"].item() == pytest.approx(3.0 - 2.0 - 0.5 - G)


def test_radius_sign_is_ignored():
    centres = T([0.0, 0.0], [0.5, 0.0])
    rel = torch.zeros(1, 2)
    a = el_losses(centres, T(1.0, 2.0), rel, nf1=L([0, 1], [1, 0]))
    b = el_losses(centres, T(-1.0, -2.0), rel, nf1=L([0, 1], [1, 0]))
    assert a["nf1"].item() == pytest.approx(b["nf1"].item())


def test_empty_normal_forms_give_zero():
    centres = torch.randn(4, 3, requires_grad=True)
    out = el_losses(centres, torch.ones(4), torch.zeros(1, 3),
                    nf1=torch.empty(0, 2, dtype=torch.long), nf2=None, nf3=torch.empty(0, 3, dtype=torch.long))
    for k in ("nf1", "nf2", "nf3", "nf4", "total"):
        assert out[k].item() == 0.0


def test_gradient_step_reduces_violation():
    centres = T([0.0, 0.0], [3.0, 0.0]).requires_grad_()
    radii = T(1.0, 1.0).requires_grad_()
    rel = torch.zeros(1, 2)
    before = el_losses(centres, radii, rel, nf1=L([0, 1]))["total"]
    before.backward()
    with torch.no_grad():
        centres -= 0.5 * centres.grad
        radii -= 0.5 * radii.grad
    after = el_losses(centres, radii, rel, nf1=L([0, 1]))["total"]
    assert after.item() < before.item()


def test_out_of_range_index_is_an_error():
    with pytest.raises(ValueError, match="class index"):
        el_losses(torch.zeros(2, 2), torch.ones(2), torch.zeros(1, 2), nf1=L([0, 2]))
    with pytest.raises(ValueError, match="relation index"):
        el_losses(torch.zeros(2, 2), torch.ones(2), torch.zeros(1, 2), nf3=L([1, 0, 1]))


def test_standardize_centres_and_loss_finite():
    c = torch.randn(5, 4) * 3 + 7
    s = standardize_centres(c)
    assert torch.allclose(s.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(s.var(0, unbiased=False), torch.ones(4), atol=1e-3)
    c.requires_grad_()
    out = el_losses(c, torch.ones(5), torch.zeros(2, 4), nf1=L([0, 1]), nf2=L([0, 1, 2]),
                    nf3=L([1, 2, 3]), nf4=L([3, 0, 4]), standardize=True)
    out["total"].backward()
    assert torch.isfinite(c.grad).all()


def test_from_normal_forms_object():
    from protsae_cli.labels.ontology import NormalForms

    nf = NormalForms(class_ids=["A", "B", "C"], relation_ids=["part_of"], nf1=L([0, 2]),
                     nf2=torch.empty(0, 3, dtype=torch.long), nf3=torch.empty(0, 3, dtype=torch.long),
                     nf4=L([1, 0, 2]))
    centres = T([0.0, 0.0], [5.0, 0.0], [0.0, 0.0])
    out = el_losses_from_normal_forms(nf, centres, T(1.0, 1.0, 1.0), T([0.0, 0.0]))
    assert out["nf1"].item() == 0.0
    assert out["nf4"].item() == pytest.approx(5.0 - 2.0 - G)
