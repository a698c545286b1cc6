"""Run by openpi-client's own venv (numpy < 2): talk to `molmo-edge serve` with the unmodified client.

argv: URL KEY WRONG_KEY OBS.npz OUT_DIR. Writes OUT_DIR/result.json (metadata, timing, the wrong key's
error), OUT_DIR/actions.npy and OUT_DIR/request.bin (openpi's own packing of the request).
"""

import json
import sys
from pathlib import Path

import numpy as np
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

url, key, wrong_key, obs_path, out = sys.argv[1:6]
out_dir = Path(out)
data = np.load(obs_path)
cameras = sorted(k[len("image_") :] for k in data.files if k.startswith("image_"))
obs = {
    "images": {c: data[f"image_{c}"] for c in cameras},
    "state": data["state"],
    "prompt": str(data["prompt"]),
    "seed": int(data["seed"]),
}
(out_dir / "request.bin").write_bytes(msgpack_numpy.packb(obs))
policy = WebsocketClientPolicy(url, api_key=key)
reply = policy.infer(obs)
np.save(out_dir / "actions.npy", reply["actions"])
try:
    policy.infer({"images": {}, "state": obs["state"], "prompt": "x"})
    bad_request = None
except RuntimeError as err:
    bad_request = str(err)
second = policy.infer(obs)  # the connection survived the refused request
try:
    WebsocketClientPolicy(url, api_key=wrong_key)
    wrong = None
except Exception as err:  # websockets' InvalidStatus: the handshake was refused
    wrong = f"{type(err).__name__}: {err}"
result = {
    "metadata": policy.get_server_metadata(),
    "timing": reply["timing"],
    "dtype": str(reply["actions"].dtype),
    "bad_request": bad_request,
    "second_equal": bool(np.array_equal(second["actions"], reply["actions"])),
    "wrong_key": wrong,
}
(out_dir / "result.json").write_text(json.dumps(result, default=str))
