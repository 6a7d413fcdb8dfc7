"""A trial or an ensemble as an MLflow pyfunc model: its checkpoints and how it predicts (inference
settings, combine rule and weights), so that `mlflow.pyfunc.load_model("models:/<name>@champion")` turns
a batch of RGB images, uint8 [B, H, W, 3], into class ids, uint8 [B, H, W] (0 direct, 1 alternative,
2 background), on a GPU where the loading process has one. The package travels inside the model
(code_paths): loading needs torch and the package's dependencies, not this checkout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from orchestrator import checkpoints, mlflow_private
from orchestrator.inference.evaluate import Combine, predict_labels
from orchestrator.inference.predict import InferenceSettings

SETTINGS = "inference"  # the artifact holding how the members predict
CODE = __file__  # the model is logged from this file's code (MLflow's models from code), not pickled
# The distributions this module imports, itself and through the package: the model's requirements. Not
# Ray, s3fs, pycocotools, simplejpeg or safetensors (tests/inference/test_at_scale.py loads and predicts
# without them).
NEEDS = ("torch", "numpy", "mlflow", "pydantic", "pyyaml", "fsspec", "pillow", "tqdm", "matplotlib")


# A request: one 8x8 RGB image, uint8 0-255 (a horizontal gradient), kept with the model and in its REST form.
EXAMPLE = np.broadcast_to(np.linspace(0, 255, 8, dtype=np.uint8)[None, None, :, None], (1, 8, 8, 3)).copy()


def requirements() -> list[str]:
    """The model's pip requirements: NEEDS at the versions this package requires."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    return [r for r in requires("orchestrator") if Requirement(r).name.lower() in NEEDS]


class Segmenter(PythonModel):
    def load_context(self, context: Any) -> None:
        mlflow_private.refuse_lossy_json_casts()  # a float pixel sent over REST: 400, not cast to 0
        how = json.loads(Path(context.artifacts[SETTINGS]).read_text())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.members = [
            checkpoints.load_model(context.artifacts[f"member{i}"]) for i in range(how["members"])
        ]
        for m in self.members:
            m.model.to(device)
        self.settings = InferenceSettings(**how["settings"])
        self.combine, self.weights = how["combine"], how["weights"]

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        device = next(self.members[0].model.parameters()).device
        images = torch.as_tensor(np.asarray(model_input, dtype=np.uint8)).permute(0, 3, 1, 2).to(device)
        labels = predict_labels(
            self.members, images, self.settings, ensemble=len(self.members) > 1, combine=self.combine,
            weights=self.weights,
        )[-1]  # fmt: skip
        return labels.to(torch.uint8).cpu().numpy()


def artifacts(
    paths: list[Path],
    settings: InferenceSettings,
    combine: Combine,
    weights: list[float] | None,
    folder: Path,
) -> dict[str, str]:
    """The model's artifacts: each member's checkpoint file and, written to `folder`, how they predict."""
    how = folder / "inference.json"
    how.write_text(
        json.dumps(
            {
                "members": len(paths),
                "settings": dataclasses.asdict(settings),
                "combine": combine,
                "weights": weights,
            }
        )  # fmt: skip
    )
    return {SETTINGS: str(how), **{f"member{i}": str(p) for i, p in enumerate(paths)}}


set_model(Segmenter())
