"""A small synthetic face domain on which the whole Meta-LoRA method runs on a CPU.

Identities are fixed sets of rendered traits; every image of one identity differs in pose,
scale, position and expression, and its background colour is the context a prompt names.
``render`` draws the domain, ``models`` holds the tiny FLUX-architecture base model, its
autoencoder and text conditioning, ``judge`` the identity embedder and the context score,
``experiment`` the reproduction (Meta-LoRA vs LoRA vs LoRA + augmentation) and ``demo`` the
demo picture.
"""
