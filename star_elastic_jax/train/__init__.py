"""Training: losses (KD, CE, router budget loss), sharding, the elastic train step and loop.

``train.losses`` holds the pure loss functions (SPEC 3.7); the budget router they train lives in
``elastic.router``.
"""
