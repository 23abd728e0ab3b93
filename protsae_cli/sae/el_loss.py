"""ELEmbeddings axiom losses (normal forms NF1-NF4) on n-ball class embeddings.

ProtSAE applies these losses to the concept predictor's weight rows (METHOD.md §1.4-1.5): row c of W_pred is
the centre of concept c's ball, so the ontology's subclass, intersection and existential axioms shape the
predictor's directions, and therefore the defined latents' encoder rows, which are tied to them.

Conventions (exactly METHOD.md §1.4's table, i.e. DeepGO-SE's variant of Kulmanov et al. 2019):

- centre c_X: a row of the class table (concepts first, then zero classes), optionally standardised;
- radius rho_X = |radius parameter|, so a gradient step can never produce a negative radius;
- relation R: a translation vector v_R, and "exists R.X" is the ball of X translated by +v_R on both sides;
- margin gamma (default 0.1): an axiom counts as satisfied with gamma of slack.

| NF  | axiom            | loss per axiom                                                                      |
|-----|------------------|-------------------------------------------------------------------------------------|
| NF1 | C ⊑ D            | relu(|c_C - c_D| + rho_C - rho_D - gamma)                                            |
| NF2 | C ⊓ D ⊑ E        | relu(|c_C - c_D| - rho_C - rho_D - gamma) + relu(|c_E - c_C| - rho_C - gamma)        |
|     |                  |   + relu(|c_E - c_D| - rho_D - gamma)                                                |
| NF3 | ∃R.C ⊑ D         | relu(|c_C + v_R - c_D| + rho_C - rho_D - gamma)                                      |
| NF4 | C ⊑ ∃R.D         | relu(|c_C - (c_D + v_R)| - rho_C - rho_D - gamma)                                    |

Each NF loss is the mean over its axioms; an empty NF contributes exactly 0, so ontologies with only is_a
edges (the common residue-level case) need no special casing.

DeepGO-SE looks up C's radius in NF4 with the *relation* column of the axiom; that is a bug (it ties the
radius of an arbitrary class to the relation id). Here every radius is indexed by its class.

The optional standardisation replaces DeepGO-SE's BatchNorm1d. DeepGO-SE normalises each gathered batch
(the C column and the D column of one NF batch separately, with batch statistics), so the same class gets a
different centre depending on which side of which axiom it sits and on what else is in the batch. We
standardise the whole class table once per call (per-dimension mean and std over all classes, no learnable
affine): one consistent geometry for every axiom, well defined even when an NF has a single axiom, and the
affine scale cannot shrink to zero and collapse all balls into one point.
"""

from __future__ import annotations

from typing import Protocol

import torch

NF_NAMES = ("nf1", "nf2", "nf3", "nf4")


class NormalFormsLike(Protocol):
    """What the losses need from `protsae_cli.labels.ontology.NormalForms` (index tensors only)."""

    nf1: torch.Tensor  # [n1, 2] (C, D)
    nf2: torch.Tensor  # [n2, 3] (C, D, E)
    nf3: torch.Tensor  # [n3, 3] (R, C, D)
    nf4: torch.Tensor  # [n4, 3] (C, R, D)


def standardize_centres(centres: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-dimension zero mean, unit variance over the class table (biased variance, as BatchNorm)."""
    if centres.shape[0] < 2:
        # One class has no spread to normalise by; centring alone keeps the output finite.
        return centres - centres.mean(0, keepdim=True)
    mean = centres.mean(0, keepdim=True)
    var = centres.var(0, unbiased=False, keepdim=True)
    return (centres - mean) / torch.sqrt(var + eps)


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def _as_index(t: torch.Tensor | None, cols: int, device: torch.device) -> torch.Tensor:
    if t is None:
        return torch.empty(0, cols, dtype=torch.long, device=device)
    t = torch.as_tensor(t, device=device).long()
    if t.numel() == 0:
        return t.reshape(0, cols)
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"normal-form index tensor must be [n, {cols}], got {tuple(t.shape)}")
    return t


def check_normal_form_ranges(nf1: torch.Tensor, nf2: torch.Tensor, nf3: torch.Tensor, nf4: torch.Tensor,
                             n_classes: int, n_rel: int) -> None:
    """Fail loudly on an index past the class or relation table: torch would gather garbage on some devices."""
    for name, t, cls_cols, rel_cols in (("nf1", nf1, (0, 1), ()), ("nf2", nf2, (0, 1, 2), ()),
                                        ("nf3", nf3, (1, 2), (0,)), ("nf4", nf4, (0, 2), (1,))):
        if t.numel() == 0:
            continue
        cls_idx = t[:, list(cls_cols)]
        if int(cls_idx.min()) < 0 or int(cls_idx.max()) >= n_classes:
            raise ValueError(f"{name}: class index out of range 0..{n_classes - 1}")
        if rel_cols:
            rel_idx = t[:, list(rel_cols)]
            if int(rel_idx.min()) < 0 or int(rel_idx.max()) >= n_rel:
                raise ValueError(f"{name}: relation index out of range 0..{n_rel - 1}")


def el_losses(
    centres: torch.Tensor,
    radii: torch.Tensor,
    relations: torch.Tensor,
    nf1: torch.Tensor | None = None,
    nf2: torch.Tensor | None = None,
    nf3: torch.Tensor | None = None,
    nf4: torch.Tensor | None = None,
    margin: float = 0.1,
    standardize: bool = False,
    validate: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-NF ELEmbeddings losses and their sum.

    Args:
        centres: [n_classes, d] class centres, indexed by the class ids used in the NF tensors.
        radii: [n_classes] raw radius parameters; the loss uses |radii|.
        relations: [n_rel, d] relation translation vectors, indexed by the NF3/NF4 relation column.
        nf1..nf4: index tensors as in `protsae_cli.labels.ontology.NormalForms` (None or empty: loss 0).
        margin: gamma.
        standardize: standardise centres over the class table first (DeepGO-SE-style normalisation).
        validate: range-check the indices (a device sync; callers that checked once up front pass False).

    Returns:
        {"nf1", "nf2", "nf3", "nf4", "total"}: 0-d tensors (mean over each NF's axioms; total = sum).
    """
    if centres.dim() != 2 or radii.shape != centres.shape[:1]:
        raise ValueError(f"centres must be [n, d] and radii [n]; got {tuple(centres.shape)}, {tuple(radii.shape)}")
    dev = centres.device
    c = standardize_centres(centres) if standardize else centres
    rho = radii.abs()
    nf1 = _as_index(nf1, 2, dev)
    nf2 = _as_index(nf2, 3, dev)
    nf3 = _as_index(nf3, 3, dev)
    nf4 = _as_index(nf4, 3, dev)
    if validate:
        check_normal_form_ranges(nf1, nf2, nf3, nf4, c.shape[0], relations.shape[0])

    out: dict[str, torch.Tensor] = {}
    g = margin

    if nf1.numel():
        C, D = nf1[:, 0], nf1[:, 1]
        dist = torch.linalg.vector_norm(c[C] - c[D], dim=-1)
        out["nf1"] = torch.relu(dist + rho[C] - rho[D] - g).mean()
    else:
        out["nf1"] = _zero(c)

    if nf2.numel():
        C, D, E = nf2[:, 0], nf2[:, 1], nf2[:, 2]
        d_cd = torch.linalg.vector_norm(c[C] - c[D], dim=-1)
        d_ec = torch.linalg.vector_norm(c[E] - c[C], dim=-1)
        d_ed = torch.linalg.vector_norm(c[E] - c[D], dim=-1)
        out["nf2"] = (torch.relu(d_cd - rho[C] - rho[D] - g)
                      + torch.relu(d_ec - rho[C] - g)
                      + torch.relu(d_ed - rho[D] - g)).mean()
    else:
        out["nf2"] = _zero(c)

    if nf3.numel():
        R, C, D = nf3[:, 0], nf3[:, 1], nf3[:, 2]
        dist = torch.linalg.vector_norm(c[C] + relations[R] - c[D], dim=-1)
        out["nf3"] = torch.relu(dist + rho[C] - rho[D] - g).mean()
    else:
        out["nf3"] = _zero(c)

    if nf4.numel():
        C, R, D = nf4[:, 0], nf4[:, 1], nf4[:, 2]
        dist = torch.linalg.vector_norm(c[C] - (c[D] + relations[R]), dim=-1)
        out["nf4"] = torch.relu(dist - rho[C] - rho[D] - g).mean()  # rho indexed by class, not by R
    else:
        out["nf4"] = _zero(c)

    out["total"] = out["nf1"] + out["nf2"] + out["nf3"] + out["nf4"]
    return out


def el_losses_from_normal_forms(
    nf: NormalFormsLike,
    centres: torch.Tensor,
    radii: torch.Tensor,
    relations: torch.Tensor,
    margin: float = 0.1,
    standardize: bool = False,
) -> dict[str, torch.Tensor]:
    """`el_losses` taking the four index tensors from a NormalForms object."""
    return el_losses(centres, radii, relations, nf.nf1, nf.nf2, nf.nf3, nf.nf4,
                     margin=margin, standardize=standardize)
