"""Training a model: a config becomes a run (`assemble`: `train(cfg, run_dir)`), the objects it needs
(`factories`), the epoch loop (`loop`: `fit`), processes of a distributed run (`distributed`) and stop
signals (`signals`).
"""
