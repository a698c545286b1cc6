"""molmoact2-edge: MolmoAct2-style vision-language-action policies on cheap robots.

Subpackages (dependencies point one way, cli -> runtimes/export/hardware -> core):

- ``config``, ``model``, ``tokenizers``, ``checkpoint``: the model and its released layout (torch).
- ``training``, ``data``, ``sim``: what produces checkpoints (torch, mujoco).
- ``export``: checkpoint -> bundle of fixed-shape ONNX graphs (+ TensorRT engines).
- ``runtimes``: bundle -> actions on the device (numpy + onnxruntime, no torch).
- ``hardware``: buses, robots, cameras, safety, emulators (no model code).
- ``cli``: the ``molmo-edge`` command.
"""

__version__ = "0.1.0"
