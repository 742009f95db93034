"""`nc-study analyze`: the thesis' conjectures tested on a study read back from MLflow.

One module per question, each a pure function of the tidy frame (`frame`) plus thin parts
that load runs (`load`) and write outputs (`report`, `figures`):

    load      MLflow (SQLite fast path or MlflowClient) -> tidy frame, with a per-run cache
    frame     the frame's schema and the selections the tests share
    stats     permutation rank correlation, Jonckheere–Terpstra, Holm's adjustment
    bounds    simultaneous intervals for a conjecture's ε, noise floor, verdicts against τ
    verdict   the verdict states, tolerances τ and their wording; Holm within a family
    wd        Conjecture 3.1.1  NC improves with weight decay
    depth     Conjecture 3.2.1  NC sharpens with depth
    effdepth  Conjecture 3.2.2  effective depth falls as weight decay grows
    theorem   Theorem 2.3.1     loss_gap >= 0 (a measurement check); the rates on raw cosines
    effects   BN kind: differences of seed means at each λ, Welch intervals
    claims    the paper's claims (alpha falls with λ, NC stronger as the loss falls) and the
              thesis' §1.4 data-complexity trend
    figures   Fig 3.1, Fig 3.3, training curves, one plot per conjecture
    report    analyze(): everything above -> report.md, conjectures.json, PNGs, MLflow artifacts
    report_html  report.md -> one self-contained report.html (MLflow's viewer renders it)
    cli       the `analyze` subcommand
    synthetic planted studies written to MLflow as a study would (tests, benchmark)
    bench     `python -m analysis.bench`
    power     `python -m analysis.power`: verdict chances against the seed count
"""
