"""Exact theory of one-layer linear attention (SPEC sections 4-5).

- theory.cubature: exact Gaussian (sparse-grid) and spherical cubature rules.
- theory.risk: exact population risk `risk(params, shots, task, noise, sigma, normalization)`,
  `population_objective` for any registered objective; CLI `python -m theory.risk`.
- theory.optimal: closed-form optima (pretraining, ZS families, value-only, w*); exact Newton
  solves for single-leaf subsets; CLI `python -m theory.optimal`.
- theory.solver: gradient flow mirroring training, and a minimizer, on the exact objective.
- theory.conditions: closed-form condition for ICL degradation after full ZS fine-tuning.
- theory.bench: timing (`python -m theory.bench`).
Derivations: theory/DERIVATIONS.md.
"""
