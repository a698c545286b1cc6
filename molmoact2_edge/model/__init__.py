"""The MolmoAct2 network in PyTorch, one component per file (see docs/model.md).

Importing this package does not import torch: ``masks`` (numpy) is used by the
torch-free device runtime. Import the torch modules explicitly, e.g.
``from molmoact2_edge.model.molmoact2 import MolmoAct2``.
"""
