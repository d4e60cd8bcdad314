"""The data a run reads: datasets and their splits (`datasets`), how an image becomes an input (`transforms`),
how samples reach the model (`loaders`), and long-tailed training splits (`imbalance`).
"""
